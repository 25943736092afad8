"""Power modes in the decision: the policies against brute force over (split, codec, k, mode).

Every device may list other power modes (`DeviceInput.modes`), each with its compute profile
and power model; a column in another mode pays the switch (`switch_s`) in its round. The brute
force below enumerates every joint vector of (mode, option, split) through `evaluate`, the cost
model's public entry, so the policies' vectorised search is checked against the definition.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from ares.core.costmodel import (Column, DeviceInput, ModelCosts, Option, PowerMode, Problem, evaluate, model_costs,
                                 other_modes)
from ares.core.energy import PowerModel, power_model
from ares.core.optimiser import MODE_MARGIN, SLOW_HEADROOM, AresPolicy, StragglerPolicy
from ares.core.profiles import PUBLISHED, ComputeProfile, ServerProfile


def random_problem(rng: np.random.Generator, n_devices: int, n_splits: int, n_options: int,
                   pins: bool = False) -> Problem:
    sizes = rng.integers(10**4, 10**6, size=n_splits - 1).tolist()
    weights = tuple(np.sort(rng.integers(0, 10**6, n_splits)).tolist())
    models = [ModelCosts(tuple(int(v / (1 + o)) for v in sizes) + (0,), tuple(int(v / (1 + o)) for v in sizes) + (0,),
                         weights) for o in range(n_options)]
    options = tuple(Option(c, 1, m) for c, m in zip(("fp32", "fp16", "int8"), models))
    server = ServerProfile(tuple(np.append(rng.uniform(0, 0.2, n_splits - 1), 0)),
                           tuple(np.append(rng.uniform(0, 0.2, n_splits - 1), 0)))
    devices = []
    for i in range(n_devices):
        fwd, bwd = np.cumsum(rng.uniform(0, 2, n_splits)), rng.uniform(0, 2, n_splits)
        n_modes = int(rng.integers(1, 4))
        slow = [1.0, *rng.uniform(1.0, 3.0, n_modes - 1)]
        watts = [rng.uniform(0.5, 8, 3) for _ in range(n_modes)]
        profiles = [ComputeProfile(tuple(fwd * f), tuple(bwd * f), power_mode=f"m{j}") for j, f in enumerate(slow)]
        modes = tuple(PowerMode(f"m{j}", profiles[j], PowerModel(*watts[j].tolist())) for j in range(1, n_modes))
        devices.append(DeviceInput(
            f"d{i}", profiles[0], float(rng.uniform(1e6, 1e7)), float(rng.uniform(1e6, 1e7)),
            PowerModel(*watts[0].tolist()), int(rng.integers(1, 50)), modes=modes,
            switch_s=float(rng.uniform(0, 2)), alpha=float(rng.uniform(0, 1)) if rng.integers(0, 2) else None,
            pinned_split=int(rng.integers(0, n_splits)) if pins and rng.integers(0, 3) == 0 else None,
            pinned_mode=profiles[int(rng.integers(0, n_modes))].power_mode if pins and rng.integers(0, 3) == 0
            else None))
    return Problem(tuple(devices), server, models[0], options=options)


def choices(p: Problem, d: DeviceInput) -> list[tuple[str, int, str]]:
    """Every (mode, option index, split) the device may take."""
    s = p.n_splits
    out = []
    for mode in d.mode_names:
        if d.pinned_mode is not None and mode != d.pinned_mode:
            continue
        for o in range(len(p.options)):
            for split in range(s):
                if (o and split == s - 1) or (d.pinned_split is not None and split != d.pinned_split):
                    continue
                out.append((mode, o, split))
    return out


def without_switch(p: Problem) -> Problem:
    """The problem as the policies weigh it: every round's costs, no one-off switch pause."""
    return Problem(tuple(DeviceInput(**{**d.__dict__, "switch_s": 0.0}) for d in p.devices), p.server, p.model,
                   options=p.options)


