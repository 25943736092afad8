"""Measure how long each layer takes, forward and backward, and keep it current.

Measuring is kept apart from deciding (as in torchgpipe's balance/profile.py): this module
returns plain numbers in the optimiser's ComputeProfile/ServerProfile types. Layers are timed
on a deep copy so the real model's weights and BatchNorm statistics are untouched, and the
accelerator is synchronised before every clock read.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from ares.core.models import LayerStack
from ares.core.profiles import ComputeProfile, ServerProfile


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class LayerTimes:
    """Seconds per batch for each layer, forward and backward (median of repeats)."""

    fwd: tuple[float, ...]
    bwd: tuple[float, ...]
    batch_size: int


def time_layers(model: LayerStack, input_shape: tuple[int, ...], batch_size: int,
                device: torch.device | str = "cpu", repeats: int = 3) -> LayerTimes:
    device = torch.device(device)
    sandbox = copy.deepcopy(model).to(device).train()
    fwd: list[list[float]] = [[] for _ in sandbox.indices]
    bwd: list[list[float]] = [[] for _ in sandbox.indices]
    for _ in range(repeats + 1):  # the first pass warms up allocators and kernels
        x = torch.randn((batch_size, *input_shape), device=device)
        for j, i in enumerate(sandbox.indices):
            layer = sandbox.layers[str(i)]
            x = x.detach().requires_grad_(True)
            _sync(device)
            t0 = time.perf_counter()
            y = layer(x)
            _sync(device)
            t1 = time.perf_counter()
            y.backward(torch.ones_like(y))
            _sync(device)
            t2 = time.perf_counter()
            fwd[j].append(t1 - t0)
            bwd[j].append(t2 - t1)
            x = y
    median = lambda xs: sorted(xs[1:])[len(xs[1:]) // 2]  # noqa: E731 - drop the warm-up
    return LayerTimes(tuple(median(f) for f in fwd), tuple(median(b) for b in bwd), batch_size)


def _prefix(xs: tuple[float, ...]) -> tuple[float, ...]:
    out, total = [], 0.0
    for x in xs:
        total += x
        out.append(total)
    return tuple(out)


def _suffix_after(xs: tuple[float, ...]) -> tuple[float, ...]:
    """Entry s is the sum over layers s+1..L-1 (what the server runs at split s)."""
    return tuple(sum(xs[s + 1:]) for s in range(len(xs)))


def device_profile(times: LayerTimes, device_class: str = "cpu", power_mode: str = "") -> ComputeProfile:
    return ComputeProfile(fwd=_prefix(times.fwd), bwd=_prefix(times.bwd), batch_size=times.batch_size,
                          device_class=device_class, power_mode=power_mode, source="measured")


def server_profile(times: LayerTimes) -> ServerProfile:
    return ServerProfile(fwd=_suffix_after(times.fwd), bwd=_suffix_after(times.bwd), batch_size=times.batch_size)


class LiveScale:
    """Keeps a start-up profile current: live step times at the split in use rescale every split.

    A device that slows down (power mode, thermal throttling) shows it in its step times; the
    ratio of live to profiled time at the current split, smoothed, scales the whole profile.
    """

    def __init__(self, smoothing: float = 0.3):
        self.smoothing = smoothing
        self.factor = 1.0
        self.samples = 0

    def update(self, profiled_s: float, live_s: float) -> float:
        if profiled_s > 0 and live_s > 0:
            ratio = live_s / profiled_s
            self.factor = ratio if self.samples == 0 else (1 - self.smoothing) * self.factor + self.smoothing * ratio
            self.samples += 1
        return self.factor


class Throughput:
    """Smoothed bytes per second, averaged as seconds per byte.

    Averaging the inverse makes a link that just slowed down show at once (an EWMA of raw
    rates would keep a 100 MB/s history for many steps after a drop to 0.25 MB/s).
    """

    def __init__(self, smoothing: float = 0.3):
        self._inverse = Ewma(smoothing)

    @property
    def value(self) -> float | None:
        return 1.0 / self._inverse.value if self._inverse.value else None

    def update(self, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            self._inverse.update(seconds / nbytes)


class Ewma:
    """Exponentially weighted mean; None until the first sample."""

    def __init__(self, smoothing: float = 0.3):
        self.smoothing = smoothing
        self.value: float | None = None

    def update(self, sample: float) -> float:
        self.value = sample if self.value is None else (1 - self.smoothing) * self.value + self.smoothing * sample
        return self.value
