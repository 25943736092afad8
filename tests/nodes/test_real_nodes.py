"""The project's images as real pods, on real kubelets (containerd, runc, CNI bridge), placed by
kube-scheduler, their Service reached through kube-proxy and CoreDNS (tests/nodes/conftest.py).

One job runs the example end to end and takes the faults one after the other, each step a test of
its own in one class (marker `steps`): the operator pod the chart installed, the pods on the nodes the job names, as uid 10001, in
a namespace whose Pod Security level is `privileged` (the device pods' host-control sidecar adds
NET_ADMIN to shape its pod's link with tc, and on Jetson runs privileged to set nvpmodel: the
`baseline` and `restricted` levels refuse both); DNS to the server's Service; the optimiser's
split through the kubelet's downwardAPI refresh; a bandwidth change down to tc in the device
pod's own network namespace and the uplink the device measures; a trainer process killed, the
server pod deleted, the operator pod deleted; the end, with its conditions, columns and Events.
Two more tests take what a real node refuses: an image it cannot pull, a missing RuntimeClass.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml

from ares.runtime.controller import fetch_status, fetch_telemetry
from ares.runtime.tlsclient import ClientTls
from cluster.nodes import DNS_IP, JETSON, PI, runtime_class_manifest
from tests.support import ROOT, wait_for

pytestmark = [pytest.mark.nodes, pytest.mark.slow, pytest.mark.timeout(1800)]
JOB = "vgg5-demo"
ROUNDS = 14
CAP_MBIT = 8


def real_job() -> str:
    """examples/job.yaml on two nodes: the Jetson Nano (by nodeName, RuntimeClass nvidia) and the
    Pi (by nodeSelector) as the example places them, the server placed by kube-scheduler on the
    Jetson node (the example pins it to a node named edge-server), small enough for seconds a round."""
    job = yaml.safe_load((ROOT / "examples" / "job.yaml").read_text())
    spec = job["spec"]
    spec["dataset"].update(syntheticTrain=300, syntheticTest=100)
    spec["training"].update(rounds=ROUNDS, batchSize=50, maxStepsPerRound=3)
    spec["split"]["reoptimiseIntervalSeconds"] = 2
    spec["server"] = {"nodeSelector": {"kubernetes.io/hostname": JETSON.name},
                      "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}}}
    nano, _, pi = spec["devices"]
    assert nano["nodeName"] == JETSON.name and pi["nodeSelector"] == {"kubernetes.io/hostname": PI.name}
    pi["bandwidth"] = "20mbit"
    pi["resources"] = {"limits": {"cpu": "1"}}  # the Nano keeps the default limit, 4 CPUs
    spec["devices"] = [nano, pi]
    spec["runPolicy"].update(cleanPodPolicy="None", roundDeadlineSeconds=60)
    return yaml.safe_dump(job)


class Job:
    """Reads of the job and its pods through kubectl, and of its server through its pod IP."""

    def __init__(self, cluster, name: str = JOB) -> None:
        self.cluster, self.k, self.name, self.ns = cluster, cluster.kubectl, name, cluster.namespace

    def status(self) -> dict[str, Any]:
        return self.k.json("get", "aresjobs", self.name).get("status") or {}

    def conditions(self) -> dict[str, dict]:
        return {c["type"]: c for c in self.status().get("conditions") or []}

    def pods(self) -> dict[str, dict]:
        return {p["metadata"]["name"]: p for p in self.k.json("get", "pods", "-l", f"ares.io/job={self.name}")["items"]}

    def events(self, reason: str | None = None) -> list[dict]:
        return [e for e in self.k.json("get", "events")["items"]
                if e["involvedObject"].get("kind") == "AresTrainingJob" and e["involvedObject"]["name"] == self.name
                and (reason is None or e["reason"] == reason)]

    def secret(self, name: str) -> dict[str, bytes]:
        return {k: base64.b64decode(v) for k, v in self.k.json("get", "secret", name)["data"].items()}

    def server_url(self) -> tuple[str, ClientTls, str]:
        pod = self.pods()[f"{self.name}-server"]
        tls = ClientTls(ca_pem=self.secret(f"{self.name}-tls")["ca.crt"], server_name=f"{self.name}-server.{self.ns}.svc")
        token = self.secret(f"{self.name}-tokens")["controller.token"].decode()
        return f"https://{pod['status']['podIP']}:43000", tls, token

    def server(self):
        url, tls, token = self.server_url()
        return fetch_status(url, token, 5, tls=tls)

    def telemetry(self):
        url, tls, token = self.server_url()
        return fetch_telemetry(url, token, 5, tls=tls)

    def logs(self, pod: str, container: str) -> str:
        return self.k.run("logs", pod, "-c", container, check=False).stdout


def _pid(cluster, pod: str, container: str) -> int:
    return wait_for(lambda: cluster.nodes.container_pid(pod, container, cluster.namespace), 60,
                    f"{pod}/{container} running in containerd")


def _uid(pid: int) -> int:
    line = next(l for l in open(f"/proc/{pid}/status") if l.startswith("Uid:"))
    return int(line.split()[1])


def _in_netns(pid: int, *argv: str) -> str:
    return subprocess.run(["nsenter", "-t", str(pid), "-n", *argv], capture_output=True, text=True, check=True,
                          timeout=10).stdout


@dataclass
class Story:
    """What a step saw of the job, for a later step."""

    job: Job
    operator_pod: str = ""
    applied_at: float = 0.0
    pods_running_s: float = 0.0
    uids: dict[str, str] = field(default_factory=dict)  # pod name -> uid, before the operator was replaced
    final: dict[str, Any] = field(default_factory=dict)


@pytest.mark.steps
class TestTheExampleJobOnRealNodes:
    """One job, the steps of its life in order, each a test of one behaviour (marker `steps`)."""

    @pytest.fixture(scope="class")
    def story(self, real_cluster) -> Story:
        return Story(Job(real_cluster))

    def test_the_charts_operator_runs_as_a_pod_from_its_image(self, real_cluster, story):
        k = real_cluster.kubectl
        # The Deployment rolled out by the controller manager, scheduled by kube-scheduler where the
        # chart's nodeSelector says.
        op = wait_for(lambda: [p for p in k.json("get", "pods", "-n", "ares-system")["items"]
                               if p["status"].get("phase") == "Running"], 180, "the operator pod running",
                      details=lambda: k.run("get", "pods", "-A", "-o", "wide", check=False).stdout)
        assert op[0]["spec"]["nodeName"] == PI.name
        assert op[0]["status"]["containerStatuses"][0]["image"].endswith("ares-operator:dev")
        story.operator_pod = op[0]["metadata"]["name"]

    def test_the_pods_run_where_the_scheduler_and_the_spec_put_them(self, real_cluster, story):
        k, job = real_cluster.kubectl, story.job
        story.applied_at = time.monotonic()
        k.run("apply", "-f", "-", stdin=real_job())
        pods = wait_for(lambda: (p := job.pods()) and len(p) == 3 and all(
            x["status"].get("phase") == "Running" for x in p.values()) and p, 300, "three pods running",
            details=lambda: k.run("get", "pods", "-o", "wide", check=False).stdout
            + k.run("describe", "pods", check=False).stdout[-4000:])
        story.pods_running_s = time.monotonic() - story.applied_at
        # kube-scheduler placed the server and the Pi, the nodeName the Nano; the Jetson class runs
        # with its RuntimeClass.
        assert {n: p["spec"]["nodeName"] for n, p in pods.items()} == {
            f"{JOB}-server": JETSON.name, f"{JOB}-nano-maxn": JETSON.name, f"{JOB}-pi": PI.name}
        assert pods[f"{JOB}-nano-maxn"]["spec"]["runtimeClassName"] == "nvidia"
        assert "runtimeClassName" not in pods[f"{JOB}-pi"]["spec"]

    def test_the_trainers_and_server_are_the_projects_images_running_as_uid_10001(self, real_cluster, story):
        pods = story.job.pods()
        for pod, container, image in ((f"{JOB}-server", "server", "ares-server:dev"),
                                      (f"{JOB}-pi", "device", "ares-device:dev"),
                                      (f"{JOB}-nano-maxn", "device", "ares-device:dev")):
            status = next(s for s in pods[pod]["status"]["containerStatuses"] if s["name"] == container)
            assert status["image"].endswith(image), status
            assert _uid(_pid(real_cluster, pod, container)) == 10001

    def test_the_sidecar_alone_runs_as_root_in_a_privileged_namespace(self, real_cluster, story):
        # NET_ADMIN for tc (and privileged on Jetson, for nvpmodel): only the privileged level allows it.
        assert _uid(_pid(real_cluster, f"{JOB}-pi", "host-control")) == 0
        labels = real_cluster.kubectl.json("get", "namespace", real_cluster.namespace)["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "privileged"

    def test_devices_reach_the_server_by_its_service_name_and_train(self, real_cluster, story):
        job = story.job
        pi_pid = _pid(real_cluster, f"{JOB}-pi", "device")
        assert f"nameserver {DNS_IP}" in open(f"/proc/{pi_pid}/root/etc/resolv.conf").read()
        wait_for(lambda: (s := job.status()).get("round", 0) >= 2 and s.get("phase") == "Running", 300,
                 "round 2, Running", interval=0.5, details=lambda: job.logs(f"{JOB}-pi", "device")[-3000:])
        assert job.server().devices["pi"].last_round >= 1

    def test_each_trainer_runs_as_many_torch_threads_as_its_cpu_limit_allows(self, real_cluster, story):
        # The kubelet puts a limit as a CFS quota on the container's cgroup (v1 here); torch alone
        # would start one thread per core of the node.
        cores = os.cpu_count()
        pi, nano = story.job.logs(f"{JOB}-pi", "device"), story.job.logs(f"{JOB}-nano-maxn", "device")
        assert re.search(r"1 torch thread (for a CPU limit of 1 \(not \d+, one per core\)|\(CPU limit 1\))", pi), pi[-2000:]
        threads = min(cores, 4)
        assert re.search(rf"{threads} torch threads? (\(CPU limit 4\)|for a CPU limit of 4 )", nano), nano[-2000:]

    def test_kubectl_get_aresjobs_shows_phase_round_accuracy_and_devices(self, real_cluster, story):
        row = real_cluster.kubectl.table("aresjobs")[0]
        assert row["PHASE"] == "Running" and row["ROUND"].endswith(f"/{ROUNDS}") and float(row["ACCURACY"]) >= 0
        assert row["DEVICES"] == "2/2", row

    def test_the_optimisers_split_reaches_the_trainer_through_the_downward_api(self, real_cluster, story):
        # The operator patches the annotation, the kubelet rewrites the downwardAPI file in the
        # running container, the device trains at it the next round.
        job = story.job

        def split_applied():
            msg = job.conditions().get("SplitsApplied", {})
            if msg.get("status") != "True":
                return None
            plan = {d: int(s) for d, s in (kv.split("=") for kv in msg["message"].removeprefix("splits ").split(", "))}
            files = {d: open(f"/proc/{_pid(real_cluster, f'{JOB}-{d}', 'device')}/root/etc/podinfo/split-point")
                     .read().strip() for d in plan}
            reported = {d: s.split for d, s in job.server().devices.items()}
            return plan if files == {d: str(s) for d, s in plan.items()} and reported == plan else None
        wait_for(split_applied, 120, "the optimiser's split in the downwardAPI file and in use", interval=0.5)

    def test_a_bandwidth_change_reaches_tc_in_the_pod_and_the_measured_uplink(self, real_cluster, story):
        # The job's spec changes, the sidecar re-shapes the pod's own eth0 (tc in its network
        # namespace), the device's measured uplink follows.
        k, job = real_cluster.kubectl, story.job
        sidecar_pid = _pid(real_cluster, f"{JOB}-pi", "host-control")
        wait_for(lambda: "20Mbit" in _in_netns(sidecar_pid, "tc", "class", "show", "dev", "eth0"), 60, "20mbit shaped")
        k.run("patch", "aresjob", JOB, "--type=json", "-p",
              json.dumps([{"op": "replace", "path": "/spec/devices/1/bandwidth", "value": f"{CAP_MBIT}mbit"}]))
        wait_for(lambda: f"{CAP_MBIT}Mbit" in _in_netns(sidecar_pid, "tc", "class", "show", "dev", "eth0"), 60,
                 f"{CAP_MBIT}mbit shaped in the pod's network namespace")
        cap_bps = CAP_MBIT * 1e6 / 8
        up = wait_for(lambda: (d := next(x for x in job.telemetry().devices if x.name == "pi")).up_bps
                      and 0.7 * cap_bps <= d.up_bps <= 1.3 * cap_bps and d.up_bps, 180,
                      "pi's measured uplink within 30% of the cap", interval=1)
        assert 0.7 * cap_bps <= up <= 1.3 * cap_bps

    def test_a_killed_trainer_process_is_replaced_and_training_goes_on(self, real_cluster, story):
        # SIGKILL to the process, not a delete of the pod object.
        job = story.job
        old_pi = job.pods()[f"{JOB}-pi"]["metadata"]["uid"]
        killed_at = job.status()["round"]
        subprocess.run(["kill", "-9", str(_pid(real_cluster, f"{JOB}-pi", "device"))], check=True)
        wait_for(lambda: (p := job.pods().get(f"{JOB}-pi")) and p["metadata"]["uid"] != old_pi
                 and p["status"].get("phase") == "Running", 120, "pi's replacement running")
        wait_for(lambda: (job.server().devices["pi"].last_round or 0) > killed_at, 180, "pi training again")

    def test_a_deleted_operator_pod_is_replaced_and_adopts_the_job(self, real_cluster, story):
        k, job = real_cluster.kubectl, story.job
        story.uids = {n: p["metadata"]["uid"] for n, p in job.pods().items()}
        k.run("delete", "pod", "-n", "ares-system", story.operator_pod)
        wait_for(lambda: [p for p in k.json("get", "pods", "-n", "ares-system")["items"]
                          if p["metadata"]["name"] != story.operator_pod and p["status"].get("phase") == "Running"],
                 120, "a new operator pod")
        round_now = job.status()["round"]
        wait_for(lambda: job.status().get("round", 0) > round_now, 120, "a round reported by the new operator")
        assert {n: p["metadata"]["uid"] for n, p in job.pods().items()} == story.uids

    def test_a_deleted_server_pod_is_recreated_with_an_event_and_resumes_from_its_checkpoint(self, real_cluster, story):
        k, job = real_cluster.kubectl, story.job
        old_server = story.uids[f"{JOB}-server"]
        server_round = job.status()["round"]
        k.run("delete", "pod", f"{JOB}-server", "--wait=false")
        wait_for(lambda: (p := job.pods().get(f"{JOB}-server")) and p["metadata"]["uid"] != old_server
                 and p["status"].get("phase") == "Running", 180, "the server's replacement running")
        resumed = wait_for(lambda: re.findall(r"resumed from checkpoint at round (\d+)",
                                              job.logs(f"{JOB}-server", "server")), 120, "the new server resuming")
        assert int(resumed[-1]) >= server_round >= 1
        wait_for(lambda: job.status().get("serverRestarts") == 1, 60, "serverRestarts 1")
        assert [e["message"] for e in job.events("PodReplaced") if "server" in e["message"]] == [
            "server pod deleted; re-created (restart 1), resuming from checkpoint"]

    def test_the_job_succeeds_and_describe_shows_its_events(self, real_cluster, story):
        k, job = real_cluster.kubectl, story.job
        story.final = wait_for(lambda: (s := job.status()).get("phase") in ("Succeeded", "Failed") and s, 600,
                               "the end", interval=1, details=lambda: json.dumps(job.status().get("conditions")))
        assert story.final["phase"] == "Succeeded", story.final.get("conditions")
        row = k.table("aresjobs")[0]
        assert row["PHASE"] == "Succeeded" and row["ROUND"] == f"{ROUNDS}/{ROUNDS}" and 0 <= float(row["ACCURACY"]) <= 1
        described = k.run("describe", "aresjob", JOB).stdout
        assert "Completed" in described and "PodReplaced" in described

    def test_with_clean_pod_policy_none_the_conditions_say_ended_and_the_pods_stay(self, real_cluster, story):
        job = story.job
        ended = {x["type"]: x for x in story.final["conditions"]}
        for kind in ("ServerReady", "DevicesReady"):
            assert ended[kind]["reason"] == "JobFinished" and "removed" not in ended[kind]["message"], ended[kind]
        wait_for(lambda: all(d.get("podPhase") == "Succeeded" for d in job.status()["devices"]), 60,
                 "the devices' pods Succeeded in status")
        assert job.pods()[f"{JOB}-server"]["status"]["phase"] == "Running"

    def test_no_server_start_failed_its_startup_probe(self, real_cluster, story):
        # Neither server start (the first, the replacement) failed a probe. (The deleted server's
        # readiness probe fails while it stops: that one is its pod's true state.)
        k, job = real_cluster.kubectl, story.job
        server_uid = job.pods()[f"{JOB}-server"]["metadata"]["uid"]
        unhealthy = [e for e in k.json("get", "events")["items"] if e["reason"] == "Unhealthy"
                     and e["involvedObject"]["name"] == f"{JOB}-server"
                     and (e["message"].startswith("Startup") or e["involvedObject"].get("uid") == server_uid)]
        assert not unhealthy, [e["message"] for e in unhealthy]
        k.run("delete", "aresjob", JOB, "--wait=true", "--timeout=120s")
        print(f"real nodes: pods running {story.pods_running_s:.0f} s after apply; images imported in "
              f"{real_cluster.import_seconds:.0f} s; cluster up in {real_cluster.start_seconds:.0f} s")


def test_an_image_no_node_can_pull_is_named_on_the_job_with_an_event(real_cluster):
    # Allowed by the chart's policy: the kubelet, not the operator, refuses it.
    c, k = real_cluster, real_cluster.kubectl
    job = yaml.safe_load(real_job())
    job["metadata"]["name"] = "unpullable"
    job["spec"]["devices"][1]["image"] = "localhost/ares-unpullable:none"
    k.run("apply", "-f", "-", stdin=yaml.safe_dump(job))
    j = Job(c, "unpullable")
    cond = wait_for(lambda: (x := j.conditions().get("DevicesReady", {})).get("reason") == "ImagePullFailed" and x,
                    180, "DevicesReady ImagePullFailed", interval=1,
                    details=lambda: json.dumps(j.conditions()) + k.run("get", "pods", "-o", "wide", check=False).stdout)
    assert "pod unpullable-pi container device: " in cond["message"] and "localhost/ares-unpullable:none" in cond["message"]
    assert re.search(r"ErrImagePull|ImagePullBackOff", cond["message"])
    events = wait_for(lambda: j.events("ImagePullFailed"), 60, "an ImagePullFailed Event")
    assert events[0]["type"] == "Warning" and "unpullable-pi" in events[0]["message"]
    k.run("delete", "aresjob", "unpullable", "--wait=true", "--timeout=120s")


def test_a_missing_runtime_class_is_named_as_such_and_the_pods_follow_once_it_exists(real_cluster):
    c, k = real_cluster, real_cluster.kubectl
    c.nodes.kubectl("delete", "runtimeclass", "nvidia")
    try:
        job = yaml.safe_load(real_job())
        job["metadata"]["name"] = "no-runtime"
        k.run("apply", "-f", "-", stdin=yaml.safe_dump(job))
        j = Job(c, "no-runtime")
        cond = wait_for(lambda: (x := j.conditions().get("ChildrenCreated", {})).get("status") == "False" and x,
                        60, "ChildrenCreated False", interval=0.5)
        assert cond["reason"] == "RuntimeClassNotFound", cond
        assert 'RuntimeClass "nvidia"' in cond["message"] and "RBAC" not in cond["message"]
        assert not j.pods()
    finally:
        c.nodes.kubectl("apply", "-f", "-", stdin=runtime_class_manifest())
    # Once it exists, the next tick creates the pods.
    wait_for(lambda: len(j.pods()) == 3, 60, "the pods, once the RuntimeClass exists")
    k.run("delete", "aresjob", "no-runtime", "--wait=true", "--timeout=120s")
