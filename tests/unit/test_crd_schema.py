"""The CRD is a valid Kubernetes object, every example job passes its schema, invalid jobs do not.

A job's spec is untrusted input: every field is described (what `kubectl explain` shows), every
number bounded, and spec.py (what the operator parses every spec with) has the same defaults
and bounds as the CRD, so that the operator refuses what the API server refuses even where no
API server checked. What a schema cannot say (a split beyond the model's last layer, duplicate
device names for a plain JSON-schema validator) the operator's validation must catch instead:
both are checked here. CEL rules are evaluated by a real API server in tests/k8s/test_admission.py.
"""

from __future__ import annotations

import copy
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import AfterValidator, BaseModel
from pydantic.fields import FieldInfo

ROOT = Path(__file__).resolve().parents[2]

from ares_operator import constants as c
from ares_operator import spec as spec_py
from ares_operator import validation

CRD = yaml.safe_load((ROOT / "crds" / "aresjobs.ares.io.yaml").read_text())
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
SPEC = SCHEMA["properties"]["spec"]
EXAMPLES = sorted((ROOT / "examples").glob("job*.yaml"))


def plain(schema: Any) -> Any:
    """OpenAPI v3 structural schema -> JSON schema draft 4 (drop the x-kubernetes-* extensions)."""
    if isinstance(schema, dict):
        return {k: plain(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    return [plain(v) for v in schema] if isinstance(schema, list) else schema


def schema_errors(job: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in jsonschema.Draft4Validator(plain(SCHEMA)).iter_errors(job)]


def test_crd_is_a_valid_kubernetes_object():
    kubernetes_validate.validate(CRD, "1.30.0", strict=True)  # raises on any error
    assert CRD["spec"]["names"]["plural"] == "aresjobs" and "ares" in CRD["spec"]["names"]["categories"]
    assert VERSION["subresources"] == {"status": {}}


def _nodes(schema: dict, path: str = ""):
    yield path, schema
    for key, sub in (schema.get("properties") or {}).items():
        yield from _nodes(sub, f"{path}.{key}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from _nodes(schema[key], f"{path}[]")


def _fields(schema: dict, path: str = ""):
    """Every field `kubectl explain` lists: properties, through arrays and maps."""
    for key, sub in (schema.get("properties") or {}).items():
        yield f"{path}.{key}", sub
        yield from _fields(sub, f"{path}.{key}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from _fields(schema[key], path)


def test_schema_is_structural():
    """Every node has a type (or explicitly keeps unknown fields), as the API server demands."""
    untyped = [p for p, node in _nodes(SCHEMA) if "type" not in node
               and not node.get("x-kubernetes-preserve-unknown-fields")
               and not node.get("x-kubernetes-int-or-string")]  # quantities: int or string
    assert untyped == []
    assert not [p for p, node in _nodes(SCHEMA) if "uniqueItems" in node]  # forbidden in CRDs


def test_every_field_has_a_description():
    """What `kubectl explain aresjobs.<field>` shows: spec and status, every level."""
    fields = {p: node for p, node in _fields(SCHEMA) if p != ".metadata"}  # ObjectMeta: the server describes it
    assert len([p for p in fields if p.startswith(".spec.")]) >= 83
    missing = [p for p, node in fields.items() if len(node.get("description", "").strip()) < 10]
    assert missing == [], missing
    assert SCHEMA.get("description")


def test_every_number_in_the_spec_is_bounded():
    unbounded = [p for p, node in _nodes(SPEC, ".spec") if node.get("type") in ("integer", "number")
                 and ("maximum" not in node or "minimum" not in node)]
    assert unbounded == []


@pytest.mark.parametrize("field, maximum", [
    ("runPolicy.roundDeadlineSeconds", 7 * 86400),
    ("dataset.syntheticTrain", 1_000_000),
    ("dataset.syntheticTest", 1_000_000),
    ("dataset.seed", 2**31 - 1),
    ("training.seed", 2**31 - 1),
    ("runPolicy.activeDeadlineSeconds", 365 * 86400),
    ("runPolicy.ttlSecondsAfterFinished", 365 * 86400),
])
def test_documented_maxima(field, maximum):
    node = SPEC
    for key in field.split("."):
        node = node["properties"][key]
    assert node["maximum"] == maximum
    assert f"{maximum}" in node["description"]  # the description states the bound


def test_the_policy_the_administrator_sets_is_stated_where_users_read():
    props = SPEC["properties"]
    path = props["dataset"]["properties"]["path"]["description"]
    assert "jobPolicy.allowedHostPaths" in path and "read-only" in path
    for image in (props["server"]["properties"]["image"], props["devices"]["items"]["properties"]["image"]):
        assert "jobPolicy.allowedImages" in image["description"]
    assert "sidecar always runs the administrator's image" in \
        props["devices"]["items"]["properties"]["image"]["description"]


def test_server_and_devices_share_their_scheduling_schema():
    """The same shapes, bounds and rules for the server's pod and each device's (wording aside)."""
    def shape(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: shape(v) for k, v in node.items() if k != "description"}
        return [shape(v) for v in node] if isinstance(node, list) else node
    server = SPEC["properties"]["server"]["properties"]
    device = SPEC["properties"]["devices"]["items"]["properties"]
    for key in ("nodeName", "nodeSelector", "tolerations", "affinity", "imagePullSecrets", "priorityClassName",
                "image", "resources"):
        assert shape(server[key]) == shape(device[key]), key


def test_model_enum_is_the_models_the_operator_knows():
    assert sorted(SPEC["properties"]["model"]["enum"]) == sorted(c.MODEL_LAYERS)
    assert SPEC["properties"]["model"]["default"] in c.MODEL_LAYERS


# --- spec.py mirrors the CRD: walk both --------------------------------------------------------

def _peel(tp: Any, meta: list) -> tuple[Any, list]:
    """(core type, its constraints) with Optional and Annotated taken off."""
    while True:
        if get_origin(tp) is Annotated:
            tp, *more = get_args(tp)
            meta = meta + more
        elif get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp):
            (tp,) = [a for a in get_args(tp) if a is not type(None)]
        else:
            break
    flat = []
    for m in meta:
        flat += _peel(m.annotation, m.metadata)[1] if isinstance(m, FieldInfo) else [m]
    return tp, flat


def _bounds_of_python(meta: list) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in meta:
        if isinstance(m, at.Ge):
            out["min"] = (m.ge, False)
        elif isinstance(m, at.Gt):
            out["min"] = (m.gt, True)
        elif isinstance(m, at.Le):
            out["max"] = (m.le, False)
        elif isinstance(m, at.Lt):
            out["max"] = (m.lt, True)
        elif isinstance(m, at.MinLen):
            out["min_len"] = m.min_length
        elif isinstance(m, at.MaxLen):
            out["max_len"] = m.max_length
        elif getattr(m, "pattern", None):
            out["pattern"] = m.pattern
    return out


def _bounds_of_crd(node: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "minimum" in node:
        out["min"] = (node["minimum"], bool(node.get("exclusiveMinimum")))
    if "maximum" in node:
        out["max"] = (node["maximum"], bool(node.get("exclusiveMaximum")))
    for key in ("minLength", "minItems", "minProperties"):
        if key in node:
            out["min_len"] = node[key]
    for key in ("maxLength", "maxItems", "maxProperties"):
        if key in node:
            out["max_len"] = node[key]
    if "pattern" in node:
        out["pattern"] = node["pattern"]
    return out


def _checked(meta: list) -> Any:
    """The model a plain dict (or tuple of dicts) is checked against, if any."""
    shapes = [m.func.shape for m in meta if isinstance(m, AfterValidator) and isinstance(m.func, spec_py._CheckedBy)]
    return shapes[0] if shapes else None


# spec.py keeps the model a string: validation.py checks it against constants.MODEL_LAYERS (the CRD's
# enum, see test_model_enum_is_the_models_the_operator_knows) with a message that lists them.
_CHECKED_ELSEWHERE = {"spec.model"}


def _compare(node: dict, tp: Any, meta: list, path: str, problems: list[str]) -> None:
    """One CRD schema node against one Python type with its constraints; recurses."""
    tp, meta = _peel(tp, meta)
    checked = _checked(meta)
    if node.get("x-kubernetes-int-or-string"):  # a resource quantity
        if node.get("pattern") != spec_py.QUANTITY_PATTERN:
            problems.append(f"{path}: quantity pattern differs from spec.QUANTITY_PATTERN")
        return
    if _bounds_of_crd(node) != _bounds_of_python(meta):
        problems.append(f"{path}: CRD {_bounds_of_crd(node)} != spec.py {_bounds_of_python(meta)}")
    kind = node.get("type")
    if path in _CHECKED_ELSEWHERE:
        return
    if "enum" in node:
        if get_origin(tp) is not Literal or set(get_args(tp)) != set(node["enum"]):
            problems.append(f"{path}: enum {node['enum']} != {tp}")
    elif kind == "object" and node.get("properties"):
        _compare_model(node, checked or tp, path, problems)
    elif kind == "object" and isinstance(node.get("additionalProperties"), dict):
        if get_origin(tp) is not dict:
            problems.append(f"{path}: a map in the CRD, {tp} in spec.py")
        else:
            _compare(node["additionalProperties"], get_args(tp)[1], [], f"{path}[]", problems)
    elif kind == "object" and node.get("x-kubernetes-preserve-unknown-fields"):
        if get_origin(tp) is not dict:
            problems.append(f"{path}: free-form in the CRD, {tp} in spec.py")
    elif kind == "array":
        shape = checked or tp
        if get_origin(shape) is not tuple:
            problems.append(f"{path}: an array in the CRD, {tp} in spec.py")
        else:
            _compare(node["items"], get_args(shape)[0], [], f"{path}[]", problems)
    else:
        expected = {"integer": int, "number": float, "string": str, "boolean": bool}[kind]
        if tp is not expected:
            problems.append(f"{path}: {kind} in the CRD, {tp} in spec.py")


def _compare_model(node: dict, model: Any, path: str, problems: list[str]) -> None:
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        problems.append(f"{path}: an object with properties in the CRD, {model} in spec.py")
        return
    fields = {f.alias or name: f for name, f in model.model_fields.items()}
    if set(fields) != set(node["properties"]):
        problems.append(f"{path}: fields {sorted(set(node['properties']) ^ set(fields))} are in only one of them")
    required = {k for k, f in fields.items() if f.is_required()}
    if required != set(node.get("required", [])):
        problems.append(f"{path}: required {sorted(required)} != {sorted(node.get('required', []))}")
    for key in set(fields) & set(node["properties"]):
        sub, field = node["properties"][key], fields[key]
        _compare_default(sub, field, f"{path}.{key}", problems)
        _compare(sub, field.annotation, list(field.metadata), f"{path}.{key}", problems)


def _compare_default(node: dict, field: FieldInfo, path: str, problems: list[str]) -> None:
    default = field.get_default(call_default_factory=True)
    if field.is_required():
        return
    if "default" not in node:  # absent in the CRD: spec.py's default must mean "not given"
        empty = isinstance(default, BaseModel) and default == type(default)()
        if not (default in (None, "", (), {}) or empty):
            problems.append(f"{path}: spec.py defaults to {default!r}, the CRD to nothing")
    elif isinstance(default, BaseModel):
        if default != type(default).model_validate(node["default"]):
            problems.append(f"{path}: default {node['default']!r} != {default!r}")
    elif default != node["default"] or type(default) is bool and not isinstance(node["default"], bool):
        problems.append(f"{path}: default {node['default']!r} in the CRD, {default!r} in spec.py")


def test_spec_py_has_the_crds_fields_defaults_and_bounds():
    problems: list[str] = []
    _compare_model(SPEC, spec_py.JobSpec, "spec", problems)
    assert problems == []


def test_the_walk_finds_a_difference():
    """The comparison itself: a bound spec.py lacks is reported."""
    crd = copy.deepcopy(SPEC)
    crd["properties"]["runPolicy"]["properties"]["roundDeadlineSeconds"]["maximum"] = 1e300
    crd["properties"]["dataset"]["properties"]["seed"]["default"] = 7
    del crd["properties"]["devices"]["items"]["properties"]["nodeName"]
    problems: list[str] = []
    _compare_model(crd, spec_py.JobSpec, "spec", problems)
    assert sorted(p.split(":")[0] for p in problems) == \
        ["spec.dataset.seed", "spec.devices[]", "spec.runPolicy.roundDeadlineSeconds"], problems


# --- examples and invalid jobs ------------------------------------------------------------------

def test_printer_columns_point_at_schema_fields():
    fields = {p for p, _ in _nodes(SCHEMA)}
    for column in VERSION["additionalPrinterColumns"]:
        path = column["jsonPath"]
        assert path.startswith(".metadata.") or path in fields, path
    assert [c["name"] for c in VERSION["additionalPrinterColumns"] if not c.get("priority")] == \
        ["Phase", "Round", "Accuracy", "Devices", "Age"]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_pass_schema_and_operator(path):
    job = yaml.safe_load(path.read_text())
    assert schema_errors(job) == []
    spec, problems = validation.validate(job["metadata"]["name"], job["spec"])
    assert problems == [] and spec is not None


def _example(**changes: Any) -> dict:
    """examples/job.yaml with changes given as `devices__2__split=7` (`metadata__name` for the name)."""
    job = copy.deepcopy(yaml.safe_load((ROOT / "examples" / "job.yaml").read_text()))
    job["metadata"]["name"] = changes.pop("metadata__name", job["metadata"]["name"])
    for path, value in changes.items():
        node, *keys = job["spec"], *path.split("__")
        for key in keys[:-1]:
            node = node[int(key)] if key.isdigit() else node[key]
        node[int(keys[-1]) if keys[-1].isdigit() else keys[-1]] = value
    return job


@pytest.mark.parametrize("changes, where", [
    ({"split__mode": "sometimes"}, "spec.split.mode"),
    ({"split__policy": "fastest"}, "spec.split.policy"),
    ({"training__rounds": -1}, "spec.training.rounds"),
    ({"training__rounds": 0}, "spec.training.rounds"),
    ({"devices__0__split": -1}, "spec.devices.0.split"),
    ({"devices__0__deviceClass": "toaster"}, "spec.devices.0.deviceClass"),
    ({"devices__0__name": "Nano_1"}, "spec.devices.0.name"),
    ({"devices__1__bandwidth": "fast"}, "spec.devices.1.bandwidth"),
    ({"split__alpha": 1.5}, "spec.split.alpha"),
    ({"devices": []}, "spec.devices"),
    ({"model": "resnet50"}, "spec.model"),
    ({"dataset__syntheticTrain": 2_000_000_000}, "spec.dataset.syntheticTrain"),
    ({"runPolicy__roundDeadlineSeconds": 1e300}, "spec.runPolicy.roundDeadlineSeconds"),
    ({"dataset__seed": -1}, "spec.dataset.seed"),
    ({"dataset__path": "var/lib/ares"}, "spec.dataset.path"),
    ({"dataset__path": "/var/lib//ares"}, "spec.dataset.path"),
    ({"server__resources": {"requests": {"cpu": "-1"}}}, "spec.server.resources.requests.cpu"),
    ({"devices__0__tolerations": [{"key": "a", "operator": "Bogus"}]}, "spec.devices.0.tolerations.0.operator"),
    ({"devices__0__tolerations": [{"key": "a", "effect": "Sometimes"}]}, "spec.devices.0.tolerations.0.effect"),
], ids=["unknown-split-mode", "unknown-policy", "negative-rounds", "zero-rounds", "negative-split",
        "unknown-device-class", "not-a-dns-label", "bad-bandwidth", "alpha-above-1", "no-devices", "unknown-model",
        "huge-synthetic-set", "huge-deadline", "negative-seed", "relative-path", "double-slash", "negative-cpu",
        "toleration-operator", "toleration-effect"])
def test_schema_rejects(changes, where):
    errors = schema_errors(_example(**changes))
    assert any(e.startswith(where + ":") for e in errors), errors


# Refused by the API server (OpenAPI or CEL) and, without it, by the operator's parse of the spec:
# (changes, what the operator says).
REFUSED_BY_BOTH = [
    ({"model": "resnet50"}, "unknown model 'resnet50'"),
    ({"devices__0__name": "server"}, "the name 'server' is taken"),
    ({"metadata__name": "j" * 30, "devices__0__name": "n" * 40}, "is longer than 63 characters"),
    ({"server__resources": {"requests": {"cpu": "-1"}}}, "a resource quantity must not be negative"),
    ({"devices__0__resources": {"limits": {"cpu": -1}}}, "a resource quantity must not be negative"),
    ({"devices__0__resources": {"limits": {"gpu": 1}}}, "resource names are cpu, memory"),
    ({"devices__0__tolerations": [{"key": "a", "operator": "Bogus"}]}, "Input should be 'Exists' or 'Equal'"),
    ({"server__tolerations": [{"operator": "Equal", "value": "x"}]},
     "a toleration without a key must have operator Exists"),
    ({"server__tolerations": [{"key": "a", "operator": "Exists", "value": "x"}]}, "operator Exists takes no value"),
    ({"server__tolerations": [{"key": "a", "tolerationSeconds": 5}]}, "tolerationSeconds is only for effect NoExecute"),
    ({"server__tolerations": [{"key": "a", "effect": "NoExecute", "tolerationSeconds": 10**9}]},
     "less than or equal to 31536000"),
    ({"dataset__syntheticTrain": 2_000_000_000}, "less than or equal to 1000000"),
    ({"dataset__syntheticTest": 2_000_000_000}, "less than or equal to 1000000"),
    ({"runPolicy__roundDeadlineSeconds": 1e300}, "less than or equal to 604800"),
    ({"runPolicy__activeDeadlineSeconds": 10**12}, "less than or equal to 31536000"),
    ({"runPolicy__ttlSecondsAfterFinished": 10**12}, "less than or equal to 31536000"),
    ({"dataset__seed": 2**31}, "less than or equal to 2147483647"),
    ({"training__seed": -1}, "greater than or equal to 0"),
    ({"dataset__beta": 1e9}, "less than or equal to 1000"),
    ({"training__maxStepsPerRound": 10**9}, "less than or equal to 1000000"),
    ({"training__lrDecayRound": 10**9}, "less than or equal to 100000"),
    ({"training__aggregation": {"maxUpdateNorm": 1e300}}, "less than or equal to 1000000"),
    ({"training__aggregation": {"clipNorm": 1e300}}, "less than or equal to 1000000"),
    ({"dataset__path": "/var/lib/ares/../../etc"}, "without '.', '..' or empty segments"),
    ({"dataset__path": "/var/lib/ares/./x"}, "without '.', '..' or empty segments"),
    ({"dataset__path": "/var/lib//ares"}, "should match pattern"),
    ({"dataset__path": "/" + "a" * 1024}, "at most 1024 characters"),
    ({"devices__1__bandwidth": "0mbit"}, "bandwidth must be above 0 and at most 100gbit"),
    ({"devices__1__bandwidth": "200gbit"}, "bandwidth must be above 0 and at most 100gbit"),
    ({"devices__0__image": ""}, "at least 1 character"),
    ({"devices__0__affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "Near"}]}]}}}},
     "Input should be 'In', 'NotIn', 'Exists', 'DoesNotExist', 'Gt' or 'Lt'"),
    ({"server__affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 101, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}]}}},
     "less than or equal to 100"),
    ({"devices__0__nodeName": "n" * 254}, "at most 253 characters"),
]


@pytest.mark.parametrize("changes, problem", REFUSED_BY_BOTH, ids=[
    "unknown-model", "device-named-server", "pod-name-too-long", "negative-cpu-string", "negative-cpu-integer",
    "unqualified-resource", "toleration-operator", "toleration-without-key", "exists-with-value",
    "seconds-without-noexecute", "huge-toleration-seconds", "huge-synthetic-train", "huge-synthetic-test",
    "huge-round-deadline", "huge-active-deadline", "huge-ttl", "seed-beyond-31-bits", "negative-seed", "huge-beta",
    "huge-steps", "huge-decay-round", "huge-update-norm", "huge-clip-norm", "dot-dot-path", "dot-path",
    "double-slash-path", "long-path", "zero-bandwidth", "huge-bandwidth", "empty-image", "affinity-operator",
    "affinity-weight", "long-node-name"])
def test_the_operator_refuses_what_the_api_server_refuses(changes, problem):
    job = _example(**changes)
    spec, problems = validation.validate(job["metadata"]["name"], job["spec"])
    assert any(problem in p for p in problems), problems


AFFINITY = {  # every part of core/v1 Affinity the CRD types
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["arm64"]}],
             "matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["edge-server"]}]}]},
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 100, "preference": {"matchExpressions": [{"key": "ares.io/ram-gb", "operator": "Gt",
                                                                 "values": ["3"]}]}}]},
    "podAntiAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {"ares.io/role": "device"}},
             "namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "Exists"}]},
             "namespaces": ["ares"], "topologyKey": "kubernetes.io/hostname",
             "matchLabelKeys": ["ares.io/job"], "mismatchLabelKeys": ["ares.io/other"]}],
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 1, "podAffinityTerm": {"topologyKey": "topology.kubernetes.io/zone"}}]},
    "podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 50, "podAffinityTerm": {"labelSelector": {"matchLabels": {"app": "cache"}},
                                           "topologyKey": "kubernetes.io/hostname"}}]},
}


