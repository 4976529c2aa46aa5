"""Site policy: loading (YAML/JSON/TOML, broken files), every rule's refusal and its message,
resource limits, and authorizer hooks (callables and entry points)."""

from __future__ import annotations

import json
from importlib.metadata import EntryPoint, EntryPoints
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcell.engine import policy as policy_module
from fedcell.engine.policy import JobLimits, JobMeta, SitePolicy, Submitter
from fedcell.errors import ConfigError, PolicyError

POLICY: dict[str, Any] = {
    "site": "site-1",
    "submit": {
        "roles": ["project_admin", "lead"],
        "names": ["carol@hospital-b.org"],
        "organizations": ["hospital-a", "hospital-b"],
    },
    "custom_code": {"allow": ["source"], "roles": ["project_admin"]},
    "resources": {
        "max_concurrent_jobs": 2,
        "max_job_wall_time": "6h",
        "max_memory_per_job": "16GiB",
    },
}

ALICE = Submitter("alice@hospital-a.org", frozenset({"project_admin"}), "hospital-a", True)
BOB = Submitter("bob@hospital-a.org", frozenset({"lead"}), "hospital-a", True)
CAROL = Submitter("carol@hospital-b.org", frozenset({"member"}), "hospital-b", True)
MALLORY = Submitter("mallory@elsewhere.org", frozenset({"project_admin"}), "elsewhere", True)
PLAIN_JOB = JobMeta("cifar10")


def write(path: Path, tree: Any) -> Path:
    if path.suffix == ".json":
        path.write_text(json.dumps(tree))
    elif path.suffix == ".toml":
        path.write_text(tomli_w.dumps(tree))
    else:
        path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture
def site_policy() -> SitePolicy:
    return SitePolicy.from_mapping(POLICY, source="site-1.yaml")


