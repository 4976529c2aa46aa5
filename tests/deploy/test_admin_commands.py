"""Admin commands: signed with the admin's kit, verified against the project CA."""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from deploy_helpers import project_tree, provision_tree, tampered, with_organizations

from fedcell.deploy.commands import (
    ReplayGuard,
    SignedCommand,
    sign_command,
    verify_command,
)
from fedcell.deploy.kit import StartupKit, TrustedParticipants
from fedcell.errors import AuthenticationError, ConfigError, EncodeError
from fedcell.transports import codec


def test_a_signed_command_verifies_and_names_its_admin(kits: Path) -> None:
    # Prepare
    alice = StartupKit.load(kits / "alice")
    ca = StartupKit.load(kits / "site-1").ca_certificate

    # Execute
    command = sign_command(alice, {"action": "submit", "job": "fedavg", "sites": ["site-1"]})
    tree, buffers = codec.encode(command)  # travels as a cell payload
    received = codec.decode(tree, buffers)
    verified = verify_command(ca, received, replay_guard=ReplayGuard())

    # Assert
    assert isinstance(received, SignedCommand) and received == command
    assert (verified.admin, verified.role) == ("alice", "project_admin")
    assert verified.payload == {"action": "submit", "job": "fedavg", "sites": ["site-1"]}
    assert abs(verified.issued_at - time.time()) < 60 and len(verified.nonce) == 32


def test_a_verified_command_carries_the_organization_of_its_admins_certificate(
    tmp_path: Path,
) -> None:
    # Prepare: alice belongs to hospital-a; bob to no organization
    provision_tree(with_organizations(project_tree(), {"alice": "hospital-a"}), tmp_path)
    kits = tmp_path / "kits"
    ca = StartupKit.load(kits / "site-1").ca_certificate

    # Execute
    alice = verify_command(ca, sign_command(StartupKit.load(kits / "alice"), {"action": "list"}))
    bob = verify_command(ca, sign_command(StartupKit.load(kits / "bob"), {"action": "list"}))

    # Assert
    assert (alice.admin, alice.role, alice.organization) == ("alice", "project_admin", "hospital-a")
    assert (bob.admin, bob.organization) == ("bob", None)


def test_an_altered_command_is_refused(kits: Path) -> None:
    # Prepare
    alice = StartupKit.load(kits / "alice")
    ca = alice.ca_certificate
    command = sign_command(alice, {"action": "abort", "job": "j-1"})
    body = json.loads(command.body)
    body["payload"]["job"] = "j-2"
    altered_body = dataclasses.replace(
        command, body=json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    )
    signature = bytearray(command.signature)
    signature[-1] ^= 0x01
    altered_signature = dataclasses.replace(command, signature=bytes(signature))
    bob_cert = (kits / "bob" / "participant.pem").read_bytes()
    other_admins_cert = dataclasses.replace(command, certificate=bob_cert)
    forged_cert = dataclasses.replace(command, certificate=tampered(command.certificate))

    # Execute / Assert
    for forged in (altered_body, altered_signature, other_admins_cert):
        with pytest.raises(AuthenticationError, match="does not verify"):
            verify_command(ca, forged)
    with pytest.raises(AuthenticationError, match="not issued by the project CA"):
        verify_command(ca, forged_cert)
    assert verify_command(ca, command).payload == {"action": "abort", "job": "j-1"}


def test_expired_future_and_replayed_commands_are_refused(kits: Path) -> None:
    # Prepare
    alice = StartupKit.load(kits / "alice")
    ca = alice.ca_certificate
    now = time.time()
    old = sign_command(alice, {"action": "list"}, now=now - 301)
    future = sign_command(alice, {"action": "list"}, now=now + 120)
    fresh = sign_command(alice, {"action": "list"}, now=now)
    guard = ReplayGuard()

    # Execute / Assert
    with pytest.raises(AuthenticationError, match="expired"):
        verify_command(ca, old, now=now)
    with pytest.raises(AuthenticationError, match="in the future"):
        verify_command(ca, future, now=now)
    verify_command(ca, fresh, replay_guard=guard, now=now)
    with pytest.raises(AuthenticationError, match="already used"):
        verify_command(ca, fresh, replay_guard=guard, now=now + 1)
    # a longer max_age accepts the old command; another guard has not seen the fresh one
    assert verify_command(ca, old, max_age=600, now=now).admin == "alice"
    assert verify_command(ca, fresh, replay_guard=ReplayGuard(), now=now).admin == "alice"


