"""The adaptive loop: read the server's telemetry, run the optimiser, write split decisions.

The same code runs in the local runner and in the Kubernetes operator; they differ only in
the `SplitSink` (split files on disk, or the `ares.io/split-point` pod annotation). The
policy decides and never does I/O; this module owns the I/O around it.

Power modes (`power_modes=True`): every device of a class with modes (a Jetson) that reports
the mode it ran in gets its other modes in the decision, their profiles derived from the one
it measured (marked derived) and their power from the table, and a switch charged at the
pause its host last measured (else `DEFAULT_SWITCH_S`). A mode pinned for a device is the only
one it may take; a device whose host could not switch it (`power_mode_failed`) is kept at the
mode in force, so the next plan is made for the mode it really runs in.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Protocol, Sequence, runtime_checkable

import httpx
import numpy as np

from ares.core.energy import PowerModel, power_model
from ares.core.messages import LINK_SMOOTHING, STEP_ROUNDS, DeviceTelemetry, ServerStatus, SessionSample, StepSample, Telemetry
from ares.core.costmodel import (CODEC_BYTES, MAX_BPS, MIN_BPS, Column, CostInputs, DeviceInput, Option, Plan, Problem,
                                 column_of, cost_matrices, model_costs, options_for, other_modes, session_table)
from ares.core.optimiser import SplitPolicy
from ares.core.profiles import DEFAULT_SWITCH_S, ComputeProfile, ServerProfile, modes_of
from ares.runtime.splitfile import write_mode, write_options, write_split
from ares.runtime.tlsclient import ClientTls, transport

log = logging.getLogger("ares.controller")

# Where no table entry fits (a laptop or x86 box in a local run): a plainly labelled guess.
ASSUMED_POWER = PowerModel(compute_w=10.0, tx_w=2.0, rx_w=2.0, source="modelled")


def _get(url: str, token: str, timeout_s: float, tls: Optional[ClientTls]) -> httpx.Response:
    """One GET with the controller's token; over HTTPS trusting only `tls`'s CA when given."""
    with httpx.Client(transport=transport(tls), timeout=timeout_s) as client:
        r = client.get(url, headers={"Authorization": f"Bearer {token}"})
    r.raise_for_status()
    return r


def fetch_status(url: str, token: str, timeout_s: float = 10.0, tls: Optional[ClientTls] = None) -> ServerStatus:
    return ServerStatus.model_validate(_get(f"{url.rstrip('/')}/v1/status", token, timeout_s, tls).json())


def fetch_telemetry(url: str, token: str, timeout_s: float = 10.0, tls: Optional[ClientTls] = None) -> Telemetry:
    return Telemetry.model_validate(_get(f"{url.rstrip('/')}/v1/telemetry", token, timeout_s, tls).json())


def _power(device_class: str, power_mode: str) -> PowerModel:
    try:
        return power_model(device_class, power_mode)
    except ValueError:
        return ASSUMED_POWER



def with_modes(device: DeviceInput, measured: DeviceTelemetry, pinned_mode: Optional[str] = None) -> DeviceInput:
    """The device with its class's other power modes in the decision (see the module docstring);
    as it was when its class has none or its mode in force is not known."""
    fields = _mode_fields(device.compute, measured, pinned_mode)
    return replace(device, **fields) if fields else device


def _mode_fields(profile: ComputeProfile, measured: DeviceTelemetry, pinned_mode: Optional[str]) -> dict:
    """What `with_modes` changes in a device with this profile ({} where nothing)."""
    names = modes_of(profile.device_class)
    if profile.power_mode not in names:
        return {}
    pin = pinned_mode if pinned_mode in names else None
    if measured.power_mode_failed:
        pin = profile.power_mode  # the host could not switch it: plan for the mode in force
    switch = measured.switch_s if measured.switch_s is not None else DEFAULT_SWITCH_S
    return {"modes": other_modes(profile), "pinned_mode": pin, "switch_s": switch}


def problem_from_telemetry(telemetry: Telemetry, pinned: Mapping[str, int] | None = None,
                           offer: Sequence[tuple[str, int]] = (), power_modes: bool = False,
                           pinned_modes: Mapping[str, str] | None = None) -> Optional[Problem]:
    """The optimiser's input from measurements. Devices not yet measured are left out.

    The problem's options are the job's own (codec, micro-batches), then every pair in `offer`
    (the choices the controller may hand each device beside its split). With `power_modes`,
    each Jetson's modes too (`with_modes`), a device in `pinned_modes` at that mode only."""
    pinned = pinned or {}
    layers = len(telemetry.activation_numel)
    server = ServerProfile(fwd=tuple(telemetry.server_fwd), bwd=tuple(telemetry.server_bwd), batch_size=telemetry.batch_size)
    devices, measured, fields = [], {}, []
    powers: dict[tuple[str, str], PowerModel] = {}
    for d in telemetry.devices:
        if not (d.fwd and d.bwd and d.up_bps and d.down_bps and d.iterations) or len(d.fwd) != layers:
            continue
        up_bps = with_last_upload(d.up_bps, d.upload_bps)
        if not (MIN_BPS <= up_bps <= MAX_BPS and MIN_BPS <= d.down_bps <= MAX_BPS):
            log.warning("device %s: measured link rate %.3g/%.3g B/s is outside what the model takes; "
                        "left out of this decision", d.name, up_bps, d.down_bps)
            continue
        profile = ComputeProfile(fwd=tuple(d.fwd), bwd=tuple(d.bwd), batch_size=d.batch_size,
                                 device_class=d.device_class, power_mode=d.power_mode, source="measured")
        if profile.batch_size != telemetry.batch_size:
            profile = profile.rescaled(telemetry.batch_size)
        key = (d.device_class, d.power_mode)
        power = powers[key] if key in powers else powers.setdefault(key, _power(*key))  # once per class and mode
        kw = dict(name=d.name, compute=profile, up_bps=up_bps, down_bps=d.down_bps, power=power,
                  iterations=d.iterations, pinned_split=pinned.get(d.name), latency_s=d.latency_s or 0.0,
                  duplex=d.duplex)
        if power_modes:  # as `with_modes`, without building the device twice
            kw.update(_mode_fields(profile, d, (pinned_modes or {}).get(d.name)))
        devices.append(DeviceInput(**kw))
        fields.append(kw)
        measured[d.name] = d
    if not devices:
        return None
    costs = model_costs(telemetry.activation_numel, telemetry.weight_bytes, telemetry.batch_size,
                        codec_bytes=CODEC_BYTES.get(telemetry.codec, 4))
    codec = telemetry.codec if telemetry.codec in CODEC_BYTES else "fp32"
    own = Option(codec, telemetry.micro_batches, costs)
    extra = [pair for pair in dict.fromkeys(offer) if pair != (own.codec, own.micro_batches)]
    options = (own, *(o for c, k in extra for o in options_for(telemetry.activation_numel, telemetry.weight_bytes,
                                                                telemetry.batch_size, (c,), (k,))))
    problem = Problem(devices=tuple(devices), server=server, model=costs, codec=codec, options=options)
    # with_current, with_step_overheads and with_session_overheads in one pass: each device is
    # rebuilt once, with all three, and the session overheads are held against the cost model's
    # inputs with the step overheads put in as arrays
    current = _current_columns(problem, measured, (telemetry.codec, telemetry.micro_batches))
    steps = {n: d.measured_steps for n, d in measured.items()}
    tables = _step_overhead_tables(problem, steps) if any(steps.values()) else [d.step_overheads for d in problem.devices]
    sessions = {n: d.sessions for n, d in measured.items()}
    session: list[Optional[float]] = [None] * len(devices)
    if any(sessions.values()):
        x = CostInputs.of(problem)
        changed = [i for i, (d, t) in enumerate(zip(problem.devices, tables)) if t is not d.step_overheads]
        if changed:
            per_column = x.step_overhead.copy()
            mask = np.tile(np.arange(problem.n_splits) < problem.n_splits - 1, len(problem.options))
            per_column[changed] = np.array([[v for row in tables[i] for v in row] for i in changed], dtype=float) * mask
            x = replace(x, step_overhead=per_column)
        session = _session_overheads(problem, sessions, session_table(problem, x))
    return replace(problem, devices=tuple(
        DeviceInput(**kw, current=c, step_overheads=t, session_overhead_s=d.session_overhead_s if o is None else o)
        for kw, d, c, t, o in zip(fields, problem.devices, current, tables, session)))