def plan_of(p: Problem, vector, share_server: bool = False):
    names = [d.name for d in p.devices]
    return evaluate(p, {n: v[2] for n, v in zip(names, vector)}, share_server=share_server,
                    options={n: (p.options[v[1]].codec, p.options[v[1]].micro_batches) for n, v in zip(names, vector)},
                    modes={n: v[0] for n, v in zip(names, vector)})


def chosen(plan, p: Problem) -> list[tuple[str, int, int]]:
    return [(d.power_mode, [o.codec for o in p.options].index(d.codec), d.split) for d in plan.devices]


def objective(times: list[float], energies: list[float], alpha: float) -> list[float]:
    tn, en = math.hypot(*times), math.hypot(*energies)
    return [alpha * (t / tn if tn else 0) + (1 - alpha) * (e / en if en else 0) for t, e in zip(times, energies)]


@pytest.mark.parametrize("seed", range(12))
def test_straggler_with_modes_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    p = random_problem(rng, n_devices=3, n_splits=4, n_options=2, pins=seed % 2 == 1)
    alpha = float(rng.uniform(0, 1))
    predicted = StragglerPolicy(alpha=alpha, mode_margin=0.0, headroom=0.0).decide(p)
    picked = chosen(predicted, p)
    assert predicted.round_s == pytest.approx(plan_of(p, picked).round_s, rel=1e-12)  # the pause in the prediction
    p = without_switch(p)  # the choice: on every round's costs
    plan = plan_of(p, picked)
    per_device = [choices(p, d) for d in p.devices]
    best = min(plan_of(p, v).round_s for v in itertools.product(*per_device))
    assert plan.round_s == pytest.approx(best, rel=1e-12)
    for i, d in enumerate(p.devices):
        # device i's costs at every choice, the others as planned: each device's round is its own
        alternatives = [plan_of(p, picked[:i] + [c] + picked[i + 1:]) for c in per_device[i]]
        own = objective([a.devices[i].round_s for a in alternatives], [a.devices[i].energy_round_j for a in alternatives],
                        alpha if d.alpha is None else d.alpha)
        keeps = [j for j, a in enumerate(alternatives) if a.round_s <= plan.round_s * (1 + 1e-12)]
        mine = per_device[i].index(picked[i])
        assert mine in keeps
        assert own[mine] <= min(own[j] for j in keeps) + 1e-12


@pytest.mark.parametrize("seed", range(12))
def test_ares_with_modes_matches_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    p = random_problem(rng, n_devices=3, n_splits=4, n_options=2, pins=seed % 2 == 1)
    alpha = float(rng.uniform(0, 1))
    picked = chosen(AresPolicy(alpha=alpha, mode_margin=0.0).decide(p), p)
    p = without_switch(p)
    for i, d in enumerate(p.devices):
        # the norms run over every valid column of the device (pins restrict the choice, not the norm)
        every = choices(p, DeviceInput(**{**d.__dict__, "pinned_split": None, "pinned_mode": None}))
        alternatives = [plan_of(p, picked[:i] + [c] + picked[i + 1:]).devices[i] for c in every]
        own = objective([a.iteration_s for a in alternatives], [a.energy_iteration_j for a in alternatives],
                        alpha if d.alpha is None else d.alpha)
        allowed = [j for j, c in enumerate(every) if c in choices(p, d)]
        mine = every.index(picked[i])
        assert mine in allowed
        assert own[mine] <= min(own[j] for j in allowed) + 1e-12


@pytest.mark.parametrize("seed", range(8))
def test_shared_server_straggler_with_modes_spends_the_least_energy_of_the_fastest_plans(seed):
    rng = np.random.default_rng(200 + seed)
    p = without_switch(random_problem(rng, n_devices=3, n_splits=3, n_options=1))
    p = Problem(tuple(DeviceInput(**{**d.__dict__, "alpha": None}) for d in p.devices), p.server, p.model,
                options=p.options)
    plans = [plan_of(p, v, share_server=True) for v in itertools.product(*(choices(p, d) for d in p.devices))]
    best = min(x.round_s for x in plans)
    least = min(x.energy_round_j for x in plans if x.round_s <= best * (1 + 1e-12))
    plan = StragglerPolicy(share_server=True, mode_margin=0.0, headroom=0.0).decide(p)
    assert plan.round_s == pytest.approx(best, rel=1e-12)
    assert plan.energy_round_j == pytest.approx(least, rel=1e-9)


