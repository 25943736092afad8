"""End to end: pods as a real kubelet runs them, and the job lifecycle cluster users expect.

Runs of a two-device job on tiny synthetic data. Starting one takes most of the time, so a class
shares one job and each of its tests is one step of its life, in order (marker `steps`):
- `TestARunningJob`: its processes run as uid/gid 10001 with the token through the fsGroup; a
  killed trainer's pod is replaced within a tick or two; the operator's /metrics shows the
  job's phase; the job succeeds with the restart counted; /metrics shows its optimiser runs.
- `TestAPausedJob`: with downwardAPI updates delayed by 10 s (two round deadlines, ten reconcile
  ticks) a split decision still reaches the device; suspend removes the pods and keeps the
  checkpoint; resume continues from it; activeDeadlineSeconds fails the job
  (DeadlineExceeded); deleted and re-created under the same name, the job starts from round 0.
- `test_lr_10_diverges`: lr 10 ends the job Failed, reason TrainingDiverged.
Jobs that must outlive a wait have many rounds and are ended by the test, so no assertion
depends on how fast this machine trains.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support import wait_for
from tests.k8s.k8s_jobs import device_status as _device

pytestmark = [pytest.mark.k8s, pytest.mark.slow]
APP_UID = 10001


ADAPTIVE = {"mode": "adaptive", "policy": "straggler", "reoptimiseIntervalSeconds": 1}
# How late downwardAPI files follow their annotation in the delayed-split test: longer than two of
# its rounds' deadlines (5 s) and ten operator ticks, so rounds go on at the old split meanwhile.
DOWNWARD_DELAY_S = 10.0


def job(name: str, rounds: int, *, lr: float = 0.01, steps: int = 2, train: int = 200, split: dict = ADAPTIVE,
        b_split: int | None = None, **run_policy) -> str:
    """Two cpu devices and a server on the kubelet's nodes; each round a couple of tiny batches.
    `b_split` pins device b's split from the start."""
    b = {"name": "b", "deviceClass": "cpu", "nodeName": "jetson-nano-1",
         **({"split": b_split} if b_split is not None else {})}
    return yaml.safe_dump({
        "apiVersion": "ares.io/v1alpha1", "kind": "AresTrainingJob", "metadata": {"name": name},
        "spec": {
            "dataset": {"name": "synthetic", "syntheticTrain": train, "syntheticTest": 100},
            "training": {"rounds": rounds, "batchSize": 50, "maxStepsPerRound": steps, "lr": lr},
            "split": split,
            "server": {"nodeName": "edge-server"},
            "devices": [{"name": "a", "deviceClass": "cpu", "nodeName": "raspberry-pi-1"},
                        b],
            "runPolicy": {"roundDeadlineSeconds": 5, "backoffLimit": 3, **run_policy},
        }})


class Job:
    """Reads of one job through kubectl."""

    def __init__(self, kubectl, name: str):
        self.kubectl, self.name = kubectl, name

    def status(self) -> dict:
        return (self.kubectl.json("get", "aresjobs", self.name).get("status")) or {}

    def condition(self, kind: str) -> dict:
        return next((c for c in self.status().get("conditions", []) if c["type"] == kind), {})

    def pods(self) -> dict[str, dict]:
        return {p["metadata"]["name"]: p for p in self.kubectl.json("get", "pods", "-l", f"ares.io/job={self.name}")["items"]}

    def running(self, pod: str) -> dict | None:
        p = self.pods().get(pod)
        return p if p and p.get("status", {}).get("phase") == "Running" and not p["metadata"].get("deletionTimestamp") else None

    def ended(self, timeout: float) -> dict:
        return wait_for(lambda: (s := self.status()).get("phase") in ("Succeeded", "Failed") and s,
                        timeout, f"{self.name} to end", interval=0.2)


def _sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None



def metrics(c) -> str:
    return httpx.get(f"http://127.0.0.1:{c.metrics_port}/metrics", timeout=5).text


