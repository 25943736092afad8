"""The operator's pure parts: objects built from a spec, pod decisions, status and conditions."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

from ares.core.config import ServerConfig
from ares.core.messages import DeviceStatus, ServerStatus
from ares_operator import builders, conditions, reconcile, status
from ares_operator import constants as c
from ares_operator.builders import JobRef
from ares_operator.settings import ImageSettings, OperatorSettings, ServerAccessSettings, from_env
from ares_operator.spec import parse_spec

JOB = JobRef("demo", "lab", "uid-1")
SETTINGS = OperatorSettings(images=ImageSettings(server="srv:1", device="dev:1", device_jetson="jet:1"))
OWNER = {"apiVersion": "ares.io/v1alpha1", "kind": "AresTrainingJob", "name": "demo", "uid": "uid-1",
         "controller": True, "blockOwnerDeletion": True}


def spec(**overrides):
    raw = yaml.safe_load((ROOT / "examples" / "job.yaml").read_text())["spec"]
    raw.update(overrides)
    return parse_spec(raw)


def test_model_layer_table_matches_the_models():
    from ares.core.models import build_model, n_layers

    assert {name: n_layers(build_model(name)) for name in c.MODEL_LAYERS} == c.MODEL_LAYERS


def test_service_and_secret_are_whole_objects():
    assert builders.service(JOB) == {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "demo-server", "namespace": "lab", "ownerReferences": [OWNER],
                     "labels": {"ares.io/job": "demo", "app.kubernetes.io/managed-by": "ares-operator",
                                "ares.io/role": "server", "app.kubernetes.io/name": "ares",
                                "app.kubernetes.io/instance": "demo", "app.kubernetes.io/component": "server",
                                "app.kubernetes.io/part-of": "ares"}},
        "spec": {"selector": {"ares.io/job": "demo", "ares.io/role": "server"},
                 "ports": [{"name": "http", "port": 43000, "targetPort": "http", "protocol": "TCP"}]},
    }
    secret = builders.tokens_secret(JOB, {"pi": "t1", "controller.token": "t0"})
    assert secret["data"] == {"controller.token": base64.b64encode(b"t0").decode(), "pi": base64.b64encode(b"t1").decode()}
    assert builders.decode_secret(secret) == {"pi": "t1", "controller.token": "t0"}
    assert secret["metadata"]["ownerReferences"] == [OWNER] and secret["metadata"]["name"] == "demo-tokens"


def test_tokens_are_kept_and_only_missing_ones_made():
    made = iter(["new-1", "new-2", "new-3"])
    values = builders.tokens(spec(), {"pi": "old-pi", "stale-device": "x"}, lambda: next(made))
    assert values == {"nano-maxn": "new-1", "nano-5w": "new-2", "pi": "old-pi", "controller.token": "new-3"}


def test_config_map_holds_the_servers_config():
    cm = builders.config_map(JOB, spec())
    config = ServerConfig.model_validate(yaml.safe_load(cm["data"]["server.yaml"]))
    assert config == builders.server_config(spec())
    assert config.devices == ("nano-maxn", "nano-5w", "pi") and config.tokens_dir == "/var/run/ares/tokens"
    assert config.training.rounds == 20 and config.round_deadline_s == 300 and config.data.name == "synthetic"


@pytest.mark.parametrize("device, runtime, image, privileged", [
    ("nano-maxn", "nvidia", "jet:1", True),
    ("pi", None, "dev:1", False),
], ids=["jetson", "raspberry-pi"])
def test_device_pod(device, runtime, image, privileged):
    s = spec()
    pod = builders.device_pod(JOB, s, s.device(device), SETTINGS, split=2, attempt=1)
    meta, pspec = pod["metadata"], pod["spec"]
    assert meta["name"] == f"demo-{device}" and meta["ownerReferences"] == [OWNER]
    assert meta["annotations"][c.ANNOTATION_SPLIT] == "2" and meta["annotations"][c.ANNOTATION_ATTEMPT] == "1"
    assert pspec.get("runtimeClassName") == runtime and pspec["automountServiceAccountToken"] is False
    assert pspec["restartPolicy"] == "Never"
    (trainer,), (sidecar,) = pspec["containers"], pspec["initContainers"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar: the pod's phase follows the trainer
    assert trainer["image"] == sidecar["image"] == image
    args = trainer["args"]
    assert args[args.index("--server") + 1] == "https://demo-server.lab.svc:43000"
    assert args[args.index("--split-file") + 1] == "/etc/podinfo/split-point"
    assert args[args.index("--token-file") + 1] == "/var/run/ares/token/token"
    volumes = {v["name"]: v for v in pspec["volumes"]}
    assert volumes["token"]["secret"] == {"secretName": "demo-tokens", "defaultMode": 0o440,
                                          "items": [{"key": device, "path": "token"}]}
    assert (sidecar["securityContext"].get("privileged") is True) == privileged
    if not privileged:
        assert sidecar["securityContext"]["capabilities"]["add"] == ["NET_ADMIN"]
    assert ("nvpmodel" in volumes) == privileged and ("--nvpmodel-conf" in sidecar["args"]) == privileged
    assert sidecar["args"][sidecar["args"].index("--server") + 1] == "demo-server.lab.svc"


def test_server_pod_mounts_and_placement():
    pod = builders.server_pod(JOB, spec(), SETTINGS)
    assert pod["spec"]["nodeName"] == "edge-server" and pod["spec"]["containers"][0]["image"] == "srv:1"
    mounts = {m["mountPath"]: m["name"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert mounts == {"/etc/ares": "config", "/var/run/ares/tokens": "tokens", "/var/run/ares/tls": "tls",
                      "/var/lib/ares/checkpoints": "checkpoints", "/data": "data"}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    # keyed by the job's uid: a new job of the same name never resumes the old one's checkpoint
    assert volumes["checkpoints"]["hostPath"]["path"] == "/var/lib/ares/checkpoints/lab/demo-uid-1"
    claimed = builders.server_pod(JOB, spec(server={"checkpointClaim": "ckpt"}), SETTINGS)
    assert {v["name"]: v for v in claimed["spec"]["volumes"]}["checkpoints"] == \
        {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "ckpt"}}
    mount = next(m for m in claimed["spec"]["containers"][0]["volumeMounts"] if m["name"] == "checkpoints")
    assert mount == {"name": "checkpoints", "mountPath": "/var/lib/ares/checkpoints", "subPath": "lab/demo-uid-1"}
    (prepare,) = claimed["spec"]["initContainers"]  # the same sub-path, made the server's before it starts
    assert prepare["volumeMounts"] == [mount] and prepare["command"] == ["chown"]
    assert prepare["args"] == ["10001:10001", "/var/lib/ares/checkpoints"]
    assert prepare["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}


@pytest.mark.parametrize("split_spec, device_split, expected", [
    ({"mode": "adaptive"}, None, 3),
    ({"mode": "adaptive", "point": 1}, None, 1),
    ({"mode": "adaptive", "point": 1}, 5, 5),
    ({"mode": "fixed", "point": 2}, None, 2),
    ({"mode": "none"}, 2, 6),
], ids=["adaptive-mid", "adaptive-point", "pinned-wins", "fixed", "none-all-on-device"])
def test_initial_split(split_spec, device_split, expected):
    s = spec(split=split_spec)
    device = s.devices[0].model_copy(update={"split": device_split})
    assert builders.initial_split(s, device, 7) == expected


def test_settings_from_env():
    ours = from_env({"ARES_SERVER_IMAGE": "a", "ARES_SERVER_URL_TEMPLATE": "http://127.0.0.1:9/{job}",
                     "ARES_LOG_LEVEL": "debug"})
    assert ours.images.server == "a" and ours.images.device == ImageSettings.device and ours.log_level == "DEBUG"
    assert ours.server.url("j", "ns") == "http://127.0.0.1:9/j"
    assert ServerAccessSettings().url("j", "ns") == "https://j-server.ns.svc:43000"


# --- reconcile decisions -------------------------------------------------------------------------

def pod(name, phase="Running", attempt=0, role="device", terminating=False, **annotations):
    device = name.removeprefix("demo-") if role == "device" else ""
    return reconcile.PodView(name=name, role=role, device=device, phase=phase, attempt=attempt,
                             terminating=terminating, annotations={c.ANNOTATION_ATTEMPT: str(attempt), **annotations})


HEALTHY = [pod("demo-server", role="server"), pod("demo-nano-maxn"), pod("demo-nano-5w"), pod("demo-pi")]


def names(objs):
    return sorted(o["metadata"]["name"] for o in objs)


def test_plan_creates_what_is_missing_only():
    actions = reconcile.plan_pods(JOB, spec(), SETTINGS, [], {}, 0, {})
    assert names(actions.create) == ["demo-nano-5w", "demo-nano-maxn", "demo-pi", "demo-server"]
    assert reconcile.plan_pods(JOB, spec(), SETTINGS, HEALTHY, {}, 0, {}) == reconcile.Actions(
        restarts={"nano-maxn": 0, "nano-5w": 0, "pi": 0}, server_seen=True)


def test_failed_device_is_replaced_with_its_current_split():
    pods = HEALTHY[:3] + [pod("demo-pi", "Failed", attempt=1)]
    actions = reconcile.plan_pods(JOB, spec(), SETTINGS, pods, {"pi": 0}, 0, {"pi": 4})
    assert actions.delete == ("demo-pi",) and names(actions.create) == ["demo-pi"]
    new = actions.create[0]["metadata"]["annotations"]
    assert new[c.ANNOTATION_ATTEMPT] == "2" and new[c.ANNOTATION_SPLIT] == "4"
    assert actions.restarts["pi"] == 2 and actions.outcome is None  # the attempt annotation beats stale status


def test_device_past_its_backoff_limit_is_left_and_the_job_goes_on():
    pods = HEALTHY[:3] + [pod("demo-pi", "Failed", attempt=3)]
    actions = reconcile.plan_pods(JOB, spec(), SETTINGS, pods, {}, 0, {})
    assert actions.gave_up == ("pi",) and actions.delete == () and actions.create == () and actions.outcome is None


def test_all_devices_lost_fails_the_job():
    pods = HEALTHY[:1] + [pod(f"demo-{d}", "Failed", attempt=3) for d in ("nano-maxn", "nano-5w", "pi")]
    outcome = reconcile.plan_pods(JOB, spec(), SETTINGS, pods, {}, 0, {}).outcome
    assert outcome.phase == "Failed" and outcome.reason == c.REASON_ALL_DEVICES_LOST


def test_terminating_pods_are_waited_for_not_counted():
    pods = HEALTHY[:3] + [pod("demo-pi", "Failed", attempt=1, terminating=True)]
    assert reconcile.plan_pods(JOB, spec(), SETTINGS, pods, {}, 0, {}).create == ()


@pytest.mark.parametrize("restarts, replaced", [(0, True), (3, False)], ids=["replaced", "limit"])
def test_failed_server(restarts, replaced):
    pods = [pod("demo-server", "Failed", role="server", attempt=restarts)] + HEALTHY[1:]
    actions = reconcile.plan_pods(JOB, spec(), SETTINGS, pods, {}, restarts, {})
    if replaced:
        assert actions.delete == ("demo-server",) and names(actions.create) == ["demo-server"]
        assert actions.server_restarts == 1 and actions.outcome is None
    else:
        assert actions.outcome.reason == c.REASON_SERVER_FAILED and actions.create == ()


def test_annotation_patches_follow_spec_and_plan():
    s = spec()
    pods = [pod("demo-nano-maxn", **{c.ANNOTATION_SPLIT: "3", c.ANNOTATION_POWER_MODE: "MAXN", c.ANNOTATION_BANDWIDTH: ""}),
            pod("demo-nano-5w", **{c.ANNOTATION_SPLIT: "3", c.ANNOTATION_POWER_MODE: "MAXN", c.ANNOTATION_BANDWIDTH: "20mbit"}),
            pod("demo-pi", "Failed", **{c.ANNOTATION_SPLIT: "3"})]
    patches = reconcile.annotation_patches(s, JOB, pods, reconcile.desired_splits(s, {"nano-maxn": 1, "pi": 0}))
    assert patches == {"demo-nano-maxn": {c.ANNOTATION_SPLIT: "1"}, "demo-nano-5w": {c.ANNOTATION_POWER_MODE: "5W"}}


def test_pinned_splits_override_the_plan():
    s = spec(split={"mode": "adaptive"}, devices=[{"name": "a", "deviceClass": "cpu", "split": 2},
                                                  {"name": "b", "deviceClass": "cpu"}])
    assert reconcile.desired_splits(s, {"a": 5, "b": 4}) == {"a": 2, "b": 4}
    assert builders.pinned_splits(spec(split={"mode": "fixed", "point": 1})) == {"nano-maxn": 1, "nano-5w": 1, "pi": 1}


@pytest.mark.parametrize("phase, outcome", [("training", None), ("finished", "Succeeded"), ("failed", "Failed")])
def test_training_outcome(phase, outcome):
    result = reconcile.training_outcome(ServerStatus(round=4, rounds=4, phase=phase, accuracy=0.5))
    assert (result.phase if result else None) == outcome


# --- status and conditions -------------------------------------------------------------------

def test_status_summary_merges_server_and_pods():
    server = ServerStatus(round=2, rounds=4, phase="training", accuracy=0.41234, loss=1.5,
                          devices={"pi": DeviceStatus(split=1, phase="training", up_bps=1e6, energy_j=2.0)})
    pods = HEALTHY[:3] + [pod("demo-pi", "Pending", **{c.ANNOTATION_SPLIT: "3"})]
    previous = {"devices": [{"name": "pi", "downBps": 5e5}]}
    out = status.summary(JOB, spec(), pods, server, previous, {"pi": 1}, 0)
    assert out["progress"] == "2/4" and out["ready"] == "2/3" and out["accuracy"] == 0.4123
    devices = {d["name"]: d for d in out["devices"]}
    assert devices["pi"] == {"name": "pi", "split": 1, "phase": "training", "podPhase": "Pending", "restarts": 1,
                             "upBps": 1e6, "downBps": 5e5, "energyJ": 2.0, "energySource": "none"}
    assert devices["nano-5w"]["podPhase"] == "Running"


def test_condition_transition_time_changes_only_on_flip():
    conds = conditions.set_condition([], "Ready", False, "Waiting", "m1", "t1", 1)
    conds = conditions.set_condition(conds, "Ready", False, "StillWaiting", "m2", "t2", 2)
    assert conds == [{"type": "Ready", "status": "False", "reason": "StillWaiting", "message": "m2",
                      "lastTransitionTime": "t1", "observedGeneration": 2}]
    conds = conditions.set_condition(conds, "Ready", True, "Done", "m3", "t3")
    assert conds[0]["lastTransitionTime"] == "t3" and conditions.is_true(conds, "Ready")
    conds = conditions.set_condition(conds, "Other", True, "X", "", "t4")
    assert [x["type"] for x in conds] == ["Other", "Ready"]


# --- pod security, scheduling, resources, lifecycle -----------------------------------------

RESTRICTED_POD = {"runAsUser": 10001, "runAsGroup": 10001, "runAsNonRoot": True, "fsGroup": 10001,
                  "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}


def _all_pods():
    s = spec()
    return {"server": builders.server_pod(JOB, s, SETTINGS),
            **{d.name: builders.device_pod(JOB, s, d, SETTINGS, split=3) for d in s.devices}}


@pytest.mark.parametrize("which", ["server", "nano-maxn", "nano-5w", "pi"])
def test_pods_run_restricted_but_for_the_sidecar_and_the_init_step(which):
    pod = _all_pods()[which]["spec"]
    jetson = which.startswith("nano")  # the GPU's device nodes belong to L4T's video group (44)
    assert pod["securityContext"] == {**RESTRICTED_POD, **({"supplementalGroups": [44]} if jetson else {})}
    for container in pod["containers"]:  # trainer, server: nothing of root
        assert container["securityContext"] == RESTRICTED_CONTAINER
    for init in pod.get("initContainers", []):
        assert init["name"] in ("host-control", "prepare-checkpoints")
        assert init["securityContext"]["runAsUser"] == 0  # the two that need root, and say why in builders
    for vol in pod["volumes"]:
        if "secret" in vol:
            assert vol["secret"]["defaultMode"] == 0o440  # read through the fsGroup, never world-readable


@pytest.mark.parametrize("which", ["server", "nano-maxn", "pi"])
def test_every_container_has_requests_and_limits(which):
    pod = _all_pods()[which]["spec"]
    for container in pod["containers"] + pod.get("initContainers", []):
        res = container["resources"]
        assert set(res["requests"]) >= {"cpu", "memory"} and set(res["limits"]) >= {"cpu", "memory"}, container["name"]
        for name, limit in res["limits"].items():
            assert builders.quantity(limit) >= builders.quantity(res["requests"][name]), (container["name"], name)


@pytest.mark.parametrize("given, want", [
    ({}, {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "4", "memory": "2Gi"}}),
    ({"requests": {"memory": "1Gi"}}, {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "4", "memory": "2Gi"}}),
    ({"requests": {"cpu": "8", "memory": "3Gi"}}, {"requests": {"cpu": "8", "memory": "3Gi"}, "limits": {"cpu": "8", "memory": "3Gi"}}),
    ({"limits": {"memory": "256Mi"}}, {"requests": {"cpu": "500m", "memory": "256Mi"}, "limits": {"cpu": "4", "memory": "256Mi"}}),
    ({"requests": {"nvidia.com/gpu": 1}, "limits": {"nvidia.com/gpu": 1}},
     {"requests": {"cpu": "500m", "memory": "512Mi", "nvidia.com/gpu": "1"},  # a YAML integer, as a quantity
      "limits": {"cpu": "4", "memory": "2Gi", "nvidia.com/gpu": "1"}}),
    ({"requests": {"memory": "lots"}}, {"requests": {"cpu": "500m", "memory": "lots"}, "limits": {"cpu": "4"}}),
], ids=["defaults", "own-request", "request-above-default-limit", "own-limit-below-default-request", "extended",
        "unreadable"])
def test_resources_defaults(given, want):
    assert builders.resources(c.CONTAINER_DEVICE, given) == want


@pytest.mark.parametrize("text, value", [("500m", 0.5), ("2", 2.0), ("2Gi", 2 * 2**30), ("1.5G", 1.5e9),
                                         (1, 1.0), ("two", None), ("3Zi", None)])
def test_quantity(text, value):
    assert builders.quantity(text) == value


def test_scheduling_fields_reach_the_pods():
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "ares.io/edge", "operator": "In", "values": ["true"]}]}]}}}
    s = spec(server={"tolerations": tolerations, "affinity": affinity, "imagePullSecrets": [{"name": "reg"}],
                     "priorityClassName": "edge-high"},
             devices=[{"name": "pi", "deviceClass": "raspberry-pi", "nodeSelector": {"k": "v"},
                       "tolerations": [{"key": "iot", "operator": "Exists"}], "priorityClassName": "iot"}])
    server = builders.server_pod(JOB, s, SETTINGS)["spec"]
    assert server["tolerations"] == tolerations and server["affinity"] == affinity
    assert server["imagePullSecrets"] == [{"name": "reg"}] and server["priorityClassName"] == "edge-high"
    pi = builders.device_pod(JOB, s, s.device("pi"), SETTINGS, split=1)["spec"]
    assert pi["tolerations"] == [{"key": "iot", "operator": "Exists"}] and pi["priorityClassName"] == "iot"
    assert pi["nodeSelector"] == {"k": "v"} and "affinity" not in pi and "imagePullSecrets" not in pi


def test_labels_are_the_recommended_ones():
    meta = _all_pods()["pi"]["metadata"]
    assert meta["labels"] == {"ares.io/job": "demo", "ares.io/role": "device", "ares.io/device": "pi",
                              "app.kubernetes.io/name": "ares", "app.kubernetes.io/instance": "demo",
                              "app.kubernetes.io/component": "device", "app.kubernetes.io/part-of": "ares",
                              "app.kubernetes.io/managed-by": "ares-operator"}


def test_server_probes():
    (server,) = _all_pods()["server"]["spec"]["containers"]
    probe = server["readinessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/healthz", "http")
    startup = server["startupProbe"]
    python, flag, script, port, wait = startup["exec"]["command"]
    assert (python, flag, script, port) == ("python3", "-c", builders.WAIT_FOR_PORT, "43000")
    # One attempt waits for the port (a start of normal length fails none: no Unhealthy Event),
    # within the kubelet's timeout; a server that loads torch, its data and a checkpoint has
    # minutes before it is killed.
    assert int(wait) < startup["timeoutSeconds"]
    assert startup["failureThreshold"] * int(wait) >= 300


def test_the_startup_probe_waits_for_the_port_then_succeeds_or_fails():
    """The probe's script, run as the kubelet runs it: success as soon as the port listens (here
    after a second), failure when it never does within its wait."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        started = time.monotonic()
        probe = subprocess.Popen([sys.executable, "-c", builders.WAIT_FOR_PORT, str(port), "20"])
        time.sleep(1)
        s.listen()
        assert probe.wait(timeout=20) == 0
        assert 1 <= time.monotonic() - started < 10
    started = time.monotonic()
    assert subprocess.run([sys.executable, "-c", builders.WAIT_FOR_PORT, str(port), "1"], timeout=20).returncode == 1
    assert time.monotonic() - started >= 1


