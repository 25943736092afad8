"""The optimiser against hand-computed cases and an exhaustive-search oracle.

The hand case (3 splits, batch of 1, numbers chosen to be easy to check on paper):
  model: up = down = (400, 100, 0) bytes per batch, weights (100, 200, 300) bytes
  server part per batch: (1.0, 0.5, 0) s
  A: device part (1, 2, 4) s, 200 B/s each way, power 2/1/1 W, 10 iterations
     iteration T = (6, 3.5, 4) s, E = (6, 5, 8) J; weights take (1, 2, 3) s and (1, 2, 3) J
     round R = (61, 37, 43) s, round energy = (61, 52, 83) J
  B: device part (0.1, 0.2, 0.4) s, 200 B/s, power 10/1/1 W, 10 iterations
     T = (5.1, 1.7, 0.4) s, E = (5, 3, 4) J; R = (52, 19, 7) s, round energy = (51, 32, 43) J
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ares.core.energy import PowerModel
from ares.core.costmodel import Column, DeviceInput, ModelCosts, Problem, evaluate, model_costs
from ares.core.optimiser import (
    AresPolicy, FixedPolicy, NonePolicy, StragglerPolicy, oracle_round_time, parse_policy, weighted_cost,
)
from ares.core.profiles import ComputeProfile, ServerProfile

MODEL = ModelCosts(up_bytes=(400, 100, 0), down_bytes=(400, 100, 0), weight_bytes=(100, 200, 300))
SERVER = ServerProfile(fwd=(0.5, 0.25, 0.0), bwd=(0.5, 0.25, 0.0), batch_size=1)


def device(name: str, halves: tuple[float, ...], bps: float, watts: tuple[float, float, float],
           iterations: int = 10, **kw) -> DeviceInput:
    return DeviceInput(name, ComputeProfile(fwd=halves, bwd=halves, batch_size=1), bps, bps,
                       PowerModel(*watts), iterations, **kw)


def dev_a(bps: float = 200.0, **kw) -> DeviceInput:
    return device("A", (0.5, 1.0, 2.0), bps, (2.0, 1.0, 1.0), **kw)


def dev_b(bps: float = 200.0, **kw) -> DeviceInput:
    return device("B", (0.05, 0.1, 0.2), bps, (10.0, 1.0, 1.0), **kw)


def problem(*devices: DeviceInput) -> Problem:
    return Problem(devices, SERVER, MODEL)


# ---- the cost model -----------------------------------------------------------------------------

def test_evaluate_matches_the_hand_computed_cost_model():
    plan = evaluate(problem(dev_a(), dev_b()), {"A": 1, "B": 0})
    a, b = plan.devices
    assert (a.device_s, a.server_s, a.up_s, a.down_s) == pytest.approx((2.0, 0.5, 0.5, 0.5))
    assert (a.iteration_s, a.round_s, a.energy_iteration_j, a.energy_round_j) == pytest.approx((3.5, 37, 5, 52))
    assert (b.iteration_s, b.round_s, b.energy_iteration_j, b.energy_round_j) == pytest.approx((5.1, 52, 5, 51))
    assert plan.round_s == pytest.approx(52)  # the slowest device
    assert plan.energy_round_j == pytest.approx(103)  # the sum


def test_a_session_overhead_adds_to_the_round_once_at_every_split_and_not_to_energy():
    base = problem(dev_a(), dev_b())
    charged = problem(dev_a(session_overhead_s=1.5), dev_b())
    for split in (0, 1, 2):
        a0, a1 = evaluate(base, {"A": split, "B": 0}).devices[0], evaluate(charged, {"A": split, "B": 0}).devices[0]
        assert a1.round_s == pytest.approx(a0.round_s + 1.5)
        assert (a1.iteration_s, a1.energy_round_j) == pytest.approx((a0.iteration_s, a0.energy_round_j))
    with pytest.raises(ValueError, match="session_overhead_s"):
        dev_a(session_overhead_s=-0.1)
    with pytest.raises(ValueError, match="session_overhead_s"):
        dev_a(session_overhead_s=math.inf)


@pytest.mark.parametrize("splits, error", [({"A": 1}, "missing"), ({"A": 1, "B": 1, "C": 0}, "unknown"),
                                           ({"A": 3, "B": 0}, "0..2")], ids=["missing", "unknown", "range"])
def test_evaluate_rejects_bad_assignments(splits, error):
    with pytest.raises(ValueError, match=error):
        evaluate(problem(dev_a(), dev_b()), splits)


def test_model_costs_count_true_bytes_for_vgg5():
    numel = [131072 // 4, 32768 // 4, 65536 // 4, 16384 // 4, 16384 // 4, 512 // 4]
    # Device-side params + buffers, fp32, BatchNorm's num_batches_tracked is one int64 (8 bytes):
    conv_bn = lambda cin, cout: (cin * cout * 9 + cout + 4 * cout) * 4 + 8  # noqa: E731
    layers = [conv_bn(3, 32), 0, conv_bn(32, 64), 0, conv_bn(64, 64), (4096 * 128 + 128) * 4, (128 * 10 + 10) * 4]
    weights = list(itertools.accumulate(layers))
    assert weights[-1] == (582346 + 2 * (32 + 64 + 64)) * 4 + 3 * 8  # 582k params + BN running stats
    costs = model_costs(numel + [10], weights, batch_size=100)
    assert costs.up_bytes[0] == 100 * (131072 + 8)  # 4 bytes per value, plus an int64 label per sample
    assert costs.down_bytes[0] == 100 * 131072
    assert costs.up_bytes[5] == 100 * (512 + 8)
    assert costs.up_bytes[6] == costs.down_bytes[6] == 0
    half = model_costs(numel, weights, batch_size=100, codec_bytes=2)
    assert half.up_bytes[5] == 100 * (256 + 8) and half.down_bytes[5] == 100 * 256


def test_model_costs_reject_a_wrong_number_of_layers():
    with pytest.raises(ValueError, match="needs 2 or 3"):
        model_costs([1], [1, 2, 3], batch_size=1)


def test_weighted_cost_normalises_each_row_by_its_l2_norm():
    t = np.array([[6.0, 3.5, 4.0]])
    e = np.array([[6.0, 5.0, 8.0]])
    # ||T|| = sqrt(64.25) = 8.0156, ||E|| = sqrt(125) = 11.1803
    assert weighted_cost(t, e, np.array([0.5]))[0] == pytest.approx([0.6426, 0.4419, 0.6073], abs=1e-4)
    assert weighted_cost(t, e, np.array([1.0]))[0] == pytest.approx([6 / 8.0156, 3.5 / 8.0156, 4 / 8.0156], abs=1e-4)
    assert weighted_cost(t, np.zeros((1, 3)), np.array([0.0]))[0] == pytest.approx([0, 0, 0])


# ---- policies on the hand case ------------------------------------------------------------------

def test_ares_best_split_flips_when_throughput_drops():
    assert AresPolicy(0.5).decide(problem(dev_a())).split_of("A") == 1  # costs 0.4419 vs 0.6426 / 0.6073
    # At 50 B/s: T = (18, 6.5, 4), E = (18, 8, 8): split 1 costs 0.3544, split 2 costs 0.2905.
    slow = AresPolicy(0.5).decide(problem(dev_a(bps=50.0)))
    assert slow.split_of("A") == 2
    assert (slow.devices[0].iteration_s, slow.devices[0].energy_iteration_j) == pytest.approx((4.0, 8.0))


def test_ares_decides_each_device_on_its_own_objective():
    plan = AresPolicy(0.5).decide(problem(dev_a(), dev_b()))
    # B: T = (5.1, 1.7, 0.4), E = (5, 3, 4) -> costs 0.8266, 0.3698, 0.3199: all on the device.
    assert plan.splits == {"A": 1, "B": 2}
    assert (plan.round_s, plan.energy_round_j) == pytest.approx((37, 52 + 43))


def test_straggler_spends_slack_on_energy_without_slowing_the_round():
    plan = StragglerPolicy().decide(problem(dev_a(), dev_b()))
    # Best round = max(min R_A, min R_B) = max(37, 7) = 37; B may take splits 1 (19 s) or 2 (7 s)
    # and split 1 uses less energy (32 J against 43 J).
    assert plan.splits == {"A": 1, "B": 1}
    assert (plan.round_s, plan.energy_round_j) == pytest.approx((37, 84))
    assert plan.energy_round_j < AresPolicy(0.5).decide(problem(dev_a(), dev_b())).energy_round_j


@pytest.mark.parametrize("policy", [AresPolicy(0.5), StragglerPolicy(), StragglerPolicy(share_server=True)],
                         ids=["ares", "straggler", "shared"])
def test_choose_gives_the_splits_of_decide_and_decide_predicts_like_evaluate(policy):
    p = problem(dev_a(), dev_b())
    plan = policy.decide(p)
    assert policy.choose(p).tolist() == [plan.split_of("A"), plan.split_of("B")]
    assert evaluate(p, plan.splits, share_server=plan.server_shared).devices == plan.devices
    assert policy.choose_columns(p) == [Column(0, plan.split_of("A")), Column(0, plan.split_of("B"))]


def test_a_column_is_an_option_and_a_split():
    """With several options a column names both; the choice, and what a device runs now, are columns."""
    from ares.core.costmodel import Option, column_of

    fp16 = ModelCosts(up_bytes=(200, 50, 0), down_bytes=(200, 50, 0), weight_bytes=(100, 200, 300))
    p = Problem((dev_a(),), SERVER, MODEL, options=(Option("fp32", 1, MODEL), Option("fp16", 1, fp16)))
    assert column_of(p, "fp16", 1, 2) == Column(1, 2) and column_of(p, "int8", 1, 2) is None
    assert Column(1, 2).flat(3) == 5 and Column.at(5, 3) == Column(1, 2)
    [col] = StragglerPolicy().choose_columns(p)
    plan = StragglerPolicy().decide(p)
    assert (p.options[col.option].codec, col.split) == (plan.devices[0].codec, plan.devices[0].split)
    # per-column step overheads: one row per option, one figure per split
    rows = ((0.0, 0.5, 0.0), (0.0, 0.25, 0.0))
    charged = Problem((dev_a(step_overheads=rows),), SERVER, MODEL, options=p.options)
    fp16_at_1 = evaluate(charged, {"A": 1}, options={"A": ("fp16", 1)}).devices[0].iteration_s
    assert fp16_at_1 == pytest.approx(evaluate(p, {"A": 1}, options={"A": ("fp16", 1)}).devices[0].iteration_s + 0.25)
    with pytest.raises(ValueError, match=r"one figure per option and split \(2 x 3\), got \[3\]"):
        Problem((dev_a(step_overheads=rows[:1]),), SERVER, MODEL, options=p.options)


def test_a_device_keeps_its_current_split_unless_another_is_clearly_better():
    """A move costs a round predicted from older figures: on a near-tie (within STAY_MARGIN) the
    device stays; a clear gain still moves it."""
    from ares.core.optimiser import STAY_MARGIN

    def costs(bps):  # AresPolicy(0.5)'s cost of each of A's splits
        plans = [evaluate(problem(dev_a(bps=bps)), {"A": s}).devices[0] for s in range(3)]
        return weighted_cost(np.array([[p.iteration_s for p in plans]]),
                             np.array([[p.energy_iteration_j for p in plans]]), np.array([0.5]))[0]

    near = next(b for b in np.arange(200.0, 40.0, -1.0)
                if (c := costs(b)).argmin() == 2 and c[1] <= c[2] * (1 + STAY_MARGIN))
    assert AresPolicy(0.5).decide(problem(dev_a(bps=near))).split_of("A") == 2  # fresh: the best
    assert AresPolicy(0.5).decide(problem(dev_a(bps=near, current=Column(0, 1)))).split_of("A") == 1  # a near-tie: it stays
    assert costs(50.0)[1] > costs(50.0)[2] * (1 + STAY_MARGIN)
    assert AresPolicy(0.5).decide(problem(dev_a(bps=50.0, current=Column(0, 1)))).split_of("A") == 2  # a clear gain: it moves
    with pytest.raises(ValueError, match=r"current column \(option 0, split 3\) is not one of the 1 x 3"):
        problem(dev_a(current=Column(0, 3)))
    with pytest.raises(ValueError, match=r"current column \(option 1, split 0\)"):
        problem(dev_a(current=Column(1, 0)))
    with pytest.raises(ValueError, match=r"must be a Column\(option, split\)"):
        dev_a(current=1)


def test_straggler_keeps_a_device_with_slack_where_it_is_but_never_gives_up_the_round():
    from ares.core.optimiser import STAY_MARGIN

    def b(watts, **kw):  # B with its compute power at `watts`: less of it makes local training cheaper
        return device("B", (0.05, 0.1, 0.2), 200.0, (watts, 1.0, 1.0), **kw)

    def energy(watts):
        return [evaluate(problem(dev_a(), b(watts)), {"A": 1, "B": s}).devices[1].energy_round_j for s in (1, 2)]

    watts = next(w for w in np.arange(10.0, 1.0, -0.1) if energy(w)[1] < energy(w)[0] <= energy(w)[1] * (1 + STAY_MARGIN))
    fresh = StragglerPolicy().decide(problem(dev_a(), b(watts)))
    staying = StragglerPolicy().decide(problem(dev_a(current=Column(0, 1)), b(watts, current=Column(0, 1))))
    assert (fresh.splits, staying.splits) == ({"A": 1, "B": 2}, {"A": 1, "B": 1})
    assert staying.round_s == fresh.round_s == pytest.approx(37)
    # a straggler's current split that is slower than the best round is left whatever it costs
    assert StragglerPolicy().decide(problem(dev_a(current=Column(0, 0)), b(watts))).split_of("A") == 1
    # and a clear energy gain moves a device with slack: B at 10 W spends 32 J at split 1, 43 J at 2
    assert StragglerPolicy().decide(problem(dev_a(), b(10.0, current=Column(0, 2)))).split_of("B") == 1


def test_straggler_with_full_time_weight_takes_the_fastest_allowed_split():
    assert StragglerPolicy(alpha=1.0).decide(problem(dev_a(), dev_b())).splits == {"A": 1, "B": 2}
    assert StragglerPolicy().decide(problem(dev_a(), dev_b(alpha=1.0))).splits == {"A": 1, "B": 2}


def test_straggler_choice_flips_when_throughput_drops():
    # At 50 B/s B's rounds are (175, 55, 16) s: only split 2 keeps the 37 s round.
    plan = StragglerPolicy().decide(problem(dev_a(), dev_b(bps=50.0)))
    assert plan.splits == {"A": 1, "B": 2}
    assert plan.round_s == pytest.approx(37)


def test_shared_server_keeps_extra_devices_off_the_server():
    p = problem(dev_a(), dev_b())
    # Both offloading share the server two ways: A's best round becomes 42 s (split 1) > 37 s.
    assert evaluate(p, {"A": 1, "B": 1}, share_server=True).round_s == pytest.approx(42)
    plan = StragglerPolicy(share_server=True).decide(p)
    assert plan.splits == {"A": 1, "B": 2}
    assert (plan.round_s, plan.energy_round_j) == pytest.approx((37, 52 + 43))
    assert plan.server_shared
    assert oracle_round_time(p, share_server=True) == pytest.approx(37)


def test_shared_server_lets_a_device_with_slack_offload():
    # A pinned on the device sets the round (43 s, 83 J). B alone on the server at split 1 takes
    # 19 s and 32 J against 43 J on the device; the old rule kept B on the device (126 J in all).
    p = problem(dev_a(pinned_split=2), dev_b())
    plan = StragglerPolicy(share_server=True).decide(p)
    assert plan.splits == {"A": 2, "B": 1}
    assert (plan.round_s, plan.energy_round_j) == pytest.approx((43, 83 + 32))


def test_transmit_power_is_charged_for_the_uplink_and_receive_power_for_the_downlink():
    up_heavy = ModelCosts(up_bytes=(400, 0), down_bytes=(100, 0), weight_bytes=(0, 0))
    server = ServerProfile(fwd=(0.0, 0.0), bwd=(0.0, 0.0), batch_size=1)
    d = DeviceInput("x", ComputeProfile((0.0, 0.0), (0.0, 0.0), batch_size=1), 100.0, 100.0,
                    PowerModel(0.0, 10.0, 1.0), iterations=1)
    # 4 s sending at 10 W, 1 s receiving at 1 W (swapped: 4 + 10 = 14 J)
    assert evaluate(Problem((d,), server, up_heavy), {"x": 0}).energy_round_j == pytest.approx(41.0)


@pytest.mark.parametrize("policy", [AresPolicy(0.5), StragglerPolicy(), StragglerPolicy(share_server=True),
                                    FixedPolicy(2), NonePolicy()], ids=lambda p: f"{p.name}")
def test_every_policy_respects_a_pinned_split(policy):
    plan = policy.decide(problem(dev_a(), dev_b(pinned_split=0)))
    assert plan.split_of("B") == 0


def test_straggler_plans_around_a_pinned_straggler():
    # B pinned at split 0 takes 52 s, so A may use any split up to 52 s: 1 (52 J) beats 2 (83 J).
    plan = StragglerPolicy().decide(problem(dev_a(), dev_b(pinned_split=0)))
    assert plan.splits == {"A": 1, "B": 0}
    assert plan.round_s == pytest.approx(52)


def test_baselines():
    p = problem(dev_a(), dev_b())
    assert NonePolicy().decide(p).splits == {"A": 2, "B": 2}
    assert NonePolicy().decide(p).round_s == pytest.approx(43)
    assert FixedPolicy(0).decide(p).splits == {"A": 0, "B": 0}
    with pytest.raises(ValueError, match=r"valid split points are 0\.\.2"):
        FixedPolicy(3).decide(p)


@pytest.mark.parametrize("text, expected", [
    ("ares", AresPolicy(0.5)), ("ARES", AresPolicy(0.5)), ("straggler", StragglerPolicy(0.0)),
    ("fixed:3", FixedPolicy(3)), ("none", NonePolicy())])
def test_parse_policy(text, expected):
    assert parse_policy(text) == expected


@pytest.mark.parametrize("text", ["ares", "none", "fixed:1"])
def test_share_server_is_refused_for_policies_that_would_ignore_it(text):
    with pytest.raises(ValueError, match="straggler policy only"):
        parse_policy(text, share_server=True)
    assert parse_policy(" Straggler ", share_server=True) == StragglerPolicy(0.0, True)


def test_parse_policy_alpha_and_errors():
    assert parse_policy("ares", alpha=0.2) == AresPolicy(0.2)
    assert parse_policy("straggler", alpha=0.7, share_server=True) == StragglerPolicy(0.7, True)
    with pytest.raises(ValueError, match="accepted: ares, straggler, fixed:N, none"):
        parse_policy("fastest")
    with pytest.raises(ValueError, match="accepted"):
        parse_policy("fixed:-1")
    with pytest.raises(ValueError, match="0..1"):
        parse_policy("ares", alpha=1.5)


@pytest.mark.parametrize("kw, error", [({"up_bps": 0.0}, "up_bps"), ({"iterations": -1}, "iterations"),
                                       ({"alpha": 2.0}, "alpha"), ({"up_bps": 1e-300}, "up_bps must be within"),
                                       ({"down_bps": 1e300}, "down_bps must be within"),
                                       ({"up_bps": math.inf}, "up_bps"), ({"down_bps": math.nan}, "down_bps")],
                         ids=["zero", "iterations", "alpha", "tiny", "huge", "inf", "nan"])
def test_device_input_validation(kw, error):
    base = dict(name="x", compute=ComputeProfile((1.0,) * 3, (1.0,) * 3), up_bps=1.0, down_bps=1.0,
                power=PowerModel(1, 1, 1), iterations=1)
    with pytest.raises(ValueError, match=error):
        DeviceInput(**{**base, **kw})


def test_weighted_cost_refuses_non_finite_values_and_survives_huge_finite_ones():
    with pytest.raises(ValueError, match="finite"):
        weighted_cost(np.array([[1.0, math.inf]]), np.array([[1.0, 2.0]]), np.array([0.5]))
    with pytest.raises(ValueError, match="finite"):
        weighted_cost(np.array([[1.0, 2.0]]), np.array([[math.nan, 2.0]]), np.array([0.5]))
    # an invalid column may hold anything: it is not ranked
    ok = weighted_cost(np.array([[1.0, math.inf]]), np.array([[1.0, 2.0]]), np.array([1.0]),
                       valid=np.array([[True, False]]))
    assert ok[0, 0] == pytest.approx(1.0)
    huge = weighted_cost(np.array([[1e300, 2e300]]), np.array([[1e-300, 3e-300]]), np.array([0.5]))
    assert np.isfinite(huge).all() and huge[0, 0] < huge[0, 1]


def test_a_cost_that_overflows_is_an_error_naming_the_device():
    slow = DeviceInput("slow", ComputeProfile((1e300,) * 3, (1e300,) * 3, batch_size=1), 200.0, 200.0,
                       PowerModel(1, 1, 1), iterations=10**9)
    for policy in (AresPolicy(0.5), StragglerPolicy(), StragglerPolicy(share_server=True), NonePolicy()):
        with pytest.raises(ValueError, match="device 'slow'.*not finite"):
            policy.decide(problem(dev_a(), slow))


def test_problem_validation():
    with pytest.raises(ValueError, match="unique"):
        problem(dev_a(), dev_a())
    with pytest.raises(ValueError, match="pinned split 5"):
        problem(dev_a(pinned_split=5))
    with pytest.raises(ValueError, match="batch"):
        Problem((dev_a(),), ServerProfile((1.0, 0.5, 0.0), (1.0, 0.5, 0.0), batch_size=100), MODEL)


# ---- properties against exhaustive search -------------------------------------------------------

@st.composite
def problems(draw, max_devices: int = 4, max_splits: int = 7, pins: bool = True) -> Problem:
    n_splits = draw(st.sampled_from(range(max_splits, 1, -1)))  # the largest cases first: they matter most
    times = st.lists(st.floats(0.001, 5.0), min_size=n_splits, max_size=n_splits)
    nbytes = st.lists(st.integers(0, 10**6), min_size=n_splits - 1, max_size=n_splits - 1)
    up = draw(nbytes)
    model = ModelCosts(tuple(up) + (0,), tuple(draw(nbytes)) + (0,),
                       tuple(draw(st.lists(st.integers(0, 10**7), min_size=n_splits, max_size=n_splits))))
    server = ServerProfile(tuple(draw(times)[:-1]) + (0.0,), tuple(draw(times)[:-1]) + (0.0,))
    devices = []
    for i in range(draw(st.sampled_from(range(max_devices, 0, -1)))):
        watts = st.floats(0.1, 10.0)
        devices.append(DeviceInput(
            f"d{i}", ComputeProfile(tuple(draw(times)), tuple(draw(times))),
            draw(st.floats(1e3, 1e7)), draw(st.floats(1e3, 1e7)), PowerModel(draw(watts), draw(watts), draw(watts)),
            draw(st.integers(0, 200)), alpha=draw(st.one_of(st.none(), st.floats(0.0, 1.0))),
            pinned_split=draw(st.integers(0, n_splits - 1)) if pins and draw(st.integers(0, 3)) == 0 else None))
    return Problem(tuple(devices), server, model)


def joint_vectors(p: Problem):
    choices = [[d.pinned_split] if d.pinned_split is not None else range(p.n_splits) for d in p.devices]
    for vector in itertools.product(*choices):
        yield dict(zip((d.name for d in p.devices), vector))


def own_objective(times: list[float], energies: list[float], alpha: float) -> list[float]:
    tn, en = math.hypot(*times), math.hypot(*energies)
    return [alpha * (t / tn if tn else 0) + (1 - alpha) * (e / en if en else 0) for t, e in zip(times, energies)]


def check_straggler_against_exhaustive_search(p: Problem, alpha: float) -> None:
    plan = StragglerPolicy(alpha=alpha).decide(p)
    best = min(evaluate(p, v).round_s for v in joint_vectors(p))
    assert plan.round_s == pytest.approx(best, rel=1e-12)
    assert oracle_round_time(p) == pytest.approx(best, rel=1e-12)
    for i, d in enumerate(p.devices):
        # Device i's costs at every split, each found by changing only its split in the plan's vector.
        alternatives = [evaluate(p, {**plan.splits, d.name: s}) for s in range(p.n_splits)]
        times = [a.devices[i].round_s for a in alternatives]
        objective = own_objective(times, [a.devices[i].energy_round_j for a in alternatives],
                                  alpha if d.alpha is None else d.alpha)
        keeps_round = [s for s, a in enumerate(alternatives) if a.round_s <= plan.round_s * (1 + 1e-12)
                       and (d.pinned_split is None or s == d.pinned_split)]
        assert plan.splits[d.name] in keeps_round
        assert objective[plan.splits[d.name]] <= min(objective[s] for s in keeps_round) + 1e-12


@settings(max_examples=40, deadline=None)
@given(p=problems(), alpha=st.floats(0.0, 1.0))
def test_straggler_matches_exhaustive_search_and_spends_slack_by_its_own_weighting(p, alpha):
    check_straggler_against_exhaustive_search(p, alpha)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_straggler_on_random_fleets_of_4_devices_and_7_splits(seed):
    """Hypothesis favours small cases; these always use the largest size, 7^4 joint vectors."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 10**6, size=6).tolist()
    model = ModelCosts(tuple(sizes) + (0,), tuple(sizes) + (0,), tuple(np.sort(rng.integers(0, 10**7, 7)).tolist()))
    server = ServerProfile(tuple(np.append(rng.uniform(0, 1, 6), 0)), tuple(np.append(rng.uniform(0, 1, 6), 0)))
    devices = tuple(DeviceInput(f"d{i}", ComputeProfile(tuple(np.cumsum(rng.uniform(0, 2, 7))), tuple(rng.uniform(0, 2, 7))),
                                float(rng.uniform(1e5, 1e7)), float(rng.uniform(1e5, 1e7)),
                                PowerModel(*rng.uniform(0.5, 8, 3).tolist()), int(rng.integers(1, 200)))
                    for i in range(4))
    check_straggler_against_exhaustive_search(Problem(devices, server, model), alpha=float(rng.uniform(0, 1)))


