"""The adaptive loop: read the server's telemetry, run the optimiser, write split decisions.

The same code runs in the local runner and in the Kubernetes operator; they differ only in
the `SplitSink` (split files on disk, or the `ares.io/split-point` pod annotation). The
policy decides and never does I/O; this module owns the I/O around it.

A decision reads the telemetry into the optimiser's input as arrays (`arrays_from_telemetry`):
the telemetry as columns (`TelemetryColumns`, as the server sends it to a controller), its step
and session samples held against the cost model as rows of arrays, no object per device. `problem_from_telemetry` gives the same figures as a `Problem`
of dataclasses, for whoever wants to look at one device (a test asserts that both agree to the
bit, and decide the same plan).

Power modes (`power_modes=True`): every device of a class with modes (a Jetson) that reports
the mode it ran in gets its other modes in the decision, their profiles derived from the one
it measured (marked derived) and their power from the table, and a switch charged at the
pause its host last measured (else `DEFAULT_SWITCH_S`). A mode pinned for a device is the only
one it may take; a device whose host could not switch it (`power_mode_failed`) is kept at the
mode in force, so the next plan is made for the mode it really runs in.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import logging
import math
import threading
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol, Sequence, runtime_checkable

import httpx
import numpy as np

from ares.core.energy import PowerModel, power_model
from ares.core.messages import (LINK_SMOOTHING, STEP_ROUNDS, DeviceTelemetry, ServerStatus, SessionColumns, SessionSample,
                                 StepColumns, StepSample, Telemetry, TelemetryColumns)
from ares.core.costmodel import (CODEC_BYTES, MAX_BPS, MIN_BPS, Column, CostInputs, DeviceInput, ModelCosts, Option, Plan,
                                 PowerMode, Problem, ProblemArrays, cell_costs, check_split, model_costs, options_for,
                                 other_modes, session_table, valid_columns)
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
    """The server's telemetry, one object per device: for people and reports."""
    return Telemetry.model_validate_json(_get(f"{url.rstrip('/')}/v1/telemetry", token, timeout_s, tls).content)


def fetch_columns(url: str, token: str, timeout_s: float = 10.0, tls: Optional[ClientTls] = None) -> TelemetryColumns:
    """The server's telemetry as columns: what a decision reads (`decide`)."""
    return TelemetryColumns.model_validate_json(
        _get(f"{url.rstrip('/')}/v1/telemetry?columns=true", token, timeout_s, tls).content)


AnyTelemetry = Telemetry | TelemetryColumns


def as_columns(telemetry: AnyTelemetry) -> TelemetryColumns:
    """The telemetry as columns (`TelemetryColumns.of` where it came as one object per device)."""
    return telemetry if isinstance(telemetry, TelemetryColumns) else TelemetryColumns.of(telemetry)


def _power(device_class: str, power_mode: str) -> PowerModel:
    try:
        return power_model(device_class, power_mode)
    except ValueError:
        return ASSUMED_POWER



def with_modes(device: DeviceInput, measured: DeviceTelemetry, pinned_mode: Optional[str] = None) -> DeviceInput:
    """The device with its class's other power modes in the decision (see the module docstring);
    as it was when its class has none or its mode in force is not known."""
    fields = _mode_fields(device.compute, measured.power_mode_failed, measured.switch_s, pinned_mode)
    return replace(device, **fields) if fields else device


def _mode_fields(profile: ComputeProfile, failed: str, switch_s: Optional[float], pinned_mode: Optional[str]) -> dict:
    """What `with_modes` changes in a device with this profile and report ({} where nothing)."""
    rule = _mode_rule(profile.device_class, profile.power_mode, failed, switch_s, pinned_mode)
    if rule is None:
        return {}
    return {"modes": other_modes(profile), "pinned_mode": rule[0], "switch_s": rule[1]}


def _mode_rule(device_class: str, power_mode: str, failed: str, switch_s: Optional[float],
               pinned_mode: Optional[str]) -> Optional[tuple[Optional[str], float]]:
    """(the mode it is pinned to, the seconds a switch costs) for a device of a class with modes whose
    mode in force is known, from its report's `power_mode_failed` and `switch_s`; None for any other."""
    names = modes_of(device_class)
    if power_mode not in names:
        return None
    pin = pinned_mode if pinned_mode in names else None
    if failed:
        pin = power_mode  # the host could not switch it: plan for the mode in force
    return pin, switch_s if switch_s is not None else DEFAULT_SWITCH_S


@functools.lru_cache(maxsize=64)
def _unit_modes(device_class: str, power_mode: str, n_splits: int) -> tuple[PowerMode, ...]:
    """`other_modes` of a profile of this class and mode whose every time is 1 s: in each other mode
    its times are the factors that mode's derived profile multiplies a measured one's by
    (`derive_power_mode`), so a whole fleet's are derived with one multiplication per mode."""
    unit = (1.0,) * n_splits
    return other_modes(ComputeProfile(unit, unit, device_class=device_class, power_mode=power_mode, source="measured"))


