"""The controller's step excess, computed over arrays, equals the one built from one object per sample.

`_step_excess` holds every step sample against the model of its own round. It used to build one
`DeviceInput` (and `ComputeProfile`) per sample and a whole problem of them; now it takes the
device's row of the cost model's inputs with the sample's rates and compute speed. The previous
computation is kept here, verbatim, and both are run on random fleets: the results must be equal,
not merely close."""

import statistics
from dataclasses import replace

import numpy as np
import pytest

from ares.core.costmodel import MAX_BPS, MIN_BPS, Column, column_of, iteration_table
from ares.core.messages import STEP_ROUNDS, DeviceTelemetry, SessionSample, StepSample, Telemetry
from ares.core.models import activation_numel, weight_bytes
from ares.core.optimiser import StragglerPolicy
from ares.core.profiles import PUBLISHED
from ares.runtime import controller
from ares.runtime.controller import decide, problem_from_telemetry


def previous_step_excess(problem, samples):
    """`_step_excess` as it was: one device object per sample, one problem of them."""
    runs = [(i, col, x) for i, d in enumerate(problem.devices) for x in samples.get(d.name, ())
            if x.split < problem.n_splits - 1
            and (col := column_of(problem, x.codec, x.micro_batches, x.split)) is not None]
    if not runs:
        return [{} for _ in problem.devices]

    def rate(measured, now):
        return measured if measured is not None and MIN_BPS <= measured <= MAX_BPS else now

    def as_it_ran(j, d, x):
        return replace(d, name=f"{d.name}#{j}", up_bps=rate(x.up_bps, d.up_bps), down_bps=rate(x.down_bps, d.down_bps),
                       compute=d.compute.scaled(x.compute_scale, source=d.compute.source),
                       step_overheads=None, current=None)

    then = tuple(as_it_ran(j, problem.devices[i], x) for j, (i, _, x) in enumerate(runs))
    modelled, _ = iteration_table(replace(problem, devices=then))
    excess = [{} for _ in problem.devices]
    for j, (i, col, x) in enumerate(runs):
        excess[i].setdefault(col, []).append(x.step_s - float(modelled[j, col.option, col.split]))
    return [{col: max(0.0, statistics.fmean(v[-STEP_ROUNDS:])) for col, v in e.items()} for e in excess]


def random_telemetry(seed: int, n: int) -> Telemetry:
    rng = np.random.default_rng(seed)
    nano, pi = PUBLISHED["jetson-nano/MAXN"], PUBLISHED["raspberry-pi"]
    codecs, ks = ["fp32", "fp16", "int8"], [1, 2, 4]
    devices = []
    for i in range(n):
        jetson = bool(rng.integers(2))
        base = nano if jetson else pi
        f = float(rng.uniform(0.5, 3.0))
        steps = []
        for _ in range(int(rng.integers(0, 6))):
            rate = rng.choice([None, float(rng.uniform(1e5, 5e7)), 1e-4])  # none, a rate, one the model refuses
            steps.append(StepSample(split=int(rng.integers(0, 7)), codec=str(rng.choice(codecs)),
                                    micro_batches=int(rng.choice(ks)), step_s=float(rng.uniform(0, 3)),
                                    up_bps=rate, down_bps=float(rng.uniform(1e5, 5e7)) if rng.integers(2) else None,
                                    compute_scale=float(rng.uniform(0.2, 5.0))))
        sessions = [SessionSample(round=r, split=int(rng.integers(0, 7)), session_s=float(rng.uniform(5, 20)),
                                  steps_s=float(rng.uniform(0, 5))) for r in range(int(rng.integers(0, 5)))]
        devices.append(DeviceTelemetry(
            name=f"d{i}", device_class="jetson-nano" if jetson else "raspberry-pi",
            power_mode="MAXN" if jetson else "", fwd=[v * f for v in base.fwd], bwd=[v * f for v in base.bwd],
            up_bps=float(rng.uniform(1e5, 5e7)), down_bps=float(rng.uniform(1e5, 5e7)),
            iterations=int(rng.integers(1, 100)), latency_s=float(rng.uniform(0, 0.05)),
            duplex=str(rng.choice(["full", "half"])), split=int(rng.integers(0, 7)), codec=str(rng.choice(codecs)),
            micro_batches=int(rng.choice(ks)), measured_steps=steps, sessions=sessions))
    server = [t / 10 for t in nano.fwd]
    tail = [server[-1] - v for v in server]
    return Telemetry(round=5, model="vgg5", batch_size=100, codec="fp32", activation_numel=activation_numel("vgg5"),
                     weight_bytes=weight_bytes("vgg5"), server_fwd=tail, server_bwd=tail, devices=devices)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("power_modes", [False, True])
