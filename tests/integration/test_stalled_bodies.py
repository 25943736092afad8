"""Bodies that stop arriving, against a real `ares server` process over HTTP/2, each upload on its
own connection with the device's valid token (ares.runtime.limits):

- a stalled body is answered 408 once no byte of it arrived for `limits.body_read_timeout_s`,
  and what had arrived of it is freed;
- while stalls hold a device's byte budget (twice the largest body of the job), its further
  bodies are refused at once: 429 while others hold it, 413 for a body larger than all of it;
- the server's memory grows by no more than that budget while they stall;
- afterwards every device trains a normal round.

Without these, four connections each holding 60 MiB of a 61 MiB body held ~240 MiB of the
server for as long as they stalled."""

from __future__ import annotations

import json
import select
import socket
import time
from pathlib import Path
from typing import Optional

import httpx
import jh2.config
import jh2.connection
import jh2.events
import pytest
import torch

from ares.core.config import LimitsConfig
from ares.core.messages import DeviceReport
from ares.runtime.limits import device_budget
from ares.runtime.link import HttpLink
from tests.support import small_config, token, wait_for

TIMEOUT_S = 5.0       # limits.body_read_timeout_s of these servers
MARGIN_S = 20.0       # an answer's allowance past it on a loaded 2-core machine
RSS_SLACK = 64 << 20  # the server's own allocations beside the bodies it holds (allocator, HTTP/2 buffers)
UPDATE = "/v1/devices/{}/update"


