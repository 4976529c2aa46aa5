"""Provisioning: kit layout, incremental re-provisioning, project.yml validation, kit loading."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from deploy_helpers import kit_files, project_tree, provision_tree, tampered, with_organizations

from fedcell.cli import main as cli
from fedcell.deploy.certificates import (
    ORGANIZATION_OID,
    issue_ca,
    issue_participant,
    load_certificate,
    new_signing_key,
    verify_participant,
)
from fedcell.deploy.kit import StartupKit, TrustedParticipants
from fedcell.deploy.project import Admin, Site, load_project, parse_project
from fedcell.engine.policy import SitePolicy
from fedcell.errors import AuthenticationError, ConfigError
from fedcell.transports.zmq_security import curve_keypair, curve_public_key


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_provision_writes_one_verified_kit_per_participant(tmp_path: Path) -> None:
    # Execute
    report = provision_tree(project_tree(), tmp_path)

    # Assert: the report and the folders
    kits = tmp_path / "kits"
    assert report.created == ["server", "site-1", "site-2", "alice", "bob"]
    assert report.issued == report.created and not report.updated and not report.unchanged
    assert sorted(p.name for p in kits.iterdir()) == ["alice", "bob", "server", "site-1", "site-2"]
    common = {"kit.json", "ca.pem", "participant.pem", "participant.key", "curve.key"}
    assert set(kit_files(kits / "server")) == common | {
        "start.sh", "trusted/site-1.pem", "trusted/site-2.pem", "trusted/alice.pem",
        "trusted/bob.pem",
    }  # fmt: skip
    assert set(kit_files(kits / "site-1")) == common | {"server.pem", "start.sh", "policy.yml"}
    assert set(kit_files(kits / "alice")) == common | {"server.pem"}
    # secrets are private; the state folder too
    for kit in kits.iterdir():
        assert mode(kit / "participant.key") == 0o600 and mode(kit / "curve.key") == 0o600
        assert mode(kit) == 0o700
    assert mode(tmp_path / "state") == 0o700 and mode(tmp_path / "state" / "ca.key") == 0o600
    assert mode(kits / "site-1" / "start.sh") == 0o755
    assert "fedcell.deploy.participant" in (kits / "site-1" / "start.sh").read_text()
    # kit.json: the server address lives here, not in certificates
    config = json.loads((kits / "site-1" / "kit.json").read_text())
    assert config["name"] == "site-1" and config["role"] == "site" and config["project"] == "demo"
    assert config["server"] == {
        "name": "server", "host": "127.0.0.1", "port": 8002, "listen_host": "127.0.0.1"
    }  # fmt: skip
    # every certificate chains to the CA and carries the participant's curve key
    ca = load_certificate((kits / "server" / "ca.pem").read_bytes(), "ca")
    for name, role in [("server", "server"), ("site-2", "site"), ("alice", "project_admin"),
                       ("bob", "member")]:  # fmt: skip
        kit = kits / name
        who = verify_participant(load_certificate((kit / "participant.pem").read_bytes(), name), ca)
        assert (who.name, who.role, who.project) == (name, role, "demo")
        assert curve_public_key((kit / "curve.key").read_bytes().strip()) == who.curve_key
        loaded = StartupKit.load(kit)
        assert (loaded.name, loaded.role, loaded.server.url) == (name, role, "tcp://127.0.0.1:8002")
    # the server trusts the sites and admins, under their names
    trusted = TrustedParticipants(ca, kits / "server" / "trusted")
    assert trusted.names() == ("alice", "bob", "site-1", "site-2")
    site_key = StartupKit.load(kits / "site-1").me.curve_key
    assert trusted(site_key) == "site-1"
    assert trusted(StartupKit.load(kits / "server").me.curve_key) is None


def test_provision_again_changes_nothing(tmp_path: Path) -> None:
    # Prepare
    provision_tree(project_tree(), tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    # Execute
    report = provision_tree(project_tree(), tmp_path)

    # Assert
    assert report.unchanged == ["server", "site-1", "site-2", "alice", "bob"]
    assert not report.created and not report.updated and not report.issued
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_site_kits_default_policy_is_written_once_and_never_overwritten(tmp_path: Path) -> None:
    # Prepare: provisioned kits, one site's policy edited by its admin, another's deleted
    provision_tree(project_tree(), tmp_path)
    kits = tmp_path / "kits"
    default = SitePolicy.load(kits / "site-1" / "policy.yml")
    edited = "site: site-1\nsubmit: {names: [alice]}\n"
    (kits / "site-1" / "policy.yml").write_text(edited)
    (kits / "site-2" / "policy.yml").unlink()

    # Execute
    report = provision_tree(project_tree(), tmp_path)

    # Assert: the default lets project admins and leads submit source code, 4 jobs at a time
    assert default.site == "site-1" and default.submit.roles == {"project_admin", "lead"}
    assert default.custom_code_kinds == {"source"} and default.max_concurrent_jobs == 4
    # the edit is kept and not reported; the missing file is written again and reported
    assert (kits / "site-1" / "policy.yml").read_text() == edited
    assert "site-1" in report.unchanged
    assert report.updated == {"site-2": ["policy.yml"]}
    assert SitePolicy.load(kits / "site-2" / "policy.yml").site == "site-2"
    assert not any((kits / name / "policy.yml").exists() for name in ("server", "alice"))


def test_adding_a_site_keeps_everyone_elses_keys_and_kits(tmp_path: Path) -> None:
    # Prepare
    provision_tree(project_tree(), tmp_path)
    kits = tmp_path / "kits"
    before = {name: kit_files(kits / name) for name in ("server", "site-1", "site-2", "alice")}

    # Execute
    report = provision_tree(project_tree(sites=("site-1", "site-2", "site-3")), tmp_path)

    # Assert: only the new kit and the server's trust folder were written
    assert report.created == ["site-3"] and report.issued == ["site-3"]
    assert report.updated == {"server": ["trusted/site-3.pem"]}
    assert sorted(report.unchanged) == ["alice", "bob", "site-1", "site-2"]
    for name in ("site-1", "site-2", "alice"):
        assert kit_files(kits / name) == before[name]
    server_after = kit_files(kits / "server")
    assert {k: v for k, v in server_after.items() if k != "trusted/site-3.pem"} == before["server"]
    new_site = StartupKit.load(kits / "site-3")
    assert new_site.ca_certificate == StartupKit.load(kits / "site-1").ca_certificate
    trusted = TrustedParticipants(new_site.ca_certificate, kits / "server" / "trusted")
    assert trusted(new_site.me.curve_key) == "site-3"


def test_editing_the_server_address_rewrites_only_kit_json(tmp_path: Path) -> None:
    # Prepare
    provision_tree(project_tree(port=8002), tmp_path)
    kits = tmp_path / "kits"
    before = {p.name: kit_files(p) for p in kits.iterdir()}
    moved = project_tree(port=9100)
    moved["server"]["host"] = "fl.example.org"

    # Execute
    report = provision_tree(moved, tmp_path)

    # Assert: keys and certificates untouched, every kit points to the new address
    assert not report.issued and not report.created
    assert report.updated == {name: ["kit.json"] for name in before}
    for name, files in before.items():
        after = kit_files(kits / name)
        assert {k for k in after if after[k] != files.get(k)} == {"kit.json"}
    assert StartupKit.load(kits / "site-2").server.url == "tcp://fl.example.org:9100"
    assert StartupKit.load(kits / "server").server.listen_url == "tcp://127.0.0.1:9100"


def test_removing_a_site_revokes_it_at_the_server(tmp_path: Path) -> None:
    # Prepare
    provision_tree(project_tree(), tmp_path)

    # Execute
    report = provision_tree(project_tree(sites=("site-1",)), tmp_path)

    # Assert
    assert report.updated == {"server": ["trusted/site-2.pem"]}
    assert report.stale == ["site-2"]
    assert not (tmp_path / "kits" / "server" / "trusted" / "site-2.pem").exists()


def test_a_changed_admin_role_reissues_the_certificate_with_the_same_keys(tmp_path: Path) -> None:
    # Prepare
    provision_tree(project_tree(), tmp_path)
    alice = tmp_path / "kits" / "alice"
    key_before = (alice / "participant.key").read_bytes()
    tree = project_tree()
    tree["admins"][0]["role"] = "lead"

    # Execute
    report = provision_tree(tree, tmp_path)

    # Assert
    assert report.issued == ["alice"]
    assert sorted(report.updated) == ["alice", "server"]  # its cert and the server's copy
    assert (alice / "participant.key").read_bytes() == key_before
    assert StartupKit.load(alice).role == "lead"


def test_an_organization_change_reissues_that_certificate_with_the_same_keys(
    tmp_path: Path,
) -> None:
    # Prepare: site-2 and alice have no organization yet
    provision_tree(project_tree(), tmp_path)
    kits = tmp_path / "kits"
    before = {p.name: kit_files(p) for p in kits.iterdir()}
    assert StartupKit.load(kits / "site-2").me.organization is None

    # Execute: site-2 and alice get one; then alice moves to another
    joined = provision_tree(with_organizations(project_tree(), {"site-2": "hospital-b",
                                                                "alice": "hospital-a"}),
                            tmp_path)  # fmt: skip
    after_joining = {p.name: kit_files(p) for p in kits.iterdir()}
    moved = provision_tree(with_organizations(project_tree(), {"site-2": "hospital-b",
                                                               "alice": "hospital-c"}),
                           tmp_path)  # fmt: skip

    # Assert: the report names the re-issued certificates and the files they changed
    assert joined.issued == ["site-2", "alice"]
    assert joined.updated == {
        "server": ["trusted/alice.pem", "trusted/site-2.pem"],
        "site-2": ["participant.pem"],
        "alice": ["participant.pem"],
    }
    assert sorted(joined.unchanged) == ["bob", "site-1"]
    assert moved.issued == ["alice"]
    assert moved.updated == {"server": ["trusted/alice.pem"], "alice": ["participant.pem"]}
    # same keys, a new certificate that names the organization; nothing else changed
    for name in ("site-2", "alice"):
        changed = {f for f in before[name] if before[name][f] != after_joining[name][f]}
        assert changed == {"participant.pem"}
    assert after_joining["site-1"] == before["site-1"] and after_joining["bob"] == before["bob"]
    site_2, alice = StartupKit.load(kits / "site-2"), StartupKit.load(kits / "alice")
    assert (site_2.me.organization, alice.me.organization) == ("hospital-b", "hospital-c")
    assert StartupKit.load(kits / "site-1").me.organization is None
    assert alice.me.role == "project_admin"
    ca = alice.ca_certificate
    trusted_copy = (kits / "server" / "trusted" / "alice.pem").read_bytes()
    assert verify_participant(load_certificate(trusted_copy, "alice"), ca).organization == (
        "hospital-c"
    )
    assert TrustedParticipants(ca, kits / "server" / "trusted")(alice.me.curve_key) == "alice"


def test_a_server_organization_reissues_the_server_certificate_everywhere_it_travels(
    tmp_path: Path,
) -> None:
    # Prepare
    provision_tree(project_tree(), tmp_path)
    kits = tmp_path / "kits"
    server_key = (kits / "server" / "participant.key").read_bytes()

    # Execute
    report = provision_tree(with_organizations(project_tree(), {"server": "nvidia"}), tmp_path)

    # Assert: the server's certificate and every other kit's copy of it, same keys
    assert report.issued == ["server"]
    assert report.updated == {
        "server": ["participant.pem"],
        **{name: ["server.pem"] for name in ("site-1", "site-2", "alice", "bob")},
    }
    assert (kits / "server" / "participant.key").read_bytes() == server_key
    assert StartupKit.load(kits / "server").me.organization == "nvidia"
    server_copy = StartupKit.load(kits / "site-1").server_certificate
    assert server_copy is not None and server_copy.organization == "nvidia"


def test_a_certificate_carries_the_organization_as_organization_identifier() -> None:
    # Prepare
    ca_key = new_signing_key()
    ca = issue_ca("demo", ca_key)

    def issue(name: str, organization: str | None) -> x509.Certificate:
        return issue_participant(
            ca_key=ca_key,
            ca_cert=ca,
            name=name,
            role="lead",
            days=1,
            public_key=new_signing_key().public_key(),
            curve_key=curve_keypair()[0],
            organization=organization,
        )

    # Execute
    with_org, without = issue("alice", "hospital-a"), issue("bob", None)

    # Assert: the attribute is 2.5.4.97 beside O=<project>, OU=<role>; absent without an org
    assert ORGANIZATION_OID.dotted_string == "2.5.4.97"
    assert with_org.subject.rfc4514_string() == "2.5.4.97=hospital-a,OU=lead,O=demo,CN=alice"
    assert without.subject.get_attributes_for_oid(ORGANIZATION_OID) == []
    alice, bob = verify_participant(with_org, ca), verify_participant(without, ca)
    assert (alice.name, alice.role, alice.project, alice.organization) == (
        "alice", "lead", "demo", "hospital-a"
    )  # fmt: skip
    assert (bob.name, bob.organization) == ("bob", None)
    with pytest.raises(ConfigError, match="the organization of 'carol' is empty"):
        issue("carol", "")


def test_a_certificate_naming_two_organizations_is_refused() -> None:
    # Prepare: the CA signs a subject with a second organizationIdentifier
    ca_key = new_signing_key()
    ca = issue_ca("demo", ca_key)
    cert = issue_participant(ca_key=ca_key, ca_cert=ca, name="alice", role="lead", days=1,
                             public_key=new_signing_key().public_key(),
                             curve_key=curve_keypair()[0], organization="hospital-a")  # fmt: skip
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([*cert.subject, x509.NameAttribute(ORGANIZATION_OID, "other")]))
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for extension in cert.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    two = builder.sign(ca_key, hashes.SHA256())

    # Execute / Assert
    assert verify_participant(cert, ca).organization == "hospital-a"
    with pytest.raises(AuthenticationError, match="has a malformed organization"):
        verify_participant(two, ca)


def test_a_workspace_refuses_another_project(tmp_path: Path) -> None:
    provision_tree(project_tree("demo"), tmp_path)
    with pytest.raises(ConfigError, match="holds the CA of project 'demo', not 'other'"):
        provision_tree(project_tree("other"), tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.update(colour="blue"), "unknown keys"),
        (lambda t: t["sites"].append("site-1"), "repeated"),
        (lambda t: t["sites"].append("site-1.job-1"), "invalid name"),
        (lambda t: t["admins"].append({"name": "eve", "role": "root"}), "has role 'root'"),
        (lambda t: t["server"].update(port=70000), "not in 1..65535"),
        (lambda t: t["server"].update(port="8002"), "must be a int"),
        (lambda t: t.pop("sites"), "missing keys"),
        (lambda t: t["sites"].append({"name": "site-3", "colour": "blue"}), r"sites\[2\]: unknown"),
        (lambda t: t["sites"].append({"org": "hospital-a"}), r"sites\[2\]: missing keys"),
        (lambda t: t["sites"].append(7), r"sites\[2\] must be a name or a \{name, org\}"),
        (lambda t: t["sites"].append({"name": "site-3", "org": "hospital a"}),
         "'site-3' has an invalid organization 'hospital a'"),
        (lambda t: t["sites"].append({"name": "site-3", "org": 7}), r"sites\[2\]\.org must be"),
        (lambda t: t["admins"][0].update(org="hospital.a"), "'alice' has an invalid organization"),
        (lambda t: t["admins"][0].update(org=["a"]), r"admins\[0\]\.org must be a str"),
        (lambda t: t["server"].update(org=""), "'server' has an invalid organization ''"),
    ],
)
def test_project_file_errors_name_the_problem(change: object, message: str) -> None:
    tree = project_tree()
    change(tree)  # type: ignore[operator]
    with pytest.raises(ConfigError, match=message):
        parse_project(tree)


def test_sites_are_names_or_mappings_and_everyone_may_have_an_organization(
    tmp_path: Path,
) -> None:
    # Prepare
    project_file = tmp_path / "project.yml"
    project_file.write_text(
        "project: demo\n"
        "server: {host: fl.example.org, port: 8002, org: nvidia}\n"
        "sites:\n  - site-1\n  - {name: site-2, org: hospital-b}\n  - name: site-3\n"
        "    org: hospital-b\n"
        "admins:\n  - {name: alice, role: lead, org: hospital-a}\n  - {name: bob}\n"
    )

    # Execute
    project = load_project(project_file)

    # Assert
    assert project.sites == (Site("site-1"), Site("site-2", "hospital-b"),
                             Site("site-3", "hospital-b"))  # fmt: skip
    assert project.admins == (Admin("alice", "lead", "hospital-a"), Admin("bob"))
    assert project.server_org == "nvidia"
    assert project.organizations() == {
        "server": "nvidia", "site-1": None, "site-2": "hospital-b", "site-3": "hospital-b",
        "alice": "hospital-a", "bob": None,
    }  # fmt: skip
    assert list(project.roles()) == list(project.organizations())


def test_cli_provisions_from_a_yaml_file(tmp_path: Path) -> None:
    # Prepare
    project_file = tmp_path / "project.yml"
    project_file.write_text(
        "project: demo\nserver:\n  host: fl.example.org\n  port: 8002\nsites: [site-1]\n"
        "admins:\n  - name: alice\n    role: lead\n"
    )
    assert load_project(project_file).sites == (Site("site-1"),)

    # Execute
    first = CliRunner().invoke(cli, ["provision", str(project_file)])
    again = CliRunner().invoke(cli, ["provision", str(project_file)])
    bad = tmp_path / "bad.yml"
    bad.write_text("project: demo\nsites: []\n")
    refused = CliRunner().invoke(cli, ["provision", str(bad)])

    # Assert
    assert first.exit_code == 0, first.output
    assert "site-1" in first.output and "new" in first.output
    assert again.exit_code == 0 and "unchanged" in again.output
    assert StartupKit.load(tmp_path / "kits" / "site-1").server.url == "tcp://fl.example.org:8002"
    assert refused.exit_code == 1 and "missing keys ['server']" in refused.output


def test_a_tampered_or_foreign_kit_does_not_load(tmp_path: Path) -> None:
    # Prepare: two projects; copies of site-1's kit, each broken one way
    provision_tree(project_tree("demo"), tmp_path / "demo")
    provision_tree(project_tree("other"), tmp_path / "other")
    site = tmp_path / "demo" / "kits" / "site-1"
    other_site = tmp_path / "other" / "kits" / "site-1"

    def broken(name: str) -> Path:
        copy = tmp_path / name
        shutil.copytree(site, copy)
        return copy

    forged = broken("tampered")
    (forged / "participant.pem").write_bytes(tampered((site / "participant.pem").read_bytes()))
    foreign_ca = broken("foreign-ca")
    shutil.copy(other_site / "ca.pem", foreign_ca / "ca.pem")
    foreign_key = broken("foreign-key")
    shutil.copy(tmp_path / "demo" / "kits" / "site-2" / "participant.key", foreign_key)
    foreign_curve = broken("foreign-curve")
    shutil.copy(tmp_path / "demo" / "kits" / "site-2" / "curve.key", foreign_curve)
    fake_server = broken("fake-server")
    shutil.copy(tmp_path / "demo" / "kits" / "site-2" / "participant.pem",
                fake_server / "server.pem")  # fmt: skip
    missing = broken("missing")
    (missing / "curve.key").unlink()

    # Execute / Assert
    with pytest.raises(
        AuthenticationError, match=r"not issued by the project CA .* or was altered: bad signature"
    ):
        StartupKit.load(forged)
    with pytest.raises(AuthenticationError, match="not issued by the project CA"):
        StartupKit.load(foreign_ca)
    with pytest.raises(AuthenticationError, match=r"participant\.key does not belong to 'site-1'"):
        StartupKit.load(foreign_key)
    with pytest.raises(AuthenticationError, match=r"curve\.key does not belong to 'site-1'"):
        StartupKit.load(foreign_curve)
    with pytest.raises(AuthenticationError, match=r"server\.pem is 'site-2' \(site\)"):
        StartupKit.load(fake_server)
    with pytest.raises(ConfigError, match=r"cannot read curve\.key"):
        StartupKit.load(missing)
    assert StartupKit.load(site).name == "site-1"


def test_the_trust_folder_skips_tampered_certificates_and_rereads_when_it_changes(
    tmp_path: Path,
) -> None:
    # Prepare
    provision_tree(project_tree(sites=("site-1", "site-2", "site-3")), tmp_path)
    kits = tmp_path / "kits"
    trusted_dir = tmp_path / "trusted"
    trusted_dir.mkdir()
    shutil.copy(kits / "server" / "trusted" / "site-1.pem", trusted_dir)
    pem = (kits / "server" / "trusted" / "site-2.pem").read_bytes()
    (trusted_dir / "site-2.pem").write_bytes(tampered(pem))
    ca = StartupKit.load(kits / "server").ca_certificate
    keys = {
        name: StartupKit.load(kits / name).me.curve_key for name in ("site-1", "site-2", "site-3")
    }

    # Execute
    trusted = TrustedParticipants(ca, trusted_dir)
    before = (trusted(keys["site-1"]), trusted(keys["site-2"]), trusted(keys["site-3"]))
    shutil.copy(kits / "server" / "trusted" / "site-3.pem", trusted_dir)
    after = trusted(keys["site-3"])

    # Assert
    assert before == ("site-1", None, None)
    assert after == "site-3"
