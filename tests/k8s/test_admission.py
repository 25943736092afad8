"""Admission: the API server refuses every AresTrainingJob spec the operator would refuse later,
wherever OpenAPI and CEL can say it, each with the rule's own message; it refuses edits the
operator cannot apply to a running job; and `kubectl explain` describes every field.

A job's spec is untrusted input from whoever may create one in a namespace. Runs the real
kubectl, as cluster admin, against the real kube-apiserver of tests/cluster, in one namespace
for the whole module (no operator runs: only admission is under test).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator

import pytest
import yaml

from cluster.controlplane import ControlPlane
from cluster.fixtures import Kubectl
from tests.support import ROOT
from tests.k8s.k8s_jobs import example_job as _job

pytestmark = pytest.mark.k8s

CRD = yaml.safe_load((ROOT / "crds" / "aresjobs.ares.io.yaml").read_text())
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module")
def admin(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kubectl]:
    """kubectl as cluster admin in a namespace of this module's own."""
    name = f"admission-{os.getpid() % 100000}"
    with control_plane.http() as http:
        http.post("/api/v1/namespaces", json={"apiVersion": "v1", "kind": "Namespace",
                                              "metadata": {"name": name}}).raise_for_status()
        config = tmp_path_factory.mktemp("admission") / "admin.kubeconfig"
        config.write_text(json.dumps(control_plane.kubeconfig(control_plane.admin_user(), name)))
        yield Kubectl(config, control_plane)
        http.delete(f"/api/v1/namespaces/{name}")


def _dry_run(admin: Kubectl, manifest: str | dict) -> subprocess.CompletedProcess:
    text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
    return admin.run("apply", "--dry-run=server", "-o", "json", "-f", "-", stdin=text, check=False)


def _long_name_job() -> dict:
    job = _job("j" * 30)  # 30 + '-' + 40 = 71 characters for the device's pod name
    job["spec"]["devices"][0]["name"] = "n" * 40
    return job


# --- 1. refused at admission, with the rule's own message ---------------------------------------

REFUSED = [
    (_job(devices__0__name="server"), "the device name 'server' is taken: the job's server pod is named <job>-server"),
    (_long_name_job(), "a device's pod is named <job>-<device>: the job's name, '-' and each device's name must "
                       "together be at most 63 characters"),
    (_job(model="resnet50"), 'spec.model: Unsupported value: "resnet50"'),
    (_job(server__resources={"requests": {"cpu": "-1"}}), "a resource quantity must not be negative"),
    (_job(devices__0__resources={"limits": {"cpu": -1}}), "a resource quantity must not be negative"),
    (_job(devices__0__resources={"requests": {"gpu": 1}}), "resource names are cpu, memory, ephemeral-storage, "
                                                           "hugepages-<size> or an extended resource with a domain"),
    (_job(devices__0__tolerations=[{"key": "a", "operator": "Bogus"}]),
     'spec.devices[0].tolerations[0].operator: Unsupported value: "Bogus"'),
    (_job(server__tolerations=[{"key": "a", "effect": "NoEvict"}]),
     'spec.server.tolerations[0].effect: Unsupported value: "NoEvict"'),
    (_job(server__tolerations=[{"operator": "Equal", "value": "x"}]),
     "a toleration without a key must have operator Exists"),
    (_job(server__tolerations=[{"key": "a", "operator": "Exists", "value": "x"}]),
     "a toleration with operator Exists takes no value"),
    (_job(devices__1__tolerations=[{"key": "a", "tolerationSeconds": 5}]),
     "tolerationSeconds is only for effect NoExecute"),
    (_job(dataset__syntheticTrain=2_000_000_000),
     "spec.dataset.syntheticTrain: Invalid value: 2000000000: spec.dataset.syntheticTrain in body should be less "
     "than or equal to 1000000"),
    (_job(runPolicy__roundDeadlineSeconds=1e300),
     "spec.runPolicy.roundDeadlineSeconds in body should be less than or equal to 604800"),
    (_job(runPolicy__activeDeadlineSeconds=10**12), "should be less than or equal to 31536000"),
    (_job(training__seed=2**31), "spec.training.seed in body should be less than or equal to 2147483647"),
    (_job(dataset__path="/var/lib/ares/../../etc"),
     "dataset.path must be an absolute path without '.', '..' or empty segments (no '//', no trailing '/')"),
    (_job(dataset__path="/var/lib/ares//datasets"), "dataset.path must be an absolute path without '.', '..'"),
    (_job(devices__1__bandwidth="0mbit"), "bandwidth must be above 0 and at most 100gbit"),
    (_job(devices__1__bandwidth="101gbit"), "bandwidth must be above 0 and at most 100gbit"),
    (_job(devices__0__affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "Near"}]}]}}}),
     'spec.devices[0].affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]'
     '.matchExpressions[0].operator: Unsupported value: "Near"'),
    (_job(server__shards=2, devices__0__shard=2), "a device's shard must be below server.shards"),
    (_job(devices__0__shard=1), "a device's shard must be below server.shards"),
]