def test_checkpoints_are_keyed_by_uid():
    s = spec()
    old, new = JobRef("demo", "lab", "uid-old"), JobRef("demo", "lab", "uid-new")
    path = lambda job: {v["name"]: v for v in builders.server_pod(job, s, SETTINGS)["spec"]["volumes"]}[
        "checkpoints"]["hostPath"]["path"]
    assert path(old) != path(new) and path(new).endswith("/lab/demo-uid-new")


# --- container statuses, suspend, deadline, clean-up, divergence -----------------------------------

def _terminated(name, code):
    return {"name": name, "state": {"terminated": {"exitCode": code}}}


@pytest.mark.parametrize("statuses, code", [
    ([], None),
    ([{"name": "device", "state": {"running": {}}}], None),
    ([_terminated("device", 137)], 137),
    ([_terminated("host-control", 1), {"name": "device", "state": {"running": {}}}], None),
    ([_terminated("server", 0)], 0),
], ids=["none", "running", "killed", "sidecar-only", "server-exit-0"])
def test_main_exit_code(statuses, code):
    assert reconcile.main_exit_code(statuses) == code


def test_a_trainer_that_exited_is_replaced_while_its_pod_still_runs():
    # The pod still says Running (its sidecar is stopping) but the trainer's container ended.
    raw = {"metadata": {"name": "demo-pi", "labels": {c.LABEL_ROLE: "device", c.LABEL_DEVICE: "pi"},
                        "annotations": {c.ANNOTATION_ATTEMPT: "0"}},
           "status": {"phase": "Running", "containerStatuses": [_terminated("device", 137)]}}
    view = reconcile.PodView.of(raw)
    assert view.failed and view.ended and not view.active and view.exit_code == 137
    actions = reconcile.plan_pods(JOB, spec(), SETTINGS, HEALTHY[:3] + [view], {}, 0, {})
    assert actions.delete == ("demo-pi",) and names(actions.create) == ["demo-pi"] and actions.restarts["pi"] == 1
    assert "exited with code 137" in actions.notes[0]


