"""The operator's pure parts: objects built from a spec, pod decisions, status and conditions."""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "operator"))

from ares.core.config import ServerConfig  # noqa: E402
from ares.core.messages import DeviceStatus, ServerStatus  # noqa: E402
from ares_operator import builders, conditions, reconcile, status  # noqa: E402
from ares_operator import constants as c  # noqa: E402
from ares_operator.builders import JobRef  # noqa: E402
from ares_operator.settings import ImageSettings, OperatorSettings, ServerAccessSettings, from_env  # noqa: E402
from ares_operator.spec import parse_spec  # noqa: E402

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
                                "ares.io/role": "server"}},
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
    trainer, sidecar = pspec["containers"]
    assert trainer["image"] == sidecar["image"] == image
    args = trainer["args"]
    assert args[args.index("--server") + 1] == "https://demo-server.lab.svc:43000"
    assert args[args.index("--split-file") + 1] == "/etc/podinfo/split-point"
    assert args[args.index("--token-file") + 1] == "/var/run/ares/token/token"
    volumes = {v["name"]: v for v in pspec["volumes"]}
    assert volumes["token"]["secret"] == {"secretName": "demo-tokens", "defaultMode": 0o400,
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
    assert volumes["checkpoints"]["hostPath"]["path"] == "/var/lib/ares/checkpoints/lab/demo"
    claimed = builders.server_pod(JOB, spec(server={"checkpointClaim": "ckpt"}), SETTINGS)
    assert {v["name"]: v for v in claimed["spec"]["volumes"]}["checkpoints"] == \
        {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "ckpt"}}


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
        restarts={"nano-maxn": 0, "nano-5w": 0, "pi": 0})


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
    previous = {"devices": {"pi": {"downBps": 5e5}}}
    out = status.summary(JOB, spec(), pods, server, previous, {"pi": 1}, 0)
    assert out["progress"] == "2/4" and out["ready"] == "2/3" and out["accuracy"] == 0.4123
    assert out["devices"]["pi"] == {"split": 1, "phase": "training", "podPhase": "Pending", "restarts": 1,
                                    "upBps": 1e6, "downBps": 5e5, "energyJ": 2.0, "energySource": "none"}
    assert out["devices"]["nano-5w"]["podPhase"] == "Running"


def test_condition_transition_time_changes_only_on_flip():
    conds = conditions.set_condition([], "Ready", False, "Waiting", "m1", "t1", 1)
    conds = conditions.set_condition(conds, "Ready", False, "StillWaiting", "m2", "t2", 2)
    assert conds == [{"type": "Ready", "status": "False", "reason": "StillWaiting", "message": "m2",
                      "lastTransitionTime": "t1", "observedGeneration": 2}]
    conds = conditions.set_condition(conds, "Ready", True, "Done", "m3", "t3")
    assert conds[0]["lastTransitionTime"] == "t3" and conditions.is_true(conds, "Ready")
    conds = conditions.set_condition(conds, "Other", True, "X", "", "t4")
    assert [x["type"] for x in conds] == ["Other", "Ready"]
