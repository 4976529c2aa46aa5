"""Helpers of the deployment tests: project trees, provisioning into a workspace, free ports."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedcell.deploy.project import Project, parse_project
from fedcell.deploy.provision import ProvisionReport, provision


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def project_tree(
    name: str = "demo", sites: tuple[str, ...] = ("site-1", "site-2"), port: int = 8002
) -> dict[str, Any]:
    return {
        "project": name,
        "server": {"host": "127.0.0.1", "port": port, "listen_host": "127.0.0.1"},
        "sites": list(sites),
        "admins": [{"name": "alice", "role": "project_admin"}, {"name": "bob"}],
    }


def with_organizations(tree: dict[str, Any], orgs: Mapping[str, str]) -> dict[str, Any]:
    """``tree`` with ``org`` set for the participants ``orgs`` names (a site becomes a
    ``{name, org}`` mapping; the server is named by its default name ``server``)."""
    if "server" in orgs:
        tree["server"]["org"] = orgs["server"]
    tree["sites"] = [
        {"name": site, "org": orgs[site]} if isinstance(site, str) and site in orgs else site
        for site in tree["sites"]
    ]
    for admin in tree["admins"]:
        if admin["name"] in orgs:
            admin["org"] = orgs[admin["name"]]
    return tree


def provision_tree(tree: dict[str, Any], workspace: Path) -> ProvisionReport:
    """Provision the project ``tree`` (as ``project.yml`` would parse) into ``workspace``."""
    project: Project = parse_project(tree)
    return provision(project, workspace)


def provisioned_kits(root: Path) -> Path:
    """Kits of the test project (server on a free port) provisioned under ``root``."""
    provision_tree(project_tree(port=free_port()), root / "project")
    return root / "project" / "kits"


def kit_files(kit: Path) -> dict[str, bytes]:
    """Every file of a kit, relative path → content."""
    return {str(p.relative_to(kit)): p.read_bytes() for p in sorted(kit.rglob("*")) if p.is_file()}


def tampered(pem: bytes) -> bytes:
    """``pem`` with one bit of its serial number flipped: still a parseable certificate, but its
    signature no longer matches (what an attacker editing a certificate produces)."""
    cert = x509.load_pem_x509_certificate(pem)
    whole = bytearray(cert.public_bytes(serialization.Encoding.DER))
    tbs = cert.tbs_certificate_bytes
    whole[bytes(whole).find(tbs) + 15] ^= 0x01  # inside the 20-byte serial, past its sign bit
    forged = x509.load_der_x509_certificate(bytes(whole))
    return forged.public_bytes(serialization.Encoding.PEM)
