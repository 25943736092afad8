"""Hostile requests through the real FastAPI app (in-process ASGI): frames that could make a
server answer 5xx, a device that stalls it, /metrics, and a short property-based fuzz of every route.
The long fuzz (>= 10,000 requests against a real HTTP/2 server) is `bench/fuzz.py`."""

from __future__ import annotations

import asyncio
import json
import struct
import threading
import time
import tomllib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ares.core import wire
from ares.runtime.training import TrainingServer
from tests.support import ROOT, async_env, joined_app, model_hash


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return joined_app(tmp_path_factory.mktemp("hostile"))


def raw_frame(header: str, data: bytes = b"") -> bytes:
    raw = header.encode()
    return wire.MAGIC + struct.pack("<I", len(raw)) + raw + data


def upload_frame(server: TrainingServer, meta_json: str) -> bytes:
    """A valid weights bundle whose meta is the given raw JSON text (it may hold NaN etc.)."""
    weights = server.expected_weights(2)
    body = bytearray(wire.encode(weights, {"m": 0}))
    hlen = struct.unpack("<I", body[4:8])[0]
    header = body[8:8 + hlen].decode().replace('"meta":{"m":0}', f'"meta":{meta_json}')
    return raw_frame(header, bytes(body[8 + hlen:]))


STEP = "/v1/devices/dev-a/step?round=0&split=2"
REPORT = '{"round":0,"split":2,"samples":%s,"timings":{"round_s":%s}}'

CASES = [
    # id, path, body (bytes or callable(server)), status, phrase
    ("deep-json-header", STEP, raw_frame("[" * 50_000 + "]" * 50_000), 400, "nested deeper"),
    ("huge-int-in-header", STEP, raw_frame('{"tensors":[],"meta":{"a":' + "7" * 5000 + "}}"), 422, "digits"),
    ("zero-dim-stride-overflow", STEP, raw_frame(json.dumps({"tensors": [{"name": "x", "dtype": "float32",
                                                                          "shape": [0] + [2**31 - 1] * 7}]})), 413, "larger than"),
    ("samples-1e12", "/v1/devices/dev-a/update", lambda s: upload_frame(s, REPORT % ("1" + "0" * 12, 1)), 422, "assigned"),
    ("samples-1e309", "/v1/devices/dev-a/update", lambda s: upload_frame(s, REPORT % ("1" + "0" * 309, 1)), 422, "digits"),
    ("infinity-in-report", "/v1/devices/dev-a/update", lambda s: upload_frame(s, REPORT % (5, "Infinity")), 422, "Infinity"),
    ("nan-in-report", "/v1/devices/dev-a/update", lambda s: upload_frame(s, REPORT % (5, "NaN")), 422, "NaN"),
    ("1e999-in-report", "/v1/devices/dev-a/update", lambda s: upload_frame(s, REPORT % (5, "1e999")), 422, "not finite"),
    ("huge-profile-in-report", "/v1/devices/dev-a/update",
     lambda s: upload_frame(s, '{"round":0,"split":2,"samples":5,"profile_fwd":[1e308,1e308]}'), 422, "invalid message"),
    ("join-deep-json", "/v1/devices/dev-a/join", b"[" * 60_000, 400, "nested deeper"),
    ("join-huge-round", "/v1/devices/dev-a/join", b'{"round": ' + b"9" * 5000 + b', "split": 2}', 422, "digits"),
    ("unknown-device-no-token", "/v1/devices/mallory/step?round=0&split=2", b"", 404, "unknown device"),
]


@pytest.mark.parametrize("name,path,body,status,phrase", CASES, ids=[c[0] for c in CASES])
def test_hostile_request_is_a_4xx_and_model_unchanged(env, name, path, body, status, phrase):
    server, client, auth, _, _ = env
    before = model_hash(server)
    body = body(server) if callable(body) else body
    headers = {} if name.startswith("unknown") else auth
    r = client.post(path, content=body, headers=headers)
    assert r.status_code == status, r.text
    assert phrase in r.json()["error"], r.json()
    assert "dev-a" not in r.json()["error"] or not name.startswith("unknown")
    assert model_hash(server) == before
    assert client.get("/v1/status", headers=auth).status_code == 200