def with_last_upload(up_bps: float, upload_bps: Optional[float]) -> float:
    """A device's uplink estimate with its last upload in it, as the device's own will hold it.

    A report is written before the upload that carries it, so the upload's figure reached the
    controller a round late: at the local split, where the weights are all a device moves, a Nano
    whose link fell to a tenth was predicted at 4.1 s for 9.7 s the round after (`ares bench
    bandwidth-drop`). The server times the upload itself; it is folded in with the device's own
    weight (`LINK_SMOOTHING`). A figure the model would not take is left out."""
    if upload_bps is None or not MIN_BPS <= upload_bps <= MAX_BPS or not MIN_BPS <= up_bps <= MAX_BPS:
        return up_bps
    return 1.0 / ((1 - LINK_SMOOTHING) / up_bps + LINK_SMOOTHING / upload_bps)


def with_current(problem: Problem, measured: Mapping[str, DeviceTelemetry], own: tuple[str, int]) -> Problem:
    """The problem with the column each device ran its last round at (its split, and its codec and k,
    else the job's), which the policies keep unless clearly beaten (`STAY_MARGIN`)."""
    current = _current_columns(problem, measured, own)
    return replace(problem, devices=tuple(d if c is d.current else replace(d, current=c)
                                          for d, c in zip(problem.devices, current)))


