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
from ares.core.costmodel import evaluate
from ares.roles import testbed
from ares.roles.comparison import Comparison, VariantResult, VersusFL

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 3
POLICIES = ["none", "fixed:1", "straggler+int8+pipe2"]  # one of each mode; ares/straggler differ only in the policy
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
    assert (fl["codec"], classic["codec"], adaptive["codec"]) == ("fp32", "fp32", "int8")
    assert (fl["micro_batches"], adaptive["micro_batches"]) == (1, 2)
    assert adaptive["policy"] == "straggler" and adaptive["mode"] == "adaptive"
    server = yaml.safe_load((Path(adaptive["results_dir"]) / "server.yaml").read_text())
    assert (server["codec"], server["micro_batches"]) == ("int8", 2)
    telemetry = json.loads((Path(adaptive["results_dir"]) / "telemetry.json").read_text())
    assert {(t["codec"], t["micro_batches"]) for t in telemetry.values()} == {("int8", 2)}  # the controller's model


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
            problem = testbed.oracle_problem(states[r["round"]], last, {"pi": 2, "nano": 2})  # the run's (codec, k)
            assert r["oracle_model_s"] <= evaluate(problem, r["splits"]).round_s + 1e-9
            others = [evaluate(problem, {"pi": a, "nano": b}).round_s for a in range(7) for b in range(7)]
            assert r["oracle_model_s"] == pytest.approx(min(others))
            # plus the round's measured time outside the device sessions, which no split changes
            assert r["fixed_s"] is not None and 0 <= r["fixed_s"] < r["measured_s"]
            assert r["oracle_s"] == pytest.approx(r["oracle_model_s"] + r["fixed_s"])


@pytest.mark.slow
def test_adaptive_runs_carry_predictions(bench):
    _, _, report = bench
    adaptive = report["variants"][2]
    assert all(r["predicted_s"] and r["predicted_s"] > 0 for r in adaptive["rounds"][1:])
    assert adaptive["prediction_error"] is not None and adaptive["prediction_error"] >= 0
    # what the model is held against came from the real devices over HTTP/2: their latency, and
    # each (split, codec, k) they offloaded with, its measured step time
    telemetry = json.loads((Path(adaptive["results_dir"]) / "telemetry.json").read_text())
    last = Telemetry.model_validate(telemetry[max(telemetry, key=int)])
    for d in last.devices:
        assert d.latency_s is not None and 0 < d.latency_s < 5
        assert d.measured_steps and all(m.step_s > 0 and m.codec == "int8" and m.micro_batches == 2
                                        for m in d.measured_steps)
        assert d.split is None or d.split == 6 or (d.split, "int8", 2) in {
            (m.split, m.codec, m.micro_batches) for m in d.measured_steps}
        # each round's sample carries the links it ran under; the last round's, today's compute factor
        assert all(m.up_bps and m.down_bps for m in d.measured_steps)
        assert d.split == 6 or d.measured_steps[-1].compute_scale == 1.0
        assert (d.codec, d.micro_batches) == ("int8", 2)  # the setting its last round ran: what a policy keeps
        # the link measured from its transfers, the weights included, within reason of loopback's
        assert d.up_bps and d.down_bps and d.up_bps > 1e5 and d.down_bps > 1e5
        # and its closed rounds' sessions by the server's clock, each holding the steps it timed
        assert d.sessions and [x.round for x in d.sessions] == sorted({x.round for x in d.sessions})
        assert all(0 < x.steps_s < x.session_s and x.round < last.round for x in d.sessions)


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


@pytest.mark.parametrize("key, mode, policy, codec, k, label", [
    ("none", "none", "straggler", "fp32", 1, "FL (none)"),
    ("fixed:1", "fixed:1", "straggler", "fp32", 1, "split learning (fixed:1)"),
    ("ares", "adaptive", "ares", "fp32", 1, "ares"),
    ("straggler+fp16", "adaptive", "straggler", "fp16", 1, "straggler + fp16"),
    ("straggler+pipe4", "adaptive", "straggler", "fp32", 4, "straggler + pipe4"),
    ("straggler+int8+pipe4", "adaptive", "straggler", "int8", 4, "straggler + int8 + pipe4"),
    ("ares+pipe2+fp16", "adaptive", "ares", "fp16", 2, "ares + fp16 + pipe2"),
    ("fixed:1+int8", "fixed:1", "straggler", "int8", 1, "split learning (fixed:1) + int8")])