@pytest.mark.steps
@pytest.mark.skipif(os.geteuid() != 0, reason="the test kubelet switches users only as root")
class TestARunningJob:
    @pytest.fixture(scope="class")
    def life(self, shared_cluster) -> Job:
        shared_cluster.kubectl.run("apply", "-f", "-", stdin=job("life", rounds=12))
        j = Job(shared_cluster.kubectl, "life")
        wait_for(lambda: j.status().get("round", 0) >= 1, 180, "round 1", interval=0.2)
        return j

    def test_trainers_and_server_run_as_the_app_user_with_the_token_through_the_group(self, shared_cluster, life):
        for pod, container in (("life-server", "server"), ("life-a", "device"), ("life-b", "device")):
            procs = shared_cluster.kubelet.processes(pod)
            assert procs.get(container), (pod, procs)
            assert {(uid, gid) for _, uid, gid in procs[container]} == {(APP_UID, APP_UID)}, (pod, procs)
        info = (shared_cluster.kubelet.volume_dir("life-a", "token") / "token").stat()
        assert (info.st_mode & 0o777, info.st_uid, info.st_gid) == (0o440, 0, APP_UID)

    def test_a_killed_trainers_pod_is_replaced_within_two_ticks(self, shared_cluster, life):
        old_a = life.pods()["life-a"]["metadata"]["uid"]
        killed = time.monotonic()
        shared_cluster.kubelet.kill("life-a", container="device")
        wait_for(lambda: (p := life.running("life-a")) and p["metadata"]["uid"] != old_a, 20, "a's replacement",
                 interval=0.2)
        replaced_s = time.monotonic() - killed
        sys.__stdout__.write(f"\ntrainer killed -> replacement pod running: {replaced_s:.1f} s\n")  # kopf captures sys.stdout
        assert replaced_s < 5.0, replaced_s
        assert _device(life.status(), "a")["restarts"] == 1

    def test_the_operators_metrics_show_the_running_job(self, shared_cluster, life):
        ns = shared_cluster.namespace
        assert _sample(metrics(shared_cluster), "ares_operator_job_phase", namespace=ns, job="life", phase="Running") == 1.0
        assert _sample(metrics(shared_cluster), "ares_operator_jobs", phase="Running") >= 1

    def test_the_job_succeeds_with_the_restart_counted(self, life):
        final = life.ended(timeout=240)
        assert final["phase"] == "Succeeded", final.get("conditions")
        assert _device(final, "a")["restarts"] == 1

    def test_the_operators_metrics_show_the_end_and_the_optimiser_runs(self, shared_cluster, life):
        ns = shared_cluster.namespace
        text = wait_for(lambda: (t := metrics(shared_cluster)) and _sample(
            t, "ares_operator_job_phase", namespace=ns, job="life", phase="Succeeded") == 1.0 and t,
            30, "the final phase in /metrics", interval=0.2)
        assert (_sample(text, "ares_operator_optimiser_runs_total", namespace=ns, job="life") or 0) >= 1
        assert _sample(text, "ares_operator_optimiser_duration_seconds_count", namespace=ns, job="life") >= 1


@dataclass
class Paused:
    """The paused job's story so far, told from step to step."""

    job: Job
    checkpoint: Path | None = None
    saved_round: int | None = None


