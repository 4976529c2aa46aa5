"""Stream throughput over rate-capped links between network namespaces, per codec.

Usage (root: it creates namespaces)::

    python benchmarks/network.py [--quick] [--json]

Two namespaces joined by a veth pair capped with ``tc tbf`` in both directions (see
``tests/network/netns.py``), at 1 Gbit/s and at 100 Mbit/s. The server cell runs in one
namespace, the site cell in the other (``tests/network/peer.py``, one process each); the site
requests ``model`` with a dict of float32 arrays rounded to bf16 precision (normal values whose
low 16 bits are zero, as a bf16 checkpoint held in float32: what compression can win on) and the
server's handler hashes what it got (the digest must match the site's). Per link and codec the
site streams the payload ``reps`` times (256 MiB on 1 Gbit/s, 64 MiB on 100 Mbit/s; ``--quick``:
a quarter) and the best rate is kept: payload bytes over the time from the site's ``request`` to
the server's handler holding the verified model (one monotonic clock: namespaces share it).

Codecs: ``none``, ``blosc2-lz4`` and ``blosc2-zstd`` forced (``StreamConfig.codec``), and
``auto``, fedcell's choice per stream (:mod:`fedcell.transports.compression`): the first stream
goes by the 1 Gbit/s hint, later ones by the link rate measured from acks, so ``auto`` reports
every stream's choice and the rate of the last one. ``tcp_mbps`` is the link's ceiling as a plain
TCP socket sees it (one process each side, 1 MiB writes).

Figures and the command are in ``docs/benchmarks.md`` ("Capped links (network namespaces)").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
NETWORK_TESTS = HERE.parent / "tests" / "network"
sys.path.insert(0, str(NETWORK_TESTS))

from netns import Lab, netns_unavailable  # noqa: E402

MiB = 1024 * 1024
PEER = str(NETWORK_TESTS / "peer.py")
PORT = 7000
CODECS = {"none": "none", "lz4": "blosc2-lz4", "zstd": "blosc2-zstd", "auto": "auto"}
LINKS = {"gbit1": ("1gbit", 256), "mbit100": ("100mbit", 64)}

TCP_SERVER = """
import socket, sys, time
listener = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
connection, _ = listener.accept()
buffer, received, started = bytearray(1 << 20), 0, None
while count := connection.recv_into(buffer):
    started = started or time.monotonic()
    received += count
print(received / (time.monotonic() - started) / 1e6, flush=True)
"""
TCP_CLIENT = """
import socket, sys
connection = socket.create_connection((sys.argv[1], int(sys.argv[2])))
block = bytes(1 << 20)
for _ in range(int(sys.argv[3])):
    connection.sendall(block)
connection.close()
"""


def tcp_ceiling(lab: Lab, server_ns: Any, site_ns: Any, ip: str, mib: int, logs: Path) -> float:
    """MB/s of one plain TCP connection moving ``mib`` MiB over the link."""
    server = lab.spawn(server_ns, [sys.executable, "-c", TCP_SERVER, ip, str(PORT + 1)],
                       logs / "tcp-server.log")  # fmt: skip
    server.read_line(30)
    client = lab.spawn(site_ns, [sys.executable, "-c", TCP_CLIENT, ip, str(PORT + 1), str(mib)],
                       logs / "tcp-client.log")  # fmt: skip
    assert client.wait(300) == 0, client.log_tail()
    return float(server.read_line(60))


def codec_run(lab: Lab, server_ns: Any, site_ns: Any, ip: str, codec: str, mib: int,
              reps: int, logs: Path) -> dict[str, Any]:  # fmt: skip
    """Stream ``mib`` MiB ``reps`` times with ``codec``; best MB/s and each stream's codec."""
    args = ["--codec", codec]
    server = lab.spawn(server_ns, [sys.executable, PEER, "server", "--listen",
                                   f"tcp://{ip}:{PORT}", *args], logs / "server.log")  # fmt: skip
    url = server.read_line(60).split()[1]
    site = lab.spawn(site_ns, [sys.executable, PEER, "site", "--parent", url, *args],
                     logs / "site.log")  # fmt: skip
    site.read_line(60)
    rates: list[float] = []
    choices: list[str] = []
    for rep in range(reps):
        site.send_line(f"send {mib} {rep} bf16")
        result = site.read_json(600)
        if not result["ok"] or result["reply"]["digest"] != result["digest"]:
            raise RuntimeError(f"{codec} stream failed or arrived corrupt: {result}")
        rates.append(mib * MiB / result["reply"]["elapsed"] / 1e6)
        choices.append(result["codec"])
    site.send_line("quit")
    site.read_json(60)
    server.read_json(60)
    site.wait(60)
    server.wait(60)
    best = rates[-1] if codec == "auto" else max(rates)
    return {"mbps": round(best, 1), "rates": [round(r, 1) for r in rates], "codecs": choices}


