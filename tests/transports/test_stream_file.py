"""File-to-file streaming: sink policy, verified rename, cleanup on failure, > 4 GiB in bounded RSS."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import xxhash
from stream_harness import StreamNet

from fedcell.errors import ConfigError, StreamCancelledError, StreamIntegrityError
from fedcell.transports.stream import (
    FileOffer,
    ReceivedFile,
    StreamConfig,
    directory_sink,
)
from fedcell.transports.stream_protocol import Data, parse_header

KiB = 1024
MiB = 1024 * KiB
CONFIG = StreamConfig(chunk_size=64 * KiB, window=256 * KiB, codec="none", stall_timeout=2.0)


def _write_file(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return xxhash.xxh3_128_hexdigest(data)


def test_file_round_trip_lands_verified_with_meta(tmp_path: Path) -> None:
    async def main() -> None:
        # Prepare
        source = tmp_path / "out" / "weights.bin"
        source.parent.mkdir()
        inbox = tmp_path / "in"
        inbox.mkdir()
        digest = _write_file(source, 1_000_003)
        net = StreamNet()
        a = net.add("a", CONFIG)
        net.add("b", CONFIG, file_sink=directory_sink(inbox))
        try:
            # Execute
            sent_digest = await a.send_file("b", source, channel="files", meta={"round": 3})
            message = await net.next_delivery("b")
        finally:
            await net.close()
        # Assert
        received = message.payload
        assert isinstance(received, ReceivedFile)
        assert message.channel == "files" and message.sender == "a" and message.receiver == "b"
        assert received == ReceivedFile(str(inbox / "weights.bin"), 1_000_003, digest,
                                         "weights.bin", {"round": 3})  # fmt: skip
        assert sent_digest == digest
        assert xxhash.xxh3_128_hexdigest((inbox / "weights.bin").read_bytes()) == digest
        assert sorted(p.name for p in inbox.iterdir()) == ["weights.bin"]

    asyncio.run(main())


def test_empty_file_round_trip(tmp_path: Path) -> None:
    async def main() -> None:
        (tmp_path / "empty").write_bytes(b"")
        inbox = tmp_path / "in"
        inbox.mkdir()
        net = StreamNet()
        a = net.add("a", CONFIG)
        net.add("b", CONFIG, file_sink=directory_sink(inbox))
        try:
            await a.send_file("b", tmp_path / "empty", channel="files")
            message = await net.next_delivery("b")
        finally:
            await net.close()
        assert message.payload.size == 0 and (inbox / "empty").read_bytes() == b""

    asyncio.run(main())


def test_corrupted_file_stream_leaves_no_file_behind(tmp_path: Path) -> None:
    async def main() -> None:
        source = tmp_path / "model.bin"
        _write_file(source, 500_000)
        inbox = tmp_path / "in"
        inbox.mkdir()
        net = StreamNet()
        a = net.add("a", CONFIG)
        net.add("b", CONFIG, file_sink=directory_sink(inbox))

        def corrupt_chunk_4(src: str, dst: str, frames: list[bytes]) -> list[bytes] | None:
            header = parse_header(frames[0], 1 << 20)
            if isinstance(header, Data) and header.seq == 4:
                return [frames[0], b"x" * len(frames[1])]
            return frames

        net.tamper = corrupt_chunk_4
        try:
            with pytest.raises(StreamIntegrityError, match="chunk 4 fails its checksum"):
                await a.send_file("b", source, channel="files")
            assert list(inbox.iterdir()) == []
            net.tamper = None
            await a.send_file("b", source, channel="files")
            await net.next_delivery("b")
        finally:
            await net.close()
        assert [p.name for p in inbox.iterdir()] == ["model.bin"]

    asyncio.run(main())


def test_files_are_refused_without_a_sink_or_by_the_policy(tmp_path: Path) -> None:
    async def main() -> None:
        source = tmp_path / "secret.bin"
        _write_file(source, 1000)
        offers: list[FileOffer] = []

        def only_small_files(offer: FileOffer) -> Path:
            offers.append(offer)
            raise ConfigError(f"{offer.name} is not wanted here")

        net = StreamNet()
        a = net.add("a", CONFIG)
        net.add("no-sink", CONFIG)
        net.add("picky", CONFIG, file_sink=only_small_files)
        try:
            with pytest.raises(StreamCancelledError, match="accepts no files"):
                await a.send_file("no-sink", source, channel="files")
            with pytest.raises(StreamCancelledError, match=r"secret\.bin is not wanted here"):
                await a.send_file("picky", source, channel="files", meta={"k": "v"})
        finally:
            await net.close()
        assert offers == [FileOffer("a", "secret.bin", 1000, "files", {"k": "v"})]

    asyncio.run(main())


@pytest.mark.parametrize("name", ["../escape", "", ".hidden", "a/b"])
def test_directory_sink_refuses_names_that_leave_the_folder(tmp_path: Path, name: str) -> None:
    place = directory_sink(tmp_path)
    with pytest.raises(ConfigError, match="refusing file name"):
        place(FileOffer("peer", name, 1, "files", {}))


_CHILD = textwrap.dedent(
    """
    import asyncio, json, os, sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from stream_harness import StreamNet
    from fedcell.transports.stream import StreamConfig, directory_sink

    async def main():
        source, inbox = Path(sys.argv[1]), Path(sys.argv[2])
        config = StreamConfig(codec="none")
        net = StreamNet(queue_size=8, copy=False)
        a = net.add("a", config)
        net.add("b", config, file_sink=directory_sink(inbox))
        started = time.monotonic()
        try:
            digest = await a.send_file("b", source, channel="files")
            message = await net.next_delivery("b", timeout=60)
        finally:
            await net.close()
        seconds = time.monotonic() - started
        print(json.dumps({
            "digest": digest, "received": message.payload.digest, "path": message.payload.path,
            "size": message.payload.size, "seconds": seconds,
            # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child spawned from a
            # big pytest process would report the parent's size.
            "peak_rss_mib": next(
                int(line.split()[1]) for line in open("/proc/self/status")
                if line.startswith("VmHWM:")
            ) / 1024,
        }))

    asyncio.run(main())
    """
)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_file_above_4_gib_streams_file_to_file_in_bounded_memory(tmp_path: Path) -> None:
    # Prepare: a sparse 4.5 GiB file with random blocks at the start, across the 4 GiB mark
    # and at the end (so the hash covers real data on both sides of 2**32).
    size = 4 * 1024 * MiB + 512 * MiB
    source = tmp_path / "huge.bin"
    blocks = {0: os.urandom(MiB), 2**32 - 1000: os.urandom(MiB), size - MiB: os.urandom(MiB)}
    with source.open("wb") as f:
        f.truncate(size)
        for offset, block in blocks.items():
            f.seek(offset)
            f.write(block)
    inbox = tmp_path / "in"
    inbox.mkdir()
    expected = xxhash.xxh3_128()
    with source.open("rb") as f:
        while block := f.read(64 * MiB):
            expected.update(block)
    try:
        # Execute: sender and receiver in a child process, so its peak RSS is theirs alone.
        harness_dir = str(Path(__file__).parent)
        result = subprocess.run(
            [sys.executable, "-c", _CHILD, str(source), str(inbox), harness_dir],
            capture_output=True, text=True, timeout=840, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        # Assert: both digests and the bytes on disk match the source; RSS stayed bounded.
        assert report["size"] == size
        assert report["digest"] == report["received"] == expected.hexdigest()
        actual = xxhash.xxh3_128()
        with open(report["path"], "rb") as f:
            while block := f.read(64 * MiB):
                actual.update(block)
        assert actual.hexdigest() == expected.hexdigest()
        assert report["peak_rss_mib"] <= 256, report
    finally:
        source.unlink(missing_ok=True)
        for leftover in inbox.iterdir():
            leftover.unlink()