@pytest.mark.steps
class TestAPausedJob:
    @pytest.fixture(scope="class")
    def pause(self, shared_cluster) -> Paused:
        shared_cluster.kubelet.downward_delay_s = DOWNWARD_DELAY_S  # a changed annotation reaches the files this much later
        # b is pinned from the start, so its split annotation never changed before the patch in the
        # first step: an adaptive b's earlier decisions were still on their way to the file, and one
        # of them could be the value patched in, landing "early" (CI saw 7.7 s).
        shared_cluster.kubectl.run("apply", "-f", "-", stdin=job("pause", rounds=500, b_split=2))
        j = Job(shared_cluster.kubectl, "pause")
        wait_for(lambda: j.status().get("round", 0) >= 2, 180, "round 2", interval=0.2)
        return Paused(j)

    def test_a_split_decision_reaches_the_device_through_a_late_downward_api(self, shared_cluster, pause):
        # Pin b elsewhere: the annotation moves at once, the file (and so the device) only after the
        # delay, and then it trains with it.
        kubectl, kubelet, j = shared_cluster.kubectl, shared_cluster.kubelet, pause.job
        assert j.pods()["pause-b"]["metadata"]["annotations"]["ares.io/split-point"] == "2"
        new = 1
        rounds_with_new = kubelet.log("pause-b").count(f" split {new}:")  # the device logs "round N split S: ..."
        annotated = time.monotonic()  # no earlier than the annotation changes
        kubectl.run("patch", "aresjobs", "pause", "--type=json", "-p",
                    f'[{{"op": "add", "path": "/spec/devices/1/split", "value": {new}}}]')
        wait_for(lambda: j.pods()["pause-b"]["metadata"]["annotations"]["ares.io/split-point"] == str(new),
                 30, "b's annotation", interval=0.2)
        split_file = kubelet.volume_dir("pause-b", "podinfo") / "split-point"
        wait_for(lambda: split_file.read_text() == str(new), 60, "b's file", interval=0.2)
        landed = time.monotonic() - annotated
        assert landed >= DOWNWARD_DELAY_S, landed  # the file did not change before the delay
        wait_for(lambda: _device(j.status(), "b").get("split") == new
                 and kubelet.log("pause-b").count(f" split {new}:") > rounds_with_new,
                 60, "b training with the new split", interval=0.2)
        sys.__stdout__.write(f"\nannotation -> file {landed:.1f} s -> device trains with it "
                             f"{time.monotonic() - annotated:.1f} s\n")

    def test_suspend_removes_the_pods_and_keeps_the_checkpoint(self, shared_cluster, pause):
        kubectl, kubelet, j = shared_cluster.kubectl, shared_cluster.kubelet, pause.job
        kubectl.run("patch", "aresjobs", "pause", "--type=merge", "-p", '{"spec": {"runPolicy": {"suspend": true}}}')
        wait_for(lambda: not j.pods(), 30, "no pods", interval=0.2)
        wait_for(lambda: j.status().get("phase") == "Suspended", 30, "Suspended", interval=0.2)
        assert j.condition("Suspended")["status"] == "True"
        uid = kubectl.json("get", "aresjobs", "pause")["metadata"]["uid"]
        pause.checkpoint = kubelet.root / "host" / "var/lib/ares/checkpoints" / shared_cluster.namespace / f"pause-{uid}"
        pause.saved_round = json.loads((pause.checkpoint / "state.json").read_text())["round"]
        assert pause.saved_round >= 2 and (pause.checkpoint / "global.safetensors").exists()
        assert pause.checkpoint.stat().st_uid == (APP_UID if os.geteuid() == 0 else os.geteuid())  # the init step's chown

    def test_resume_continues_from_the_checkpoint(self, shared_cluster, pause):
        kubectl, kubelet, j = shared_cluster.kubectl, shared_cluster.kubelet, pause.job
        kubectl.run("patch", "aresjobs", "pause", "--type=merge", "-p", '{"spec": {"runPolicy": {"suspend": false}}}')
        resumed = wait_for(lambda: re.findall(r"resumed from checkpoint at round (\d+)", kubelet.log("pause-server")),
                           90, "resumed from the checkpoint", interval=0.2)
        assert int(resumed[-1]) == pause.saved_round
        assert j.condition("Suspended")["status"] == "False" and j.condition("Suspended")["reason"] == "JobResumed"

    def test_active_deadline_seconds_counted_from_the_resume_fails_the_job(self, shared_cluster, pause):
        kubectl, j = shared_cluster.kubectl, pause.job
        kubectl.run("patch", "aresjobs", "pause", "--type=merge", "-p",
                    '{"spec": {"runPolicy": {"activeDeadlineSeconds": 2}}}')
        final = j.ended(timeout=30)
        assert final["phase"] == "Failed" and j.condition("Failed")["reason"] == "DeadlineExceeded"
        wait_for(lambda: not [p for p in j.pods().values() if p["status"].get("phase") == "Running"],
                 30, "no running pods", interval=0.2)

    def test_a_namesake_job_starts_from_round_0(self, shared_cluster, pause):
        kubectl, kubelet, j = shared_cluster.kubectl, shared_cluster.kubelet, pause.job
        kubectl.run("delete", "aresjobs", "pause")
        kubectl.run("apply", "-f", "-", stdin=job("pause", rounds=200))
        wait_for(lambda: j.running("pause-server"), 120, "the new job's server", interval=0.2)
        wait_for(lambda: "round" in j.status() and j.status().get("phase") == "Running",
                 120, "its first status", interval=0.2)
        assert j.status()["round"] <= 1
        assert "resumed from checkpoint" not in kubelet.log("pause-server")


def test_lr_10_diverges(server_port, kubelet, operator, kubectl):
    # lr stays 10 for rounds 0..9 (lrDecayRound defaults to rounds/2); 10 steps blow the loss up.
    # A fixed split: every step reaches the server, which sees each non-finite loss. (An adaptive
    # plan may put a device's whole model on it, and then only its refused upload shows.)
    kubectl.run("apply", "-f", "-", stdin=job("hot", rounds=20, lr=10, steps=10, train=1000,
                                              split={"mode": "fixed", "point": 1}))
    j = Job(kubectl, "hot")
    final = j.ended(timeout=240)
    failed = j.condition("Failed")
    assert final["phase"] == "Failed" and failed["reason"] == "TrainingDiverged", final.get("conditions")
    assert "diverged" in failed["message"]