@pytest.mark.parametrize("changes", [
    {"server__resources": {"requests": {"cpu": 2, "nvidia.com/gpu": 1, "memory": "2Gi", "hugepages-2Mi": "64Mi"},
                           "limits": {"cpu": "2500m", "ephemeral-storage": "1e9", "example.com/fpga": "1"}}},
    {"devices__0__tolerations": [{"operator": "Exists"},
                                 {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
                                  "tolerationSeconds": 300},
                                 {"key": "ares.io/device", "operator": "Equal", "value": "jetson", "effect": ""}]},
    {"devices__1__bandwidth": "100gbit", "devices__2__bandwidth": "0.5kbit"},
    {"devices__0__affinity": AFFINITY, "server__affinity": AFFINITY},
    {"dataset__path": "/var/lib/ares/datasets/cifar-10.v2", "dataset__seed": 2**31 - 1},
], ids=["integer-and-extended-quantities", "typed-tolerations", "bandwidth-bounds", "affinity", "path-and-seed"])
def test_valid_edges_pass_schema_and_operator(changes):
    job = _example(**changes)
    assert schema_errors(job) == []
    spec, problems = validation.validate(job["metadata"]["name"], job["spec"])
    assert problems == [] and spec is not None
    # Passed on to the pod as given: integers stay integers, tolerations keep their camelCase keys.
    assert [dict(t) for t in spec.devices[0].tolerations] == job["spec"]["devices"][0].get("tolerations", [])
    assert spec.server.resources == job["spec"]["server"].get("resources", {})
    assert spec.devices[0].affinity == job["spec"]["devices"][0].get("affinity", {})


