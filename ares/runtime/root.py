"""The root of a job with server shards: round clock, global model, evaluation, checkpoints,
history, and the status and telemetry the controller reads, for devices that train at k shard
processes (ares.runtime.shard). No device session lives here.

Each shard beats every `POLL_S` (ares.runtime.shardproto): the root answers with the round,
its model's digest, its deadline and whether it has the shard's part of the round. A round
starts when a shard says one of its devices joined it; its deadline counts from then. A shard
sends its part of a round (its devices' records, then its running sum) when its devices are
all done, or when the root says the deadline passed (`closing`). The round closes:

- when every shard that holds devices has sent its part ("all devices done");
- after the deadline, once every shard heard from within `shard_wait_s` has sent its part, or
  `shard_wait_s` after the deadline at the latest ("deadline"). A shard that is down sends
  nothing: its devices miss the round, as a single server's devices that stopped do.

Merging the parts' running sums equals one server's FedAvg of every upload (ares.core.fedavg).
Everything a shard sends is checked before it is used: its token and index, the round, that
it speaks only of its own devices, each device's weight against its samples, and its sum's
names, dtypes, shapes, finiteness and distance from the global model.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass, field
from typing import Optional

import torch

from ares.core.config import ServerConfig
from ares.core.fedavg import RunningMean, update_norm
from ares.core.wire import Unacceptable
from ares.core.messages import ServerStatus
from ares.core.rounds import ClosedBy, DeviceRound
from ares.core.sharding import assign
from ares.runtime.shardproto import PartialMeta, RootClock, ShardBeat, ShardRecords, unpack_partial
from ares.runtime.training import (RoundClosed, RoundNotOpen, RoundOutcome, TrainingOver, TrainingServer, Unauthorized,
                                   UnknownDevice)

log = logging.getLogger("ares.root")


def _bad(message: str) -> Unacceptable:
    """A beat, records or running sum that does not describe the shard's own devices in the round at
    hand (a device of another shard, a weight beyond its samples, a sum of the wrong shape or too far
    from the global model, a sum before its records): well-formed, not usable (422)."""
    return Unacceptable(message)


@dataclass
class ShardSeat:
    """What the root knows of one shard."""

    index: int
    devices: tuple[str, ...]
    seen_at: Optional[float] = None        # root clock at its last beat
    counters: dict[str, int] = field(default_factory=dict)
    scale: float = 1.0                     # its live compute over its profile
    records: Optional[ShardRecords] = None  # its part of the current round, waiting for its sum
    started_at: Optional[float] = None     # its first join of the round, by the root's clock
    reported: bool = False                 # its part of the current round is merged


class _ShardScale:
    """The shards' mean compute scale, where the telemetry reads a single server's `LiveScale`."""

    def __init__(self, seats: list[ShardSeat]):
        self.seats = seats

    @property
    def factor(self) -> float:
        seen = [s.scale for s in self.seats if s.seen_at is not None]
        return sum(seen) / len(seen) if seen else 1.0


class RootServer(TrainingServer):
    def __init__(self, cfg: ServerConfig, tokens: dict[str, str], controller_token: Optional[str],
                 shard_token: str, **kwargs):
        super().__init__(cfg, tokens, controller_token, **kwargs)
        self.shard_token = shard_token
        assigned = assign(cfg.devices, cfg.shards, cfg.shard_pins)
        self.seats = [ShardSeat(i, devices) for i, devices in enumerate(assigned)]
        self.home = {d: seat.index for seat in self.seats for d in seat.devices}
        self.server_scale = _ShardScale(self.seats)
        self.closing_since: Optional[float] = None  # root clock when the round's deadline passed
        self._records: dict[str, DeviceRound] = {}
        self._joined: set[str] = set()
        log.info("root of %d shards: %s devices", cfg.shards, [len(s.devices) for s in self.seats])

    def shard_of(self, device: str) -> int:
        return self.home[device]

    # ----- who may ask ----------------------------------------------------------------------
    def check_device_token(self, device: str, token: Optional[str]) -> None:
        raise UnknownDevice(f"unknown device {device[:64]!r}: devices train at their shard, not at the root")

    def check_shard(self, index: int, token: Optional[str]) -> ShardSeat:
        if token is None or not hmac.compare_digest(token.encode(), self.shard_token.encode()):
            raise Unauthorized("this endpoint needs the shards' bearer token")
        if not 0 <= index < len(self.seats):  # answered as a name the job does not have (404)
            raise UnknownDevice(f"no shard {index}: this job has shards 0..{len(self.seats) - 1}")
        return self.seats[index]

    # ----- what shards send -----------------------------------------------------------------
    def beat(self, index: int, beat: ShardBeat) -> RootClock:
        """A shard's beat: note it, its devices' phases and whether the round has started; answer
        with the clock."""
        seat = self.seats[index]
        with self.changed:
            now = self.clock()
            seat.seen_at, seat.counters, seat.scale = now, dict(beat.counters), beat.server_scale
            if beat.synced and beat.round == self.round and self.phase in ("waiting", "training"):
                if beat.devices is not None:
                    strangers = sorted(set(beat.devices) - set(seat.devices))
                    if strangers:
                        raise _bad(f"shard {index} beats for devices it does not hold: {strangers[:3]}")
                    for name in seat.devices:
                        seen = beat.devices.get(name)
                        slot = self.slots[name]
                        slot.phase = seen.phase if seen else "idle"
                        if seen and seen.split is not None:
                            slot.split = seen.split
                if beat.joined and self.round_started is None:
                    self.round_started = now
                    self.phase = "training"
                    self.changed.notify_all()
            return self._clock(seat, now)

    def _clock(self, seat: ShardSeat, now: float) -> RootClock:
        deadline = None if self.round_started is None else self.round_started + self.cfg.round_deadline_s - now
        return RootClock(round=self.round, rounds=self.cfg.training.rounds, phase=self.phase,
                         opens_in_s=max(0.0, self.opens_at - now), deadline_in_s=deadline,
                         closing=self.closing_since is not None, reported=seat.reported,
                         model_sha256=self.model_sha256, failure=self.failure.message if self.failure else None,
                         failure_reason=self.failure.reason if self.failure else None)

    def model_for(self, index: int) -> tuple[int, str, dict[str, torch.Tensor]]:
        """The round's global model (never changed in place: a closed round makes a new one)."""
        with self.lock:
            return self.round, self.model_sha256, self._global_cpu

    def _check_round(self, round_index: int) -> None:
        if self.phase in ("finished", "failed"):
            raise TrainingOver(f"training is over (phase {self.phase})")
        if round_index < self.round:
            raise RoundClosed(f"round {round_index} is closed; the current round is {self.round}")
        if round_index > self.round:
            raise RoundNotOpen(f"round {round_index} is not open yet; the current round is {self.round}")

    def take_records(self, index: int, round_index: int, records: ShardRecords) -> None:
        """A shard's devices' part of the round; merged with the running sum that follows it."""
        seat = self.seats[index]
        if records.round != round_index:
            raise _bad(f"records for round {records.round} sent as round {round_index}")
        own = set(seat.devices)
        named = set(records.devices) | set(records.refused) | set(records.joined) | set(records.nonfinite)
        if named - own:
            raise _bad(f"shard {index} reports devices it does not hold: {sorted(named - own)[:3]}")
        if set(records.devices) & set(records.refused):
            raise _bad("a device both merged and refused")
        for name, d in records.devices.items():
            assigned = self.assigned[name]
            if d.report.round != round_index or d.report.split != d.split:
                raise _bad(f"device {name}: its report is for round {d.report.round} split "
                                     f"{d.report.split}, not round {round_index} split {d.split}")
            if d.report.samples > assigned or d.weight > max(1, d.report.samples):
                raise _bad(f"device {name}: weight {d.weight:g} and {d.report.samples} samples; it was "
                                     f"assigned {assigned} per round")
        with self.changed:
            self._check_round(round_index)
            if seat.reported:
                return  # a repeat of a part already merged
            seat.records = records
            seat.started_at = None if records.started_ago_s is None else self.clock() - records.started_ago_s

    def take_partial(self, index: int, round_index: int, meta: PartialMeta, tensors: dict[str, torch.Tensor]) -> bool:
        """A shard's running sum of the round, after its records; True when merged, False for a
        repeat of one already merged."""
        seat = self.seats[index]
        if meta.round != round_index:
            raise _bad(f"a running sum for round {meta.round} sent as round {round_index}")
        with self.lock:
            reference = self._global_cpu
        if meta.count:
            try:
                means, maxes = unpack_partial(tensors, reference)
            except ValueError as exc:
                raise _bad(f"shard {index}: {exc}") from None
            # each upload lies within max_update_norm of the global model (or was clipped to it),
            # so their weighted mean does too
            norm = update_norm(means, {k: v for k, v in reference.items() if k in means})
            bound = self.cfg.aggregation.max_update_norm
            if norm > bound * (1 + 1e-6):
                raise _bad(f"shard {index}: its mean lies {norm:.3g} from the global model, beyond the "
                                     f"bound {bound:.3g} every upload keeps")
        elif tensors:
            raise _bad("a running sum of no uploads holds no tensors")
        with self.changed:
            self._check_round(round_index)
            if seat.reported:
                return False
            records = seat.records
            if records is None or records.round != round_index:
                raise _bad(f"shard {index}: send round {round_index}'s records before its running sum")
            weights = sum(d.weight for d in records.devices.values())
            if meta.count != len(records.devices) or abs(meta.weight - weights) > 1e-9 * max(1.0, weights):
                raise _bad(f"shard {index}: a running sum of {meta.count} uploads weighing {meta.weight:g}, "
                                     f"but its records merge {len(records.devices)} weighing {weights:g}")
            if meta.count:
                assert isinstance(self._merge, RunningMean)  # shards > 1 only with a weighted mean (ServerConfig)
                self._merge.add_sum({k: v * meta.weight for k, v in means.items()}, maxes, meta.weight, meta.count)
            self._file(seat, records)
            seat.reported = True
            self._close_if_reported()
        return True

    def _file(self, seat: ShardSeat, records: ShardRecords) -> None:
        """A merged part's devices into the round's records and the status the root shows."""
        # a shard's offsets count from its first join; the round's from the first join anywhere
        shift = 0.0
        if seat.started_at is not None and self.round_started is not None:
            shift = seat.started_at - self.round_started
        for name, d in records.devices.items():
            self._records[name] = DeviceRound(
                split=d.split, samples=d.report.samples,
                joined_s=None if d.joined_s is None else d.joined_s + shift,
                uploaded_s=None if d.uploaded_s is None else d.uploaded_s + shift, **d.report.timings.model_dump())
            slot = self.slots[name]
            slot.round, slot.split, slot.report, slot.last_report = self.round, d.split, d.report, d.report
            slot.upload_bps, slot.weight, slot.phase = d.upload_bps, d.weight, "uploaded"
        for name in records.refused:
            self.slots[name].round, self.slots[name].phase = self.round, "refused"
        self._joined |= set(records.joined)
        self._nonfinite |= set(records.nonfinite)

    # ----- closing ----------------------------------------------------------------------------
    def _expected(self) -> list[ShardSeat]:
        return [s for s in self.seats if s.devices]

    def _close_if_reported(self) -> None:
        if all(s.reported for s in self._expected()):
            self._close_round("all devices done")
        elif self.closing_since is not None and self._live_reported(self.clock()):
            self._close_round("deadline")

    def _live_reported(self, now: float) -> bool:
        """Every shard heard from within `shard_wait_s` has sent its part."""
        return all(s.reported for s in self._expected()
                   if s.seen_at is not None and now - s.seen_at <= self.cfg.shard_wait_s)

    def tick(self) -> None:
        """At the deadline, shards are told to send what they have; the round closes when the
        live ones have, or `shard_wait_s` later. Never raises (as `TrainingServer.tick`)."""
        try:
            with self.changed:
                now = self.clock()
                if (self.phase == "training" and self.round_started is not None and self.closing_since is None
                        and now >= self.round_started + self.cfg.round_deadline_s):
                    self.closing_since = now
                    log.info("round %d: deadline; waiting up to %g s for the shards' parts", self.round,
                             self.cfg.shard_wait_s)
                if self.closing_since is not None and (self._live_reported(now)
                                                       or now >= self.closing_since + self.cfg.shard_wait_s):
                    self._close_round("deadline")
        except Exception:
            self._count("tick_errors")
            log.exception("round ticker: error while closing round %d", self.round)

    def _close_round(self, why: ClosedBy) -> None:
        closing = self.clock()
        missing = [s.index for s in self._expected() if not s.reported]
        if missing:
            log.warning("round %d closes without the parts of shards %s: their devices miss it", self.round, missing)
        outcome = RoundOutcome(merge=self._merge,
                               devices={d: self._records[d] for d in self.cfg.devices if d in self._records},
                               missed=[d for d in self.cfg.devices if d not in self._records],
                               joined=self._joined, nonfinite=self._nonfinite)
        for name, slot in self.slots.items():  # as a single server leaves its devices' phases
            if name in self._records or slot.phase == "refused":
                slot.phase = "idle"
            elif name in self._joined or slot.phase in ("training", "uploaded"):
                slot.phase = "missed"
        self._records, self._joined, self._nonfinite = {}, set(), set()
        for seat in self.seats:
            seat.records, seat.started_at, seat.reported = None, None, False
        self.closing_since = None
        self._conclude(outcome, why, closing)

    # ----- what the root shows ------------------------------------------------------------------
    def status(self) -> ServerStatus:
        """A single server's status, its counters added up over the root and its shards."""
        own = super().status()
        with self.lock:
            counters = dict(own.counters)
            for seat in self.seats:
                for name, value in seat.counters.items():
                    counters[name] = counters.get(name, 0) + value
        return own.model_copy(update={"counters": counters})