@dataclass(frozen=True)
class _Reading:
    """What a decision reads from the telemetry: the fields of the devices it takes (`_REPORT_FIELDS`),
    in the problem's order, and their problem as arrays (with each device's current column, step and
    session overheads)."""

    fields: dict[str, list]
    arrays: ProblemArrays
    powers: list[PowerModel]  # each device's in its mode in force
    timed: np.ndarray  # (N,) bool: its step overheads are its own (it has step samples)
    server: ServerProfile
    model: ModelCosts
    codec: str


def problem_from_telemetry(telemetry: AnyTelemetry, pinned: Mapping[str, int] | None = None,
                           offer: Sequence[tuple[str, int]] = (), power_modes: bool = False,
                           pinned_modes: Mapping[str, str] | None = None) -> Optional[Problem]:
    """The optimiser's input from measurements, as dataclasses: a `DeviceInput` per device with the
    figures `arrays_from_telemetry` reads (what `decide` decides over, without these objects).
    Devices not yet measured are left out.

    The problem's options are the job's own (codec, micro-batches), then every pair in `offer`
    (the choices the controller may hand each device beside its split). With `power_modes`,
    each Jetson's modes too (`with_modes`), a device in `pinned_modes` at that mode only. Each
    device comes with the column it ran its last round at (`with_current`), its step overheads
    (`with_step_overheads`) and its session overhead (`with_session_overheads`)."""
    pinned, pinned_modes = pinned or {}, pinned_modes or {}
    read = _read(telemetry, pinned, offer, power_modes, pinned_modes)
    if read is None:
        return None
    x, s, n_opt = read.arrays.x, read.arrays.n_splits, len(read.arrays.options)
    devices, f = [], read.fields
    for i, name in enumerate(f["name"]):
        profile = ComputeProfile(fwd=tuple(f["fwd"][i]), bwd=tuple(f["bwd"][i]), batch_size=f["batch_size"][i],
                                 device_class=f["device_class"][i], power_mode=f["power_mode"][i], source="measured")
        if profile.batch_size != telemetry.batch_size:
            profile = profile.rescaled(telemetry.batch_size)
        current = int(read.arrays.current[i])
        steps = tuple(map(tuple, x.step_overhead[i].reshape(n_opt, s).tolist())) if read.timed[i] else None
        modes = (_mode_fields(profile, f["power_mode_failed"][i], f["switch_s"][i], pinned_modes.get(name))
                 if power_modes else {})
        devices.append(DeviceInput(
            name=name, compute=profile, up_bps=float(x.up_bps[i, 0]), down_bps=f["down_bps"][i], power=read.powers[i],
            iterations=f["iterations"][i], pinned_split=pinned.get(name), latency_s=f["latency_s"][i] or 0.0,
            duplex=f["duplex"][i], current=Column.at(current, s, n_opt) if current >= 0 else None,
            step_overheads=steps, session_overhead_s=float(x.session[i, 0]), shard=f["shard"][i], **modes))
    return Problem(devices=tuple(devices), server=read.server, model=read.model, codec=read.codec,
                   options=read.arrays.options, noise=read.arrays.noise)


def arrays_from_telemetry(telemetry: AnyTelemetry, pinned: Mapping[str, int] | None = None,
                          offer: Sequence[tuple[str, int]] = (), power_modes: bool = False,
                          pinned_modes: Mapping[str, str] | None = None) -> Optional[ProblemArrays]:
    """`problem_from_telemetry`'s problem as arrays, read from the reports without an object per
    device: what `decide` decides over. None when no device has been measured yet."""
    read = _read(telemetry, pinned or {}, offer, power_modes, pinned_modes or {})
    return None if read is None else read.arrays


# What a decision reads of every device (`DeviceTelemetry`'s fields; columns of `TelemetryColumns`).
_REPORT_FIELDS = ("name", "device_class", "power_mode", "fwd", "bwd", "batch_size", "up_bps", "upload_bps", "down_bps",
                  "iterations", "latency_s", "duplex", "split", "codec", "micro_batches", "power_mode_failed", "switch_s", "shard")


@dataclass(frozen=True)
class _Samples:
    """Samples (step or session) as arrays or lists, one entry per sample: `owner` is the row of the
    device it is of, each row's samples together and oldest first."""

    owner: np.ndarray
    fields: dict[str, Sequence]

    @classmethod
    def of(cls, columns: StepColumns | SessionColumns) -> "_Samples":
        values = dict(columns.__dict__)
        return cls(np.array(values.pop("device"), dtype=int), values)

    @classmethod
    def of_rows(cls, samples: Sequence[Sequence[Any]], names: Sequence[str]) -> "_Samples":
        """From one sequence of sample objects per row (fields `names`)."""
        owner = np.repeat(np.arange(len(samples)), [len(taken) for taken in samples])
        every = list(itertools.chain.from_iterable(samples))
        return cls(owner, {name: [getattr(v, name) for v in every] for name in names})

    def taken(self, keep: Sequence[int], n: int) -> "_Samples":
        """The samples of the rows `keep` (of n), numbered as they are in `keep`."""
        row = np.full(n, -1)
        row[np.asarray(keep, dtype=int)] = np.arange(len(keep))
        owner = row[self.owner]
        at = np.flatnonzero(owner >= 0)
        return _Samples(owner[at], {name: [values[j] for j in at.tolist()] for name, values in self.fields.items()})


