"""The device trainer: runs layers 0..s on local data, the server runs the rest.

Each round it re-reads its split from the split file (the downwardAPI contract), joins the
round, trains one pass over its shard (or `max_steps` batches), and uploads its device-side
weights with its sample count, measured timings, compute profile and energy. With `split =
L-1` it trains the whole model locally (federated learning). It talks to the server only
through a `ServerLink`.

Emulation (the testbed): given a compute profile of another device class, each step's device
compute is padded to the profile's time, so results do not depend on this machine's speed.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ares.core.config import DeviceSettings, ServerConfig
from ares.core.data import load_data, shard
from ares.core.energy import energy_j, power_model
from ares.core.messages import LINK_SMOOTHING, MIN_SAMPLE_BYTES, STEP_ROUNDS, DeviceReport, StepSample, StepTimings
from ares.core.models import build_model, model_spec, n_layers, split_model
from ares.core.profiles import ComputeProfile, derive_power_mode, modes_of
from ares.core.sgd import MomentumSGD
from ares.runtime.hostmode import SWITCH_WAIT_S, read_host_mode, write_trainer_state
from ares.runtime.link import LinkError, ServerLink
from ares.runtime.power import read_power_file
from ares.runtime.profiler import LiveScale, Throughput, device_profile, time_layers
from ares.runtime.splitfile import StepOptions, read_mode, read_options, read_split

log = logging.getLogger("ares.device")


@dataclass
class RoundLog:
    """What one round looked like from the device, for the results folder."""

    round: int
    split: int
    steps: int = 0
    samples: int = 0
    loss: float = float("nan")
    device_s: float = 0.0
    compute_s: float = 0.0  # the compute the energy charges (`charged_seconds`); device_s is its wall time
    server_s: float = 0.0
    up_s: float = 0.0
    down_s: float = 0.0
    round_s: float = 0.0
    energy_j: Optional[float] = None
    energy_source: str = "none"
    power_mode: str = ""  # the mode whose power table the energy is modelled with ("" where none)
    up_bps: Optional[float] = None
    down_bps: Optional[float] = None
    latency_s: Optional[float] = None
    step_wall_s: float = 0.0  # every step together, forward to optimiser step
    cold: bool = False  # the process's first round: its first step pays start-up (allocators, thread pools, the connection)
    uploaded: bool = False


def _union(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by at least one of the intervals: the link's busy time for overlapping streams."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def busy_seconds(up: list[tuple[float, float]], down: list[tuple[float, float]], up_bytes: int,
                  down_bytes: int, shared: bool) -> tuple[float, float]:
    """Each direction's busy seconds, for its rate estimate. On a shared (half-duplex) link the
    moments when both directions move split the one rate between them: they are divided in
    proportion to the bytes, so that the two estimates charge up and down one after the other (as
    the cost model does) in the medium's busy time. Counting the overlap in both directions read
    each rate at about half, and the model, serialising them again, predicted a pipelined step at
    split 1 1.5x too slow (`ares bench paper5 --duplex half`)."""
    up_s, down_s = _union(up), _union(down)
    overlap = up_s + down_s - _union(up + down)
    total = up_bytes + down_bytes
    if not shared or overlap <= 0 or total <= 0:
        return up_s, down_s
    return up_s - overlap * down_bytes / total, down_s - overlap * up_bytes / total


def _telling(nbytes: int, estimate: Throughput, weights: bool = False) -> bool:
    """Whether a transfer of `nbytes` should update `estimate`: large enough, or a step's first one
    (a device at a small-activation split would otherwise never have one). Weights get no such
    exemption: at split 1 the join's body is a few KB, which can read as hundreds of MB/s, and the
    steps that follow will tell."""
    return nbytes >= MIN_SAMPLE_BYTES or (estimate.value is None and not weights)


@dataclass(frozen=True)
class ComputeStart:
    """When a stretch of compute began: wall clock and this process's CPU clock."""

    wall: float
    cpu: float

    @classmethod
    def now(cls) -> "ComputeStart":
        return cls(time.perf_counter(), time.process_time())