@pytest.mark.parametrize("job, message", REFUSED, ids=[
    "device-named-server", "pod-name-too-long", "unknown-model", "negative-cpu-string", "negative-cpu-integer",
    "unqualified-resource-name", "toleration-operator", "toleration-effect", "toleration-without-key",
    "exists-with-value", "seconds-without-noexecute", "huge-synthetic-set", "huge-round-deadline",
    "huge-active-deadline", "seed-beyond-31-bits", "dot-dot-path", "double-slash-path", "zero-bandwidth",
    "huge-bandwidth", "affinity-operator", "shard-beyond-shards", "shard-without-shards"])
def test_refused_at_admission_with_the_rules_message(admin, job, message):
    proc = _dry_run(admin, job)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


# --- 2. accepted -----------------------------------------------------------------------------------

INTEGER_QUANTITIES = """\
apiVersion: ares.io/v1alpha1
kind: AresTrainingJob
metadata: {name: integers}
spec:
  server:
    resources:
      requests: {cpu: 2, memory: 2Gi}
      limits: {cpu: 4, nvidia.com/gpu: 1}
  devices:
    - name: orin
      deviceClass: jetson-orin
      resources:
        requests: {cpu: 2, nvidia.com/gpu: 1, hugepages-2Mi: 64Mi}
        limits: {nvidia.com/gpu: 1, ephemeral-storage: 1e9}
"""


def test_yaml_integer_quantities_are_accepted_and_kept(admin):
    proc = _dry_run(admin, INTEGER_QUANTITIES)
    assert proc.returncode == 0, proc.stderr
    spec = json.loads(proc.stdout)["spec"]
    assert spec["server"]["resources"]["requests"] == {"cpu": 2, "memory": "2Gi"}
    assert spec["devices"][0]["resources"]["requests"]["nvidia.com/gpu"] == 1


@pytest.mark.parametrize("job", [
    _job(devices__0__tolerations=[
        {"operator": "Exists"},
        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
         "tolerationSeconds": 300},
        {"key": "ares.io/device", "operator": "Equal", "value": "jetson", "effect": "NoSchedule"},
        {"key": "dedicated", "value": "ares", "effect": ""}]),
    _job(devices__1__bandwidth="100gbit", devices__2__bandwidth="0.5kbit"),
    _job("j" * 22, devices__0__name="n" * 40),  # 22 + 1 + 40 = 63
    _job(dataset__path="/var/lib/ares/datasets/cifar-10.v2", dataset__seed=2**31 - 1,
         runPolicy__roundDeadlineSeconds=604800, dataset__syntheticTrain=1_000_000),
    _job(server__shards=3, devices__0__shard=2, devices__1__shard=0),
], ids=["typed-tolerations", "bandwidth-bounds", "pod-name-of-63", "bounds-themselves", "shard-pins"])
def test_valid_edges_are_accepted(admin, job):
    proc = _dry_run(admin, job)
    assert proc.returncode == 0, proc.stderr


def test_every_example_is_accepted(admin):
    manifests = [p for p in sorted((ROOT / "examples").glob("*.yaml"))
                 if yaml.safe_load(p.read_text()).get("kind") == "AresTrainingJob"]
    assert len(manifests) >= 2
    for path in manifests:
        proc = _dry_run(admin, path.read_text())
        assert proc.returncode == 0, f"{path.name}: {proc.stderr}"


# --- 3. what cannot change once the job exists --------------------------------------------------

SERVER_FIXED = "server is fixed once the job exists"
DEVICE_FIXED = ("a device's nodeName, nodeSelector, deviceClass, image, resources, tolerations, affinity, "
                "imagePullSecrets, priorityClassName and shard are fixed once the job exists")
DEADLINE_FIXED = "runPolicy.roundDeadlineSeconds is fixed once the job exists"


NODE_AFFINITY = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
    {"weight": 10, "preference": {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}}]}}
POD_ANTI_AFFINITY = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
    {"weight": 10, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}]}}