def test_a_trainer_that_finished_is_left_alone():
    view = dataclasses.replace(HEALTHY[3], exit_code=0)
    assert reconcile.plan_pods(JOB, spec(), SETTINGS, HEALTHY[:3] + [view], {}, 0, {}).create == ()


def test_suspend_deletes_every_pod_and_creates_none():
    s = spec(runPolicy={"suspend": True})
    pods = HEALTHY[:3] + [pod("demo-pi", "Failed", attempt=2)]
    actions = reconcile.plan_pods(JOB, s, SETTINGS, pods, {}, 0, {})
    assert actions.create == () and sorted(actions.delete) == names_of(pods)
    assert actions.restarts["pi"] == 2 and actions.outcome is None  # counters are kept
    assert reconcile.plan_pods(JOB, s, SETTINGS, [], {}, 0, {}) == reconcile.Actions(
        restarts={"nano-maxn": 0, "nano-5w": 0, "pi": 0})


def names_of(pods):
    return sorted(p.name for p in pods)


T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)


@pytest.mark.parametrize("run_policy, started, after, reason", [
    ({}, "2026-01-01T00:00:00Z", 10**6, None),
    ({"activeDeadlineSeconds": 60}, "2026-01-01T00:00:00Z", 59, None),
    ({"activeDeadlineSeconds": 60}, "2026-01-01T00:00:00Z", 60, c.REASON_DEADLINE_EXCEEDED),
    ({"activeDeadlineSeconds": 60}, None, 600, None),
    ({"activeDeadlineSeconds": 60, "suspend": True}, "2026-01-01T00:00:00Z", 600, None),
], ids=["no-deadline", "before", "at", "not-started", "suspended"])
def test_deadline(run_policy, started, after, reason):
    out = reconcile.deadline_outcome(spec(runPolicy=run_policy), started, T0 + datetime.timedelta(seconds=after))
    assert (out.reason if out else None) == reason
    if out:
        assert out.phase == "Failed" and "activeDeadlineSeconds (60 s)" in out.message


