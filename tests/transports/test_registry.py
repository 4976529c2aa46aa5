"""Transports by URL scheme: built-ins, run-time registration, the entry-point group."""

from __future__ import annotations

import asyncio
import importlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedcell.errors import ConfigError, UnknownSchemeError
from fedcell.transports import registry
from fedcell.transports.base import TransportOptions
from fedcell.transports.inproc import InprocTransport
from fedcell.transports.registry import get_transport, register_transport, scheme_of
from fedcell.transports.testing import check_round_trip
from fedcell.transports.zmq_transport import ZmqTransport


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by the test vanish with it."""
    monkeypatch.setattr(registry, "_registered", dict(registry._registered))


def test_unknown_scheme_error_names_the_scheme_and_the_known_ones() -> None:
    with pytest.raises(UnknownSchemeError) as info:
        get_transport("carrier-pigeon://coop-7")
    message = str(info.value)
    assert "'carrier-pigeon'" in message
    for known in ("inproc", "ipc", "tcp"):
        assert known in message
    assert isinstance(info.value, ConfigError)


def test_url_without_scheme_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="has no scheme"):
        scheme_of("127.0.0.1:5555")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("tcp://127.0.0.1:0", ZmqTransport),
        ("ipc:///tmp/x", ZmqTransport),
        ("inproc://x", InprocTransport),
    ],
)
def test_builtin_schemes_resolve_to_their_transport(url: str, expected: type) -> None:
    options = TransportOptions(queue_size=7)
    transport = get_transport(url, options)
    assert type(transport) is expected
    assert transport.options is options


class _OtherInproc(InprocTransport):
    schemes = ("inproc",)


def test_registering_a_taken_scheme_needs_replace(isolated_registry: None) -> None:
    get_transport("inproc://x")  # loads the built-in
    with pytest.raises(ConfigError, match="'inproc' is already registered"):
        register_transport(_OtherInproc)
    register_transport(_OtherInproc, replace=True)
    assert type(get_transport("inproc://x")) is _OtherInproc


@pytest.fixture
def third_party_distribution(tmp_path: Path) -> Iterator[str]:
    """A tiny installed-looking distribution declaring a ``pigeon`` transport entry point."""
    package = tmp_path / "pigeon_transport"
    package.mkdir()
    (package / "__init__.py").write_text(
        textwrap.dedent(
            '''
            from fedcell.transports.inproc import InprocTransport


            class PigeonTransport(InprocTransport):
                """In-process transport under a third-party scheme."""

                schemes = ("pigeon",)
            '''
        )
    )
    dist_info = tmp_path / "pigeon_transport-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: pigeon-transport\nVersion: 1.0\n"
    )
    (dist_info / "entry_points.txt").write_text(
        "[fedcell.transports]\npigeon = pigeon_transport:PigeonTransport\n"
    )
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    try:
        yield "pigeon"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("pigeon_transport", None)
        importlib.invalidate_caches()


def test_third_party_transport_is_found_through_the_entry_point_group(
    isolated_registry: None, third_party_distribution: str
) -> None:
    # Prepare
    url = f"{third_party_distribution}://loft"
    # Execute
    transport = get_transport(url)
    # Assert
    assert type(transport).__name__ == "PigeonTransport"
    assert type(transport).__module__ == "pigeon_transport"
    asyncio.run(check_round_trip(transport, url))


def test_entry_point_that_is_not_a_transport_is_refused(
    isolated_registry: None, tmp_path: Path
) -> None:
    dist_info = tmp_path / "bogus-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: bogus\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[fedcell.transports]\nbogus = os.path:join\n")
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    try:
        with pytest.raises(ConfigError, match=r"os\.path:join is not a fedcell Transport"):
            get_transport("bogus://x")
    finally:
        sys.path.remove(str(tmp_path))
        importlib.invalidate_caches()
