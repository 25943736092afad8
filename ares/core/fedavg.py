"""Federated averaging of whole models, weighted by the samples each device trained on."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Weighted mean of float tensors; integer buffers (BatchNorm's step counters) take the max."""
    if not states or len(states) != len(weights):
        raise ValueError("fedavg needs one weight per state and at least one state")
    total = float(sum(weights))
    if total <= 0:
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
