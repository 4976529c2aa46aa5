"""fedcell across Linux network namespaces: capped veth links, a delaying proxy, cut connections.

Every process runs inside a namespace of a fresh :class:`netns.Lab` (root only: the tests skip
elsewhere, and run in CI as root). Links are capped at 1 Gbit/s with ``tbf`` in both directions;
the proxy (``delay_proxy.py``) runs in a namespace of its own between the site and the server.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path
from typing import Any

import pytest
from netns import Child, Lab

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parents[1] / "examples"
PEER = str(HERE / "peer.py")
PROXY = str(HERE / "delay_proxy.py")
PYTHON = sys.executable
MiB = 1024 * 1024
PORT = 7000  # every lab's namespaces are fresh: no port is taken

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def start_pair(lab: Lab, tmp_path: Path, *args: str) -> tuple[Child, Child]:
    """A server peer in namespace ``srv`` on 10.77.0.1 and a site peer in ``site`` on
    10.77.0.2, joined by a 1 Gbit/s link; both ready."""
    server_ns, site_ns = lab.namespace("srv"), lab.namespace("site")
    server_ip, _ = lab.link(server_ns, site_ns, rate="1gbit")
    listen = f"tcp://{server_ip}:{PORT}"
    server = lab.spawn(server_ns, [PYTHON, PEER, "server", "--listen", listen, *args],
                       tmp_path / "server.log")  # fmt: skip
    url = server.read_line(60).split()[1]
    site = lab.spawn(site_ns, [PYTHON, PEER, "site", "--parent", url, *args], tmp_path / "site.log")
    assert site.read_line(60) == "ready"
    return server, site


def stop_pair(server: Child, site: Child) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stop both peers; return their final reports (site, server)."""
    site.send_line("quit")
    site_report, server_report = site.read_json(30), server.read_json(30)
    assert site.wait(30) == 0 and server.wait(30) == 0
    return site_report, server_report


def test_hello_pytorch_job_completes_across_namespaces_on_a_1gbit_link(
    lab: Lab, tmp_path: Path
) -> None:
    # Prepare: the example job exported as a folder; the server in one namespace, both sites in
    # another, a 1 Gbit/s link between them
    make_job = runpy.run_path(str(EXAMPLES / "hello-pytorch" / "job.py"), run_name="example")
    job_dir = tmp_path / "job"
    make_job["make_job"](rounds=3).export(job_dir)
    server_ns, sites_ns = lab.namespace("server"), lab.namespace("sites")
    server_ip, _ = lab.link(server_ns, sites_ns, rate="1gbit")
    url = f"tcp://{server_ip}:{PORT}"
    workspace = tmp_path / "workspace"

    # Execute
    server = lab.spawn(server_ns, [
        PYTHON, "-m", "fedcell.engine.job_process", "--job-dir", str(job_dir), "--listen", url,
        "--sites", "site-1,site-2", "--workspace", str(workspace), "--job-id", "hello",
    ], tmp_path / "server.log")  # fmt: skip
    site_command = [PYTHON, "-m", "fedcell.engine.site_process", "--parent", url,
                    "--job-dir", str(job_dir), "--job-id", "hello"]  # fmt: skip
    sites = [
        lab.spawn(sites_ns, [*site_command, "--name", name], tmp_path / f"{name}.log")
        for name in ("site-1", "site-2")
    ]
    status = server.wait(150)

    # Assert: the job finished, every round aggregated both sites, the sites left on the job end
    assert status == 0, server.log_tail()
    assert [site.wait(30) for site in sites] == [0, 0]
    summary = json.loads((workspace / "result.json").read_text())
    assert summary["state"] == "finished"
    assert [row["round"] for row in summary["metrics"]] == [0, 1, 2]
    assert Path(summary["models"]["train"]).is_file()


