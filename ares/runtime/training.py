"""The edge server's training state: rounds, per-device server-side replicas, FedAvg.

No HTTP here: `ares.runtime.server` adapts this to FastAPI and the in-process link calls it
directly, so the round logic is tested once and used twice. Methods are called from worker
threads; one lock guards round state, and each device's replica has its own lock so devices
compute in parallel.

Round lifecycle: devices join round r with their split and get the global model's device-side
weights; they send steps (activations in, gradient out); they upload their device-side weights
with their sample count and timings. The round closes when every configured device has
uploaded, or when the deadline (counted from the first join) passes: then whoever uploaded is
averaged (FedAvg of whole models, weighted by samples), the model is evaluated, checkpointed,
and round r+1 opens. Each closed round is kept as a `RoundRecord` (ares.core.rounds). An
accepted upload is folded into the round's merge at once (`ares.core.fedavg.merger`: a running
weighted sum for FedAvg, O(model) memory) and not kept.

Closing a round is two halves: `_seal` ends it for this server's devices (who uploaded, who
missed it, their records) and `_conclude` merges, evaluates, checkpoints and opens the next
one. A job with server shards splits them: a shard (ares.runtime.shard) seals its devices'
part and sends it to the root; the root (ares.runtime.root) concludes from every shard's part.

What the server does not take it refuses with an exception whose type says what went wrong
(`Refusal` and its kinds: `UnknownDevice`, `Unauthorized`, `RoundClosed`, `TrainingOver`,
`WrongSplit`, `BadTensor`, ...). They carry no HTTP status: the HTTP edge maps each kind to
one (`ares.runtime.server.STATUS`). A failed run is a `RunFailure` whose `reason` is what the
server's status reports as `failure_reason`.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ares.core.config import ServerConfig
from ares.core.data import DataSplit, load_data, partition, server_part
from ares.core.fedavg import Merge, clip_update, merger, update_norm
from ares.core.messages import (MIN_UPLOAD_SAMPLE_BYTES, DeviceReport, DeviceStatus, DeviceTelemetry, FailureReason,
                                JoinReply, RoundState, ServerStatus, Telemetry)
from ares.core.models import (LayerStack, activation_numel, activation_shapes, build_model, check_split,
                              model_spec, n_layers, split_model, weight_bytes)
from ares.core.rounds import ClosedBy, DeviceRound, RoundRecord, parse_history, recent_sessions, round_overhead
from ares.core.sgd import Momentum, MomentumSGD
from ares.runtime.profiler import LiveScale, server_profile, time_layers

log = logging.getLogger("ares.server")


DIVERGED_ROUNDS = 2  # rounds in a row with only non-finite losses before a run is called diverged


# ---- what the training server refuses, by kind -------------------------------------------------
# The server's HTTP edge answers each kind with its status (`ares.runtime.server.STATUS`); here
# they are only names for what went wrong.

class Refusal(Exception):
    """A request the training server does not take; its message says why."""


class Unauthorized(Refusal):
    """No bearer token, or not the one this request needs."""


class UnknownDevice(Refusal):
    """A device name the job does not have (the message never lists the job's devices)."""


class TrainingOver(Refusal):
    """Every round has been trained: there is nothing left to join."""


class TrainingFailed(TrainingOver):
    """The run has failed (`RunFailure`): no more rounds."""

    def __init__(self, failure: "RunFailure"):
        super().__init__(failure.message)
        self.failure = failure


class RoundClosed(Refusal):
    """The round asked for has closed (before the request, or while it waited)."""


class RoundNotOpen(Refusal):
    """The round asked for does not take joins yet (a later round, or the gap after a round)."""


class NotJoined(Refusal):
    """A step or upload from a device that has not joined the round."""


class AlreadyFinished(Refusal):
    """The device is done with the round: its upload was taken, or refused (it sits the round out)."""


class ConflictingUpload(Refusal):
    """A second, different upload for a round whose upload was taken: the first stands."""


class OutOfTurn(Refusal):
    """A micro-batch that is not the one the server takes next."""


class TurnTimeout(Refusal):
    """A micro-batch that waited too long for the ones before it."""


class WrongSplit(Refusal):
    """A split point out of range, or not the one the device joined with."""


class BadMicroBatch(Refusal):
    """Micro-batch numbers that do not describe one part of one batch."""


class BadTensor(Refusal):
    """Activations, labels or weights of the wrong rank, shape, dtype or range for their split."""


class UnsafeUpdate(Refusal):
    """A well-formed step or upload refused for what it would do to the model (non-finite values,
    more samples than assigned, an update beyond its bound); counted in `counters`."""


@dataclass(frozen=True)
class RunFailure:
    """Why a run failed; `reason` is what `ServerStatus.failure_reason` says on the wire."""

    reason: FailureReason
    message: str


@dataclass
class DeviceSlot:
    """Everything the server holds for one device."""

    name: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    round: Optional[int] = None         # round joined
    split: Optional[int] = None
    replica: Optional[LayerStack] = None  # server-side layers split+1..L-1
    optimizer: Optional[MomentumSGD] = None
    uploaded: bool = False              # its upload for `round` is taken (folded into the round's merge)
    report: Optional[DeviceReport] = None
    last_report: Optional[DeviceReport] = None
    upload_bps: Optional[float] = None  # the server's figure for the link of the upload that brought it
    phase: str = "idle"
    steps: int = 0
    samples_seen: int = 0               # samples the server stepped on for this device this round
    weight: float = 0.0                 # its weight in the merge, set when its upload is accepted
    micro_next: int = 0                 # the micro-batch of the current batch the server takes next
    joined_at: Optional[float] = None   # server clock at its join and at its accepted upload this round
    uploaded_at: Optional[float] = None
    accepted: Optional[tuple[int, str]] = None  # (round, digest) of its last accepted upload; kept past the round
    micro_turn: threading.Condition = field(init=False)  # waits for micro_next, on `lock`

    def __post_init__(self) -> None:
        self.micro_turn = threading.Condition(self.lock)


@dataclass
class RoundOutcome:
    """A round as one server saw it when it ended: the merge its accepted uploads were folded
    into, the record of each device that was merged, the devices that were not, and who joined
    it and whose loss turned non-finite (for the divergence check)."""

    merge: Merge
    devices: dict[str, DeviceRound]
    missed: list[str]
    joined: set[str]
    nonfinite: set[str]


def _offset(at: Optional[float], start: float) -> Optional[float]:
    return None if at is None else at - start


def upload_rate(received: Optional[tuple[int, float]]) -> Optional[float]:
    """An upload's link as the server saw it, in bytes per second: none for a body too small to
    time here (`MIN_UPLOAD_SAMPLE_BYTES`)."""
    if received is None:
        return None
    nbytes, seconds = received
    return nbytes / seconds if nbytes >= MIN_UPLOAD_SAMPLE_BYTES and seconds > 0 else None


class TrainingServer:
    evaluates = True  # it evaluates the global model after each round (a shard does not: its root does)

    def __init__(self, cfg: ServerConfig, tokens: dict[str, str], controller_token: Optional[str] = None,
                 data: Optional[DataSplit] = None, device: str = "cpu", profile: bool = True,
                 clock: Callable[[], float] = time.time, devices: Optional[Sequence[str]] = None):
        """`devices`: those this server holds sessions for (a shard's); default: every device of the job."""
        devices = tuple(cfg.devices if devices is None else devices)
        missing = [d for d in devices if d not in tokens]
        if missing:
            raise ValueError(f"no token for devices {missing} (expected files in {cfg.tokens_dir})")
        self.cfg = cfg
        self.tokens = dict(tokens)
        self.controller_token = controller_token
        # who holds a token, by its digest: a poll from any of a thousand devices is one lookup
        self._token_owners = {_digest(secret): name for name, secret in self.tokens.items()}
        self.clock = clock
        self.torch_device = torch.device(device)
        self.spec = model_spec(cfg.model)
        self.model = build_model(cfg.model, seed=cfg.training.seed).to(self.torch_device)
        self.layers = n_layers(self.model)
        self.shapes = activation_shapes(cfg.model)
        self.data = server_part(data if data is not None else load_data(cfg.data), test=self.evaluates)
        self.slots = {name: DeviceSlot(name) for name in devices}
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.round = 0
        self.phase = "waiting"
        self.round_started: Optional[float] = None
        self.opens_at = 0.0  # clock time from which the current round takes joins
        self.history: list[RoundRecord] = []
        # Divergence: devices whose steps were refused this round for a non-finite
        # loss or gradient; DIVERGED_ROUNDS rounds in a row in which every device that joined
        # was among them end the run: phase failed, failure_reason diverged.
        self._nonfinite: set[str] = set()
        self._diverging = 0
        self.failure: Optional[RunFailure] = None
        self.server_scale = LiveScale()
        self.server_prof = None
        self.counters: dict[str, int] = {}  # refusals and errors: status, metrics
        self._counter_lock = threading.Lock()
        self.assigned = self._assigned_samples()
        self._resume()
        self._refresh_global()
        self._merge = self._new_merge()
        if profile:
            times = time_layers(self.model, self.spec.input_shape, cfg.training.batch_size, self.torch_device, repeats=2)
            self.server_prof = server_profile(times)
        if self.round >= cfg.training.rounds:
            self.phase = "finished"

    # ----- authentication -------------------------------------------------------------------
    def check_device_token(self, device: str, token: Optional[str]) -> None:
        if device not in self.slots:
            raise UnknownDevice(f"unknown device {device[:64]!r}")  # never list the job's devices
        if token is None or not hmac.compare_digest(token.encode(), self.tokens[device].encode()):
            raise Unauthorized("missing or wrong bearer token for this device")

    def check_any_token(self, token: Optional[str]) -> str:
        """Status, config and the round may be read by any device or the controller; returns who
        asked. One lookup by the token's digest (the time it takes says nothing of the secrets)."""
        if token is not None:
            if self.controller_token and hmac.compare_digest(token.encode(), self.controller_token.encode()):
                return "controller"
            name = self._token_owners.get(_digest(token))
            if name is not None and hmac.compare_digest(token.encode(), self.tokens[name].encode()):
                return name
        raise Unauthorized("missing or unknown bearer token")

    def check_controller_token(self, token: Optional[str]) -> None:
        if not self.controller_token or token is None or not hmac.compare_digest(
                token.encode(), self.controller_token.encode()):
            raise Unauthorized("this endpoint needs the controller's bearer token")

    # ----- round lifecycle ------------------------------------------------------------------
    def join(self, device: str, round_index: int, split: int, wait_s: float = 0.0) -> tuple[JoinReply, dict[str, torch.Tensor]]:
        """Start a round for a device; waits up to wait_s for the round to open."""
        _check_split(split, self.layers)
        deadline = time.monotonic() + wait_s
        with self.changed:
            while self.phase != "finished" and time.monotonic() < deadline and (
                    round_index > self.round or (round_index == self.round and not self._accepting())):
                wait = deadline - time.monotonic()
                if round_index == self.round:
                    wait = min(wait, self.opens_at - self.clock())
                self.changed.wait(timeout=max(0.01, wait))
            self._check_round_open(round_index)
            if not self._accepting():
                raise RoundNotOpen(f"round {round_index} opens in {self.opens_at - self.clock():.1f} s")
            slot = self.slots[device]
            if slot.round == round_index and (slot.uploaded or slot.phase == "refused"):
                raise AlreadyFinished(f"device {device} already finished round {round_index}")
            if self.round_started is None:
                self.round_started = self.clock()
            self.phase = "training"
            lr = self.cfg.training.lr_for_round(round_index)
            device_part, server_part = split_model(self.model, split)
            slot.round, slot.split, slot.uploaded, slot.report, slot.phase, slot.steps = (
                round_index, split, False, None, "training", 0)
            slot.micro_next = 0
            slot.samples_seen, slot.weight = 0, 0.0
            slot.joined_at, slot.uploaded_at = self.clock(), None
            slot.replica = copy.deepcopy(server_part).train()
            params = list(slot.replica.parameters())
            slot.optimizer = MomentumSGD(params, lr=lr, momentum=self.cfg.training.momentum) if params else None
            weights = {f"layers.{k}": v.detach().cpu().clone() for k, v in device_part.layers.state_dict().items()}
            reply = JoinReply(round=round_index, split=split, lr=lr, momentum=self.cfg.training.momentum,
                              batch_size=self.cfg.training.batch_size, max_steps=self.cfg.training.max_steps_per_round,
                              deadline_unix=self._deadline_unix())
            self.changed.notify_all()
            return reply, weights

    def _deadline_unix(self) -> float:
        """When the round in progress closes, by this server's clock (its first join + the deadline)."""
        return self.round_started + self.cfg.round_deadline_s

    def join_would_wait(self, round_index: int) -> bool:
        """Whether `join` would wait for this round to open (read without the lock: the server's
        route polls it on the event loop, and `join` checks again under the lock)."""
        return self.phase != "finished" and (
            round_index > self.round or (round_index == self.round and not self._accepting()))

    def _accepting(self) -> bool:
        return self.phase != "finished" and self.clock() >= self.opens_at

    def note_nonfinite(self, device: str) -> None:
        """A device's step carried non-finite activations: its side of the model diverged."""
        if device in self.slots:
            self._nonfinite.add(device)

    def _judge_divergence(self, joined: set[str], nonfinite: set[str]) -> None:
        """At the close of a round: did every device that joined it see a non-finite loss?"""
        self._diverging = self._diverging + 1 if joined and joined <= nonfinite else 0
        if self._diverging >= DIVERGED_ROUNDS and self.failure is None:
            self.failure = RunFailure("diverged", f"training diverged: every device's loss was non-finite in rounds "
                                      f"{self.round - DIVERGED_ROUNDS + 1}..{self.round} "
                                      f"(lr {self.cfg.training.lr} too high?)")
            log.error("%s; stopping", self.failure.message)

    def _check_round_open(self, round_index: int) -> None:
        if self.failure is not None:
            raise TrainingFailed(self.failure)
        if self.phase == "finished":
            raise TrainingOver(f"training finished after {self.cfg.training.rounds} rounds")
        if round_index < self.round:
            raise RoundClosed(f"round {round_index} is closed; the current round is {self.round}")
        if round_index > self.round:
            raise RoundNotOpen(f"round {round_index} is not open yet; the current round is {self.round}")

    def _active_slot(self, device: str, round_index: int, split: int) -> DeviceSlot:
        with self.lock:
            self._check_round_open(round_index)
            slot = self.slots[device]
            if slot.round != round_index or slot.replica is None:
                raise NotJoined(f"device {device} has not joined round {round_index}")
            if slot.uploaded:
                raise AlreadyFinished(f"device {device} already uploaded its weights for round {round_index}")
            if slot.phase == "refused":
                raise AlreadyFinished(f"device {device}'s upload for round {round_index} was refused; it sits the round out")
            if split != slot.split:
                raise WrongSplit(f"step carries split {split} but the device joined with split {slot.split}")
            return slot

    def step(self, device: str, round_index: int, split: int, x: torch.Tensor, y: torch.Tensor,
             micro: int = 0, micros: int = 1, total: Optional[int] = None,
             wait_s: float = 60.0) -> tuple[torch.Tensor, float, float]:
        """One server-side training step: returns (gradient of x, loss, server compute seconds).

        A batch may come as `micros` micro-batches (index `micro`, `total` samples in the whole
        batch), sent concurrently: they are taken strictly in order (a later one waits up to
        `wait_s` for its turn), gradients accumulate with each loss weighted by its share of the
        batch, and the optimiser steps once, after the last. `micros = 1` is the plain step.
        """
        self.check_step_tensors(split, x, y)
        total = x.shape[0] if total is None else total
        if not (1 <= micros <= 64 and 0 <= micro < micros and micros <= total <= self.cfg.training.batch_size):
            raise BadMicroBatch(f"micro-batch {micro} of {micros} with {total} samples in the batch: need "
                                f"1 <= micros <= 64, 0 <= micro < micros <= total <= {self.cfg.training.batch_size}")
        if micros == 1 and total != x.shape[0]:
            raise BadMicroBatch(f"a single-part batch has {x.shape[0]} samples, not total={total}")
        if x.shape[0] > total - (micros - 1):
            raise BadMicroBatch(f"micro-batch of {x.shape[0]} samples cannot be one of {micros} parts of {total}")
        slot = self._active_slot(device, round_index, split)
        with slot.micro_turn:
            if micros > 1 and not slot.micro_turn.wait_for(lambda: slot.micro_next >= micro, timeout=wait_s):
                raise TurnTimeout(f"micro-batch {micro} waited {wait_s:.0f} s for micro-batch {slot.micro_next}")
            if slot.micro_next != micro:
                raise OutOfTurn(f"micro-batch {micro} arrived but the server expects micro-batch {slot.micro_next}")
            if slot.replica is None or slot.round != round_index:
                raise RoundClosed(f"round {round_index} closed while micro-batch {micro} waited")
            saved = _snapshot(slot.replica, slot.optimizer)  # a refused step leaves the replica as it was
            t0 = time.perf_counter()
            x = x.to(self.torch_device, torch.float32).detach().requires_grad_(True)
            out = slot.replica(x)
            loss = nn.functional.cross_entropy(out, y.to(self.torch_device))
            if not bool(torch.isfinite(loss)):
                _restore(slot.replica, slot.optimizer, saved)
                self._nonfinite.add(device)
                raise self._refused("steps_refused", device, "the loss on these activations is not finite")
            if slot.optimizer is not None and micro == 0:
                slot.optimizer.zero_grad()
            # each part's mean loss weighted by its share: the accumulated gradient is the batch's
            (loss * (x.shape[0] / total) if micros > 1 else loss).backward()
            last = micro == micros - 1
            if slot.optimizer is not None and last:
                slot.optimizer.step()
            grad = x.grad.detach()
            if not (bool(torch.isfinite(grad).all()) and _finite(slot.replica)):
                _restore(slot.replica, slot.optimizer, saved)
                self._nonfinite.add(device)
                raise self._refused("steps_refused", device, "this step would make the server-side model "
                                    "non-finite (activations too large?)")
            if self.torch_device.type == "cuda":
                torch.cuda.synchronize(self.torch_device)
            elapsed = time.perf_counter() - t0
            slot.micro_next = 0 if last else micro + 1
            slot.steps += int(last)
            slot.samples_seen += x.shape[0]
            slot.micro_turn.notify_all()
        if self.server_prof is not None:
            profiled = self.server_prof.fwd[split] + self.server_prof.bwd[split]
            self.server_scale.update(profiled * x.shape[0] / self.server_prof.batch_size, elapsed)
        return grad.cpu(), float(loss.detach()), elapsed

    def activation_shape(self, split: int) -> tuple[int, ...]:
        """Per-sample shape of the activations a step at `split` carries (`WrongSplit` for a split out of
        range, or the local split, which has no server step)."""
        _check_split(split, self.layers)
        if split == self.layers - 1:
            raise WrongSplit("split point L-1 keeps every layer on the device: there is no server step")
        return self.shapes[split]

    def check_step_tensors(self, split: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """A step's activations and labels against its split, before either is used: x of rank
        1 + the activations' rank with this split's shape and 1..batch_size samples, y one int64
        label in 0..classes-1 per sample. The server calls it on the tensors as they arrived (in
        their codec), the step again on what it computes with."""
        expected = self.activation_shape(split)
        batch = self.cfg.training.batch_size
        if x.dim() != 1 + len(expected) or tuple(x.shape[1:]) != expected or not 1 <= x.shape[0] <= batch:
            raise BadTensor(f"activations have shape {list(x.shape)} (rank {x.dim()}); split {split} needs "
                            f"[1..{batch}, {', '.join(map(str, expected))}] (rank {1 + len(expected)})")
        if y.dtype != torch.int64 or tuple(y.shape) != (x.shape[0],):
            raise BadTensor(f"labels must be int64 of shape [{x.shape[0]}], got {str(y.dtype).removeprefix('torch.')} "
                            f"{list(y.shape)}")
        if int(y.min()) < 0 or int(y.max()) >= self.spec.num_classes:
            raise BadTensor(f"labels must lie in 0..{self.spec.num_classes - 1}")

    def expected_weights(self, split: int) -> dict[str, torch.Tensor]:
        device_part, _ = split_model(self.model, split)
        return {f"layers.{k}": v for k, v in device_part.layers.state_dict().items()}

    def upload(self, device: str, report: DeviceReport, weights: dict[str, torch.Tensor],
               received: Optional[tuple[int, float]] = None) -> bool:
        """A device's trained device-side weights for the round; validated against the model.
        `received`: the body's bytes and the seconds from its request's head to its end here.
        Returns True when the upload was taken, False for a repeat of the one already taken.

        One upload per device and round is merged. A repeat of the accepted one (the same
        weights and report: a retry whose first reply was lost) is answered as a success and
        changes nothing, even after the round closed; a different one is refused (`ConflictingUpload`) and
        the first stands: it is never replaced, nor counted twice.

        Bounded before it can be merged: the sample count may not exceed what the
        server assigned the device, and the whole model it brings (its weights + its server-side
        replica) must lie within `aggregation.max_update_norm` of the global model, else it is
        refused (the device sits the round out) or clipped, as the job chose.
        """
        _check_split(report.split, self.layers)
        digest = upload_digest(report, weights)
        with self.lock:
            if self._repeat(device, report.round, digest):
                return False
        slot = self._active_slot(device, report.round, report.split)
        expected = self.expected_weights(report.split)
        if set(weights) != set(expected):
            missing = sorted(set(expected) - set(weights))[:5]
            extra = sorted(set(weights) - set(expected))[:5]
            raise BadTensor(f"weights do not match split {report.split}: missing {missing}, unexpected {extra}")
        for key, want in expected.items():
            got = weights[key]
            if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
                raise BadTensor(f"weight {key} has shape {list(got.shape)} {got.dtype}, "
                                f"expected {list(want.shape)} {want.dtype}")
            if got.is_floating_point() and not bool(torch.isfinite(got).all()):
                raise self._refused("uploads_refused", device, f"weight {key} holds NaN or Inf")
        if report.samples > self.assigned[device]:
            raise self._refused("uploads_refused", device, f"claims {report.samples} samples; this device "
                                f"was assigned {self.assigned[device]} per round")
        with slot.lock:  # waits for a step in flight; the replica is final once the upload is in
            replica = slot.replica
            if replica is None:
                raise RoundClosed(f"round {report.round} closed before this upload")
            whole = dict(weights)  # folded into the merge before this request ends; a buffering merge copies it
            whole.update({f"layers.{k}": v.detach().cpu().clone() for k, v in replica.layers.state_dict().items()})
        agg = self.cfg.aggregation
        norm = update_norm(whole, self._global_cpu)
        clipped = False
        if norm > agg.max_update_norm and agg.on_large_update == "clip":
            whole, clipped = clip_update(whole, self._global_cpu, agg.max_update_norm), True
            self._count("uploads_clipped")
            log.warning("device %s: update of norm %.3g clipped to %.3g", device, norm, agg.max_update_norm)
        with self.changed:
            if self._repeat(device, report.round, digest):  # the same upload, twice at once
                return False
            slot = self._active_slot(device, report.round, report.split)  # again, now atomic with the write
            slot.report = report
            slot.last_report = report
            slot.upload_bps = upload_rate(received)
            if norm > agg.max_update_norm and not clipped:
                slot.phase = "refused"
                self._close_if_all_done()
                raise self._refused("uploads_refused", device, f"update norm {norm:.3g} exceeds the bound "
                                    f"{agg.max_update_norm:.3g} (aggregation.max_update_norm); the device sits "
                                    "this round out")
            # the server saw every sample of a split step: a device cannot weigh more than those
            seen = slot.samples_seen if report.split < self.layers - 1 else report.samples
            slot.weight = float(max(1, min(report.samples, seen)))
            self._merge.add(whole, slot.weight)  # folded now; the upload itself is not kept
            slot.uploaded = True
            slot.accepted = (report.round, digest)
            slot.uploaded_at = self.clock()
            slot.phase = "uploaded"
            self._close_if_all_done()
        return True

    def _repeat(self, device: str, round_index: int, digest: str) -> bool:
        """Under the lock: True when this is the upload already taken for the round;
        `ConflictingUpload` when the device's upload for the round was taken and this one differs."""
        accepted = self.slots[device].accepted
        if accepted is None or accepted[0] != round_index:
            return False
        if accepted[1] != digest:
            self._count("uploads_refused")
            raise ConflictingUpload(f"device {device} already uploaded other weights for round {round_index}; "
                                    "that upload stands (one upload per device and round)")
        self._count("uploads_repeated")
        return True

    def _close_if_all_done(self) -> None:
        if all(s.round == self.round and (s.uploaded or s.phase == "refused")
               for s in self.slots.values()):
            self._close_round("all devices done")

    def _count(self, name: str) -> None:
        with self._counter_lock:
            self.counters[name] = self.counters.get(name, 0) + 1

    def _refused(self, counter: str, device: str, why: str) -> UnsafeUpdate:
        """Log and count a refusal; returns the error to raise."""
        self._count(counter)
        log.warning("device %s: %s", device, why)
        return UnsafeUpdate(why)

    def tick(self) -> None:
        """Called periodically: closes a round whose deadline has passed. Never raises: an error
        is logged and counted, and the round still closes."""
        try:
            with self.changed:
                if (self.phase == "training" and self.round_started is not None
                        and self.clock() >= self.round_started + self.cfg.round_deadline_s):
                    self._close_round("deadline")
        except Exception:
            self._count("tick_errors")
            log.exception("round ticker: error while closing round %d", self.round)

    def _close_round(self, why: ClosedBy) -> None:
        """Merge, evaluate, checkpoint and open the next round. Each of these may fail without
        stopping the round from closing: the model is then kept as it was."""
        closing = self.clock()
        self._conclude(self._seal(), why, closing)

    def _seal(self) -> RoundOutcome:
        """End the round for this server's devices: who was merged (with their records), who missed
        it; replicas freed (a step in flight finishes first; later ones find none: `RoundClosed`)."""
        start = self.round_started or self.clock()
        done = [s for s in self.slots.values() if s.round == self.round and s.uploaded]
        merged = {s.name for s in done}  # by name: a slot's `==` compares every field
        for s in self.slots.values():
            if s.name not in merged and s.phase != "refused":
                s.phase = "missed" if s.round == self.round else s.phase
        outcome = RoundOutcome(
            merge=self._merge,
            devices={s.name: DeviceRound(split=s.split, samples=s.report.samples,
                                         joined_s=_offset(s.joined_at, start), uploaded_s=_offset(s.uploaded_at, start),
                                         **s.report.timings.model_dump()) for s in done},
            missed=sorted(s.name for s in self.slots.values() if s.name not in merged),
            joined={s.name for s in self.slots.values() if s.round == self.round},
            nonfinite=self._nonfinite)
        self._nonfinite = set()
        for s in self.slots.values():
            with s.lock:
                s.replica, s.optimizer, s.uploaded = None, None, False
            if s.phase in ("uploaded", "refused"):
                s.phase = "idle"
        return outcome

    def _conclude(self, outcome: RoundOutcome, why: ClosedBy, closing: float) -> None:
        """The merge of the round's uploads becomes the global model; it is evaluated, the round
        recorded and checkpointed, and the next round opens after the gap."""
        if outcome.merge.count:
            try:
                merged = outcome.merge.result()
                if all(bool(torch.isfinite(v).all()) for v in merged.values() if v.is_floating_point()):
                    self.model.load_state_dict({k: v.to(self.torch_device) for k, v in merged.items()})
                else:
                    self._count("merges_refused")
                    log.error("round %d: the merged model is not finite; keeping the previous one", self.round)
            except Exception:
                self._count("merge_errors")
                log.exception("round %d: merge failed; keeping the previous model", self.round)
        try:
            accuracy, loss = self.evaluate()
        except Exception:
            self._count("eval_errors")
            log.exception("round %d: evaluation failed", self.round)
            accuracy, loss = float("nan"), float("nan")
        start = self.round_started or closing
        record = RoundRecord(
            round=self.round, accuracy=accuracy, loss=loss, closed_by=why, duration_s=self.clock() - start,
            # merge + evaluation: the per-round cost no split choice changes (telemetry's
            # round_overhead_s, which the controller adds to its predictions)
            close_s=self.clock() - closing, devices=outcome.devices, missed=outcome.missed)
        self.history.append(record)
        log.info("round %d closed (%s): accuracy %.4f, %d/%d devices", self.round, why, accuracy,
                 len(outcome.devices), len(self.cfg.devices))
        self._judge_divergence(outcome.joined, outcome.nonfinite)
        self.round += 1
        self.round_started = None
        self.opens_at = self.clock() + self.cfg.round_gap_s
        self.phase = "finished" if self.round >= self.cfg.training.rounds else "waiting"
        if self.failure is not None:
            self.phase = "failed"
        self._refresh_global()
        self._merge = self._new_merge()
        try:
            self._checkpoint()
        except Exception:
            self._count("checkpoint_errors")
            log.exception("round %d: checkpoint failed", self.round - 1)
        self.changed.notify_all()

    def _new_merge(self) -> Merge:
        """An empty merge for the round that opens, against its global model."""
        agg = self.cfg.aggregation
        return merger(agg.method, self._global_cpu, clip_norm=agg.clip_norm, trim_fraction=agg.trim_fraction)

    def _refresh_global(self) -> None:
        """The global model on the CPU (the reference for update norms) and its hash."""
        self._global_cpu = self.global_state()
        self.model_sha256 = model_digest(self._global_cpu)

    def _assigned_samples(self) -> dict[str, int]:
        """Samples each device trains on per round: its shard, capped by max_steps_per_round."""
        d, t = self.cfg.data, self.cfg.training
        sizes = [len(p) for p in partition(self.data.labels, len(self.cfg.devices), d.partition, d.beta, d.seed)]
        cap = t.max_steps_per_round * t.batch_size if t.max_steps_per_round else None
        return {name: min(size, cap) if cap else size for name, size in zip(self.cfg.devices, sizes)}

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        self.model.eval()
        loader = torch.utils.data.DataLoader(self.data.test, batch_size=self.cfg.eval_batch_size)
        correct, total, loss_sum = 0, 0, 0.0
        for x, y in loader:
            out = self.model(x.to(self.torch_device))
            loss_sum += float(nn.functional.cross_entropy(out, y.to(self.torch_device), reduction="sum"))
            correct += int((out.argmax(1).cpu() == y).sum())
            total += len(y)
        self.model.train()
        return correct / max(total, 1), loss_sum / max(total, 1)

    # ----- checkpoints ----------------------------------------------------------------------
    def _paths(self) -> tuple[Path, Path]:
        d = Path(self.cfg.checkpoint_dir)
        return d / "global.safetensors", d / "state.json"

    def _checkpoint(self) -> None:
        from safetensors.torch import save_file

        weights, state = self._paths()
        weights.parent.mkdir(parents=True, exist_ok=True)
        tmp = weights.with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}, str(tmp))
        tmp.replace(weights)
        tmp_state = state.with_suffix(".tmp")
        tmp_state.write_text(json.dumps({"round": self.round, "model": self.cfg.model,
                                         "history": [r.as_json() for r in self.history]}))
        tmp_state.replace(state)

    def _resume(self) -> None:
        """Pick up where a previous server left off (a replaced pod, a restarted run)."""
        from safetensors.torch import load_file  # a local file we wrote; safetensors holds no code

        weights, state = self._paths()
        if not (weights.exists() and state.exists()):
            return
        meta = json.loads(state.read_text())
        if meta.get("model") != self.cfg.model:
            raise ValueError(f"checkpoint in {weights.parent} is for model {meta.get('model')!r}, not {self.cfg.model!r}")
        self.model.load_state_dict({k: v.to(self.torch_device) for k, v in load_file(str(weights)).items()})
        self.round = int(meta["round"])
        self.history = parse_history(meta.get("history", []))
        log.info("resumed from checkpoint at round %d", self.round)

    # ----- reporting ------------------------------------------------------------------------
    def round_state(self) -> RoundState:
        """The round, its phase and whether it takes joins: read without the round lock (a closing
        round holds it while it evaluates), so a waiting device's poll costs the same at any fleet size."""
        return RoundState(round=self.round, rounds=self.cfg.training.rounds, phase=self.phase,
                          accepting=self._accepting())

    def status(self) -> ServerStatus:
        with self.lock:
            last = self.history[-1] if self.history else None
            devices = {}
            for s in self.slots.values():
                rep = s.last_report
                t = rep.timings if rep else None
                devices[s.name] = DeviceStatus(
                    split=s.split, phase=s.phase, last_round=rep.round if rep else None,
                    up_bps=t.up_bps if t else None, down_bps=t.down_bps if t else None,
                    energy_j=t.energy_j if t else None, energy_source=t.energy_source if t else "none",
                    round_s=t.round_s if t else None)
            with self._counter_lock:
                counters = dict(self.counters)
            return ServerStatus(round=self.round, rounds=self.cfg.training.rounds, phase=self.phase,
                                accepting=self._accepting(), accuracy=_finite_or_none(last.accuracy if last else None),
                                loss=_finite_or_none(last.loss if last else None), devices=devices,
                                model_sha256=self.model_sha256, counters=counters,
                                failure=self.failure.message if self.failure else None,
                                failure_reason=self.failure.reason if self.failure else None)

    def telemetry(self) -> Telemetry:
        with self.lock:
            scale = self.server_scale.factor
            prof = self.server_prof
            batch = self.cfg.training.batch_size
            devices = []
            recent = recent_sessions(self.history)
            for s in self.slots.values():
                rep = s.last_report
                t = rep.timings if rep else None
                devices.append(DeviceTelemetry(
                    name=s.name, device_class=rep.device_class if rep else "cpu",
                    power_mode=rep.power_mode if rep else "",
                    fwd=rep.profile_fwd if rep else None, bwd=rep.profile_bwd if rep else None,
                    batch_size=rep.profile_batch or batch if rep else batch,
                    up_bps=t.up_bps if t else None, down_bps=t.down_bps if t else None,
                    iterations=t.steps if t and t.steps else 0, split=rep.split if rep else None,
                    energy_j=t.energy_j if t else None, energy_source=t.energy_source if t else "none",
                    round_s=t.round_s if t else None, latency_s=t.latency_s if t else None,
                    duplex=rep.duplex if rep else "full", measured_steps=rep.measured_steps if rep else [],
                    codec=rep.codec if rep else None, micro_batches=rep.micro_batches if rep else None,
                    sessions=recent.get(s.name, []), upload_bps=s.upload_bps,
                    power_mode_failed=rep.power_mode_failed if rep else "",
                    power_mode_problem=rep.power_mode_problem if rep else "",
                    switch_s=rep.switch_s if rep else None, shard=self.shard_of(s.name)))
            zeros = [0.0] * self.layers
            return Telemetry(round=self.round, model=self.cfg.model, batch_size=batch, codec=self.cfg.codec,
                             micro_batches=self.cfg.micro_batches,
                             activation_numel=activation_numel(self.cfg.model), weight_bytes=weight_bytes(self.cfg.model),
                             server_fwd=[v * scale for v in prof.fwd] if prof else zeros,
                             server_bwd=[v * scale for v in prof.bwd] if prof else zeros,
                             devices=devices, round_overhead_s=round_overhead(self.history))

    def shard_of(self, device: str) -> int:
        """The server shard the device trains at (one server: 0)."""
        return 0

    def global_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}


