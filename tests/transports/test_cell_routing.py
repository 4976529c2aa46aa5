"""The pure routing decision and name validation of cells."""

from __future__ import annotations

import pytest

from fedcell.errors import ConfigError, UnreachableError
from fedcell.transports.cell_routing import ancestors, next_hop, validate_cell_name


@pytest.mark.parametrize("name", ["server", "site-1", "site-1.job-7", "a_b.C-9.x"])
def test_valid_names_pass(name: str) -> None:
    assert validate_cell_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "site-1.", ".site", "a..b", "site 1", "s/1", 7, None])
def test_invalid_names_are_refused_with_the_name(name: object) -> None:
    with pytest.raises(ConfigError, match="invalid cell name"):
        validate_cell_name(name)


def test_ancestors_nearest_first() -> None:
    assert ancestors("a.b.c") == ["a.b.c", "a.b", "a"]
    assert ancestors("a") == ["a"]


def test_local_delivery_is_none() -> None:
    assert next_hop("server", "server", {"site-1"}, None) is None


def test_direct_neighbour() -> None:
    assert next_hop("server", "site-1", {"site-1", "site-2"}, None) == "site-1"


def test_descendant_of_a_neighbour_goes_through_the_nearest_ancestor() -> None:
    neighbours = {"site-1", "site-1.job-7"}
    assert next_hop("server", "site-1.job-7.trainer", neighbours, None) == "site-1.job-7"
    assert next_hop("server", "site-1.job-8", neighbours, None) == "site-1"


def test_unknown_goes_up_to_the_parent() -> None:
    assert next_hop("site-1", "site-2", {"server"}, "server") == "server"
    assert next_hop("site-1.job-7", "site-1.job-8", {"site-1"}, "site-1") == "site-1"


def test_own_unconnected_descendant_is_unreachable_not_sent_up() -> None:
    with pytest.raises(UnreachableError, match=r"'site-1\.job-9' is not connected to 'site-1'"):
        next_hop("site-1", "site-1.job-9", {"server"}, "server")


def test_unknown_at_the_root_is_unreachable() -> None:
    with pytest.raises(UnreachableError, match="unknown cell 'site-3'"):
        next_hop("server", "site-3", {"site-1"}, None)


def test_parent_down_is_reported_as_such() -> None:
    with pytest.raises(UnreachableError, match="parent of 'site-1' is not connected"):
        next_hop("site-1", "site-2", set(), None, parent_configured=True)