@pytest.fixture(scope="module")
def running(admin: Kubectl) -> str:
    """A job created once for the module; refused patches leave it as it was."""
    admin.run("create", "-f", "-", stdin=yaml.safe_dump(_job("fixed", devices__1__affinity=NODE_AFFINITY)))
    return "fixed"


def _patch(admin: Kubectl, name: str, *ops: dict) -> subprocess.CompletedProcess:
    return admin.run("patch", "aresjob", name, "--type=json", "-p", json.dumps(list(ops)), check=False)


@pytest.mark.parametrize("op, message", [
    ({"op": "replace", "path": "/spec/server/resources", "value": {"requests": {"cpu": "4"}}}, SERVER_FIXED),
    ({"op": "replace", "path": "/spec/server/nodeName", "value": "edge-server-2"}, SERVER_FIXED),
    ({"op": "add", "path": "/spec/server/image", "value": "ghcr.io/ares-split/ares-server:0.2.0"}, SERVER_FIXED),
    ({"op": "remove", "path": "/spec/server/nodeName"}, SERVER_FIXED),
    ({"op": "replace", "path": "/spec/devices/0/nodeName", "value": "jetson-nano-9"}, DEVICE_FIXED),
    ({"op": "add", "path": "/spec/devices/0/image", "value": "ghcr.io/ares-split/ares-device-jetson:0.2.0"},
     DEVICE_FIXED),
    ({"op": "replace", "path": "/spec/devices/0/deviceClass", "value": "jetson-orin"}, DEVICE_FIXED),
    ({"op": "add", "path": "/spec/devices/0/resources", "value": {"limits": {"cpu": 1}}}, DEVICE_FIXED),
    ({"op": "add", "path": "/spec/devices/0/tolerations", "value": [{"operator": "Exists"}]}, DEVICE_FIXED),
    ({"op": "replace", "path": "/spec/devices/2/nodeSelector", "value": {"kubernetes.io/hostname": "pi-2"}},
     DEVICE_FIXED),
    ({"op": "add", "path": "/spec/devices/2/priorityClassName", "value": "high"}, DEVICE_FIXED),
    ({"op": "replace", "path": "/spec/devices/1/affinity", "value": POD_ANTI_AFFINITY}, DEVICE_FIXED),
    ({"op": "replace", "path": "/spec/devices/1/affinity/nodeAffinity/preferredDuringSchedulingIgnoredDuringExecution"
                               "/0/weight", "value": 20}, DEVICE_FIXED),
    ({"op": "add", "path": "/spec/devices/2/affinity", "value": NODE_AFFINITY}, DEVICE_FIXED),
    ({"op": "add", "path": "/spec/devices/0/shard", "value": 0}, DEVICE_FIXED),
    ({"op": "replace", "path": "/spec/runPolicy/roundDeadlineSeconds", "value": 301}, DEADLINE_FIXED),
    ({"op": "remove", "path": "/spec/runPolicy/roundDeadlineSeconds"}, DEADLINE_FIXED),  # back to the default
], ids=["server-resources", "server-node", "server-image-added", "server-node-removed", "device-node",
        "device-image-added", "device-class", "device-resources-added", "device-tolerations-added",
        "device-node-selector", "device-priority-class-added", "device-affinity-kind", "device-affinity-weight",
        "device-affinity-added", "device-shard-added", "round-deadline", "round-deadline-removed"])
def test_what_the_operator_cannot_apply_is_refused(admin, running, op, message):
    before = admin.json("get", "aresjob", running)["spec"]
    proc = _patch(admin, running, op)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert admin.json("get", "aresjob", running)["spec"] == before


def test_what_the_operator_applies_live_can_change(admin, running):
    ops = [
        {"op": "add", "path": "/spec/devices/0/split", "value": 3},
        {"op": "add", "path": "/spec/devices/0/bandwidth", "value": "10mbit"},
        {"op": "replace", "path": "/spec/devices/1/bandwidth", "value": "5mbit"},
        {"op": "replace", "path": "/spec/devices/0/powerMode", "value": "5W"},  # a Jetson device
        {"op": "replace", "path": "/spec/split/policy", "value": "ares"},
        {"op": "replace", "path": "/spec/split/alpha", "value": 0.8},
        {"op": "add", "path": "/spec/runPolicy/suspend", "value": True},
        {"op": "replace", "path": "/spec/runPolicy/backoffLimit", "value": 5},
        {"op": "add", "path": "/spec/runPolicy/activeDeadlineSeconds", "value": 7200},
        {"op": "replace", "path": "/spec/runPolicy/cleanPodPolicy", "value": "All"},
    ]
    for op in ops:  # each on its own, as a user edits
        proc = _patch(admin, running, op)
        assert proc.returncode == 0, f"{op}: {proc.stderr}"
    spec = admin.json("get", "aresjob", running)["spec"]
    assert spec["devices"][0]["split"] == 3
    assert (spec["devices"][0]["bandwidth"], spec["devices"][1]["bandwidth"], spec["devices"][0]["powerMode"]) == \
        ("10mbit", "5mbit", "5W")
    assert spec["split"]["policy"] == "ares" and spec["runPolicy"]["suspend"] is True
    # Removing a live field is an edit too: the device's cap and pinned split go.
    proc = _patch(admin, running, {"op": "remove", "path": "/spec/devices/0/bandwidth"},
                  {"op": "remove", "path": "/spec/devices/0/split"})
    assert proc.returncode == 0, proc.stderr