@settings(max_examples=30, deadline=None)
@given(p=problems(max_devices=4, max_splits=5))
def test_shared_server_straggler_matches_exhaustive_search(p):
    plan = StragglerPolicy(share_server=True).decide(p)
    best = min(evaluate(p, v, share_server=True).round_s for v in joint_vectors(p))
    assert plan.round_s == pytest.approx(best, rel=1e-12)
    assert evaluate(p, plan.splits, share_server=True).round_s == pytest.approx(plan.round_s, rel=1e-12)


def check_shared_least_energy_against_exhaustive_search(p: Problem) -> None:
    """Among all split vectors with the best shared-server round time, the plan spends the least energy."""
    p = replace(p, devices=tuple(replace(d, alpha=None) for d in p.devices))  # a = 0: least energy
    plans = [evaluate(p, v, share_server=True) for v in joint_vectors(p)]
    best = min(x.round_s for x in plans)
    least = min(x.energy_round_j for x in plans if x.round_s <= best * (1 + 1e-12))
    plan = StragglerPolicy(share_server=True).decide(p)
    assert plan.round_s == pytest.approx(best, rel=1e-12)
    assert plan.energy_round_j == pytest.approx(least, rel=1e-9)


@settings(max_examples=40, deadline=None)
@given(p=problems(max_devices=4, max_splits=5))
def test_shared_server_plan_spends_the_least_energy_of_the_fastest_plans(p):
    check_shared_least_energy_against_exhaustive_search(p)


