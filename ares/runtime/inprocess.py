"""A `ServerLink` without HTTP: a device trainer calls a `TrainingServer` in the same process.

For tests and the benchmarks (the in-process baseline of the step-overhead benchmark, the
aggregation benchmark's fleet). It answers as the HTTP link does: a refusal becomes a
`LinkError` with the status the server's HTTP edge gives it (`ares.runtime.server.STATUS`),
so a device trainer cannot tell the two apart by what they refuse. It lives beside the server,
not with the device-side link: it runs the server's code.
"""

from __future__ import annotations

from typing import Optional

import torch

from ares.core import codec as codecs
from ares.core.config import ServerConfig
from ares.core.messages import DeviceReport, RoundState, ServerStatus
from ares.runtime.link import LinkError, StepResult, Transfer
from ares.runtime.server import status_of
from ares.runtime.training import Refusal, TrainingServer


class InProcessLink:
    """Calls the server object directly: no HTTP, no encoding. Same semantics as HttpLink."""

    def __init__(self, server: TrainingServer, device: str):
        self.server, self.device = server, device

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except Refusal as exc:
            raise LinkError(status_of(exc), str(exc)) from None

    def config(self) -> ServerConfig:
        return self.server.cfg

    def status(self) -> ServerStatus:
        return self.server.status()

    def round_state(self, round_index: Optional[int] = None, wait_s: float = 0.0) -> RoundState:
        """Answered at once (no long poll in process: the device's loop waits between asks)."""
        return self.server.round_state()

    def join(self, round_index: int, split: int):
        return (*self._call(self.server.join, self.device, round_index, split, self.server.cfg.limits.join_wait_s),
                Transfer())

    def step(self, round_index: int, split: int, x: torch.Tensor, y: torch.Tensor, codec: str = "fp32",
             micro: int = 0, micros: int = 1, total: Optional[int] = None) -> StepResult:
        """The codec's rounding is applied both ways, as on the wire (fp32: untouched)."""
        x = codecs.unpack(codecs.pack("x", x, codec), "x") if codec != "fp32" else x.detach()
        grad, loss, server_s = self._call(self.server.step, self.device, round_index, split, x, y,
                                          micro, micros, total)
        if codec != "fp32":
            grad = codecs.unpack(codecs.pack("grad", grad, codec, stochastic=True), "grad")
        return StepResult(grad, loss, server_s, 0.0, 0.0, 0, 0)

    def upload(self, report: DeviceReport, weights: dict[str, torch.Tensor]) -> Transfer:
        self._call(self.server.upload, self.device, report, weights)
        return Transfer()

    def close(self) -> None:
        pass
