"""A long fuzz: property-based requests to every route of a real `ares server`
process over HTTP/2 (granian, the real httpx client), as a device holding valid tokens would
send them. Passes when no request got a 5xx, the server is alive, and the global model's hash
(`model_sha256` in /v1/status) is the one it had before.

    python bench/fuzz.py [--requests 10000] [--seed 0]

The short version of this runs in the suite (tests/integration/test_hostile_routes.py).
"""

from __future__ import annotations

import argparse
import collections
import json
import struct
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ares.core import wire  # noqa: E402
from tests.conftest import ServerProcess, small_config, token  # noqa: E402

URL_TEXT = st.characters(min_codepoint=0x21, max_codepoint=0x7E)  # what a URL may carry (httpx refuses the rest)
GETS = ["/healthz", "/v1/config", "/v1/status", "/v1/telemetry", "/metrics"]
POSTS = ["/v1/devices/{d}/join", "/v1/devices/{d}/step", "/v1/devices/{d}/update"]
# mostly the right method on a real route, so most requests reach the decoder and round logic
ROUTES = st.one_of(st.tuples(st.just("GET"), st.sampled_from(GETS)),
                   st.tuples(st.just("POST"), st.sampled_from(POSTS)),
                   st.tuples(st.just("POST"), st.sampled_from(POSTS)),
                   st.tuples(st.just("POST"), st.sampled_from(POSTS)),
                   st.tuples(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
                             st.sampled_from(GETS + POSTS + ["/{junk}"])))
WEIGHT_NAMES = ["layers.0.0.weight", "layers.0.0.bias", "layers.0.1.running_mean", "layers.2.0.weight"]


