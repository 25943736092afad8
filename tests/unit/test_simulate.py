"""`ares simulate`: the truth it computes (checked by hand), its oracle (checked by brute force),
reproducibility, traces, and that its decisions are the real controller's."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from ares.core.costmodel import cost_matrices
from ares.core.optimiser import parse_policy
from ares.core.profiles import PUBLISHED, ServerProfile
from ares.roles.cli import main
from ares.roles.simulate import (VGG5_NUMEL, VGG5_WEIGHT_BYTES, DeviceGroup, Event, Noise, SimConfig, Simulation,
                                 _shard_oracle, run_policies)
from ares.runtime.controller import decide

QUIET = Noise(speed_sigma=0, compute_jitter=0, link_jitter=0, step_overhead_ms=0)


def small(**kw) -> SimConfig:
    base = dict(rounds=4, fleet=[DeviceGroup(count=12), DeviceGroup(count=8, profile="raspberry-pi")], seed=3)
    return SimConfig(**{**base, **kw})


def test_the_oracle_is_never_beaten_by_any_policy():
    for shards in (0, 2):
        cfg = small(policies=["straggler", "ares", "none", "fixed:1"], shards=shards, share_server=True)
        for p in cfg.policies:
            sim = Simulation(cfg, p)
            for r in range(cfg.rounds):
                rec = sim.step(r)
                assert rec["oracle_s"] <= rec["round_s"] * (1 + 1e-12), (shards, p, r)


def test_the_informed_oracle_lies_between_the_oracle_and_the_policies():
    """It knows every hidden value but not this round's jitter: never better than the oracle, and
    equal to it where there is no jitter; a fixed split it could have chosen never beats it then."""
    for shards in (0, 2):
        for noise, quiet in ((Noise(), False), (Noise(compute_jitter=0, link_jitter=0), True)):
            cfg = small(policies=["straggler", "fixed:1"], shards=shards, share_server=True, noise=noise)
            for p in cfg.policies:
                sim = Simulation(cfg, p)
                for r in range(cfg.rounds):
                    rec = sim.step(r)
                    assert rec["oracle_s"] <= rec["informed_oracle_s"] * (1 + 1e-12), (shards, p, r)
                    if quiet:
                        assert rec["informed_oracle_s"] == pytest.approx(rec["oracle_s"], rel=1e-12), (shards, p, r)
                        assert rec["informed_oracle_s"] <= rec["round_s"] * (1 + 1e-12), (shards, p, r)


def test_with_jitter_the_informed_oracle_is_what_its_choice_really_takes():
    """Without shards: every device at the split fastest without the jitter, timed with it."""
    cfg = small(policies=["none"], seed=5)
    sim = Simulation(cfg, "none")
    rec = sim.step(0)
    rng = np.random.default_rng([cfg.seed, 1, 0])
    n = len(sim.fleet.names)
    jc, ju, jd = (np.exp(rng.normal(0, sigma, n)) for sigma in (cfg.noise.compute_jitter, cfg.noise.link_jitter,
                                                                 cfg.noise.link_jitter))
    rows, f = np.arange(n), sim.fleet
    expected = cost_matrices(sim._inputs(rows, f.speed * f.factor, f.up, f.down)).round_s
    true = cost_matrices(sim._inputs(rows, f.speed * f.factor * jc, f.up * ju, f.down * jd)).round_s
    assert rec["informed_oracle_s"] == pytest.approx(true[rows, expected.argmin(axis=1)].max(), rel=1e-12)


def test_a_link_drop_in_a_trace_changes_the_round_as_computed_by_hand():
    cfg = SimConfig(rounds=3, policies=["none"], noise=QUIET, fleet=[
        DeviceGroup(count=1, profile="raspberry-pi", prefix="pi", up_mbit=(10, 10), down_mbit=(10, 10),
                    iterations=(20, 20), latency_ms=2)],
        events=[Event(round=2, devices="pi-*", up_mbit=1)])
    sim = Simulation(cfg, "none")
    rounds = [sim.step(r)["round_s"] for r in range(3)]
    pi = PUBLISHED["raspberry-pi"]
    compute = 20 * (pi.fwd[-1] + pi.bwd[-1])  # every layer on the device
    w = VGG5_WEIGHT_BYTES[-1]
    before = compute + w / 1.25e6 + w / 1.25e6 + 2 * 0.002
    after = compute + w / 1.25e6 + w / 0.125e6 + 2 * 0.002
    assert rounds[0] == pytest.approx(before, rel=1e-12)
    assert rounds[1] == pytest.approx(before, rel=1e-12)
    assert rounds[2] == pytest.approx(after, rel=1e-12)


def test_a_shared_server_slows_each_offloading_step_by_the_shards_offloaders():
    # two identical Nanos at split 0 on one shard: the server part of every step takes twice as long
    group = DeviceGroup(count=2, prefix="n", up_mbit=(40, 40), down_mbit=(40, 40), iterations=(10, 10), latency_ms=1)
    noise = Noise(speed_sigma=0, compute_jitter=0, link_jitter=0, step_overhead_ms=3)
    got = {}
    for shards in (0, 1):
        sim = Simulation(SimConfig(rounds=1, shards=shards, initial_split=0, noise=noise, fleet=[group]), "fixed:0")
        got[shards] = sim.step(0)["round_s"]
    nano = PUBLISHED["jetson-nano/MAXN"]
    server = ServerProfile.from_cumulative(nano.scaled(0.1))
    up_b, down_b = 100 * (VGG5_NUMEL[0] * 4 + 8), 100 * VGG5_NUMEL[0] * 4
    rate = 40e6 / 8

    def by_hand(share: int) -> float:
        step = nano.total(0) + share * server.total(0) + up_b / rate + down_b / rate + 0.001 + 0.003
        return 10 * step + 2 * VGG5_WEIGHT_BYTES[0] / rate + 2 * 0.001

    assert got[0] == pytest.approx(by_hand(1), rel=1e-12)
    assert got[1] == pytest.approx(by_hand(2), rel=1e-12)


def test_the_shard_oracle_equals_brute_force():
    sim = Simulation(small(fleet=[DeviceGroup(count=4, up_mbit=(1, 80)), DeviceGroup(count=3, profile="raspberry-pi",
                                                                                       up_mbit=(1, 80))]), "none")
    rows = np.arange(7)
    x = sim._inputs(rows, sim.fleet.speed[rows], sim.fleet.up[rows], sim.fleet.down[rows])
    s = sim.n_splits
    alone = cost_matrices(x).round_s
    best = np.inf
    for chosen in itertools.product((False, True), repeat=7):
        off = np.flatnonzero(chosen)
        share = max(len(off), 1)
        r_off = cost_matrices(x, float(share)).round_s[:, :s - 1].min(axis=1)
        best = min(best, max(np.where(chosen, r_off, alone[:, s - 1]).max(), 0.0))
    assert _shard_oracle(x, alone[:, s - 1]) == pytest.approx(best, rel=1e-12)


def test_the_same_seed_gives_the_same_results_and_another_seed_others():
    a = run_policies(small(policies=["straggler"]))
    b = run_policies(small(policies=["straggler"]))
    c = run_policies(small(policies=["straggler"], seed=4))
    key = lambda s: {k: v for k, v in s["policies"]["straggler"].items() if k not in ("wall_s", "decision_p50_s",  # noqa: E731
                                                                                       "decision_max_s")}
    assert key(a) == key(b)
    assert key(a) != key(c)


def test_the_decisions_are_what_controller_decide_returns_on_the_same_telemetry():
    cfg = small(policies=["straggler"], rounds=4)
    sim = Simulation(cfg, "straggler")
    for r in range(4):
        sim.step(r)
        rows = np.flatnonzero(sim.fleet.available)
        telemetry = sim._telemetry(r, rows)
        plan = decide(telemetry, parse_policy("straggler"))
        assert plan is not None and len(plan.devices) == 20
        assert plan.splits == {sim.fleet.names[i]: int(sim.split[i]) for i in rows.tolist()}
        assert {p.name: p.round_s for p in plan.devices} == {
            sim.fleet.names[i]: float(sim.predicted[i]) for i in rows.tolist()}


def test_devices_leave_and_join_and_change_power_mode_as_the_trace_says():
    cfg = SimConfig(rounds=4, policies=["none"], noise=QUIET, fleet=[
        DeviceGroup(count=3, prefix="nano", iterations=(10, 10)), DeviceGroup(count=2, profile="raspberry-pi", prefix="pi")],
        events=[Event(round=1, devices="pi-*", available=False), Event(round=2, devices="pi-*", available=True),
                Event(round=3, devices="pi-*", available=False), Event(round=3, devices="nano-0", power_mode="5W")])
    sim = Simulation(cfg, "none")
    recs = [sim.step(r) for r in range(4)]
    assert [r["devices"] for r in recs] == [5, 3, 5, 3]
    # round 3: only the Nanos; nano-0 now in 5W (derived: x1.6 the MAXN compute), at the local split
    nano = PUBLISHED["jetson-nano/MAXN"]
    w = VGG5_WEIGHT_BYTES[-1]
    others = [10 * nano.total(6) + w / sim.fleet.up[i] + w / sim.fleet.down[i] + 0.004 for i in (1, 2)]
    slowed = 10 * nano.total(6) * 1.6 + w / sim.fleet.up[0] + w / sim.fleet.down[0] + 0.004
    assert recs[3]["round_s"] == pytest.approx(max([slowed, *others]), rel=1e-12)


def test_fedscale_traces_set_speed_links_and_availability(tmp_path):
    cap = tmp_path / "capacity.json"
    cap.write_text(json.dumps({"1": {"computation": 50.0, "communication": 8000.0},
                               "2": {"computation": 50.0, "communication": 8000.0}}))
    beh = tmp_path / "behaviour.json"
    beh.write_text(json.dumps({"1": {"active": [0], "inactive": [1e9], "finish_time": 2e9, "duration": 1},
                               "2": {"active": [0], "inactive": [1e9], "finish_time": 2e9}}))
    cfg = SimConfig(rounds=2, policies=["none"], noise=QUIET, fleet=[DeviceGroup(count=4)],
                    fedscale_capacity=str(cap), fedscale_availability=str(beh))
    sim = Simulation(cfg, "none")
    assert np.all(sim.fleet.up == 1e6) and np.all(sim.fleet.down == 1e6)  # 8,000 kbit/s
    assert np.all(sim.fleet.factor == 1.0)  # every client at the median speed
    assert sim.step(0)["devices"] == 4
    off = tmp_path / "off.json"
    off.write_text(json.dumps({"1": {"active": [10], "inactive": [20], "finish_time": 100}}))
    cfg = cfg.model_copy(update={"fedscale_availability": str(off)})
    with pytest.raises(ValueError, match="no device is available"):
        Simulation(cfg, "none").step(0)  # at t = 0 every device is off (on from 10 s to 20 s)


def test_a_config_with_an_unknown_key_or_an_empty_range_is_refused():
    with pytest.raises(ValueError, match="extra"):
        SimConfig.model_validate({"rounds": 2, "devcies": 3})
    with pytest.raises(ValueError, match="range"):
        DeviceGroup(count=2, up_mbit=(10, 1))
    with pytest.raises(ValueError, match="unknown profile"):
        Simulation(SimConfig(fleet=[DeviceGroup(count=1, profile="nokia-3310")]), "none")


def test_ares_simulate_writes_a_results_folder(tmp_path, capsys):
    out = tmp_path / "sim"
    assert main(["simulate", "--devices", "30", "--rounds", "4", "--policies", "straggler,none", "--shards", "2",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "real: the decisions" in text and "modelled:" in text and "round 4/4" in text
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["policies"]) == {"straggler", "none"}
    rounds = json.loads((out / "rounds.json").read_text())
    assert len(rounds["straggler"]) == 4 and all(r["oracle_s"] <= r["round_s"] for r in rounds["straggler"])
    errors = json.loads((out / "prediction_error.json").read_text())
    assert len(errors["none"]) == 30
    assert (out / "round_time.png").stat().st_size > 1000 and (out / "prediction_error.png").stat().st_size > 1000


def test_knowing_each_devices_shard_the_shared_server_policy_reaches_the_oracle(monkeypatch):
    """Pis on fast links, the server the bottleneck, four shards: the controller reads each device's
    shard from the telemetry and shares each shard's server among that shard's offloaders only, as
    the simulated truth does. It then reaches the oracle every round after the first and predicts
    each device's round; told every device is at one server (shard 0), it keeps devices off the
    server that could have offloaded, and its rounds are slower."""
    cfg = SimConfig(rounds=4, seed=3, shards=4, share_server=True, noise=QUIET, server_scale=0.05,
                    fleet=[DeviceGroup(count=20, profile="raspberry-pi", up_mbit=[40, 50], down_mbit=[40, 50])])

    def run() -> list[dict]:
        sim = Simulation(cfg, "straggler")
        return [sim.step(r) for r in range(cfg.rounds)][1:]

    knowing = run()
    assert all(rec["ratio_to_oracle"] == pytest.approx(1.0, rel=1e-9) for rec in knowing), knowing
    assert all(rec["median_abs_error"] < 0.02 for rec in knowing), knowing
    told = Simulation._telemetry
    monkeypatch.setattr(Simulation, "_telemetry",
                        lambda self, r, rows: (t := told(self, r, rows)).model_copy(update={"shard": [0] * len(t.shard)}))
    blind = run()
    assert all(b["offloading"] < k["offloading"] for b, k in zip(blind, knowing)), (blind, knowing)
    assert all(b["ratio_to_oracle"] > 1.01 for b in blind), blind
