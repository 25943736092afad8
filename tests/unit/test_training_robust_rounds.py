"""The server core under hostile or broken input: what is merged is bounded, rounds change state
under their locks, the ticker survives errors, status stays servable."""

from __future__ import annotations

import threading

import pytest
import torch

from ares.core.config import AggregationConfig
from ares.core.messages import DeviceReport, StepTimings
from ares.runtime.server import status_of
from ares.runtime.training import (AlreadyFinished, ConflictingUpload, RoundClosed, TrainingServer, UnknownDevice,
                                   UnsafeUpdate, read_tokens)
from tests.support import model_hash, small_config


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(tmp_path, devices=("dev-a", "dev-b"), **cfg_updates) -> tuple[TrainingServer, Clock]:
    cfg = small_config(tmp_path, devices=devices, rounds=3)
    if cfg_updates:
        cfg = cfg.model_copy(update=cfg_updates)
    clock = Clock()
    return TrainingServer(cfg, *read_tokens(cfg), profile=False, clock=clock), clock


def joined(server: TrainingServer, name: str, split: int = 3, round_index: int = 0) -> dict[str, torch.Tensor]:
    _, weights = server.join(name, round_index, split)
    return weights


def step(server, name, split=3, x=None, round_index=0):
    x = torch.randn(5, *server.shapes[split]) if x is None else x
    return server.step(name, round_index, split, x, torch.randint(0, 10, (x.shape[0],)))


def report(samples=5, split=3, round_index=0, **timings) -> DeviceReport:
    return DeviceReport(round=round_index, split=split, samples=samples, timings=StepTimings(**timings))


# ----- class 2: one upload cannot take over or destroy the model ---------------------------------
@pytest.mark.parametrize("samples", [10**12, 10**309])
def test_a_sample_count_beyond_the_assigned_shard_is_refused(tmp_path, samples):
    server, _ = make(tmp_path)
    weights = joined(server, "dev-a")
    step(server, "dev-a")
    before = model_hash(server)
    with pytest.raises(UnsafeUpdate) as err:
        server.upload("dev-a", DeviceReport.model_construct(round=0, split=3, samples=samples,
                                                            timings=StepTimings()), weights)
    assert status_of(err.value) == 422 and "assigned" in str(err.value)
    assert server.counters["uploads_refused"] == 1
    # the device sits nothing out for that: an honest retry is accepted, and the weight is bounded
    server.upload("dev-a", report(samples=5), weights)
    assert server.slots["dev-a"].weight == 5 and model_hash(server) == before


def test_enormous_finite_weights_are_refused_and_the_model_is_unchanged(tmp_path):
    server, _ = make(tmp_path)
    before = model_hash(server)
    weights = joined(server, "dev-a")
    step(server, "dev-a")
    poisoned = {k: v * 1e30 if v.is_floating_point() else v for k, v in weights.items()}
    with pytest.raises(UnsafeUpdate, match="update norm") as err:
        server.upload("dev-a", report(), poisoned)
    assert status_of(err.value) == 422 and server.status().devices["dev-a"].phase == "refused"
    with pytest.raises(AlreadyFinished, match="already finished"):  # no second try in this round
        server.join("dev-a", 0, 3)
    # dev-b finishes: the round closes at once (dev-a is done, refused) without dev-a's weights
    b = joined(server, "dev-b")
    step(server, "dev-b")
    server.upload("dev-b", report(), b)
    assert server.round == 1 and server.history[-1].missed == ["dev-a"]
    assert model_hash(server) != before  # dev-b's round was merged ...
    state = server.global_state()
    assert all(bool(torch.isfinite(v).all()) and float(v.abs().max()) < 1e3 for v in state.values()
               if v.is_floating_point())  # ... and nothing of dev-a's


def test_clip_instead_of_refuse_scales_the_update_to_the_bound(tmp_path):
    from ares.core.fedavg import update_norm

    agg = AggregationConfig(on_large_update="clip", max_update_norm=1.0)
    server, _ = make(tmp_path, devices=("dev-a",), aggregation=agg)
    reference = server.global_state()
    weights = joined(server, "dev-a")
    step(server, "dev-a")
    server.upload("dev-a", report(), {k: v * 1e6 if v.is_floating_point() else v for k, v in weights.items()})
    assert server.round == 1 and server.counters["uploads_clipped"] == 1
    assert update_norm(server.global_state(), reference) == pytest.approx(1.0, rel=1e-4)


def test_enormous_activations_are_refused_and_the_replica_is_left_as_it_was(tmp_path):
    server, _ = make(tmp_path)
    joined(server, "dev-a", split=2)
    replica = server.slots["dev-a"].replica
    before = {k: v.clone() for k, v in replica.state_dict().items()}
    x = torch.full((5, *server.shapes[2]), 3e38)
    with pytest.raises(UnsafeUpdate, match="not finite") as err:
        step(server, "dev-a", split=2, x=x)
    assert status_of(err.value) == 422 and server.counters["steps_refused"] == 1
    after = replica.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    grad, loss, _ = step(server, "dev-a", split=2)  # the device can go on with honest steps
    assert bool(torch.isfinite(grad).all()) and loss == loss


