"""The edge server as an ASGI app (FastAPI), served over HTTP/2 by granian.

Routes are thin: authenticate, read and validate the body, run the torch work in a thread
(never inside `async def`), answer. All round logic lives in `TrainingServer`.

    GET  /healthz                         liveness, no token
    GET  /v1/config                       the server's config (devices learn their training setup)
    GET  /v1/round                        ?round=R&wait=S: the round's state, once round R takes joins
                                          (or the job ends, or S seconds pass; a long poll, any token)
    GET  /v1/status                       round, accuracy, per-device phase (any token)
    GET  /v1/telemetry[?columns=true]     what the optimiser needs (controller token); as columns
                                          for a controller
    GET  /metrics                         Prometheus text (controller token)
    POST /v1/devices/{name}/join          JSON JoinRequest -> bundle of device-side weights
    POST /v1/devices/{name}/step          bundle {x, y}, ?round=&split=[&micro=&micros=&total=] -> bundle {grad}, Server-Timing
    POST /v1/devices/{name}/update        bundle of weights + DeviceReport meta -> JSON, Server-Timing (held)

A job with `shards: k > 1` runs this app k + 1 times (docs/how-it-works/shards.md): the root
(`ares server`: no device routes answer there; the shards' routes, ares.runtime.shardroutes)
and k shards (`ares server --shard I --root URL`: the routes above, for the shard's devices).

What a route refuses is an exception whose type says what went wrong: `wire.WireError` and its
kinds for a body (ares.core.wire, ares.runtime.limits), `Refusal` and its kinds for the round
state (ares.runtime.training). Here, at the edge and only here, `STATUS` gives each kind its
HTTP status, and a `{"error": ...}` answer carries the message (`DeviceBusy` adds a Retry-After).
What the server accepts and refuses, and why: docs/how-it-works/server-limits.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Annotated, Optional

from anyio import to_thread
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError

from ares.core import codec, wire
from ares.core.config import ServerConfig, load_yaml_model
from ares.core.messages import DeviceReport, JoinRequest, TelemetryColumns
from ares.runtime.allocator import keep_freed_memory
from ares.runtime.cpulimit import fit_threads_to_cpu_limit
from ares.runtime.limits import BodyTimeout, DeviceBudget, DeviceBusy, DeviceGate
from ares.runtime.root import RootServer
from ares.runtime.roundwatch import RoundWatch
from ares.runtime.shard import RootAddress, RootLink, ShardFollower, ShardServer
from ares.runtime.shardproto import read_shard_token
from ares.runtime.training import (AlreadyFinished, BadMicroBatch, BadTensor, ConflictingUpload, NotJoined, OutOfTurn,
                                   Refusal, RoundClosed, RoundNotOpen, TrainingOver, TrainingServer, TurnTimeout,
                                   Unauthorized, UnknownDevice, UnsafeUpdate, WrongSplit, read_tokens)

log = logging.getLogger("ares.server")
BUNDLE = "application/x-ares-bundle"

# The HTTP status of every refusal, by its type: the one place statuses are chosen. A kind not
# listed answers with the status of its nearest listed base class (`status_of`).
STATUS: dict[type[Exception], int] = {
    # a body (ares.core.wire, ares.runtime.limits)
    wire.WireError: 400,          # its format is broken
    wire.FrameTooLarge: 413,
    wire.Unacceptable: 422,       # well-formed, but not usable here (wire.NonFinite among them)
    BodyTimeout: 408,
    DeviceBusy: 429,              # for now: with a Retry-After (`headers_of`)
    ValidationError: 422,         # a JSON message that its schema refuses
    RequestValidationError: 422,  # a query parameter missing or of the wrong type
    # the round state (ares.runtime.training)
    Unauthorized: 401,
    UnknownDevice: 404,           # and a device of another shard (at a shard, at the root), a shard index out of range
    TurnTimeout: 408,
    RoundClosed: 409,
    RoundNotOpen: 409,
    NotJoined: 409,
    AlreadyFinished: 409,
    ConflictingUpload: 409,
    OutOfTurn: 409,
    TrainingOver: 410,            # and TrainingFailed: devices stop
    WrongSplit: 422,
    BadMicroBatch: 422,
    BadTensor: 422,
    UnsafeUpdate: 422,
}


def status_of(exc: BaseException) -> int:
    """The HTTP status that answers a refusal (`STATUS`, by the exception's type or its nearest base)."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    raise TypeError(f"{type(exc).__name__} is not a refusal the server answers ({exc})")


def headers_of(exc: BaseException) -> Optional[dict[str, str]]:
    """Headers that go with a refusal's answer: when to try again after a `DeviceBusy`."""
    if isinstance(exc, DeviceBusy):
        return {"Retry-After": str(exc.retry_after_s)}
    return None


async def _bearer(authorization: Annotated[Optional[str], Header()] = None) -> Optional[str]:
    """async: FastAPI runs a plain `def` dependency in a worker thread, a hop per request."""
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


Token = Annotated[Optional[str], Depends(_bearer)]


async def _device_budget(name: str, request: Request, token: Token):
    """The device's token, then its share of the server (ares.runtime.limits)."""
    request.app.state.trainer.check_device_token(name, token)
    async with request.app.state.gate.hold(name) as budget:
        yield budget


Budget = Annotated[DeviceBudget, Depends(_device_budget)]


async def _decode(body: bytearray, limit: int) -> wire.Bundle:
    """Decoding runs off the event loop (a 1 MiB header must not stall every other device)."""
    return await to_thread.run_sync(wire.decode, body, limit)


def _step(trainer: TrainingServer, name: str, body: bytearray, limit: int, round_index: int, split: int,
          micro: int, micros: int, total: Optional[int]) -> tuple[bytes, float]:
    """Decode, step and encode in one worker thread: one hand-off per step, not three, and the
    event loop never copies a body. Returns the reply bundle and the compute seconds."""
    try:
        bundle = wire.decode(body, limit)
    except wire.NonFinite:  # the device's side of the model diverged
        trainer.note_nonfinite(name)
        raise
    # x in any codec (int8 brings its scale); the gradient goes back in the codec x came in
    allowed = {"x": (wire.FLOATS + (wire.DTYPES["int8"],), None), "y": (wire.DTYPES["int64"], (None,))}
    if "x" + codec.SCALE_SUFFIX in codec.names(bundle.tensors, "x"):
        allowed["x" + codec.SCALE_SUFFIX] = (wire.DTYPES["float32"], None)
    wire.expect(bundle, allowed)
    # rank and shape against this split's before anything indexes them (a scalar x has no batch
    # dimension to count): checked on the tensors as they came, in their codec
    trainer.check_step_tensors(split, bundle.tensors["x"], bundle.tensors["y"])
    x = codec.unpack(bundle.tensors, "x", (None, *trainer.activation_shape(split)))
    grad, loss, seconds = trainer.step(name, round_index, split, x, bundle.tensors["y"], micro, micros, total)
    # bytes (one copy): granian sends a bytes body as it is; a memoryview cost it ~45 ms a step
    return wire.encode(codec.pack("grad", grad, codec.codec_of(bundle.tensors, "x"), stochastic=True),
                       {"loss": loss}), seconds


async def _wait_for_round(trainer: TrainingServer, round_index: int, wait_s: float) -> None:
    """Wait on the event loop, holding no worker thread, until `join` would not wait."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while trainer.join_would_wait(round_index) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)


def build_trainer(cfg: ServerConfig, shard: Optional[RootAddress] = None, device: str = "cpu") -> TrainingServer:
    """The server's round state for its role: one server (shards: 1), the root of a sharded job,
    or one of its shards (`shard`)."""
    if shard is not None:
        from ares.core.sharding import assign

        tokens, controller = read_tokens(cfg, assign(cfg.devices, cfg.shards, cfg.shard_pins)[shard.index])
        return ShardServer(cfg, shard.index, tokens, controller, device=device)
    tokens, controller = read_tokens(cfg)
    if cfg.shards > 1:
        return RootServer(cfg, tokens, controller, read_shard_token(cfg), device=device)
    return TrainingServer(cfg, tokens, controller, device=device)


def create_app(cfg: ServerConfig, trainer: Optional[TrainingServer] = None, tick_s: float = 0.5,
               shard: Optional[RootAddress] = None) -> FastAPI:
    """The only way to build the app. `trainer` is injectable for tests; else built in lifespan.
    `shard`: this app is that shard of the job, following its root."""
    limit = cfg.max_body_mib << 20

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if app.state.trainer is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
            app.state.trainer = await to_thread.run_sync(lambda: build_trainer(cfg, shard, device))
        follower = None
        if shard is not None:
            trainer = app.state.trainer
            link = RootLink(shard, read_shard_token(cfg), trainer.global_state())
            follower = ShardFollower(trainer, link).start()
        ticker = asyncio.create_task(tick_rounds(app.state.trainer, tick_s))
        try:
            yield
        finally:
            ticker.cancel()
            if app.state.watch is not None:
                await app.state.watch.stop()
            if follower is not None:
                await to_thread.run_sync(follower.stop)

    app = FastAPI(title="ARES edge server", lifespan=lifespan)
    app.state.trainer = trainer
    app.state.gate = DeviceGate.for_job(cfg)
    app.state.watch = None

    def srv() -> TrainingServer:
        return app.state.trainer

    def watch() -> RoundWatch:
        """The long polls' watch, started on first use in the loop that serves them."""
        if app.state.watch is None or app.state.watch.loop is not asyncio.get_running_loop():
            app.state.watch = RoundWatch(srv().round_state).start()
        return app.state.watch

    @app.exception_handler(Refusal)
    @app.exception_handler(wire.WireError)
    async def _refused(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=status_of(exc), headers=headers_of(exc))

    @app.exception_handler(ValidationError)
    async def _invalid(_: Request, exc: ValidationError) -> JSONResponse:
        return JSONResponse({"error": f"invalid message: {exc.errors()[:3]}"}, status_code=status_of(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        """A query parameter missing or of the wrong type: answered like every other refusal."""
        problems = [f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}" for e in exc.errors()[:3]]
        return JSONResponse({"error": f"invalid request: {'; '.join(problems)}"}, status_code=status_of(exc))

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"ok": True, "round": srv().round, "phase": srv().phase}

    @app.get("/v1/config")
    async def config(token: Token) -> JSONResponse:
        srv().check_any_token(token)
        return JSONResponse(cfg.model_dump(mode="json"))

    @app.get("/v1/round")
    async def round_state(token: Token, round: Optional[int] = None, wait: float = 0.0) -> JSONResponse:
        """What a waiting device asks: the round and its phase, no fleet, no round lock. With
        `round` and `wait`, answered once that round takes joins (or the job ends), at most `wait`
        seconds later (capped at `limits.round_wait_s`): one request per device per gap."""
        srv().check_any_token(token)
        state = srv().round_state()
        if round is not None and wait > 0 and not state.opens_for(round):
            state = await watch().wait_open(round, min(wait, cfg.limits.round_wait_s))
        return JSONResponse(state.model_dump(mode="json"))

    # status, telemetry and metrics take the round lock, which a closing round holds while it
    # evaluates: they run in a worker thread so the event loop never waits for it
    @app.get("/v1/status")
    async def status(token: Token) -> JSONResponse:
        async with app.state.gate.hold(srv().check_any_token(token)):  # its worker threads are shared
            return JSONResponse((await to_thread.run_sync(srv().status)).model_dump(mode="json"))

    @app.get("/v1/telemetry")
    async def telemetry(token: Token, columns: bool = False) -> Response:
        """One object per device; with `columns`, the same as columns (`TelemetryColumns`), what a
        controller reads."""
        srv().check_controller_token(token)
        def body() -> str:  # in a worker thread: at 10,000 devices tens of ms the event loop need not wait
            t = srv().telemetry()
            return TelemetryColumns.of(t).model_dump_json() if columns else t.model_dump_json()

        return Response(await to_thread.run_sync(body), media_type="application/json")

    @app.get("/metrics")
    async def metrics(token: Token) -> PlainTextResponse:
        srv().check_controller_token(token)
        from ares.runtime.metrics import render

        text = await to_thread.run_sync(lambda: render(srv().status(), srv().telemetry()))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/v1/devices/{name}/join")
    async def join(name: str, request: Request, budget: Budget) -> Response:
        body = bytes(await budget.read_body(request, 64 << 10))
        msg = JoinRequest.model_validate(wire.parse_json(body, "join request", wire.Unacceptable))
        await _wait_for_round(srv(), msg.round, cfg.limits.join_wait_s)
        reply, weights = await to_thread.run_sync(lambda: srv().join(name, msg.round, msg.split))
        return Response(wire.encode(weights, reply.model_dump(mode="json")), media_type=BUNDLE)

    @app.post("/v1/devices/{name}/step")
    async def step(name: str, round: int, split: int, request: Request, budget: Budget,
                   micro: int = 0, micros: int = 1, total: Optional[int] = None) -> Response:
        body = await budget.read_body(request, limit)
        arrived = time.perf_counter()
        reply, seconds = await to_thread.run_sync(
            lambda: _step(srv(), name, body, limit, round, split, micro, micros, total))
        # `held`: from the whole body here to the reply (decode, its turn among micro-batches, compute,
        # encode), so the device can tell when its upload really ended (ares.runtime.link)
        held = time.perf_counter() - arrived
        return Response(reply, media_type=BUNDLE,
                        headers={"Server-Timing": f"compute;dur={seconds * 1000:.3f}, held;dur={held * 1000:.3f}"})

    @app.post("/v1/devices/{name}/update")
    async def update(name: str, request: Request, budget: Budget) -> JSONResponse:
        started = time.perf_counter()  # the request's head is here; its body is on the way
        body = await budget.read_body(request, limit)
        arrived = time.perf_counter()
        bundle = await _decode(body, limit)
        report = DeviceReport.model_validate(bundle.meta)
        received = (len(body), arrived - started)  # the server's own figure for the device's link
        counted = await to_thread.run_sync(lambda: srv().upload(name, report, bundle.tensors, received))
        held = time.perf_counter() - arrived  # (as for a step: the device's upload time is its reply's head less this)
        # a repeat of the upload already taken is answered as it was, and says so (counted once)
        return JSONResponse({"ok": True, "round": report.round, **({} if counted else {"repeat": True})},
                            headers={"Server-Timing": f"held;dur={held * 1000:.3f}"})

    if cfg.shards > 1 and shard is None:
        from ares.runtime.shardroutes import add_shard_routes

        add_shard_routes(app, cfg)
    return app


async def tick_rounds(trainer: TrainingServer, period: float) -> None:
    """Closes rounds at their deadline. An error is logged and counted, never the end of the ticker."""
    while True:
        await asyncio.sleep(period)
        try:
            await to_thread.run_sync(trainer.tick)
        except Exception:
            trainer._count("tick_errors")
            log.exception("round ticker failed; it keeps going")


def app_from_env() -> FastAPI:
    """Factory for granian's worker process: the config path travels in ARES_SERVER_CONFIG, a
    shard's index and root in ARES_SHARD, ARES_ROOT_URL, ARES_ROOT_CA, ARES_ROOT_TLS_SERVER_NAME."""
    keep_freed_memory()
    fit_threads_to_cpu_limit()
    shard = None
    if os.environ.get("ARES_SHARD"):
        shard = RootAddress(index=int(os.environ["ARES_SHARD"]), url=os.environ["ARES_ROOT_URL"],
                            ca_file=os.environ.get("ARES_ROOT_CA") or None,
                            server_name=os.environ.get("ARES_ROOT_TLS_SERVER_NAME") or None)
    return create_app(load_yaml_model(ServerConfig, os.environ["ARES_SERVER_CONFIG"]), shard=shard)


def serve(cfg: ServerConfig, config_path: str, tls_cert: Optional[str] = None, tls_key: Optional[str] = None,
          shard: Optional[RootAddress] = None) -> None:
    """Run the server in the foreground until interrupted; HTTPS (ALPN h2) when given a certificate.
    With `shard`: that shard of the job, following its root."""
    os.environ["ARES_SERVER_CONFIG"] = str(config_path)
    if shard is not None:
        os.environ.update({"ARES_SHARD": str(shard.index), "ARES_ROOT_URL": shard.url,
                           "ARES_ROOT_CA": shard.ca_file or "", "ARES_ROOT_TLS_SERVER_NAME": shard.server_name or ""})
    if cfg.http_server == "uvicorn":
        import uvicorn  # HTTP/1.1 only: devices must use --http1 against it

        uvicorn.run("ares.runtime.server:app_from_env", factory=True, host=cfg.host, port=cfg.port, log_level="warning",
                    ssl_certfile=tls_cert, ssl_keyfile=tls_key)
        return
    from pathlib import Path

    from granian import Granian
    from granian.constants import Interfaces
    from granian.http import HTTP2Settings

    window = 16 << 20  # windows must be at least link rate x RTT; 16 MiB covers 50 Mbit at 2 s
    Granian("ares.runtime.server:app_from_env", factory=True, address=cfg.host, port=cfg.port,
            interface=Interfaces.ASGI, http="auto",  # HTTP/2 (prior knowledge) for devices, HTTP/1.1 for probes
            workers=1, log_access=False,
            # with a certificate: TLS only (plain h2c is refused), ALPN offers h2 then http/1.1
            **({"ssl_cert": Path(tls_cert), "ssl_key": Path(tls_key)} if tls_cert and tls_key else {}),
            http2_settings=HTTP2Settings(initial_stream_window_size=window, initial_connection_window_size=window,
                                         max_frame_size=1 << 20)).serve()