class StalledUpload:
    """One HTTP/2 connection (h2c, prior knowledge) with one POST that declares `declared` body
    bytes (None: no Content-Length), sends `sent` of them as fast as flow control allows, then
    sends nothing more; all of them (`sent == declared`) end the stream, a whole body. `patient_s`:
    wait that long for an early answer before sending any."""

    def __init__(self, port: int, path: str, bearer: str, declared: Optional[int], sent: int,
                 patient_s: float = 0.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.h2 = jh2.connection.H2Connection(jh2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.h2.initiate_connection()
        self.status: Optional[int] = None
        self.headers: dict[str, str] = {}
        self.body = b""
        self.reset = self.closed = self.ended = False
        headers = [(":method", "POST"), (":path", path), (":scheme", "http"), (":authority", f"127.0.0.1:{port}"),
                   ("authorization", f"Bearer {bearer}")]
        if declared is not None:
            headers.append(("content-length", str(declared)))
        self.h2.send_headers(1, headers)
        self._flush()
        give_up = time.monotonic() + patient_s
        while not self.answered and time.monotonic() < give_up:
            self.pump(give_up - time.monotonic())
        left = sent
        while left and not self.answered:
            room = min(self.h2.local_flow_control_window(1), self.h2.max_outbound_frame_size, left)
            if room <= 0:
                self.pump(1.0)  # no window yet: wait for the server's WINDOW_UPDATE
                continue
            left -= room
            self.h2.send_data(1, bytes(room), end_stream=not left and sent == declared)
            self._flush()
            self.pump(0)
        self.stalled_at = time.monotonic()  # the last byte it will ever send went out before this

    @property
    def answered(self) -> bool:
        """A response head, a reset stream or a closed connection: the server let go of it."""
        return self.status is not None or self.reset or self.closed

    @property
    def error(self) -> str:
        return json.loads(self.body)["error"] if self.body else ""

    def _flush(self) -> None:
        out = self.h2.data_to_send()
        if out and not self.closed:
            try:
                self.sock.sendall(out)
            except OSError:
                self.closed = True

    def pump(self, timeout: float) -> None:
        """Read what the server sent within `timeout` seconds (the response's body whole)."""
        if self.closed or not select.select([self.sock], [], [], max(timeout, 0))[0]:
            return
        try:
            data = self.sock.recv(1 << 20)
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return
        for event in self.h2.receive_data(data):
            if isinstance(event, jh2.events.ResponseReceived):
                self.headers = dict(event.headers)
                self.status = int(self.headers[":status"])
            elif isinstance(event, jh2.events.DataReceived):
                self.body += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, jh2.events.StreamEnded):
                self.ended = True
            elif isinstance(event, jh2.events.StreamReset):
                self.reset = True
            elif isinstance(event, jh2.events.ConnectionTerminated):
                self.closed = True
        self._flush()

    def finished(self) -> bool:
        """The answer is in, with its whole body (or the stream or connection is gone)."""
        self.pump(0)
        return self.reset or self.closed or (self.status is not None and self.ended)

    def close(self) -> None:
        self.sock.close()


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants (granian serves from a child process)."""
    total = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total += int(line.split()[1]) << 10
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += tree_rss(int(child))
    return total


def stall_config(tmp: Path, **limits):
    cfg = small_config(tmp, devices=("dev-a", "dev-b"), rounds=2, batch_size=20)
    return cfg.model_copy(update={"round_deadline_s": 3600, "round_gap_s": 0.0,
                                  "limits": LimitsConfig(body_read_timeout_s=TIMEOUT_S, **limits)})


def answers(uploads: list[StalledUpload], timeout: float, sample=lambda: None) -> None:
    """Wait until every upload is answered (polling, calling `sample` between polls)."""
    def all_in() -> bool:
        sample()
        return all([u.finished() for u in uploads])
    wait_for(all_in, timeout, "an answer to every stalled upload", interval=0.1)


def a_normal_round(url: str, cfg) -> None:
    """Every device joins round 0 at split 3, takes one step and uploads: the round closes."""
    for name in cfg.devices:
        link = HttpLink(url, name, token(cfg, name), timeout_s=60)
        try:
            reply, weights, _ = link.join(0, 3)
            x = torch.randn(cfg.training.batch_size, 64, 8, 8)
            result = link.step(0, 3, x, torch.randint(0, 10, (cfg.training.batch_size,)))
            assert result.grad.shape == x.shape and torch.isfinite(result.grad).all()
            link.upload(DeviceReport(round=0, split=3, samples=cfg.training.batch_size), weights)
        finally:
            link.close()


def test_stalled_uploads_are_cut_off_and_hold_at_most_the_device_budget(tmp_path, server_process):
    cfg = stall_config(tmp_path)
    server = server_process(cfg)
    budget = device_budget(cfg)
    assert budget < 16 << 20  # VGG5 at batch 20: 2 x 3.5 MiB; far below what the stalls below try to hold
    bearer = token(cfg, "dev-a")
    path = UPDATE.format("dev-a")
    assert httpx.get(f"{server.url}/v1/status", headers={"Authorization": f"Bearer {bearer}"}).status_code == 200
    base = tree_rss(server.proc.pid)
    peak = [base]

    def sample() -> None:
        peak[0] = max(peak[0], tree_rss(server.proc.pid))

    # two bodies of half the budget each, all but their last byte sent: they hold it all
    half = budget // 2 - 4096
    holders = [StalledUpload(cfg.port, path, bearer, half, half - 1) for _ in range(2)]
    sample()
    # (ii) while they stall, the device's next bodies are refused at once: 429 for one that would
    # fit once they are done, 413 for one larger than the whole budget (the four 60 MiB bodies
    # wait for that answer before sending: no byte of them need reach the server)
    small = StalledUpload(cfg.port, path, bearer, 1 << 20, 1 << 20)
    unsized = StalledUpload(cfg.port, path, bearer, None, 60 << 20)
    # ... while another device's body is read as usual (and found not to be a bundle)
    other = StalledUpload(cfg.port, UPDATE.format("dev-b"), token(cfg, "dev-b"), 1 << 20, 1 << 20)
    huge = [StalledUpload(cfg.port, path, bearer, 61 << 20, 60 << 20, patient_s=10) for _ in range(4)]
    refused = [small, unsized, other, *huge]
    answers(refused, MARGIN_S, sample)
    assert small.status == 429 and "bodies in flight" in small.error, (small.status, small.error)
    assert small.headers.get("retry-after") == "1"
    # without a Content-Length a body is counted as it comes: refused when it passes what is left
    assert unsized.status in (413, 429) and "limits.buffered_mib_per_device" in unsized.error, (
        unsized.status, unsized.error)
    assert other.status == 400 and "not an ARES tensor bundle" in other.error, (other.status, other.error)
    for h in huge:
        assert h.status == 413 and f"budget of {budget} bytes" in h.error, (h.status, h.error)

    # (i) each stall is answered 408 once no byte came for body_read_timeout_s (or let go of)
    answers(holders, TIMEOUT_S + MARGIN_S, sample)
    for h in holders:
        waited = time.monotonic() - h.stalled_at
        assert h.status == 408 and "limits.body_read_timeout_s" in h.error or h.reset or h.closed, (h.status, h.error)
        assert waited <= TIMEOUT_S + MARGIN_S
    # (iii) while they stalled the server grew by at most the budget (and its own slack)
    assert peak[0] - base <= budget + RSS_SLACK, f"RSS grew {(peak[0] - base) >> 20} MiB; budget {budget >> 20} MiB"
    # their bytes were given back: a body of nearly the whole budget is read again (not 429)
    whole = StalledUpload(cfg.port, path, bearer, budget - 4096, budget - 4096)
    answers([whole], MARGIN_S)
    assert whole.status == 400 and "not an ARES tensor bundle" in whole.error, (whole.status, whole.error)
    for u in [*holders, *refused, whole]:
        u.close()

    # (iv) a normal round still works, for the device that stalled and for the other
    a_normal_round(server.url, cfg)
    status = httpx.get(f"{server.url}/healthz").json()
    assert status["round"] == 1, status


def test_every_one_of_many_stalled_connections_is_answered(tmp_path, server_process):
    """More stalled connections than a device may have requests: each is answered, 429 at once
    past `requests_per_device` and 408 after the timeout for the rest; none is left hanging."""
    cfg = stall_config(tmp_path, requests_per_device=8)
    server = server_process(cfg)
    bearer = token(cfg, "dev-a")
    stalls = [StalledUpload(cfg.port, UPDATE.format("dev-a"), bearer, 64 << 10, 32 << 10) for _ in range(20)]
    started = time.monotonic()
    answers(stalls, TIMEOUT_S + MARGIN_S)
    assert time.monotonic() - started <= TIMEOUT_S + MARGIN_S
    statuses = [s.status for s in stalls]
    assert set(statuses) <= {408, 429}, statuses
    assert statuses.count(408) >= cfg.limits.requests_per_device, statuses  # the ones it took, cut off
    for s in stalls:
        s.close()
    a_normal_round(server.url, cfg)
    assert httpx.get(f"{server.url}/healthz").json()["round"] == 1


@pytest.fixture(autouse=True)
def _no_server_errors(tmp_path):
    yield
    log = tmp_path / "server.log"
    if log.exists():
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