@settings(max_examples=40, deadline=None)
@given(p=problems(max_devices=5, max_splits=4), shards=st.lists(st.integers(0, 2), min_size=5, max_size=5))
def test_with_server_shards_each_shards_offloaders_share_its_server_alone(p, shards):
    """Devices at k server shards: a shard's server is shared by its own offloaders only. The plan's
    round is the best any joint vector gives, its energy the least among those, and each device's
    predicted server time is its shard's offloaders' count times the server's."""
    p = replace(p, devices=tuple(replace(d, shard=k, alpha=None) for d, k in zip(p.devices, shards)))
    check_shared_least_energy_against_exhaustive_search(p)
    plan = StragglerPolicy(share_server=True).decide(p)
    s = p.n_splits
    for d, got in zip(p.devices, plan.devices):
        if got.split < s - 1:
            sharers = sum(1 for e, q in zip(p.devices, plan.devices) if e.shard == d.shard and q.split < s - 1)
            alone = evaluate(replace(p, devices=(d,)), {d.name: got.split}, share_server=True).devices[0]
            assert got.server_s == pytest.approx(alone.server_s * sharers, rel=1e-12)


def test_a_device_at_another_shard_offloads_where_one_shared_server_kept_it_local():
    # One server shared by A and B: both offloading would make A's round 42 s > 37 s, so B trains on
    # the device (43 J). At a shard of its own B's offloading slows no one: split 1, 19 s and 32 J.
    p = problem(dev_a(), replace(dev_b(), shard=1))
    plan = StragglerPolicy(share_server=True).decide(p)
    assert plan.splits == {"A": 1, "B": 1}
    assert (plan.round_s, plan.energy_round_j) == pytest.approx((37, 52 + 32))
    assert [d.server_s for d in plan.devices] == [d.server_s for d in (
        evaluate(replace(p, devices=(x,)), {x.name: 1}, share_server=True).devices[0] for x in p.devices)]