ENDED = reconcile.Outcome("Succeeded", c.REASON_COMPLETED, "")
MIXED = [pod("demo-server", role="server"), pod("demo-nano-maxn", "Pending"), pod("demo-nano-5w", "Failed"),
         pod("demo-pi", "Running", terminating=True)]


@pytest.mark.parametrize("policy, outcome, cleaned", [
    ("None", ENDED, []),
    ("Running", ENDED, ["demo-nano-maxn", "demo-server"]),
    ("All", ENDED, ["demo-nano-5w", "demo-nano-maxn", "demo-server"]),
    ("None", reconcile.Outcome("Failed", c.REASON_DEADLINE_EXCEEDED, ""), ["demo-nano-maxn", "demo-server"]),
], ids=["none", "running", "all", "deadline-stops-pods-anyway"])
def test_clean_pod_policy(policy, outcome, cleaned):
    s = spec(runPolicy={"cleanPodPolicy": policy})
    assert sorted(reconcile.pods_to_clean(s, MIXED, outcome)) == cleaned


@pytest.mark.parametrize("failure_reason, reason", [("diverged", c.REASON_TRAINING_DIVERGED),
                                                    (None, c.REASON_SERVER_REPORTED_FAILURE)])
def test_failed_server_reason(failure_reason, reason):
    server = ServerStatus(round=2, rounds=4, phase="failed", failure="training diverged: ...",
                          failure_reason=failure_reason)
    assert reconcile.training_outcome(server).reason == reason


