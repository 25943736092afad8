"""The tensor frame: round trips exactly, and refuses what it must."""

import struct

import pytest
import torch

from ares.core import wire
from ares.runtime.server import status_of


def test_round_trip_keeps_values_dtypes_shapes_and_meta():
    tensors = {"x": torch.randn(3, 4, 5), "y": torch.arange(3), "h": torch.randn(2).half(), "e": torch.zeros(0, 4)}
    bundle = wire.decode(bytearray(wire.encode(tensors, {"loss": 0.5, "round": 2})))
    assert bundle.meta == {"loss": 0.5, "round": 2}
    for k, v in tensors.items():
        assert bundle.tensors[k].dtype == v.dtype and torch.equal(bundle.tensors[k], v)


def test_streamed_chunks_add_up_to_the_declared_length():
    total, chunks = wire.encode_chunks({"x": torch.randn(300, 1024)})
    parts = [bytes(c) for c in chunks]
    assert sum(map(len, parts)) == total and max(map(len, parts)) <= wire.CHUNK
    assert wire.decode(bytearray(b"".join(parts))).tensors["x"].shape == (300, 1024)


def test_fp16_codec_halves_bytes_with_small_error():
    x = torch.randn(100, 64)
    full, half = wire.encode({"x": x}), wire.encode({"x": wire.to_codec(x, "fp16")})
    assert len(half) < 0.55 * len(full)
    back = wire.from_codec(wire.decode(bytearray(half)).tensors["x"])
    assert back.dtype == torch.float32
    assert ((back - x).abs() / x.abs().clamp_min(1e-3)).median() < 1e-3


def test_unsendable_dtype_is_refused_at_encode():
    with pytest.raises(wire.WireError, match="not sendable"):
        wire.encode({"x": torch.zeros(2, dtype=torch.float64)})


@pytest.mark.parametrize("mutate,status", [
    (lambda b: b[:10], 400),                          # shorter than its header
    (lambda b: b"XXXX" + b[4:], 400),                  # bad magic
    (lambda b: b[:4] + struct.pack("<I", 1 << 30) + b[8:], 400),  # header length beyond limit
    (lambda b: b + b"\0", 400),                        # trailing bytes
])
def test_damaged_frames_are_refused(mutate, status):
    body = wire.encode({"x": torch.randn(4, 4)})
    with pytest.raises(wire.WireError) as err:
        wire.decode(bytearray(mutate(body)))
    assert type(err.value) is wire.WireError and status_of(err.value) == status


def test_size_cap_is_413():
    with pytest.raises(wire.WireError) as err:
        wire.decode(bytearray(wire.encode({"x": torch.randn(1024)})), max_bytes=1000)
    assert isinstance(err.value, wire.FrameTooLarge) and status_of(err.value) == 413


def test_expect_checks_names_dtypes_shapes():
    bundle = wire.decode(bytearray(wire.encode({"x": torch.randn(2, 3)})))
    wire.expect(bundle, {"x": (wire.FLOATS, (None, 3))})
    with pytest.raises(wire.WireError, match="shape"):
        wire.expect(bundle, {"x": (wire.FLOATS, (None, 4))})
    with pytest.raises(wire.WireError, match="dtype"):
        wire.expect(bundle, {"x": (torch.int64, None)})
    with pytest.raises(wire.WireError, match="missing"):
        wire.expect(bundle, {"x": (wire.FLOATS, None), "y": (torch.int64, None)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bad", [[float("nan")], [float("inf")], [-float("inf")], [float("inf"), -float("inf")]])
def test_any_nan_or_inf_is_refused_and_huge_finite_values_are_not(dtype, bad):
    """The finite check sums first (fast); a sum that overflows must not refuse finite values."""
    x = torch.randn(1000).to(dtype)
    x[[17, 901][:len(bad)]] = torch.tensor(bad, dtype=dtype)
    with pytest.raises(wire.NonFinite, match="NaN or Inf") as err:
        wire.decode(bytearray(wire.encode({"x": x})))
    assert status_of(err.value) == 422
    huge = torch.full((1000,), torch.finfo(dtype).max, dtype=dtype)  # its sum overflows; every value is finite
    assert torch.equal(wire.decode(bytearray(wire.encode({"x": huge}))).tensors["x"], huge)


def test_decoding_read_only_bytes_gives_tensors_that_do_not_alias_them():
    import warnings

    t = torch.arange(6, dtype=torch.float32)
    body = bytes(wire.encode({"t": t}, {}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when a tensor aliases a non-writable buffer
        got = wire.decode(body).tensors["t"]
    got.add_(1)
    assert bytes(body) == bytes(wire.encode({"t": t}, {}))  # the immutable body is untouched
    shared = bytearray(body)
    wire.decode(shared).tensors["t"].add_(1)
    assert shared != body  # a bytearray body is used in place (no copy on the hot path)