def test_step_excess_over_arrays_equals_the_one_object_per_sample_computation(seed, power_modes):
    t = random_telemetry(seed, 60)
    offer = [("fp32", 1), ("fp16", 1), ("int8", 4), ("fp16", 2)]
    problem = problem_from_telemetry(t, offer=offer, power_modes=power_modes)
    bare = replace(problem, devices=tuple(replace(d, step_overheads=None, session_overhead_s=0.0)
                                          for d in problem.devices))
    samples = {d.name: d.measured_steps for d in t.devices}
    fast, slow = controller._step_excess(bare, samples), previous_step_excess(bare, samples)
    assert fast == slow  # exactly: the same floats, the same columns, in the same order
    assert sum(len(e) for e in fast) > 20 and any(v > 0 for e in fast for v in e.values())
    assert all(isinstance(c, Column) for e in fast for c in e)


def test_the_decision_is_the_one_the_previous_step_excess_gives(monkeypatch):
    t = random_telemetry(7, 80)
    offer = [("fp32", 1), ("int8", 4)]
    fast = decide(t, StragglerPolicy(), offer=offer, power_modes=True)
    fast_problem = problem_from_telemetry(t, offer=offer, power_modes=True)
    monkeypatch.setattr(controller, "_step_excess", previous_step_excess)
    assert problem_from_telemetry(t, offer=offer, power_modes=True) == fast_problem
    assert decide(t, StragglerPolicy(), offer=offer, power_modes=True) == fast


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("power_modes", [False, True])
def test_the_problem_built_in_one_pass_equals_the_one_built_step_by_step(seed, power_modes):
    """`problem_from_telemetry` rebuilds each device once with its current column, step overheads and
    session overhead; `with_current`, `with_step_overheads` and `with_session_overheads` one after
    the other (each over a whole problem, as before) give the same problem, and the same plan."""
    from ares.runtime.controller import with_current, with_session_overheads, with_step_overheads

    t = random_telemetry(seed + 10, 60)
    offer = [("fp32", 1), ("int8", 1), ("fp16", 4)]
    bare = t.model_copy(update={"devices": [d.model_copy(update={"split": None, "measured_steps": [], "sessions": []})
                                            for d in t.devices]})
    measured = {d.name: d for d in t.devices}
    step_by_step = with_session_overheads(
        with_step_overheads(with_current(problem_from_telemetry(bare, offer=offer, power_modes=power_modes),
                                         measured, (t.codec, t.micro_batches)),
                            {n: d.measured_steps for n, d in measured.items()}),
        {n: d.sessions for n, d in measured.items()})
    one_pass = problem_from_telemetry(t, offer=offer, power_modes=power_modes)
    assert one_pass == step_by_step
    assert sum(d.current is not None for d in one_pass.devices) > 10
    assert sum(d.step_overheads is not None for d in one_pass.devices) > 20
    assert sum(d.session_overhead_s > 0 for d in one_pass.devices) > 10
    assert StragglerPolicy().decide(one_pass) == StragglerPolicy().decide(step_by_step)


def test_the_collector_paused_for_a_decision_is_running_again_after_it_even_when_it_fails():
    import gc

    t = random_telemetry(3, 20)
    assert gc.isenabled()
    assert decide(t, StragglerPolicy()) is not None and gc.isenabled()
    broken = t.model_copy(update={"server_fwd": t.server_fwd[:-1]})  # a server profile the model refuses
    with pytest.raises(ValueError):
        decide(broken, StragglerPolicy())
    assert gc.isenabled()
    gc.disable()
    try:  # paused by its caller: left paused
        decide(t, StragglerPolicy())
        assert not gc.isenabled()
    finally:
        gc.enable()