_STEP_FIELDS = tuple(StepSample.model_fields)
_SESSION_FIELDS = tuple(SessionSample.model_fields)


def _usable(c: TelemetryColumns) -> tuple[dict[str, list], np.ndarray, _Samples, _Samples]:
    """What a decision takes of the telemetry: the `_REPORT_FIELDS` of the devices measured, with a
    profile of the model's layers and link rates the model takes (a warning for the rest), their
    uplink estimates (`uplinks_with_last_upload`), and their step and session samples."""
    layers = len(c.activation_numel)
    n = c.n_devices
    f = {name: c.column(name) for name in _REPORT_FIELDS}
    steps, sessions = _Samples.of(c.steps), _Samples.of(c.sessions)
    if not n:
        return f, np.zeros(0), steps, sessions
    keep = [i for i, (fwd, bwd, up, down, it) in enumerate(zip(f["fwd"], f["bwd"], f["up_bps"], f["down_bps"],
                                                                 f["iterations"]))
            if fwd and bwd and up and down and it and len(fwd) == layers]
    def taken(name: str) -> list:
        return f[name] if len(keep) == n else [f[name][i] for i in keep]

    up = uplinks_with_last_upload(np.array(taken("up_bps"), dtype=float),
                                  np.array(taken("upload_bps"), dtype=float))  # None: nan
    down = np.array(taken("down_bps"), dtype=float)
    fine = (up >= MIN_BPS) & (up <= MAX_BPS) & (down >= MIN_BPS) & (down <= MAX_BPS)
    if not fine.all():
        for i, u, ok in zip(keep, up.tolist(), fine.tolist()):
            if not ok:
                log.warning("device %s: measured link rate %.3g/%.3g B/s is outside what the model takes; "
                            "left out of this decision", f["name"][i], u, f["down_bps"][i])
        keep, up = [i for i, ok in zip(keep, fine.tolist()) if ok], up[fine]
    if len(keep) < n:
        f = {name: [values[i] for i in keep] for name, values in f.items()}
        steps, sessions = steps.taken(keep, n), sessions.taken(keep, n)
    return f, up, steps, sessions


def _options(telemetry: TelemetryColumns, offer: Sequence[tuple[str, int]]) -> tuple[ModelCosts, str, tuple[Option, ...]]:
    """The model's byte counts with the job's codec, that codec, and the options: the job's own
    (codec, micro-batches) first, then every other pair in `offer`."""
    costs = model_costs(telemetry.activation_numel, telemetry.weight_bytes, telemetry.batch_size,
                        codec_bytes=CODEC_BYTES.get(telemetry.codec, 4))
    codec = telemetry.codec if telemetry.codec in CODEC_BYTES else "fp32"
    own = Option(codec, telemetry.micro_batches, costs)
    extra = [pair for pair in dict.fromkeys(offer) if pair != (own.codec, own.micro_batches)]
    return costs, codec, (own, *(o for c, k in extra for o in options_for(
        telemetry.activation_numel, telemetry.weight_bytes, telemetry.batch_size, (c,), (k,))))


