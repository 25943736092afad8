"""A step whose tensors do not fit its split (a rank-0 `x`, a missing batch dimension, labels of
the wrong rank) is a 4xx with a JSON message from a real `ares server` process, over HTTP/2 (the
devices' transport) and HTTP/1.1 (probes, the operator), and the server serves on afterwards.
A rank-0 `x` once reached the step and failed there with a 500."""

from __future__ import annotations

import httpx
import pytest
import torch

from ares.core import wire
from ares.runtime.tlsclient import transport
from tests.support import ServerProcess, small_config, token

SPLIT = 2
SHAPE = (64, 16, 16)  # VGG5's activations after layer 2, per sample
BATCH = 20
STEP = f"/v1/devices/dev-a/step?round=0&split={SPLIT}"


def labels(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int64)


CASES = [
    # id, tensors of the body, phrase in the message
    ("x-rank-0", {"x": torch.tensor(1.5), "y": labels(1)}, "rank 0"),
    ("x-rank-0-fp16", {"x": torch.tensor(1.5, dtype=torch.float16), "y": labels(1)}, "rank 0"),
    ("x-rank-0-int8", {"x": torch.tensor(3, dtype=torch.int8), "x.scale": torch.tensor(0.1), "y": labels(1)}, "rank 0"),
    ("x-rank-1", {"x": torch.randn(64), "y": labels(64)}, "rank 1"),
    ("x-without-batch-dim", {"x": torch.randn(*SHAPE), "y": labels(64)}, "rank 3"),
    ("x-rank-5", {"x": torch.randn(4, 1, *SHAPE), "y": labels(4)}, "rank 5"),
    ("x-empty-batch", {"x": torch.randn(0, *SHAPE), "y": labels(0)}, "split 2 needs"),
    ("x-over-batch", {"x": torch.randn(BATCH + 1, *SHAPE), "y": labels(BATCH + 1)}, "split 2 needs"),
    ("y-rank-0", {"x": torch.randn(4, *SHAPE), "y": torch.tensor(0)}, "'y'"),
    ("y-rank-2", {"x": torch.randn(4, *SHAPE), "y": torch.zeros(4, 1, dtype=torch.int64)}, "'y'"),
    ("y-wrong-length", {"x": torch.randn(4, *SHAPE), "y": labels(3)}, "labels must be int64 of shape [4]"),
]
PROTOCOLS = {"http2": dict(http1=False, http2=True), "http1.1": dict(http1=True, http2=False)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shapes")
    cfg = small_config(tmp, devices=("dev-a",), batch_size=BATCH).model_copy(update={"round_deadline_s": 3600})
    proc = ServerProcess(cfg, tmp)
    auth = {"Authorization": f"Bearer {token(cfg, 'dev-a')}"}
    r = httpx.post(f"{proc.url}/v1/devices/dev-a/join", json={"round": 0, "split": SPLIT}, headers=auth, timeout=60)
    assert r.status_code == 200, r.text
    yield proc, auth
    proc.stop()


@pytest.fixture(scope="module", params=list(PROTOCOLS))
def client(request, server):
    proc, auth = server
    with httpx.Client(transport=transport(None, **PROTOCOLS[request.param]), base_url=proc.url,
                      headers=auth, timeout=60) as c:
        yield request.param, c


def good_step(client: httpx.Client) -> httpx.Response:
    return client.post(STEP, content=wire.encode({"x": torch.randn(4, *SHAPE), "y": labels(4)}))


@pytest.mark.parametrize("tensors,phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_step_of_the_wrong_rank_is_a_4xx_with_a_message(client, tensors, phrase):
    protocol, c = client
    r = c.post(STEP, content=wire.encode(tensors))
    assert r.http_version == ("HTTP/2" if protocol == "http2" else "HTTP/1.1")
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    assert phrase in r.json()["error"], r.json()
    # and the server goes on serving: the next good step of the same device is a step
    after = good_step(c)
    assert after.status_code == 200, after.text
    assert wire.decode(bytearray(after.content)).tensors["grad"].shape == (4, *SHAPE)


@pytest.mark.parametrize("query,phrase", [("round=0", "split"), ("round=zero&split=2", "round")],
                         ids=["split-missing", "round-not-an-int"])
def test_a_step_with_a_bad_query_is_a_422_with_a_message(client, query, phrase):
    _, c = client
    r = c.post(f"/v1/devices/dev-a/step?{query}", content=wire.encode({"x": torch.randn(4, *SHAPE), "y": labels(4)}))
    assert r.status_code == 422 and r.json()["error"].startswith("invalid request: ") and phrase in r.json()["error"], r.text


def test_the_server_logged_no_error_for_any_of_them(client, server):
    proc, _ = server
    assert good_step(client[1]).status_code == 200
    log = (proc.tmp / "server.log").read_text()
    assert "Traceback" not in log and "Internal Server Error" not in log, log[-3000:]


# ----- any rank, shape and dtype, in-process (the app without the HTTP server around it) ----------
def any_tensor(shape, dtype, huge: bool) -> torch.Tensor:
    if dtype in (torch.int8, torch.int64):
        return torch.randint(-130 if dtype == torch.int8 else -2, 127 if dtype == torch.int8 else 12, shape).to(dtype)
    return (torch.randn(shape) * (1e30 if huge else 1)).to(dtype)


MAX_NUMEL = 1 << 21  # 16 MB of int64: five dimensions of up to 70 would be 13 GB


def bounded(shape: list[int]) -> list[int]:
    """The shape, or [1] where a tensor of it would be larger than the server takes anyway."""
    return shape if torch.Size(shape).numel() <= MAX_NUMEL else [1]


def test_bounded_keeps_every_generated_tensor_small():
    assert bounded([70] * 5) == [1] and bounded([BATCH + 3, *SHAPE]) == [BATCH + 3, *SHAPE] and bounded([]) == []


def test_a_step_of_any_rank_shape_or_dtype_is_never_a_5xx(tmp_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tests.support import joined_app

    server, client, auth, _, _ = joined_app(tmp_path)  # dev-a joined round 0 at split 2
    dtypes = st.sampled_from([torch.float32, torch.float16, torch.int8, torch.int64])
    dims = st.lists(st.integers(0, 70), max_size=5)
    x_shapes = st.one_of(dims, st.builds(lambda n: [n, *SHAPE], st.integers(0, BATCH + 3)))
    y_shapes = st.one_of(st.just([]), st.builds(lambda n: [n], st.integers(0, BATCH + 3)), dims)

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(xs=x_shapes, xd=dtypes, ys=y_shapes, yd=dtypes, scale=st.one_of(st.none(), st.lists(st.integers(0, 70), max_size=2)),
           huge=st.booleans(), query=st.dictionaries(st.sampled_from(["micro", "micros", "total"]), st.integers(-3, 130),
                                                     max_size=3))
    def one(xs, xd, ys, yd, scale, huge, query):
        xs, ys = bounded(xs), bounded(ys)
        tensors = {"x": any_tensor(xs, xd, huge), "y": any_tensor(ys, yd, False)}
        if scale is not None:
            tensors["x.scale"] = torch.rand(bounded(scale))
        r = client.post("/v1/devices/dev-a/step", params={"round": 0, "split": SPLIT, **query},
                        content=wire.encode(tensors), headers=auth)
        assert r.status_code < 500, (xs, xd, ys, yd, scale, query, r.status_code, r.text[:300])
        assert r.status_code == 200 or r.json()["error"]

    one()
    r = client.post(STEP, content=wire.encode({"x": torch.randn(4, *SHAPE), "y": labels(4)}), headers=auth)
    assert r.status_code == 200, r.text
