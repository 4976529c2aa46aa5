"""Cell names and the routing decision, as pure functions (no I/O, no state).

A cell name is a dot-separated path of labels: ``server``, ``site-1``, ``site-1.job-7``,
``site-1.job-7.trainer``. A label is letters, digits, ``_`` and ``-``. The dots encode the
hierarchy: ``site-1.job-7`` is a *descendant* of ``site-1``, so any cell that can reach ``site-1``
can reach ``site-1.job-7`` by sending towards ``site-1``. No cell needs to know its grandchildren.

:func:`next_hop` decides where a message for ``target`` goes from cell ``me``, in this order:

1. ``target == me``: deliver locally (returns ``None``).
2. ``target`` or its nearest ancestor is a neighbour (a cell with a live, handshaken link to
   ``me``): send it there. Walking the ancestors costs one dict lookup per label, whatever the
   number of neighbours.
3. ``me`` is an ancestor of ``target`` (``site-1`` asked for ``site-1.job-9`` which is not
   connected): unreachable. Sending it up would only bring it back down.
4. ``me`` has a parent: send it up (the parent knows more of the tree).
5. Otherwise (``me`` is the root, or its parent link is down): unreachable, at once.

``UnreachableError`` messages say which case failed, so an operator can tell "no such cell" from
"the parent is down".
"""

from __future__ import annotations

import re
from collections.abc import Container

from fedcell.errors import ConfigError, UnreachableError

__all__ = ["ancestors", "next_hop", "validate_cell_name"]

_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
MAX_NAME_LENGTH = 255


def validate_cell_name(name: object) -> str:
    """Return ``name`` if it is a valid cell name.

    Raises
    ------
    ConfigError
        If ``name`` is not a string of dot-separated labels (letters, digits, ``_``, ``-``).
    """
    if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH or not _NAME.fullmatch(name):
        raise ConfigError(
            f"invalid cell name {name!r}: expected dot-separated labels of letters, digits, "
            f"'_' and '-' (at most {MAX_NAME_LENGTH} characters), e.g. 'site-1.job-7'"
        )
    return name


def ancestors(name: str) -> list[str]:
    """``name`` and its ancestors, nearest first: ``a.b.c`` → ``[a.b.c, a.b, a]``."""
    out = [name]
    while "." in name:
        name = name.rpartition(".")[0]
        out.append(name)
    return out


def next_hop(
    me: str,
    target: str,
    neighbours: Container[str],
    parent: str | None,
    *,
    parent_configured: bool = False,
) -> str | None:
    """The neighbour to send a message for ``target`` to, or ``None`` to deliver it locally.

    Parameters
    ----------
    me:
        This cell's name.
    target:
        The receiver's name.
    neighbours:
        Names of the cells with a live, handshaken link to ``me`` (the parent included).
    parent:
        The parent's name while its link is up, else ``None``.
    parent_configured:
        Whether ``me`` has a parent at all (only changes the error message when it is down).

    Raises
    ------
    UnreachableError
        If no route leads to ``target`` (see the module docstring for the cases).
    """
    if target == me:
        return None
    for name in ancestors(target):
        if name == me:
            raise UnreachableError(f"cell {target!r} is not connected to {me!r}")
        if name in neighbours:
            return name
    if parent is not None:
        return parent
    if parent_configured:
        raise UnreachableError(f"cannot reach {target!r}: the parent of {me!r} is not connected")
    raise UnreachableError(f"unknown cell {target!r} (no route from {me!r})")