def _current_columns(problem: Problem, measured: Mapping[str, DeviceTelemetry],
                     own: tuple[str, int]) -> list[Optional[Column]]:
    """Each device's `current` as `with_current` sets it (its own where its report has no split)."""
    n = problem.n_splits
    first = (problem.options[0].codec, problem.options[0].micro_batches)
    found: dict[tuple[str, int, int], Optional[Column]] = {}  # column_of, once per (codec, k, split)
    out = []
    for device in problem.devices:
        d = measured[device.name]
        split = d.split
        if split is None or not 0 <= split < n:
            out.append(device.current)
            continue
        # at the last split only the first option
        key = (d.codec or own[0], d.micro_batches or own[1], split) if split < n - 1 else (*first, split)
        if key not in found:
            found[key] = column_of(problem, *key)
        out.append(found[key])
    return out


def with_step_overheads(problem: Problem, samples: Mapping[str, Sequence[StepSample]]) -> Problem:
    """The problem with what each device's offloaded steps took beyond the model charged to its
    iterations (codec work, framing, a server busy with other devices, up and down not quite
    overlapping): per (split, codec, k) it has run, the mean excess of its last rounds there
    (`_step_excess`); elsewhere, the bytes that setting moves times the excess per byte of all it
    has run (so a setting that moves more is not taken for free), at most their mean excess. The
    cap is there because only part of the excess grows with the bytes (codec work, framing) and
    part does not (a server turn, pipeline fill): charged all per byte, a Nano's move to a setting
    that moves twice the bytes was charged +0.46 s a step for +0.08 s measured. Over the twelve
    first runs of a setting in the `ares bench` comparisons, the cap took the charge's error from 17.7% mean
    (51% at worst) to 14.1% (29%). A device that never offloaded gets none. A setting is
    mispredicted once at most: after one round with it, its own figure holds."""
    if not any(samples.values()):
        return problem
    tables = _step_overhead_tables(problem, samples)
    return replace(problem, devices=tuple(d if t is d.step_overheads else replace(d, step_overheads=t)
                                          for d, t in zip(problem.devices, tables)))


