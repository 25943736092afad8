"""End to end on a real API server: kubectl applies a job, the operator runs it, the test kubelet trains it.

One job shared by the steps of one class (its processes take most of the time to start; marker
`steps`), each a test of one behaviour, in order: it trains on synthetic data, the server's
certificate names its Service, the optimiser's splits reach the device processes, a killed
device pod is replaced and its device rejoins while the rounds go on without it, a restarted
operator duplicates nothing, a killed server is replaced and resumes from its checkpoint, the
job ends Succeeded and its Events tell the run. All of it over TLS: every device and the
operator check the server against the job's own CA.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field

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


@dataclass
class Example:
    """Reads of the example job through kubectl and the server's own status, over TLS."""

    kubectl: object
    namespace: str
    server_port: int
    # What a step saw, for a later one to compare.
    seen: dict = field(default_factory=dict)

    def job(self) -> dict:
        return self.kubectl.json("get", "aresjobs", "vgg5-demo")

    def status(self) -> dict:
        return self.job().get("status") or {}

    def conditions(self) -> dict[str, dict]:
        return {c["type"]: c for c in self.status().get("conditions", [])}

    def pods(self) -> dict[str, dict]:
        return {p["metadata"]["name"]: p for p in self.kubectl.json("get", "pods")["items"]}

    def tls_secret(self) -> dict[str, bytes]:
        return {k: base64.b64decode(v) for k, v in self.kubectl.json("get", "secret", "vgg5-demo-tls")["data"].items()}

    @property
    def service_name(self) -> str:
        return f"vgg5-demo-server.{self.namespace}.svc"

    def server(self):
        token = base64.b64decode(self.kubectl.json("get", "secret", "vgg5-demo-tokens")["data"]["controller.token"]).decode()
        return fetch_status(f"https://127.0.0.1:{self.server_port}", token, 5,
                            tls=ClientTls(ca_pem=self.tls_secret()["ca.crt"], server_name=self.service_name))


