"""End to end without a cluster: kubectl applies a job, the operator runs it, the test kubelet trains it."""

from __future__ import annotations

import pytest
import yaml

from conftest import ROOT, wait_for

pytestmark = [pytest.mark.k8s, pytest.mark.slow]


def small_job() -> str:
    """The example job, shrunk to a few seconds of synthetic training."""
    job = yaml.safe_load((ROOT / "examples" / "job.yaml").read_text())
    job["spec"]["dataset"].update(syntheticTrain=300, syntheticTest=100)
    job["spec"]["training"].update(rounds=4, batchSize=50, maxStepsPerRound=2)
    job["spec"]["split"]["reoptimiseIntervalSeconds"] = 1
    job["spec"]["runPolicy"]["roundDeadlineSeconds"] = 30
    return yaml.safe_dump(job)


def test_applied_job_trains_to_success(server_port, kubelet, operator, kubectl):
    kubectl.run("apply", "-f", "-", stdin=small_job())
    status = lambda: kubectl.json("get", "aresjobs", "vgg5-demo").get("status") or {}
    try:
        wait_for("round 1", lambda: status().get("round", 0) >= 1, timeout=60)
    except AssertionError:
        print(kubelet.errors, status())
        for name in ("vgg5-demo-server", "vgg5-demo-pi"):
            print(name, kubelet.log(name)[-3000:])
        print(operator.output[-3000:])
        raise
    open("/tmp/e2e-debug.txt", "a").write(f"{kubectl.table('aresjobs')}\n")
    final = wait_for("the end", lambda: (s := status()).get("phase") in ("Succeeded", "Failed") and s, timeout=180)
    open("/tmp/e2e-debug.txt", "a").write(f"{final}\n{kubectl.table('aresjobs')}\n{kubelet.errors}\n{kubelet.log('vgg5-demo-server')[-3000:]}\n{kubelet.log('vgg5-demo-pi')[-3000:]}")
    assert final["phase"] == "Succeeded"