@pytest.mark.parametrize("seed", range(6))
def test_shared_server_least_energy_on_random_fleets_of_5_devices(seed):
    """Devices with slack beside a slow one pinned on the device: the case the prefix rule got wrong."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(10**4, 10**6, size=4).tolist()
    model = ModelCosts(tuple(sizes) + (0,), tuple(sizes) + (0,), tuple(np.sort(rng.integers(0, 10**6, 5)).tolist()))
    server = ServerProfile(tuple(np.append(rng.uniform(0, 0.2, 4), 0)), tuple(np.append(rng.uniform(0, 0.2, 4), 0)))
    devices = tuple(DeviceInput(f"d{i}", ComputeProfile(tuple(np.cumsum(rng.uniform(0, 2, 5))),
                                                        tuple(rng.uniform(0, 2, 5))),
                                float(rng.uniform(1e6, 1e7)), float(rng.uniform(1e6, 1e7)),
                                PowerModel(*rng.uniform(0.5, 8, 3).tolist()), int(rng.integers(1, 50)),
                                pinned_split=4 if i == 0 else None)
                    for i in range(5))
    check_shared_least_energy_against_exhaustive_search(Problem(devices, server, model))


@settings(max_examples=25, deadline=None)
@given(p=problems(pins=False))
def test_straggler_round_is_never_slower_than_other_policies(p):
    fastest = StragglerPolicy().decide(p).round_s
    for policy in (AresPolicy(0.5), NonePolicy(), FixedPolicy(0)):
        assert fastest <= policy.decide(p).round_s * (1 + 1e-12)


def test_the_optimiser_and_its_command_import_no_heavy_or_network_packages():
    code = ("import sys, ares.core.optimiser, ares.roles.optimise_cmd; "
            "print(sorted(m for m in ('torch', 'httpx', 'kopf', 'kubernetes') if m in sys.modules))")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


def test_under_round_noise_slack_is_spent_only_inside_the_headroom():
    """B could spend its slack at split 1 (19 s of A's 37 s round). With a fleet whose step times
    move enough from round to round, a setting slower than B's fastest must leave `noise_headroom`
    of the round free: at a headroom of a half, 19 s is too close to 37 s, and B stays at its
    fastest (split 2, 7 s); the round itself is the same."""
    from ares.core.optimiser import noise_headroom

    quiet, loud = replace(problem(dev_a(), dev_b()), noise=1.0), replace(problem(dev_a(), dev_b()), noise=3.0)
    assert noise_headroom(1.0, 2) < 1 - 19 / 37 < noise_headroom(3.0, 2) == 0.5
    assert StragglerPolicy().decide(quiet).splits == {"A": 1, "B": 1}
    plan = StragglerPolicy().decide(loud)
    assert plan.splits == {"A": 1, "B": 2}
    assert plan.round_s == pytest.approx(37)


def test_the_headroom_grows_with_the_noise_and_the_fleet():
    from ares.core.optimiser import noise_headroom

    assert noise_headroom(0.0, 10_000) == 0.0
    assert noise_headroom(0.05, 5) < noise_headroom(0.05, 1_000) < noise_headroom(0.05, 10_000) < noise_headroom(0.1, 10_000)
    # the largest of n lognormal(0, sigma) draws is about exp(sigma z) above 1: z(1,000) = 3.09
    assert 1 / (1 - noise_headroom(0.05, 1_000)) == pytest.approx(math.exp(0.05 * 3.0902), rel=1e-3)
