"""kopf's last-handled spec annotation: compressed for a large job, kopf's own JSON for a small one,
either read back; what does not decode (a user may edit annotations) reads as none."""

from __future__ import annotations

import base64
import json
import zlib

import kopf
import pytest

from ares_operator import diffbase


def _essence(devices: int) -> dict:
    return {"spec": {"split": {"mode": "fixed", "point": 2},
                     "devices": [{"name": f"pi-{i:04d}", "deviceClass": "cpu", "nodeName": f"node-{i:04d}"}
                                 for i in range(devices)]}}


def test_a_small_spec_is_kopfs_own_json():
    essence = _essence(3)
    value = diffbase.encode(essence)
    assert value == json.dumps(essence, separators=(",", ":")) + "\n"  # as kopf writes it
    assert diffbase.decode(value) == essence


def test_a_1000_device_spec_is_a_few_kilobytes():
    essence = _essence(1000)
    plain = len(json.dumps(essence, separators=(",", ":")))
    value = diffbase.encode(essence)
    assert value.startswith(diffbase.PREFIX) and len(value) < plain / 5, (len(value), plain)
    assert diffbase.decode(value) == essence


def _packed(data: bytes) -> str:
    return diffbase.PREFIX + base64.b64encode(zlib.compress(data)).decode()


@pytest.mark.parametrize("value", [
    None,
    "not json",
    diffbase.PREFIX + "%%%",                                   # not base64
    diffbase.PREFIX + base64.b64encode(b"not zlib").decode(),
    _packed(b"{" * 10),                                        # not JSON inside
    _packed(b" " * (diffbase.MAX_DECODED + 1) + b"{}"),        # a bomb: beyond any spec
    _packed(b'{"spec": {}}')[:-8],                             # cut short
], ids=["missing", "garbage", "not-base64", "not-zlib", "not-json", "bomb", "truncated"])
def test_what_does_not_decode_reads_as_no_annotation(value):
    assert diffbase.decode(value) is None


def test_kopf_stores_and_fetches_through_it():
    storage = diffbase.CompressedDiffBaseStorage(prefix="operator.ares.io", key="last-handled-configuration")
    raw = {"apiVersion": "ares.io/v1alpha1", "kind": "AresTrainingJob",
           "metadata": {"name": "fleet", "namespace": "lab", "annotations": {}}, **_essence(1000)}
    body = kopf.Body(raw)
    essence = storage.build(body=body)
    patch = kopf.Patch()
    storage.store(body=body, patch=patch, essence=essence)
    value = patch["metadata"]["annotations"]["operator.ares.io/last-handled-configuration"]
    assert value.startswith(diffbase.PREFIX)
    stored = kopf.Body({**raw, "metadata": {**raw["metadata"], "annotations": dict(patch["metadata"]["annotations"])}})
    assert storage.fetch(body=stored) == essence
    # An annotation kopf wrote itself (an operator upgraded under the job) reads the same.
    plain = kopf.Body({**raw, "metadata": {**raw["metadata"], "annotations": {
        "operator.ares.io/last-handled-configuration": json.dumps(essence)}}})
    assert storage.fetch(body=plain) == essence