def _profiles(f: Mapping[str, tuple], n_splits: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, S) each: every report's forward and backward seconds per split (`_usable`'s fields),
    checked as `ComputeProfile` and `Problem` check them, at the telemetry's batch size
    (`ComputeProfile.rescaled`'s arithmetic: the same floats)."""
    n = len(f["name"])
    out = []
    for times in (f["fwd"], f["bwd"]):
        if set(map(len, times)) != {n_splits}:
            i = next(i for i in range(n) if len(f["fwd"][i]) != n_splits or len(f["bwd"][i]) != n_splits)
            raise ValueError(f"device {f['name'][i]!r}: its profile has {len(f['fwd'][i])} forward and "
                             f"{len(f['bwd'][i])} backward times; the model has {n_splits} splits")
        out.append(np.fromiter(itertools.chain.from_iterable(times), float, n * n_splits).reshape(n, n_splits))
    batch = np.array(f["batch_size"])
    if (batch < 1).any():
        raise ValueError(f"ComputeProfile: batch_size must be a positive integer, got {int(batch[batch < 1][0])}")
    other = np.flatnonzero(batch != batch_size)
    for times, what in zip(out, ("fwd", "bwd")):
        ok = np.isfinite(times) & (times >= 0)
        if not ok.all():
            raise ValueError(f"{what} must hold finite seconds >= 0, got {float(times[~ok][0])!r}")
        if other.size:
            times[other] *= (batch_size / batch[other])[:, None]
    return out[0], out[1]


def _read(telemetry: AnyTelemetry, pinned: Mapping[str, int], offer: Sequence[tuple[str, int]], power_modes: bool,
          pinned_modes: Mapping[str, str]) -> Optional[_Reading]:
    """The decision's input, as arrays, from the telemetry (None when no device is usable), with the
    checks the dataclasses make of the same figures."""
    telemetry = as_columns(telemetry)
    f, up, steps, sessions = _usable(telemetry)
    if not f["name"]:
        return None
    model, codec, options = _options(telemetry, offer)
    s, n_opt, n = model.n_splits, len(options), len(f["name"])
    server = ServerProfile(fwd=tuple(telemetry.server_fwd), bwd=tuple(telemetry.server_bwd),
                           batch_size=telemetry.batch_size)
    if server.n_splits != s:
        raise ValueError(f"server profile has {server.n_splits} splits, the model {s}")
    names = tuple(f["name"])
    if len(set(names)) != n:
        raise ValueError(f"device names must be unique; repeated: {sorted(k for k, v in Counter(names).items() if v > 1)}")
    fwd, bwd = _profiles(f, s, telemetry.batch_size)
    kinds = list(zip(f["device_class"], f["power_mode"]))
    table = {kind: _power(*kind) for kind in dict.fromkeys(kinds)}  # once per class and mode
    powers = [table[kind] for kind in kinds]
    iterations, latency = np.array(f["iterations"]), np.array([v or 0.0 for v in f["latency_s"]], dtype=float)
    for bad, what in ((iterations < 0, "iterations must be an integer >= 0"),
                      (latency < 0, "latency_s must be >= 0 seconds")):
        if bad.any():
            raise ValueError(f"device {names[int(np.argmax(bad))]!r}: {what}")
    pins = np.full(n, -1)
    if pinned:
        index = {name: i for i, name in enumerate(names)}
        for name, split in pinned.items():
            if name in index:
                pins[index[name]] = check_split(split, s, f"device {name!r}: pinned split")
    modes = _modes(f, kinds, table, fwd, bwd, power_modes, pinned_modes)
    x = CostInputs(
        fwd=modes.fwd, bwd=modes.bwd, server_s=np.array(server.fwd) + np.array(server.bwd),
        up_bytes=np.array([o.model.up_bytes for o in options], dtype=float),
        down_bytes=np.array([o.model.down_bytes for o in options], dtype=float),
        micro=np.array([o.micro_batches for o in options], dtype=float),
        weight_bytes=np.array(model.weight_bytes, dtype=float), up_bps=np.array(up, dtype=float)[:, None],
        down_bps=np.array(f["down_bps"], dtype=float)[:, None], iterations=iterations.astype(float)[:, None],
        power=modes.watts, latency=latency[:, None], session=np.zeros((n, 1)), step_overhead=np.zeros((n, n_opt * s)),
        half=np.array([v == "half" for v in f["duplex"]])[:, None], names=names, switch=modes.switch)
    # the step overheads, then the session overheads held against a model with them in
    rows, tables = _overhead_tables(options, s, _excess(x, options, steps))
    timed = np.zeros(n, dtype=bool)
    if rows:
        step = x.step_overhead.copy()
        step[rows] = tables.reshape(len(rows), n_opt * s) * np.tile(np.arange(s) < s - 1, n_opt)
        x, timed[rows] = replace(x, step_overhead=step), True
    if sessions.owner.size:
        # held against the model of the job's own option (the first), in the mode in force: what
        # `_session_excess` reads of `session_table`
        with_sessions = np.unique(sessions.owner)
        rows = with_sessions
        first = replace(x, fwd=x.fwd[rows, :1], bwd=x.bwd[rows, :1], power=x.power[rows, :1], switch=None,
                        up_bytes=x.up_bytes[:1], down_bytes=x.down_bytes[:1], micro=x.micro[:1],
                        up_bps=x.up_bps[rows], down_bps=x.down_bps[rows], iterations=x.iterations[rows],
                        latency=x.latency[rows], session=x.session[rows], step_overhead=x.step_overhead[rows, :s],
                        half=x.half[rows], names=tuple(map(names.__getitem__, with_sessions.tolist())))
        found = _session_excess_of(s, len(rows), _Samples(np.searchsorted(rows, sessions.owner), sessions.fields),
                                   session_table(x=first))
        session = x.session.copy()
        for i, v in zip(with_sessions.tolist(), found):
            if v is not None:
                session[i, 0] = v
        x = replace(x, session=session)
    own = (telemetry.codec, telemetry.micro_batches)
    ran = zip(f["split"], f["codec"], f["micro_batches"])
    current = _current_columns(options, s, list(ran), own, [-1] * n, lambda o, split: o * s + split)
    arrays = ProblemArrays(x=x, options=options, mode_counts=modes.counts,
                           valid=valid_columns(s, n_opt, modes.counts), alpha=np.full(n, math.nan),
                           pinned_split=pins, pinned_mode=modes.pinned,
                           current=np.array([-1 if c is None else c for c in current]),
                           mode_labels=modes.labels_of, labels=modes.labels, noise=_round_noise_of(steps),
                           shard=np.array(f["shard"], dtype=int) if any(f["shard"]) else None)
    return _Reading(f, arrays, powers, timed, server, model, codec)


NOISE_DEVICES = 1_000  # the devices with step samples a noise estimate reads at most
NOISE_PAIRS = 8  # fewer pairs of samples than this: no estimate (0)


def round_noise(steps: Sequence[Sequence[StepSample]]) -> float:
    """How much a device's step time moves from one round to the next, as a lognormal sigma, from
    the fleet's step samples (one sequence per device, oldest first): each device's consecutive
    samples at one setting (split, codec, micro-batches), their log ratio, over at most
    `NOISE_DEVICES` devices; the median absolute ratio over 0.6745 (a spread that a few devices
    whose link or load really changed do not move), over sqrt(2) (a ratio holds two rounds' draws).
    0 with fewer than `NOISE_PAIRS` pairs. The straggler policy keeps this much from the round where
    it spends slack (`noise_headroom`)."""
    return _round_noise_of(_Samples.of_rows(steps, _STEP_FIELDS))


def _round_noise_of(steps: _Samples) -> float:
    """`round_noise` of samples as arrays."""
    owner = steps.owner
    if owner.size < 2:
        return 0.0
    counts = np.bincount(owner)
    devices = np.flatnonzero(counts >= 2)[:NOISE_DEVICES]  # each with a pair at least, in order
    at = np.flatnonzero(np.isin(owner, devices))
    if at.size < 2:
        return 0.0
    codecs: dict[str, int] = {}
    codec = np.array([codecs.setdefault(v, len(codecs)) for v in map(steps.fields["codec"].__getitem__, at.tolist())])
    split = np.asarray(steps.fields["split"], dtype=int)[at]
    k = np.asarray(steps.fields["micro_batches"], dtype=int)[at]
    step = np.asarray(steps.fields["step_s"], dtype=float)[at]
    setting = ((owner[at] * 256 + split) * 64 + k) * len(codecs) + codec
    order = np.argsort(setting, kind="stable")  # each device's setting together, oldest first
    setting, step = setting[order], step[order]
    pair = (setting[1:] == setting[:-1]) & (step[1:] > 0) & (step[:-1] > 0)
    if pair.sum() < NOISE_PAIRS:
        return 0.0
    ratios = np.log(step[1:][pair] / step[:-1][pair])
    return float(np.median(np.abs(ratios))) / 0.6745 / math.sqrt(2)


@dataclass(frozen=True)
class _Modes:
    """Every device's power modes as arrays (`CostInputs` and `ProblemArrays` fields)."""

    fwd: np.ndarray  # (N, M, S)
    bwd: np.ndarray
    watts: np.ndarray  # (N, M, 3)
    switch: Optional[np.ndarray]  # (N, M); None with one mode
    counts: np.ndarray  # (N,)
    pinned: np.ndarray  # (N,) the pinned mode's index; -1: none
    labels_of: np.ndarray  # (N, M) rows of `labels`
    labels: tuple[tuple[str, str, str], ...]


def _modes(f: Mapping[str, tuple], kinds: Sequence[tuple[str, str]],
           power: Mapping[tuple[str, str], PowerModel], fwd: np.ndarray, bwd: np.ndarray, power_modes: bool,
           pinned_modes: Mapping[str, str]) -> _Modes:
    """Each device's power modes as arrays (its report's fields `f`): the one in force (its `kinds`:
    class and mode, and their `power`), and, with `power_modes` (in the decision), its class's other modes
    (`with_modes`) with their profiles derived from the one measured and their power from the
    table; past a device's own modes, its mode in force again (never valid)."""
    n, s = fwd.shape
    labels: dict[tuple[str, str, str], int] = {}
    in_force = {kind: labels.setdefault((kind[1], "measured", p.source), len(labels)) for kind, p in power.items()}
    watts = {kind: (p.compute_w, p.tx_w, p.rx_w) for kind, p in power.items()}
    out_w = np.array([watts[kind] for kind in kinds], dtype=float)[:, None]
    labels_of = np.array([in_force[kind] for kind in kinds])[:, None]
    # the devices with other modes, by class and mode in force
    groups: dict[tuple[str, str], list[int]] = {kind: [] for kind in power if power_modes and kind[1] in modes_of(kind[0])}
    for i, kind in enumerate(kinds):
        if kind in groups:
            groups[kind].append(i)
    counts = np.ones(n, dtype=int)
    for (cls, mode), members in groups.items():
        counts[members] = 1 + len(_unit_modes(cls, mode, s))
    m = int(counts.max())
    if m == 1:
        return _Modes(fwd[:, None], bwd[:, None], out_w, None, counts, np.full(n, -1), labels_of, tuple(labels))
    out_f, out_b = np.repeat(fwd[:, None], m, axis=1), np.repeat(bwd[:, None], m, axis=1)
    out_w, labels_of = np.repeat(out_w, m, axis=1), np.repeat(labels_of, m, axis=1)
    pinned, switch = np.full(n, -1), np.zeros((n, m))
    for (cls, mode), members in groups.items():
        rows = np.array(members)
        others = _unit_modes(cls, mode, s)
        for j, other in enumerate(others, start=1):
            # `ComputeProfile.scaled`'s arithmetic (each time times the factor): the same floats
            out_f[rows, j] = fwd[rows] * np.array(other.compute.fwd)
            out_b[rows, j] = bwd[rows] * np.array(other.compute.bwd)
            out_w[rows, j] = (other.power.compute_w, other.power.tx_w, other.power.rx_w)
            labels_of[rows, j] = labels.setdefault((other.name, other.compute.source, other.power.source), len(labels))
        names = [mode, *(o.name for o in others)]
        # `_mode_rule` over the group as arrays: the pause measured, else the default; a pin only where
        # a mode is pinned or the host could not switch (`_mode_rule` itself for those few)
        measured = np.array([f["switch_s"][i] for i in members], dtype=float)  # None: nan
        pauses = np.where(np.isnan(measured), DEFAULT_SWITCH_S, measured)
        bad = ~np.isfinite(pauses) | (pauses < 0)
        if bad.any():
            i = members[int(np.argmax(bad))]
            raise ValueError(f"device {f['name'][i]!r}: switch_s must be >= 0 seconds, got {f['switch_s'][i]!r}")
        switch[rows, 1:] = pauses[:, None]
        for i in members:
            if f["power_mode_failed"][i] or f["name"][i] in pinned_modes:
                pin, _ = _mode_rule(cls, mode, f["power_mode_failed"][i], f["switch_s"][i],  # type: ignore[misc]
                                    pinned_modes.get(f["name"][i]))
                if pin is not None:
                    pinned[i] = names.index(pin)
    return _Modes(out_f, out_b, out_w, switch, counts, pinned, labels_of, tuple(labels))


def uplinks_with_last_upload(up_bps: np.ndarray, upload_bps: np.ndarray) -> np.ndarray:
    """The devices' uplink estimates with their last uploads in them, as the devices' own will hold
    them (nan in `upload_bps`: no figure).

    A report is written before the upload that carries it, so the upload's figure reached the
    controller a round late: at the local split, where the weights are all a device moves, a Nano
    whose link fell to a tenth was predicted at 4.1 s for 9.7 s the round after (`ares bench
    bandwidth-drop`). The server times the upload itself; it is folded in with the device's own
    weight (`LINK_SMOOTHING`). A figure the model would not take is left out. Over arrays: at
    10,000 devices one call per device took a fifth of the controller's decision."""
    taken = (np.isfinite(upload_bps) & (upload_bps >= MIN_BPS) & (upload_bps <= MAX_BPS)
             & (up_bps >= MIN_BPS) & (up_bps <= MAX_BPS))
    with np.errstate(divide="ignore", invalid="ignore"):
        blended = 1.0 / ((1 - LINK_SMOOTHING) / up_bps + LINK_SMOOTHING / np.where(taken, upload_bps, 1.0))
    return np.where(taken, blended, up_bps)


def with_current(problem: Problem, measured: Mapping[str, DeviceTelemetry], own: tuple[str, int]) -> Problem:
    """The problem with the column each device ran its last round at (its split, and its codec and k,
    else the job's), which the policies keep unless clearly beaten (`STAY_MARGIN`)."""
    ran = [(m.split, m.codec, m.micro_batches) for m in (measured[d.name] for d in problem.devices)]
    current = _current_columns(problem.options, problem.n_splits, ran, own, [d.current for d in problem.devices])
    return replace(problem, devices=tuple(d if c is d.current else replace(d, current=c)
                                          for d, c in zip(problem.devices, current)))


def _current_columns(options: Sequence[Option], n_splits: int, ran: Sequence[tuple[Optional[int], Optional[str],
                                                                                   Optional[int]]],
                     own: tuple[str, int], keep: Sequence[Any], make: Callable[[int, int], Any] = Column) -> list:
    """Each device's column as `with_current` sets it from what its report says it `ran` (split,
    codec, micro-batches): `make(option, split)` (a `Column`, or where made for arrays, its flat
    index), None where that option is not offered, `keep`'s where its report has no split."""
    index = {(o.codec, o.micro_batches): i for i, o in enumerate(options)}  # a problem's pairs are unique
    first = (options[0].codec, options[0].micro_batches)
    no_split = object()

    def column(split: Optional[int], codec: Optional[str], micro_batches: Optional[int]) -> Any:
        if split is None or not 0 <= split < n_splits:
            return no_split
        # at the last split only the first option
        pair = (codec or own[0], micro_batches or own[1]) if split < n_splits - 1 else first
        return make(index[pair], split) if pair in index else None

    found: dict[tuple, Any] = {}  # once per (split, codec, k) reported
    columns = [found[r] if r in found else found.setdefault(r, column(*r)) for r in ran]
    return [kept if c is no_split else c for c, kept in zip(columns, keep)]


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
    found = [(i, col.option, col.split, v) for i, e in enumerate(_step_excess(problem, samples)) for col, v in e.items()]
    rows, tables = _overhead_tables(problem.options, problem.n_splits, _Excess(*map(np.array, zip(*found)))
                                    if found else _Excess.none())
    out = [d.step_overheads for d in problem.devices]
    for i, table in zip(rows, tables.tolist()):
        out[i] = tuple(map(tuple, table))
    return out


@dataclass(frozen=True)
class _Excess:
    """Step excesses, one per (row, option, split) that ran, rows ascending, each row's in the order
    its samples first ran them."""

    rows: np.ndarray
    option: np.ndarray
    split: np.ndarray
    value: np.ndarray

    @classmethod
    def none(cls) -> "_Excess":
        empty = np.zeros(0, dtype=int)
        return cls(empty, empty, empty, np.zeros(0))


def _in_order_sums(rows: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Per row (0..n-1), the sum of its `values` left to right in their order here, as Python's
    `sum` adds them (the same floats): one vectorised step per position within a row."""
    if not rows.size:
        return np.zeros(n)
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])  # `rows` ascend: each row's entries together
    position = np.arange(len(rows)) - np.repeat(starts, np.diff(np.r_[starts, len(rows)]))
    total = np.zeros(n)
    for j in range(int(position.max()) + 1):
        at = position == j
        total[rows[at]] += values[at]
    return total


def _overhead_tables(options: Sequence[Option], n_splits: int, excess: _Excess) -> tuple[list[int], np.ndarray]:
    """The rows with a step excess, and their step overheads [row, option, split] from it (see
    `with_step_overheads`)."""
    # bytes moved per iteration, [option, split] (the same for every device)
    moved = (np.array([o.model.up_bytes for o in options], dtype=float)
             + np.array([o.model.down_bytes for o in options], dtype=float))
    rows, where = np.unique(excess.rows, return_inverse=True)
    if not rows.size:
        return [], np.zeros((0, len(options), n_splits))
    total = _in_order_sums(where, excess.value, len(rows))
    carried = _in_order_sums(where, moved[excess.option, excess.split], len(rows))
    per_byte = np.divide(total, carried, out=np.zeros_like(total), where=carried > 0)
    cap = total / np.bincount(where)
    # every cell min(per_byte * moved, cap) at once, then the known cells
    tables = np.minimum(per_byte[:, None, None] * moved[None], cap[:, None, None])
    tables[where, excess.option, excess.split] = excess.value
    return rows.tolist(), tables


def _step_excess(problem: Problem, samples: Mapping[str, Sequence[StepSample]]) -> list[dict[Column, float]]:
    """Per device, per column it has run: the mean, over its last `STEP_ROUNDS` rounds there, of
    each round's step beyond the model of that round (`_excess`)."""
    excess = _excess(CostInputs.of(problem), problem.options,
                     _Samples.of_rows([samples.get(d.name, ()) for d in problem.devices], _STEP_FIELDS))
    out: list[dict[Column, float]] = [{} for _ in problem.devices]
    for i, o, split, v in zip(excess.rows.tolist(), excess.option.tolist(), excess.split.tolist(),
                              excess.value.tolist()):
        out[i][Column(o, split)] = v
    return out


def _excess(x: CostInputs, options: Sequence[Option], samples: _Samples) -> _Excess:
    """Per row of `x`, per (option, split) its step `samples` ran at: the mean, over the last
    `STEP_ROUNDS` rounds there, of each round's step beyond the model of that round (the link
    estimates and compute speed it ran under), never below 0. Held against today's model instead,
    a round that ran before the link fell would hide the fall; the last round alone takes one noisy
    round for the next. Every row's rounds are modelled at once, as if each round were a device of
    its own: the row of the cost model's inputs with that round's link rates and compute speed (in
    the mode in force, without step overheads), as arrays, no object per round."""
    s = x.weight_bytes.shape[0]
    option_of: dict[tuple[str, int], int] = {}
    for o, opt in enumerate(options):
        option_of.setdefault((opt.codec, opt.micro_batches), o)
    owner = samples.owner
    if not owner.size:
        return _Excess.none()
    v = samples.fields
    step, up, down, scale = v["step_s"], v["up_bps"], v["down_bps"], v["compute_scale"]
    option = np.fromiter(map(option_of.get, zip(v["codec"], v["micro_batches"]), itertools.repeat(-1)), int,
                         len(owner))
    split = np.asarray(v["split"], dtype=int)
    kept = np.flatnonzero((option >= 0) & (split < s - 1))  # the rest ran at no column of this problem
    if not kept.size:
        return _Excess.none()
    rows, option, split = owner[kept], option[kept], split[kept]

    def rate(measured: Sequence, now: np.ndarray) -> np.ndarray:  # the sample's where the model takes it, else the report's
        v = np.array(measured, dtype=float)[kept]  # None: nan
        with np.errstate(invalid="ignore"):
            return np.where((v >= MIN_BPS) & (v <= MAX_BPS), v, now[rows, 0])

    factor = np.asarray(scale, dtype=float)[kept, None, None]
    # the rows of `x` (`CostInputs.rows`), in the mode in force, without step overheads
    then = replace(x, fwd=x.fwd[rows, :1] * factor, bwd=x.bwd[rows, :1] * factor, power=x.power[rows, :1],
                   up_bps=rate(up, x.up_bps)[:, None], down_bps=rate(down, x.down_bps)[:, None],
                   iterations=x.iterations[rows], latency=x.latency[rows], session=x.session[rows], half=x.half[rows],
                   step_overhead=np.zeros((len(rows), x.step_overhead.shape[1])), switch=None,
                   names=tuple(map(x.names.__getitem__, rows.tolist())))
    beyond = np.asarray(step, dtype=float)[kept] - cell_costs(then, np.arange(len(rows)), option * s + split)["iteration_s"]
    # the runs of each (row, option, split), in the order first run; each one's samples oldest first
    _, first, group = np.unique((rows * len(options) + option) * s + split, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=int)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    group = rank[group.ravel()]
    order = np.lexsort((np.arange(len(group)), group))  # by group, then oldest first
    group, beyond = group[order], beyond[order]
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    ends = np.r_[starts[1:], len(group)]
    values = beyond.tolist()
    # the mean of each run's last STEP_ROUNDS (`statistics.fmean`'s arithmetic: an exactly rounded sum)
    mean = [math.fsum(values[a:b]) / (b - a)
            for a, b in zip(np.maximum(starts, ends - STEP_ROUNDS).tolist(), ends.tolist())]
    heads = order[starts]  # a sample of each run, for its row and column
    mean = np.array(mean)
    return _Excess(rows[heads], option[heads], split[heads], np.where(mean > 0.0, mean, 0.0))  # max(0.0, mean)


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
    return _session_excess(problem.n_splits, [samples.get(d.name, ()) for d in problem.devices], rest)


def _session_excess(n_splits: int, samples: Sequence[Sequence[SessionSample]], rest: np.ndarray) -> list[Optional[float]]:
    """Per row of `rest` (`session_table`), its session overhead from its `samples` (None: none):
    the median of its last three sessions after round 0, each beyond its steps and `rest`, never
    below 0. Every row's at once, as arrays: `statistics.median`'s arithmetic on at most three
    values (the middle one; of two, their mean)."""
    return _session_excess_of(n_splits, len(samples), _Samples.of_rows(samples, _SESSION_FIELDS), rest)


def _session_excess_of(n_splits: int, n: int, samples: _Samples, rest: np.ndarray) -> list[Optional[float]]:
    """`_session_excess` of n rows' samples as arrays."""
    out: list[Optional[float]] = [None] * n
    owner = samples.owner
    if not owner.size:
        return out
    rounds, split, session_s, steps_s = (np.asarray(samples.fields[name], dtype=float)
                                         for name in ("round", "split", "session_s", "steps_s"))
    split = split.astype(int)
    later = (rounds > 0) & (split < n_splits)
    owner, split, session_s, steps_s = owner[later], split[later], session_s[later], steps_s[later]
    if not owner.size:
        return out
    rows, first, count = np.unique(owner, return_index=True, return_counts=True)  # owners ascend: samples in order
    group = np.searchsorted(rows, owner)
    from_end = count[group] - 1 - (np.arange(len(owner)) - first[group])
    last = from_end < 3
    beyond = (session_s - steps_s - rest[owner, 0, split])[last]
    beyond = np.where(beyond > 0.0, beyond, 0.0)  # max(0.0, v): v only where v > 0
    taken = np.full((len(rows), 3), np.inf)  # each row's values, sorted, then inf
    kept = np.minimum(count, 3)
    taken[group[last], (kept[group] - 1 - from_end)[last]] = beyond
    taken.sort(axis=1)
    middle = np.where(kept == 2, (taken[:, 0] + taken[:, 1]) / 2, taken[np.arange(len(rows)), kept // 2])
    for i, v in zip(rows.tolist(), middle.tolist()):
        out[i] = v
    return out


def decide(telemetry: AnyTelemetry, policy: SplitPolicy, pinned: Mapping[str, int] | None = None,
           offer: Sequence[tuple[str, int]] = (), power_modes: bool = False,
           pinned_modes: Mapping[str, str] | None = None) -> Optional[Plan]:
    """A plan for the measured devices, or None when nothing has been measured yet. The policy
    decides over the problem as arrays (`arrays_from_telemetry`): no object per device but the plan's.

    Python's cyclic garbage collector is paused while it runs: a decision makes a few objects per
    device (none in a cycle), and at 10,000 devices the collections they set off, each walking
    every live object (the telemetry's too), took a third of its CPU time (0.13 s of 0.39 s)."""
    with _collector_paused():
        problem = arrays_from_telemetry(telemetry, pinned, offer, power_modes, pinned_modes)
        return policy.decide(problem) if problem is not None else None


# The collector is one switch for the whole process, and decisions may run in several threads at
# once (an operator serves several jobs). The first decision in pauses it, the last one out turns it
# back on if it was on before the first came in: each reading and turning it under one lock.
# (Each decision saving and restoring it on its own let one that had read "off" from another
# turn it off again after that one had finished: left off for good.)
_collector_lock = threading.Lock()
_collector_pausers = 0  # decisions running with the collector paused
_collector_was_on = False  # whether it was on when the first of them came in


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off inside, as it was after the last decision running
    leaves (reference counting still frees)."""
    global _collector_pausers, _collector_was_on
    with _collector_lock:
        if _collector_pausers == 0:
            _collector_was_on = gc.isenabled()
            gc.disable()
        _collector_pausers += 1
    try:
        yield
    finally:
        with _collector_lock:
            _collector_pausers -= 1
            if _collector_pausers == 0 and _collector_was_on:
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

    telemetry: Callable[[], AnyTelemetry]
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
