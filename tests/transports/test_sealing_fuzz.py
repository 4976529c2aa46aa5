"""Property tests: whatever a relay or a malicious (but certified) sender does to a sealed
message, opening it raises SealError and nothing else, and no input makes the receiver allocate
by the header's word."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import msgpack
import numpy as np
import pytest
from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_sealing import make_ca, make_participant, model, resign

from fedcell.errors import SealError
from fedcell.transports.sealing import SealedMessage, Sealer

HEADER_KEYS = ["v", "src", "dst", "ch", "tp", "id", "re", "ts", "alg", "epk", "ek", "rfp", "seg", "cs"]
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.binary(max_size=80),
    st.text(max_size=12),
    st.lists(st.integers(-5, 2**62), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(-(2**63), 2**63 - 1), max_size=2),
)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def parties() -> dict[str, Any]:
    ca = make_ca()
    return {"ca": ca, "site-1": make_participant(ca, "site-1"),
            "site-2": make_participant(ca, "site-2")}


@functools.cache
def sealed_sample() -> SealedMessage:
    p = parties()
    sender = Sealer(*p["site-1"], p["ca"][0], chunk_size=1000)
    return sender.seal(model(n=1000), sender="site-1", recipient="site-2",
                       recipient_certificate=p["site-2"][0], channel="train")


def open_fresh(sealed: SealedMessage) -> Any:
    p = parties()
    receiver = Sealer(*p["site-2"], p["ca"][0])
    return receiver.open(sealed, sender="site-1", recipient="site-2", channel="train").payload


@FUZZ
@given(
    field=st.sampled_from(["header", "sender_certificate", "signature", "chunks"]),
    position=st.integers(0, 100_000),
    bit=st.integers(0, 7),
)
def test_any_flipped_bit_is_refused_with_a_seal_error(field: str, position: int, bit: int) -> None:
    sealed = sealed_sample()
    if field == "chunks":
        chunks = [c.copy() for c in sealed.chunks]
        whole = np.concatenate(chunks)
        index = position % whole.size
        for chunk in chunks:
            if index < chunk.size:
                chunk[index] ^= 1 << bit
                break
            index -= chunk.size
        mutated = dataclasses.replace(sealed, chunks=chunks)
    else:
        data = bytearray(getattr(sealed, field))
        data[position % len(data)] ^= 1 << bit
        mutated = dataclasses.replace(sealed, **{field: bytes(data)})
    if field == "sender_certificate" and _same_signed_certificate(mutated, sealed):
        # DER's BIT STRING "unused bits" count of the CA's signature: the parser accepts 1 or 2
        # when the signature's last bits are zero. Nothing signed changed; the sender is as
        # authenticated as before, so the message opens.
        assert open_fresh(mutated) is not None
        return
    with pytest.raises(SealError):
        open_fresh(mutated)


def _same_signed_certificate(mutated: SealedMessage, original: SealedMessage) -> bool:
    """Whether the mutated sender certificate parses to the same signed content and signature."""
    same = x509.load_der_x509_certificate(original.sender_certificate)
    try:
        changed = x509.load_der_x509_certificate(mutated.sender_certificate)
        return (
            changed.tbs_certificate_bytes == same.tbs_certificate_bytes
            and changed.signature == same.signature
            and changed.signature_algorithm_oid == same.signature_algorithm_oid
        )
    except (ValueError, x509.InvalidVersion, Warning):  # it does not even parse
        return False


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(HEADER_KEYS), VALUES, min_size=1, max_size=3))
def test_a_certified_sender_with_a_malformed_header_only_gets_seal_errors(
    changes: dict[str, Any],
) -> None:
    # The sender signs the malformed header itself, so every check after the signature runs.
    sealed = sealed_sample()
    raw = msgpack.unpackb(sealed.header, raw=False)
    raw.update(changes)
    header = msgpack.packb(raw, use_bin_type=True)
    mutated = resign(dataclasses.replace(sealed, header=header), parties()["site-1"][1],
                     list(sealed.chunks))
    try:
        payload = open_fresh(mutated)
    except SealError:
        return
    # Only changes that keep the message meaning the same may open (e.g. the same value again).
    assert sorted(payload) == sorted(model(n=1000))


@FUZZ
@given(
    segments=st.lists(st.integers(0, 2**62), min_size=1, max_size=6),
    chunk_size=st.integers(1, 2**30),
)
def test_announced_sizes_never_drive_allocation(segments: list[int], chunk_size: int) -> None:
    # An unauthenticated relay announces absurd sizes: refused before anything is allocated.
    sealed = sealed_sample()
    raw = msgpack.unpackb(sealed.header, raw=False)
    raw.update(seg=segments, cs=chunk_size)
    mutated = dataclasses.replace(sealed, header=msgpack.packb(raw, use_bin_type=True))
    with pytest.raises(SealError):
        open_fresh(mutated)