def _step_overhead_tables(problem: Problem, samples: Mapping[str, Sequence[StepSample]]) -> list:
    """Each device's `step_overheads` as `with_step_overheads` sets them (its own where it has no sample)."""
    # bytes moved per iteration, [option, split] (the same for every device)
    moved = (np.array([o.model.up_bytes for o in problem.options], dtype=float)
             + np.array([o.model.down_bytes for o in problem.options], dtype=float)).tolist()
    excess = _step_excess(problem, samples)
    rows = [i for i, known in enumerate(excess) if known]
    out = [d.step_overheads for d in problem.devices]
    if not rows:
        return out
    per_byte, cap = [], []
    for i in rows:
        known = excess[i]
        carried = sum(moved[col.option][col.split] for col in known)
        per_byte.append(sum(known.values()) / carried if carried > 0 else 0.0)
        cap.append(sum(known.values()) / len(known))
    # every cell min(per_byte * moved, cap) at once (the same float arithmetic), then the known cells
    tables = np.minimum(np.array(per_byte)[:, None, None] * np.array(moved)[None],
                        np.array(cap)[:, None, None]).tolist()
    for i, table in zip(rows, tables):
        for col, v in excess[i].items():
            table[col.option][col.split] = v
        out[i] = tuple(map(tuple, table))
    return out


def _step_excess(problem: Problem, samples: Mapping[str, Sequence[StepSample]]) -> list[dict[Column, float]]:
    """Per device, per column it has run: the mean, over its last `STEP_ROUNDS` rounds there, of
    each round's step beyond the model of that round (the link estimates and compute speed it ran
    under), never below 0. Held against today's model instead, a round that ran before the link
    fell would hide the fall; the last round alone takes one noisy round for the next. Every
    device's rounds are modelled in one table, as if each round were a device of its own: the
    device's row of the cost model's inputs with that round's link rates and compute speed (in the
    mode in force, without step overheads), as arrays, no object per round."""
    s = problem.n_splits
    option_of: dict[tuple[str, int], int] = {}
    for o, opt in enumerate(problem.options):
        option_of.setdefault((opt.codec, opt.micro_batches), o)
    columns: dict[tuple[int, int], Column] = {}
    dev, flat, step, up, down, scale = [], [], [], [], [], []
    keys: list[Column] = []
    for i, d in enumerate(problem.devices):
        for x in samples.get(d.name, ()):
            o = option_of.get((x.codec, x.micro_batches))
            if x.split >= s - 1 or o is None:
                continue
            col = columns.get((o, x.split))
            if col is None:
                col = columns[(o, x.split)] = Column(o, x.split)
            dev.append(i)
            flat.append(o * s + x.split)
            keys.append(col)
            step.append(x.step_s)
            up.append(_rate(x.up_bps, d.up_bps))
            down.append(_rate(x.down_bps, d.down_bps))
            scale.append(x.compute_scale)
    if not dev:
        return [{} for _ in problem.devices]
    x = CostInputs.of(problem)
    idx = np.array(dev)
    factor = np.array(scale, dtype=float)[:, None, None]
    then = replace(x.rows(idx), fwd=x.fwd[idx, :1] * factor, bwd=x.bwd[idx, :1] * factor, power=x.power[idx, :1],
                   up_bps=np.array(up, dtype=float)[:, None], down_bps=np.array(down, dtype=float)[:, None],
                   step_overhead=np.zeros((len(dev), x.step_overhead.shape[1])), switch=None)
    modelled = cost_matrices(then).pick("iteration_s", np.arange(len(dev)), np.array(flat)).tolist()
    excess: list[dict[Column, list[float]]] = [{} for _ in problem.devices]
    for i, col, step_s, m in zip(dev, keys, step, modelled):
        excess[i].setdefault(col, []).append(step_s - m)
    return [{col: max(0.0, statistics.fmean(v[-STEP_ROUNDS:])) for col, v in e.items()} for e in excess]