def test_a_1gib_model_streams_intact_across_a_1gbit_link(lab: Lab, tmp_path: Path) -> None:
    # Prepare: codec "none", so that all 1 GiB crosses the link (random float32 values in
    # 64 MiB arrays, built by the site process: a dict of arrays as a model's state dict)
    server, site = start_pair(lab, tmp_path, "--codec", "none")

    # Execute
    site.send_line("send 1024 7 random")
    sent = site.read_json(120)
    site_report, server_report = stop_pair(server, site)

    # Assert: the digest computed from what the server's handler got is the sender's; at most
    # the link's rate; the receiver held about one model (DESIGN budget: S + 128 MiB)
    assert sent["ok"], sent
    reply = sent["reply"]
    assert reply["bytes"] == 1024 * MiB
    assert reply["digest"] == sent["digest"]
    seconds = sent["seconds"]
    assert seconds > 1024 * MiB / 125e6  # the cap holds: not faster than 1 Gbit/s
    peak_rss = server_report["peak_rss_mib"]
    print(f"1 GiB over 1 Gbit/s in {seconds:.2f} s; receiver peak RSS {peak_rss:.0f} MiB")  # -rP
    assert peak_rss <= 1024 + 128
    assert server_report["delivered"] == [sent["digest"]]
    assert site_report["streams"]["peak_in_flight"] <= 32 * MiB


def test_streams_through_a_20ms_proxy_and_connections_cut_mid_stream(
    lab: Lab, tmp_path: Path
) -> None:
    # Prepare: site -> proxy (20 ms each way) -> server, each hop a 1 Gbit/s link; the streams'
    # stall timeout stays the default 30 s, so a stream left hanging would show in the timings
    server_ns, proxy_ns, site_ns = (lab.namespace(label) for label in ("srv", "proxy", "site"))
    server_ip, _ = lab.link(server_ns, proxy_ns, rate="1gbit")
    proxy_ip, _ = lab.link(proxy_ns, site_ns, rate="1gbit")
    server = lab.spawn(server_ns, [PYTHON, PEER, "server", "--listen", f"tcp://{server_ip}:{PORT}",
                                   "--codec", "none"], tmp_path / "server.log")  # fmt: skip
    server.read_line(60)
    proxy = lab.spawn(proxy_ns, [PYTHON, PROXY, "--listen", f"{proxy_ip}:{PORT}",
                                 "--upstream", f"{server_ip}:{PORT}", "--delay", "0.02"],
                      tmp_path / "proxy.log")  # fmt: skip
    proxy.read_line(60)
    site = lab.spawn(site_ns, [PYTHON, PEER, "site", "--parent", f"tcp://{proxy_ip}:{PORT}",
                               "--codec", "none"], tmp_path / "site.log")  # fmt: skip
    assert site.read_line(60) == "ready"

    def send(mib: int, seed: int) -> dict[str, Any]:
        site.send_line(f"send {mib} {seed} random")
        return site.read_json(120)

    # Execute + Assert: a request round trip costs both delays; a stream through the proxy
    # completes
    empty = send(0, 0)
    assert empty["ok"] and empty["seconds"] >= 0.04, empty
    first = send(64, 1)
    assert first["ok"], first
    assert first["reply"]["digest"] == first["digest"]
    delivered = [empty["digest"], first["digest"]]
    # Cut every connection after 100 MiB of a 256 MiB stream (chunks still queued at the
    # sender), then just before its end (everything sent, the receiver short of the tail)
    for cut_after in (100 * MiB, 256 * MiB - 3 * MiB // 2):
        proxy.send_line(f"cut {cut_after}")
        cut = send(256, 2)
        assert proxy.read_line(10) == "cut 1"
        # fedcell does not resume a stream: the site's transport reports the disconnect, the
        # cell declares the server gone and fails the request at once, far within the stall
        # bound; ZeroMQ reconnects through the proxy and the cell says hello again
        assert not cut["ok"], cut
        assert cut["error_types"][0] == "UnreachableError", cut
        assert "'server' is gone (transport reports disconnected)" in str(cut["error"])
        assert cut["seconds"] < 5
        site.send_line("wait-parent")
        assert site.read_json(30)["seconds"] < 10
        # the cell then serves a fresh stream at once: the server dropped the broken stream
        # when the site came back, instead of holding its admission budget until it stalled
        fresh = send(64, 3)
        assert fresh["ok"], fresh
        assert fresh["reply"]["digest"] == fresh["digest"]
        assert fresh["seconds"] < 10, fresh
        delivered.append(fresh["digest"])
    _, server_report = stop_pair(server, site)
    # nothing of the cut streams was handed on; nothing is left open or admitted
    assert server_report["delivered"] == delivered
    streams = server_report["streams"]
    assert streams["streams_failed"] == 2
    assert streams["open_inbound"] == 0 and streams["inbound_bytes_admitted"] == 0
