"""Step options through the operator: a job's `training.offer` lets the adaptive controller choose each
device's (codec, micro-batches); the choice reaches the device pod as the `ares.io/step-options`
annotation, the downwardAPI projects it beside the split file (`split-point.options`) and the
device trains with it. A job without an offer gets neither annotation nor file.

Two short runs, one after the other (the test kubelet gives one job's server one loopback port);
each ends as soon as the operator has made a plan and the devices have read it.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
import yaml

from tests.support import wait_for

pytestmark = [pytest.mark.k8s, pytest.mark.slow]
DEVICES = ("a", "b")
OPTIONS = "ares.io/step-options"


def job(name: str, offer: dict | None = None) -> str:
    """Two cpu devices on tiny synthetic data; many rounds: the test ends it."""
    training = {"rounds": 500, "batchSize": 50, "maxStepsPerRound": 2, **({"offer": offer} if offer else {})}
    return yaml.safe_dump({
        "apiVersion": "ares.io/v1alpha1", "kind": "AresTrainingJob", "metadata": {"name": name},
        "spec": {
            "dataset": {"name": "synthetic", "syntheticTrain": 200, "syntheticTest": 100},
            "training": training,
            "split": {"mode": "adaptive", "policy": "straggler", "reoptimiseIntervalSeconds": 1},
            "server": {"nodeName": "edge-server"},
            "devices": [{"name": "a", "deviceClass": "cpu", "nodeName": "raspberry-pi-1"},
                        {"name": "b", "deviceClass": "cpu", "nodeName": "jetson-nano-1"}],
            "runPolicy": {"roundDeadlineSeconds": 5},
        }})


def plan_message(kubectl, name: str) -> str:
    """SplitsApplied's message once there is a plan ("splits a=3, b=1; step options a=int8:2, ..."), else ''."""
    status = kubectl.json("get", "aresjobs", name).get("status") or {}
    cond = next((c for c in status.get("conditions") or [] if c["type"] == "SplitsApplied"), {})
    return cond.get("message", "") if cond.get("status") == "True" else ""


def annotations(kubectl, name: str) -> dict[str, dict]:
    pods = kubectl.json("get", "pods", "-l", f"ares.io/job={name},ares.io/role=device")["items"]
    return {p["metadata"]["labels"]["ares.io/device"]: p["metadata"].get("annotations") or {} for p in pods}


def last_options_read(kubelet, pod: str) -> dict | None:
    """What the device logged when it last read new options ("step options codec='int8' micro_batches=2")."""
    found = re.findall(r"step options codec='(\w+)' micro_batches=(\d+)", kubelet.log(pod))
    return {"codec": found[-1][0], "micro_batches": int(found[-1][1])} if found else None


def end(kubectl, name: str) -> None:
    kubectl.run("delete", "aresjobs", name, "--wait=true")
    wait_for(lambda: not kubectl.json("get", "pods", "-l", f"ares.io/job={name}")["items"],
             60, f"{name}'s pods gone", interval=0.2)


def test_an_offer_reaches_the_devices_as_step_options(server_port, kubelet, operator, kubectl):
    # 1. With an offer: from the start each pod carries the job's own options, projected as a file.
    kubectl.run("apply", "-f", "-", stdin=job("offered", {"codecs": ["int8"], "microBatches": [2]}))
    own = {"codec": "fp32", "micro_batches": 1}
    wait_for(lambda: set(annotations(kubectl, "offered")) == set(DEVICES),
             30, "the offered job's device pods", interval=0.2)
    assert {d: json.loads(a[OPTIONS]) for d, a in annotations(kubectl, "offered").items()} == dict.fromkeys(DEVICES, own)

    # The plan's choice per device (in the condition, on the pod, in the projected file) is what the device reads.
    def consistent():
        message = plan_message(kubectl, "offered")  # "splits a=3, b=1; step options a=int8:2, b=fp32:1"
        if "; step options " not in message:
            return None
        planned = {d: {"codec": v.split(":")[0], "micro_batches": int(v.split(":")[1])} for d, v in
                   (kv.split("=") for kv in message.split("; step options ")[1].split(", "))}
        pods = annotations(kubectl, "offered")
        if {d: json.loads(pods[d][OPTIONS]) for d in DEVICES} != planned:
            return None
        for d in DEVICES:
            projected = kubelet.volume_dir(f"offered-{d}", "podinfo") / "split-point.options"
            if not projected.exists() or json.loads(projected.read_text()) != planned[d]:
                return None
            if last_options_read(kubelet, f"offered-{d}") != planned[d]:
                return None
        return planned
    planned = wait_for(consistent, 180, "the plan's step options on the pods, in their files and read by the devices",
                       interval=0.2)
    sys.__stdout__.write(f"\nplanned step options: {planned}\n")  # kopf captures sys.stdout
    assert all((p["codec"], p["micro_batches"]) in {("fp32", 1), ("fp32", 2), ("int8", 1), ("int8", 2)}
               for p in planned.values())
    end(kubectl, "offered")

    # 2. Without an offer: a plan, splits on the pods, and no options anywhere.
    kubectl.run("apply", "-f", "-", stdin=job("plain"))
    message = wait_for(lambda: plan_message(kubectl, "plain"), 180, "the plain job's plan", interval=0.2)
    assert "step options" not in message
    pods = annotations(kubectl, "plain")
    assert set(pods) == set(DEVICES) and all("ares.io/split-point" in a and OPTIONS not in a for a in pods.values())
    for d in DEVICES:
        podinfo = kubelet.volume_dir(f"plain-{d}", "podinfo")
        assert (podinfo / "split-point").exists() and not (podinfo / "split-point.options").exists()
        assert last_options_read(kubelet, f"plain-{d}") is None