# ---------------------------------------------------------------------------------------------
# loading


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json", ".toml"])
def test_load_reads_each_format_to_the_same_policy(tmp_path: Path, suffix: str) -> None:
    loaded = SitePolicy.load(write(tmp_path / f"policy{suffix}", POLICY))
    assert loaded.site == "site-1"
    assert loaded.source == str(tmp_path / f"policy{suffix}")
    assert loaded.max_concurrent_jobs == 2
    assert loaded.max_job_wall_time == 6 * 3600
    assert loaded.max_memory_per_job == 16 * 2**30
    assert loaded.custom_code_kinds == frozenset({"source"})
    assert loaded.organizations == frozenset({"hospital-a", "hospital-b"})


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("p.yaml", "submit: [roles\n", r"p\.yaml: does not parse"),
        ("p.json", '{"submit": {"roles": ["lead"]', r"p\.json: does not parse"),
        ("p.toml", "[submit\nroles = 1", r"p\.toml: does not parse"),
        ("p.yaml", "- just\n- a list\n", "the top level must be a mapping"),
        ("p.yaml", "submit:\n  rolez: [lead]\n", r"submit: unknown key\(s\) \['rolez'\]"),
        ("p.yaml", "sumbit: {}\n", r"unknown key\(s\) \['sumbit'\]"),
        ("p.yaml", "submit:\n  roles: lead\n", "submit.roles must be a list of strings"),
        ("p.yaml", "submit: yes\n", "'submit' must be a mapping"),
        ("p.yaml", "custom_code:\n  allow: [binary]\n", r"unknown kind\(s\) \['binary'\]"),
        ("p.yaml", "resources:\n  max_concurrent_jobs: 0\n", "max_concurrent_jobs must be an integer"),
        ("p.yaml", "resources:\n  max_job_wall_time: soon\n", "max_job_wall_time must be seconds"),
        ("p.yaml", "resources:\n  max_memory_per_job: lots\n", "max_memory_per_job must be bytes"),
        ("p.yaml", "resources:\n  max_memory_per_job: 0\n", "must be positive"),
        ("p.yaml", "submit:\n  require_authentication: maybe\n", "must be true or false"),
        ("p.yaml", "authorizer: [a]\n", "'authorizer' must be an entry-point name"),
        ("p.ini", "[submit]\n", "unknown file type '.ini'"),
    ],
)
def test_broken_policy_files_fail_with_a_clear_config_error(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        SitePolicy.load(path)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read it"):
        SitePolicy.load(tmp_path / "missing.yaml")


def test_empty_policy_refuses_every_job() -> None:
    empty = SitePolicy.from_mapping({}, source="empty.yaml")
    with pytest.raises(PolicyError, match=r"rule submit \(empty.yaml\).*roles: none; names: none"):
        empty.check_submission(ALICE, PLAIN_JOB)


# ---------------------------------------------------------------------------------------------
# decisions


def test_allowed_submitters_pass(site_policy: SitePolicy) -> None:
    for submitter in (ALICE, BOB, CAROL):  # two by role, one by name
        site_policy.check_submission(submitter, PLAIN_JOB, running_jobs=1)
    site_policy.check_submission(ALICE, JobMeta("custom", frozenset({"source"})))


@pytest.mark.parametrize(
    ("submitter", "job", "running", "rule", "reason"),
    [
        (
            Submitter("eve", frozenset({"lead"}), "hospital-a", authenticated=False),
            PLAIN_JOB, 0, "submit.require_authentication", "'eve' is not authenticated",
        ),
        (MALLORY, PLAIN_JOB, 0, "submit.organizations", "organization 'elsewhere' is not in"),
        (
            Submitter("dave@hospital-a.org", frozenset({"member"}), "hospital-a", True),
            PLAIN_JOB, 0, "submit",
            "'dave@hospital-a.org' \\(roles: member\\) may not submit jobs \\(allowed roles: "
            "lead, project_admin; names: carol@hospital-b.org\\)",
        ),
        (ALICE, JobMeta("p", frozenset({"cloudpickle"})), 0, "custom_code.allow",
         "brings cloudpickle code; this site allows custom code: source"),
        (BOB, JobMeta("s", frozenset({"source"})), 0, "custom_code.roles",
         "'bob@hospital-a.org' may not bring custom code"),
        (ALICE, PLAIN_JOB, 2, "resources.max_concurrent_jobs",
         "2 job\\(s\\) running; this site runs at most 2"),
        (ALICE, JobMeta("long", wall_time=7 * 3600), 0, "resources.max_job_wall_time",
         "asks for 25200 s; this site allows 21600 s"),
        (ALICE, JobMeta("big", memory=17 * 2**30), 0, "resources.max_memory_per_job",
         "asks for 18253611008 bytes per process"),
    ],
)
def test_each_rule_refuses_with_its_name(
    site_policy: SitePolicy, submitter: Submitter, job: JobMeta, running: int, rule: str,
    reason: str,
) -> None:
    with pytest.raises(PolicyError, match=f"site-1 refuses job '{job.name}': rule {rule} "
                                          rf"\(site-1.yaml\): .*{reason}"):
        site_policy.check_submission(submitter, job, running_jobs=running)


def test_custom_code_needs_an_authenticated_submitter_even_where_not_required() -> None:
    # Prepare: a POC site that lets anyone submit and allows source code.
    poc = SitePolicy.from_mapping(
        {"submit": {"roles": ["lead"], "require_authentication": False},
         "custom_code": {"allow": ["source", "cloudpickle"]}}
    )
    claimed = Submitter("someone", frozenset({"lead"}))
    # Execute / Assert
    poc.check_submission(claimed, PLAIN_JOB)
    with pytest.raises(PolicyError, match=r"rule custom_code .*unauthenticated submitter"):
        poc.check_submission(claimed, JobMeta("j", frozenset({"cloudpickle"})))
    poc.check_submission(
        Submitter("someone", frozenset({"lead"}), authenticated=True),
        JobMeta("j", frozenset({"cloudpickle", "source"})),
    )


def test_job_limits_are_the_jobs_ask_or_the_site_maximum(site_policy: SitePolicy) -> None:
    assert site_policy.job_limits(PLAIN_JOB) == JobLimits(wall_time=6 * 3600.0, memory=16 * 2**30)
    assert site_policy.job_limits(JobMeta("j", wall_time=60, memory=2**20)) == JobLimits(60, 2**20)
    assert SitePolicy.from_mapping({}).job_limits(PLAIN_JOB) == JobLimits(None, None)


def test_job_meta_from_the_network_is_validated() -> None:
    meta = JobMeta.from_mapping(
        {"name": "j", "custom_code": ["source"], "wall_time": "30m", "memory": "512MiB"}
    )
    assert meta == JobMeta("j", frozenset({"source"}), 1800.0, 512 * 2**20)
    with pytest.raises(ConfigError, match=r"unknown custom_code kind\(s\) \['shell'\]"):
        JobMeta.from_mapping({"name": "j", "custom_code": ["shell"]})
    with pytest.raises(ConfigError, match="'name' must be a non-empty string"):
        JobMeta.from_mapping({"custom_code": []})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['code'\]"):
        JobMeta.from_mapping({"name": "j", "code": "import os"})
    with pytest.raises(ConfigError, match="wall_time must be seconds"):
        JobMeta.from_mapping({"name": "j", "wall_time": True})
    with pytest.raises(ConfigError, match="must be a mapping"):
        JobMeta.from_mapping(["j"])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# authorizer hooks


def only_hospital_a(submitter: Submitter, job: JobMeta) -> None:
    """An authorizer used through an entry point below."""
    if submitter.organization != "hospital-a":
        raise PolicyError(f"{submitter.name} is not in the hospital-a directory")


def test_callable_authorizer_adds_refusals(tmp_path: Path) -> None:
    # Prepare
    calls: list[str] = []

    def audit(submitter: Submitter, job: JobMeta) -> None:
        calls.append(f"{submitter.name}:{job.name}")

    site = SitePolicy.load(write(tmp_path / "p.yaml", POLICY), authorizers=[audit, only_hospital_a])
    # Execute / Assert
    site.check_submission(ALICE, PLAIN_JOB)
    with pytest.raises(PolicyError, match=r"rule authorizer 'only_hospital_a' .*: carol@hospital-b"
                                          r"\.org is not in the hospital-a directory"):
        site.check_submission(CAROL, PLAIN_JOB)
    with pytest.raises(PolicyError, match=r"rule submit\.organizations "):
        site.check_submission(MALLORY, PLAIN_JOB)
    assert calls == ["alice@hospital-a.org:cifar10", "carol@hospital-b.org:cifar10"]


def test_authorizer_that_crashes_or_returns_a_value_refuses() -> None:
    def broken(submitter: Submitter, job: JobMeta) -> None:
        raise KeyError("ldap")

    def returns_true(submitter: Submitter, job: JobMeta) -> Any:
        return True

    for hook, reason in [(broken, "the hook failed \\(KeyError: 'ldap'\\)"),
                         (returns_true, "the hook returned True")]:
        site = SitePolicy.from_mapping(POLICY, authorizers=[hook])
        with pytest.raises(PolicyError, match=reason):
            site.check_submission(ALICE, PLAIN_JOB)


def test_authorizer_named_in_the_file_is_an_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: pretend a distribution registered two authorizers.
    installed = EntryPoints([
        EntryPoint("hospital-a", f"{__name__}:only_hospital_a", policy_module.ENTRY_POINT_GROUP),
        EntryPoint("broken", "no_such_module_xyz:hook", policy_module.ENTRY_POINT_GROUP),
    ])

    def fake_entry_points(*, group: str) -> EntryPoints:
        return installed.select(group=group)

    monkeypatch.setattr(policy_module, "entry_points", fake_entry_points)
    # Execute / Assert
    site = SitePolicy.load(write(tmp_path / "p.json", {**POLICY, "authorizer": "hospital-a"}))
    site.check_submission(BOB, PLAIN_JOB)
    with pytest.raises(PolicyError, match="rule authorizer 'hospital-a'"):
        site.check_submission(CAROL, PLAIN_JOB)
    with pytest.raises(ConfigError, match=r"no authorizer 'ldap' .*installed: broken, hospital-a"):
        SitePolicy.load(write(tmp_path / "q.yaml", {"authorizer": "ldap"}))
    with pytest.raises(ConfigError, match=r"authorizer 'broken' .* does not load"):
        SitePolicy.load(write(tmp_path / "r.yaml", {"authorizer": "broken"}))


def test_a_signed_submit_command_from_a_provisioned_admin_is_checked_by_the_site_policy(
    tmp_path: Path,
) -> None:
    # Prepare: a provisioned project; alice (project_admin) and bob (member) sign submissions.
    from fedcell.deploy import ReplayGuard, StartupKit, sign_command, verify_command
    from fedcell.deploy.project import parse_project
    from fedcell.deploy.provision import provision

    tree = {
        "project": "demo",
        "server": {"host": "127.0.0.1", "port": 8002, "listen_host": "127.0.0.1"},
        "sites": ["site-1"],
        "admins": [{"name": "alice", "role": "project_admin"}, {"name": "bob"}],
    }
    kits = provision(parse_project(tree), tmp_path / "workspace").kits
    site = StartupKit.load(kits / "site-1")
    site_policy = SitePolicy.load(write(tmp_path / "policy.yaml", {
        "site": "site-1",
        "submit": {"roles": ["project_admin", "lead"]},
        "custom_code": {"allow": ["source"]},
    }))
    guard = ReplayGuard()

    def submit(admin: str, meta: dict[str, Any]) -> None:
        command = sign_command(StartupKit.load(kits / admin), {"action": "submit", "job": meta})
        verified = verify_command(site.ca_certificate, command, replay_guard=guard)
        submitter = Submitter(verified.admin, frozenset({verified.role}), authenticated=True)
        site_policy.check_submission(submitter, JobMeta.from_mapping(verified.payload["job"]))

    # Execute / Assert
    submit("alice", {"name": "fedavg", "custom_code": ["source"]})
    with pytest.raises(PolicyError, match=r"rule custom_code\.allow .*brings cloudpickle code"):
        submit("alice", {"name": "pickled", "custom_code": ["cloudpickle"]})
    with pytest.raises(PolicyError, match=r"rule submit .*'bob' \(roles: member\) may not submit"):
        submit("bob", {"name": "fedavg"})


@settings(max_examples=300, deadline=None)
@given(
    raw=st.dictionaries(
        st.sampled_from(["name", "custom_code", "wall_time", "memory", "extra"]),
        st.one_of(
            st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30),
            st.lists(st.sampled_from(["source", "cloudpickle", "binary", ""]), max_size=3),
            st.from_regex(r"\d{1,400}(\.\d{1,3})? ?(s|m|h|d|KiB|MiB|GiB|TiB|GB|B)?", fullmatch=True),
        ),
    )
)
def test_job_meta_from_the_network_is_a_job_meta_or_a_config_error(raw: dict[str, Any]) -> None:
    try:
        meta = JobMeta.from_mapping(raw)
    except ConfigError:
        return
    assert meta.name == raw["name"]
    assert meta.wall_time is None or 0 < meta.wall_time < float("inf")
    assert meta.memory is None or meta.memory > 0


def test_sizes_and_durations_past_float_range_are_refused() -> None:
    with pytest.raises(ConfigError, match="memory is too large"):
        JobMeta.from_mapping({"name": "j", "memory": "9" * 400 + "GiB"})
    with pytest.raises(ConfigError, match="must be positive and finite"):
        JobMeta.from_mapping({"name": "j", "wall_time": "9" * 400 + "h"})
    with pytest.raises(ConfigError, match="must be positive and finite"):
        SitePolicy.from_mapping({"resources": {"max_job_wall_time": float("inf")}})
