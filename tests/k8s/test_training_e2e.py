"""End to end without a cluster: kubectl applies a job, the operator runs it, the test kubelet trains it.

One job, one test (the processes take most of the time to start): it trains on synthetic data,
the optimiser's splits reach the device processes, a killed device pod is replaced and its
device rejoins while the rounds go on without it, a restarted operator duplicates nothing, and
the job ends Succeeded.
"""

from __future__ import annotations

import base64

import pytest
import yaml

from ares.runtime.controller import fetch_status
from conftest import ROOT, wait_for

pytestmark = [pytest.mark.k8s, pytest.mark.slow]
DEVICES = ("nano-maxn", "nano-5w", "pi")


def small_job() -> str:
    """The example job, shrunk to seconds per round of synthetic training."""
    job = yaml.safe_load((ROOT / "examples" / "job.yaml").read_text())
    job["spec"]["dataset"].update(syntheticTrain=300, syntheticTest=100)
    job["spec"]["training"].update(rounds=14, batchSize=50, maxStepsPerRound=3)
    job["spec"]["split"]["reoptimiseIntervalSeconds"] = 1
    job["spec"]["runPolicy"]["roundDeadlineSeconds"] = 8
    return yaml.safe_dump(job)


def test_applied_job_trains_to_success(server_port, kubelet, operator, kubectl):
    kubectl.run("apply", "-f", "-", stdin=small_job())
    job = lambda: kubectl.json("get", "aresjobs", "vgg5-demo")
    status = lambda: job().get("status") or {}
    pods = lambda: {p["metadata"]["name"]: p for p in kubectl.json("get", "pods")["items"]}
    token = lambda: base64.b64decode(kubectl.json("get", "secret", "vgg5-demo-tokens")["data"]["controller.token"]).decode()
    server = lambda: fetch_status(f"http://127.0.0.1:{server_port}", token(), 5)

    # It trains: kubectl shows the round advancing and an accuracy.
    wait_for("round 1", lambda: status().get("round", 0) >= 1, timeout=90)
    row = kubectl.table("aresjobs")[0]
    assert row["PHASE"] == "Running" and row["ROUND"].endswith("/14") and float(row["ACCURACY"]) >= 0

    # The optimiser's plan is on the pods, and the device processes train with it.
    plan = wait_for("a split plan", lambda: (c := {c["type"]: c for c in status().get("conditions", [])})
                    .get("SplitsApplied", {}).get("status") == "True" and c["SplitsApplied"]["message"])
    def picked_up():
        annotated = {d: int(pods()[f"vgg5-demo-{d}"]["metadata"]["annotations"]["ares.io/split-point"]) for d in DEVICES}
        reported = {d: s.split for d, s in server().devices.items()}
        return annotated == reported and annotated
    splits = wait_for("devices training with the annotated splits", picked_up, timeout=60)
    assert all(str(v) in plan for v in splits.values())

    # A device dies mid-run: its pod is replaced, rounds close without it, and it rejoins.
    old_pi = pods()["vgg5-demo-pi"]["metadata"]["uid"]
    kill_round = server().round
    kubelet.kill("vgg5-demo-pi")
    wait_for("pi's replacement", lambda: (p := pods().get("vgg5-demo-pi")) and p["metadata"]["uid"] != old_pi
             and p.get("status", {}).get("phase") == "Running", timeout=30)
    assert status()["devices"]["pi"]["restarts"] == 1
    wait_for("rounds closing without pi", lambda: (s := server()).round >= kill_round + 2
             and (s.devices["pi"].last_round or 0) <= kill_round, timeout=60)

    # The operator restarts mid-run: nothing is created twice, no token changes.
    before = {n: p["metadata"]["uid"] for n, p in pods().items()}
    secret = kubectl.json("get", "secret", "vgg5-demo-tokens")["data"]
    operator.restart()
    round_now = status()["round"]
    wait_for("a round after the restart", lambda: status().get("round", 0) > round_now, timeout=60)
    assert {n: p["metadata"]["uid"] for n, p in pods().items()} == before
    assert kubectl.json("get", "secret", "vgg5-demo-tokens")["data"] == secret

    wait_for("pi back in training", lambda: (server().devices["pi"].last_round or 0) > kill_round + 1, timeout=60)
    final = wait_for("the end", lambda: (s := status()).get("phase") in ("Succeeded", "Failed") and s, timeout=90)
    assert final["phase"] == "Succeeded", final.get("conditions")
    row = kubectl.table("aresjobs")[0]
    assert row["PHASE"] == "Succeeded" and row["ROUND"] == "14/14" and 0 <= float(row["ACCURACY"]) <= 1
    assert final["devices"]["pi"]["restarts"] == 1 and final["serverRestarts"] == 0
