"""How activations and gradients are packed for the wire: fp32, fp16 or 8 bits.

A codec turns one float tensor into the wire tensors that carry it and back. `fp32` sends the
tensor as it is, `fp16` halves it (relative error ~1e-3), `int8` quarters it:

    int8   q = clamp(round(x / scale), -127, 127) as int8, plus `<name>.scale` (float32)
           scale = max|x| / 127 per channel (dim 1 of a rank >= 2 tensor; per tensor otherwise)

Activations are rounded to nearest. Gradients are rounded stochastically (floor(v + u), u
uniform in [0, 1)): unbiased, so the error averages out over the steps of a round instead of
adding up as a bias. Error feedback (carrying the residual into the next step) is not used:
with stochastic rounding the measured effect on accuracy was within noise (README).

`unpack` validates what arrived before using it: the right companion tensors, a scale of the
right shape that is finite and >= 0. Errors are `wire.Unacceptable`.
"""

from __future__ import annotations

from typing import Literal, Mapping, Optional

import torch

from ares.core.wire import Unacceptable

Codec = Literal["fp32", "fp16", "int8"]
CODECS: tuple[str, ...] = ("fp32", "fp16", "int8")
QMAX = 127
SCALE_SUFFIX = ".scale"


def check(codec: str) -> str:
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; accepted: {', '.join(CODECS)}")
    return codec


def _channel_view(t: torch.Tensor) -> tuple[int, ...]:
    """Shape a per-channel scale broadcasts with: (1, C, 1, ...) for rank >= 2, () otherwise."""
    if t.dim() >= 2:
        return (1, t.shape[1]) + (1,) * (t.dim() - 2)
    return ()


def _absmax(t: torch.Tensor) -> torch.Tensor:
    if t.dim() >= 2:
        return t.abs().transpose(0, 1).reshape(t.shape[1], -1).amax(dim=1) if t.numel() else torch.zeros(t.shape[1])
    return t.abs().amax() if t.numel() else torch.zeros(())


def quantise(t: torch.Tensor, stochastic: bool = False,
             generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scale per channel). Zero channels get scale 0 and values 0."""
    t = t.detach().float()
    scale = _absmax(t) / QMAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).reshape(_channel_view(t))
    v = t / safe
    if stochastic:
        v = torch.floor(v + torch.rand(v.shape, generator=generator, device=v.device))
    else:
        v = torch.round(v)
    return v.clamp_(-QMAX, QMAX).to(torch.int8), scale.float()


def dequantise(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float().reshape(_channel_view(q))


def pack(name: str, t: torch.Tensor, codec: str, stochastic: bool = False,
         generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
    """The wire tensors carrying `t` under `codec` (gradients: `stochastic=True`)."""
    t = t.detach().cpu()
    if check(codec) == "fp32":
        return {name: t.float()}
    if codec == "fp16":
        return {name: t.to(torch.float16)}
    q, scale = quantise(t, stochastic, generator)
    return {name: q, name + SCALE_SUFFIX: scale}


def codec_of(tensors: Mapping[str, torch.Tensor], name: str) -> str:
    """Which codec a received tensor travelled in (so a reply can use the same one)."""
    t = tensors.get(name)
    if t is None:
        raise Unacceptable(f"missing tensor {name!r}")
    return {torch.float32: "fp32", torch.float16: "fp16", torch.int8: "int8"}.get(t.dtype, "fp32")


def names(tensors: Mapping[str, torch.Tensor], name: str) -> set[str]:
    """The names `name` occupies in a bundle (itself, plus its scale when it is int8)."""
    return {name, name + SCALE_SUFFIX} if codec_of(tensors, name) == "int8" else {name}


def unpack(tensors: Mapping[str, torch.Tensor], name: str, shape: Optional[tuple[int | None, ...]] = None) -> torch.Tensor:
    """The float32 tensor `name` from its wire tensors, after checking they fit together."""
    t = tensors.get(name)
    if t is None:
        raise Unacceptable(f"missing tensor {name!r}")
    if t.dtype not in (torch.float32, torch.float16, torch.int8):
        raise Unacceptable(f"tensor {name!r} has dtype {t.dtype}; expected float32, float16 or int8")
    if shape is not None and (t.dim() != len(shape) or any(w is not None and w != g for w, g in zip(shape, t.shape))):
        want = ["*" if w is None else w for w in shape]
        raise Unacceptable(f"tensor {name!r} has shape {list(t.shape)}, expected {want}")
    if t.dtype != torch.int8:
        if name + SCALE_SUFFIX in tensors:
            raise Unacceptable(f"tensor {name + SCALE_SUFFIX!r} sent with a {t.dtype} {name!r} (only int8 has a scale)")
        return t.float()
    scale = tensors.get(name + SCALE_SUFFIX)
    if scale is None:
        raise Unacceptable(f"int8 tensor {name!r} arrived without {name + SCALE_SUFFIX!r}")
    want = (t.shape[1],) if t.dim() >= 2 else ()
    if scale.dtype != torch.float32 or tuple(scale.shape) != want:
        raise Unacceptable(f"{name + SCALE_SUFFIX!r} must be float32 of shape {list(want)}, "
                           f"got {scale.dtype} {list(scale.shape)}")
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise Unacceptable(f"{name + SCALE_SUFFIX!r} must be finite and >= 0")
    if t.numel() and int(t.min()) < -QMAX:
        raise Unacceptable(f"int8 tensor {name!r} holds -128 (values lie in -{QMAX}..{QMAX})")
    return dequantise(t, scale)