# ---- the Jetson Nano's modes: what the policy does with slack --------------------------------

VGG5_NUMEL = [32768, 8192, 16384, 4096, 4096, 128]
VGG5_WEIGHT_BYTES = [4104, 4104, 79120, 79120, 227864, 2325528, 2330688]
MODEL = model_costs(VGG5_NUMEL, VGG5_WEIGHT_BYTES, 100)
SERVER = ServerProfile.from_cumulative(PUBLISHED["jetson-nano/MAXN"].scaled(0.1))


def nano(name: str, mbps: float, **kw) -> DeviceInput:
    maxn = PUBLISHED["jetson-nano/MAXN"]
    return DeviceInput(name, maxn, mbps * 125_000, mbps * 125_000, power_model("jetson-nano", "MAXN"), 50,
                       modes=other_modes(maxn), **kw)


def pi(name: str, mbps: float) -> DeviceInput:
    return DeviceInput(name, PUBLISHED["raspberry-pi"], mbps * 125_000, mbps * 125_000,
                       power_model("raspberry-pi", ""), 50)


def test_a_nano_with_slack_runs_in_a_low_power_mode_and_the_round_stays_the_fastest():
    p = Problem((pi("pi", 20), nano("nano", 20)), SERVER, MODEL)
    plan = StragglerPolicy().decide(p)
    fastest = StragglerPolicy().decide(Problem((pi("pi", 20), nano("nano", 20, pinned_mode="MAXN")), SERVER, MODEL))
    assert plan.round_s == pytest.approx(fastest.round_s)
    [at] = [d for d in plan.devices if d.name == "nano"]
    assert at.power_mode != "MAXN" and at.mode_source == "derived" and at.switches_mode
    assert plan.energy_round_j < fastest.energy_round_j
    # the modes' profiles: derived from MAXN, marked so
    assert {m.name: m.compute.source for m in p.devices[1].modes} == {"5W": "derived", "custom1": "derived",
                                                                      "custom3": "derived"}


def test_a_slowed_device_keeps_headroom_inside_the_round():
    """custom3 would fit the round with 10% to spare: with 15% headroom asked, the Nano stays fast."""
    base = ComputeProfile((1.0, 2.0), (1.0, 2.0), power_mode="MAXN", device_class="jetson-nano")
    model = ModelCosts((100, 0), (100, 0), (10, 20))
    server = ServerProfile((0.1, 0.0), (0.1, 0.0))
    slow = PowerMode("custom3", base.scaled(1.5, power_mode="custom3"), power_model("jetson-nano", "custom3"))

    def problem(spare: float) -> Problem:
        nano = DeviceInput("nano", base, 1e3, 1e3, power_model("jetson-nano", "MAXN"), 5, modes=(slow,), pinned_split=1)
        # the other device's round: the Nano's in custom3 (30 s at split 1) with `spare` to spare
        times = (1.5 / (1 - spare), 3.0 / (1 - spare))
        other = DeviceInput("pi", ComputeProfile(times, times), 1e3, 1e3, PowerModel(5, 1, 1), 5, pinned_split=1)
        return Problem((nano, other), server, model)

    assert SLOW_HEADROOM == 0.15
    assert StragglerPolicy().decide(problem(0.10)).power_modes["nano"] == "MAXN"
    assert StragglerPolicy(headroom=0.0).decide(problem(0.10)).power_modes["nano"] == "custom3"
    assert StragglerPolicy().decide(problem(0.20)).power_modes["nano"] == "custom3"


def test_the_straggler_itself_keeps_its_fastest_mode():
    p = Problem((nano("nano", 20),), SERVER, MODEL)
    plan = StragglerPolicy().decide(p)
    assert plan.devices[0].power_mode == "MAXN"