def _rate(measured: Optional[float], now: float) -> float:
    """A step sample's link rate where it has one the model takes, else the report's."""
    return measured if measured is not None and MIN_BPS <= measured <= MAX_BPS else now


def with_session_overheads(problem: Problem, samples: Mapping[str, Sequence[SessionSample]]) -> Problem:
    """The problem with what each device's recent turns (join to accepted upload) took beyond their steps and the model's
    weight transfers (decoding, building and checking the weights, the requests' waits): the median
    over its last three turns after round 0, charged once per round whatever the split. Round 0
    says nothing: its turns pay every process's start-up (seconds beyond their steps in a local
    run, where later turns pay tenths). Without it a sub-second turn is predicted far off."""
    if not any(samples.values()):
        return problem
    overheads = _session_overheads(problem, samples, session_table(problem))
    return replace(problem, devices=tuple(d if o is None else replace(d, session_overhead_s=o)
                                          for d, o in zip(problem.devices, overheads)))


def _session_overheads(problem: Problem, samples: Mapping[str, Sequence[SessionSample]],
                       rest: np.ndarray) -> list[Optional[float]]:
    """Each device's `session_overhead_s` as `with_session_overheads` sets it (None: left as it is),
    from `session_table`'s `rest`."""
    out: list[Optional[float]] = []
    for i, device in enumerate(problem.devices):
        later = [x for x in samples.get(device.name, ()) if x.round > 0 and x.split < problem.n_splits]
        excess = [max(0.0, x.session_s - x.steps_s - float(rest[i, 0, x.split])) for x in later[-3:]]
        out.append(statistics.median(excess) if excess else None)
    return out


def decide(telemetry: Telemetry, policy: SplitPolicy, pinned: Mapping[str, int] | None = None,
           offer: Sequence[tuple[str, int]] = (), power_modes: bool = False,
           pinned_modes: Mapping[str, str] | None = None) -> Optional[Plan]:
    """A plan for the measured devices, or None when nothing has been measured yet.

    Python's cyclic garbage collector is paused while it runs: a decision makes a few objects per
    device (none in a cycle), and at 10,000 devices the collections they set off, each walking
    every live object (the telemetry's too), took a third of its CPU time (0.13 s of 0.39 s)."""
    with _collector_paused():
        problem = problem_from_telemetry(telemetry, pinned, offer, power_modes, pinned_modes)
        return policy.decide(problem) if problem is not None else None


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off inside, as it was after (reference counting still frees)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def offer_pairs(codec: str, micro_batches: int, codecs: Sequence[str],
                ks: Sequence[int]) -> tuple[tuple[str, int], ...]:
    """The (codec, micro-batches) pairs a job offers: its own first, then every pair of the offered
    codecs and ks (each list with the job's own); () when nothing is offered. One rule for `ares
    run` (`offer_codecs`, `offer_micro_batches`) and the operator (`training.offer`)."""
    if not (codecs or ks):
        return ()
    return tuple((c, k) for c in dict.fromkeys([codec, *codecs]) for k in dict.fromkeys([micro_batches, *ks]))


def plan_options(plan: Plan) -> dict[str, tuple[str, int]]:
    """Each device's (codec, micro-batches) as the plan chose them."""
    return {p.name: (p.codec, p.micro_batches) for p in plan.devices}


def plan_modes(plan: Plan) -> dict[str, str]:
    """Each device's power mode as the plan chose it (devices with a known mode only)."""
    return {p.name: p.power_mode for p in plan.devices if p.power_mode}