@pytest.mark.parametrize("changes, problem", [
    ({"devices__2__split": 9}, "pinned split 9 is out of range for vgg5 (valid: 0..6)"),
    ({"split__point": 7}, "split.point: 7 is out of range for vgg5"),
    ({"devices__1__name": "nano-maxn"}, "duplicate device names ['nano-maxn']"),
    ({"devices__2__powerMode": "5W"}, "powerMode 5W is for Jetson classes only"),
    ({"devices__0__name": "server"}, "the name 'server' is taken"),
    ({"split__mode": "fixed"}, "mode fixed needs split.point or a pinned split"),
], ids=["split-beyond-model", "point-beyond-model", "duplicate-devices", "power-mode-on-pi",
        "device-named-server", "fixed-without-split"])
def test_what_the_schema_cannot_say_the_operator_refuses(changes, problem):
    job = _example(**changes)
    assert schema_errors(job) == []  # a plain validator lets these through (CEL and list-map keys aside)
    _, problems = validation.validate(job["metadata"]["name"], job["spec"])
    assert any(problem in p for p in problems), problems


def test_duplicate_device_names_are_a_list_map_key_in_the_crd():
    devices = SCHEMA["properties"]["spec"]["properties"]["devices"]
    assert devices["x-kubernetes-list-type"] == "map" and devices["x-kubernetes-list-map-keys"] == ["name"]