def test_a_pinned_mode_is_respected():
    p = Problem((pi("pi", 20), nano("nano", 20, pinned_mode="5W")), SERVER, MODEL)
    for policy in (StragglerPolicy(), AresPolicy(), StragglerPolicy(share_server=True)):
        assert policy.decide(p).power_modes["nano"] == "5W"
    with pytest.raises(ValueError, match="pinned mode 'turbo' is not one of its modes"):
        nano("nano", 20, pinned_mode="turbo")


def test_a_switch_is_weighed_by_every_round_and_predicted_with_its_pause():
    """A pause longer than the slack does not keep a device in a mode that costs more every round:
    the Nano's slack is under 60 s here, yet it switches, and the plan predicts its round with the pause."""
    p = Problem((pi("pi", 2), nano("nano", 20, switch_s=200.0)), SERVER, MODEL)
    plan = StragglerPolicy().decide(p)
    [at] = [d for d in plan.devices if d.name == "nano"]
    assert at.switches_mode and plan.round_s == pytest.approx(at.round_s)  # this round: the pause sets it
    stay = Problem((pi("pi", 2), nano("nano", 20, switch_s=200.0, pinned_mode="MAXN")), SERVER, MODEL)
    assert at.energy_round_j < StragglerPolicy().decide(stay).energy_round_j
    every_round = evaluate(without_switch(p), plan.splits, modes=plan.power_modes)
    assert at.round_s == pytest.approx(every_round.devices[1].round_s + 200.0)
    assert every_round.round_s == pytest.approx(StragglerPolicy().decide(stay).round_s)


def test_a_switch_pays_its_pause_in_the_round_it_starts():
    p = Problem((nano("nano", 20, switch_s=2.5),), SERVER, MODEL)
    stay = evaluate(p, {"nano": 6})
    moved = evaluate(p, {"nano": 6}, modes={"nano": "MAXN"})
    assert moved.round_s == stay.round_s  # the mode in force: no switch
    slow = evaluate(p, {"nano": 6}, modes={"nano": "5W"})
    device = 50 * 1.6 * PUBLISHED["jetson-nano/MAXN"].total(6)
    assert slow.round_s == pytest.approx(stay.round_s + 0.6 / 1.6 * device + 2.5)
    assert slow.devices[0].switches_mode and not stay.devices[0].switches_mode


def test_a_mode_switch_for_a_gain_below_the_margin_is_not_made():
    """Two modes that differ in energy by 5%: the device stays; by 20%: it switches."""
    base = ComputeProfile((1.0, 2.0), (1.0, 2.0), power_mode="A")
    model = ModelCosts((100, 0), (100, 0), (10, 20))
    server = ServerProfile((0.1, 0.0), (0.1, 0.0))

    def problem(ratio: float) -> Problem:
        other = PowerMode("B", ComputeProfile((1.0, 2.0), (1.0, 2.0), power_mode="B"), PowerModel(10.0 * ratio, 1, 1))
        return Problem((DeviceInput("d", base, 1e3, 1e3, PowerModel(10.0, 1, 1), 5, modes=(other,),
                                    pinned_split=1),), server, model)

    assert MODE_MARGIN == 0.10
    assert StragglerPolicy().decide(problem(0.95)).power_modes == {"d": "A"}
    assert StragglerPolicy().decide(problem(0.80)).power_modes == {"d": "B"}
    assert StragglerPolicy(mode_margin=0.0).decide(problem(0.95)).power_modes == {"d": "B"}


def test_a_column_names_its_mode():
    p = Problem((nano("nano", 20),), SERVER, MODEL, options=(Option("fp32", 1, MODEL),))
    [col] = StragglerPolicy().choose_columns(p)
    assert col.flat(7, 1) == Column.at(col.flat(7, 1), 7, 1).flat(7, 1)
    assert Column(2, 3, 1).flat(7, 4) == (1 * 4 + 2) * 7 + 3 and Column.at(45, 7, 4) == Column(2, 3, 1)
    with pytest.raises(ValueError, match="needs n_options"):
        Column(0, 1, 1).flat(7)
