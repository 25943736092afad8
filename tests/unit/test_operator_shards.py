"""The operator's objects for a job with server shards (spec.server.shards > 1), without a cluster:
names, arguments, URLs, certificate names, tokens, and each device's shard as the servers compute it."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from ares.core.config import ServerConfig
from ares.core.sharding import assign
from ares.roles.cli import _shard_role, build_parser
from ares.runtime.shardproto import SHARD_TOKEN_NAME
from ares_operator import builders, reconcile, status, tls, validation
from ares_operator import constants as c
from ares_operator.builders import JobRef
from ares_operator.settings import ImageSettings, OperatorSettings

ROOT = Path(__file__).resolve().parents[2]
JOB = JobRef("demo", "lab", "uid-1")
SETTINGS = OperatorSettings(images=ImageSettings(server="srv:1", device="dev:1", device_jetson="jet:1"))
DEVICES = [f"d{i}" for i in range(8)]


def raw_spec(shards=2, devices=DEVICES, **overrides):
    raw = yaml.safe_load((ROOT / "examples" / "job.yaml").read_text())["spec"]
    raw["server"] = {**raw["server"], "shards": shards}
    raw["devices"] = [{"name": d, "deviceClass": "cpu"} for d in devices]
    raw.update(overrides)
    return raw


def spec(shards=2, **overrides):
    parsed, problems = validation.validate("demo", raw_spec(shards, **overrides), SETTINGS)
    assert parsed is not None and problems == []
    return parsed


def by_kind(objs, kind):
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def pod_view(name, role, phase="Running", attempt=0, terminating=False):
    return reconcile.PodView(name=name, role=role, device="", phase=phase, attempt=attempt, terminating=terminating,
                             annotations={c.ANNOTATION_ATTEMPT: str(attempt)}, started=phase == "Running")


def test_one_shard_is_exactly_the_unsharded_job():
    raw = raw_spec()
    del raw["server"]["shards"]
    plain = validation.validate("demo", raw, SETTINGS)[0]
    one = spec(shards=1)
    assert plain.server.shards == 1
    assert builders.children(JOB, one, SETTINGS) == builders.children(JOB, plain, SETTINGS)
    kinds = [(o["kind"], o["metadata"]["name"]) for o in builders.children(JOB, one, SETTINGS)]
    assert kinds[:4] == [("Secret", "demo-tokens"), ("ConfigMap", "demo-config"), ("Service", "demo-server"),
                         ("Pod", "demo-server")]
    assert not [k for k in kinds if "shard" in k[1]]
    assert tls.server_names(JOB, shards=1) == tls.server_names(JOB)
    assert set(builders.tokens(one, {}, lambda: "t" * 20)) == {*DEVICES, "controller.token"}


def test_children_of_a_sharded_job():
    s = spec(shards=3)
    objs = builders.children(JOB, s, SETTINGS)
    assert sorted(by_kind(objs, "Service")) == ["demo-server", "demo-shard-0", "demo-shard-1", "demo-shard-2"]
    pods = by_kind(objs, "Pod")
    assert {"demo-server", "demo-shard-0", "demo-shard-1", "demo-shard-2"} <= set(pods)
    assert len(pods) == 4 + len(DEVICES)
    for i in range(3):
        svc = by_kind(objs, "Service")[f"demo-shard-{i}"]
        assert svc["spec"]["selector"] == {c.LABEL_JOB: "demo", c.LABEL_ROLE: "shard", c.LABEL_SHARD: str(i)}
        assert pods[f"demo-shard-{i}"]["metadata"]["labels"][c.LABEL_SHARD] == str(i)
        assert pods[f"demo-shard-{i}"]["metadata"]["labels"][c.LABEL_ROLE] == "shard"
    # the root Service selects the root alone, not a shard
    assert by_kind(objs, "Service")["demo-server"]["spec"]["selector"] == {c.LABEL_JOB: "demo", c.LABEL_ROLE: "server"}
    config = ServerConfig.model_validate(yaml.safe_load(by_kind(objs, "ConfigMap")["demo-config"]["data"]["server.yaml"]))
    assert config.shards == 3 and config.shard_pins == {}


def test_shard_pod_runs_its_shard_following_the_root(tmp_path):
    s = spec(shards=2)
    p = builders.shard_pod(JOB, s, SETTINGS, 1)
    container = p["spec"]["containers"][0]
    args = container["args"]
    assert args == ["server", "--config", "/etc/ares/server.yaml", "--tls-cert", "/var/run/ares/tls/tls.crt",
                    "--tls-key", "/var/run/ares/tls/tls.key", "--shard", "1",
                    "--root", "https://demo-server.lab.svc:43000", "--ca", "/var/run/ares/ca/ca.crt"]
    # the real command line accepts them: shard 1 of the job's config, trusting the job's CA
    parsed = build_parser().parse_args(args)
    assert parsed.ca == "/var/run/ares/ca/ca.crt"
    parsed.ca = str(tmp_path / "ca.crt")  # the mounted file, here
    Path(parsed.ca).write_text("pem")
    role = _shard_role(parsed, builders.server_config(s))
    assert (role.index, role.url) == (1, "https://demo-server.lab.svc:43000")
    assert "initContainers" not in p["spec"]  # no checkpoints of its own: the root keeps them
    volumes = {v["name"]: v for v in p["spec"]["volumes"]}
    assert volumes["checkpoints"] == {"name": "checkpoints", "emptyDir": {}}
    assert volumes["ca"]["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    mine = assign(DEVICES, 2)[1]
    assert [i["key"] for i in volumes["tokens"]["secret"]["items"]] == [*mine, "controller.token", "shard.token"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["ca"] == "/var/run/ares/ca" and mounts["tokens"] == c.TOKENS_DIR and mounts["tls"] == c.TLS_DIR
    # the same image, probes and placement as the server
    server = builders.server_pod(JOB, s, SETTINGS)
    assert container["image"] == server["spec"]["containers"][0]["image"]
    assert container["startupProbe"] == server["spec"]["containers"][0]["startupProbe"]
    assert p["spec"].get("nodeName") == server["spec"].get("nodeName")
    # the root mounts every token, the shard token among them
    assert "items" not in {v["name"]: v for v in server["spec"]["volumes"]}["tokens"]["secret"]


def test_each_device_dials_its_shard_as_the_servers_assign_it():
    s = spec(shards=3)
    groups = assign(DEVICES, 3)
    assert all(groups), "eight devices over three shards: each holds some"
    assert builders.shard_devices(s) == [list(g) for g in groups]
    for i, group in enumerate(groups):
        for name in group:
            p = builders.device_pod(JOB, s, s.device(name), SETTINGS, 1)
            args = p["spec"]["containers"][0]["args"]
            assert args[args.index("--server") + 1] == f"https://demo-shard-{i}.lab.svc:43000"
            sidecar = p["spec"]["initContainers"][0]["args"]
            assert sidecar[sidecar.index("--server") + 1] == f"demo-shard-{i}.lab.svc"
    one = spec(shards=1)
    args = builders.device_pod(JOB, one, one.device("d0"), SETTINGS, 1)["spec"]["containers"][0]["args"]
    assert args[args.index("--server") + 1] == "https://demo-server.lab.svc:43000"


def test_certificate_names_every_shard_service_and_tokens_add_the_shard_token():
    s = spec(shards=2)
    secret = tls.secret(JOB, s)
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    names = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName))
    for svc in ("demo-server", "demo-shard-0", "demo-shard-1"):
        assert {svc, f"{svc}.lab", f"{svc}.lab.svc", f"{svc}.lab.svc.cluster.local"} <= names
    assert "demo-shard-2" not in names
    assert c.SHARD_TOKEN_KEY == SHARD_TOKEN_NAME
    values = builders.tokens(s, {"d0": "kept-token-0123456789"}, iter(f"new-{i:020d}" for i in range(99)).__next__)
    assert set(values) == {*DEVICES, "controller.token", "shard.token"} and values["d0"] == "kept-token-0123456789"
    assert len(set(values.values())) == len(values)


@pytest.mark.parametrize("overrides, name, problem", [
    ({"training": {"aggregation": {"method": "median"}}}, "demo", "cannot aggregate with median"),
    ({"training": {"aggregation": {"method": "trimmed_mean"}}}, "demo", "cannot aggregate with trimmed_mean"),
    ({"devices": ["d0", "shard-1"]}, "demo", "taken by a sharded job's shard pods"),
    ({}, "j" * 56, "too long for 2 shards"),
])
def test_refused_sharded_specs(overrides, name, problem):
    parsed, problems = validation.validate(name, raw_spec(2, **overrides), SETTINGS)
    assert any(problem in p for p in problems), problems
    # the same spec with one server is fine (the long name aside)
    if name == "demo":
        assert validation.validate(name, raw_spec(1, **overrides), SETTINGS)[1] == []


@pytest.mark.parametrize("shards", [0, 65])
def test_shards_out_of_bounds(shards):
    parsed, problems = validation.validate("demo", raw_spec(shards), SETTINGS)
    assert parsed is None and any("shards" in p for p in problems)


def test_plan_creates_shards_and_replaces_a_failed_or_deleted_one():
    s = spec(shards=2)
    first = reconcile.plan_pods(JOB, s, SETTINGS, [], {}, 0, {})
    created = sorted(o["metadata"]["name"] for o in first.create)
    assert {"demo-server", "demo-shard-0", "demo-shard-1"} <= set(created) and first.shard_restarts == {0: 0, 1: 0}
    healthy = [pod_view("demo-server", "server"), pod_view("demo-shard-0", "shard"), pod_view("demo-shard-1", "shard"),
               *(pod_view(f"demo-{d}", "device") for d in DEVICES)]
    steady = reconcile.plan_pods(JOB, s, SETTINGS, healthy, {}, 0, {}, server_seen=True)
    assert steady.create == () and steady.delete == () and steady.shards_seen == frozenset({0, 1})
    # shard 1 failed: replaced, counted, the others untouched
    failed = [p if p.name != "demo-shard-1" else pod_view("demo-shard-1", "shard", "Failed") for p in healthy]
    actions = reconcile.plan_pods(JOB, s, SETTINGS, failed, {}, 0, {}, server_seen=True,
                                  shard_restarts={}, shards_seen=frozenset({0, 1}))
    assert actions.delete == ("demo-shard-1",) and [o["metadata"]["name"] for o in actions.create] == ["demo-shard-1"]
    assert actions.create[0]["metadata"]["annotations"][c.ANNOTATION_ATTEMPT] == "1"
    assert actions.shard_restarts == {0: 0, 1: 1} and actions.outcome is None
    # shard 0 deleted after it was seen: re-created and counted; never seen: created, not counted
    gone = [p for p in healthy if p.name != "demo-shard-0"]
    actions = reconcile.plan_pods(JOB, s, SETTINGS, gone, {}, 0, {}, server_seen=True,
                                  shard_restarts={}, shards_seen=frozenset({0, 1}))
    assert [o["metadata"]["name"] for o in actions.create] == ["demo-shard-0"] and actions.shard_restarts[0] == 1
    assert reconcile.plan_pods(JOB, s, SETTINGS, gone, {}, 0, {}, server_seen=True,
                                  shard_restarts={}, shards_seen=frozenset({1})).shard_restarts[0] == 0
    # past serverBackoffLimit (3): the job fails
    actions = reconcile.plan_pods(JOB, s, SETTINGS, gone, {}, 0, {}, server_seen=True,
                                  shard_restarts={0: 3}, shards_seen=frozenset({0, 1}))
    assert actions.outcome is not None and actions.outcome.reason == c.REASON_SERVER_FAILED
    assert "shard 0" in actions.outcome.message
    # a shard that exited 0 (training over) is left alone
    done = [p if p.name != "demo-shard-1" else pod_view("demo-shard-1", "shard", "Succeeded") for p in healthy]
    assert reconcile.plan_pods(JOB, s, SETTINGS, done, {}, 0, {}, server_seen=True,
                                  shard_restarts={}, shards_seen=frozenset({0, 1})).create == ()


def test_status_shows_each_shard():
    s = spec(shards=2)
    pods = [pod_view("demo-shard-0", "shard"), pod_view("demo-shard-1", "shard", "Pending")]
    out = status.shards(JOB, s, pods, {1: 2})
    sizes = [len(g) for g in assign(DEVICES, 2)]
    assert out == [{"index": 0, "pod": "demo-shard-0", "podPhase": "Running", "ready": True, "devices": sizes[0],
                    "restarts": 0},
                   {"index": 1, "pod": "demo-shard-1", "podPhase": "Pending", "ready": False, "devices": sizes[1],
                    "restarts": 2}]
    assert status.shards_seen({"phase": "Running", "shards": out}) == frozenset({0, 1})
    assert status.shard_restarts({"shards": out}) == {0: 0, 1: 2}
    assert status.shards(JOB, spec(shards=1), pods, {}) == []


def test_a_device_pinned_to_a_shard_dials_it_and_the_servers_place_it_there():
    """`devices[].shard` in place of the hashing: the device pod's URL, the shard's device list and
    the servers' config (`shard_pins`, from which the shards and the root assign) all agree."""
    hashed = assign(DEVICES, 3)
    moved = next(d for d in DEVICES if d not in hashed[2])  # a device the hashing puts elsewhere
    raw = raw_spec(3)
    raw["devices"] = [{**d, "shard": 2} if d["name"] == moved else d for d in raw["devices"]]
    parsed, problems = validation.validate("demo", raw, SETTINGS)
    assert problems == [] and parsed is not None
    args = builders.device_pod(JOB, parsed, parsed.device(moved), SETTINGS, 1)["spec"]["containers"][0]["args"]
    assert args[args.index("--server") + 1] == "https://demo-shard-2.lab.svc:43000"
    assert moved in builders.shard_devices(parsed)[2]
    objs = builders.children(JOB, parsed, SETTINGS)
    config = ServerConfig.model_validate(yaml.safe_load(by_kind(objs, "ConfigMap")["demo-config"]["data"]["server.yaml"]))
    assert config.shard_pins == {moved: 2}
    assert [list(g) for g in assign(config.devices, config.shards, config.shard_pins)] == builders.shard_devices(parsed)


@pytest.mark.parametrize("shards, pin, refused", [(3, 3, True), (1, 1, True), (1, 0, False), (3, 2, False)])
def test_a_pin_beyond_the_jobs_shards_is_refused(shards, pin, refused):
    raw = raw_spec(shards)
    raw["devices"][0]["shard"] = pin
    parsed, problems = validation.validate("demo", raw, SETTINGS)
    assert any("pinned to a shard the job does not have" in p for p in problems) == refused, problems
    if not refused:
        assert problems == []