def test_what_cannot_change_has_a_transition_rule():
    """The operator applies split, each device's split/powerMode/bandwidth and most of runPolicy
    live; everything it writes once at creation is guarded by a rule on oldSelf."""
    props = SPEC["properties"]
    rules = {"spec": SPEC, "server": props["server"], "device": props["devices"]["items"],
             "runPolicy": props["runPolicy"]}
    transition = {k: " ".join(r["rule"] for r in node.get("x-kubernetes-validations", []) if "oldSelf" in r["rule"])
                  for k, node in rules.items()}
    assert "self.model == oldSelf.model" in transition["spec"]
    assert "self.training == oldSelf.training" in transition["spec"]
    assert transition["server"] == "self == oldSelf"
    for key in ("nodeName", "nodeSelector", "deviceClass", "image", "resources", "tolerations", "affinity",
                "imagePullSecrets", "priorityClassName"):
        assert f"self.{key} == oldSelf.{key}" in transition["device"], key
    for key in ("split", "powerMode", "bandwidth"):
        assert f"self.{key}" not in transition["device"], key
    assert "roundDeadlineSeconds" in transition["runPolicy"] and "suspend" not in transition["runPolicy"]
    assert not any("optionalOldSelf" in r for node in rules.values() for r in node.get("x-kubernetes-validations", []))
