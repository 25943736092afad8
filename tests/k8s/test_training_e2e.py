"""End to end on a real API server: kubectl applies a job, the operator runs it, the test kubelet trains it.

One job, one test (the processes take most of the time to start): it trains on synthetic data,
the optimiser's splits reach the device processes, a killed device pod is replaced and its
device rejoins while the rounds go on without it, a restarted operator duplicates nothing, a
killed server is replaced and resumes from its checkpoint, and the job ends Succeeded. All of it
over TLS: every device and the operator check the server against the job's own CA.
"""

from __future__ import annotations

import base64
import re

import httpx
import pytest
import yaml

from ares.core import pki
from ares.runtime.controller import fetch_status
from ares.runtime.tlsclient import ClientTls
from tests.support import ROOT, wait_for
from tests.k8s.k8s_jobs import device_status as _device

pytestmark = [pytest.mark.k8s, pytest.mark.slow]
DEVICES = ("nano-maxn", "nano-5w", "pi")


def small_job() -> str:
    """The example job, shrunk to seconds per round of synthetic training."""
    job = yaml.safe_load((ROOT / "examples" / "job.yaml").read_text())
    job["spec"]["dataset"].update(syntheticTrain=300, syntheticTest=100)
    job["spec"]["training"].update(rounds=20, batchSize=50, maxStepsPerRound=3)
    job["spec"]["split"]["reoptimiseIntervalSeconds"] = 1
    job["spec"]["runPolicy"]["roundDeadlineSeconds"] = 3  # shorter than a device's restart
    return yaml.safe_dump(job)


