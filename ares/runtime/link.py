"""How a device talks to the server: one `ServerLink` interface, two implementations.

`HttpLink` is the real one: one long-lived httpx client speaking HTTP/2 (prior knowledge over
plain TCP, or HTTPS with ALPN h2 when given a `ClientTls`: see tlsclient.py) through our
large-frame transport (h2client.py), bodies streamed in 256 KiB chunks with a Content-Length
(httpx copies a large single `bytes` body quadratically under HTTP/2), transfer times measured
for the throughput estimate. `InProcessLink` (ares.runtime.inprocess) calls a `TrainingServer`
directly, for tests and the benchmarks. The training loop never sees HTTP (Flower's Grid
pattern).
"""

from __future__ import annotations

import functools
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Protocol

import httpx
import torch

from ares.core import codec as codecs
from ares.core import wire
from ares.core.config import ServerConfig
from ares.core.messages import DeviceReport, JoinReply, JoinRequest, RoundState, ServerStatus
from ares.runtime.tlsclient import ClientTls, TlsError, explain, transport

UNPACED_CHUNK = 1 << 20  # request body chunk on an uncapped link: the server's MAX_FRAME_SIZE


class LinkError(Exception):
    """The server refused a request; `status` is its HTTP status, the message its reason."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True)
class StepResult:
    grad: torch.Tensor
    loss: float
    server_s: float      # server compute, from Server-Timing
    up_s: float          # time to move the activations (to the response head, less the server's hold)
    down_s: float        # time to move the gradient
    up_bytes: int
    down_bytes: int
    up_span: tuple[float, float] = (0.0, 0.0)    # perf_counter: request start .. its body at the server
    down_span: tuple[float, float] = (0.0, 0.0)  # response headers .. its body read


@dataclass(frozen=True)
class Transfer:
    """A weights transfer (the join's download, the upload), for the link estimates: a device that
    trains locally moves no activations, and its weights are then all it can learn the link from."""

    nbytes: int = 0
    seconds: float = 0.0  # the body's time on the wire (the upload's still holds one request round trip)


class ServerLink(Protocol):
    def config(self) -> ServerConfig: ...
    def status(self) -> ServerStatus: ...
    def round_state(self, round_index: Optional[int] = None, wait_s: float = 0.0) -> RoundState: ...
    def join(self, round_index: int, split: int) -> tuple[JoinReply, dict[str, torch.Tensor], Transfer]: ...
    def step(self, round_index: int, split: int, x: torch.Tensor, y: torch.Tensor, codec: str = "fp32",
             micro: int = 0, micros: int = 1, total: Optional[int] = None) -> StepResult: ...
    def upload(self, report: DeviceReport, weights: dict[str, torch.Tensor]) -> Transfer: ...
    def close(self) -> None: ...


class RateLimit:
    """An in-process link cap (bytes/s each way), re-read from a JSON file when it changes.

    Used where tc is not available: it paces the real transfers, so measured throughput and
    the optimiser see the cap. File: {"up_bps": 625000, "down_bps": 625000, "duplex": "full"};
    absent = no cap. Concurrent streams (pipelined micro-batches) share the cap: each chunk
    books the next free slot of its direction's clock. `"duplex": "half"` books both
    directions on one clock (Wi-Fi: up and down share the air time, at `up_bps`).
    """

    def __init__(self, path: Optional[str]):
        self.path = Path(path) if path else None
        self.up_bps: Optional[float] = None
        self.down_bps: Optional[float] = None
        self.half_duplex = False
        self._mtime: Optional[float] = None
        self._lock = threading.Lock()
        self._free = {"up": 0.0, "down": 0.0}  # perf_counter time each direction's link is next free

    def refresh(self) -> None:
        if self.path is None:
            return
        try:
            mtime = self.path.stat().st_mtime
            if mtime == self._mtime:
                return
            data = json.loads(self.path.read_text())
            self.up_bps = float(data["up_bps"]) if data.get("up_bps") else None
            self.down_bps = float(data["down_bps"]) if data.get("down_bps") else None
            self.half_duplex = data.get("duplex", "full") == "half"
            self._mtime = mtime
        except (OSError, ValueError, KeyError, TypeError):
            self.up_bps = self.down_bps = None
            self.half_duplex = False

    def rate(self, direction: str) -> Optional[float]:
        """Bytes/s this direction is capped at; None when uncapped."""
        return self.up_bps if direction == "up" or self.half_duplex else self.down_bps

    def paced(self, chunks: Iterator[bytes], direction: str) -> Iterator[bytes]:
        """Pace one stream's chunks through this direction's shared link clock."""
        rate = self.rate(direction)
        if not rate:
            yield from chunks
            return
        key = "up" if self.half_duplex else direction
        for chunk in chunks:
            with self._lock:
                now = time.perf_counter()
                start = max(now, self._free[key])
                self._free[key] = done = start + len(chunk) / rate
            wait = done - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            yield chunk


def _unreachable_is_503(method):
    """A dropped connection, a timeout or a refused connect is a LinkError(503), which the
    trainer survives (it leaves the round and waits for the server), not a crash."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except httpx.TransportError as exc:
            raise LinkError(503, f"server unreachable: {exc.__class__.__name__}: {exc}") from None
    return wrapper


def parse_server_timing(header: Optional[str]) -> dict[str, float]:
    """`Server-Timing: compute;dur=12.3, held;dur=15.0` as seconds by name (milliseconds on the wire)."""
    found: dict[str, float] = {}
    for metric in (header or "").split(","):
        name, *params = [part.strip() for part in metric.split(";")]
        for param in params:
            if param.startswith("dur="):
                try:
                    value = float(param[4:]) / 1000.0
                except ValueError:
                    continue
                if 0 <= value < float("inf"):
                    found[name] = value
    return found


def _upload_end(timing: dict[str, float], t0: float, t_head: float, server_s: float = 0.0) -> float:
    """When the server had the whole request body: the reply's head less the time the server held
    it. Not when the body was handed to the socket: the kernel takes a small body at once, and a
    0.4 MB int8 step then seemed to cross a 20 Mbit/s link at 200."""
    held = min(max(timing.get("held", server_s), server_s), t_head - t0)
    return max(t_head - held, t0 + 1e-6)


class HttpLink:
    def __init__(self, base_url: str, device: str, token: str, timeout_s: float = 120.0,
                 http2: bool = True, rate_limit: Optional[RateLimit] = None, tls: Optional[ClientTls] = None):
        self.device = device
        self.rate = rate_limit or RateLimit(None)
        self.base_url = base_url.rstrip("/")
        self.client = httpx.Client(base_url=self.base_url, transport=transport(tls, http1=not http2, http2=http2),
                                   timeout=httpx.Timeout(timeout_s, connect=10.0),
                                   headers={"Authorization": f"Bearer {token}"})

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text
            raise LinkError(response.status_code, str(message))
        return response

    def healthy(self) -> bool:
        """False while the server is not up yet; raises `TlsError` if it cannot be authenticated."""
        try:
            return self.client.get("/healthz", timeout=5.0).status_code == 200
        except httpx.HTTPError as exc:
            why = explain(exc)
            if why is not None:  # no amount of waiting fixes a wrong CA or a wrong name
                raise TlsError(f"refusing the server at {self.base_url}: {why}") from exc
            return False

    def config(self) -> ServerConfig:
        return ServerConfig.model_validate(self._check(self.client.get("/v1/config")).json())

    @_unreachable_is_503
    def status(self) -> ServerStatus:
        return ServerStatus.model_validate(self._check(self.client.get("/v1/status")).json())

    @_unreachable_is_503
    def round_state(self, round_index: Optional[int] = None, wait_s: float = 0.0) -> RoundState:
        """`GET /v1/round`: what a waiting device needs, of a size that does not grow with the fleet;
        with `round_index` and `wait_s`, a long poll answered once that round takes joins (or the
        job ends), at the latest after `wait_s`. A server without the route (an older release,
        404) is asked for its whole status instead, and answers at once."""
        params = {} if round_index is None or wait_s <= 0 else {"round": round_index, "wait": wait_s}
        response = self.client.get("/v1/round", params=params)
        if response.status_code == 404:
            status = self.status()
            return RoundState(round=status.round, rounds=status.rounds, phase=status.phase, accepting=status.accepting)
        return RoundState.model_validate(self._check(response).json())

    @_unreachable_is_503
    def join(self, round_index: int, split: int) -> tuple[JoinReply, dict[str, torch.Tensor], Transfer]:
        body = JoinRequest(round=round_index, split=split).model_dump_json()
        request = self.client.build_request("POST", f"/v1/devices/{self.device}/join", content=body,
                                            headers={"Content-Type": "application/json"})
        _, reply, (_, t_head, t_end) = self._exchange(request)  # the weights come down the (emulated) link too
        bundle = wire.decode(reply)
        return JoinReply.model_validate(bundle.meta), bundle.tensors, Transfer(len(reply), t_end - t_head)

    @_unreachable_is_503
    def _send(self, path: str, tensors: dict[str, torch.Tensor], meta: dict,
              params: Optional[dict] = None) -> tuple[httpx.Response, bytearray, tuple[float, float, float], int]:
        """Stream a bundle up, read the reply; returns (response, body, times as in `_exchange`, bytes up)."""
        self.rate.refresh()
        # uncapped, each chunk is one 1 MiB DATA frame (the server's frame size): a quarter of
        # the pieces granian hands to Python one by one; capped, small chunks pace smoothly
        total, chunks = wire.encode_chunks(tensors, meta, wire.CHUNK if self.rate.rate("up") else UNPACED_CHUNK)
        request = self.client.build_request("POST", path, params=params, content=self.rate.paced(chunks, "up"),
                                            headers={"Content-Length": str(total), "Content-Type": "application/x-ares-bundle"})
        response, body, times = self._exchange(request)
        return response, body, times, total

    def _exchange(self, request: httpx.Request) -> tuple[httpx.Response, bytearray, tuple[float, float, float]]:
        """Send a request and read its reply through the link's downlink pacing (every byte the
        server sends: gradients and the join's weights); returns (response, body, perf_counter
        times of (request start, response head, body read)); LinkError on an error status."""
        t0 = time.perf_counter()
        response = self.client.send(request, stream=True)
        t1 = time.perf_counter()
        try:
            body = bytearray()
            for piece in self.rate.paced(response.iter_bytes(), "down"):
                body += piece
        finally:
            response.close()
        t2 = time.perf_counter()
        if response.status_code >= 400:
            try:
                message = json.loads(bytes(body)).get("error", "")
            except ValueError:
                message = bytes(body[:200]).decode(errors="replace")
            raise LinkError(response.status_code, str(message))
        return response, body, (t0, t1, t2)

    def step(self, round_index: int, split: int, x: torch.Tensor, y: torch.Tensor, codec: str = "fp32",
             micro: int = 0, micros: int = 1, total: Optional[int] = None) -> StepResult:
        """One step (or one micro-batch of a pipelined step: safe to call from several threads at
        once, each call one HTTP/2 stream on the one connection). `x` is packed with `codec`."""
        params = {"round": round_index, "split": split}
        if micros > 1:
            params.update(micro=micro, micros=micros, total=len(y) if total is None else total)
        response, body, (t0, t_head, t_end), up_bytes = self._send(
            f"/v1/devices/{self.device}/step", {**codecs.pack("x", x, codec), "y": y}, {}, params=params)
        timing = parse_server_timing(response.headers.get("server-timing"))
        server_s = timing.get("compute", 0.0)
        bundle = wire.decode(body)
        names = codecs.names(bundle.tensors, "grad")
        if set(bundle.tensors) != names:
            raise LinkError(502, f"step reply holds {sorted(bundle.tensors)}, expected {sorted(names)}")
        grad = codecs.unpack(bundle.tensors, "grad", tuple(x.shape))
        up_end = _upload_end(timing, t0, t_head, server_s)
        return StepResult(grad, float(bundle.meta.get("loss", float("nan"))), server_s, up_end - t0,
                          max(t_end - t_head, 1e-6), up_bytes, len(body), (t0, up_end), (t_head, t_end))

    def upload(self, report: DeviceReport, weights: dict[str, torch.Tensor]) -> Transfer:
        response, _, (t0, t_head, _), total = self._send(f"/v1/devices/{self.device}/update", weights,
                                                         report.model_dump(mode="json"))
        return Transfer(total, _upload_end(parse_server_timing(response.headers.get("server-timing")), t0, t_head) - t0)

    def close(self) -> None:
        self.client.close()
