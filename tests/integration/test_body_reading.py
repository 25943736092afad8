"""How the server reads a body (ares.runtime.limits.read_body), through the real FastAPI app:
with a Content-Length, into one buffer of that size, refusing a body that ends short of it or
runs past it; without one (chunked), growing as pieces arrive."""

from __future__ import annotations

import asyncio

import torch

from ares.core import wire
from tests.support import async_env

STEP = "/v1/devices/dev-a/step?round=0&split=3"


def step_bundle(server, n: int = 4) -> bytes:
    return wire.encode({"x": torch.randn(n, *server.shapes[3]), "y": torch.zeros(n, dtype=torch.int64)})


def post_step(tmp_path, content, headers: dict):
    """Join dev-a at split 3, then POST one step body; returns (response, server)."""
    server, client, auth = async_env(tmp_path)

    async def scenario():
        async with client:
            r = await client.post("/v1/devices/dev-a/join", json={"round": 0, "split": 3}, headers=auth["dev-a"])
            assert r.status_code == 200, r.text
            body = content(server) if callable(content) else content
            return await client.post(STEP, content=body, headers={**auth["dev-a"], **headers})

    return asyncio.run(scenario()), server


def test_a_body_shorter_than_its_content_length_is_refused(tmp_path):
    r, server = post_step(tmp_path, step_bundle, {})
    assert r.status_code == 200, r.text  # the same body with its true length is a step
    body = step_bundle(server)
    r, server = post_step(tmp_path / "short", body, {"Content-Length": str(len(body) + 10)})
    assert r.status_code == 400 and f"of the {len(body) + 10} bytes" in r.json()["error"], r.text
    assert server.slots["dev-a"].steps == 0


def test_a_body_longer_than_its_content_length_is_refused(tmp_path):
    r, server = post_step(tmp_path, lambda s: step_bundle(s) + b"\0" * 64,
                          {"Content-Length": "100"})
    assert r.status_code == 400 and "runs past its Content-Length of 100" in r.json()["error"], r.text
    assert server.slots["dev-a"].steps == 0


def test_a_chunked_body_without_content_length_still_decodes(tmp_path):
    def pieces(server):
        body = step_bundle(server)

        async def gen():  # no Content-Length: httpx sends it chunked
            for i in range(0, len(body), 1000):
                yield body[i:i + 1000]
        return gen()

    r, server = post_step(tmp_path, pieces, {})
    assert r.status_code == 200, r.text
    assert "content-length" not in r.request.headers
    reply = wire.decode(bytearray(r.content))
    assert reply.tensors["grad"].shape == (4, *server.shapes[3]) and server.slots["dev-a"].steps == 1


def test_a_declared_length_over_the_device_budget_is_refused(tmp_path):
    """The declared length is taken from the budget up front: 16 bytes declared as 2 MiB."""
    server, client, auth = async_env(tmp_path, buffered_mib_per_device=1)

    async def body():
        yield b"\0" * 16

    async def scenario():
        async with client:
            return await client.post("/v1/devices/dev-a/update", content=body(),
                                     headers={**auth["dev-a"], "Content-Length": str(2 << 20)})

    r = asyncio.run(scenario())
    assert r.status_code == 413 and "buffered_mib_per_device" in r.json()["error"], r.text
    assert server.slots["dev-a"].steps == 0
