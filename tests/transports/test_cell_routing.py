"""The pure routing decision and name validation of cells."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

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


@st.composite
def trees(draw: st.DrawFn) -> dict[str, str | None]:
    """A cell tree as ``{name: parent}``: ``server`` at the root, ``site-N`` below it, and
    descendants named after their parent (``site-1.job-2``)."""
    parents: dict[str, str | None] = {"server": None}
    for site in range(draw(st.integers(1, 4))):
        frontier = [f"site-{site}"]
        parents[frontier[0]] = "server"
        while frontier:
            node = frontier.pop()
            if node.count(".") >= 2:
                continue
            for child in range(draw(st.integers(0, 2))):
                name = f"{node}.c{child}"
                parents[name] = node
                frontier.append(name)
    return parents


def _path_up(name: str, parents: dict[str, str | None]) -> list[str]:
    path = [name]
    while (parent := parents[path[-1]]) is not None:
        path.append(parent)
    return path


@given(trees(), st.data())
def test_hop_by_hop_routing_follows_the_tree_path(
    parents: dict[str, str | None], data: st.DataObject
) -> None:
    # Prepare: each cell's neighbours are its parent and its children
    names = sorted(parents)
    neighbours = {name: {n for n, p in parents.items() if p == name} for name in names}
    for name, parent in parents.items():
        if parent is not None:
            neighbours[name].add(parent)
    source = data.draw(st.sampled_from(names))
    target = data.draw(st.sampled_from(names))

    # Execute: follow next_hop from cell to cell
    path = [source]
    while (hop := next_hop(path[-1], target, neighbours[path[-1]], parents[path[-1]])) is not None:
        assert len(path) <= len(names), f"routing loops: {path}"
        path.append(hop)

    # Assert: up to the nearest common ancestor, then down: the unique tree path
    up, down = _path_up(source, parents), _path_up(target, parents)
    common = next(node for node in up if node in down)
    expected = up[: up.index(common) + 1] + list(reversed(down[: down.index(common)]))
    assert path == expected
