"""The cost model of pipelined split steps, checked against an independent event-driven
simulation of the schedule the device runs (all forwards first, backwards as gradients come),
and the optimiser's choice of split, codec and micro-batches against exhaustive search."""

from __future__ import annotations

import random

import pytest

from ares.core.energy import PowerModel
from ares.core.costmodel import DeviceInput, Problem, evaluate, options_for, pipelined_iteration
from ares.core.optimiser import AresPolicy, NonePolicy, StragglerPolicy, oracle_round_time
from ares.core.profiles import PUBLISHED, ComputeProfile, ServerProfile

VGG5_NUMEL = [32768, 8192, 16384, 4096, 4096, 128]  # values per sample after layers 0..5
VGG5_WEIGHTS = [3712, 3712, 61056, 61056, 98112, 2195776, 2329416]


def simulate(f: float, u: float, v: float, d: float, b: float, k: int, half: bool) -> float:
    """Event by event: the device forwards k micro-batches back to back; each goes up the link
    once it exists, through the server in order, down the link, and is back-propagated in order
    once the device is free. Full duplex: up and down are two FIFO links. Half duplex: one link;
    when it frees up it sends a ready gradient first, else whichever transfer is ready first."""
    fwd_end = [(j + 1) * f for j in range(k)]
    up_end, srv_end, down_end = [0.0] * k, [0.0] * k, [0.0] * k
    if not half:
        for j in range(k):
            up_end[j] = max(fwd_end[j], up_end[j - 1] if j else 0.0) + u
            srv_end[j] = max(up_end[j], srv_end[j - 1] if j else 0.0) + v
            down_end[j] = max(srv_end[j], down_end[j - 1] if j else 0.0) + d
    else:
        link_free, next_up, next_down = 0.0, 0, 0
        while next_down < k:
            up_ready = fwd_end[next_up] if next_up < k else float("inf")
            down_ready = srv_end[next_down] if next_down < next_up else float("inf")
            # a ready gradient goes first (it unblocks the device); else whichever is ready first
            if not down_ready <= link_free and up_ready <= down_ready:
                up_end[next_up] = max(link_free, up_ready) + u
                link_free = up_end[next_up]
                srv_end[next_up] = max(up_end[next_up], srv_end[next_up - 1] if next_up else 0.0) + v
                next_up += 1
            else:
                down_end[next_down] = max(link_free, down_ready) + d
                link_free = down_end[next_down]
                next_down += 1
    t = k * f
    for j in range(k):
        t = max(t, down_end[j]) + b
    return t


def _cases(n: int, seed: int):
    rng = random.Random(seed)
    for _ in range(n):
        k = rng.choice([1, 2, 3, 4, 6, 8])
        # stage times spanning "device bound" to "link bound", zeros included
        f, u, v, d, b = (rng.choice([0.0, rng.uniform(0, 1), rng.uniform(0, 5)]) for _ in range(5))
        yield f, u, v, d, b, k


def test_full_duplex_formula_is_the_schedule_exactly():
    for f, u, v, d, b, k in _cases(5000, 1):
        want = simulate(f, u, v, d, b, k, half=False)
        got = float(pipelined_iteration(f, u, v, d, b, k, False))
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (f, u, v, d, b, k)


def test_k1_is_the_sequential_step():
    for f, u, v, d, b, _ in _cases(500, 2):
        seq = f + u + v + d + b
        assert float(pipelined_iteration(f, u, v, d, b, 1, False)) == pytest.approx(seq)
        assert float(pipelined_iteration(f, u, v, d, b, 1, True)) == pytest.approx(seq)


def test_half_duplex_formula_bounds():
    """Half duplex is approximated: within 0.78..1.21 of the simulated schedule over 5000 random
    cases (README). The simulation moves each transfer whole, so a gradient can wait behind a
    whole upload; HTTP/2 interleaves frames, so real links sit between the two."""
    worst_low, worst_high = 1.0, 1.0
    for f, u, v, d, b, k in _cases(5000, 3):
        want = simulate(f, u, v, d, b, k, half=True)
        if want == 0:
            continue
        ratio = float(pipelined_iteration(f, u, v, d, b, k, True)) / want
        worst_low, worst_high = min(worst_low, ratio), max(worst_high, ratio)
        # physical lower bounds hold exactly: the device's and the link's total work
        assert float(pipelined_iteration(f, u, v, d, b, k, True)) >= k * (f + b) - 1e-9
    print(f"half duplex: formula / simulation in [{worst_low:.3f}, {worst_high:.3f}]")
    assert worst_low >= 0.78 and worst_high <= 1.21, (worst_low, worst_high)


# ---- the optimiser with options ---------------------------------------------------------------

def _power() -> PowerModel:
    return PowerModel(7.253, 2.32, 2.26, "modelled")


def _server() -> ServerProfile:
    fwd = [0.02, 0.018, 0.012, 0.01, 0.008, 0.002, 0.0]
    return ServerProfile(fwd=tuple(fwd), bwd=tuple(2 * x for x in fwd), batch_size=100)


