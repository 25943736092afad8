"""Every malformed or unauthorised request gets a 4xx with a clear message, and the global model
is untouched. Runs the real FastAPI app in-process (httpx over Starlette's test transport)."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from ares.core import wire
from ares.core.messages import DeviceReport
from ares.runtime.training import TrainingServer
from tests.support import joined_app, model_hash


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    server, client, auth, tokens, _ = joined_app(tmp_path_factory.mktemp("bad"))
    return server, client, auth, tokens


def good_x(n=4):
    return torch.randn(n, 64, 16, 16)


def frame(tensors, meta=None) -> bytes:
    return wire.encode(tensors, meta or {})


def lying_header() -> bytes:
    body = bytearray(frame({"x": good_x(), "y": torch.zeros(4, dtype=torch.int64)}))
    header_len = struct.unpack("<I", body[4:8])[0]
    header = json.loads(body[8:8 + header_len])
    header["tensors"][0]["shape"] = [8, 64, 16, 16]  # claims twice the data it carries
    raw = json.dumps(header).encode()
    return wire.MAGIC + struct.pack("<I", len(raw)) + raw + bytes(body[8 + header_len:])


def with_dtype(dtype: str) -> bytes:
    raw = json.dumps({"tensors": [{"name": "x", "dtype": dtype, "shape": [1]}], "meta": {}}).encode()
    return wire.MAGIC + struct.pack("<I", len(raw)) + raw + b"\0" * 8


def nan_x():
    x = good_x()
    x[0, 0, 0, 0] = float("nan")
    return x


def inf_x():
    x = good_x()
    x[1, 2, 3, 4] = float("inf")
    return x


STEP = "/v1/devices/dev-a/step?round=0&split=2"
LABELS = torch.zeros(4, dtype=torch.int64)

CASES = [
    # id, method, path, body or json, headers override, status, phrase in message
    ("truncated-frame", STEP, frame({"x": good_x(), "y": LABELS})[:-100], None, 400, "truncated"),
    ("header-lies-about-shape", STEP, lying_header(), None, 400, "lies about a shape"),
    ("bad-dtype", STEP, with_dtype("float64"), None, 400, "not allowed"),
    ("object-dtype", STEP, with_dtype("object"), None, 400, "not allowed"),
    ("bad-magic", STEP, b"PK\x03\x04" + b"\0" * 64, None, 400, "bad magic"),
    ("nan-activations", STEP, frame({"x": nan_x(), "y": LABELS}), None, 422, "NaN or Inf"),
    ("inf-activations", STEP, frame({"x": inf_x(), "y": LABELS}), None, 422, "NaN or Inf"),
    ("oversized-body", STEP, b"\0" * (1 << 20 | 1), {"Content-Length": str(300 << 20)}, 413, "exceeds"),
    ("missing-token", STEP, frame({"x": good_x(), "y": LABELS}), {"Authorization": ""}, 401, "token"),
    ("wrong-token", STEP, frame({"x": good_x(), "y": LABELS}), {"Authorization": "Bearer nope-nope-nope-nope"}, 401, "token"),
    ("other-devices-token", STEP, frame({"x": good_x(), "y": LABELS}), "dev-b", 401, "token"),
    ("unknown-device", "/v1/devices/mallory/step?round=0&split=2", frame({"x": good_x(), "y": LABELS}), None, 404, "unknown device"),
    ("closed-round", "/v1/devices/dev-a/step?round=-1&split=2", frame({"x": good_x(), "y": LABELS}), None, 409, "closed"),
    ("future-round", "/v1/devices/dev-a/step?round=5&split=2", frame({"x": good_x(), "y": LABELS}), None, 409, "not open"),
    ("split-out-of-range", "/v1/devices/dev-a/step?round=0&split=9", frame({"x": good_x(), "y": LABELS}), None, 422, "0..6"),
    ("split-differs-from-join", "/v1/devices/dev-a/step?round=0&split=1", frame({"x": torch.randn(4, 32, 16, 16), "y": LABELS}), None, 422, "joined with split 2"),
    ("activation-shape-wrong", STEP, frame({"x": torch.randn(4, 32, 16, 16), "y": LABELS}), None, 422, "split 2 needs"),
    ("labels-out-of-range", STEP, frame({"x": good_x(), "y": torch.full((4,), 11)}), None, 422, "labels must lie"),
    ("missing-labels", STEP, frame({"x": good_x()}), None, 422, "missing ['y']"),
    ("join-bad-json", "/v1/devices/dev-a/join", b"{round: zero}", None, 422, "invalid"),
    ("update-wrong-shape", "/v1/devices/dev-a/update", "wrong-shape", None, 422, "expected"),
    ("update-missing-weights", "/v1/devices/dev-a/update", "missing", None, 422, "missing"),
    ("update-bad-samples", "/v1/devices/dev-a/update", "no-samples", None, 422, "invalid message"),
    ("telemetry-device-token", "GET /v1/telemetry", None, None, 401, "controller"),
]


def update_body(server: TrainingServer, kind: str) -> bytes:
    weights = {k: v.clone() for k, v in server.expected_weights(2).items()}
    meta = DeviceReport(round=0, split=2, samples=10).model_dump(mode="json")
    if kind == "wrong-shape":
        key = next(k for k in weights if k.endswith("weight"))
        weights[key] = torch.zeros(3, 3)
    elif kind == "missing":
        weights.pop(next(iter(weights)))
    elif kind == "no-samples":
        meta["samples"] = 0
    return frame(weights, meta)


@pytest.mark.parametrize("name,path,body,headers,status,phrase", CASES, ids=[c[0] for c in CASES])
def test_bad_request_is_refused_and_model_unchanged(env, name, path, body, headers, status, phrase):
    server, client, auth, tokens = env
    before = model_hash(server)
    hdrs = dict(auth)
    if headers == "dev-b":
        hdrs = {"Authorization": f"Bearer {tokens['dev-b']}"}
    elif headers:
        hdrs.update(headers)
        if hdrs.get("Authorization") == "":
            del hdrs["Authorization"]
    if isinstance(body, str):
        body = update_body(server, body)
    if path.startswith("GET "):
        r = client.get(path[4:], headers=hdrs)
    else:
        r = client.post(path, content=body, headers=hdrs)
    assert r.status_code == status, r.text
    assert phrase in r.json()["error"], r.json()
    assert model_hash(server) == before


def test_a_good_step_still_works_after_all_that(env):
    server, client, auth, _ = env
    r = client.post(STEP, content=frame({"x": good_x(), "y": LABELS}), headers=auth)
    assert r.status_code == 200
    grad = wire.decode(bytearray(r.content)).tensors["grad"]
    assert grad.shape == (4, 64, 16, 16) and bool(torch.isfinite(grad).all())
    assert r.headers["server-timing"].startswith("compute;dur=")