def test_variants(key, mode, policy, codec, k, label):
    v = testbed.variant_of(key)
    assert (v.mode, v.codec, v.micro_batches, v.label) == (mode, codec, k, label)
    assert v.policy == policy or mode != "adaptive"
    assert v.options == ((codec, k),) and "+" not in v.folder and ":" not in v.folder


def test_run_config_carries_codec_and_micro_batches(tmp_path):
    cfg = testbed.run_config(testbed.Scenario.model_validate(SCENARIO), testbed.variant_of("straggler+int8+pipe4"), tmp_path)
    assert (cfg.mode, cfg.policy, cfg.codec, cfg.micro_batches) == ("adaptive", "straggler", "int8", 4)
    assert cfg.offer() == ()
    auto = testbed.variant_of("straggler+auto")
    assert auto.auto and auto.options == testbed.EVERY_OPTION and auto.label == "straggler + auto (codec, k)"
    cfg = testbed.run_config(testbed.Scenario.model_validate(SCENARIO), auto, tmp_path)
    assert set(cfg.offer()) == set(testbed.EVERY_OPTION) and cfg.offer()[0] == ("fp32", 1)
    for bad in ("none+auto", "straggler+auto+int8", "fixed:1+auto"):
        with pytest.raises(ValueError, match="alone"):
            testbed.variant_of(bad)


def test_options_used_follow_the_controllers_decisions():
    decisions = [{"round": "1", "device": "pi", "codec": "int8", "micro_batches": "4"},
                 {"round": "1", "device": "nano", "codec": "fp32", "micro_batches": "1"},
                 {"round": "3", "device": "pi", "codec": "fp16", "micro_batches": "2"},
                 {"round": "1", "device": "old", "codec": "", "micro_batches": ""}]  # a splits.csv before options
    assert testbed.options_used(decisions, 0) == {}
    assert testbed.options_used(decisions, 2) == {"pi": ("int8", 4), "nano": ("fp32", 1)}
    assert testbed.options_used(decisions, 3)["pi"] == ("fp16", 2)


def test_the_oracle_knows_the_variants_choices():
    """Each variant's oracle gets the variant's (codec, k); the reference oracle every option."""
    from ares.core.models import activation_numel, weight_bytes
    from ares.core.optimiser import oracle_round_time

    scenario = testbed.Scenario.model_validate(SCENARIO)
    server = [0.001 * (6 - i) for i in range(7)]
    tele = Telemetry(round=1, model="vgg5", batch_size=20, codec="fp32", activation_numel=activation_numel("vgg5"),
                     weight_bytes=weight_bytes("vgg5"), server_fwd=server, server_bwd=server, devices=[])
    states, steps = testbed.timeline(scenario)[0], {"pi": 2, "nano": 2}
    oracle = {key: oracle_round_time(testbed.oracle_problem(states, tele, steps, testbed.variant_of(key).options))
              for key in ("straggler", "straggler+int8", "straggler+pipe4", "straggler+int8+pipe4")}
    assert oracle["straggler"] == oracle_round_time(testbed.oracle_problem(states, tele, steps))  # the run's own
    assert oracle["straggler+int8"] < oracle["straggler"] and oracle["straggler+pipe4"] < oracle["straggler"]
    assert oracle["straggler+int8+pipe4"] < min(oracle["straggler+int8"], oracle["straggler+pipe4"])
    every = oracle_round_time(testbed.oracle_problem(states, tele, steps, testbed.EVERY_OPTION))
    assert every <= min(oracle.values())
    int8_k4 = tele.model_copy(update={"codec": "int8", "micro_batches": 4})  # default: the telemetry's own option
    assert oracle_round_time(testbed.oracle_problem(states, int8_k4, steps)) == oracle["straggler+int8+pipe4"]


def variant_result(key: str, time_s: float, acc: float, **fields) -> VariantResult:
    """A variant's result with these figures; the rest as a short adapted run might give them."""
    v = testbed.variant_of(key)
    figures = dict(mean_round_s=time_s, energy_per_round_j=10.0, model_energy_per_round_j=9.0, final_accuracy=acc,
                   oracle_round_s=None, model_round_s=None, adapted_rounds=[2, 3], adapted_round_s=time_s,
                   adapted_oracle_s=2.0, adapted_oracle_any_s=1.5, vs_oracle=time_s / 2, choice_vs_oracle=1.0,
                   overhead_s=None, prediction_error=0.05, device_prediction_error={},
                   worst_device_prediction_error=None)
    return VariantResult(scenario="t", variant=key, label=v.label, mode=v.mode, policy=v.policy, codec=v.codec,
                         micro_batches=v.micro_batches, links="tc", rounds=[], **{**figures, **fields})