class SplitSink(Protocol):
    def write(self, splits: Mapping[str, int]) -> None: ...


@runtime_checkable
class OptionSink(Protocol):
    """A sink that can also hand a device its (codec, micro-batches); called before `write`."""

    def write_options(self, options: Mapping[str, tuple[str, int]]) -> None: ...


@runtime_checkable
class ModeSink(Protocol):
    """A sink that can also hand a device its power mode; called before `write`. The device's
    host applies it between rounds (the local runner's devices at their next round start)."""

    def write_modes(self, modes: Mapping[str, str]) -> None: ...


@dataclass
class FileSplitSink:
    """The local runner's sink: one split file per device, `<dir>/<device>.split`."""

    directory: Path

    def path(self, device: str) -> Path:
        return Path(self.directory) / f"{device}.split"

    def write(self, splits: Mapping[str, int]) -> None:
        for device, split in splits.items():
            write_split(self.path(device), split)

    def write_options(self, options: Mapping[str, tuple[str, int]]) -> None:
        """`<device>.split.options` beside each split file (ares.runtime.splitfile)."""
        for device, (codec, micro_batches) in options.items():
            write_options(self.path(device), codec, micro_batches)

    def write_modes(self, modes: Mapping[str, str]) -> None:
        """`<device>.split.mode` beside each split file: the power mode (ares.runtime.splitfile)."""
        for device, mode in modes.items():
            write_mode(self.path(device), mode)


@dataclass
class Controller:
    """One decision per call: telemetry -> policy -> sink. The caller decides how often.

    With `power_modes` the policy also chooses each Jetson's power mode; where the sink can
    (`ModeSink`), the modes that changed are written first, like the step options.

    With `offer` (pairs of codec and micro-batches) the policy also chooses each device's pair
    among the job's own and those; where the sink can (`OptionSink`), the pairs that changed
    are written before the splits, so a device that reads a new split finds its options too.
    """

    telemetry: Callable[[], Telemetry]
    policy: SplitPolicy
    sink: SplitSink
    pinned: Mapping[str, int] = field(default_factory=dict)
    last: dict[str, int] = field(default_factory=dict)
    offer: tuple[tuple[str, int], ...] = ()
    last_options: dict[str, tuple[str, int]] = field(default_factory=dict)
    power_modes: bool = False  # the policy also chooses each Jetson's power mode (a `ModeSink` applies it)
    pinned_modes: Mapping[str, str] = field(default_factory=dict)
    last_modes: dict[str, str] = field(default_factory=dict)

    def run_once(self) -> Optional[Plan]:
        telemetry = self.telemetry()
        plan = decide(telemetry, self.policy, self.pinned, self.offer, self.power_modes, self.pinned_modes)
        if plan is None:
            return None
        if self.power_modes and isinstance(self.sink, ModeSink):
            chosen_modes = plan_modes(plan)
            switched = {k: v for k, v in chosen_modes.items() if self.last_modes.get(k, "") != v}
            if switched:
                log.info("%s policy: power modes %s", plan.policy, switched)
                self.sink.write_modes(switched)
                self.last_modes.update(switched)
        if self.offer and isinstance(self.sink, OptionSink):
            chosen = plan_options(plan)
            moved = {k: v for k, v in chosen.items() if self.last_options.get(k) != v}
            if moved:
                log.info("%s policy: new step options %s", plan.policy, moved)
                self.sink.write_options(moved)
                self.last_options.update(moved)
        splits = {p.name: p.split for p in plan.devices}
        changed = {k: v for k, v in splits.items() if self.last.get(k) != v}
        if changed:
            log.info("%s policy: new splits %s (predicted round %.2f s)", plan.policy, changed,
                     plan.round_s + telemetry.round_overhead_s)
            self.sink.write(changed)
            self.last.update(changed)
        return plan
