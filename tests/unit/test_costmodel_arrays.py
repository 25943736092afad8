"""The cost model and the policies over arrays: single cells, blocks of devices, a problem's arrays.

A plan reads the cost model at its chosen cells only (`cell_costs`), not from the whole matrices
(`cost_matrices`); the policies go through the fleet in blocks of devices with only their own power
modes' columns (`optimiser.blocks`); a `Problem`'s `arrays()` are what every policy decides over.
Each is held against the other way on random fleets: equal to the bit, not merely close."""

from __future__ import annotations

import numpy as np
import pytest

from ares.core import optimiser
from ares.core.costmodel import (Column, Costs, DeviceInput, ModelCosts, Option, PowerMode, Problem, cell_costs,
                                 cost_matrices, other_modes)
from ares.core.energy import PowerModel, power_model
from ares.core.optimiser import AresPolicy, StragglerPolicy
from ares.core.profiles import PUBLISHED, ComputeProfile, ServerProfile


def random_problem(seed: int, n: int = 40, n_splits: int = 5) -> Problem:
    """Devices with and without power modes, pins, a current column, their own codecs, half duplex,
    latency, step and session overheads; options with one and with several micro-batches."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(10**4, 10**6, size=n_splits - 1).tolist()
    weights = tuple(np.sort(rng.integers(0, 10**6, n_splits)).tolist())
    byte_counts = [ModelCosts(tuple(v // c for v in sizes) + (0,), tuple(v // c for v in sizes) + (0,), weights)
                   for c in (1, 2)]
    options = (Option("fp32", 1, byte_counts[0]), Option("fp32", 4, byte_counts[0]), Option("fp16", 1, byte_counts[1]),
               Option("fp16", 2, byte_counts[1]))
    server = ServerProfile(tuple(np.append(rng.uniform(0, 0.2, n_splits - 1), 0)),
                           tuple(np.append(rng.uniform(0, 0.2, n_splits - 1), 0)))
    devices = []
    for i in range(n):
        fwd, bwd = np.cumsum(rng.uniform(0, 2, n_splits)), rng.uniform(0, 2, n_splits)
        n_modes = int(rng.integers(1, 4))
        profiles = [ComputeProfile(tuple(fwd * f), tuple(bwd * f), power_mode=f"m{j}")
                    for j, f in enumerate([1.0, *rng.uniform(1.0, 3.0, n_modes - 1)])]
        modes = tuple(PowerMode(f"m{j}", profiles[j], PowerModel(*rng.uniform(0.5, 8, 3).tolist()))
                      for j in range(1, n_modes))
        devices.append(DeviceInput(
            f"d{i}", profiles[0], float(rng.uniform(1e5, 1e7)), float(rng.uniform(1e5, 1e7)),
            PowerModel(*rng.uniform(0.5, 8, 3).tolist()), int(rng.integers(1, 50)), modes=modes,
            alpha=float(rng.uniform(0, 1)) if rng.integers(0, 3) == 0 else None,
            pinned_split=int(rng.integers(0, n_splits)) if rng.integers(0, 6) == 0 else None,
            pinned_mode=f"m{int(rng.integers(0, n_modes))}" if rng.integers(0, 6) == 0 else None,
            duplex="half" if rng.integers(0, 3) == 0 else "full", latency_s=float(rng.uniform(0, 0.02)),
            step_overhead_s=float(rng.uniform(0, 0.05)), session_overhead_s=float(rng.uniform(0, 1)),
            codecs=("fp32",) if rng.integers(0, 5) == 0 else None,
            current=Column(int(rng.integers(0, 4)), int(rng.integers(0, n_splits - 1))) if rng.integers(0, 2) else None,
            switch_s=float(rng.uniform(0, 2))))
    return Problem(tuple(devices), server, byte_counts[0], options=options)


@pytest.mark.parametrize("seed", range(4))
def test_the_cost_model_at_single_cells_is_the_whole_matrices_to_the_bit(seed):
    p = random_problem(seed).arrays()
    n, c = len(p.names), p.n_columns
    rows, cols = np.repeat(np.arange(n), c), np.tile(np.arange(c), n)
    for share in (1.0, 7.0):
        whole, cells = cost_matrices(p.x, share), cell_costs(p.x, rows, cols, share)
        for field in Costs.FIELDS:
            assert np.array_equal(getattr(whole, field).ravel(), cells[field]), field
            assert np.array_equal(whole.pick(field, rows, cols), cells[field]), field


@pytest.mark.parametrize("seed", range(4))
def test_deciding_block_by_block_gives_the_plan_of_one_block(seed, monkeypatch):
    """Blocks of a few devices, each with only its own modes' columns, against one block of all."""
    problem = random_problem(100 + seed, n=60)
    policies = (StragglerPolicy(), StragglerPolicy(0.4), AresPolicy(0.5), AresPolicy(0.0))
    whole = [policy.decide(problem) for policy in policies]
    monkeypatch.setattr(optimiser, "BLOCK_CELLS", 50)  # 1 to 2 devices a block
    assert len(optimiser.blocks(problem.arrays())) > 9
    assert [policy.decide(problem) for policy in policies] == whole
    assert len({d.power_mode for d in whole[0].devices}) > 2 and len({d.split for d in whole[0].devices}) > 2


def test_a_problems_arrays_hold_its_devices_choices_and_pins():
    from ares.core.models import activation_numel, weight_bytes
    from ares.core.costmodel import options_for

    nano = PUBLISHED["jetson-nano/MAXN"]
    options = options_for(activation_numel("vgg5"), weight_bytes("vgg5"), 100, ("fp32", "int8"))
    devices = (DeviceInput("pinned", nano, 1e6, 1e6, power_model("jetson-nano", "MAXN"), 10, pinned_split=1,
                           alpha=0.3, modes=other_modes(nano), pinned_mode="custom1", codecs=("fp32",)),
               DeviceInput("free", PUBLISHED["raspberry-pi"], 1e6, 1e6, power_model("raspberry-pi", ""), 10,
                           current=Column(1, 1)))
    p = Problem(devices, ServerProfile.from_cumulative(nano.scaled(0.1)), options[0].model, options=options).arrays()
    assert p.n_modes == 4 and p.mode_counts.tolist() == [4, 1] and p.n_columns == 4 * 2 * 7
    assert p.pinned_split.tolist() == [1, -1] and p.pinned_mode.tolist() == [2, -1]  # MAXN, 5W, custom1, custom3
    assert p.current.tolist() == [-1, Column(1, 1).flat(7, 2)] and np.isnan(p.alpha[1]) and p.alpha[0] == 0.3
    valid = p.valid.reshape(2, 4, 2, 7)  # device, mode, option, split
    assert not valid[0, :, 1].any()  # the pinned one takes fp32 only
    assert valid[1, 0, 1].tolist() == [True] * 6 + [False]  # int8 at every split but the last (nothing travels)
    assert not valid[1, 1:].any()  # a Pi has one mode
    assert np.argwhere(p.allowed().reshape(2, 4, 2, 7)[0]).tolist() == [[2, 0, 1]]  # custom1, fp32, split 1
    assert [p.labels[i] for i in p.mode_labels[0].tolist()] == [  # (mode, its profile's source, its power's)
        ("MAXN", "published", "modelled"), ("5W", "derived", "modelled"), ("custom1", "derived", "modelled"),
        ("custom3", "derived", "modelled")]
