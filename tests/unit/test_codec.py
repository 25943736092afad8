"""The wire codecs: what each one costs in error, measured, and what the decoder refuses."""

from __future__ import annotations

import pytest
import torch

from ares.core import codec, wire
from ares.runtime.server import status_of


def _activation(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # ReLU-like activations with very different channel ranges: the case per-channel scales are for
    return torch.relu(torch.randn((20, 32, 16, 16), generator=g)) * torch.logspace(-2, 1, 32).reshape(1, 32, 1, 1)


def _round_trip(t: torch.Tensor, name: str, stochastic: bool = False, gen=None) -> torch.Tensor:
    packed = codec.pack(name, t, "int8", stochastic, gen)
    assert codec.codec_of(packed, name) == "int8"
    bundle = wire.decode(wire.encode(packed))  # through the real byte format
    return codec.unpack(bundle.tensors, name, tuple(t.shape))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name,bound", [("fp32", 0.0), ("fp16", 1e-3), ("int8", 1e-2)])
def test_activation_error_per_codec(name: str, bound: float):
    x = _activation()
    packed = codec.pack("x", x, name)
    got = codec.unpack(wire.decode(wire.encode(packed)).tensors, "x", tuple(x.shape))
    err = rel_err(got, x)
    assert err <= bound, f"{name}: relative error {err:.2e} > {bound}"
    if name == "int8":
        assert err > 0  # it really quantises
        assert sum(t.numel() * t.element_size() for t in packed.values()) < x.numel() * 4 / 3.9


def test_per_channel_scale_beats_per_tensor_on_uneven_channels():
    x = _activation()
    per_channel = rel_err(_round_trip(x, "x"), x)
    q, scale = codec.quantise(x.reshape(-1))  # rank 1: one scale for the whole tensor
    per_tensor = rel_err(codec.dequantise(q, scale).reshape(x.shape), x)
    # channel-wise relative error: small channels vanish under one shared scale
    small = slice(0, 4)
    pc_small = rel_err(_round_trip(x, "x")[:, small], x[:, small])
    pt_small = rel_err(codec.dequantise(q, scale).reshape(x.shape)[:, small], x[:, small])
    assert per_channel <= per_tensor and pc_small < 0.02 < pt_small


def test_stochastic_rounding_is_unbiased_and_nearest_is_not():
    g = torch.Generator().manual_seed(1)
    grad = 0.3 * torch.linspace(0.1, 1, 8).repeat(4, 1)  # values between the quantisation steps
    grad[0] = 1.0  # sets every channel's scale to 1/127: the others lie between two steps
    mean = sum(_round_trip(grad, "grad", True, g) for _ in range(400)) / 400
    nearest = _round_trip(grad, "grad")
    assert rel_err(mean, grad) < 0.01
    assert rel_err(mean, grad) < rel_err(nearest, grad) / 3 or rel_err(nearest, grad) < 1e-3


def test_zero_and_empty_tensors():
    z = torch.zeros(3, 4, 2)
    assert torch.equal(_round_trip(z, "x"), z)
    e = torch.zeros(0, 4)
    assert _round_trip(e, "x").shape == (0, 4)


@pytest.mark.parametrize("tensors,message", [
    ({"x": torch.zeros(2, 3, dtype=torch.int8)}, "without 'x.scale'"),
    ({"x": torch.zeros(2, 3, dtype=torch.int8), "x.scale": torch.zeros(4)}, "shape [3]"),
    ({"x": torch.zeros(2, 3, dtype=torch.int8), "x.scale": torch.zeros(3, dtype=torch.float16)}, "float32"),
    ({"x": torch.zeros(2, 3, dtype=torch.int8), "x.scale": torch.tensor([1.0, -1.0, 0.0])}, ">= 0"),
    ({"x": torch.full((2, 3), -128, dtype=torch.int8), "x.scale": torch.ones(3)}, "-128"),
    ({"x": torch.zeros(2, 3), "x.scale": torch.ones(3)}, "only int8 has a scale"),
    ({"x": torch.zeros(2, 3, dtype=torch.int64)}, "expected float32, float16 or int8"),
    ({}, "missing tensor 'x'"),
], ids=["no-scale", "scale-shape", "scale-dtype", "negative-scale", "minus-128", "scale-on-float", "int64", "missing"])
def test_unpack_refuses(tensors, message):
    with pytest.raises(wire.Unacceptable, match=message.replace("[", r"\[").replace("]", r"\]")) as exc:
        codec.unpack(tensors, "x")
    assert status_of(exc.value) == 422


def test_unknown_codec_lists_the_accepted_ones():
    with pytest.raises(ValueError, match="fp32, fp16, int8"):
        codec.pack("x", torch.zeros(2), "int4")