def test_only_admins_of_this_project_sign_commands(kits: Path, tmp_path: Path) -> None:
    # Prepare
    provision_tree(project_tree("other"), tmp_path / "other")
    outsider = StartupKit.load(tmp_path / "other" / "kits" / "alice")
    ca = StartupKit.load(kits / "alice").ca_certificate
    site = StartupKit.load(kits / "site-1")

    # Execute / Assert
    with pytest.raises(AuthenticationError, match="not issued by the project CA"):
        verify_command(ca, sign_command(outsider, {"action": "submit"}))
    with pytest.raises(ConfigError, match="'site-1' is a site, not an admin"):
        sign_command(site, {"action": "submit"})
    with pytest.raises(EncodeError, match="must be JSON data"):
        sign_command(StartupKit.load(kits / "bob"), {"when": object()})


def test_a_command_signed_by_a_site_key_is_refused(kits: Path) -> None:
    # Prepare: a site signs a well-formed body with its own (CA-certified) key
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    site = StartupKit.load(kits / "site-1")
    body = json.dumps(
        {"admin": "site-1", "project": "demo", "issued_at": time.time(), "nonce": "00" * 16,
         "payload": {"action": "submit"}},
        sort_keys=True, separators=(",", ":"),
    ).encode()  # fmt: skip
    signature = site.private_key.sign(body, ec.ECDSA(hashes.SHA256()))
    cert = (kits / "site-1" / "participant.pem").read_bytes()

    # Execute / Assert
    with pytest.raises(AuthenticationError, match="'site-1' is a site, not an admin"):
        verify_command(site.ca_certificate, SignedCommand(body, signature, cert))


def test_an_admin_removed_from_the_project_is_refused_by_the_server(kits: Path) -> None:
    # Prepare
    server = StartupKit.load(kits / "server")
    trusted = TrustedParticipants(server.ca_certificate, kits / "server" / "trusted")
    command = sign_command(StartupKit.load(kits / "bob"), {"action": "list"})
    assert verify_command(server.ca_certificate, command, trusted=trusted).admin == "bob"

    # Execute: bob leaves project.yml and the project is provisioned again
    tree = project_tree()
    tree["admins"] = [a for a in tree["admins"] if a["name"] != "bob"]
    provision_tree(tree, kits.parent)

    # Assert
    with pytest.raises(AuthenticationError, match="'bob' is no longer trusted"):
        verify_command(server.ca_certificate, command, trusted=trusted)
    assert verify_command(server.ca_certificate, command).admin == "bob"  # the CA alone: no CRL


def test_an_admin_certificate_breaking_rfc_5280_is_refused(kits: Path) -> None:
    # Prepare: alice's command with her certificate's serial number made negative (cryptography
    # parses such a certificate with only a deprecation warning)
    alice = StartupKit.load(kits / "alice")
    command = sign_command(alice, {"command": "list"})
    certificate = x509.load_pem_x509_certificate(command.certificate)
    serial = certificate.serial_number
    content = serial.to_bytes((serial.bit_length() + 8) // 8, "big")  # DER INTEGER content
    der = bytearray(certificate.public_bytes(serialization.Encoding.DER))
    der[der.index(bytes([2, len(content)]) + content) + 2] |= 0x80
    pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bytes(der))
    forged = dataclasses.replace(command, certificate=pem + b"-----END CERTIFICATE-----\n")
    # Execute / Assert: refused either way, naming the serial (a serial starting 0x7F then a byte
    # >= 0x80 becomes a non-minimal INTEGER, which cryptography refuses itself: 1 run in ~128)
    with pytest.raises(AuthenticationError, match=r"not a valid PEM certificate.*serial"):
        verify_command(alice.ca_certificate, forged)
