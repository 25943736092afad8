"""`ares bench` with a variant whose policy chooses power modes (`+modes`), cut short.

A Raspberry Pi on a 2 Mbit/s link sets the round; the Nano beside it has seconds of slack (its
rounds take a fraction of the Pi's even where this machine is slower than the emulated Nano). The
policy must move the Nano to a low-power mode at the next round, the device must run its rounds
in that mode (the emulated nvpmodel: its profile and power table), and the comparison must say
so; the round must not grow for it.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ares.core.energy import energy_j, power_model

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = {
    "name": "modes",
    "training": {"rounds": 4, "batch_size": 20, "max_steps_per_round": 2, "seed": 1},
    "data": {"name": "synthetic", "synthetic_train": 120, "synthetic_test": 60, "seed": 1},
    "devices": [{"name": "pi", "profile": "raspberry-pi", "up_mbps": 2},
                {"name": "nano", "profile": "jetson-nano/MAXN", "up_mbps": 40}],
    "policies": ["straggler+modes"],
    "profile_scale": 0.2,
    "settle_rounds": 1,
}
ROUND_LINE = re.compile(r"round (?P<round>\d+) split \d+: .*; (?P<j>[\d.]+) J (?P<source>\w+) at (?P<mode>\w+)'s power "
                        r"\(compute (?P<compute>[\d.]+) s, send (?P<send>[\d.]+) s, receive (?P<receive>[\d.]+) s\)")


@pytest.mark.slow
def test_the_nano_with_slack_runs_in_a_low_power_mode_chosen_by_the_policy(tmp_path):
    (tmp_path / "modes.yaml").write_text(yaml.safe_dump(SCENARIO))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "ares", "bench", str(tmp_path / "modes.yaml"), "--links", "inprocess",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=env, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    run = tmp_path / "out" / "straggler-modes"
    with open(run / "splits.csv", newline="") as f:
        decided = [r for r in csv.DictReader(f) if r["device"] == "nano"]
    modes = [r["power_mode"] for r in decided]
    assert modes[0] in ("custom3", "custom1", "5W") and len(set(modes)) == 1, modes  # chosen once, then kept
    assert decided[0]["mode_source"] == "derived" and decided[-1]["mode_source"] == "measured"
    assert f"power mode MAXN -> {modes[0]} (emulated)" in (run / "logs" / "nano.log").read_text()
    # the rounds after the switch ran in that mode: the device reported it, and its energy is that mode's
    # table over the round's measured times (which this machine's load sets; the tables do not depend on it)
    lines = {int(m["round"]): m for m in ROUND_LINE.finditer((run / "logs" / "nano.log").read_text())}
    state = json.loads((run / "checkpoints" / "state.json").read_text())
    assert sorted(lines) == [h["round"] for h in state["history"]] == list(range(4))
    for h in state["history"]:
        line, reported = lines[h["round"]], h["devices"]["nano"]
        mode = "MAXN" if h["round"] == 0 else modes[0]
        assert line["mode"] == mode and line["source"] == reported["energy_source"] == "modelled"
        expected = energy_j(power_model("jetson-nano", mode), *(float(line[k]) for k in ("compute", "send", "receive")))
        assert float(line["j"]) == pytest.approx(reported["energy_j"], abs=1e-4)  # the line's figure is the reported one
        assert float(line["j"]) == pytest.approx(expected, abs=2e-3)  # times printed to 0.1 ms, at up to 7.3 W
    report = json.loads((tmp_path / "out" / "comparison.json").read_text())
    [variant] = report["variants"]
    assert variant["power_modes"] == {"nano": f"{modes[0]}"}  # every steady round in the chosen mode
    assert all(r["power_modes"] == {"nano": modes[0]} for r in variant["rounds"][1:])
    assert f"power modes chosen, straggler + modes: nano {modes[0]}" in done.stdout
    table = power_model("jetson-nano", modes[0])
    assert table.compute_w < power_model("jetson-nano", "MAXN").compute_w
