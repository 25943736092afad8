"""The sidecar and power modes, as a real process on a fake Jetson (tests.support's fake nvpmodel):
the mode in force reported, a switch held back while the trainer is inside a round, its pause
measured, a failed switch reported until one succeeds, a mode changed by hand noticed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ares.runtime.hostmode import read_host_mode, write_trainer_state
from tests.support import install_fake_nvpmodel, stop_process, wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def jetson(tmp_path):
    """A fake host: nvpmodel (ID 1, 5W, fails), stand-in shaping scripts, the annotations file."""
    nvpmodel = install_fake_nvpmodel(tmp_path / "bin", fail_ids=(1,))
    scripts = tmp_path / "hostscripts"
    scripts.mkdir()
    for name in ("ares-shape", "ares-unshape"):
        (scripts / name).write_text("#!/bin/sh\nexit 0\n")
        (scripts / name).chmod(0o755)
    annotations = tmp_path / "annotations"
    annotations.write_text("")
    state = tmp_path / "state"
    trainer = tmp_path / "trainer" / "trainer.json"
    trainer.parent.mkdir()
    env = dict(os.environ, ARES_HOSTSCRIPTS=str(scripts),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "ares.roles.sidecar", "--annotations", str(annotations), "--interface", "eth9",
         "--nvpmodel", str(nvpmodel), "--nvpmodel-conf", str(ROOT / "hostscripts" / "nvpmodel.conf"),
         "--power-path", str(tmp_path / "none"), "--state-dir", str(state), "--poll", "0.1",
         "--mode-query", "0.5", "--trainer-file", str(trainer)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield {"annotations": annotations, "hostctl": state / "hostctl.json", "trainer": trainer,
           "log": tmp_path / "bin" / "nvpmodel.log", "state": tmp_path / "bin" / "nvpmodel.state", "proc": proc}
    stop_process(proc)


def annotate(path: Path, mode: str) -> None:
    tmp = path.with_name(".tmp")
    tmp.write_text(f"ares.io/power-mode={json.dumps(mode)}\n")
    os.replace(tmp, path)


def switches(host) -> list[str]:
    return [line for line in host["log"].read_text().splitlines() if " -m " in line]


def mode_in_force(host):
    return read_host_mode(host["hostctl"])


def test_modes_switch_between_rounds_only_and_are_reported(jetson):
    host = jetson
    # the mode in force before anything was asked: what nvpmodel -q says
    assert wait_for(lambda: (m := mode_in_force(host)) and m.power_mode, 10, "mode in force") == "MAXN"

    write_trainer_state(host["trainer"], 3, busy=True)
    annotate(host["annotations"], "custom3")
    with pytest.raises(AssertionError):
        wait_for(lambda: switches(host), 1.5, "a switch mid-round")
    waiting = mode_in_force(host)
    assert waiting.power_mode == "MAXN" and waiting.pending  # the trainer is told a switch waits

    write_trainer_state(host["trainer"], 3, busy=False)  # the round ended: the switch goes ahead
    now = wait_for(lambda: (m := mode_in_force(host)) and m.power_mode == "custom3" and m, 5, "switched")
    assert switches(host) == [f"nvpmodel -f {ROOT / 'hostscripts' / 'nvpmodel.conf'} -m 3"]
    assert now.switch_s >= 0.2 and not now.failed and not now.switching and not now.pending  # the fake pauses 0.2 s
    assert host["state"].read_text().split() == ["custom3", "3"]

    # a switch that nvpmodel refuses: reported with why, the mode in force kept
    annotate(host["annotations"], "5W")
    failed = wait_for(lambda: (m := mode_in_force(host)) and m.failed and m, 5, "failure reported")
    assert failed.failed == "5W" and "NVPM ERROR" in failed.problem and failed.power_mode == "custom3"

    # a mode changed by hand is noticed (asked of nvpmodel every --mode-query seconds)
    host["state"].write_text("MAXN 0\n")
    wait_for(lambda: mode_in_force(host).power_mode == "MAXN", 5, "mode changed by hand")

    # a later switch that succeeds clears the failure
    annotate(host["annotations"], "custom1")
    ok = wait_for(lambda: (m := mode_in_force(host)) and m.power_mode == "custom1" and m, 5, "switched again")
    assert ok.failed == "" and ok.problem == ""