def test_applied_job_trains_to_success(server_port, kubelet, operator, kubectl, namespace):
    kubectl.run("apply", "-f", "-", stdin=small_job())
    job = lambda: kubectl.json("get", "aresjobs", "vgg5-demo")
    status = lambda: job().get("status") or {}
    pods = lambda: {p["metadata"]["name"]: p for p in kubectl.json("get", "pods")["items"]}
    token = lambda: base64.b64decode(kubectl.json("get", "secret", "vgg5-demo-tokens")["data"]["controller.token"]).decode()
    conds = lambda: {c["type"]: c for c in status().get("conditions", [])}
    tls_secret = lambda: {k: base64.b64decode(v) for k, v in kubectl.json("get", "secret", "vgg5-demo-tls")["data"].items()}
    service_name = f"vgg5-demo-server.{namespace}.svc"
    server = lambda: fetch_status(f"https://127.0.0.1:{server_port}", token(), 5,
                                  tls=ClientTls(ca_pem=tls_secret()["ca.crt"], server_name=service_name))

    # It trains: kubectl shows the round advancing and an accuracy. (Running is set on a tick that
    # finds the server training: under load every tick may fall between rounds until round 1.)
    wait_for(lambda: (s := status()).get("round", 0) >= 1 and s.get("phase") == "Running",
             180, "round 1, Running", interval=0.2)
    row = kubectl.table("aresjobs")[0]
    assert row["PHASE"] == "Running" and row["ROUND"].endswith("/20") and float(row["ACCURACY"]) >= 0

    # TLS: the job's own CA signed a certificate for the Service's names; devices got only the CA;
    # plain h2c to the server is refused.
    cert = pki.inspect(tls_secret()["tls.crt"])
    assert service_name in cert.dns_names and cert.issuer == f"ares job {namespace}/vgg5-demo"
    for name in DEVICES:
        args = next(c for c in pods()[f"vgg5-demo-{name}"]["spec"]["containers"] if c["name"] == "device")["args"]
        assert args[args.index("--server") + 1] == f"https://{service_name}:43000" and "--ca" in args
    assert "Traceback" not in kubelet.log("vgg5-demo-pi")
    with httpx.Client(http1=False, http2=True) as plain, pytest.raises(httpx.HTTPError):
        plain.get(f"http://127.0.0.1:{server_port}/healthz", timeout=5)

    # The optimiser's plan is on the pods, and device processes train with it.
    wait_for(lambda: {c["type"]: c["status"] for c in status().get("conditions", [])}
             .get("SplitsApplied") == "True", 30, "a split plan", interval=0.2)
    def picked_up():
        message = conds()["SplitsApplied"]["message"]  # "splits nano-5w=2, nano-maxn=3, pi=1"
        plan = {d: int(s) for d, s in (kv.split("=") for kv in message.removeprefix("splits ").split(", "))}
        annotated = {d: int(pods()[f"vgg5-demo-{d}"]["metadata"]["annotations"]["ares.io/split-point"]) for d in plan}
        reported = {d: s.split for d, s in server().devices.items()}
        return annotated == plan and [d for d in plan if reported[d] == plan[d]]
    wait_for(picked_up, 60, "a device training with the optimiser's split", interval=0.2)

    # A device dies mid-run: its pod is replaced, a round closes without it, and it rejoins.
    old_pi = pods()["vgg5-demo-pi"]["metadata"]["uid"]
    kill_round = wait_for(lambda: (s := server()).devices["pi"].phase == "training"
                          and str(s.round), 30, "pi in the middle of a round", interval=0.05)
    kill_round = int(kill_round)
    kubelet.kill("vgg5-demo-pi")
    wait_for(lambda: (p := pods().get("vgg5-demo-pi")) and p["metadata"]["uid"] != old_pi
             and p.get("status", {}).get("phase") == "Running", 30, "pi's replacement", interval=0.2)
    assert _device(status(), "pi")["restarts"] == 1
    wait_for(lambda: (server().devices["pi"].last_round or 0) > kill_round, 90, "pi back in training", interval=0.2)
    closed = re.findall(r"round (\d+) closed \(.*\): accuracy [0-9.]+, (\d)/3 devices", kubelet.log("vgg5-demo-server"))
    assert any(int(r) >= kill_round and n == "2" for r, n in closed), closed

    # The operator restarts mid-run: nothing is created twice, no token changes.
    before = {n: p["metadata"]["uid"] for n, p in pods().items()}
    secret = kubectl.json("get", "secret", "vgg5-demo-tokens")["data"]
    certificates = tls_secret()
    operator.restart()
    round_now = status()["round"]
    wait_for(lambda: status().get("round", 0) > round_now, 60, "a round after the restart", interval=0.2)
    assert {n: p["metadata"]["uid"] for n, p in pods().items()} == before
    assert kubectl.json("get", "secret", "vgg5-demo-tokens")["data"] == secret
    assert tls_secret() == certificates  # made once: a resumed operator never re-issues

    # The server dies: its pod is replaced and the new one resumes from the checkpoint.
    old_server = pods()["vgg5-demo-server"]["metadata"]["uid"]
    server_round = status()["round"]
    kubelet.kill("vgg5-demo-server")
    wait_for(lambda: (p := pods().get("vgg5-demo-server"))
             and p["metadata"]["uid"] != old_server and p.get("status", {}).get("phase") == "Running",
             30, "the server's replacement", interval=0.2)
    resumed = wait_for(lambda: re.findall(r"resumed from checkpoint at round (\d+)", kubelet.log("vgg5-demo-server")),
                       60, "the new server resuming", interval=0.2)
    assert int(resumed[-1]) >= server_round

    final = wait_for(lambda: (s := status()).get("phase") in ("Succeeded", "Failed") and s, 90, "the end", interval=0.2)
    assert final["phase"] == "Succeeded", final.get("conditions")
    row = kubectl.table("aresjobs")[0]
    assert row["PHASE"] == "Succeeded" and row["ROUND"] == "20/20" and 0 <= float(row["ACCURACY"]) <= 1
    assert _device(final, "pi")["restarts"] >= 1 and final["serverRestarts"] == 1

    # An ended job is not "ready"; its Events tell the story in `kubectl describe`.
    ended = {c["type"]: c for c in final["conditions"]}
    assert ended["DevicesReady"]["status"] == "False" and ended["DevicesReady"]["reason"] == "JobFinished"
    assert final["ready"] == "0/3"
    events = {e["reason"] for e in kubectl.json("get", "events")["items"]
              if e["involvedObject"].get("kind") == "AresTrainingJob"}
    assert {"Running", "Completed", "PodReplaced"} <= events, events
    described = kubectl.run("describe", "aresjob", "vgg5-demo").stdout
    assert "PodReplaced" in described and "Completed" in described
    # A spec edit after the end is still observed.
    kubectl.run("patch", "aresjob", "vgg5-demo", "--type=json", "-p",
                '[{"op": "replace", "path": "/spec/devices/1/powerMode", "value": "MAXN"}]')
    wait_for(lambda: status().get("observedGeneration") == job()["metadata"]["generation"],
             30, "observedGeneration to follow", interval=0.2)
    # Every call the operator made was allowed by the chart's RBAC.
    operator.stop()
    assert "forbidden" not in operator.output.lower()
