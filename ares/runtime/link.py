"""How a device talks to the server: one `ServerLink` interface, two implementations.

`HttpLink` is the real one: one long-lived httpx client speaking HTTP/2 (prior knowledge over
plain TCP, or HTTPS with ALPN h2 when given a `ClientTls`: see tlsclient.py), bodies streamed in 256 KiB chunks with a Content-Length
(httpx copies a large single `bytes` body quadratically under HTTP/2), transfer times measured
for the throughput estimate. `InProcessLink` calls a `TrainingServer` directly, for tests and
for the in-process baseline of the step-overhead benchmark. The training loop never sees HTTP
(Flower's Grid pattern).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Protocol

import httpx
import torch

from ares.core import wire
from ares.core.config import ServerConfig
from ares.core.messages import DeviceReport, JoinReply, JoinRequest, ServerStatus
from ares.runtime.tlsclient import ClientTls, TlsError, explain, transport


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
    up_s: float          # time to move the activations (round trip minus server compute minus download)
    down_s: float        # time to move the gradient
    up_bytes: int
    down_bytes: int


class ServerLink(Protocol):
    def config(self) -> ServerConfig: ...
    def status(self) -> ServerStatus: ...
    def join(self, round_index: int, split: int) -> tuple[JoinReply, dict[str, torch.Tensor]]: ...
    def step(self, round_index: int, split: int, x: torch.Tensor, y: torch.Tensor) -> StepResult: ...
    def upload(self, report: DeviceReport, weights: dict[str, torch.Tensor]) -> None: ...
    def close(self) -> None: ...


class RateLimit:
    """An in-process link cap (bytes/s each way), re-read from a JSON file when it changes.

    Used where tc is not available: it paces the real transfers, so measured throughput and
    the optimiser see the cap. File: {"up_bps": 625000, "down_bps": 625000}; absent = no cap.
    """

    def __init__(self, path: Optional[str]):
        self.path = Path(path) if path else None
        self.up_bps: Optional[float] = None
        self.down_bps: Optional[float] = None
        self._mtime: Optional[float] = None

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
            self._mtime = mtime
        except (OSError, ValueError, KeyError, TypeError):
            self.up_bps = self.down_bps = None

    @staticmethod
    def pace(chunks: Iterator[bytes], rate: Optional[float]) -> Iterator[bytes]:
        start, sent = time.perf_counter(), 0
        for chunk in chunks:
            sent += len(chunk)
            if rate:
                wait = sent / rate - (time.perf_counter() - start)
                if wait > 0:
                    time.sleep(wait)
            yield chunk


def _server_seconds(header: Optional[str]) -> float:
    """Parse `Server-Timing: compute;dur=12.3` (milliseconds)."""
    if not header:
        return 0.0
    for part in header.split(";"):
        part = part.strip()
        if part.startswith("dur="):
            try:
                return float(part[4:]) / 1000.0
            except ValueError:
                return 0.0
    return 0.0


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

    def status(self) -> ServerStatus:
        return ServerStatus.model_validate(self._check(self.client.get("/v1/status")).json())

    def join(self, round_index: int, split: int) -> tuple[JoinReply, dict[str, torch.Tensor]]:
        body = JoinRequest(round=round_index, split=split).model_dump_json()
        r = self._check(self.client.post(f"/v1/devices/{self.device}/join", content=body,
                                         headers={"Content-Type": "application/json"}))
        bundle = wire.decode(bytearray(r.content))
        return JoinReply.model_validate(bundle.meta), bundle.tensors

    def _send(self, path: str, tensors: dict[str, torch.Tensor], meta: dict,
              params: Optional[dict] = None) -> tuple[httpx.Response, bytearray, float, float, int]:
        """Stream a bundle up, read the reply; returns (response, body, t_headers, t_body, bytes up)."""
        self.rate.refresh()
        total, chunks = wire.encode_chunks(tensors, meta)
        request = self.client.build_request("POST", path, params=params, content=self.rate.pace(chunks, self.rate.up_bps),
                                            headers={"Content-Length": str(total), "Content-Type": "application/x-ares-bundle"})
        t0 = time.perf_counter()
        response = self.client.send(request, stream=True)
        t1 = time.perf_counter()
        try:
            body = bytearray()
            for piece in self.rate.pace(response.iter_bytes(), self.rate.down_bps):
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
        return response, body, t1 - t0, t2 - t1, total

    def step(self, round_index: int, split: int, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        response, body, t_head, t_body, up_bytes = self._send(
            f"/v1/devices/{self.device}/step", {"x": x, "y": y}, {}, params={"round": round_index, "split": split})
        server_s = _server_seconds(response.headers.get("server-timing"))
        bundle = wire.decode(body)
        wire.expect(bundle, {"grad": (wire.FLOATS, tuple(x.shape))})
        return StepResult(wire.from_codec(bundle.tensors["grad"]), float(bundle.meta.get("loss", float("nan"))),
                          server_s, max(t_head - server_s, 1e-6), max(t_body, 1e-6), up_bytes, len(body))

    def upload(self, report: DeviceReport, weights: dict[str, torch.Tensor]) -> None:
        self._send(f"/v1/devices/{self.device}/update", weights, report.model_dump(mode="json"))

    def close(self) -> None:
        self.client.close()


class InProcessLink:
    """Calls the server object directly: no HTTP, no encoding. Same semantics as HttpLink."""

    def __init__(self, server, device: str):
        from ares.runtime.training import RoundError

        self.server, self.device, self._error = server, device, RoundError

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except self._error as exc:
            raise LinkError(exc.status, str(exc)) from None

    def config(self) -> ServerConfig:
        return self.server.cfg

    def status(self) -> ServerStatus:
        return self.server.status()

    def join(self, round_index: int, split: int):
        return self._call(self.server.join, self.device, round_index, split, 20.0)

    def step(self, round_index: int, split: int, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        grad, loss, server_s = self._call(self.server.step, self.device, round_index, split, x.detach(), y)
        return StepResult(grad, loss, server_s, 0.0, 0.0, 0, 0)

    def upload(self, report: DeviceReport, weights: dict[str, torch.Tensor]) -> None:
        self._call(self.server.upload, self.device, report, weights)

    def close(self) -> None:
        pass
