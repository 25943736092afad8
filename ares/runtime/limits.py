"""What one device may hold of the server at once.

A device with a valid token, buggy or hostile, must not be able to starve the others. Per
device (after its token is checked, so names cannot be made up to get fresh budgets):

- at most `requests_per_device` requests in flight; more are refused at once (`DeviceBusy`);
- at most its byte budget of body bytes held, over all its requests in flight: twice the
  largest body a device of this job legitimately sends (`largest_body`), never more than
  `buffered_mib_per_device`. A body larger than the whole budget is refused for good
  (`FrameTooLarge`); one that would fit once the device's other bodies are done, for now
  (`DeviceBusy`, with the seconds to wait);
- a body that stalls gets `body_read_timeout_s` for its next piece, then `BodyTimeout`, and what
  had arrived of it is freed.

The server answers these with 429 (and a Retry-After), 413 and 408 (`ares.runtime.server.STATUS`).
Everything here runs on the event loop and holds no worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import AsyncIterator, Optional

from starlette.requests import ClientDisconnect, Request

from ares.core.config import LimitsConfig, ServerConfig
from ares.core.models import activation_numel, weight_bytes
from ares.core.wire import MAX_HEADER, FrameTooLarge, WireError

if sys.version_info >= (3, 11):
    from asyncio import timeout as _deadline
else:  # the same context manager, backported
    from async_timeout import timeout as _deadline


BODIES_PER_DEVICE = 2  # a device's budget in largest bodies: one step (its micro-batches together) and a retry
RETRY_AFTER_S = 1      # what a 429 tells the device to wait before it tries again
FP32 = 4               # bytes per activation value: the widest codec a device may send (ares.core.codec)
LABEL = 8              # bytes per label (int64)


def largest_body(model: str, batch_size: int) -> int:
    """Bytes of the largest body a device of this job legitimately sends: a whole batch of fp32
    activations (with its labels) at the split whose activations are largest, or the weights
    of every layer (the upload at the local split), whichever is larger, plus the largest
    header a bundle may carry (`ares.core.wire.MAX_HEADER`) and the bundle's 8-byte preamble.
    VGG5 at batch 100: 100 x 131072 + 800 + 1 MiB + 8 = 14156584 bytes (13.5 MiB)."""
    steps = max(activation_numel(model)[:-1], default=0) * FP32 * batch_size + LABEL * batch_size
    return max(steps, weight_bytes(model)[-1]) + MAX_HEADER + 8


def device_budget(cfg: ServerConfig) -> int:
    """Body bytes one device may have in flight: `BODIES_PER_DEVICE` largest bodies, at most
    `limits.buffered_mib_per_device`. VGG5 at batch 100: 28313168 bytes (27 MiB)."""
    bodies = BODIES_PER_DEVICE * largest_body(cfg.model, cfg.training.batch_size)
    return min(cfg.limits.buffered_mib_per_device << 20, bodies)


class DeviceBusy(WireError):
    """Refused for now, not for good: the device's share of the server is in use; it may try
    again after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int = RETRY_AFTER_S):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BodyTimeout(WireError):
    """A body that stalled: no piece of it for `limits.body_read_timeout_s`."""


class DeviceBudget:
    """One request's share of its device's budget; reads the body within it."""

    def __init__(self, gate: "DeviceGate", device: str):
        self.gate, self.device, self.held = gate, device, 0

    async def read_body(self, request: Request, limit: int) -> bytearray:
        """The whole body, at most `limit` bytes, each piece within the read timeout.

        With a Content-Length (what devices send) the body is read into one buffer of that size,
        taken from the budget up front: each piece is copied once, and a body that ends short of
        its Content-Length or runs past it is refused (`WireError`). Without one (chunked), it grows.
        A body refused part way (a stall, a disconnect, a budget exceeded) is freed at once:
        nothing of it outlives the error."""
        declared = request.headers.get("content-length")
        size = int(declared) if declared is not None and declared.isdigit() else None
        if size is not None and size > limit:
            raise FrameTooLarge(f"body of {declared} bytes exceeds the {limit}-byte limit")
        if size is not None:
            self._take(size)
        body = bytearray(size or 0)
        try:
            await self._fill(request, body, size, limit)
        except BaseException:
            body.clear()  # (the error's traceback holds this frame, and with it `body`, a while yet)
            raise
        return body

    async def _fill(self, request: Request, body: bytearray, size: Optional[int], limit: int) -> None:
        got = 0
        timeout = self.gate.limits.body_read_timeout_s
        loop = asyncio.get_running_loop()
        try:
            # one deadline, pushed back after each piece: `asyncio.wait_for` per piece made a task
            # each time, which cost ~2 ms of a 3 MB step body on 2 cores
            async with _deadline(timeout) as deadline:
                async for chunk in request.stream():
                    deadline.reschedule(loop.time() + timeout)
                    end = got + len(chunk)
                    if size is None:
                        if end > limit:
                            raise FrameTooLarge(f"body exceeds the {limit}-byte limit")
                        self._take(len(chunk))
                        body += chunk
                    elif end > size:
                        raise WireError(f"body runs past its Content-Length of {size} bytes")
                    else:
                        body[got:end] = chunk
                    got = end
        except asyncio.TimeoutError:
            raise BodyTimeout(f"no body data for {timeout:g} s (limits.body_read_timeout_s)") from None
        except ClientDisconnect:
            raise WireError("the client went away before the body was complete") from None
        if size is not None and got != size:
            raise WireError(f"body ended after {got} of the {size} bytes its Content-Length declares")

    def _take(self, n: int) -> None:
        budget = self.gate.budget
        held = self.gate.buffered.get(self.device, 0)
        if self.held + n > budget:
            raise FrameTooLarge(f"a body of {self.held + n} bytes is larger than device {self.device}'s budget of "
                                f"{budget} bytes for bodies in flight ({BODIES_PER_DEVICE} x the largest body "
                                "of this job, at most limits.buffered_mib_per_device)")
        if held + n > budget:
            raise DeviceBusy(f"device {self.device} already has {held} of its {budget} bytes for bodies in flight "
                             f"in use (limits.buffered_mib_per_device); retry once they are done")
        self.gate.buffered[self.device] = held + n
        self.held += n


class DeviceGate:
    def __init__(self, limits: LimitsConfig, budget: int):
        self.limits = limits
        self.budget = budget  # body bytes per device (`device_budget`)
        self.in_flight: dict[str, int] = {}
        self.buffered: dict[str, int] = {}

    @classmethod
    def for_job(cls, cfg: ServerConfig) -> "DeviceGate":
        return cls(cfg.limits, device_budget(cfg))

    @contextlib.asynccontextmanager
    async def hold(self, device: str) -> AsyncIterator[DeviceBudget]:
        """One request of `device`: refused (`DeviceBusy`) when it already has the most allowed."""
        if self.in_flight.get(device, 0) >= self.limits.requests_per_device:
            raise DeviceBusy(f"device {device} already has {self.limits.requests_per_device} requests in "
                             "flight (limits.requests_per_device)")
        self.in_flight[device] = self.in_flight.get(device, 0) + 1
        budget = DeviceBudget(self, device)
        try:
            yield budget
        finally:
            self.in_flight[device] -= 1
            self.buffered[device] = self.buffered.get(device, 0) - budget.held
