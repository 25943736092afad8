"""`ares optimise` on fleet files: hand-computed plans, overrides, errors, the shipped example.

The hand fleet is the optimiser tests' case with true byte counts: batch 1, 100 and 25 values
per sample after layers 0 and 1 (fp32) plus an 8-byte label, so up = (408, 108, 0) bytes and
down = (400, 100, 0). At 200 B/s (0.0016 Mbit/s) each way:
  A: rounds (61.4, 37.4, 43) s, round energy at split 1: 10 * (2*2 + 0.54 + 0.5) + 2 = 52.4 J
  B: rounds (52.4, 19.4, 7) s, round energy (51.4, 32.4, 43) J
so `straggler` keeps the 37.4 s round and moves B to split 1 (84.8 J in all).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ares.roles import optimise_cmd

ROOT = Path(__file__).resolve().parents[2]
PAPER5 = ROOT / "examples" / "fleet-paper5.yaml"
MBPS_200_BPS = 200 * 8 / 1e6


def hand_fleet(**changes) -> dict:
    def dev(name, halves, watts):
        return {"name": name, "profile": {"fwd": halves, "bwd": halves, "batch_size": 1},
                "power": dict(zip(("compute_w", "tx_w", "rx_w"), watts)),
                "up_mbps": MBPS_200_BPS, "down_mbps": MBPS_200_BPS, "iterations": 10}
    fleet = {"activation_numel": [100, 25], "weight_bytes": [100, 200, 300], "batch_size": 1,
             "server": {"fwd": [0.5, 0.25, 0.0], "bwd": [0.5, 0.25, 0.0], "batch_size": 1},
             "devices": [dev("A", [0.5, 1.0, 2.0], [2, 1, 1]), dev("B", [0.05, 0.1, 0.2], [10, 1, 1])]}
    return {**fleet, **changes}


def write(tmp_path: Path, fleet: dict) -> str:
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(fleet))
    return str(path)


def run_json(capsys, *argv) -> dict:
    assert optimise_cmd.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def splits(data: dict) -> dict[str, int]:
    return {d["name"]: d["split"] for d in data["devices"]}


def test_straggler_plan_for_the_hand_fleet(tmp_path, capsys):
    data = run_json(capsys, write(tmp_path, hand_fleet()), "--policy", "straggler")
    assert splits(data) == {"A": 1, "B": 1}
    assert data["round_s"] == pytest.approx(37.4)
    assert data["energy_round_j"] == pytest.approx(84.8)
    assert data["baseline_none"]["round_s"] == pytest.approx(43)


def test_uplink_override_for_one_device_flips_its_split(tmp_path, capsys):
    # B's uplink at 50 B/s: split 1 would take 38.6 s > 37.4 s, so B keeps every layer (11.5 s).
    data = run_json(capsys, write(tmp_path, hand_fleet()), "--policy", "straggler", "--up-mbps", "B=0.0004")
    assert splits(data) == {"A": 1, "B": 2}
    b = data["devices"][1]
    assert (b["up_mbps"], b["down_mbps"]) == pytest.approx((0.0004, MBPS_200_BPS))
    assert b["round_s"] == pytest.approx(11.5)


def test_alpha_and_share_server_flags(tmp_path, capsys):
    path = write(tmp_path, hand_fleet())
    assert splits(run_json(capsys, path, "--policy", "straggler", "--alpha", "1")) == {"A": 1, "B": 2}
    shared = run_json(capsys, path, "--policy", "straggler", "--share-server")
    assert splits(shared) == {"A": 1, "B": 2} and shared["server_shared"] is True


def test_share_server_takes_the_policy_name_in_any_case(tmp_path, capsys):
    shared = run_json(capsys, write(tmp_path, hand_fleet()), "--policy", "Straggler", "--share-server")
    assert shared["server_shared"] is True and shared["policy"] == "straggler"


def test_fp16_codec_halves_the_activation_bytes(tmp_path, capsys):
    fp32 = run_json(capsys, write(tmp_path, hand_fleet()), "--policy", "fixed:0")
    fp16 = run_json(capsys, write(tmp_path, hand_fleet(codec="fp16")), "--policy", "fixed:0")
    assert fp32["devices"][0]["up_s"] == pytest.approx(408 / 200)
    assert fp16["devices"][0]["up_s"] == pytest.approx(208 / 200)
    assert fp16["devices"][0]["down_s"] == pytest.approx(fp32["devices"][0]["down_s"] / 2)
    int8 = run_json(capsys, write(tmp_path, hand_fleet(codec="int8")), "--policy", "fixed:0")
    assert int8["devices"][0]["up_s"] == pytest.approx(108 / 200)  # 1 byte a value, labels still 8
    assert int8["devices"][0]["down_s"] == pytest.approx(fp32["devices"][0]["down_s"] / 4)


@pytest.mark.parametrize("fleet, argv, error", [
    (hand_fleet(), ["--policy", "fastest"], "accepted: ares, straggler, fixed:N, none"),
    (hand_fleet(), ["--policy", "fixed:7"], "0..2"),
    (hand_fleet(), ["--up-mbps", "C=3"], "no device 'C'; devices: A, B"),
    (hand_fleet(), ["--down-mbps", "fast"], "NAME=MBPS"),
    (hand_fleet(devices=[]), [], "devices"),
    (hand_fleet(model="vgg5"), [], "not both"),
    (hand_fleet(weight_bytes=None), [], "model costs missing"),
    (hand_fleet(server="missing.json"), [], "missing.json"),
    (hand_fleet(devices=[{**hand_fleet()["devices"][0], "power": None, "device_class": "toaster"}]), [],
     "no power model for device class 'toaster'"),
    (hand_fleet(devices=[{**hand_fleet()["devices"][0], "pinned_split": True}]), [], "pinned_split"),
    (hand_fleet(), ["--policy", "ares", "--share-server"], "for the straggler policy only"),
    (hand_fleet(), ["--policy", "fixed:1", "--share-server"], "for the straggler policy only"),
    (hand_fleet(devices=[{**hand_fleet()["devices"][0], "up_mbps": 1e300}]), [], "up_bps must be within"),
    (hand_fleet(devices=[{**hand_fleet()["devices"][0], "down_mbps": 1e-300}]), [], "down_bps must be within"),
    (hand_fleet(), ["--down-mbps", "inf"], "down_bps must be within"),
], ids=["policy", "fixed-range", "override-name", "override-value", "no-devices", "two-models",
        "no-model", "server-file", "power", "pinned-true", "share-server-with-ares", "share-server-with-fixed",
        "huge-link", "tiny-link", "inf-override"])
def test_bad_input_exits_2_with_a_reason(tmp_path, capsys, fleet, argv, error):
    assert optimise_cmd.main([write(tmp_path, fleet), *argv]) == 2
    assert error in capsys.readouterr().err


def test_plain_table_without_rich(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "rich.console", None)  # import now fails: the plain-text path
    assert optimise_cmd.main([write(tmp_path, hand_fleet()), "--policy", "straggler"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["device", "class/mode", "split"]
    assert [line.split()[:2] for line in lines[1:3]] == [["A", "1"], ["B", "1"]]
    assert lines[-1].startswith("policy straggler: round 37.40 s, energy 84.8 J per round")


def test_register_adds_the_subcommand(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="ares")
    optimise_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["optimise", write(tmp_path, hand_fleet()), "--policy", "none", "--json"])
    assert args.func(args) == 0
    assert splits(json.loads(capsys.readouterr().out)) == {"A": 2, "B": 2}


def test_the_paper_fleet_in_a_real_process():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "ares.roles.optimise_cmd", str(PAPER5), "--policy", "straggler",
                          "--json"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60, check=True)
    data = json.loads(out.stdout)
    assert [d["name"] for d in data["devices"]] == ["pi4", "nano-maxn", "nano-5w", "nano-custom1", "nano-custom3"]
    assert data["round_s"] == max(d["round_s"] for d in data["devices"])
    assert data["round_s"] <= data["baseline_none"]["round_s"]
    assert data["energy_round_j"] == pytest.approx(sum(d["energy_round_j"] for d in data["devices"]))
    assert {d["profile_source"] for d in data["devices"]} == {"published", "derived"}


def test_model_name_gives_the_same_costs_as_the_explicit_lists(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("ares.core.models")
    fleet = yaml.safe_load(PAPER5.read_text())
    del fleet["activation_numel"], fleet["weight_bytes"]
    fleet["model"] = "vgg5"
    by_name = tmp_path / "fleet.yaml"
    by_name.write_text(yaml.safe_dump(fleet).replace("profiles/", str(PAPER5.parent / "profiles") + "/"))
    assert run_json(capsys, str(by_name)) == run_json(capsys, str(PAPER5))


@pytest.mark.parametrize("extra, code", [(["--json"], 141), ([], 1)], ids=["json", "table"])
def test_a_closed_pipe_is_no_traceback(extra, code):
    """`ares optimise FLEET | head -1`: the reader leaves before the output is written (the
    table goes through rich, which exits 1 quietly on its own; the JSON through print)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "ares", "optimise", str(ROOT / "examples" / "fleet-paper5.yaml"),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.close()  # long before the child has imported anything, so its first write fails
    _, err = proc.communicate(timeout=120)
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()
    assert proc.returncode == code