def _problem(devices, codecs=("fp32", "fp16", "int8"), micro=(1, 2, 4, 8)) -> Problem:
    opts = options_for(VGG5_NUMEL, VGG5_WEIGHTS, 100, codecs, micro)
    return Problem(tuple(devices), _server(), opts[0].model, options=opts, codec=opts[0].codec)


def _device(name: str, profile: ComputeProfile, mbps: float, **kw) -> DeviceInput:
    bps = mbps * 1e6 / 8
    return DeviceInput(name, profile, bps, bps, _power(), 5, **kw)


def _paper5(mbps: float = 20.0, **kw) -> list[DeviceInput]:
    pi, nano = PUBLISHED["raspberry-pi"], PUBLISHED["jetson-nano/MAXN"]
    return [_device("pi4", pi, mbps, **kw), _device("nano", nano, mbps, **kw)]


def _brute_round(problem: Problem, name: str) -> tuple[float, tuple]:
    """Best round time of one device over every (split, codec, k), by the public `evaluate`."""
    best = (float("inf"), None)
    others = {d.name: problem.n_splits - 1 for d in problem.devices}
    for s in range(problem.n_splits):
        for o in problem.options:
            plan = evaluate(problem, {**others, name: s}, options={name: (o.codec, o.micro_batches)})
            t = next(p.round_s for p in plan.devices if p.name == name)
            best = min(best, (t, (s, o.codec, o.micro_batches)))
    return best


@pytest.mark.parametrize("duplex", ["full", "half"])
def test_straggler_reaches_the_exhaustive_best_round(duplex: str):
    problem = _problem(_paper5(duplex=duplex, latency_s=0.002))
    plan = StragglerPolicy().decide(problem)
    best = max(_brute_round(problem, d.name)[0] for d in problem.devices)
    assert plan.round_s == pytest.approx(best, rel=1e-12)
    assert plan.round_s == pytest.approx(oracle_round_time(problem), rel=1e-12)


def test_options_respect_what_each_device_allows():
    problem = _problem(_paper5() + [_device("fixed-wire", PUBLISHED["raspberry-pi"], 20, codecs=("fp32",),
                                            micro_batches=(1,))])
    for policy in (StragglerPolicy(), AresPolicy(), StragglerPolicy(alpha=1.0)):
        plan = policy.decide(problem)
        d = next(p for p in plan.devices if p.name == "fixed-wire")
        assert (d.codec, d.micro_batches) == ("fp32", 1)
    # the others do use the freedom on a 20 Mbit link: the Pi's best is pipelined or narrower
    pi = next(p for p in StragglerPolicy(alpha=1.0).decide(problem).devices if p.name == "pi4")
    assert pi.split == 6 or (pi.codec, pi.micro_batches) != ("fp32", 1)


def test_single_option_problem_is_the_old_model():
    """One option, k = 1, no latency: iteration = device + server + up + down, as before."""
    problem = _problem(_paper5(), codecs=("fp32",), micro=(1,))
    for s in range(7):
        plan = evaluate(problem, {"pi4": s, "nano": s})
        for p, d in zip(plan.devices, problem.devices):
            assert p.iteration_s == pytest.approx(p.device_s + p.server_s + p.up_s + p.down_s)


def test_latency_counts_once_per_request():
    lat = 0.05
    base, slow = _problem(_paper5(), micro=(1, 4)), _problem(_paper5(latency_s=lat), micro=(1, 4))
    for k in (1, 4):
        a = evaluate(base, {"pi4": 1, "nano": 6}, options={"pi4": ("fp32", k)}).devices[0]
        b = evaluate(slow, {"pi4": 1, "nano": 6}, options={"pi4": ("fp32", k)}).devices[0]
        # k = 1: one request per batch; and join + upload once per round
        if k == 1:
            assert b.iteration_s - a.iteration_s == pytest.approx(lat)
        assert b.round_s - a.round_s >= 5 * lat + 2 * lat - 1e-9
    fl_a = evaluate(base, {"pi4": 6, "nano": 6}).devices[0]
    fl_b = evaluate(slow, {"pi4": 6, "nano": 6}).devices[0]
    assert fl_b.iteration_s == fl_a.iteration_s and fl_b.round_s - fl_a.round_s == pytest.approx(2 * lat)


def test_pipelining_prediction_on_the_paper_fleet():
    """What the model predicts for paper5's straggler (the Pi) at 20 Mbit/s: the figures the README quotes."""
    rows = {}
    for codecs, micro in ((("fp32",), (1,)), (("fp32",), (1, 2, 4, 8)), (("fp16",), (1, 2, 4, 8)),
                          (("int8",), (1, 2, 4, 8))):
        for duplex in ("full", "half"):
            problem = _problem(_paper5(duplex=duplex), codecs, micro)
            fl = NonePolicy().decide(problem).round_s
            plan = StragglerPolicy().decide(problem)
            rows[(codecs[0], max(micro), duplex)] = plan.round_s / fl
    for key, ratio in sorted(rows.items()):
        print(key, f"{ratio:.3f} x FL")
    assert rows[("fp32", 8, "full")] < rows[("fp32", 1, "full")]
    assert rows[("int8", 8, "full")] <= rows[("fp16", 8, "full")] <= rows[("fp32", 8, "full")]
    assert all(r <= 1.0 + 1e-12 for r in rows.values())  # FL is always among the choices
