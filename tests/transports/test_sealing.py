"""Sealed messages: round trips, every tamper/replay/redirect refusal, and relays that see only
ciphertext (in-process cells; the multi-process tcp test is in test_sealing_processes.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import itertools
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from fedcell.errors import ConfigError, RemoteError, SealError
from fedcell.transports import codec
from fedcell.transports.base import Buffer
from fedcell.transports.cell import Cell, CellConfig
from fedcell.transports.message import Envelope, Message
from fedcell.transports.sealing import (
    CERTIFICATES_CHANNEL,
    CertificateBook,
    SealedMessage,
    Sealer,
    SealHeader,
    SigningKey,
    seal_and_request,
    seal_and_send,
    serve_certificates,
    unsealing,
)
from fedcell.transports.stream import StreamConfig

NOW = datetime.datetime.now(datetime.timezone.utc)
SECRET = b"patient-record-7f3a91c2"


def make_ca(name: str = "project") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_participant(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    name: str,
    key_type: str = "ec",
    valid_days: float = 30,
) -> tuple[x509.Certificate, SigningKey]:
    key: SigningKey
    if key_type == "ec":
        key = ec.generate_private_key(ec.SECP256R1())
    elif key_type == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    ca_cert, ca_key = ca
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=valid_days))
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


@pytest.fixture(scope="module")
def project() -> dict[str, Any]:
    """A CA and EC participants server, site-1, site-2, site-3, plus an RSA and an Ed25519 site."""
    ca = make_ca()
    parties: dict[str, Any] = {"ca": ca}
    for name in ("server", "site-1", "site-2", "site-3"):
        parties[name] = make_participant(ca, name)
    parties["rsa-site"] = make_participant(ca, "rsa-site", "rsa")
    parties["ed-site"] = make_participant(ca, "ed-site", "ed25519")
    return parties


def sealer_for(project: dict[str, Any], name: str, **options: Any) -> Sealer:
    cert, key = project[name]
    return Sealer(cert, key, project["ca"][0], **options)


def seal(sender: Sealer, recipient_cert: x509.Certificate, payload: Any, *,
         sender_name: str = "site-1", recipient: str = "site-2", channel: str = "train",
         topic: str = "", reply_to: str | None = None) -> SealedMessage:
    return sender.seal(payload, sender=sender_name, recipient=recipient,
                       recipient_certificate=recipient_cert, channel=channel, topic=topic,
                       reply_to=reply_to)


def open_as(receiver: Sealer, sealed: SealedMessage, *, sender: str = "site-1",
            recipient: str = "site-2", channel: str = "train", topic: str = "",
            reply_to: str | None = None) -> Any:
    return receiver.open(sealed, sender=sender, recipient=recipient, channel=channel, topic=topic,
                         reply_to=reply_to).payload


def model(seed: int = 0, n: int = 3000) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "weights": rng.standard_normal(n).astype(np.float32),
        "bias": np.arange(7, dtype=np.int64).reshape(7, 1),
        "empty": np.zeros((0, 4), dtype=np.float64),
        "meta": {"round": 3, "note": SECRET, "pair": (1, "a")},
    }


def assert_model_equal(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    assert actual.keys() == expected.keys()
    for key in ("weights", "bias", "empty"):
        assert actual[key].dtype == expected[key].dtype
        np.testing.assert_array_equal(actual[key], expected[key])
    assert actual["meta"] == expected["meta"]


def with_header(sealed: SealedMessage, **changes: Any) -> SealedMessage:
    raw = msgpack.unpackb(sealed.header, raw=False)
    raw.update(changes)
    return dataclasses.replace(sealed, header=msgpack.packb(raw, use_bin_type=True))


def resign(sealed: SealedMessage, key: SigningKey, chunks: list[Any]) -> SealedMessage:
    """What a sender that mangles its own chunks would send: a valid signature over them."""
    digest = hashes.Hash(hashes.SHA256())
    for chunk in chunks:
        digest.update(bytes(chunk))
    header_digest = hashes.Hash(hashes.SHA256())
    header_digest.update(sealed.header)
    data = b"fedcell-sealed-v1" + header_digest.finalize() + digest.finalize()
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return dataclasses.replace(
        sealed, chunks=chunks, signature=key.sign(data, ec.ECDSA(hashes.SHA256()))
    )


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("recipient", ["site-2", "rsa-site"])
@pytest.mark.parametrize("chunk_size", [64, 4 * 1024 * 1024])
def test_round_trip_ec_and_rsa_recipients_many_or_one_chunk(
    project: dict[str, Any], recipient: str, chunk_size: int
) -> None:
    # Prepare
    sender = sealer_for(project, "site-1", chunk_size=chunk_size)
    receiver = sealer_for(project, recipient)
    payload = model()
    # Execute
    sealed = seal(sender, project[recipient][0], payload, recipient=recipient)
    opened = receiver.open(sealed, sender="site-1", recipient=recipient, channel="train")
    # Assert
    assert_model_equal(opened.payload, payload)
    assert opened.header.sender == "site-1"
    assert opened.sender_certificate == project["site-1"][0]
    expected_chunks = opened.header.chunk_count()
    assert len(sealed.chunks) == expected_chunks
    assert (expected_chunks > 10) == (chunk_size == 64)
    everything = sealed.header + b"".join(bytes(c) for c in sealed.chunks)
    assert SECRET not in everything
    assert payload["weights"].tobytes()[:64] not in everything


def test_ed25519_sender_signs_but_cannot_be_sealed_to(project: dict[str, Any]) -> None:
    ed_sender = sealer_for(project, "ed-site")
    sealed = seal(ed_sender, project["site-2"][0], [1, 2], sender_name="ed-site")
    assert open_as(sealer_for(project, "site-2"), sealed, sender="ed-site") == [1, 2]
    with pytest.raises(SealError, match="Ed25519PublicKey key cannot encrypt"):
        seal(sealer_for(project, "site-1"), project["ed-site"][0], 1, recipient="ed-site")


def test_sealed_message_survives_the_wire_codec(project: dict[str, Any]) -> None:
    sealed = seal(sealer_for(project, "site-1", chunk_size=1000), project["site-2"][0], model())
    tree, buffers = codec.encode(sealed)
    assert len(buffers) == len(sealed.chunks)  # every chunk is a raw frame, not in the tree
    again = codec.decode(codec.unpack_tree(codec.pack_tree(tree)), [bytes(b) for b in buffers])
    assert_model_equal(open_as(sealer_for(project, "site-2"), again), model())


def test_children_of_a_site_use_its_certificate(project: dict[str, Any]) -> None:
    sealed = seal(sealer_for(project, "site-1"), project["site-2"][0], "hi",
                  sender_name="site-1.job-7", recipient="site-2.job-7")
    assert open_as(sealer_for(project, "site-2"), sealed, sender="site-1.job-7",
                   recipient="site-2.job-7") == "hi"
    with pytest.raises(SealError, match="cannot speak as 'site-10'"):
        seal(sealer_for(project, "site-1"), project["site-2"][0], "hi", sender_name="site-10")


# ---------------------------------------------------------------------------------------------
# refusals


def test_tampered_chunk_fails_the_signature(project: dict[str, Any]) -> None:
    sealed = seal(sealer_for(project, "site-1", chunk_size=256), project["site-2"][0], model())
    chunks = [c.copy() for c in sealed.chunks]
    chunks[3][5] ^= 1
    with pytest.raises(SealError, match="signature of 'site-1' does not verify"):
        open_as(sealer_for(project, "site-2"), dataclasses.replace(sealed, chunks=chunks))


def test_tampered_signature_and_header_are_refused(project: dict[str, Any]) -> None:
    sealed = seal(sealer_for(project, "site-1"), project["site-2"][0], model())
    receiver = sealer_for(project, "site-2")
    bad_signature = bytearray(sealed.signature)
    bad_signature[-3] ^= 0x40
    with pytest.raises(SealError, match="does not verify"):
        open_as(receiver, dataclasses.replace(sealed, signature=bytes(bad_signature)))
    with pytest.raises(SealError, match="does not verify"):
        open_as(receiver, with_header(sealed, tp="other"), topic="other")
    with pytest.raises(SealError, match="does not decode"):
        open_as(receiver, dataclasses.replace(sealed, header=b"\xc1garbage"))
    with pytest.raises(SealError, match="'chunk_size' is missing or mistyped"):
        open_as(receiver, with_header(sealed, cs="big"))
    with pytest.raises(SealError, match="expected a sealed message, got dict"):
        receiver.open({"x": 1}, sender="site-1", recipient="site-2", channel="train")  # type: ignore[arg-type]
    # The untouched message still opens: nothing above consumed its id.
    assert_model_equal(open_as(receiver, sealed), model())


def test_reordered_or_truncated_chunks_are_detected(project: dict[str, Any]) -> None:
    # Prepare: a sender that signs whatever chunks it sends; only the AEAD can catch the order.
    sender_key = project["site-1"][1]
    sealed = seal(sealer_for(project, "site-1", chunk_size=512), project["site-2"][0], model())
    receiver = sealer_for(project, "site-2")
    swapped = list(sealed.chunks)
    swapped[1], swapped[2] = swapped[2], swapped[1]
    # Execute / Assert
    with pytest.raises(SealError, match=r"chunk 1 of message .* does not authenticate"):
        open_as(receiver, resign(sealed, sender_key, swapped))
    with pytest.raises(SealError, match="chunks; its header announces"):
        open_as(receiver, resign(sealed, sender_key, list(sealed.chunks[:-1])))
    # A header re-signed to announce one chunk fewer: chunks are bound to their header (AAD).
    blob = seal(sealer_for(project, "site-1", chunk_size=512), project["site-2"][0], b"x" * 4000)
    header = SealHeader.from_bytes(blob.header)
    assert len(header.segments) == 1 and len(blob.chunks) == 8  # the bytes live in the tree
    shorter = dataclasses.replace(header, segments=(7 * 512,)).to_bytes()
    truncated = resign(dataclasses.replace(blob, header=shorter), sender_key, list(blob.chunks[:-1]))
    with pytest.raises(SealError, match=r"chunk 0 of message .* does not authenticate"):
        open_as(receiver, truncated)


def test_wrong_recipient_cannot_open(project: dict[str, Any]) -> None:
    sealed = seal(sealer_for(project, "site-1"), project["site-2"][0], model())
    site_3 = sealer_for(project, "site-3")
    with pytest.raises(SealError, match="cannot open messages for 'site-2'"):
        open_as(site_3, sealed, recipient="site-2")
    with pytest.raises(SealError, match="sealed with recipient 'site-2' but arrived with "
                                        "recipient 'site-3'"):
        open_as(site_3, sealed, recipient="site-3")


def test_sealed_to_an_older_certificate_of_the_recipient(project: dict[str, Any]) -> None:
    reissued_cert, reissued_key = make_participant(project["ca"], "site-2")
    sealed = seal(sealer_for(project, "site-1"), project["site-2"][0], 1)
    with pytest.raises(SealError, match="sealed to another certificate"):
        open_as(Sealer(reissued_cert, reissued_key, project["ca"][0]), sealed)


def test_redirected_message_is_refused(project: dict[str, Any]) -> None:
    sealed = seal(sealer_for(project, "site-1"), project["site-2"][0], 1, topic="weights")
    receiver = sealer_for(project, "site-2")
    with pytest.raises(SealError, match="sealed with channel 'train' but arrived with channel "
                                        "'admin'"):
        open_as(receiver, sealed, channel="admin", topic="weights")
    with pytest.raises(SealError, match="sealed with topic 'weights'"):
        open_as(receiver, sealed, topic="")
    with pytest.raises(SealError, match="sealed with sender 'site-1' but arrived with sender "
                                        "'site-3'"):
        open_as(receiver, sealed, sender="site-3", topic="weights")
    with pytest.raises(SealError, match="sealed with reply_to None"):
        open_as(receiver, sealed, topic="weights", reply_to="abc")


def test_replayed_and_expired_messages_are_refused(project: dict[str, Any]) -> None:
    # Prepare
    now = [NOW.timestamp()]
    clock = lambda: now[0]  # noqa: E731
    sender = sealer_for(project, "site-1", clock=clock)
    receiver = sealer_for(project, "site-2", clock=clock, max_age=60, max_clock_skew=5)
    first = seal(sender, project["site-2"][0], "once")
    # Execute / Assert
    assert open_as(receiver, first) == "once"
    with pytest.raises(SealError, match="is a replay"):
        open_as(receiver, first)
    now[0] += 61
    with pytest.raises(SealError, match="older than 60 s"):
        open_as(receiver, first)
    assert receiver._seen == {}  # forgotten once too old to pass the age check
    future = seal(sealer_for(project, "site-1", clock=lambda: now[0] + 30), project["site-2"][0], 1)
    with pytest.raises(SealError, match="in the future"):
        open_as(receiver, future)


def test_certificates_are_checked_against_the_project_ca(project: dict[str, Any]) -> None:
    # Prepare: a stranger with a certificate from another CA, an expired site certificate.
    other_ca = make_ca("other")
    stranger_cert, stranger_key = make_participant(other_ca, "site-1")
    stranger = Sealer(stranger_cert, stranger_key, other_ca[0])
    other_site_2 = make_participant(other_ca, "site-2")[0]
    expired_cert, expired_key = make_participant(project["ca"], "site-3", valid_days=-0.5)
    receiver = sealer_for(project, "site-2")
    # Execute / Assert
    with pytest.raises(SealError, match=r"sender certificate .* not issued by the project CA"):
        open_as(receiver, seal(stranger, other_site_2, 1))
    with pytest.raises(SealError, match=r"recipient certificate .* not issued by the project CA"):
        seal(sealer_for(project, "site-1"), stranger_cert, 1)
    with pytest.raises(SealError, match="recipient certificate is issued to 'site-3', not to "
                                        "'site-2'"):
        seal(sealer_for(project, "site-1"), project["site-3"][0], 1)
    with pytest.raises(SealError, match="recipient certificate of 'site-3' is not valid now"):
        seal(sealer_for(project, "site-1"), expired_cert, 1, recipient="site-3")
    del expired_key


def test_a_sender_certificate_breaking_rfc_5280_is_refused_not_warned_about(
    project: dict[str, Any],
) -> None:
    # Prepare: the sender's certificate with its serial number made negative (cryptography
    # parses such a certificate with only a deprecation warning; found by the bit-flip fuzz test)
    sealed = seal(sealer_for(project, "site-1"), project["site-2"][0], 1)
    serial = x509.load_der_x509_certificate(sealed.sender_certificate).serial_number
    content = serial.to_bytes((serial.bit_length() + 8) // 8, "big")  # DER INTEGER content
    der = bytearray(sealed.sender_certificate)
    at = der.index(bytes([2, len(content)]) + content) + 2
    der[at] |= 0x80
    tampered = dataclasses.replace(sealed, sender_certificate=bytes(der))
    # Execute / Assert: refused either way, naming the serial (a serial starting 0x7F then a byte
    # >= 0x80 becomes a non-minimal INTEGER, which cryptography refuses itself: 1 run in ~128)
    with pytest.raises(SealError, match=r"sender certificate .* does not parse: .*serial"):
        open_as(sealer_for(project, "site-2"), tampered)


def test_sealer_refuses_a_key_of_another_certificate(project: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="does not belong to the certificate"):
        Sealer(project["site-1"][0], project["site-2"][1], project["ca"][0])
    with pytest.raises(ConfigError, match="'CN=site-1' is not issued by the CA 'CN=other'"):
        Sealer(project["site-1"][0], project["site-1"][1], make_ca("other")[0])
    with pytest.raises(ConfigError, match="chunk_size"):
        sealer_for(project, "site-1", chunk_size=0)


def test_chunks_of_the_wrong_type_or_size_are_refused(project: dict[str, Any]) -> None:
    sealed = seal(sealer_for(project, "site-1", chunk_size=256), project["site-2"][0], model())
    receiver = sealer_for(project, "site-2")
    as_int8 = [sealed.chunks[0].view(np.int8), *sealed.chunks[1:]]
    with pytest.raises(SealError, match="chunk 0 is not a 1-d uint8 array"):
        open_as(receiver, dataclasses.replace(sealed, chunks=as_int8))
    short = [sealed.chunks[0], sealed.chunks[1][:-1], *sealed.chunks[2:]]
    with pytest.raises(SealError, match="chunk 1 has 271 bytes, the header says 272"):
        open_as(receiver, dataclasses.replace(sealed, chunks=short))


# ---------------------------------------------------------------------------------------------
# cells: relayed through a server that only sees ciphertext

FAST = CellConfig(heartbeat_interval=0.1, peer_timeout=2.0, connect_timeout=5.0,
                  stream=StreamConfig(threshold=256 * 1024, chunk_size=128 * 1024))
_urls = itertools.count()


@asynccontextmanager
async def star_with_spy(
    *sites: str,
) -> AsyncIterator[tuple[dict[str, Cell], list[tuple[Envelope, list[Buffer]]]]]:
    """A server and sites over inproc; every message the server relays is recorded."""
    relayed: list[tuple[Envelope, list[Buffer]]] = []
    async with AsyncExitStack() as stack:
        server = Cell("server", listen=f"inproc://sealing-{os.getpid()}-{next(_urls)}",
                      config=FAST)
        relay = server._relay

        async def spy(envelope: Envelope, frames: list[Buffer]) -> None:
            relayed.append((envelope, [bytes(f) for f in frames]))
            await relay(envelope, frames)

        server._relay = spy  # type: ignore[method-assign]
        cells = {"server": await stack.enter_async_context(server)}
        for name in sites:
            cells[name] = await stack.enter_async_context(Cell(name, parent=server.url,
                                                               config=FAST))
        yield cells, relayed


def test_request_relayed_through_the_server_is_ciphertext_there(project: dict[str, Any]) -> None:
    async def main() -> None:
        async with star_with_spy("site-1", "site-2") as (cells, relayed):
            # Prepare
            site_1, site_2 = sealer_for(project, "site-1"), sealer_for(project, "site-2")
            seen: list[tuple[str, Any]] = []

            async def train(message: Message) -> Any:
                seen.append((message.sender, message.payload["meta"]["note"]))
                return {"weights": message.payload["weights"] * 2, "note": SECRET + b"-reply"}

            cells["site-2"].register("train", unsealing(site_2, train))
            payload = model()
            # Execute
            reply = await seal_and_request(cells["site-1"], site_1, "site-2", "train", payload,
                                           project["site-2"][0])
            # Assert
            assert seen == [("site-1", SECRET)]
            np.testing.assert_array_equal(reply["weights"], payload["weights"] * 2)
            assert reply["note"] == SECRET + b"-reply"
            kinds = sorted(envelope.kind for envelope, _ in relayed)
            assert kinds == ["reply", "request"]
            for _, frames in relayed:
                wire = b"".join(frames)
                assert SECRET not in wire
                assert payload["weights"].tobytes()[:32] not in wire
                assert (payload["weights"] * 2).tobytes()[:32] not in wire

    asyncio.run(main())


def test_large_sealed_payload_streams_through_the_relay_as_ciphertext(
    project: dict[str, Any],
) -> None:
    async def main() -> None:
        async with star_with_spy("site-1", "site-2") as (cells, relayed):
            # Prepare: 2 MiB of recognisable plaintext, well above the 256 KiB stream threshold.
            site_1 = sealer_for(project, "site-1", chunk_size=300_000)
            site_2 = sealer_for(project, "site-2")
            weights = np.tile(np.frombuffer(SECRET, dtype=np.uint8), 2 * 1024 * 1024 // 23)
            received: asyncio.Queue[Any] = asyncio.Queue()

            async def update(message: Message) -> None:
                await received.put(message.payload)

            cells["site-2"].register("update", unsealing(site_2, update))
            # Execute
            await seal_and_send(cells["site-1"], site_1, "site-2", "update", {"w": weights},
                                project["site-2"][0])
            got = await asyncio.wait_for(received.get(), 10)
            # Assert
            np.testing.assert_array_equal(got["w"], weights)
            streamed = [f for env, frames in relayed if env.channel == "_fc.stream"
                        for f in frames[1:]]
            assert sum(len(f) for f in streamed) > len(weights)
            assert not any(SECRET in frame for frame in streamed)
            assert cells["site-2"].statistics().streams.streams_received >= 1

    asyncio.run(main())


def test_relay_that_alters_a_sealed_request_gets_a_seal_error_and_the_site_keeps_serving(
    project: dict[str, Any],
) -> None:
    async def main() -> None:
        async with star_with_spy("site-1", "site-2") as (cells, _):
            # Prepare: the server flips one ciphertext bit of the first request it relays.
            server = cells["server"]
            relay = server._relay
            tampered = []

            async def tamper(envelope: Envelope, frames: list[Buffer]) -> None:
                if envelope.kind == "request" and not tampered:
                    last = bytearray(frames[-1])
                    last[0] ^= 1
                    frames = [*frames[:-1], bytes(last)]
                    tampered.append(envelope.msg_id)
                await relay(envelope, frames)

            server._relay = tamper  # type: ignore[method-assign]
            site_1, site_2 = sealer_for(project, "site-1"), sealer_for(project, "site-2")

            async def echo(message: Message) -> Any:
                return message.payload

            cells["site-2"].register("echo", unsealing(site_2, echo))
            # Execute / Assert
            with pytest.raises(RemoteError, match="does not verify") as caught:
                await seal_and_request(cells["site-1"], site_1, "site-2", "echo", model(),
                                       project["site-2"][0])
            assert caught.value.remote_type == "SealError"
            assert await seal_and_request(cells["site-1"], site_1, "site-2", "echo", "again",
                                          project["site-2"][0]) == "again"

    asyncio.run(main())


def test_reply_must_come_sealed_from_the_target(project: dict[str, Any]) -> None:
    async def main() -> None:
        async with star_with_spy("site-1", "site-2") as (cells, _):
            async def plain(message: Message) -> Any:
                return "not sealed"

            cells["site-2"].register("plain", plain)
            with pytest.raises(SealError, match="expected a sealed message, got str"):
                await seal_and_request(cells["site-1"], sealer_for(project, "site-1"), "site-2",
                                       "plain", 1, project["site-2"][0])

    asyncio.run(main())


def test_sealers_built_from_provisioned_startup_kits(tmp_path: Path) -> None:
    # Prepare: a project provisioned by fedcell.deploy; site-1 learns site-2's certificate
    # from the server's trust folder (certificates are public).
    from fedcell.deploy.kit import StartupKit
    from fedcell.deploy.project import parse_project
    from fedcell.deploy.provision import provision

    tree = {
        "project": "demo",
        "server": {"host": "127.0.0.1", "port": 8002, "listen_host": "127.0.0.1"},
        "sites": ["site-1", "site-2"],
    }
    kits = provision(parse_project(tree), tmp_path).kits
    site_1, site_2 = (StartupKit.load(kits / name) for name in ("site-1", "site-2"))
    sealers = {
        kit.name: Sealer(kit.me.certificate, kit.private_key, kit.ca_certificate)
        for kit in (site_1, site_2)
    }
    site_2_cert = x509.load_pem_x509_certificate((kits / "server/trusted/site-2.pem").read_bytes())
    # Execute
    sealed = seal(sealers["site-1"], site_2_cert, model(), sender_name="site-1.job-1",
                  recipient="site-2.job-1")
    opened = sealers["site-2"].open(sealed, sender="site-1.job-1", recipient="site-2.job-1",
                                    channel="train")
    # Assert
    assert_model_equal(opened.payload, model())
    assert opened.sender_certificate == site_1.me.certificate
    with pytest.raises(SealError, match="not issued by the project CA"):
        open_as(sealer_for(project_of_other_ca(), "site-2"), sealed, sender="site-1.job-1",
                recipient="site-2.job-1")


def project_of_other_ca() -> dict[str, Any]:
    ca = make_ca("other")
    return {"ca": ca, "site-2": make_participant(ca, "site-2")}


def test_release_drops_each_chunk_once_decrypted(project: dict[str, Any]) -> None:
    sealed = seal(sealer_for(project, "site-1", chunk_size=1024), project["site-2"][0], model())
    assert len(sealed.chunks) > 10
    opened = sealer_for(project, "site-2").open(
        sealed, sender="site-1", recipient="site-2", channel="train", release=True
    )
    assert_model_equal(opened.payload, model())
    assert sealed.chunks == []


def test_a_duplicated_large_message_opened_in_two_threads_passes_once(
    project: dict[str, Any],
) -> None:
    sealed = seal(sealer_for(project, "site-1"), project["site-2"][0],
                  np.ones(4 * 1024 * 1024, np.uint8))
    receiver = sealer_for(project, "site-2")

    async def main() -> list[Any]:
        return await asyncio.gather(
            *(asyncio.to_thread(open_as, receiver, sealed) for _ in range(2)),
            return_exceptions=True,
        )

    outcomes = asyncio.run(main())
    assert sum(isinstance(o, np.ndarray) for o in outcomes) == 1
    assert [str(o) for o in outcomes if isinstance(o, SealError)] == [
        f"message {SealHeader.from_bytes(sealed.header).message_id} from 'site-1' is a replay"
    ]


def test_certificate_book_fetches_verifies_and_caches_from_the_directory(
    project: dict[str, Any],
) -> None:
    async def main() -> None:
        async with star_with_spy("site-1", "site-2") as (cells, _):
            # Prepare: the server's directory; it lies about "site-4" and knows no "site-5".
            asked: list[str] = []
            foreign_cert, _ = make_participant(make_ca("other"), "site-6")
            directory = {"site-2": project["site-2"][0], "site-4": project["site-3"][0],
                         "site-6": foreign_cert}

            def lookup(name: str) -> x509.Certificate | None:
                asked.append(name)
                return directory.get(name.split(".")[0])

            serve_certificates(cells["server"], lookup)
            site_1 = sealer_for(project, "site-1")
            book = CertificateBook(cells["site-1"], site_1)

            async def echo(message: Message) -> Any:
                return message.payload

            cells["site-2"].register("echo", unsealing(sealer_for(project, "site-2"), echo))
            # Execute
            first = await book.certificate_for("site-2")
            again = await book.certificate_for("site-2")
            reply = await seal_and_request(cells["site-1"], site_1, "site-2", "echo", "hi", first)
            # Assert
            assert first == again == project["site-2"][0]
            assert asked == ["site-2"]
            assert reply == "hi"
            with pytest.raises(SealError, match="issued to 'site-3', not to 'site-4'"):
                await book.certificate_for("site-4")
            with pytest.raises(SealError, match=r"gave no certificate for 'site-5': .*knows no"):
                await book.certificate_for("site-5")
            with pytest.raises(SealError, match="not issued by the project CA"):
                await book.certificate_for("site-6")
            with pytest.raises(RemoteError, match=r"must name a cell: invalid cell name '\.\./x'"):
                await cells["site-1"].request("server", CERTIFICATES_CHANNEL, "../x")
            book.forget("site-2")
            assert await book.certificate_for("site-2.job-1") == project["site-2"][0]
            assert asked[-1] == "site-2.job-1"

    asyncio.run(main())


@pytest.mark.parametrize("created", [float("nan"), float("inf"), float("-inf")])
def test_a_signed_non_finite_creation_time_is_refused(
    project: dict[str, Any], created: float
) -> None:
    # NaN would pass every age comparison and pin the replay cache forever.
    sealed = seal(sealer_for(project, "site-1"), project["site-2"][0], 1)
    forged = resign(with_header(sealed, ts=created), project["site-1"][1], list(sealed.chunks))
    with pytest.raises(SealError, match="'created' is not a finite time"):
        open_as(sealer_for(project, "site-2"), forged)