def model_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a model's state (names and bytes of every tensor, in name order): `model_sha256`."""
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        h.update(k.encode())
        h.update(v.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def upload_digest(report: DeviceReport, weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 of an upload's report and weights (names, dtypes, shapes, bytes): equal for the
    same upload sent twice."""
    h = hashlib.sha256(report.model_dump_json().encode())
    for name in sorted(weights):
        t = weights[name]
        h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        if t.numel():
            h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def _finite_or_none(value: Optional[float]) -> Optional[float]:
    """Status must stay servable: JSON has no NaN or Infinity (a diverged model's test loss)."""
    return value if value is not None and math.isfinite(value) else None


def _snapshot(replica: nn.Module, optimizer: Optional[MomentumSGD]) -> tuple[list, Optional[Momentum]]:
    """Copies of a replica's parameters, buffers and momentum, to undo a refused step."""
    tensors = [t.detach().clone() for t in (*replica.parameters(), *replica.buffers())]
    return tensors, (optimizer.snapshot() if optimizer is not None else None)


@torch.no_grad()
def _restore(replica: nn.Module, optimizer: Optional[MomentumSGD], saved: tuple[list, Optional[Momentum]]) -> None:
    tensors, momentum = saved
    for t, copy_ in zip((*replica.parameters(), *replica.buffers()), tensors):
        t.copy_(copy_)
    if optimizer is not None and momentum is not None:
        optimizer.restore(momentum)


def _finite(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in (*module.parameters(), *module.buffers())
               if t.is_floating_point())


def _check_split(split: int, layers: int) -> None:
    try:
        check_split(split, layers)
    except ValueError as exc:
        raise WrongSplit(str(exc)) from None


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def read_tokens(cfg: ServerConfig, devices: Optional[Sequence[str]] = None) -> tuple[dict[str, str], Optional[str]]:
    """Device tokens from files named after each device (`devices`, default every device of the
    job); the controller's from controller.token."""
    from ares.core.config import CONTROLLER_TOKEN_NAME

    root = Path(cfg.tokens_dir)
    tokens = {}
    for name in cfg.devices if devices is None else devices:
        path = root / name
        if not path.exists():
            raise ValueError(f"no token file for device {name!r}: expected {path}")
        tokens[name] = path.read_text().strip()
        if len(tokens[name]) < 16:
            raise ValueError(f"token for {name!r} in {path} is shorter than 16 characters")
    controller = root / CONTROLLER_TOKEN_NAME
    return tokens, controller.read_text().strip() if controller.exists() else None
