"""The chunk codec registry, the blosc2 codecs and the rule that decides when compression pays."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import EntryPoint
from typing import Any

import numpy as np
import pytest

from fedcell.errors import ConfigError, FrameError
from fedcell.transports import compression
from fedcell.transports.base import Buffer


def _bf16_precision_weights(n: int, seed: int = 0) -> np.ndarray:
    weights = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    return (weights.view(np.uint32) & 0xFFFF0000).view(np.float32)


@pytest.mark.parametrize("name", ["none", "blosc2-lz4", "blosc2-zstd"])
def test_builtin_codecs_round_trip(name: str) -> None:
    codec = compression.get_codec(name)
    data = _bf16_precision_weights(100_000)
    packed = codec.compress(memoryview(data).cast("B"), typesize=4)
    out = bytearray(data.nbytes)
    codec.decompress_into(packed, memoryview(out))
    assert bytes(out) == data.tobytes()
    if name != "none":
        assert memoryview(packed).nbytes < data.nbytes * 0.7  # half of each value is zeros


def test_blosc2_handles_a_typesize_that_does_not_divide_the_chunk() -> None:
    codec = compression.get_codec("blosc2-lz4")
    data = bytes(range(256)) * 10 + b"xyz"  # 2,563 bytes, typesize 4
    packed = codec.compress(data, typesize=4)
    out = bytearray(len(data))
    codec.decompress_into(packed, memoryview(out))
    assert bytes(out) == data


@pytest.mark.parametrize("name", ["blosc2-lz4", "blosc2-zstd"])
def test_malformed_or_mis_sized_compressed_chunks_raise_frame_error(name: str) -> None:
    codec = compression.get_codec(name)
    packed = codec.compress(_bf16_precision_weights(2_500).tobytes(), typesize=4)
    with pytest.raises(FrameError, match="shorter than its header"):
        codec.decompress_into(b"\x00\x01garbage", memoryview(bytearray(10_000)))
    with pytest.raises(FrameError):
        codec.decompress_into(bytes(range(64)), memoryview(bytearray(10_000)))
    with pytest.raises(FrameError, match="decompresses to 10000 bytes, expected 9999"):
        codec.decompress_into(packed, memoryview(bytearray(9_999)))
    truncated = bytes(packed)[: len(packed) // 2]
    with pytest.raises(FrameError, match="its header says"):
        codec.decompress_into(truncated, memoryview(bytearray(10_000)))


def test_none_codec_checks_the_length() -> None:
    with pytest.raises(FrameError, match="raw chunk has 3 bytes, expected 4"):
        compression.get_codec("none").decompress_into(b"abc", memoryview(bytearray(4)))


def test_unknown_codec_is_a_config_error_naming_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown compression codec 'lzma'.*blosc2-lz4"):
        compression.get_codec("lzma")


class ReverseCodec:
    """A toy third-party codec: stores the bytes reversed."""

    def __init__(self, name: str = "test-reverse") -> None:
        self.name = name

    def compress(self, data: Buffer, typesize: int) -> Buffer:
        return bytes(memoryview(data))[::-1]

    def decompress_into(self, data: Buffer, out: memoryview) -> None:
        raw = bytes(memoryview(data))[::-1]
        if len(raw) != out.nbytes:
            raise FrameError("wrong size")
        out[:] = raw


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Codecs registered by the test vanish after it."""
    monkeypatch.setattr(compression, "_registered", dict(compression._registered))


@pytest.mark.usefixtures("isolated_registry")
def test_register_codec_at_run_time_and_refuse_duplicates() -> None:
    codec = ReverseCodec("test-reverse-runtime")
    compression.register_codec(codec)
    assert compression.get_codec("test-reverse-runtime") is codec
    assert "test-reverse-runtime" in compression.available_codecs()
    with pytest.raises(ConfigError, match="already registered"):
        compression.register_codec(ReverseCodec("test-reverse-runtime"))
    with pytest.raises(ConfigError, match="already registered"):
        compression.register_codec(ReverseCodec("blosc2-lz4"))
    with pytest.raises(ConfigError, match="does not provide"):
        compression.register_codec(object())  # type: ignore[arg-type]


@pytest.mark.usefixtures("isolated_registry")
def test_third_party_codec_loads_through_the_entry_point_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    entry = EntryPoint(
        name="test-reverse-ep", value=f"{__name__}:_make_entry_point_codec",
        group=compression.ENTRY_POINT_GROUP,
    )  # fmt: skip
    seen_groups: list[str] = []

    def fake_entry_points(*, group: str) -> list[EntryPoint]:
        seen_groups.append(group)
        return [entry]

    monkeypatch.setattr(compression, "entry_points", fake_entry_points)
    codec = compression.get_codec("test-reverse-ep")
    assert codec.name == "test-reverse-ep"
    assert seen_groups == ["fedcell.codecs"]
    assert "test-reverse-ep" in compression.available_codecs()


def _make_entry_point_codec() -> Any:
    return ReverseCodec("test-reverse-ep")


def test_compression_is_chosen_only_where_it_pays() -> None:
    # Prepare: 4 x 64 KiB samples of weights at bf16 precision, and of random bytes.
    weights = _bf16_precision_weights(4 * 16_384)
    samples = [(memoryview(weights[i * 16_384 : (i + 1) * 16_384]).cast("B"), 4) for i in range(4)]
    noise = np.random.default_rng(1).integers(0, 256, size=4 * 65_536, dtype=np.uint8)
    noise_samples = [(memoryview(noise[i * 65_536 : (i + 1) * 65_536]), 1) for i in range(4)]
    # Execute
    lan = compression.choose_codec(samples, link_bytes_per_s=100e9)  # faster than any codec
    wan = compression.choose_codec(samples, link_bytes_per_s=12.5e6)  # 100 Mbit/s
    wan_noise = compression.choose_codec(noise_samples, link_bytes_per_s=12.5e6)
    # Assert
    assert lan.name == "none"
    assert wan.name in ("blosc2-lz4", "blosc2-zstd")
    assert wan.ratios[wan.name] > 1.5
    assert wan.costs[wan.name] < wan.costs["none"] * 0.9
    assert wan_noise.name == "none"
    assert compression.choose_codec([], 1e6).name == "none"
    with pytest.raises(ConfigError, match="positive"):
        compression.choose_codec(samples, 0)


def test_blosc2_is_imported_only_when_a_blosc2_codec_is_used() -> None:
    # A fresh interpreter: fedcell's processes start without blosc2 and load it on first use.
    code = (
        "import sys\n"
        "import fedcell.transports.cell, fedcell.engine.simulator, fedcell.deploy.participant\n"
        "from fedcell.transports import compression\n"
        "before = 'blosc2' in sys.modules\n"
        "codec = compression.get_codec('blosc2-zstd')\n"
        "packed = codec.compress(bytes(4096), 4)\n"
        "out = bytearray(4096)\n"
        "codec.decompress_into(packed, memoryview(out))\n"
        "print(before, 'blosc2' in sys.modules, out == bytes(4096))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["False", "True", "True"]
