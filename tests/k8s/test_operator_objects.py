"""The operator against the API emulator, driven with kubectl: what a job creates, and what it refuses."""

from __future__ import annotations

import base64

import pytest
import yaml

from tests.support import ROOT, wait_for
from tests.k8s.k8s_jobs import example_job as _job

pytestmark = pytest.mark.k8s
JOB = ROOT / "examples" / "job.yaml"


def _pods(kubectl):
    return {p["metadata"]["name"]: p for p in kubectl.json("get", "pods")["items"]}


def test_example_job_creates_its_children(kubectl, operator):
    kubectl.run("apply", "-f", str(JOB))
    names = {"vgg5-demo-server", "vgg5-demo-nano-maxn", "vgg5-demo-nano-5w", "vgg5-demo-pi"}
    pods = wait_for(lambda: (p := _pods(kubectl)) and names <= set(p) and p,
                    30, "the server and three device pods", interval=0.2)
    job = kubectl.json("get", "aresjobs", "vgg5-demo")
    uid = job["metadata"]["uid"]

    secret = kubectl.json("get", "secret", "vgg5-demo-tokens")
    tokens = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert set(tokens) == {"nano-maxn", "nano-5w", "pi", "controller.token"}
    assert len(set(tokens.values())) == 4 and all(len(t) >= 32 for t in tokens.values())
    service = kubectl.json("get", "service", "vgg5-demo-server")
    assert service["spec"]["ports"][0]["port"] == 43000 and service["spec"]["ports"][0]["name"] == "http"
    config = yaml.safe_load(kubectl.json("get", "configmap", "vgg5-demo-config")["data"]["server.yaml"])
    assert config["devices"] == ["nano-maxn", "nano-5w", "pi"] and config["training"]["rounds"] == 20
    tls = kubectl.json("get", "secret", "vgg5-demo-tls")
    assert tls["type"] == "kubernetes.io/tls" and set(tls["data"]) == {"ca.crt", "tls.crt", "tls.key"}
    for obj in [secret, tls, service, *pods.values()]:
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref["uid"] == uid and ref["controller"] is True and ref["kind"] == "AresTrainingJob"

    server = pods["vgg5-demo-server"]["spec"]
    assert server["nodeName"] == "edge-server" and server["automountServiceAccountToken"] is False
    assert server["containers"][0]["args"] == ["server", "--config", "/etc/ares/server.yaml", "--tls-cert",
                                               "/var/run/ares/tls/tls.crt", "--tls-key", "/var/run/ares/tls/tls.key"]

    nano, pi = pods["vgg5-demo-nano-5w"], pods["vgg5-demo-pi"]
    assert nano["spec"]["nodeName"] == "jetson-nano-2" and nano["spec"]["runtimeClassName"] == "nvidia"
    assert pi["spec"]["nodeSelector"] == {"kubernetes.io/hostname": "raspberry-pi-1"}
    assert "runtimeClassName" not in pi["spec"]
    assert nano["metadata"]["annotations"]["ares.io/power-mode"] == "5W"
    assert nano["metadata"]["annotations"]["ares.io/bandwidth"] == "20mbit"
    assert nano["metadata"]["annotations"]["ares.io/split-point"] == "3"  # adaptive starts mid-model
    for pod in (nano, pi):
        spec = pod["spec"]
        assert spec["automountServiceAccountToken"] is False
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["token"]["secret"]["items"] == [{"key": pod["metadata"]["labels"]["ares.io/device"], "path": "token"}]
        projected = {i["path"]: i["fieldRef"]["fieldPath"] for i in volumes["podinfo"]["downwardAPI"]["items"]}
        assert projected == {"split-point": "metadata.annotations['ares.io/split-point']",
                             "annotations": "metadata.annotations"}
        sidecar = next(c for c in spec["initContainers"] if c["name"] == "host-control")
        assert sidecar["args"][:2] == ["sidecar", "--annotations"]
    nano_sidecar = next(c for c in nano["spec"]["initContainers"] if c["name"] == "host-control")
    pi_sidecar = next(c for c in pi["spec"]["initContainers"] if c["name"] == "host-control")
    assert nano_sidecar["securityContext"] == {"privileged": True, "runAsUser": 0, "runAsNonRoot": False}
    assert pi_sidecar["securityContext"]["runAsUser"] == 0  # tc needs root even with NET_ADMIN
    assert "--nvpmodel-conf" in nano_sidecar["args"] and "--nvpmodel" in nano_sidecar["args"]
    assert {v["name"] for v in nano["spec"]["volumes"]} >= {"nvpmodel", "nvpmodel-bin", "nvpmodel-state"}
    assert pi_sidecar["securityContext"]["capabilities"]["add"] == ["NET_ADMIN"]
    assert "privileged" not in pi_sidecar["securityContext"] and "--nvpmodel-conf" not in pi_sidecar["args"]
    assert "nvpmodel" not in {v["name"] for v in pi["spec"]["volumes"]}

    # kubectl shows the printer columns with real values (no kubelet here: the pods never run).
    row = wait_for(lambda: (rows := kubectl.table("aresjobs")) and rows[0]["PHASE"] and rows[0],
                   30, "a status", interval=0.2)
    assert row["NAME"] == "vgg5-demo" and row["PHASE"] == "Pending"
    assert row["ROUND"] == "0/20" and row["DEVICES"] == "0/3"
    wide = kubectl.table("ares", "-o", "wide")[0]
    assert wide["MODEL"] == "vgg5" and wide["POLICY"] == "straggler"

    # Spec changes reach the pods: a pinned split, a power mode, a bandwidth cap.
    kubectl.run("patch", "aresjobs", "vgg5-demo", "--type=json", "-p",
                '[{"op": "replace", "path": "/spec/devices/1/powerMode", "value": "MAXN"},'
                ' {"op": "add", "path": "/spec/devices/1/split", "value": 2},'
                ' {"op": "add", "path": "/spec/devices/2/bandwidth", "value": "5mbit"}]')
    wait_for(lambda: (
        (a := _pods(kubectl)["vgg5-demo-nano-5w"]["metadata"]["annotations"])["ares.io/power-mode"] == "MAXN"
        and a["ares.io/split-point"] == "2"
        and _pods(kubectl)["vgg5-demo-pi"]["metadata"]["annotations"]["ares.io/bandwidth"] == "5mbit"),
             30, "the new annotations", interval=0.2)

    # Deleting the job collects what it owned (no kubelet runs here: bound pods stay Terminating
    # until their node confirms, so the test checks that deletion was asked for).
    kubectl.run("delete", "aresjobs", "vgg5-demo")
    wait_for(lambda: not kubectl.json("get", "secrets")["items"]
             and all(p["metadata"].get("deletionTimestamp") for p in _pods(kubectl).values()),
             60, "the children to go", interval=0.2)


