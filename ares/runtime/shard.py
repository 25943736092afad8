"""A server shard: the device sessions of the devices ares.core.sharding assigns it, following
its root's rounds (ares.runtime.root).

To its devices a shard is the server: the same API, for its own devices only (any other gets
the answer an unknown device gets). It holds their replicas and the round's running sum of
their uploads. Its round clock and global model are the root's: a follower thread beats every
`POLL_S` (ares.runtime.shardproto), takes each new round's model over the wire (digest checked),
and sends the shard's part of a round (its devices' records, then its running sum) when its
devices are all done or the root says the deadline passed. A round the root closed without the
shard's part is dropped: its devices missed it. A shard keeps no checkpoint: restarted, it takes
the root's current round and its devices join it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Optional

import httpx
import torch

from ares.core import wire
from ares.core.config import ServerConfig
from ares.core.sharding import assign
from ares.runtime.shardproto import (POLL_S, DeviceOutcome, DeviceSeen, ModelMeta, PartialMeta, RootClock, ShardBeat,
                                     ShardRecords, pack_partial, partial_bytes)
from ares.runtime.tlsclient import ClientTls, explain, transport
from ares.runtime.training import RoundClosed, RoundOutcome, RunFailure, TrainingServer, model_digest

log = logging.getLogger("ares.shard")

BEAT_EVERY_S = 2.0  # a beat carries the devices' phases when they changed, and at least this often


@dataclass(frozen=True)
class RootAddress:
    """Where a shard finds its root, and how it trusts it (as a device trusts its server)."""

    index: int
    url: str
    ca_file: Optional[str] = None
    server_name: Optional[str] = None

    def tls(self) -> Optional[ClientTls]:
        if not self.url.startswith("https://"):
            return None
        return ClientTls(ca_file=self.ca_file, server_name=self.server_name)


@dataclass
class SealedRound:
    """The shard's part of a round, kept until the root's round moves on."""

    round: int
    records: Optional[ShardRecords]   # None: nothing to send (the root had the part already)
    tensors: dict[str, torch.Tensor]
    meta: Optional[PartialMeta]
    started_at: Optional[float]       # the shard's first join of the round, by its clock
    refused_by_root: Optional[str] = None  # the root refused it: not sent again


class ShardServer(TrainingServer):
    """A `TrainingServer` for one shard's devices whose rounds open and close as the root says."""

    evaluates = False  # the root evaluates: a shard keeps no test set

    def __init__(self, cfg: ServerConfig, index: int, tokens: dict[str, str], controller_token: Optional[str] = None,
                 **kwargs):
        if not 0 <= index < cfg.shards:
            raise ValueError(f"shard {index} is not one of this job's shards 0..{cfg.shards - 1}")
        self.index = index
        self.synced = False                      # holds the root's model of `round`
        self.sealed: Optional[SealedRound] = None  # this round's part, once its devices are done
        self.root_deadline: Optional[float] = None  # the root's deadline, by this shard's clock
        self.wake = threading.Event()            # the follower: send now
        self._last_seen: Optional[dict[str, DeviceSeen]] = None
        self._seen_sent = 0.0
        super().__init__(cfg, tokens, controller_token, devices=assign(cfg.devices, cfg.shards, cfg.shard_pins)[index],
                         **kwargs)
        self.opens_at = math.inf  # no joins until the root's round and model are here
        log.info("shard %d of %d: devices %s", index, cfg.shards, list(self.slots))

    # ----- what the root owns -----------------------------------------------------------------
    def _resume(self) -> None:
        """The root keeps the checkpoints: a shard starts empty and takes the root's round."""

    def _checkpoint(self) -> None:
        pass

    def tick(self) -> None:
        """The deadline is the root's: it says `closing` (`follow`)."""

    def _deadline_unix(self) -> float:
        own = super()._deadline_unix()
        return own if self.root_deadline is None else min(own, self.root_deadline)

    def _check_round_open(self, round_index: int) -> None:
        super()._check_round_open(round_index)
        if self.sealed is not None and self.sealed.round == round_index:
            raise RoundClosed(f"round {round_index} is closed at this shard: its part went to the root")

    def join_would_wait(self, round_index: int) -> bool:
        if self.sealed is not None and self.sealed.round == round_index:
            return False
        return super().join_would_wait(round_index)

    def _close_round(self, why) -> None:
        """Its devices are all done (or the root's deadline passed): seal the shard's part."""
        refused = sorted(s.name for s in self.slots.values() if s.round == self.round and s.phase == "refused")
        started = self.round_started
        outcome = self._seal()
        self.sealed = self._part(outcome, refused, started)
        self.opens_at = math.inf
        log.info("shard %d: round %d sealed (%s): %d of %d devices merged", self.index, self.round, why,
                 len(outcome.devices), len(self.slots))
        self.wake.set()
        self.changed.notify_all()

    def _part(self, outcome: RoundOutcome, refused: list[str], started: Optional[float]) -> SealedRound:
        merge = outcome.merge
        devices = {name: DeviceOutcome(split=rec.split, weight=self.slots[name].weight, joined_s=rec.joined_s,
                                       uploaded_s=rec.uploaded_s, upload_bps=self.slots[name].upload_bps,
                                       report=self.slots[name].report)
                   for name, rec in outcome.devices.items()}
        records = ShardRecords(round=self.round, devices=devices, refused=refused, joined=sorted(outcome.joined),
                               nonfinite=sorted(outcome.nonfinite & set(self.slots)))
        meta = PartialMeta(round=self.round, weight=merge.weight, count=merge.count)
        return SealedRound(round=self.round, records=records, tensors=pack_partial(merge), meta=meta, started_at=started)

    # ----- following the root -------------------------------------------------------------------
    def beat(self) -> ShardBeat:
        with self.lock:
            seen = {s.name: DeviceSeen(phase=s.phase, split=s.split) for s in self.slots.values() if s.phase != "idle"}
            now = time.monotonic()
            send = seen != self._last_seen or now - self._seen_sent >= BEAT_EVERY_S
            if send:
                self._last_seen, self._seen_sent = seen, now
            with self._counter_lock:
                counters = dict(list(self.counters.items())[:64])
            return ShardBeat(round=self.round, synced=self.synced, joined=self.round_started is not None,
                             devices=seen if send else None, counters=counters,
                             server_scale=min(max(self.server_scale.factor, 1e-3), 1e3))

    def needs_model(self, clock: RootClock) -> bool:
        return clock.phase not in ("finished", "failed") and (
            not self.synced or clock.round != self.round or clock.model_sha256 != self.model_sha256)

    def open_round(self, round_index: int, sha256: str, state: dict[str, torch.Tensor], opens_in_s: float,
                   reported: bool) -> None:
        """The root's round `round_index` with its global model: a round of ours that the root
        closed without our part is dropped (its devices missed it)."""
        like = self._global_cpu
        if state.keys() != like.keys() or any(state[k].dtype != v.dtype or state[k].shape != v.shape
                                              for k, v in like.items()):
            raise ValueError("the root's model is not this job's model (names, dtypes or shapes differ)")
        if model_digest(state) != sha256:
            raise ValueError("the root's model does not match its digest")
        with self.changed:
            if self.synced and self.sealed is None:
                self._seal()  # never sent: the root has gone on without it
            self.model.load_state_dict({k: v.to(self.torch_device) for k, v in state.items()})
            self._refresh_global()
            self._merge = self._new_merge()
            self.round, self.round_started, self.root_deadline = round_index, None, None
            self.phase = "waiting"
            self.sealed = SealedRound(round_index, None, {}, None, None) if reported else None
            self.opens_at = math.inf if reported else self.clock() + opens_in_s
            self.synced = True
            log.info("shard %d: round %d opens in %.2f s", self.index, round_index, opens_in_s)
            self.changed.notify_all()

    def follow(self, clock: RootClock) -> None:
        """The root's clock, for the round this shard holds: its deadline, its end, the run's end."""
        with self.changed:
            if clock.phase in ("finished", "failed"):
                if self.synced and self.sealed is None:
                    self._seal()
                self.round, self.phase, self.opens_at = clock.round, clock.phase, math.inf
                if clock.phase == "failed" and self.failure is None:
                    self.failure = RunFailure(clock.failure_reason or "diverged", clock.failure or "the run failed")
                self.changed.notify_all()
                return
            if not self.synced or clock.round != self.round:
                return
            if clock.deadline_in_s is not None:
                self.root_deadline = self.clock() + clock.deadline_in_s
            if clock.closing and self.sealed is None:
                self._close_round("deadline")

    def due(self, clock: RootClock) -> Optional[SealedRound]:
        """The part the root is waiting for, if this shard has it."""
        with self.lock:
            sealed = self.sealed
            if (sealed is None or sealed.records is None or sealed.refused_by_root or sealed.round != clock.round
                    or clock.reported or clock.phase in ("finished", "failed")):
                return None
            if sealed.started_at is not None:
                sealed.records = sealed.records.model_copy(
                    update={"started_ago_s": max(0.0, self.clock() - sealed.started_at)})
            return sealed


