"""`ares bench` end to end, cut short: a real server and emulated devices under several policies.

Asserts that the comparison's outputs are complete and consistent (every policy, every round,
the splits each mode implies, ratios that match their parts, an oracle that really is the best
split vector, scheduled power-mode and link changes that reached the devices), never timings.
Links are the in-process limit so the test needs no root (tests/host covers the tc links).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ares.core.messages import Telemetry
from ares.core.optimiser import evaluate
from ares.roles import testbed

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 3
POLICIES = ["none", "fixed:1", "straggler+fp16"]  # one of each mode; ares/straggler differ only in the policy
SCENARIO = {
    "name": "short",
    "training": {"rounds": ROUNDS, "batch_size": 20, "max_steps_per_round": 2, "seed": 1},
    "data": {"name": "synthetic", "synthetic_train": 120, "synthetic_test": 60, "seed": 1},
    "devices": [{"name": "pi", "profile": "raspberry-pi", "up_mbps": 40},
                {"name": "nano", "profile": "jetson-nano/MAXN", "up_mbps": 40}],
    "schedule": [{"round": 2, "device": "nano", "power_mode": "5W", "up_mbps": 10}],
    "policies": POLICIES,
    "profile_scale": 0.2,
    "settle_rounds": 1,
}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    (tmp / "short.yaml").write_text(yaml.safe_dump(SCENARIO))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "ares", "bench", str(tmp / "short.yaml"), "--links", "inprocess",
                           "--out", str(tmp / "out")], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return tmp / "out", done.stdout, json.loads((tmp / "out" / "comparison.json").read_text())


@pytest.mark.slow
def test_every_policy_ran_every_round_and_the_table_says_so(bench):
    out, stdout, report = bench
    assert report["links"] == "inprocess" and "IN-PROCESS rate limit" in stdout
    assert [v["variant"] for v in report["variants"]] == POLICIES
    for v in report["variants"]:
        assert [r["round"] for r in v["rounds"]] == list(range(ROUNDS))
        assert all(r["missed"] == [] and set(r["splits"]) == {"pi", "nano"} for r in v["rounds"])
        assert v["label"] in stdout
    for png in ("round_time.png", "split_timeline.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_modes_keep_their_splits_and_codecs(bench):
    _, _, report = bench
    fl, classic, adaptive = report["variants"]
    assert {s for r in fl["rounds"] for s in r["splits"].values()} == {6}
    assert {s for r in classic["rounds"] for s in r["splits"].values()} == {1}
    assert (fl["codec"], classic["codec"], adaptive["codec"]) == ("fp32", "fp32", "fp16")
    assert adaptive["policy"] == "straggler" and adaptive["mode"] == "adaptive"
    server = yaml.safe_load((Path(adaptive["results_dir"]) / "server.yaml").read_text())
    assert server["codec"] == "fp16"


@pytest.mark.slow
def test_ratios_are_measured_against_fl(bench):
    _, _, report = bench
    fl = report["variants"][0]
    for v in report["variants"]:
        steady = [r for r in v["rounds"] if r["round"] >= testbed.WARMUP_ROUNDS]
        assert v["mean_round_s"] == pytest.approx(sum(r["measured_s"] for r in steady) / len(steady))
        assert v["time_vs_fl"] == pytest.approx(v["mean_round_s"] / fl["mean_round_s"])
        assert v["energy_vs_fl"] == pytest.approx(v["energy_per_round_j"] / fl["energy_per_round_j"])
        assert v["accuracy_vs_fl"] == pytest.approx(v["final_accuracy"] / fl["final_accuracy"])
        assert v["energy_per_round_j"] > 0 and 0 <= v["final_accuracy"] <= 1
        assert v["adapted_rounds"] == [1]  # settle 1 after round 0; round 2 is a change
        assert v["vs_oracle"] == pytest.approx(v["adapted_round_s"] / v["adapted_oracle_s"])


@pytest.mark.slow
def test_oracle_is_no_slower_than_any_split_vector_including_the_ones_used(bench):
    _, _, report = bench
    scenario = testbed.Scenario.model_validate(SCENARIO)
    states = testbed.timeline(scenario)
    for v in report["variants"]:
        telemetry = json.loads((Path(v["results_dir"]) / "telemetry.json").read_text())
        last = Telemetry.model_validate(telemetry[max(telemetry, key=int)])
        for r in v["rounds"]:
            problem = testbed.oracle_problem(states[r["round"]], last, {"pi": 2, "nano": 2})
            assert r["oracle_s"] <= evaluate(problem, r["splits"]).round_s + 1e-9
            others = [evaluate(problem, {"pi": a, "nano": b}).round_s for a in range(7) for b in range(7)]
            assert r["oracle_s"] == pytest.approx(min(others))


@pytest.mark.slow
def test_adaptive_runs_carry_predictions(bench):
    _, _, report = bench
    adaptive = report["variants"][2]
    assert all(r["predicted_s"] and r["predicted_s"] > 0 for r in adaptive["rounds"][1:])
    assert adaptive["prediction_error"] is not None and adaptive["prediction_error"] >= 0


@pytest.mark.slow
def test_scheduled_power_mode_and_link_change_reached_the_device(bench):
    _, _, report = bench
    results = Path(report["variants"][0]["results_dir"])
    telemetry = json.loads((results / "telemetry.json").read_text())
    nano = lambda r: next(d for d in telemetry[str(r)]["devices"] if d["name"] == "nano")
    assert nano(1)["power_mode"] == "MAXN"  # reported with round 0
    assert nano(ROUNDS)["power_mode"] == "5W"  # reported with round 2, after the change
    assert json.loads((results / "links" / "nano.json").read_text())["up_bps"] == 10 * 125_000
    # the emulated profile pads compute: in FL, the Pi's round takes at least its profile's time
    with open(results / "devices.csv") as f:
        pi = [row for row in csv.DictReader(f) if row["device"] == "pi"]
    per_step = testbed.timeline(testbed.Scenario.model_validate(SCENARIO))[0]["pi"].profile.rescaled(20).total(6)
    assert all(float(row["round_s"]) >= int(row["steps"]) * per_step for row in pi)


# ---- the pure parts, no processes ---------------------------------------------------------

def test_timeline_applies_changes_from_their_round_on():
    states = testbed.timeline(testbed.Scenario.model_validate(SCENARIO))
    assert [s["nano"].profile.power_mode for s in states] == ["MAXN", "MAXN", "5W"]
    maxn, five_w = states[1]["nano"].profile, states[2]["nano"].profile
    assert five_w.total(6) == pytest.approx(maxn.total(6) * 1.6)  # POWER_MODE_SLOWDOWN, on the scaled profile
    assert maxn.total(6) == pytest.approx(0.2 * (0.12375 + 0.08125))  # profile_scale 0.2 of the published MAXN
    assert [(s["nano"].up_mbps, s["nano"].down_mbps) for s in states] == [(40, 40), (40, 40), (10, 10)]
    assert all(s["pi"] == states[0]["pi"] for s in states)


def test_run_config_turns_link_changes_into_the_runner_schedule(tmp_path):
    scenario = testbed.Scenario.model_validate(SCENARIO)
    cfg = testbed.run_config(scenario, testbed.variant_of("fixed:1"), tmp_path)
    assert [(c.round, c.device, c.up_mbps, c.down_mbps) for c in cfg.schedule] == [(2, "nano", 10, 10)]
    assert (cfg.mode, cfg.codec) == ("fixed:1", "fp32")
    assert [(d.device_class, d.power_mode) for d in cfg.devices] == [("raspberry-pi", ""), ("jetson-nano", "MAXN")]


@pytest.mark.parametrize("changes, settle, expected", [
    ([], 2, [2, 3, 4, 5, 6, 7]), ([4], 2, [2, 3, 6, 7]), ([4], 0, list(range(8))), ([1, 5], 1, [2, 3, 4, 6, 7])])
def test_adapted_rounds_skip_settling_after_each_change(changes, settle, expected):
    scenario = testbed.Scenario.model_validate({
        **SCENARIO, "training": {"rounds": 8}, "settle_rounds": settle,
        "schedule": [{"round": r, "device": "pi", "up_mbps": 5} for r in changes]})
    assert testbed.adapted_rounds(scenario) == expected


@pytest.mark.parametrize("key, mode, policy, codec", [
    ("none", "none", "straggler", "fp32"), ("fixed:1", "fixed:1", "straggler", "fp32"),
    ("ares", "adaptive", "ares", "fp32"), ("straggler+fp16", "adaptive", "straggler", "fp16")])
def test_variants(key, mode, policy, codec):
    v = testbed.variant_of(key)
    assert (v.mode, v.codec) == (mode, codec) and (v.policy == policy or mode != "adaptive")


@pytest.mark.parametrize("bad, message", [
    ({"policies": ["fastest"]}, "unknown policy"), ({"policies": ["ares+int8"]}, r"\+fp16"),
    ({"schedule": [{"round": 1, "device": "pi", "power_mode": "5W"}]}, "can only derive"),
    ({"schedule": [{"round": 1, "device": "ghost", "up_mbps": 5}]}, "ghost"),
    ({"schedule": [{"round": 9, "device": "pi", "up_mbps": 5}]}, "never happens"),
    ({"devices": [{"name": "x", "profile": "jetson-tx2"}], "schedule": []}, "neither a published key")])
def test_bad_scenarios_say_what_is_wrong(bad, message):
    with pytest.raises(ValueError, match=message):
        testbed.Scenario.model_validate({**SCENARIO, **bad})


def test_shipped_scenarios_load():
    names = {p.stem for p in testbed.SCENARIO_DIR.glob("*.yaml")}
    assert {"paper5", "bandwidth-drop", "power-mode-change"} <= names
    for name in names:
        scenario = testbed.load_scenario(name)
        assert [testbed.variant_of(p).key for p in scenario.policies] == list(testbed.DEFAULT_POLICIES)
