"""Power modes through the operator, on the real control plane, with the real host-control sidecar.

A job with `split.choosePowerModes` on two Jetson Nanos. The node's nvpmodel is a fake (a script
at the node's /usr/sbin/nvpmodel, a hostPath): each sidecar's mode lives in its container's home,
both start in custom1 (the slowest mode), and nano `b`'s nvpmodel fails every switch. The
policy wants both faster. (The fake does not change a device's speed, so a device's next plan,
from a profile measured "in" the new mode, may move it again: only the first switch is checked.) For `a`: the operator sets `ares.io/power-mode` on its pod, the sidecar
switches between rounds and reports the mode in force, the trainer runs in it. For `b`: the
failed switch is a Warning Event on the job, and the next plan is for the mode in force (the
annotation goes back to custom1).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from ares.runtime.hostmode import read_host_mode
from tests.k8s.k8s_kubelet import Kubelet
from tests.support import wait_for

pytestmark = [pytest.mark.k8s, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
MODE = "ares.io/power-mode"
NAME = "modes"

FAKE_NVPMODEL = r"""#!/bin/sh
# The node's nvpmodel, faked: the mode of the calling container lives in its $HOME; custom1 at
# first; a container of pod modes-b cannot switch.
state="$HOME/nvpmodel.state"
conf=/etc/nvpmodel.conf
[ -f "$state" ] || printf 'custom1 2\n' > "$state"
while [ $# -gt 0 ]; do
    case $1 in
        -f) conf=$2; shift 2 ;;
        -q) read -r name id < "$state"; printf 'NV Power Mode: %s\n%s\n' "$name" "$id"; exit 0 ;;
        -m) case $HOME in */modes-b-*) echo "NVPM ERROR: cannot set power mode $2 on this board" >&2; exit 1 ;; esac
            name=$(sed -n "s/.*POWER_MODEL ID=$2 NAME=\([^ >]*\).*/\1/p" "$conf")
            [ -n "$name" ] || { echo "NVPM ERROR: no mode $2" >&2; exit 1; }
            printf '%s %s\n' "$name" "$2" > "$state"; exit 0 ;;
        *) shift ;;
    esac
done
"""


@pytest.fixture
def kubelet(control_plane, namespace, server_port, tmp_path):
    """The session's kind of kubelet, running the real sidecar (shaping nothing) on a fake nvpmodel."""
    scripts = tmp_path / "hostscripts"
    scripts.mkdir()
    for name in ("ares-shape", "ares-unshape"):
        (scripts / name).write_text("#!/bin/sh\nexit 0\n")
        (scripts / name).chmod(0o755)
    with Kubelet(control_plane.http(), tmp_path / "node", server_port, namespace, real_sidecar=scripts) as k:
        nvpmodel = k.root / "host" / "usr" / "sbin" / "nvpmodel"
        nvpmodel.parent.mkdir(parents=True)
        nvpmodel.write_text(FAKE_NVPMODEL)
        nvpmodel.chmod(0o755)
        (k.root / "host" / "etc").mkdir()
        (k.root / "host" / "etc" / "nvpmodel.conf").write_text((ROOT / "hostscripts" / "nvpmodel.conf").read_text())
        yield k
        for pod in sorted({p.name for p in k.pods.values()}):
            print(f"--- {pod} ---\n{k.log(pod)[-2500:]}")


def job() -> str:
    return yaml.safe_dump({
        "apiVersion": "ares.io/v1alpha1", "kind": "AresTrainingJob", "metadata": {"name": NAME},
        "spec": {
            "dataset": {"name": "synthetic", "syntheticTrain": 200, "syntheticTest": 100},
            "training": {"rounds": 500, "batchSize": 50, "maxStepsPerRound": 2},
            "split": {"mode": "adaptive", "policy": "straggler", "reoptimiseIntervalSeconds": 1,
                      "choosePowerModes": True},
            "server": {"nodeName": "edge-server"},
            "devices": [{"name": "a", "deviceClass": "jetson-nano", "nodeName": "jetson-nano-1"},
                        {"name": "b", "deviceClass": "jetson-nano", "nodeName": "jetson-nano-2"}],
            "runPolicy": {"roundDeadlineSeconds": 10},
        }})


def pod_mode(kubectl, device: str) -> str:
    pod = kubectl.json("get", "pod", f"{NAME}-{device}")
    return (pod["metadata"].get("annotations") or {}).get(MODE, "")


def in_force(kubelet, device: str):
    state = kubelet.volume_dir(f"{NAME}-{device}", "state")
    return read_host_mode(state / "hostctl.json") if state else None


def events(kubectl, reason: str) -> list[dict]:
    return [e for e in kubectl.json("get", "events")["items"]
            if e.get("reason") == reason and e["involvedObject"].get("name") == NAME]


def test_the_operator_sets_power_modes_and_a_failed_switch_falls_back(server_port, kubelet, operator, kubectl):
    kubectl.run("apply", "-f", "-", stdin=job())
    # every sidecar first reports the mode nvpmodel says is in force
    for d in ("a", "b"):
        wait_for(lambda: (m := in_force(kubelet, d)) and m.power_mode == "custom1", 120,
                 f"{d}'s sidecar reporting custom1", interval=0.2)

    # a: the plan's mode on the pod, applied by the sidecar, reported, and the trainer runs in it
    def switched():
        mode = pod_mode(kubectl, "a")
        host = in_force(kubelet, "a")
        if not mode or mode == "custom1" or host is None or host.power_mode != mode:
            return None
        return mode if f"power mode in force: {mode}" in kubelet.log(f"{NAME}-a") else None
    mode = wait_for(switched, 180, "a's planned mode applied and in force", interval=0.2)
    sys.__stdout__.write(f"\nplanned and applied on a: {mode}\n")  # kopf captures sys.stdout
    host = in_force(kubelet, "a")
    assert host.switch_s is not None and not host.failed
    assert f"applied power_mode={mode}" in kubelet.log(f"{NAME}-a")

    # b: its switch failed; an Event says so, and the plan goes back to the mode in force
    [event] = wait_for(lambda: events(kubectl, "PowerModeNotApplied"), 180, "the failed switch's Event", interval=0.5)
    assert event["type"] == "Warning" and "device b" in event["message"] and "NVPM ERROR" in event["message"]
    assert "planning for the mode in force, custom1" in event["message"]
    assert in_force(kubelet, "b").power_mode == "custom1" and in_force(kubelet, "b").failed
    wait_for(lambda: pod_mode(kubectl, "b") == "custom1", 60, "b's annotation back at its mode in force",
             interval=0.2)
    state = json.loads((kubelet.volume_dir(f"{NAME}-b", "state") / "hostctl.json").read_text())
    assert state["power_mode_failure"]["reason"].startswith("nvpmodel failed")
    kubectl.run("delete", "aresjobs", NAME, "--wait=true")