class RootError(Exception):
    """The root refused a request (`status` its HTTP status), or could not be reached (status 503)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


class RootLink:
    """The shard's HTTP/2 client to its root (the transport and TLS a device uses for its server)."""

    def __init__(self, address: RootAddress, token: str, like: dict[str, torch.Tensor], timeout_s: float = 60.0):
        self.index = address.index
        self.client = httpx.Client(base_url=address.url.rstrip("/"),
                                   transport=transport(address.tls(), http1=False, http2=True),
                                   timeout=httpx.Timeout(timeout_s, connect=10.0),
                                   headers={"Authorization": f"Bearer {token}"})
        self.model_limit = partial_bytes(like) + wire.MAX_HEADER + 8

    def _call(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.client.request(method, f"/v1/shards/{self.index}{path}", **kwargs)
        except httpx.HTTPError as exc:  # a TLS refusal says why (a wrong CA or name: fix the Secret, not the network)
            raise RootError(503, f"root unreachable: {explain(exc) or f'{exc.__class__.__name__}: {exc}'}") from None
        if response.status_code >= 400:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text[:200]
            raise RootError(response.status_code, str(message))
        return response

    def beat(self, beat: ShardBeat) -> RootClock:
        response = self._call("POST", "/beat", content=beat.model_dump_json(),
                              headers={"Content-Type": "application/json"})
        return RootClock.model_validate(wire.parse_json(response.content, "root clock"))

    def model(self) -> tuple[ModelMeta, dict[str, torch.Tensor]]:
        """The root's global model, validated as any bundle (ares.core.wire); never unpickled."""
        bundle = wire.decode(bytearray(self._call("GET", "/model").content), self.model_limit)
        return ModelMeta.model_validate(bundle.meta), bundle.tensors

    def send(self, part: SealedRound) -> None:
        """The records, then the running sum, of a round."""
        self._call("PUT", f"/rounds/{part.round}/records", content=part.records.model_dump_json(),
                   headers={"Content-Type": "application/json"})
        total, chunks = wire.encode_chunks(part.tensors, part.meta.model_dump(mode="json"))
        self._call("POST", f"/rounds/{part.round}/partial", content=chunks,
                   headers={"Content-Length": str(total), "Content-Type": "application/x-ares-bundle"})

    def close(self) -> None:
        self.client.close()


class ShardFollower:
    """Keeps a shard in step with its root, in a thread of its own: beat, take a new round's model,
    send a sealed round's part; at once when the shard seals, else every `poll_s`."""

    def __init__(self, server: ShardServer, root: RootLink, poll_s: float = POLL_S):
        self.server, self.root, self.poll_s = server, root, poll_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._unreachable_since: Optional[float] = None

    def start(self) -> "ShardFollower":
        self._thread = threading.Thread(target=self._run, name=f"ares-shard-{self.server.index}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.server.wake.set()
        if self._thread is not None:
            self._thread.join(10)
        self.root.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
                if self._unreachable_since is not None:
                    log.info("shard %d: the root answers again", self.server.index)
                    self._unreachable_since = None
            except RootError as exc:
                if exc.status != 503:
                    log.warning("shard %d: the root refused: %s", self.server.index, exc)
                elif self._unreachable_since is None:
                    self._unreachable_since = time.monotonic()
                    log.warning("shard %d: %s; retrying", self.server.index, exc.message)
            except Exception:
                self.server._count("follower_errors")
                log.exception("shard %d: following the root failed; retrying", self.server.index)
            self.server.wake.wait(self.poll_s)
            self.server.wake.clear()

    def step(self) -> None:
        """One beat, and what its answer calls for."""
        server = self.server
        clock = self.root.beat(server.beat())
        if server.needs_model(clock):
            meta, state = self.root.model()
            current = meta.round == clock.round
            server.open_round(meta.round, meta.model_sha256, state, clock.opens_in_s if current else 0.0,
                              reported=current and clock.reported)
            clock = self.root.beat(server.beat())
        server.follow(clock)
        part = server.due(clock)
        if part is not None:
            try:
                self.root.send(part)
                log.info("shard %d: round %d's part sent (%d uploads)", server.index, part.round, part.meta.count)
            except RootError as exc:
                if exc.status in (400, 413, 422):  # it will not be taken as it is: not sent again
                    part.refused_by_root = exc.message
                    server._count("parts_refused")
                    log.error("shard %d: the root refused round %d's part: %s", server.index, part.round, exc.message)
                else:
                    raise