def test_a_profile_file_shared_by_many_devices_is_read_once(tmp_path, monkeypatch):
    from ares.core.profiles import ComputeProfile
    from ares.roles import optimise_cmd

    (tmp_path / "pi.json").write_text((ROOT / "examples" / "profiles" / "pi4.json").read_text())
    fleet = {"model": "vgg5", "server": str(ROOT / "examples" / "profiles" / "server-example.json"),
             "devices": [{"name": f"pi-{i}", "profile": "pi.json", "up_mbps": 20, "down_mbps": 20, "iterations": 10}
                         for i in range(50)]}
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(fleet))
    reads = []
    real = ComputeProfile.load.__func__
    monkeypatch.setattr(ComputeProfile, "load", classmethod(lambda cls, p: reads.append(p) or real(cls, p)))
    problem = optimise_cmd.build_problem(optimise_cmd.load_fleet(path), tmp_path, {}, {})
    assert len(problem.devices) == 50 and len(reads) == 1


def test_fleet_and_scenario_yaml_go_through_the_c_loader_when_pyyaml_has_it(tmp_path, monkeypatch):
    """yaml.safe_load is PyYAML's pure-Python parser: most of `ares optimise`'s time at 10,000 devices."""
    from ares.core import config, yamlfile
    from ares.roles import testbed

    if yaml.__with_libyaml__:
        assert yamlfile.SAFE_LOADER is yaml.CSafeLoader
    used = []

    class Counting(yamlfile.SAFE_LOADER):  # type: ignore[misc, valid-type]
        def __init__(self, stream):
            used.append(stream)
            super().__init__(stream)

    monkeypatch.setattr(yamlfile, "SAFE_LOADER", Counting)
    assert len(optimise_cmd.load_fleet(Path(write(tmp_path, hand_fleet()))).devices) == 2
    assert testbed.load_scenario("paper5").name == "paper5"
    (tmp_path / "run.yaml").write_text("mode: adaptive\n")
    from ares.roles.runconfig import RunConfig
    assert config.load_yaml_model(RunConfig, tmp_path / "run.yaml").mode == "adaptive"
    assert len(used) == 3  # the fleet, the scenario, the run config


def test_the_c_loader_is_as_safe_as_safe_load(tmp_path, capsys):
    path = tmp_path / "fleet.yaml"
    path.write_text("!!python/object/apply:os.system ['true']\n")
    assert optimise_cmd.main([str(path)]) == 2
    assert "cannot read fleet file" in capsys.readouterr().err


def test_without_libyaml_the_python_safe_loader_is_used(monkeypatch):
    import importlib

    from ares.core import yamlfile

    monkeypatch.delattr(yaml, "CSafeLoader", raising=False)
    try:
        assert importlib.reload(yamlfile).SAFE_LOADER is yaml.SafeLoader
        assert yamlfile.safe_load("a: [1, 2]") == {"a": [1, 2]}
    finally:
        monkeypatch.undo()
        importlib.reload(yamlfile)
