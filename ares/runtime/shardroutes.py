"""The root's routes for its shards (ares.runtime.shardproto), added to the root's app by
`ares.runtime.server.create_app` when the job has shards > 1. Thin, as the device routes are:
check the shards' token and the index, read a bounded body, validate it, hand it to the
`RootServer` in a worker thread.

Each shard has its own share of the root's body bytes (ares.runtime.limits, keyed `shard-I`):
two of its largest bodies, a running sum (two float32 per weight) or its devices' records.
"""

from __future__ import annotations

from anyio import to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ares.core import wire
from ares.core.config import ServerConfig
from ares.runtime.limits import DeviceGate
from ares.runtime.root import RootServer
from ares.runtime.server import BUNDLE, Token
from ares.runtime.shardproto import PartialMeta, ShardBeat, ShardRecords, partial_bytes

BEAT_BYTES_PER_DEVICE = 256       # a device's phase and split in a beat, generously
RECORD_BYTES_PER_DEVICE = 64 << 10  # a device's report (its profile, step samples, power mode) and record


def add_shard_routes(app: FastAPI, cfg: ServerConfig) -> None:
    def root() -> RootServer:
        return app.state.trainer

    def sizes(index: int) -> tuple[int, int, int]:
        """(beat, records, running sum) byte limits for shard `index`'s bodies."""
        devices = len(root().seats[index].devices)
        partial = min(cfg.max_body_mib << 20, partial_bytes(root()._global_cpu) + wire.MAX_HEADER + 8)
        records = min(cfg.max_body_mib << 20, RECORD_BYTES_PER_DEVICE * (devices + 1))
        return (64 << 10) + BEAT_BYTES_PER_DEVICE * devices, records, partial

    gates: dict[int, DeviceGate] = {}

    def gate(index: int) -> DeviceGate:
        if index not in gates:
            gates[index] = DeviceGate(cfg.limits, 2 * max(sizes(index)))
        return gates[index]

    @app.post("/v1/shards/{index}/beat")
    async def beat(index: int, request: Request, token: Token) -> JSONResponse:
        root().check_shard(index, token)
        async with gate(index).hold(f"shard-{index}") as budget:
            body = bytes(await budget.read_body(request, sizes(index)[0]))
        msg = ShardBeat.model_validate(wire.parse_json(body, "beat", wire.Unacceptable))
        clock = await to_thread.run_sync(lambda: root().beat(index, msg))
        return JSONResponse(clock.model_dump(mode="json"))

    @app.get("/v1/shards/{index}/model")
    async def model(index: int, token: Token) -> Response:
        root().check_shard(index, token)
        round_index, digest, state = await to_thread.run_sync(lambda: root().model_for(index))
        body = await to_thread.run_sync(lambda: wire.encode(state, {"round": round_index, "model_sha256": digest}))
        return Response(body, media_type=BUNDLE)

    @app.put("/v1/shards/{index}/rounds/{round_index}/records")
    async def records(index: int, round_index: int, request: Request, token: Token) -> JSONResponse:
        root().check_shard(index, token)
        async with gate(index).hold(f"shard-{index}") as budget:
            body = bytes(await budget.read_body(request, sizes(index)[1]))
        msg = ShardRecords.model_validate(wire.parse_json(body, "records", wire.Unacceptable))
        await to_thread.run_sync(lambda: root().take_records(index, round_index, msg))
        return JSONResponse({"ok": True, "round": round_index})

    @app.post("/v1/shards/{index}/rounds/{round_index}/partial")
    async def partial(index: int, round_index: int, request: Request, token: Token) -> JSONResponse:
        root().check_shard(index, token)
        limit = sizes(index)[2]
        async with gate(index).hold(f"shard-{index}") as budget:
            body = await budget.read_body(request, limit)
            bundle = await to_thread.run_sync(wire.decode, body, limit)  # finite values, exact sizes
            meta = PartialMeta.model_validate(bundle.meta)
            merged = await to_thread.run_sync(lambda: root().take_partial(index, round_index, meta, bundle.tensors))
        return JSONResponse({"ok": True, "round": round_index, **({} if merged else {"repeat": True})})
