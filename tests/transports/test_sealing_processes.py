"""Sealed request/reply between two site processes relayed by a server over tcp: the server
forwards ciphertext only.

This file is also the site program (``python test_sealing_processes.py ROLE PARENT_URL KEYDIR``):
``site-2`` answers sealed ``train`` requests; ``site-1`` sends one and prints the opened reply.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedcell.transports.base import Buffer
from fedcell.transports.cell import Cell, CellConfig
from fedcell.transports.message import Envelope, Message
from fedcell.transports.sealing import Sealer, seal_and_request, unsealing

SECRET = b"patient-record-7f3a91c2"
CONFIG = CellConfig(heartbeat_interval=0.2, peer_timeout=5.0, connect_timeout=20.0)
#: 3 MiB of plaintext: above the 1 MiB stream threshold, so the request streams through the relay.
WEIGHT_COUNT = 3 * 1024 * 1024 // 4


def weights() -> np.ndarray:
    return np.arange(WEIGHT_COUNT, dtype=np.float32)


def load_sealer(keydir: Path, name: str) -> Sealer:
    cert = x509.load_pem_x509_certificate((keydir / f"{name}.crt").read_bytes())
    key = serialization.load_pem_private_key((keydir / f"{name}.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((keydir / "ca.crt").read_bytes())
    return Sealer(cert, key, ca)  # type: ignore[arg-type]


async def site_2(parent: str, keydir: Path) -> None:
    sealer = load_sealer(keydir, "site-2")

    async def train(message: Message) -> Any:
        w = message.payload["weights"]
        return {"weights": w + 1, "note": message.payload["note"] + b"-trained"}

    cell = Cell("site-2", parent=parent, config=CONFIG)
    cell.register("train", unsealing(sealer, train))
    async with cell:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        await stop.wait()


async def site_1(parent: str, keydir: Path) -> None:
    sealer = load_sealer(keydir, "site-1")
    site_2_cert = x509.load_pem_x509_certificate((keydir / "site-2.crt").read_bytes())
    async with Cell("site-1", parent=parent, config=CONFIG) as cell:
        reply = await seal_and_request(
            cell, sealer, "site-2", "train", {"weights": weights(), "note": SECRET}, site_2_cert,
            timeout=30.0,
        )
    ok = bool(np.array_equal(reply["weights"], weights() + 1))
    print(json.dumps({"weights_ok": ok, "note": reply["note"].decode()}), flush=True)


def write_keys(keydir: Path) -> None:
    from test_sealing import make_ca, make_participant

    ca = make_ca()
    pem = serialization.Encoding.PEM
    (keydir / "ca.crt").write_bytes(ca[0].public_bytes(pem))
    for name in ("site-1", "site-2"):
        cert, key = make_participant(ca, name)
        (keydir / f"{name}.crt").write_bytes(cert.public_bytes(pem))
        (keydir / f"{name}.key").write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
        )


@pytest.mark.integration
def test_sealed_request_between_site_processes_is_ciphertext_at_the_tcp_server(
    tmp_path: Path,
) -> None:
    write_keys(tmp_path)

    async def main() -> None:
        # Prepare: the server in this process, recording every message it relays.
        relayed: list[tuple[Envelope, bytes]] = []
        server = Cell("server", listen="tcp://127.0.0.1:0", config=CONFIG)
        relay = server._relay

        async def spy(envelope: Envelope, frames: list[Buffer]) -> None:
            relayed.append((envelope, b"".join(bytes(f) for f in frames)))
            await relay(envelope, frames)

        server._relay = spy  # type: ignore[method-assign]
        async with server:
            command = [sys.executable, __file__]
            sites: list[asyncio.subprocess.Process] = []
            try:
                responder = await asyncio.create_subprocess_exec(
                    *command, "site-2", server.url, str(tmp_path), stdout=subprocess.PIPE
                )
                sites.append(responder)
                assert responder.stdout is not None
                line = await asyncio.wait_for(responder.stdout.readline(), 60)
                assert line == b"ready\n"
                # Execute
                requester = await asyncio.create_subprocess_exec(
                    *command, "site-1", server.url, str(tmp_path), stdout=subprocess.PIPE
                )
                sites.append(requester)
                out, _ = await asyncio.wait_for(requester.communicate(), 90)
                assert requester.returncode == 0
            finally:
                for site in sites:
                    if site.returncode is None:
                        site.terminate()
                    await site.wait()
        # Assert
        assert json.loads(out) == {"weights_ok": True, "note": SECRET.decode() + "-trained"}
        channels = {envelope.channel for envelope, _ in relayed}
        assert "_fc.stream" in channels  # the 3 MiB request and reply streamed through the relay
        total = sum(len(wire) for _, wire in relayed)
        assert total > 2 * WEIGHT_COUNT * 4
        plain = weights().tobytes()
        for _, wire in relayed:
            assert SECRET not in wire
            assert plain[4096:4160] not in wire
            assert (weights() + 1).tobytes()[4096:4160] not in wire

    asyncio.run(main())


if __name__ == "__main__":
    role, parent_url, keys = sys.argv[1:4]
    asyncio.run({"site-1": site_1, "site-2": site_2}[role](parent_url, Path(keys)))