@pytest.mark.parametrize("suspend, was_suspended, phase, cond, start", [
    (True, False, "Suspended", ("True", c.REASON_SUSPENDED), None),
    (False, True, None, ("False", c.REASON_RESUMED), "now"),
    (False, False, None, None, None),
], ids=["suspended", "resumed", "never"])
def test_suspension_status(suspend, was_suspended, phase, cond, start):
    previous = {"conditions": conditions.set_condition([], "Suspended", True, "JobSuspended", "", "t0")} \
        if was_suspended else {}
    out = status.suspension(spec(runPolicy={"suspend": suspend}), previous, previous.get("conditions", []), "now", 3)
    assert out.get("phase") == phase and out.get("startTime") == start
    got = conditions.find(out.get("conditions", []), "Suspended")
    assert (got["status"], got["reason"]) == cond if cond else got is None


@pytest.mark.parametrize("server_phase, round_index, previous, want", [
    ("waiting", 0, None, "Pending"),          # round 0 not started: devices still joining
    ("training", 0, "Pending", "Running"),
    ("waiting", 2, "Pending", "Running"),     # between rounds: a check that falls in the gap sees it trained
    ("waiting", 0, "Running", "Running"),     # a restarted server waiting for joins: still the job's run
    (None, 0, "Running", "Running"),          # unreachable: the phase it had
    (None, 0, None, "Pending"),
])
def test_a_job_is_running_once_its_server_trained_even_between_rounds(server_phase, round_index, previous, want):
    server = ServerStatus(round=round_index, rounds=4, phase=server_phase) if server_phase else None
    assert status.phase(server, previous) == want
