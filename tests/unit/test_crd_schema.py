"""The CRD is a valid Kubernetes object, every example job passes its schema, invalid jobs do not.

What a schema cannot say (a split beyond the model's last layer, duplicate device names for a
plain JSON-schema validator) the operator's validation must catch instead: both are checked here.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "operator"))

from ares_operator import validation  # noqa: E402

CRD = yaml.safe_load((ROOT / "crds" / "aresjobs.ares.io.yaml").read_text())
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
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


def test_schema_is_structural():
    """Every node has a type (or explicitly keeps unknown fields), as the API server demands."""
    untyped = [p for p, node in _nodes(SCHEMA) if "type" not in node
               and not node.get("x-kubernetes-preserve-unknown-fields")
               and not node.get("x-kubernetes-int-or-string")]  # quantities: int or string
    assert untyped == []
    assert not [p for p, node in _nodes(SCHEMA) if "uniqueItems" in node]  # forbidden in CRDs


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
    job = copy.deepcopy(yaml.safe_load((ROOT / "examples" / "job.yaml").read_text()))
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
], ids=["unknown-split-mode", "unknown-policy", "negative-rounds", "zero-rounds", "negative-split",
        "unknown-device-class", "not-a-dns-label", "bad-bandwidth", "alpha-above-1", "no-devices"])
def test_schema_rejects(changes, where):
    errors = schema_errors(_example(**changes))
    assert any(e.startswith(where + ":") for e in errors), errors


@pytest.mark.parametrize("changes, problem", [
    ({"devices__2__split": 9}, "pinned split 9 is out of range for vgg5 (valid: 0..6)"),
    ({"split__point": 7}, "split.point: 7 is out of range for vgg5"),
    ({"devices__1__name": "nano-maxn"}, "duplicate device names ['nano-maxn']"),
    ({"devices__2__powerMode": "5W"}, "powerMode 5W is for Jetson classes only"),
    ({"model": "alexnet"}, "unknown model 'alexnet'"),
    ({"devices__0__name": "server"}, "the name 'server' is taken"),
    ({"split__mode": "fixed"}, "mode fixed needs split.point or a pinned split"),
], ids=["split-beyond-model", "point-beyond-model", "duplicate-devices", "power-mode-on-pi", "unknown-model",
        "device-named-server", "fixed-without-split"])
def test_what_the_schema_cannot_say_the_operator_refuses(changes, problem):
    job = _example(**changes)
    assert schema_errors(job) == []  # a plain validator lets these through (CEL and list-map keys aside)
    _, problems = validation.validate(job["metadata"]["name"], job["spec"])
    assert any(problem in p for p in problems), problems


def test_duplicate_device_names_are_a_list_map_key_in_the_crd():
    devices = SCHEMA["properties"]["spec"]["properties"]["devices"]
    assert devices["x-kubernetes-list-type"] == "map" and devices["x-kubernetes-list-map-keys"] == ["name"]
