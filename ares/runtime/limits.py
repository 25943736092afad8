"""What one device may hold of the server at once (issue 12).

A device with a valid token, buggy or hostile, must not be able to starve the others. Per
device (after its token is checked, so names cannot be made up to get fresh budgets):

- at most `requests_per_device` requests in flight; more are answered 429 at once;
- at most `buffered_mib_per_device` of body bytes held, over all its requests in flight (413);
- a body that stalls gets `body_read_timeout_s` for its next piece, then 408.

Everything here runs on the event loop and holds no worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import AsyncIterator

from starlette.requests import ClientDisconnect, Request

from ares.core.config import LimitsConfig
from ares.core.wire import WireError

if sys.version_info >= (3, 11):
    from asyncio import timeout as _deadline
else:  # the same context manager, backported
    from async_timeout import timeout as _deadline


class DeviceBudget:
    """One request's share of its device's budget; reads the body within it."""

    def __init__(self, gate: "DeviceGate", device: str):
        self.gate, self.device, self.held = gate, device, 0

    async def read_body(self, request: Request, limit: int) -> bytearray:
        """The whole body, at most `limit` bytes, each piece within the read timeout.

        With a Content-Length (what devices send) the body is read into one buffer of that size,
        taken from the budget up front: each piece is copied once, and a body that ends short of
        its Content-Length or runs past it is refused (400). Without one (chunked), it grows."""
        declared = request.headers.get("content-length")
        size = int(declared) if declared is not None and declared.isdigit() else None
        if size is not None and size > limit:
            raise WireError(f"body of {declared} bytes exceeds the {limit}-byte limit", 413)
        if size is not None:
            self._take(size)
        body = bytearray(size or 0)
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
                            raise WireError(f"body exceeds the {limit}-byte limit", 413)
                        self._take(len(chunk))
                        body += chunk
                    elif end > size:
                        raise WireError(f"body runs past its Content-Length of {size} bytes", 400)
                    else:
                        body[got:end] = chunk
                    got = end
        except asyncio.TimeoutError:
            raise WireError(f"no body data for {timeout:g} s (limits.body_read_timeout_s)", 408) from None
        except ClientDisconnect:
            raise WireError("the client went away before the body was complete", 400) from None
        if size is not None and got != size:
            raise WireError(f"body ended after {got} of the {size} bytes its Content-Length declares", 400)
        return body

    def _take(self, n: int) -> None:
        cap = self.gate.limits.buffered_mib_per_device << 20
        if self.gate.buffered.get(self.device, 0) + n > cap:
            raise WireError(f"device {self.device} already has {cap >> 20} MiB of bodies in flight "
                            "(limits.buffered_mib_per_device)", 413)
        self.gate.buffered[self.device] = self.gate.buffered.get(self.device, 0) + n
        self.held += n


class DeviceGate:
    def __init__(self, limits: LimitsConfig):
        self.limits = limits
        self.in_flight: dict[str, int] = {}
        self.buffered: dict[str, int] = {}

    @contextlib.asynccontextmanager
    async def hold(self, device: str) -> AsyncIterator[DeviceBudget]:
        """One request of `device`: refused with 429 when it already has the most allowed."""
        if self.in_flight.get(device, 0) >= self.limits.requests_per_device:
            raise WireError(f"device {device} already has {self.limits.requests_per_device} requests in "
                            "flight (limits.requests_per_device)", 429)
        self.in_flight[device] = self.in_flight.get(device, 0) + 1
        budget = DeviceBudget(self, device)
        try:
            yield budget
        finally:
            self.in_flight[device] -= 1
            self.buffered[device] = self.buffered.get(device, 0) - budget.held
