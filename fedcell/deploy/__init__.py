"""Real deployment: provisioning, startup kits, secured cells and signed admin commands.

``fedcell provision project.yml`` (:func:`~fedcell.deploy.provision.provision`) makes a project CA
and one startup kit per participant (:mod:`fedcell.deploy.kit`); a participant loads its kit with
:meth:`StartupKit.load` and gets a cell whose links are CurveZMQ-encrypted and whose peers are
bound to their certificates (:meth:`StartupKit.cell`). Admins sign job commands with
:func:`~fedcell.deploy.commands.sign_command`; servers and sites check them with
:func:`~fedcell.deploy.commands.verify_command`. ``docs/deployment.md`` is the operator's guide.
"""

from __future__ import annotations

from fedcell.deploy.commands import (
    ReplayGuard,
    SignedCommand,
    VerifiedCommand,
    sign_command,
    verify_command,
)
from fedcell.deploy.kit import StartupKit, TrustedParticipants, bind_cell_name
from fedcell.deploy.project import Project, load_project
from fedcell.deploy.provision import ProvisionReport, provision

__all__ = [
    "Project",
    "ProvisionReport",
    "ReplayGuard",
    "SignedCommand",
    "StartupKit",
    "TrustedParticipants",
    "VerifiedCommand",
    "bind_cell_name",
    "load_project",
    "provision",
    "sign_command",
    "verify_command",
]