# --- 4. the installed CRD, and what kubectl explain shows ---------------------------------------

def test_the_installed_crd_is_this_one(admin):
    """The chart's copy installed (CEL costs within the API server's budget) and is crds/'s."""
    crd = admin.json("get", "crd", "aresjobs.ares.io")
    assert {c["type"]: c["status"] for c in crd["status"]["conditions"]}["Established"] == "True"
    assert crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"] == SCHEMA


def _nodes(schema: dict, path: str) -> Iterator[tuple[str, dict]]:
    """(path, schema) of every field, through arrays and maps, as kubectl explain names them."""
    for key, sub in (schema.get("properties") or {}).items():
        yield f"{path}.{key}", sub
        yield from _nodes(sub, f"{path}.{key}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from _nodes(schema[key], path)


def _explained(admin: Kubectl, field: str) -> str:
    """The DESCRIPTION block of `kubectl explain <field>`."""
    out = admin.run("explain", field).stdout
    match = re.search(r"^DESCRIPTION:\n(.*?)(?:^\S|\Z)", out, re.S | re.M)
    assert match, out
    return " ".join(match.group(1).split())


def _published(admin: Kubectl) -> dict:
    """The AresTrainingJob schema as the API server publishes it (OpenAPI v3): what kubectl explain reads."""
    doc = json.loads(admin.run("get", "--raw", "/openapi/v3/apis/ares.io/v1alpha1").stdout)
    schemas = doc["components"]["schemas"]
    (name,) = [k for k, v in schemas.items() if {"group": "ares.io", "kind": "AresTrainingJob", "version": "v1alpha1"}
               in v.get("x-kubernetes-group-version-kind", [])]

    def resolve(node: dict) -> dict:  # inline the $refs (allOf: [{$ref}]) the server writes for nested objects
        if "allOf" in node and len(node["allOf"]) == 1 and "$ref" in node["allOf"][0]:
            ref = schemas[node["allOf"][0]["$ref"].rsplit("/", 1)[-1]]
            node = {**ref, **{k: v for k, v in node.items() if k != "allOf"}}
        if "$ref" in node:
            node = schemas[node["$ref"].rsplit("/", 1)[-1]]
        out = dict(node)
        if "properties" in node:
            out["properties"] = {k: resolve(v) for k, v in node["properties"].items()}
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                out[key] = resolve(node[key])
        return out
    return resolve(schemas[name])


def test_kubectl_explain_describes_every_field(admin):
    fields = [f"aresjobs{p}" for p, _ in _nodes(SCHEMA, "") if not p.startswith(".metadata")]
    # Every field is listed by `kubectl explain --recursive` ...
    listed = admin.run("explain", "aresjobs", "--recursive").stdout
    for field in fields:
        assert re.search(rf"^\s+{re.escape(field.rsplit('.', 1)[-1])}\s", listed, re.M), field
    # ... and has a description in the document kubectl explain renders (one request for all of them) ...
    published = _published(admin)
    described = {f"aresjobs{p}": node.get("description", "") for p, node in _nodes(published, "")}
    assert set(fields) <= set(described), sorted(set(fields) - set(described))
    assert [f for f in fields if len(described[f].strip()) < 10] == []
    # ... which kubectl explain shows, field by field.
    for field in ("aresjobs.spec", "aresjobs.spec.dataset.path", "aresjobs.spec.devices.tolerations.operator",
                  "aresjobs.spec.devices.image", "aresjobs.spec.runPolicy.roundDeadlineSeconds",
                  "aresjobs.status.devices.upBps"):
        assert _explained(admin, field) == " ".join(described[field].split()), field
    assert "jobPolicy.allowedHostPaths" in _explained(admin, "aresjobs.spec.dataset.path")