def compression_ratios(mib: int) -> dict[str, float]:
    """Raw over compressed size of the benchmark's weights, per blosc2 codec (4 MiB chunks)."""
    from peer import make_model

    from fedcell.transports import compression

    weights = make_model(mib, 0, "bf16")
    ratios = {}
    for key in ("lz4", "zstd"):
        codec = compression.get_codec(CODECS[key])
        raw = packed = 0
        for array in weights.values():
            view = memoryview(array).cast("B")
            for start in range(0, view.nbytes, 4 * MiB):
                piece = view[start : start + 4 * MiB]
                raw += piece.nbytes
                packed += memoryview(codec.compress(piece, 4)).nbytes
        ratios[key] = round(raw / packed, 2)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of the payload sizes")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    reason = netns_unavailable()
    if reason is not None:
        sys.exit(f"benchmarks/network.py: {reason}")
    started = time.monotonic()
    summary: dict[str, Any] = {"payload_mib": {}}
    with tempfile.TemporaryDirectory() as folder:
        for key, (rate, mib) in LINKS.items():
            mib = mib // 4 if args.quick else mib
            summary["payload_mib"][key] = mib
            print(f"... {rate}: {mib} MiB per stream", file=sys.stderr, flush=True)
            with Lab() as lab:
                server_ns, site_ns = lab.namespace("server"), lab.namespace("site")
                ip, _ = lab.link(server_ns, site_ns, rate=rate)
                logs = Path(folder)
                summary[f"{key}_tcp_mbps"] = round(
                    tcp_ceiling(lab, server_ns, site_ns, ip, mib, logs), 1
                )
                for name, codec in CODECS.items():
                    reps = 3 if name == "auto" else 2
                    run = codec_run(lab, server_ns, site_ns, ip, codec, mib, reps, logs)
                    summary[f"{key}_{name}_mbps"] = run["mbps"]
                    summary[f"{key}_{name}_rates"] = run["rates"]
                    if name == "auto":
                        summary[f"{key}_auto_codec"] = run["codecs"][-1]
                        summary[f"{key}_auto_codecs"] = run["codecs"]
                none = summary[f"{key}_none_mbps"]
                for name in ("lz4", "zstd", "auto"):
                    ratio = summary[f"{key}_{name}_mbps"] / none
                    summary[f"{key}_{name}_vs_none"] = round(ratio, 2)
    summary["bf16_compression_ratio"] = compression_ratios(64)
    summary["seconds"] = round(time.monotonic() - started, 1)
    if args.json:
        print(json.dumps(summary))
        return
    print("stream throughput over tbf-capped veth links between namespaces, bf16-precision "
          "float32 weights")
    codec_heads = " ".join(f"{name + ' MB/s':>10}" for name in CODECS)
    print(f"{'link':>8} {'MiB':>4} {'tcp MB/s':>9} {codec_heads} {'lz4/none':>9} "
          f"{'zstd/none':>10} {'auto/none':>10}  auto chose")  # fmt: skip
    for key, (rate, _) in LINKS.items():
        row = {name: summary[f"{key}_{name}_mbps"] for name in CODECS}
        vs_none = [summary[f"{key}_{name}_vs_none"] for name in ("lz4", "zstd", "auto")]
        print(f"{rate:>8} {summary['payload_mib'][key]:>4} {summary[f'{key}_tcp_mbps']:>9.1f} "
              + " ".join(f"{row[name]:>10.1f}" for name in CODECS)
              + f" {vs_none[0]:>9.2f} {vs_none[1]:>10.2f} {vs_none[2]:>10.2f}  "
              + ", ".join(summary[f"{key}_auto_codecs"]))  # fmt: skip
    ratios = summary["bf16_compression_ratio"]
    print(f"compression ratio of these weights: blosc2-lz4 {ratios['lz4']}, "
          f"blosc2-zstd {ratios['zstd']} ({summary['seconds']} s)")


if __name__ == "__main__":
    main()