def charged_seconds(start: ComputeStart, emulated_s: Optional[float]) -> float:
    """The seconds of compute since `start` that a round's energy charges. A real device's compute
    is its wall time (`emulated_s` None). An emulated one (on the CPU) stands for a board of its
    own: its compute takes the profile's `emulated_s`, or this host's CPU time for the work where
    that is longer (the host is slower than the board), never more than the wall time. Waiting for
    a CPU that the host's other emulated devices hold is not the board's: on a testbed of five
    boards on two cores it charged each Nano about 1.4x its compute."""
    wall = time.perf_counter() - start.wall
    if emulated_s is None:
        return wall
    return min(wall, max(emulated_s, time.process_time() - start.cpu))


def _pad_until(start: float, seconds: float) -> None:
    remaining = start + seconds - time.perf_counter()
    if remaining > 0:
        time.sleep(remaining)


@dataclass
class DeviceTrainer:
    settings: DeviceSettings
    link: ServerLink
    emulate: Optional[ComputeProfile] = None
    torch_device: str = "cpu"
    on_round: Callable[[RoundLog], None] = lambda _: None
    cfg: ServerConfig = field(init=False)
    reconnect_s: float = 600.0  # how long an unreachable server is waited for between rounds

    def __post_init__(self) -> None:
        self.cfg = self.link.config()
        self.spec = model_spec(self.cfg.model)
        self.model = build_model(self.cfg.model, seed=self.cfg.training.seed).to(self.torch_device)
        self.layers = n_layers(self.model)
        data = load_data(self.cfg.data, path_override=self.settings.data_dir)
        d = self.cfg.data
        self.shard = shard(data, self.cfg.shard_of(self.settings.name), len(self.cfg.devices), d.partition, d.beta, d.seed)
        self.split: Optional[int] = self.settings.initial_split
        self.chosen: Optional[StepOptions] = None  # the controller's (codec, k), from beside the split file
        self.up, self.down = Throughput(smoothing=LINK_SMOOTHING), Throughput(smoothing=LINK_SMOOTHING)
        self.live = LiveScale()
        self.set_emulation(self.emulate)
        self._profile_mtime: Optional[float] = None
        self._pool: Optional[ThreadPoolExecutor] = None  # pipelined micro-batches: one thread per stream
        self._rtts: deque[float] = deque(maxlen=20)  # recent status round trips: the per-request latency
        # (split, codec, k) -> its last rounds' steps, each with the links and compute factor it ran under
        self._steps: dict[tuple[int, str, int], deque[tuple[float, Optional[float], Optional[float], float]]] = {}
        self._warm = False  # the process's first step was taken (it pays one-off start-up)
        # power modes: a mode the host could not switch to (with why), and the last switch's seconds
        self.mode_failed, self.mode_problem, self.switch_s = "", "", None
        self._mode_warned, self._round_started = False, 0

    def _startup_profile(self, remeasure: bool = True) -> ComputeProfile:
        """Measured at start-up on this device; an emulated profile is the floor it is padded to.
        Without `remeasure` this machine's last measurement is reused (an emulated mode switch
        changes the floor, not the machine)."""
        if remeasure or getattr(self, "_machine_times", None) is None:
            self._machine_times = time_layers(self.model, self.spec.input_shape, self.cfg.training.batch_size,
                                              self.torch_device, repeats=2)
        measured = device_profile(self._machine_times, self.settings.device_class, self.settings.power_mode)
        if self.emulate is None:
            return measured
        target = self.emulate
        slower = [s for s in range(self.layers) if measured.total(s) > target.total(s) * 1.05]
        if slower:
            log.warning("this machine is slower than the emulated %s %s profile at splits %s: "
                        "those steps take the measured time", target.device_class, target.power_mode, slower)
        return ComputeProfile(fwd=tuple(max(a, b) for a, b in zip(measured.fwd, target.fwd)),
                              bwd=tuple(max(a, b) for a, b in zip(measured.bwd, target.bwd)),
                              batch_size=measured.batch_size, device_class=target.device_class,
                              power_mode=target.power_mode, source="derived")

    def _reload_profile(self) -> None:
        """The testbed changes a power mode by rewriting the emulated profile file between rounds."""
        path = self.settings.profile_file
        if not path:
            return
        try:
            mtime = os.stat(path).st_mtime
            if mtime != self._profile_mtime:
                profile = ComputeProfile.load(path)
                if self._profile_mtime is not None:
                    log.info("profile file changed: now %s %s", profile.device_class, profile.power_mode)
                    self.set_emulation(profile)
                self._profile_mtime = mtime
        except (OSError, ValueError) as exc:
            log.warning("profile file %s unreadable (%s); keeping the current profile", path, exc)

    def set_emulation(self, profile: Optional[ComputeProfile], remeasure: bool = True) -> None:
        """A power-mode change in the testbed: new profile, new power model."""
        batch = self.cfg.training.batch_size
        self.emulate = profile.rescaled(batch) if profile is not None and profile.batch_size != batch else profile
        if profile is not None:
            self.settings = self.settings.model_copy(update={"device_class": profile.device_class,
                                                             "power_mode": profile.power_mode})
        self.profile = self._startup_profile(remeasure)
        self.live = LiveScale()

    # ---------------------------------------------------------------------------------------
    def run(self, stop: Callable[[], bool] = lambda: False) -> list[RoundLog]:
        """Train until the server says it has finished; returns one log per round taken part in."""
        logs: list[RoundLog] = []
        round_index = self.link.round_state().round
        while not stop():
            round_index = self._wait_for_round(round_index)
            if round_index is None:
                break
            self._reload_profile()
            self._trainer_state(round_index, busy=True)
            self._power_mode()
            split = read_split(self.settings.split_file, self.layers, self.split)
            if split is None:
                split = self.layers - 1
                log.warning("no split file yet at %s; training every layer on the device", self.settings.split_file)
            self.split = split
            chosen = read_options(self.settings.split_file, self.chosen)
            if chosen != self.chosen:
                log.info("round %d: step options %s (were %s)", round_index, chosen, self.chosen)
            self.chosen = chosen
            energy_start = self._energy_counter()  # the round's energy starts with the weights' download
            try:
                reply, weights, moved = self.link.join(round_index, split)
                self._learn(self.down, moved.nbytes, moved.seconds, weights=True)
            except LinkError as exc:
                if exc.status == 410:
                    break
                if exc.status == 503:  # server gone: wait for it in _wait_for_round
                    continue
                if exc.status == 409:
                    status = self.link.round_state()
                    if status.phase == "finished":
                        break
                    round_index = max(status.round, round_index)  # behind: catch up; ahead: wait
                    continue
                raise
            entry = self.train_round(reply, weights, energy_start, moved.seconds)
            logs.append(entry)
            self.on_round(entry)
            round_index = reply.round + 1
        return logs

    def _trainer_state(self, round_index: int, busy: bool) -> None:
        """Tell the sidecar whether a round is under way (it switches power modes only between rounds)."""
        self._round_started = round_index
        if self.settings.trainer_file:
            try:
                write_trainer_state(self.settings.trainer_file, round_index, busy)
            except OSError as exc:
                log.warning("cannot write %s (%s): the sidecar may switch modes mid-round",
                            self.settings.trainer_file, exc.strerror)

    def _power_mode(self) -> None:
        """At a round start: the power mode this round runs in. On a host with a sidecar, the mode in
        force as it reports it (after any switch under way has ended); in a local run with an emulated
        Jetson, the controller's mode from beside the split file, applied here (the emulated nvpmodel:
        the emulated profile derived for that mode, and its power table)."""
        if self.settings.hostctl_file:
            deadline = time.monotonic() + SWITCH_WAIT_S
            host = read_host_mode(self.settings.hostctl_file)
            if host is not None and host.pending:  # a switch waits for a gap between rounds: make one
                self._trainer_state(self._round_started, busy=False)
                while host is not None and host.pending and time.monotonic() < deadline:
                    time.sleep(0.05)
                    host = read_host_mode(self.settings.hostctl_file)
                self._trainer_state(self._round_started, busy=True)
            while host is not None and host.switching and time.monotonic() < deadline:
                time.sleep(0.05)
                host = read_host_mode(self.settings.hostctl_file)
            if host is not None:
                if host.power_mode and host.power_mode != self.settings.power_mode:
                    log.info("power mode in force: %s (was %s)", host.power_mode, self.settings.power_mode or "unknown")
                    self.settings = self.settings.model_copy(update={"power_mode": host.power_mode})
                self.mode_failed, self.mode_problem, self.switch_s = host.failed, host.problem, host.switch_s
            return
        mode = read_mode(self.settings.split_file) if self.settings.split_file else None
        if mode is None or mode == self.settings.power_mode:
            return
        if self.emulate is None or mode not in modes_of(self.emulate.device_class):
            if not self._mode_warned:
                log.warning("power mode %s asked, but this device has no emulated %s profile and no host "
                            "sidecar to switch it; running as it is", mode, self.settings.device_class)
                self._mode_warned = True
            self.mode_failed, self.mode_problem = mode, "no host sidecar and no emulated profile for this mode"
            return
        started = time.perf_counter()
        log.info("power mode %s -> %s (emulated)", self.emulate.power_mode, mode)
        # this machine is not re-timed: five devices profiling at once slow every round they share
        self.set_emulation(derive_power_mode(self.emulate, mode), remeasure=False)
        self.switch_s = time.perf_counter() - started

    def _wait_for_round(self, round_index: int, poll_s: float = 0.1, wait_s: float = 10.0) -> Optional[int]:
        """Wait until the round takes joins, then read the split: the controller decides in the gap.
        The first ask is answered at once (its round trip is the latency the cost model uses); the
        next ones are long polls the server answers when the round opens, at most `wait_s` later.
        An answer that came back early with the round still closed (a server of an older release
        ignores the wait) is followed by a pause of `poll_s`, as before long polls."""
        give_up = None
        first = True
        while True:
            try:
                t0 = time.perf_counter()
                status = self.link.round_state(round_index, 0.0 if first else wait_s)
                took = time.perf_counter() - t0
                if first:
                    self._rtts.append(took)
            except LinkError as exc:
                if exc.status != 503:
                    raise
                give_up = give_up or time.monotonic() + self.reconnect_s
                if time.monotonic() > give_up:
                    raise
                log.warning("server unreachable (%s); retrying", exc.message)
                time.sleep(1.0)
                first = True
                continue
            give_up = None
            if status.phase == "finished":
                return None
            # a restarted server resumes behind us (its checkpoint is the last closed round) and
            # waits for joins: rejoin its round instead of waiting for ours
            if status.opens_for(round_index):
                return status.round
            if not first and took < poll_s:
                time.sleep(poll_s)
            first = False

    def _measured_steps(self, entry: RoundLog, whole: bool) -> list[StepSample]:
        """This round's offloaded steps joined to the ones measured before (the last `STEP_ROUNDS`
        rounds of each of 16 settings at most), so the controller can hold its model against each
        setting this device has really run, over more than one round: a Nano's turns at one
        setting went 3.5, 2.6, 3.3, 2.6 s, and the last round alone, taken as the next one, was off by
        up to 34%. Each sample carries the link estimates and compute factor of its round; its
        `compute_scale` is that factor over today's, which the report's profile already holds.
        The process's first round gives none: it pays start-up, its own (the first step: 0.1-3 s)
        and at round 0 everyone's (every process starts and profiles at once), and a figure taken
        then was extrapolated to other settings (a sub-second turn predicted 70% long)."""
        if entry.steps and not whole and not entry.cold:
            key = (entry.split, self.codec, self.micro_batches)
            kept = self._steps.pop(key, None) or deque(maxlen=STEP_ROUNDS)
            kept.append((entry.step_wall_s / entry.steps, entry.up_bps, entry.down_bps, self.live.factor))
            self._steps[key] = kept
            while len(self._steps) > 16:
                self._steps.pop(next(iter(self._steps)))
        return [StepSample(split=s, codec=c, micro_batches=k, step_s=v, up_bps=up, down_bps=down,
                           compute_scale=min(max(factor / self.live.factor, 1e-3), 1e3))  # the message's bounds
                for (s, c, k), kept in self._steps.items() for v, up, down, factor in kept]

    @property
    def latency_s(self) -> Optional[float]:
        """A small request's round trip, the fastest of the recent ones (the others queued behind
        something): what every request pays besides its bytes, the cost model's latency term."""
        return min(self._rtts) if self._rtts else None

    def train_round(self, reply, weights: dict[str, torch.Tensor], energy_start: Optional[float] = None,
                    weights_down_s: float = 0.0) -> RoundLog:
        """One round from the join's reply: steps, report, upload. Its energy counts the join's download
        of the weights (`weights_down_s`, and the counter read before it: `energy_start`), its steps and
        the upload of its weights (`_energy`)."""
        split = reply.split
        entry = RoundLog(round=reply.round, split=split, down_s=weights_down_s)
        started = time.perf_counter()
        if energy_start is None:
            energy_start = self._energy_counter()
        self.model.load_state_dict({**self.model.state_dict(), **weights})
        device_part, _ = split_model(self.model, split)
        device_part.train()
        whole = split == self.layers - 1
        optimizer = MomentumSGD(device_part.parameters(), lr=reply.lr, momentum=reply.momentum)
        gen = torch.Generator().manual_seed(self.cfg.training.seed * 100_003 + reply.round * 1009 + self.cfg.shard_of(self.settings.name))
        loader = torch.utils.data.DataLoader(self.shard, batch_size=reply.batch_size, shuffle=True, generator=gen)
        losses = []
        for x, y in loader:
            if reply.max_steps is not None and entry.steps >= reply.max_steps:
                break
            if time.time() > reply.deadline_unix:
                log.warning("round %d deadline passed after %d steps; uploading what we have", reply.round, entry.steps)
                break
            try:
                t_step = time.perf_counter()
                losses.append(self._step(reply.round, split, whole, device_part, optimizer, x, y, entry))
                entry.step_wall_s += time.perf_counter() - t_step
                if not self._warm:  # this process's first step: its round says nothing of its setting
                    entry.cold = self._warm = True
            except LinkError as exc:
                log.warning("round %d: step refused (%s); leaving the round", reply.round, exc)
                entry.round_s = time.perf_counter() - started
                return entry
            entry.steps += 1
            entry.samples += len(y)
        entry.loss = sum(losses) / len(losses) if losses else float("nan")
        entry.round_s = time.perf_counter() - started
        upload = {f"layers.{k}": v.detach().cpu() for k, v in device_part.layers.state_dict().items()}
        self._energy(entry, energy_start, sum(v.numel() * v.element_size() for v in upload.values()))
        entry.up_bps, entry.down_bps, entry.latency_s = self.up.value, self.down.value, self.latency_s
        report = DeviceReport(
            round=reply.round, split=split, samples=max(entry.samples, 1),
            timings=StepTimings(steps=entry.steps, device_fwd_s=entry.device_s / max(entry.steps, 1),
                                up_bps=entry.up_bps, down_bps=entry.down_bps, round_s=entry.round_s,
                                energy_j=entry.energy_j, energy_source=entry.energy_source,
                                latency_s=entry.latency_s, steps_s=entry.step_wall_s),
            measured_steps=self._measured_steps(entry, whole),
            duplex=self.settings.duplex, codec=self.codec, micro_batches=self.micro_batches,
            device_class=self.settings.device_class, power_mode=self.settings.power_mode,
            power_mode_failed=self.mode_failed, power_mode_problem=self.mode_problem, switch_s=self.switch_s,
            profile_fwd=[v * self.live.factor for v in self.profile.fwd],
            profile_bwd=[v * self.live.factor for v in self.profile.bwd], profile_batch=self.profile.batch_size)
        try:
            moved = self.link.upload(report, upload)
            self._learn(self.up, moved.nbytes, moved.seconds, round_trip=True, weights=True)  # for the next round's report
            entry.uploaded = True
        except LinkError as exc:
            log.warning("round %d: upload refused (%s)", reply.round, exc)
        return entry

    def _step(self, round_index: int, split: int, whole: bool, part: nn.Module, optimizer: MomentumSGD, x, y, entry: RoundLog) -> float:
        scale = len(y) / self.profile.batch_size
        x, y = x.to(self.torch_device), y.to(self.torch_device)
        optimizer.zero_grad()
        t0 = ComputeStart.now()
        fwd_s, bwd_s = (self.emulate.fwd[split] * scale, self.emulate.bwd[split] * scale) if self.emulate else (0.0, 0.0)
        out = part(x) if whole or self.micro_batches == 1 or len(y) == 1 else None
        if whole:
            loss = nn.functional.cross_entropy(out, y)
            self._pad(t0.wall, fwd_s)
            t1 = time.perf_counter()
            loss.backward()
            self._pad(t1, bwd_s)
            optimizer.step()
            value = float(loss.detach())
            device_s = time.perf_counter() - t0.wall
            entry.compute_s += self._charged(t0, fwd_s + bwd_s)
        elif self.micro_batches > 1 and len(y) > 1:
            value, device_s = self._pipelined_step(round_index, split, part, x, y, entry)  # its own forwards
            t1 = ComputeStart.now()
            optimizer.step()
            entry.compute_s += self._charged(t1, 0.0)
        else:
            self._pad(t0.wall, fwd_s)
            t_fwd = time.perf_counter() - t0.wall
            entry.compute_s += self._charged(t0, fwd_s)
            result = self.link.step(round_index, split, out.detach().cpu(), y.cpu(), self.codec)
            t1 = ComputeStart.now()
            out.backward(result.grad.to(self.torch_device))
            self._pad(t1.wall, bwd_s)
            optimizer.step()
            value = result.loss
            entry.server_s += result.server_s
            entry.up_s += result.up_s
            entry.down_s += result.down_s
            self._learn(self.up, result.up_bytes, result.up_s, round_trip=True)
            self._learn(self.down, result.down_bytes, result.down_s)
            device_s = t_fwd + time.perf_counter() - t1.wall  # compute only: the transfer is excluded
            entry.compute_s += self._charged(t1, bwd_s)
        entry.device_s += device_s
        self.live.update(self.profile.total(split) * scale, device_s)
        return value

    def _charged(self, start: ComputeStart, emulated_s: float) -> float:
        emulated = self.emulate is not None and self.torch_device == "cpu"
        return charged_seconds(start, emulated_s if emulated else None)

    @property
    def codec(self) -> str:
        """The controller's choice (options file), else this device's setting, else the server's."""
        return (self.chosen and self.chosen.codec) or self.settings.codec or self.cfg.codec

    @property
    def micro_batches(self) -> int:
        return (self.chosen and self.chosen.micro_batches) or self.settings.micro_batches or self.cfg.micro_batches

    def _pipelined_step(self, round_index: int, split: int, part: nn.Module, x, y, entry: RoundLog) -> tuple[float, float]:
        """One batch as k micro-batches: forward i+1 runs while i is on the wire or at the server.

        All forwards first, each sent on its own HTTP/2 stream as soon as it exists; then the
        gradients are taken in order and back-propagated as they arrive (accumulating); one
        optimiser step for the batch (the caller's). The server weights each part's loss by its
        share, so the update is the whole batch's, except that BatchNorm normalises each
        micro-batch with its own statistics. Returns (batch loss, device compute seconds).
        """
        k = min(self.micro_batches, len(y))
        if self._pool is None or self._pool._max_workers < k:
            self._pool = ThreadPoolExecutor(max_workers=k, thread_name_prefix="ares-step")
        xs, ys = torch.tensor_split(x, k), torch.tensor_split(y, k)
        outs, futures, compute = [], [], 0.0
        emulate = self.emulate
        try:
            for i, (xi, yi) in enumerate(zip(xs, ys)):
                t0 = ComputeStart.now()
                out = part(xi)
                fwd_s = emulate.fwd[split] * len(yi) / self.profile.batch_size if emulate else 0.0
                self._pad(t0.wall, fwd_s)
                compute += time.perf_counter() - t0.wall
                entry.compute_s += self._charged(t0, fwd_s)
                outs.append(out)
                futures.append(self._pool.submit(self.link.step, round_index, split, out.detach().cpu(), yi.cpu(),
                                                 self.codec, i, k, len(y)))
            results = []
            for i, future in enumerate(futures):
                result = future.result()
                t1 = ComputeStart.now()
                outs[i].backward(result.grad.to(self.torch_device))
                bwd_s = emulate.bwd[split] * len(ys[i]) / self.profile.batch_size if emulate else 0.0
                self._pad(t1.wall, bwd_s)
                compute += time.perf_counter() - t1.wall
                entry.compute_s += self._charged(t1, bwd_s)
                results.append(result)
        finally:
            for future in futures:  # never leave a stream behind (a refused part ends the step)
                future.exception()
        loss = sum(r.loss * len(yi) for r, yi in zip(results, ys)) / len(y)
        up_spans, down_spans = [r.up_span for r in results], [r.down_span for r in results]
        entry.server_s += sum(r.server_s for r in results)
        entry.up_s += _union(up_spans)  # the radio's time in each direction (energy)
        entry.down_s += _union(down_spans)
        up_bytes, down_bytes = sum(r.up_bytes for r in results), sum(r.down_bytes for r in results)
        up_s, down_s = busy_seconds(up_spans, down_spans, up_bytes, down_bytes, self.settings.duplex == "half")
        self._learn(self.up, up_bytes, up_s)
        self._learn(self.down, down_bytes, down_s)
        return loss, compute

    def _learn(self, estimate: Throughput, nbytes: int, seconds: float, round_trip: bool = False,
               weights: bool = False) -> None:
        """One transfer into a link estimate: activations and gradients each step, and the weights at
        join and upload (at the local split they are all a device moves: without them a Nano whose link
        fell to a quarter kept being predicted at the old rate). An upload's time, from its request's
        start to the server's `held`, still holds a round trip (`round_trip`). In-process links move
        no bytes."""
        if not nbytes or not _telling(nbytes, estimate, weights):
            return
        if round_trip:
            seconds = max(seconds - (self.latency_s or 0.0), seconds / 2)
        estimate.update(nbytes, max(seconds, 1e-6))

    def _pad(self, start: float, seconds: float) -> None:
        if self.torch_device != "cpu":
            torch.cuda.synchronize()
        _pad_until(start, seconds)

    def _energy_counter(self) -> Optional[float]:
        if not self.settings.power_file:
            return None
        reading = read_power_file(self.settings.power_file)
        return reading.energy_j if reading else None

    def _energy(self, entry: RoundLog, start: Optional[float], upload_bytes: int) -> None:
        """The round's energy, from the join's download of the weights to their upload: measured from
        the sidecar's INA3221 counter when there is one, else from the power model over the radio's and
        the compute's measured times. The report that carries it goes with the upload, so the upload's
        own share is its bytes over the uplink estimate, at the radio's power in the table (the cost
        model's charge for it); its seconds are in `up_s`."""
        upload_s = upload_bytes / self.up.value if self.up.value else 0.0
        entry.up_s += upload_s
        try:
            power = power_model(self.settings.device_class, self.settings.power_mode)
        except ValueError:
            power = None
        end = self._energy_counter()
        if start is not None and end is not None and end >= start:
            entry.energy_j = end - start + (power.tx_w * upload_s if power else 0.0)
            entry.energy_source = "measured"
            return
        if power is None:
            return
        entry.energy_j = energy_j(power, entry.compute_s, entry.up_s, entry.down_s)
        entry.energy_source = "modelled"
        entry.power_mode = self.settings.power_mode or ""