def test_ratios_are_to_fl_where_it_ran():
    fl, other = variant_result("none", 4.0, 0.5), variant_result("straggler+int8+pipe4", 2.0, 0.489)
    [a, b] = testbed.ratios([fl, other])
    assert (a.result, b.result) == (fl, other)
    assert a.vs_fl == VersusFL(1.0, 1.0, 1.0, 1.0, 0.0)
    assert b.vs_fl == VersusFL(0.5, 1.0, 1.0, pytest.approx(0.978), pytest.approx(-1.1))
    assert testbed.ratios([other])[0].vs_fl == VersusFL(None, None, None, None, None)  # no FL in the comparison
    # in the JSON: one object per variant, its ratios after its result's fields
    assert list(b.as_json()) == [*VariantResult.__dataclass_fields__, "time_vs_fl", "energy_vs_fl",
                                 "model_energy_vs_fl", "accuracy_vs_fl", "accuracy_points_vs_fl"]


def test_table_shows_accuracy_in_points_and_the_reference_oracle():
    from ares.roles.compare_cmd import table

    report = Comparison(testbed.Scenario.model_validate({**SCENARIO, "name": "t"}), "tc", testbed.ratios(
        # FL's server profile never saw a split step: its reference oracle is left out
        [variant_result("none", 4.0, 0.5, adapted_oracle_any_s=9.0), variant_result("straggler+int8+pipe4", 2.0, 0.489)]))
    text = table(report)
    row = next(line for line in text.splitlines() if line.startswith("straggler + int8 + pipe4"))
    assert "50.0%" in text and "48.9%" in row and "-1.1" in row and "0.500" in row
    assert "every codec (fp32, fp16, int8)" in text and "1.50 s per round" in text and "9.00" not in text


@pytest.mark.parametrize("bad, message", [
    ({"policies": ["fastest"]}, "unknown policy"), ({"policies": ["ares+int4"]}, "not understood"),
    ({"policies": ["straggler+pipe9"]}, r"1\.\.8"), ({"policies": ["straggler+fp16+int8"]}, "two codecs"),
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


def test_the_oracle_gives_a_tc_link_only_the_tcp_payload_of_its_rate():
    """A tc cap counts every frame's headers, so no transport gets the whole rate through; an
    in-process cap paces the payload alone."""
    from ares.runtime.netns import TCP_PAYLOAD_SHARE

    assert testbed.payload_share("tc") == TCP_PAYLOAD_SHARE == pytest.approx(0.956, abs=1e-3)
    # tests/host measured 95% of a full-duplex cap and 93% of a half-duplex one as TCP payload
    assert testbed.payload_share("tc", "half") == pytest.approx(0.936, abs=1e-3)
    assert testbed.payload_share("inprocess") == testbed.payload_share("inprocess", "half") == 1.0
    scenario = testbed.Scenario.model_validate(SCENARIO)
    states = testbed.timeline(scenario)[0]
    tele = Telemetry(round=0, model="vgg5", batch_size=20, codec="fp32", activation_numel=[32768, 8192, 16384, 4096, 4096, 128, 10],
                     weight_bytes=[4104, 4104, 79120, 79120, 227864, 2325528, 2330688],
                     server_fwd=[0.01] * 6 + [0.0], server_bwd=[0.02] * 6 + [0.0], devices=[])
    steps = {n: 2 for n in states}
    full, tc = (testbed.oracle_problem(states, tele, steps, links=links) for links in ("inprocess", "tc"))
    for a, b in zip(full.devices, tc.devices):
        assert b.up_bps == pytest.approx(a.up_bps * TCP_PAYLOAD_SHARE) and b.down_bps == pytest.approx(a.down_bps * TCP_PAYLOAD_SHARE)
    # a split that moves activations takes longer on the payload the link really carries
    assert evaluate(tc, {n: 1 for n in states}).round_s > evaluate(full, {n: 1 for n in states}).round_s
