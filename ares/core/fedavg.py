"""Federated averaging of whole models, weighted by the samples each device trained on, and
the robust alternatives a job may choose: norm clipping, coordinate-wise median, trimmed mean."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Weighted mean of float tensors; integer buffers (BatchNorm's step counters) take the max."""
    if not states or len(states) != len(weights):
        raise ValueError("fedavg needs one weight per state and at least one state")
    total = float(sum(weights))
    if not math.isfinite(total) or total <= 0:
        raise ValueError("fedavg weights must sum to a positive number")
    keys = list(states[0].keys())
    for i, s in enumerate(states[1:], 1):
        if list(s.keys()) != keys:
            raise ValueError(f"state {i} has different keys from state 0")
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        tensors = [s[key] for s in states]
        if tensors[0].is_floating_point():
            acc = torch.zeros_like(tensors[0], dtype=torch.float64)
            for t, w in zip(tensors, weights):
                acc += t.to(torch.float64) * (w / total)
            out[key] = acc.to(tensors[0].dtype)
        else:
            out[key] = torch.stack([t for t in tensors]).max(dim=0).values.clone()
    return out


def update_norm(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """L2 distance between two models over their float tensors (computed in float64)."""
    total = 0.0
    for key, ref in reference.items():
        if ref.is_floating_point():
            total += float((state[key].to(torch.float64) - ref.to(torch.float64)).square().sum())
    return math.sqrt(total)


def clip_update(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                max_norm: float) -> dict[str, torch.Tensor]:
    """Scale the update (state - reference) down to `max_norm` when it is longer; integers kept."""
    norm = update_norm(state, reference)
    if norm <= max_norm:
        return dict(state)
    scale = max_norm / norm
    return {k: (ref + (state[k].to(torch.float64) - ref.to(torch.float64)) * scale).to(ref.dtype)
            if ref.is_floating_point() else state[k] for k, ref in reference.items()}


def coordinate_median(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Coordinate-wise median (the lower one for an even count); integer buffers take the max."""
    return _coordinatewise(states, lambda stacked: stacked.median(dim=0).values)


def trimmed_mean(states: Sequence[Mapping[str, torch.Tensor]], fraction: float) -> dict[str, torch.Tensor]:
    """Coordinate-wise mean after dropping the floor(fraction * n) largest and smallest values."""
    if not 0 <= fraction < 0.5:
        raise ValueError(f"trim fraction must lie in [0, 0.5), got {fraction}")
    n = len(states)
    cut = int(fraction * n)

    def reduce(stacked: torch.Tensor) -> torch.Tensor:
        total = stacked.sum(dim=0, dtype=torch.float64)
        if cut:  # the cut largest and smallest per coordinate, without sorting all n
            total -= stacked.topk(cut, dim=0).values.sum(dim=0, dtype=torch.float64)
            total -= stacked.topk(cut, dim=0, largest=False).values.sum(dim=0, dtype=torch.float64)
        return total / (n - 2 * cut)

    return _coordinatewise(states, reduce)


def _coordinatewise(states: Sequence[Mapping[str, torch.Tensor]], reduce) -> dict[str, torch.Tensor]:
    if not states:
        raise ValueError("aggregation needs at least one state")
    keys = list(states[0].keys())
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        stacked = torch.stack([s[key] for s in states])
        if stacked.is_floating_point():  # in the tensors' own dtype: a median picks a value
            out[key] = reduce(stacked).to(states[0][key].dtype)
        else:
            out[key] = stacked.max(dim=0).values.clone()
    return out


def aggregate(method: str, states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
              reference: Mapping[str, torch.Tensor], clip_norm: float = 10.0,
              trim_fraction: float = 0.2) -> dict[str, torch.Tensor]:
    """One entry point for every aggregation a job may choose (`AggregationConfig.method`)."""
    if method == "fedavg":
        return fedavg(states, weights)
    if method == "norm_clip":
        return fedavg([clip_update(s, reference, clip_norm) for s in states], weights)
    if method == "median":
        return coordinate_median(states)
    if method == "trimmed_mean":
        return trimmed_mean(states, trim_fraction)
    raise ValueError(f"unknown aggregation {method!r}; accepted: fedavg, norm_clip, median, trimmed_mean")
