"""Federated averaging of whole models, weighted by the samples each device trained on, and
the robust alternatives a job may choose: norm clipping, coordinate-wise median, trimmed mean.

A weighted mean (`fedavg`, and `norm_clip`, which clips each update and then takes it) is
folded in one state at a time (`RunningMean`): the server keeps a float64 running sum of
weight x state and the total weight, O(model) memory whatever the number of devices, and drops
each upload as soon as it is folded. Two running sums add up (`RunningMean.add_sum`), which is
how a job's server shards merge. The median and the trimmed mean need every upload at once
(`Buffered`), so they keep buffering and cannot be split over shards (`STREAMING`).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Union

import torch

# The methods whose merge is a weighted mean: folded as uploads come, and split over shards.
STREAMING = ("fedavg", "norm_clip")
METHODS = ("fedavg", "norm_clip", "median", "trimmed_mean")


class RunningMean:
    """A weighted mean folded in one state at a time: float tensors as a float64 sum of weight x
    state, integer buffers (BatchNorm's step counters) as their running max, and the total
    weight. `like` gives the keys, shapes and dtypes of the result; with `clip_norm`, each state's
    update is first clipped to that norm against `like` (the round's global model: `norm_clip`)."""

    def __init__(self, like: Mapping[str, torch.Tensor], clip_norm: Optional[float] = None):
        self.like = like
        self.clip_norm = clip_norm
        self.sums = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in like.items() if v.is_floating_point()}
        self.maxes: dict[str, torch.Tensor] = {}  # integer tensors: filled by the first state
        self.weight = 0.0
        self.count = 0

    def _check(self, state: Mapping[str, torch.Tensor]) -> None:
        if state.keys() != self.like.keys():
            missing, extra = sorted(self.like.keys() - state.keys())[:5], sorted(state.keys() - self.like.keys())[:5]
            raise ValueError(f"a state with different keys from the model's: missing {missing}, unexpected {extra}")
        for key, want in self.like.items():
            if tuple(state[key].shape) != tuple(want.shape):
                raise ValueError(f"{key} has shape {list(state[key].shape)}, expected {list(want.shape)}")

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold in one state with its weight (finite, >= 0); the state itself is not kept."""
        weight = float(weight)
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"a weight must be finite and >= 0, not {weight}")
        self._check(state)
        if self.clip_norm is not None:
            state = clip_update(state, self.like, self.clip_norm)
        for key, acc in self.sums.items():
            acc.add_(state[key].to(torch.float64), alpha=weight)
        self._max(state)
        self.weight += weight
        self.count += 1

    def add_sum(self, sums: Mapping[str, torch.Tensor], maxes: Mapping[str, torch.Tensor], weight: float,
                count: int) -> None:
        """Fold in another running mean's sums (float64 weight x state), integer maxes, total weight
        and count: a shard's part of the round."""
        weight = float(weight)
        if not math.isfinite(weight) or weight < 0 or count < 0:
            raise ValueError(f"a partial sum needs a finite weight >= 0 and a count >= 0, not {weight}, {count}")
        if count == 0:
            return
        if sums.keys() != self.sums.keys() or maxes.keys() != {k for k in self.like if k not in self.sums}:
            raise ValueError("a partial sum with different keys from the model's")
        for key, acc in self.sums.items():
            acc.add_(sums[key].to(torch.float64))
        self._max(maxes)
        self.weight += weight
        self.count += count

    def _max(self, state: Mapping[str, torch.Tensor]) -> None:
        for key, want in self.like.items():
            if key in self.sums:
                continue
            value = state[key].to(want.dtype)
            seen = self.maxes.get(key)
            self.maxes[key] = value.clone() if seen is None else torch.maximum(seen, value)

    def mean(self) -> dict[str, torch.Tensor]:
        """The float tensors' weighted mean, in float64 (what a shard sends its root)."""
        if self.weight <= 0:
            raise ValueError("fedavg weights must sum to a positive number")
        return {k: acc / self.weight for k, acc in self.sums.items()}

    def result(self) -> dict[str, torch.Tensor]:
        """The merged model, in the keys' order and dtypes of `like`."""
        if not self.count:
            raise ValueError("fedavg needs at least one state")
        mean = self.mean()
        return {k: mean[k].to(v.dtype) if k in mean else self.maxes[k].clone() for k, v in self.like.items()}


class Buffered:
    """A merge that needs every state at once (median, trimmed mean): keeps them, as the running
    mean's interface does not (one per device in memory until the round closes)."""

    def __init__(self, method: str, reference: Mapping[str, torch.Tensor], clip_norm: float = 10.0,
                 trim_fraction: float = 0.2):
        self.method, self.reference = method, reference
        self.clip_norm, self.trim_fraction = clip_norm, trim_fraction
        self.states: list[dict[str, torch.Tensor]] = []
        self.weights: list[float] = []

    @property
    def count(self) -> int:
        return len(self.states)

    @property
    def weight(self) -> float:
        return float(sum(self.weights))

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        self.states.append({k: v.detach().clone() for k, v in state.items()})
        self.weights.append(float(weight))

    def result(self) -> dict[str, torch.Tensor]:
        return aggregate(self.method, self.states, self.weights, self.reference, clip_norm=self.clip_norm,
                         trim_fraction=self.trim_fraction)


Merge = Union[RunningMean, Buffered]


def merger(method: str, reference: Mapping[str, torch.Tensor], clip_norm: float = 10.0,
           trim_fraction: float = 0.2) -> Merge:
    """An empty merge for one round of `method` (`AggregationConfig.method`) against the round's
    global model: a running mean for the weighted means, a buffer for the others."""
    if method not in METHODS:
        raise ValueError(f"unknown aggregation {method!r}; accepted: {', '.join(METHODS)}")
    if method in STREAMING:
        return RunningMean(reference, clip_norm if method == "norm_clip" else None)
    return Buffered(method, reference, clip_norm, trim_fraction)


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Weighted mean of float tensors; integer buffers (BatchNorm's step counters) take the max.
    The running mean's sum, in the order given: a server folding the same states in the same
    order gets the same bits."""
    if not states or len(states) != len(weights):
        raise ValueError("fedavg needs one weight per state and at least one state")
    total = float(sum(weights))
    if not math.isfinite(total) or total <= 0:
        raise ValueError("fedavg weights must sum to a positive number")
    mean = RunningMean(states[0])
    for i, (s, w) in enumerate(zip(states, weights)):
        if s.keys() != states[0].keys():
            raise ValueError(f"state {i} has different keys from state 0")
        mean.add(s, w)
    return mean.result()


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
    raise ValueError(f"unknown aggregation {method!r}; accepted: {', '.join(METHODS)}")