def json_text(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


def frame(header: bytes, data: bytes) -> bytes:
    return wire.MAGIC + struct.pack("<I", len(header)) + header + data


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
tensors = st.dictionaries(
    st.sampled_from(["x", "y", "grad", "x.scale", *WEIGHT_NAMES]),
    st.sampled_from([torch.randn(4, 64, 16, 16), torch.zeros(4, dtype=torch.int64), torch.full((4,), 11),
                     torch.full((2, 3), 3e38), torch.zeros(0, 5), torch.ones(32, 3, 3, 3), torch.ones(32),
                     torch.randint(-127, 127, (4, 64, 16, 16), dtype=torch.int8), torch.randn(3).half()]),
    max_size=4)
report = st.fixed_dictionaries({
    "round": st.integers(-1, 3), "split": st.integers(-1, 8), "samples": st.integers(-1, 10**30),
    "timings": st.dictionaries(st.sampled_from(["round_s", "up_bps", "energy_j", "steps", "bogus"]),
                               st.one_of(st.floats(), st.integers(-5, 10**20)), max_size=3)})
bodies = st.one_of(
    st.builds(lambda t, m: wire.encode(t, m), tensors, st.one_of(report, st.dictionaries(st.text(max_size=5), st.integers()))),
    st.builds(lambda t, m, n: wire.encode(t, m)[:n], tensors, report, st.integers(0, 1 << 16)),
    st.builds(lambda h, d: frame(json_text(h), d),
              st.fixed_dictionaries({"tensors": st.lists(st.fixed_dictionaries({
                  "name": st.one_of(st.sampled_from(["x", "y"]), st.text(max_size=4)),
                  "dtype": st.sampled_from(["float32", "float16", "int64", "int8", "bool", 1]),
                  "shape": st.one_of(st.lists(st.integers(-1, 2**40), max_size=9), json_values)}), max_size=3),
                  "meta": json_values}),
              st.binary(max_size=512)),
    st.builds(json_text, st.fixed_dictionaries({"round": st.one_of(st.integers(-2, 5), json_values),
                                                "split": st.one_of(st.integers(-2, 9), json_values)})),
    st.binary(max_size=1024),
    st.sampled_from([b"[" * 40_000, b'{"round": ' + b"9" * 5000 + b"}", b"NaN", b"{}", b""]),
)
params = st.dictionaries(st.sampled_from(["round", "split", "micro", "micros", "total", "codec", "zz"]),
                         st.one_of(st.integers(-3, 12), st.text(max_size=5), st.just("9" * 500)), max_size=5)
names = st.one_of(st.just("dev-a"), st.just("dev-a"), st.just("dev-a"),
                  st.sampled_from(["dev-b", "mallory", "DEV-A", "dev-a%2f..", "-", "x" * 300]),
                  st.text(alphabet="abcdefgh-", max_size=12))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ares-fuzz-"))
    cfg = small_config(tmp, devices=("dev-a", "dev-b"), rounds=3, batch_size=20)
    cfg = cfg.model_copy(update={"round_deadline_s": 3600.0})  # no round closes by deadline during the run
    server = ServerProcess(cfg, tmp)
    tokens = {n: token(cfg, n) for n in ("dev-a", "dev-b", "controller.token")}
    valid = [f"Bearer {t}" for t in tokens.values()]
    bearer = st.one_of(st.just(valid[0]), st.just(valid[0]), st.just(valid[0]), st.sampled_from(valid), st.none(),
                       st.sampled_from(["Bearer ", "Bearer wrong-token-wrong-token", "bearer  x", "Basic Zm9v",
                                        "Bearer " + "A" * 8000]))
    client = httpx.Client(base_url=server.url, http1=False, http2=True, timeout=60)
    ctl = {"Authorization": f"Bearer {tokens['controller.token']}"}
    statuses: collections.Counter = collections.Counter()
    failures: list[str] = []
    try:
        # dev-a is in a round, so steps and uploads reach the round logic, not only the checks
        r = client.post("/v1/devices/dev-a/join", json={"round": 0, "split": 2},
                        headers={"Authorization": f"Bearer {tokens['dev-a']}"})
        assert r.status_code == 200, r.text
        before = client.get("/v1/status", headers=ctl).json()["model_sha256"]
        started = time.perf_counter()

        @seed(args.seed)
        @settings(max_examples=args.requests, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck), phases=["generate"])
        @given(method_route=ROUTES, device=names, junk=st.text(alphabet=URL_TEXT, max_size=20), query=params, body=bodies, authorization=bearer,
               ctype=st.sampled_from([None, "application/json", "application/x-ares-bundle", "text/plain"]))
        def one(method_route, device, junk, query, body, authorization, ctype):
            method, route = method_route
            headers = {}
            if authorization is not None:
                headers["Authorization"] = authorization
            if ctype:
                headers["Content-Type"] = ctype
            path = route.format(d=device, junk=junk)
            try:
                r = client.request(method, path, params=query, content=body if method != "GET" else None,
                                   headers=headers)
            except (httpx.HTTPError, httpx.InvalidURL) as exc:  # the client refuses some URLs itself
                statuses[f"client: {exc.__class__.__name__}"] += 1
                return
            statuses[r.status_code] += 1
            if r.status_code >= 500:
                failures.append(f"{method} {path} {query} -> {r.status_code}: {r.text[:200]}")

        one()
        elapsed = time.perf_counter() - started
        alive = server.proc.poll() is None and client.get("/healthz").status_code == 200
        after = client.get("/v1/status", headers=ctl).json()["model_sha256"]
    finally:
        client.close()
        server.stop()

    sent = sum(v for k, v in statuses.items() if isinstance(k, int))
    print(f"requests answered: {sent} in {elapsed:.1f} s ({sent / elapsed:.0f}/s) over HTTP/2")
    print("status counts:", dict(sorted(statuses.items(), key=lambda kv: str(kv[0]))))
    print(f"5xx answers: {len(failures)}; server alive: {alive}; model hash unchanged: {before == after} ({after[:16]})")
    for f in failures[:20]:
        print("  ", f)
    return 0 if not failures and alive and before == after and sent >= args.requests * 0.95 else 1


if __name__ == "__main__":
    sys.exit(main())