def test_metrics_is_declared_in_the_server_extra_and_scrapes(env):
    server, client, _, _, controller = env
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["server"]
    assert any(dep.replace(" ", "").startswith("prometheus-client==") for dep in extra), extra
    r = client.get("/metrics", headers={"Authorization": f"Bearer {controller}"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    lines = r.text.splitlines()
    assert "ares_round 0.0" in lines and any(line.startswith("ares_rounds_total") for line in lines)
    assert any(line.startswith('ares_device_split{device="dev-a"} 2.0') for line in lines)


# ----- class 4: one device cannot stall the server ------------------------------------------------
def test_decoding_runs_off_the_event_loop(tmp_path, monkeypatch):
    server, client, auth = async_env(tmp_path)
    threads = []
    real = wire.decode

    def spy(*args, **kwargs):
        threads.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(wire, "decode", spy)

    async def scenario():
        async with client:  # the event loop runs in this (the main) thread
            await client.post("/v1/devices/dev-a/join", json={"round": 0, "split": 3}, headers=auth["dev-a"])
            x = {"x": torch.randn(4, *server.shapes[3]), "y": torch.zeros(4, dtype=torch.int64)}
            return await client.post("/v1/devices/dev-a/step?round=0&split=3", content=wire.encode(x),
                                     headers=auth["dev-a"])

    assert asyncio.run(scenario()).status_code == 200
    assert threads and all(t is not threading.main_thread() for t in threads)


def test_joins_waiting_for_the_next_round_hold_no_worker_thread(tmp_path):
    """60 joins wait for a round that is not open; an upload (a worker-thread route) still
    answers at once. A join that waited in a worker thread would hold one of anyio's 40 threads for 20 s."""
    server, client, auth = async_env(tmp_path, requests_per_device=64, join_wait_s=5)

    async def scenario():
        async with client:
            waiting = [asyncio.create_task(client.post("/v1/devices/dev-b/join", json={"round": 1, "split": 3},
                                                       headers=auth["dev-b"])) for _ in range(60)]
            await asyncio.sleep(0.5)
            r = await client.post("/v1/devices/dev-a/join", json={"round": 0, "split": 3}, headers=auth["dev-a"])
            assert r.status_code == 200
            t0 = time.monotonic()
            x = {"x": torch.randn(4, *server.shapes[3]), "y": torch.zeros(4, dtype=torch.int64)}
            r = await client.post("/v1/devices/dev-a/step?round=0&split=3", content=wire.encode(x),
                                  headers=auth["dev-a"])
            elapsed = time.monotonic() - t0
            assert r.status_code == 200, r.text
            results = await asyncio.gather(*waiting)
            return elapsed, {w.status_code for w in results}

    elapsed, statuses = asyncio.run(scenario())
    assert elapsed < 3.0
    assert statuses == {409}  # round 1 never opened: a clear 4xx after join_wait_s


def test_too_many_requests_from_one_device_get_429_and_others_are_served(tmp_path):
    server, client, auth = async_env(tmp_path, requests_per_device=2, body_read_timeout_s=5)

    async def stalled_body():
        yield b"ARW1"
        await asyncio.sleep(1.0)
        yield b"\0" * 4

    async def scenario():
        async with client:
            held = [asyncio.create_task(client.post("/v1/devices/dev-a/update", content=stalled_body(),
                                                    headers={**auth["dev-a"], "Content-Length": "8"})) for _ in range(2)]
            await asyncio.sleep(0.3)
            third = await client.post("/v1/devices/dev-a/update", content=b"", headers=auth["dev-a"])
            other = await client.get("/v1/status", headers=auth["dev-b"])
            await asyncio.gather(*held)
            return third, other

    third, other = asyncio.run(scenario())
    assert third.status_code == 429 and "in flight" in third.json()["error"]
    assert other.status_code == 200


def test_a_body_that_stalls_half_way_is_cut_off_with_408(tmp_path):
    server, client, auth = async_env(tmp_path, body_read_timeout_s=0.3)

    async def stalled_body():
        yield b"ARW1\0\0"
        await asyncio.sleep(5)
        yield b"\0\0"

    async def scenario():
        async with client:
            t0 = time.monotonic()
            r = await client.post("/v1/devices/dev-a/update", content=stalled_body(),
                                  headers={**auth["dev-a"], "Content-Length": "8"})
            return r, time.monotonic() - t0

    r, elapsed = asyncio.run(scenario())
    assert r.status_code == 408 and "body_read_timeout_s" in r.json()["error"]
    assert elapsed < 3.0


def test_bytes_buffered_per_device_are_capped(tmp_path):
    server, client, auth = async_env(tmp_path, buffered_mib_per_device=1)

    async def scenario():
        async with client:
            return await client.post("/v1/devices/dev-a/update", content=b"\0" * (2 << 20), headers=auth["dev-a"])

    r = asyncio.run(scenario())
    assert r.status_code == 413 and "buffered_mib_per_device" in r.json()["error"]
    assert server.cfg.limits.buffered_mib_per_device == 1


# ----- a short property-based fuzz of every route (the long one: bench/fuzz.py) -------------------
ROUTES = ["/healthz", "/v1/config", "/v1/round", "/v1/status", "/v1/telemetry", "/metrics",
          "/v1/devices/{d}/join", "/v1/devices/{d}/step", "/v1/devices/{d}/update"]
names = st.sampled_from(["dev-a", "dev-b", "mallory", "", "..", "%00", "a" * 300])
queries = st.dictionaries(st.sampled_from(["round", "split", "micro", "micros", "total", "x"]),
                          st.one_of(st.integers(-2, 10), st.text(max_size=6), st.just("9" * 400)), max_size=4)


def fuzz_body(server: TrainingServer):
    tensors = st.dictionaries(st.sampled_from(["x", "y", "grad", "layers.0.weight"]),
                              st.sampled_from([torch.randn(4, 64, 16, 16), torch.zeros(4, dtype=torch.int64),
                                               torch.full((2, 3), 1e30), torch.zeros(0, 5)]), max_size=3)
    meta = st.dictionaries(st.sampled_from(["round", "split", "samples", "timings", "loss"]),
                           st.one_of(st.integers(-1, 10**6), st.floats(allow_nan=False, allow_infinity=False),
                                     st.dictionaries(st.text(max_size=8), st.floats(allow_nan=False, allow_infinity=False),
                                                     max_size=3)), max_size=5)
    framed = st.builds(lambda t, m: wire.encode(t, m), tensors, meta)
    return st.one_of(framed, st.binary(max_size=256), st.builds(lambda b, n: b[:n], framed, st.integers(0, 4096)),
                     st.just(json.dumps({"round": 0, "split": 2}).encode()))


def test_fuzz_every_route_never_5xx_and_model_unchanged(env):
    server, client, auth, tokens, controller = env
    before = model_hash(server)
    bearer = st.sampled_from([None, f"Bearer {tokens['dev-a']}", f"Bearer {tokens['dev-b']}",
                              f"Bearer {controller}", "Bearer x", "Basic abc", "Bearer " + "a" * 5000])

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(route=st.sampled_from(ROUTES), device=names, method=st.sampled_from(["GET", "POST", "PUT"]),
           query=queries, body=fuzz_body(server), authorization=bearer)
    def one(route, device, method, query, body, authorization):
        headers = {"Authorization": authorization} if authorization else {}
        r = client.request(method, route.format(d=device), params=query, content=body, headers=headers)
        assert r.status_code < 500, (route, r.status_code, r.text[:300])

    one()
    assert client.get("/healthz").status_code == 200
    assert model_hash(server) == before
