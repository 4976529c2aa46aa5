"""The site daemon over real loopback sockets: the site verifies and polices every deploy itself,
refuses archive attacks, runs job processes with its limits, stops them, and keeps serving."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
import time
from pathlib import Path

import psutil
import pytest
from deploy_helpers import free_port, project_tree, provision_tree, with_organizations
from site_helpers import (
    JOB_NAME,
    archive_of,
    ask,
    deploy_request,
    deployment,
    numpy_job,
    submit_command,
)

from fedcell.deploy.commands import SignedCommand
from fedcell.deploy.job_archive import pack_job
from fedcell.deploy.site_daemon import SiteDaemon
from fedcell.engine.job import Job
from fedcell.errors import ConfigError, RemoteError

pytestmark = pytest.mark.integration


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _job_json() -> tuple[tarfile.TarInfo, bytes]:
    return _member("job.json"), b'{"format_version": 1, "job": {"name": "evil"}, "nodes": []}'


def test_deploys_are_refused_by_the_site_policy_with_the_reason_and_leave_nothing(
    kits: Path, tmp_path: Path
) -> None:
    async def main() -> None:
        # Prepare: the provisioned default policy lets project admins and leads submit; bob is
        # a member. site-2 has no policy at all, site-3's does not load.
        (kits / "site-2" / "policy.yml").unlink()
        broken = tmp_path / "broken.yml"
        broken.write_text("submit: {roles: [project_admin]}\nsubmitt: {}\n")
        archive = archive_of(numpy_job(1), tmp_path)
        async with deployment(
            kits, tmp_path / "ws", ("site-1", "site-2"), {"site-2": broken}
        ) as (server, _):
            # Execute
            with pytest.raises(RemoteError) as by_role:
                await ask(server, "site-1", deploy_request("j1", submit_command(kits, archive,
                                                                                "bob"), archive))
            with pytest.raises(RemoteError) as unloadable:
                await ask(server, "site-2", deploy_request("j2", submit_command(kits, archive),
                                                           archive))  # fmt: skip
            accepted = await ask(server, "site-1",
                                 deploy_request("j3", submit_command(kits, archive), archive))
            status = await ask(server, "site-1", {"op": "status"})

        # Assert: the reasons name the site, the job and the rule
        assert by_role.value.remote_type == "PolicyError"
        assert f"site-1 refuses job {JOB_NAME!r}: rule submit" in str(by_role.value)
        assert "submitter 'bob' (roles: member)" in str(by_role.value)
        assert unloadable.value.remote_type == "PolicyError"
        assert "site-2 refuses every job" in str(unloadable.value)
        assert "submitt" in str(unloadable.value) and str(broken) in str(unloadable.value)
        assert accepted == {"accepted": True}
        assert status == {"jobs": {"j3": {"state": "deployed", "pid": None, "returncode": None}}}
        jobs = tmp_path / "ws" / "site-1" / "jobs"
        assert sorted(p.name for p in jobs.iterdir()) == ["j3"]
        assert (jobs / "j3" / "job" / "job.json").is_file()

    asyncio.run(main())


def test_a_policy_restricted_to_an_organization_admits_only_admins_of_it(tmp_path: Path) -> None:
    async def main() -> None:
        # Prepare: three project admins, of hospital-a, of hospital-b and of none; site-1
        # admits project admins of hospital-a only
        tree = project_tree(port=free_port())
        tree["admins"] += [{"name": "carol", "role": "project_admin"},
                           {"name": "dave", "role": "project_admin"}]  # fmt: skip
        with_organizations(tree, {"alice": "hospital-a", "carol": "hospital-b"})
        provision_tree(tree, tmp_path / "project")
        kits = tmp_path / "project" / "kits"
        policy = tmp_path / "policy.yml"
        policy.write_text(
            "submit: {roles: [project_admin], organizations: [hospital-a]}\n"
            "custom_code: {allow: [source]}\n"
        )
        archive = archive_of(numpy_job(1), tmp_path)
        async with deployment(kits, tmp_path / "ws", policies={"site-1": policy}) as (server, _):
            # Execute
            accepted = await ask(server, "site-1",
                                 deploy_request("a", submit_command(kits, archive), archive))
            refused: dict[str, RemoteError] = {}
            for admin in ("carol", "dave"):
                with pytest.raises(RemoteError) as refusal:
                    await ask(server, "site-1", deploy_request(
                        admin, submit_command(kits, archive, admin), archive))  # fmt: skip
                refused[admin] = refusal.value
            status = await ask(server, "site-1", {"op": "status"})

        # Assert: the refusals name the rule and the organization the certificate gives
        assert accepted == {"accepted": True}
        for admin, organization in (("carol", "'hospital-b'"), ("dave", "None")):
            assert refused[admin].remote_type == "PolicyError"
            assert f"site-1 refuses job {JOB_NAME!r}: rule submit.organizations" in str(
                refused[admin]
            )
            assert (
                f"submitter {admin!r} of organization {organization} is not in ['hospital-a']"
                in str(refused[admin])
            )
        assert list(status["jobs"]) == ["a"]
        assert sorted(p.name for p in (tmp_path / "ws" / "site-1" / "jobs").iterdir()) == ["a"]

    asyncio.run(main())


def test_a_site_without_a_policy_file_refuses_every_job_naming_where_it_is_expected(
    kits: Path, tmp_path: Path
) -> None:
    async def main() -> None:
        # Prepare
        (kits / "site-1" / "policy.yml").unlink()
        archive = archive_of(numpy_job(1), tmp_path)
        async with deployment(kits, tmp_path / "ws") as (server, _):
            # Execute
            with pytest.raises(RemoteError) as refused:
                await ask(server, "site-1", deploy_request("j1", submit_command(kits, archive),
                                                           archive))  # fmt: skip
        # Assert
        assert refused.value.remote_type == "PolicyError"
        assert "site-1 refuses every job: it has no site policy" in str(refused.value)
        assert str(kits / "site-1" / "policy.yml") in str(refused.value)

    asyncio.run(main())


def test_bad_requests_forgeries_and_archive_attacks_are_refused_and_the_daemon_keeps_serving(
    kits: Path, tmp_path: Path
) -> None:
    async def main() -> None:
        # Prepare
        archive = archive_of(numpy_job(1), tmp_path)
        other = archive_of(numpy_job(2), tmp_path)
        signed = submit_command(kits, archive)
        tampered = SignedCommand(signed.body.replace(b"submit", b"subm1t"), signed.signature,
                                 signed.certificate)  # fmt: skip
        attacks = {
            "'../escape'": _tar([_job_json(), (_member("../escape"), b"x")]),
            "'/etc/cron.d/evil'": _tar([_job_json(), (_member("/etc/cron.d/evil"), b"x")]),
            "'custom/link'": _tar(
                [_job_json(), (_member("custom/link", tarfile.SYMTYPE, "/etc/passwd"), b"")]
            ),
            "'custom/hard'": _tar(
                [_job_json(), (_member("custom/hard", tarfile.LNKTYPE, "job.json"), b"")]
            ),
            "'dev'": _tar([_job_json(), (_member("dev", tarfile.CHRTYPE), b"")]),
        }
        bad_requests = [
            ("junk", "must be a mapping with an 'op'", "ProtocolError"),
            ({"op": "explode"}, "unknown site op 'explode'", "ProtocolError"),
            ({"op": "start", "job_id": "../x"}, "a job id must be", "ProtocolError"),
            ({"op": "start", "job_id": "nope"}, "no job nope at site-1", "JobError"),
            ({"op": "logs", "job_id": "nope", "offset": 0}, "no job nope", "JobError"),
            (deploy_request("j1", "forged", archive), "'signed' is not a signed command",
             "ProtocolError"),
            (deploy_request("j1", tampered, archive), "does not verify", "AuthenticationError"),
            (deploy_request("j1", submit_command(kits, archive), other), "the archive was altered",
             "AuthenticationError"),
            (deploy_request("j1", submit_command(kits, archive, sites=["site-2"]), archive),
             "chose the sites ['site-2'], not this one", "PolicyError"),
        ]  # fmt: skip
        async with deployment(kits, tmp_path / "ws") as (server, _):
            # Execute
            answers: list[RemoteError] = []
            for request, _, _ in bad_requests:
                with pytest.raises(RemoteError) as refused:
                    await ask(server, "site-1", request)
                answers.append(refused.value)
            attack_answers: dict[str, RemoteError] = {}
            for name, attack in attacks.items():
                with pytest.raises(RemoteError) as refused:
                    request = deploy_request(f"a{len(attack_answers)}",
                                             submit_command(kits, attack), attack)  # fmt: skip
                    await ask(server, "site-1", request)
                attack_answers[name] = refused.value
            accepted = await ask(server, "site-1", deploy_request("ok", signed, archive))
            with pytest.raises(RemoteError) as replayed:
                await ask(server, "site-1", deploy_request("again", signed, archive))

        # Assert: every refusal says why; the daemon served the valid request after them all
        for (_, message, kind), answer in zip(bad_requests, answers, strict=True):
            assert answer.remote_type == kind and message in str(answer), str(answer)
        for name, answer in attack_answers.items():
            assert answer.remote_type == "ConfigError" and name in str(answer), str(answer)
        assert accepted == {"accepted": True}
        assert replayed.value.remote_type == "AuthenticationError"
        assert "already used (replay)" in str(replayed.value)
        jobs = tmp_path / "ws" / "site-1" / "jobs"
        assert sorted(p.name for p in jobs.iterdir()) == ["ok"]
        assert not (tmp_path / "ws" / "site-1" / "escape").exists()

    asyncio.run(main())


def test_start_runs_the_job_process_and_stop_ends_it_or_discards_a_deployed_job(
    kits: Path, tmp_path: Path
) -> None:
    async def main() -> None:
        # Prepare: three deployed jobs (no job server runs: their processes just wait for it)
        archive = archive_of(numpy_job(1), tmp_path)
        async with deployment(kits, tmp_path / "ws") as (server, _):
            for job_id in ("run", "idle", "left"):
                signed = submit_command(kits, archive)
                await ask(server, "site-1", deploy_request(job_id, signed, archive))
            # Execute
            started = await ask(server, "site-1", {"op": "start", "job_id": "run"})
            left = await ask(server, "site-1", {"op": "start", "job_id": "left"})
            running = await ask(server, "site-1", {"op": "status"})
            with pytest.raises(RemoteError) as twice:
                await ask(server, "site-1", {"op": "start", "job_id": "run"})
            command = psutil.Process(started["pid"]).cmdline()
            stopped = await ask(server, "site-1", {"op": "stop", "job_id": "run"})
            discarded = await ask(server, "site-1", {"op": "stop", "job_id": "idle"})
            logs = await ask(server, "site-1", {"op": "logs", "job_id": "run", "offset": 0})
            status = await ask(server, "site-1", {"op": "status"})
        # the daemon stopped: its last job process is gone too
        survivor_gone = not psutil.pid_exists(left["pid"]) or (
            psutil.Process(left["pid"]).status() == psutil.STATUS_ZOMBIE
        )

        # Assert
        assert running["jobs"]["run"]["state"] == "running"
        assert running["jobs"]["run"]["pid"] == started["pid"]
        assert twice.value.remote_type == "JobError" and "is running, not deployed" in str(
            twice.value
        )
        assert command[1:] == [
            "-m", "fedcell.deploy.job_launch", "site", "--kit", str(kits / "site-1"), "--job-dir",
            str(tmp_path / "ws" / "site-1" / "jobs" / "run" / "job"), "--job-id", "run",
        ]  # fmt: skip
        assert stopped == {"state": "stopped"} and not psutil.pid_exists(started["pid"])
        assert discarded == {"state": "discarded"}
        assert not (tmp_path / "ws" / "site-1" / "jobs" / "idle").exists()
        assert logs["done"] is True and logs["offset"] == len(logs["text"].encode())
        assert logs["text"] == (tmp_path / "ws" / "site-1" / "jobs" / "run" / "site.log").read_text()
        assert status["jobs"]["run"]["state"] == "stopped"
        assert status["jobs"]["idle"]["state"] == "discarded"
        assert survivor_gone

    asyncio.run(main())


def _asking(tmp_path: Path, name: str, **asks: str) -> bytes:
    """The archive of a job whose config asks for resources (``job.wall_time``, ``job.memory``)."""
    folder = tmp_path / name
    numpy_job(1).export(folder)
    config = json.loads((folder / "job.json").read_text())
    config["job"].update(asks)
    (folder / "job.json").write_text(json.dumps(config))
    Job.load(folder)  # the engine loads a folder with asks (it leaves them to the sites)
    return pack_job(folder)


def test_the_limits_a_job_asks_for_are_policed_and_enforced(kits: Path, tmp_path: Path) -> None:
    async def main() -> None:
        # Prepare: a site that allows 3 s and 8 GiB per job; one job asks for 1 s and 4 GiB,
        # one for more time than allowed
        policy = tmp_path / "policy.yml"
        policy.write_text(
            "submit: {roles: [project_admin]}\ncustom_code: {allow: [source]}\n"
            "resources: {max_job_wall_time: 3s, max_memory_per_job: 8GiB}\n"
        )
        modest = _asking(tmp_path, "modest", wall_time="1s", memory="4GiB")
        greedy = _asking(tmp_path, "greedy", wall_time="1h")
        async with deployment(kits, tmp_path / "ws", policies={"site-1": policy}) as (server, _):
            await ask(server, "site-1", deploy_request("j", submit_command(kits, modest), modest))
            with pytest.raises(RemoteError) as refused:
                await ask(server, "site-1", deploy_request("g", submit_command(kits, greedy),
                                                           greedy))  # fmt: skip
            # Execute
            started = await ask(server, "site-1", {"op": "start", "job_id": "j"})
            limit = psutil.Process(started["pid"]).rlimit(psutil.RLIMIT_AS)
            began = time.monotonic()
            states: list[str] = []
            while time.monotonic() - began < 20:
                reply = await ask(server, "site-1", {"op": "status"})
                states.append(reply["jobs"]["j"]["state"])
                if states[-1] != "running":
                    break
                await asyncio.sleep(0.1)
            ran = time.monotonic() - began

        # Assert: the job's own asks are the limits (its memory, its wall time)
        assert refused.value.remote_type == "PolicyError"
        assert "rule resources.max_job_wall_time" in str(refused.value)
        assert "asks for 3600 s; this site allows 3 s" in str(refused.value)
        assert limit == (4 * 2**30, 4 * 2**30)
        assert states[-1] == "killed: wall time" and 1.0 <= ran < 3.0
        assert not psutil.pid_exists(started["pid"])

    asyncio.run(main())


def test_a_daemon_needs_a_site_kit(kits: Path, tmp_path: Path) -> None:
    from fedcell.deploy.kit import StartupKit

    with pytest.raises(ConfigError, match="'alice' is a project_admin: a site daemon needs"):
        SiteDaemon(StartupKit.load(kits / "alice"), tmp_path)
