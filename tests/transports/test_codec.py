"""Round trips and rejections of the safe payload codec and the message wire form."""

from __future__ import annotations

import dataclasses
import math

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedcell.errors import EncodeError, FrameError, OversizedError
from fedcell.fl_model import FLModel, ParamsType
from fedcell.transports import codec
from fedcell.transports.message import Message, from_wire, pack_envelope, to_wire


def roundtrip(value: object) -> object:
    msg = Message.create("site-1", "server", "train", value)
    # Frames as the network hands them over: read-only copies.
    frames = [memoryview(bytes(f)) for f in to_wire(msg)]
    return from_wire(frames).payload


scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text() | st.binary()
scalars |= st.floats(allow_nan=False)
trees = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.integers(-5, 5), inner, max_size=4)
    | st.tuples(inner, inner),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(trees)
def test_plain_values_round_trip(value: object) -> None:
    assert roundtrip(value) == value


numpy_dtypes = st.sampled_from(
    ["bool", "int8", "uint16", "int32", "int64", "float16", "float32", "float64", "complex64"]
)


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(numpy_dtypes, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)))
def test_numpy_arrays_round_trip_bit_exact(arr: np.ndarray) -> None:
    out = roundtrip({"a": arr})["a"]  # type: ignore[index]
    assert out.dtype == arr.dtype and out.shape == arr.shape
    assert out.tobytes() == arr.tobytes()
    assert out.flags.writeable


@pytest.mark.parametrize(
    "dtype",
    [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int8, torch.int64,
     torch.bool, torch.uint8, torch.complex64, torch.float8_e4m3fn],
)  # fmt: skip
def test_torch_tensors_keep_dtype_and_bits(dtype: torch.dtype) -> None:
    source = torch.randn(7, 3).mul(4).to(dtype)
    out = roundtrip({"layer.weight": source, "empty": torch.zeros(0, 2, dtype=dtype)})
    assert out["layer.weight"].dtype == dtype  # type: ignore[index]
    assert torch.equal(out["layer.weight"].view(torch.uint8), source.view(torch.uint8))  # type: ignore[index]
    assert out["empty"].shape == (0, 2)  # type: ignore[index]


def test_non_contiguous_and_scalar_tensors() -> None:
    t = torch.arange(12.0).reshape(3, 4).t()
    out = roundtrip([t, torch.tensor(3.5), np.float32(2.5), np.arange(6)[::2]])
    assert torch.equal(out[0], t)  # type: ignore[index]
    assert out[1].shape == () and out[1].item() == 3.5  # type: ignore[index]
    assert out[2] == 2.5  # type: ignore[index]
    assert out[3].tolist() == [0, 2, 4]  # type: ignore[index]


def test_big_endian_arrays_are_sent_native() -> None:
    arr = np.arange(5, dtype=">i4")
    out = roundtrip(arr)
    assert out.tolist() == [0, 1, 2, 3, 4]  # type: ignore[attr-defined]


def test_fl_model_round_trips_as_registered_dataclass() -> None:
    model = FLModel(
        params={"w": torch.ones(2, 2, dtype=torch.bfloat16)},
        params_type="diff",
        metrics={"acc": 0.9},
        current_round=3,
        total_rounds=5,
        meta={"NUM_STEPS_CURRENT_ROUND": 10},
    )
    out = roundtrip(model)
    assert isinstance(out, FLModel)
    assert out.params_type is ParamsType.DIFF
    assert out.params["w"].dtype == torch.bfloat16
    assert (out.metrics, out.current_round, out.meta) == ({"acc": 0.9}, 3, model.meta)


class NotRegistered:
    pass


@dataclasses.dataclass
class PlainDataclass:
    x: int


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ({"ok": [1, NotRegistered()]}, "payload['ok'][1]: cannot send a"),
        (PlainDataclass(1), "PlainDataclass"),
        ({1.5: "x"}, "dict key 1.5"),
        (2**70, "does not fit in 64 bits"),
        (np.array(["a"], dtype=object), "numpy dtype object"),
        ({"f": lambda: 1}, "cannot send a builtins.function"),
    ],
)
def test_unsupported_values_fail_at_the_sender(value: object, fragment: str) -> None:
    with pytest.raises(EncodeError, match=None) as info:
        to_wire(Message.create("a", "b", "c", value))
    assert fragment in str(info.value)


def _frames(tree: object, *buffers: bytes) -> list[bytes]:
    env = Message.create("a", "b", "c").envelope
    return [pack_envelope(env), msgpack.packb(tree, use_bin_type=True), *buffers]


def _array_node(dtype: str, shape: list[int], index: int, code: int = 1) -> msgpack.ExtType:
    return msgpack.ExtType(code, msgpack.packb([dtype, shape, index]))


@pytest.mark.parametrize(
    ("frames", "fragment"),
    [
        ([b"\xc1garbage", b"\x90"], "envelope does not decode"),
        ([msgpack.packb({"v": 99}), b"\xc0"], "unsupported wire version"),
        ([msgpack.packb({"v": 1, "k": "hack"}), b"\xc0"], "unknown message type"),
        ([b"only-one-frame"], "at least 2 frames"),
        (_frames(_array_node("<f4", [4], 0), b"\x00" * 15), "needs 16"),
        (_frames(_array_node("|O", [1], 0), b"\x00" * 8), "unsupported numpy dtype"),
        (_frames(_array_node("<f4", [1], 3), b"\x00" * 4), "refers to frame 3"),
        (_frames(_array_node("<f4", [-1], 0)), "bad array shape"),
        (_frames([1], b"extra"), "uses 0"),
        (_frames(msgpack.ExtType(4, msgpack.packb(["os.system", {}]))), "unknown wire type"),
        (_frames(msgpack.ExtType(4, msgpack.packb(["fedcell.FLModel", {"evil": 1}]))), "no field"),
        (_frames(msgpack.ExtType(77, b"")), "unknown payload node type 77"),
        (_frames(msgpack.ExtType(2, msgpack.packb(["__import__", [1], 0])), b"x"), "unsupported torch dtype"),
    ],
)
def test_malformed_frames_are_rejected_clearly(frames: list[bytes], fragment: str) -> None:
    with pytest.raises(FrameError) as info:
        from_wire(frames)
    assert fragment in str(info.value)


def test_oversized_payload_header_is_rejected() -> None:
    frames = _frames("x" * 2048)
    with pytest.raises(OversizedError, match="above the 1024 limit"):
        from_wire(frames, max_tree_bytes=1024)


def test_array_specs_describe_frames_without_data() -> None:
    tree, buffers = codec.encode({"a": np.zeros((3, 4), "float32"), "b": torch.ones(5, dtype=torch.bfloat16)})
    specs = codec.array_specs(tree)
    assert [(s.library, s.dtype, s.shape, s.nbytes) for s in specs] == [
        ("numpy", "<f4", (3, 4), 48),
        ("torch", "bfloat16", (5,), 10),
    ]
    assert sum(s.nbytes for s in specs) == codec.payload_nbytes(buffers)
    assert all(math.prod(s.shape) >= 0 for s in specs)


def test_sender_buffers_are_zero_copy_views() -> None:
    arr = np.arange(1 << 16, dtype="float32")
    tensor = torch.arange(1 << 16, dtype=torch.float32)
    _, buffers = codec.encode([arr, tensor])
    assert np.shares_memory(np.frombuffer(buffers[0], dtype="float32"), arr)
    assert np.shares_memory(np.frombuffer(buffers[1], dtype="float32"), tensor.numpy())