# ----- class 3: non-finite numbers never reach status ----------------------------------------------
@pytest.mark.parametrize("field", ["round_s", "up_bps", "energy_j", "device_fwd_s"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_report_figures_are_refused_at_the_message(field, value):
    with pytest.raises(ValueError):
        DeviceReport.model_validate({"round": 0, "split": 3, "samples": 5, "timings": {field: value}})
    with pytest.raises(ValueError):  # finite but so large that telemetry's products overflow
        DeviceReport.model_validate({"round": 0, "split": 3, "samples": 5, "profile_fwd": [1e308] * 7})


def test_status_is_servable_after_a_round_with_a_non_finite_test_loss(tmp_path):
    import json

    server, _ = make(tmp_path, devices=("dev-a",))
    server.evaluate = lambda: (0.1, float("nan"))
    weights = joined(server, "dev-a")
    server.upload("dev-a", report(), weights)
    assert server.round == 1
    status = server.status()
    assert status.loss is None and status.accuracy == 0.1
    json.dumps(status.model_dump(mode="json"), allow_nan=False)  # what the route sends


# ----- class 5 and 1: races ------------------------------------------------------------------
@pytest.mark.parametrize("same", [True, False], ids=["same-weights", "different-weights"])
def test_concurrent_uploads_from_one_device_accept_exactly_one(tmp_path, same):
    """Eight uploads at once: one is taken; the others are repeats of it (answered as it was,
    counted once) or, where they differ from it, refused with 409."""
    server, _ = make(tmp_path)
    weights = joined(server, "dev-a")
    step(server, "dev-a")
    start = threading.Barrier(8)
    outcomes = []

    def upload(i: int):
        mine = weights if same else {k: v + i if v.is_floating_point() else v for k, v in weights.items()}
        start.wait()
        try:
            outcomes.append("taken" if server.upload("dev-a", report(), mine) else "repeat")
        except ConflictingUpload as exc:
            outcomes.append(status_of(exc))

    threads = [threading.Thread(target=upload, args=(i * 1e-3,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("taken") == 1, outcomes
    assert sorted(set(outcomes) - {"taken"}) == (["repeat"] if same else [409]), outcomes
    assert server.slots["dev-a"].weight == 5.0
    assert server.counters.get("uploads_repeated", 0) == (7 if same else 0)


def test_a_step_that_races_the_round_closing_gets_409(tmp_path):
    server, clock = make(tmp_path)
    joined(server, "dev-a")
    original = server._active_slot

    def close_in_between(*args):
        slot = original(*args)  # the step is past its checks ...
        clock.now += server.cfg.round_deadline_s + 1
        server.tick()           # ... when the round closes by its deadline
        return slot

    server._active_slot = close_in_between
    with pytest.raises(RoundClosed) as err:
        step(server, "dev-a")
    assert status_of(err.value) == 409 and server.round == 1


# ----- class 6: the ticker survives, and the round closes by its deadline ----------------------------
def test_the_round_closes_by_its_deadline_even_when_closing_fails(tmp_path):
    server, clock = make(tmp_path)
    weights = joined(server, "dev-a")
    server.upload("dev-a", report(), weights)

    def broken_eval():
        raise RuntimeError("disk on fire")

    server.evaluate = broken_eval
    clock.now += server.cfg.round_deadline_s + 1
    server.tick()  # must not raise
    assert server.round == 1 and server.counters["eval_errors"] == 1
    assert server.history[-1].closed_by == "deadline"


def test_the_ticker_task_logs_and_keeps_going(tmp_path):
    import asyncio

    from ares.runtime.server import tick_rounds

    class Flaky:
        calls = 0
        counters: dict = {}

        def tick(self):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("first tick fails")

        def _count(self, name):
            self.counters[name] = self.counters.get(name, 0) + 1

    async def run():
        task = asyncio.create_task(tick_rounds(Flaky(), 0.01))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if Flaky.calls >= 3:
                break
        task.cancel()
        return Flaky.calls

    assert asyncio.run(run()) >= 3 and Flaky.counters == {"tick_errors": 1}


# ----- class 7 -----------------------------------------------------------------------------
def test_an_unknown_device_is_not_told_the_job_s_device_names(tmp_path):
    server, _ = make(tmp_path)
    with pytest.raises(UnknownDevice) as err:
        server.check_device_token("mallory", None)
    assert status_of(err.value) == 404 and "dev-a" not in str(err.value) and "dev-b" not in str(err.value)