@pytest.mark.parametrize("changes, error", [
    ({"split__mode": "sometimes"}, "spec.split.mode"),
    ({"training__rounds": -3}, "spec.training.rounds"),
    ({"devices__0__split": -1}, "spec.devices[0].split"),
    ({"devices__1__name": "nano-maxn"}, "Duplicate value"),
], ids=["unknown-split-mode", "negative-rounds", "negative-split", "duplicate-device"])
def test_schema_rejects_invalid_jobs(kubectl, changes, error):
    proc = kubectl.run("apply", "-f", "-", stdin=yaml.safe_dump(_job("bad", **changes)), check=False)
    assert proc.returncode != 0 and "is invalid" in proc.stderr and error.split("[")[0].split(".")[-1] in proc.stderr
    assert kubectl.json("get", "aresjobs")["items"] == []


def test_operator_fails_what_a_schema_cannot_say(kubectl, operator):
    # Which images a job may run is the administrator's policy, not the schema's: the operator refuses.
    job = _job("too-deep", server__image="registry.example.com/other:1")
    job["spec"]["runPolicy"]["ttlSecondsAfterFinished"] = 2
    kubectl.run("apply", "-f", "-", stdin=yaml.safe_dump(job))
    job = wait_for(lambda: (j := kubectl.json("get", "aresjobs", "too-deep"))
                   .get("status", {}).get("phase") == "Failed" and j, 30, "phase Failed", interval=0.2)
    failed = {c["type"]: c for c in job["status"]["conditions"]}
    assert failed["SpecValid"]["status"] == "False" and failed["SpecValid"]["reason"] == "NotAllowedByPolicy"
    assert "spec.server.image: image 'registry.example.com/other:1' is not allowed" in failed["SpecValid"]["message"]
    assert kubectl.json("get", "pods")["items"] == [] and kubectl.json("get", "secrets")["items"] == []
    # runPolicy.ttlSecondsAfterFinished: the finished job is deleted.
    wait_for(lambda: kubectl.json("get", "aresjobs")["items"] == [], 30, "the job to expire", interval=0.2)