@pytest.mark.steps
class TestTheExampleJob:
    @pytest.fixture(scope="class")
    def example(self, shared_cluster) -> Example:
        shared_cluster.kubectl.run("apply", "-f", "-", stdin=small_job())
        return Example(shared_cluster.kubectl, shared_cluster.namespace, shared_cluster.server_port)

    def test_kubectl_shows_it_running_with_a_round_and_an_accuracy(self, example):
        # (Running is set on a tick that finds the server training: under load every tick may fall
        # between rounds until round 1.)
        wait_for(lambda: (s := example.status()).get("round", 0) >= 1 and s.get("phase") == "Running",
                 180, "round 1, Running", interval=0.2)
        row = example.kubectl.table("aresjobs")[0]
        assert row["PHASE"] == "Running" and row["ROUND"].endswith("/20") and float(row["ACCURACY"]) >= 0

    def test_the_jobs_own_ca_certifies_the_services_names_and_plain_h2c_is_refused(self, shared_cluster, example):
        cert = pki.inspect(example.tls_secret()["tls.crt"])
        assert example.service_name in cert.dns_names
        assert cert.issuer == f"ares job {example.namespace}/vgg5-demo"
        for name in DEVICES:  # devices get only the CA
            args = next(c for c in example.pods()[f"vgg5-demo-{name}"]["spec"]["containers"]
                        if c["name"] == "device")["args"]
            assert args[args.index("--server") + 1] == f"https://{example.service_name}:43000" and "--ca" in args
        assert "Traceback" not in shared_cluster.kubelet.log("vgg5-demo-pi")
        with httpx.Client(http1=False, http2=True) as plain, pytest.raises(httpx.HTTPError):
            plain.get(f"http://127.0.0.1:{example.server_port}/healthz", timeout=5)

    def test_devices_train_with_the_optimisers_split(self, example):
        wait_for(lambda: example.conditions().get("SplitsApplied", {}).get("status") == "True",
                 30, "a split plan", interval=0.2)

        def picked_up():
            message = example.conditions()["SplitsApplied"]["message"]  # "splits nano-5w=2, nano-maxn=3, pi=1"
            plan = {d: int(s) for d, s in (kv.split("=") for kv in message.removeprefix("splits ").split(", "))}
            pods = example.pods()
            annotated = {d: int(pods[f"vgg5-demo-{d}"]["metadata"]["annotations"]["ares.io/split-point"]) for d in plan}
            reported = {d: s.split for d, s in example.server().devices.items()}
            return annotated == plan and [d for d in plan if reported[d] == plan[d]]
        wait_for(picked_up, 60, "a device training with the optimiser's split", interval=0.2)

    def test_a_killed_device_pod_is_replaced_and_rejoins_after_a_round_without_it(self, shared_cluster, example):
        kubelet = shared_cluster.kubelet
        old_pi = example.pods()["vgg5-demo-pi"]["metadata"]["uid"]
        kill_round = int(wait_for(lambda: (s := example.server()).devices["pi"].phase == "training"
                                  and str(s.round), 30, "pi in the middle of a round", interval=0.05))
        kubelet.kill("vgg5-demo-pi")
        wait_for(lambda: (p := example.pods().get("vgg5-demo-pi")) and p["metadata"]["uid"] != old_pi
                 and p.get("status", {}).get("phase") == "Running", 30, "pi's replacement", interval=0.2)
        assert _device(example.status(), "pi")["restarts"] == 1
        wait_for(lambda: (example.server().devices["pi"].last_round or 0) > kill_round, 90, "pi back in training",
                 interval=0.2)
        closed = re.findall(r"round (\d+) closed \(.*\): accuracy [0-9.]+, (\d)/3 devices",
                            kubelet.log("vgg5-demo-server"))
        assert any(int(r) >= kill_round and n == "2" for r, n in closed), closed

    def test_a_restarted_operator_creates_nothing_twice_and_keeps_the_tokens(self, shared_cluster, example):
        kubectl = example.kubectl
        before = {n: p["metadata"]["uid"] for n, p in example.pods().items()}
        secret = kubectl.json("get", "secret", "vgg5-demo-tokens")["data"]
        certificates = example.tls_secret()
        shared_cluster.operator.restart()
        round_now = example.status()["round"]
        wait_for(lambda: example.status().get("round", 0) > round_now, 60, "a round after the restart", interval=0.2)
        assert {n: p["metadata"]["uid"] for n, p in example.pods().items()} == before
        assert kubectl.json("get", "secret", "vgg5-demo-tokens")["data"] == secret
        assert example.tls_secret() == certificates  # made once: a resumed operator never re-issues

    def test_a_killed_server_is_replaced_and_resumes_from_its_checkpoint(self, shared_cluster, example):
        kubelet = shared_cluster.kubelet
        old_server = example.pods()["vgg5-demo-server"]["metadata"]["uid"]
        server_round = example.status()["round"]
        kubelet.kill("vgg5-demo-server")
        wait_for(lambda: (p := example.pods().get("vgg5-demo-server"))
                 and p["metadata"]["uid"] != old_server and p.get("status", {}).get("phase") == "Running",
                 30, "the server's replacement", interval=0.2)
        resumed = wait_for(lambda: re.findall(r"resumed from checkpoint at round (\d+)",
                                              kubelet.log("vgg5-demo-server")),
                           60, "the new server resuming", interval=0.2)
        assert int(resumed[-1]) >= server_round

    def test_the_job_succeeds_with_every_restart_counted(self, example):
        final = wait_for(lambda: (s := example.status()).get("phase") in ("Succeeded", "Failed") and s, 90, "the end",
                         interval=0.2)
        assert final["phase"] == "Succeeded", final.get("conditions")
        row = example.kubectl.table("aresjobs")[0]
        assert row["PHASE"] == "Succeeded" and row["ROUND"] == "20/20" and 0 <= float(row["ACCURACY"]) <= 1
        assert _device(final, "pi")["restarts"] >= 1 and final["serverRestarts"] == 1

    def test_an_ended_job_is_not_ready_and_its_events_tell_the_run(self, example):
        final = example.status()
        ended = {c["type"]: c for c in final["conditions"]}
        assert ended["DevicesReady"]["status"] == "False" and ended["DevicesReady"]["reason"] == "JobFinished"
        assert final["ready"] == "0/3"
        events = {e["reason"] for e in example.kubectl.json("get", "events")["items"]
                  if e["involvedObject"].get("kind") == "AresTrainingJob"}
        assert {"Running", "Completed", "PodReplaced"} <= events, events
        described = example.kubectl.run("describe", "aresjob", "vgg5-demo").stdout
        assert "PodReplaced" in described and "Completed" in described

    def test_a_spec_edit_after_the_end_is_observed(self, example):
        example.kubectl.run("patch", "aresjob", "vgg5-demo", "--type=json", "-p",
                            '[{"op": "replace", "path": "/spec/devices/1/powerMode", "value": "MAXN"}]')
        wait_for(lambda: example.status().get("observedGeneration") == example.job()["metadata"]["generation"],
                 30, "observedGeneration to follow", interval=0.2)

    def test_every_call_the_operator_made_was_allowed_by_the_charts_rbac(self, shared_cluster, example):
        shared_cluster.operator.stop()
        assert "forbidden" not in shared_cluster.operator.output.lower()
