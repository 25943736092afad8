"""Emulated devices for bench/load.py: many per process, each the real device's HTTP/2 client, no torch.

    python bench/load_devices.py SPEC.json RESULT.json

Each device is a thread with its own `httpx.Client` over the devices' own transport
(`ares.runtime.tlsclient.transport(None, http1=False, http2=True)`: ares.runtime.h2client's
large-frame HTTP/2, one connection per device). `ares.runtime.link.HttpLink` itself is not used
because it imports torch at module level (its tensors in, tensors out); what it does on the wire
is done here the same way: JSON join, bundles streamed in 1 MiB chunks (`link.UNPACED_CHUNK`)
with a Content-Length, replies read to their end, refusals (status >= 400) are errors.

Each round a device does what `ares.runtime.device.Device` does: waits on `GET /v1/round` (a
long poll of up to `wait_s`; `poll_s` between early answers) until the round takes joins, joins
with its split, sends its steps, uploads. The bodies come pre-encoded by the parent with the real encoder (`ares.core.wire.encode`): one step body
(activations and labels for the split and batch) and one upload body per round (the global
model's device-side weights and the round's `DeviceReport`). Replies are checked without torch:
the bundle's magic and JSON header (the join's `JoinReply` and tensor list, the step's `grad`).

The result (JSON) holds every step's latency as the device saw it, per round the times (this
machine's CLOCK_MONOTONIC, shared by every process: `time.monotonic()`) of the first device that
saw the round open, the first join answered, the last upload sent and answered, the errors,
the polls and this process's CPU. A progress file is rewritten every second.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from ares.core.messages import JoinReply, JoinRequest, RoundState  # noqa: E402  (pydantic, no torch)
from ares.runtime.tlsclient import transport  # noqa: E402  (httpx and jh2, no torch)

CHUNK = 1 << 20  # ares.runtime.link.UNPACED_CHUNK: a request body's chunk on an uncapped link
MAGIC = b"ARW1"  # ares.core.wire.MAGIC
BUNDLE = "application/x-ares-bundle"


class DeviceError(Exception):
    """A refusal, a broken reply or a dropped connection: the device stops (the bench counts it)."""


def bundle_header(body: bytes | bytearray) -> dict:
    """The JSON header of a tensor bundle (ares.core.wire's format), read without torch."""
    if len(body) < 8 or bytes(body[:4]) != MAGIC:
        raise DeviceError(f"reply is not a tensor bundle ({len(body)} bytes)")
    (hlen,) = struct.unpack("<I", body[4:8])
    if 8 + hlen > len(body):
        raise DeviceError("bundle header runs past the body")
    return json.loads(bytes(body[8:8 + hlen]))


def tensor_list(header: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(t["name"], t["dtype"], tuple(t["shape"])) for t in header["tensors"]]


@dataclass
class Tally:
    """What one process's devices measured; one lock for all of them (appends are rare enough)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    steps: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    rounds: dict[int, dict[str, float]] = field(default_factory=dict)
    joins: int = 0
    uploads: int = 0
    polls: int = 0
    finished: int = 0

    def note(self, r: int, key: str, t: float, pick=max) -> None:
        with self.lock:
            entry = self.rounds.setdefault(r, {})
            entry[key] = pick(entry[key], t) if key in entry else t


class EmulatedDevice:
    def __init__(self, spec: dict, device: dict, bodies: "Bodies", tally: Tally):
        self.name, self.spec, self.bodies, self.tally = device["name"], spec, bodies, tally
        self.split = spec["split"]
        self.client = httpx.Client(base_url=device["url"], transport=transport(None, http1=False, http2=True),
                                   timeout=httpx.Timeout(spec["timeout_s"], connect=10.0),
                                   headers={"Authorization": f"Bearer {device['token']}"})

    def _send(self, method: str, path: str, body: bytes, kind: str, params: Optional[dict] = None) -> bytearray:
        def chunks() -> Iterator[memoryview]:
            view = memoryview(body)
            for start in range(0, len(view), CHUNK):
                yield view[start:start + CHUNK]

        request = self.client.build_request(method, path, params=params, content=chunks(),
                                            headers={"Content-Length": str(len(body)), "Content-Type": kind})
        response = self.client.send(request, stream=True)
        try:
            reply = bytearray()
            for piece in response.iter_bytes():
                reply += piece
        finally:
            response.close()
        if response.status_code >= 400:
            raise DeviceError(f"{method} {path}: {response.status_code} {bytes(reply[:300]).decode(errors='replace')}")
        return reply

    def wait_for_round(self, r: int) -> float:
        """Wait as a device does until round `r` takes joins (a long poll: the server answers when
        it opens, at most `wait_s` later); the time it was seen open."""
        deadline = time.monotonic() + self.spec["timeout_s"]
        while True:
            asked = time.monotonic()
            wait = max(0.0, min(self.spec["wait_s"], deadline - asked))
            response = self.client.get("/v1/round", params={"round": r, "wait": wait} if wait > 0 else {})
            seen = time.monotonic()
            with self.tally.lock:
                self.tally.polls += 1
            if response.status_code != 200:
                raise DeviceError(f"GET /v1/round: {response.status_code} {response.text[:300]}")
            state = RoundState.model_validate_json(response.content)
            if state.round > r or state.phase in ("finished", "failed"):
                raise DeviceError(f"waiting for round {r}, the server is at round {state.round} ({state.phase})")
            if state.round == r and state.accepting:
                return seen
            if seen > deadline:
                raise DeviceError(f"round {r} did not open within {self.spec['timeout_s']:.0f} s")
            if seen - asked < self.spec["poll_s"]:  # answered early, still closed: not a long poll
                time.sleep(self.spec["poll_s"])

    def join(self, r: int) -> None:
        body = JoinRequest(round=r, split=self.split).model_dump_json().encode()
        reply = self._send("POST", f"/v1/devices/{self.name}/join", body, "application/json")
        header = bundle_header(reply)
        got = JoinReply.model_validate(header["meta"])
        if got.round != r or got.split != self.split:
            raise DeviceError(f"join answered round {got.round} split {got.split}, asked {r} and {self.split}")
        if tensor_list(header) != self.bodies.upload_tensors:  # what it uploads must be what it was given
            raise DeviceError(f"join's weights {tensor_list(header)[:3]}... differ from the upload's")

    def step(self, r: int) -> float:
        t0 = time.perf_counter()
        reply = self._send("POST", f"/v1/devices/{self.name}/step", self.bodies.step, BUNDLE,
                           params={"round": r, "split": self.split})
        elapsed = time.perf_counter() - t0
        header = bundle_header(reply)
        if [t[0] for t in tensor_list(header)] != ["grad"] or "loss" not in header.get("meta", {}):
            raise DeviceError(f"step reply holds {tensor_list(header)}")
        return elapsed

    def upload(self, r: int) -> None:
        reply = self._send("POST", f"/v1/devices/{self.name}/update", self.bodies.uploads[r], BUNDLE)
        answer = json.loads(bytes(reply))
        if not answer.get("ok") or answer.get("round") != r:
            raise DeviceError(f"upload answered {answer}")

    def run(self) -> None:
        tally = self.tally
        try:
            for r in range(self.spec["rounds"]):
                tally.note(r, "open_seen", self.wait_for_round(r), min)
                self.join(r)
                tally.note(r, "first_join", time.monotonic(), min)
                with tally.lock:
                    tally.joins += 1
                for _ in range(self.spec["steps"]):
                    elapsed = self.step(r)
                    with tally.lock:
                        tally.steps.append(elapsed)
                tally.note(r, "last_upload_sent", time.monotonic())
                self.upload(r)
                tally.note(r, "last_upload_done", time.monotonic())
                with tally.lock:
                    tally.uploads += 1
        except (DeviceError, httpx.HTTPError, OSError, ValueError) as exc:
            with tally.lock:
                tally.errors.append(f"{self.name}: {exc.__class__.__name__}: {str(exc)[:500]}")
        finally:
            self.client.close()
            with tally.lock:
                tally.finished += 1


@dataclass
class Bodies:
    step: bytes
    uploads: list[bytes]
    upload_tensors: list[tuple[str, str, tuple[int, ...]]]

    @classmethod
    def read(cls, spec: dict) -> "Bodies":
        uploads = [Path(p).read_bytes() for p in spec["bodies"]["uploads"]]
        return cls(Path(spec["bodies"]["step"]).read_bytes(), uploads, tensor_list(bundle_header(uploads[0])))


def write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(data))
    os.replace(tmp, path)


def main(spec_path: str, result_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    bodies = Bodies.read(spec)
    tally = Tally()
    threading.stack_size(512 << 10)  # hundreds of threads: a small stack each is plenty
    devices = [EmulatedDevice(spec, d, bodies, tally) for d in spec["devices"]]
    threads = [threading.Thread(target=d.run, name=d.name, daemon=True) for d in devices]
    for t in threads:
        t.start()

    def progress() -> dict:
        with tally.lock:
            return {"joins": tally.joins, "steps": len(tally.steps), "uploads": tally.uploads,
                    "errors": len(tally.errors), "finished": tally.finished, "polls": tally.polls}

    while any(t.is_alive() for t in threads):
        write_json(spec["progress"], progress())
        for t in threads:
            t.join(timeout=1.0)
            if t.is_alive():
                break
    usage = resource.getrusage(resource.RUSAGE_SELF)
    write_json(spec["progress"], progress())
    write_json(result_path, {
        **progress(), "step_s": tally.steps, "error_list": tally.errors,
        "rounds": {str(r): v for r, v in tally.rounds.items()}, "cpu_s": usage.ru_utime + usage.ru_stime,
        "torch_loaded": "torch" in sys.modules})
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
