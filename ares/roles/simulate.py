"""`ares simulate`: a fleet of thousands of devices in virtual time, decided by the real controller.

What is real and what is modelled:

- **Real**: every decision. After each round the simulated devices' reports are put into the
  controller's own input (`ares.core.messages.TelemetryColumns`, what a server sends it), and
  `ares.runtime.controller.decide` with a real policy (`ares.core.optimiser.parse_policy`) turns
  it into a plan, exactly as the operator and `ares run` do. The plan's splits (and power modes)
  are what the devices run next round.
- **Modelled**: compute, links, the server and the noise. A device's true round time is the cost
  model's formula (`ares.core.costmodel.cost_matrices`) applied to hidden true values the
  controller never sees: its profile times a hidden speed factor, times a compute jitter drawn
  afresh every round, its link rates times a link jitter, a per-step overhead the model does not
  charge, and, with `shards`, the server part slowed by the number of that shard's devices that
  offload in the round (every offloading device steps at once; processor sharing). Prediction
  errors therefore come from what the controller cannot see (noise, stale figures, changes,
  sharing), not from the form of the formula. Nothing sleeps, no process starts, no byte moves.

The oracle is the best round any choice of splits could give with the true costs of that very
round (jitter included): without shards max over devices of min over splits; with shards the
same per shard, the server shared by its offloaders, found exactly (the offloaders are always
the devices slowest on their own, and a shard's slowest offloader only slows as their number
grows, so the best count is found by bisection). It knows this round's jitter, which no decision
taken before the round can: the informed oracle is the best a decision before the round could do,
the same choice made on the true inputs without this round's jitter (every hidden value known),
timed with the round's true costs. A policy is judged against both.

Traces (`SimConfig.events`): from a round on, for the devices whose name matches a pattern (or a
seeded random fraction of them), a compute factor, a power mode, a link rate or factor, or
leaving (`available: false`) and joining. FedScale's device traces, converted to JSON
(`FedScaleTraces`): `computation` and `communication` per client, and `active`, `inactive`,
`finish_time` per client (availability, against the simulated clock).
"""

from __future__ import annotations

import fnmatch
import json
import math
import statistics
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ares.core.costmodel import CostInputs, cost_matrices, model_costs
from ares.core.energy import power_model
from ares.core.messages import LINK_SMOOTHING, STEP_ROUNDS, StepColumns, TelemetryColumns
from ares.core.optimiser import parse_policy
from ares.core.profiles import PUBLISHED, ComputeProfile, ServerProfile, modes_of, profile_in_mode
from ares.runtime.controller import ASSUMED_POWER, decide

# VGG5 (CIFAR-10): values per sample after each layer, and device-side weight bytes per split
# (what `ares.core.models` computes with torch; fixed here so the simulator needs no torch).
VGG5_NUMEL = (32768, 8192, 16384, 4096, 4096, 128, 10)
VGG5_WEIGHT_BYTES = (4104, 4104, 79120, 79120, 227864, 2325528, 2330688)
MODELLED = ("compute (published profiles x a hidden speed factor x a per-round jitter), link rates (x a "
            "per-round jitter), a per-step overhead the cost model does not charge, the server (a shard's "
            "server part slowed by its offloading devices), availability and every change in a trace")
REAL = "the decisions: ares.runtime.controller.decide with the real policy, on the telemetry the devices would report"

class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class DeviceGroup(_Model):
    """`count` devices named `<prefix>-<i>` with one published profile (`ares.core.profiles.PUBLISHED`
    key, e.g. `jetson-nano/MAXN`, `raspberry-pi`, or a Nano mode: `jetson-nano/5W`) or a profile JSON
    file; link rates and iterations drawn uniformly from the ranges given."""

    count: int = Field(ge=1, le=1_000_000)
    profile: str = "jetson-nano/MAXN"
    prefix: Optional[str] = None
    up_mbit: tuple[float, float] = (5.0, 50.0)
    down_mbit: tuple[float, float] = (5.0, 50.0)
    iterations: tuple[int, int] = (20, 100)
    latency_ms: float = Field(2.0, ge=0, le=10_000)
    duplex: Literal["full", "half"] = "full"

    @model_validator(mode="after")
    def _ranges(self) -> "DeviceGroup":
        for lo, hi in (self.up_mbit, self.down_mbit, self.iterations):
            if not 0 < lo <= hi:
                raise ValueError(f"a range needs 0 < low <= high, got ({lo}, {hi})")
        return self


class Noise(_Model):
    """What the controller does not know: lognormal sigmas (0: none) and a per-step overhead."""

    speed_sigma: float = Field(0.1, ge=0, le=2)  # each device's hidden speed factor, fixed for the run
    compute_jitter: float = Field(0.05, ge=0, le=2)  # every round, every device, compute
    link_jitter: float = Field(0.1, ge=0, le=2)  # every round, every device, both directions
    step_overhead_ms: float = Field(5.0, ge=0, le=10_000)  # per offloaded step (framing, codec work)
    switch_s: float = Field(0.5, ge=0, le=600)  # a power-mode switch's true pause


class Event(_Model):
    """From `round` on, for the devices matching `devices` (an fnmatch pattern on the name; a seeded
    random `fraction` of them): the changes given. Factors multiply the device's current values."""

    round: int = Field(ge=0)
    devices: str = "*"
    fraction: float = Field(1.0, gt=0, le=1)
    compute_factor: Optional[float] = Field(None, gt=0, le=1e3)
    power_mode: Optional[str] = None
    up_mbit: Optional[float] = Field(None, gt=0, le=1e6)
    down_mbit: Optional[float] = Field(None, gt=0, le=1e6)
    link_factor: Optional[float] = Field(None, gt=0, le=1e3)
    available: Optional[bool] = None


class SimConfig(_Model):
    rounds: int = Field(20, ge=1, le=100_000)
    seed: int = 0
    policies: list[str] = ["straggler"]
    share_server: bool = False  # the straggler policy models a shared server (per shard)
    power_modes: bool = False  # the controller may choose Jetsons' power modes
    shards: int = Field(0, ge=0, le=10_000)  # 0: every device's server part at full speed
    server_scale: float = Field(0.1, gt=0, le=1e3)  # the server's profile: the Nano's (MAXN) times this
    batch_size: int = Field(100, ge=1, le=100_000)
    initial_split: Optional[int] = Field(None, ge=0)  # round 0, before any decision (default: all on the device)
    fleet: list[DeviceGroup] = [DeviceGroup(count=100)]
    noise: Noise = Noise()
    events: list[Event] = []
    fedscale_capacity: Optional[str] = None  # JSON: {client: {"computation": ms, "communication": kbit/s}}
    fedscale_availability: Optional[str] = None  # JSON: {client: {"active": [s], "inactive": [s], "finish_time": s}}


class _FedScaleCapacity(_Model):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    computation: float = Field(gt=0)  # FedScale: ms per sample; read as a relative speed
    communication: float = Field(gt=0)  # FedScale: kbit/s; taken for both directions


class _FedScaleBehaviour(_Model):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    active: list[float]
    inactive: list[float]
    finish_time: float = Field(gt=0)

    def is_active(self, t: float) -> bool:
        """FedScale's rule: the trace repeats every `finish_time` s; a client is on from each
        `active[i]` until the matching `inactive[i]`."""
        now = t % self.finish_time
        return any(a <= now < b for a, b in zip(self.active, self.inactive))


def _load_json_map(path: str, model: type[BaseModel], limit: int = 1_000_000) -> list[Any]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not data or len(data) > limit:
        raise ValueError(f"{path}: a JSON object of clients (1..{limit}) is needed")
    return [model.model_validate(v) for _, v in sorted(data.items(), key=lambda kv: str(kv[0]))]


def load_config(path: str | Path) -> SimConfig:
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    cfg = SimConfig.model_validate(data)
    base = Path(path).parent  # trace files relative to the config
    updates = {k: str(base / v) for k in ("fedscale_capacity", "fedscale_availability")
               if (v := getattr(cfg, k)) and not Path(v).is_absolute()}
    return cfg.model_copy(update=updates)


def _profile(key: str) -> ComputeProfile:
    if key in PUBLISHED:
        return PUBLISHED[key]
    cls, _, mode = key.partition("/")
    if cls == "jetson-nano" and mode in modes_of(cls):
        return profile_in_mode(PUBLISHED["jetson-nano/MAXN"], mode)
    if Path(key).is_file():
        return ComputeProfile.load(key)
    raise ValueError(f"unknown profile {key!r}: a key of ares.core.profiles.PUBLISHED, jetson-nano/<mode>, or a file")


@dataclass
class Fleet:
    """The hidden truth of every device (arrays over devices) and what each has reported."""

    names: list[str]
    classes: list[str]
    modes: list[str]
    base: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]  # (class, mode) -> profile fwd, bwd
    speed: np.ndarray
    factor: np.ndarray  # trace compute factor
    up: np.ndarray
    down: np.ndarray
    iterations: np.ndarray
    latency: np.ndarray
    half: np.ndarray
    shard: np.ndarray
    available: np.ndarray
    behaviour: Optional[list[_FedScaleBehaviour]] = None


def build_fleet(cfg: SimConfig) -> Fleet:
    rng = np.random.default_rng([cfg.seed, 0])
    names, classes, modes, base = [], [], [], {}
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("up", "down", "iterations", "latency", "half")}
    for g, group in enumerate(cfg.fleet):
        p = _profile(group.profile).rescaled(cfg.batch_size)
        key = (p.device_class or "cpu", p.power_mode)
        base.setdefault(key, (np.array(p.fwd), np.array(p.bwd)))
        prefix = group.prefix or f"{group.profile.replace('/', '-').lower()}-g{g}"
        names += [f"{prefix}-{i}" for i in range(group.count)]
        classes += [key[0]] * group.count
        modes += [key[1]] * group.count
        cols["up"].append(rng.uniform(*group.up_mbit, group.count) * 1e6 / 8)
        cols["down"].append(rng.uniform(*group.down_mbit, group.count) * 1e6 / 8)
        cols["iterations"].append(rng.integers(group.iterations[0], group.iterations[1] + 1, group.count).astype(float))
        cols["latency"].append(np.full(group.count, group.latency_ms / 1e3))
        cols["half"].append(np.full(group.count, group.duplex == "half"))
    n = len(names)
    if len(set(names)) != n:
        raise ValueError("device names repeat: give each group its own prefix")
    arr = {k: np.concatenate(v) for k, v in cols.items()}
    speed = np.exp(rng.normal(0, cfg.noise.speed_sigma, n)) if cfg.noise.speed_sigma else np.ones(n)
    shard = np.array([zlib.crc32(x.encode()) % max(cfg.shards, 1) for x in names])
    fleet = Fleet(names, classes, modes, base, speed, np.ones(n), arr["up"], arr["down"], arr["iterations"],
                  arr["latency"], arr["half"], shard, np.ones(n, dtype=bool))
    if cfg.fedscale_capacity:
        caps = _load_json_map(cfg.fedscale_capacity, _FedScaleCapacity)
        comp = np.array([c.computation for c in caps])
        picks = rng.integers(0, len(caps), n)  # each device takes a client's figures (FedScale's own mapping)
        fleet.factor = comp[picks] / float(np.median(comp))
        fleet.up = fleet.down = np.array([caps[i].communication for i in picks]) * 1e3 / 8
        fleet.down = fleet.up.copy()
    if cfg.fedscale_availability:
        behave = _load_json_map(cfg.fedscale_availability, _FedScaleBehaviour)
        fleet.behaviour = [behave[i] for i in rng.integers(0, len(behave), n)]
    return fleet


def _apply_event(fleet: Fleet, cfg: SimConfig, index: int, event: Event) -> None:
    match = np.array([fnmatch.fnmatchcase(x, event.devices) for x in fleet.names])
    if event.fraction < 1:
        match &= np.random.default_rng([cfg.seed, 2, index]).random(len(match)) < event.fraction
    if event.compute_factor is not None:
        fleet.factor[match] *= event.compute_factor
    if event.link_factor is not None:
        fleet.up[match] *= event.link_factor
        fleet.down[match] *= event.link_factor
    if event.up_mbit is not None:
        fleet.up[match] = event.up_mbit * 1e6 / 8
    if event.down_mbit is not None:
        fleet.down[match] = event.down_mbit * 1e6 / 8
    if event.available is not None:
        fleet.available[match] = event.available
    if event.power_mode is not None:
        for i in np.flatnonzero(match).tolist():
            _set_mode(fleet, cfg, i, event.power_mode)


def _set_mode(fleet: Fleet, cfg: SimConfig, i: int, mode: str) -> None:
    cls = fleet.classes[i]
    if mode not in modes_of(cls):
        raise ValueError(f"device {fleet.names[i]}: class {cls!r} has no power mode {mode!r}")
    key = (cls, mode)
    if key not in fleet.base:
        ref = next(((k, v) for k, v in fleet.base.items() if k[0] == cls))
        p = ComputeProfile(fwd=tuple(ref[1][0]), bwd=tuple(ref[1][1]), batch_size=cfg.batch_size,
                           device_class=cls, power_mode=ref[0][1])
        q = profile_in_mode(p, mode)
        fleet.base[key] = (np.array(q.fwd), np.array(q.bwd))
    fleet.modes[i] = mode


@dataclass
class Reported:
    """What each device has reported so far (what the server's telemetry would hold)."""

    fwd: np.ndarray
    bwd: np.ndarray
    up: np.ndarray
    down: np.ndarray
    measured: np.ndarray
    split: np.ndarray
    round_s: np.ndarray
    samples: list[list[tuple[int, float, float, float, float]]] = field(default_factory=list)  # split, step, up, down, factor
    factor: np.ndarray = field(default_factory=lambda: np.zeros(0))


class Simulation:
    """One policy over the whole run; `run_policies` runs each with the same truth and seed."""

    def __init__(self, cfg: SimConfig, policy: str):
        self.cfg, self.policy_name = cfg, policy
        self.policy = parse_policy(policy, share_server=cfg.share_server and policy.strip().lower() == "straggler")
        self.fleet = build_fleet(cfg)
        n, s = len(self.fleet.names), len(VGG5_WEIGHT_BYTES)
        self.n_splits = s
        self.costs = model_costs(VGG5_NUMEL, VGG5_WEIGHT_BYTES, cfg.batch_size)
        self.server = ServerProfile.from_cumulative(PUBLISHED["jetson-nano/MAXN"].scaled(cfg.server_scale)).rescaled(
            cfg.batch_size)
        split0 = s - 1 if cfg.initial_split is None else cfg.initial_split
        if not 0 <= split0 < s:
            raise ValueError(f"initial_split must be 0..{s - 1}")
        self.split = np.full(n, split0)
        self.rep = Reported(np.zeros((n, s)), np.zeros((n, s)), np.zeros(n), np.zeros(n), np.zeros(n, dtype=bool),
                            np.full(n, split0), np.zeros(n), [[] for _ in range(n)], np.ones(n))
        self.predicted = np.full(n, np.nan)
        self.switching = np.zeros(n, dtype=bool)
        self.clock_s = 0.0
        self.power = {(c, m): power_model(c, m) if _has_power(c, m) else ASSUMED_POWER for c, m in
                      {(c, m) for c in set(self.fleet.classes) for m in (*modes_of(c), *set(self.fleet.modes))}}

    # ---- the truth ---------------------------------------------------------------------------

    def _inputs(self, rows: np.ndarray, comp: np.ndarray, up: np.ndarray, down: np.ndarray) -> CostInputs:
        f = self.fleet
        fwd = np.stack([f.base[(f.classes[i], f.modes[i])][0] for i in rows.tolist()]) * comp[:, None]
        bwd = np.stack([f.base[(f.classes[i], f.modes[i])][1] for i in rows.tolist()]) * comp[:, None]
        pw = np.array([[(p := self.power[(f.classes[i], f.modes[i])]).compute_w, p.tx_w, p.rx_w]
                       for i in rows.tolist()])
        s = self.n_splits
        step = np.tile(np.where(np.arange(s) < s - 1, self.cfg.noise.step_overhead_ms / 1e3, 0.0), (len(rows), 1))
        m = self.costs
        return CostInputs(fwd=fwd[:, None, :], bwd=bwd[:, None, :],
                          server_s=np.array(self.server.fwd) + np.array(self.server.bwd),
                          up_bytes=np.array([m.up_bytes], float), down_bytes=np.array([m.down_bytes], float),
                          micro=np.array([1.0]), weight_bytes=np.array(m.weight_bytes, float),
                          up_bps=up[:, None], down_bps=down[:, None], iterations=f.iterations[rows][:, None],
                          power=pw[:, None, :], latency=f.latency[rows][:, None], session=np.zeros((len(rows), 1)),
                          step_overhead=step, half=f.half[rows][:, None], names=tuple(f.names[i] for i in rows.tolist()))

    def _truth(self, rows: np.ndarray, x: CostInputs, expected: CostInputs) -> tuple[np.ndarray, np.ndarray, float, float]:
        """(true round time per row at its split, true iteration time per row, the oracle round time,
        the informed oracle's round time). `expected`: the same inputs without this round's jitter."""
        s = self.n_splits
        splits = self.split[rows]
        off = splits < s - 1
        share = np.ones(len(rows))
        if self.cfg.shards:
            counts = np.bincount(self.fleet.shard[rows][off], minlength=self.cfg.shards)
            share = np.maximum(counts[self.fleet.shard[rows]], 1).astype(float)
        c = cost_matrices(x, share[:, None])
        idx = np.arange(len(rows))
        round_s = c.round_s[idx, splits] + np.where(self.switching[rows], self.cfg.noise.switch_s, 0.0)
        return round_s, c.iteration_s[idx, splits], self._oracle(rows, x), self._informed(rows, x, expected)

    def _oracle(self, rows: np.ndarray, x: CostInputs) -> float:
        s = self.n_splits
        alone = cost_matrices(x).round_s
        if not self.cfg.shards:
            return float(alone.min(axis=1).max())
        worst = 0.0
        for k in range(self.cfg.shards):
            sel = np.flatnonzero(self.fleet.shard[rows] == k)
            if sel.size:
                worst = max(worst, _shard_oracle(x.rows(sel), alone[sel, s - 1]))
        return worst

    def _informed(self, rows: np.ndarray, x: CostInputs, expected: CostInputs) -> float:
        """The round the best choice made before the round gives: chosen knowing every hidden value
        (speed, changes, the per-step overhead, the sharing) but not this round's jitter, which no
        decision taken before a round can know; timed with this round's true costs."""
        s = self.n_splits
        if not self.cfg.shards:
            cols = cost_matrices(expected).round_s.argmin(axis=1)
            return float(cost_matrices(x).round_s[np.arange(len(rows)), cols].max())
        worst = 0.0
        alone = cost_matrices(expected).round_s[:, s - 1]
        for k in range(self.cfg.shards):
            sel = np.flatnonzero(self.fleet.shard[rows] == k)
            if not sel.size:
                continue
            offloaders, cols = _shard_choice(expected.rows(sel), alone[sel])
            rest = np.setdiff1d(np.arange(sel.size), offloaders)
            if rest.size:
                worst = max(worst, float(cost_matrices(x.rows(sel[rest])).round_s[:, s - 1].max()))
            if offloaders.size:
                true = cost_matrices(x.rows(sel[offloaders]), float(offloaders.size)).round_s
                worst = max(worst, float(true[np.arange(offloaders.size), cols].max()))
        return worst

    # ---- one round ---------------------------------------------------------------------------

    def step(self, r: int) -> dict[str, Any]:
        cfg, f = self.cfg, self.fleet
        for i, e in enumerate(cfg.events):
            if e.round == r:
                _apply_event(f, cfg, i, e)
        present = f.available.copy()
        if f.behaviour is not None:
            present &= np.array([b.is_active(self.clock_s) for b in f.behaviour])
        rows = np.flatnonzero(present)
        if not rows.size:
            raise ValueError(f"round {r}: no device is available")
        rng = np.random.default_rng([cfg.seed, 1, r])  # the same noise under every policy
        n = len(f.names)
        jc = np.exp(rng.normal(0, cfg.noise.compute_jitter, n)) if cfg.noise.compute_jitter else np.ones(n)
        ju = np.exp(rng.normal(0, cfg.noise.link_jitter, n)) if cfg.noise.link_jitter else np.ones(n)
        jd = np.exp(rng.normal(0, cfg.noise.link_jitter, n)) if cfg.noise.link_jitter else np.ones(n)
        comp = (f.speed * f.factor * jc)[rows]
        up, down = (f.up * ju)[rows], (f.down * jd)[rows]
        x = self._inputs(rows, comp, up, down)
        expected = self._inputs(rows, (f.speed * f.factor)[rows], f.up[rows], f.down[rows])
        true_s, iter_s, oracle, informed = self._truth(rows, x, expected)
        predicted = self.predicted[rows]
        known = np.isfinite(predicted)
        err = np.where(known, (predicted - true_s) / true_s, np.nan)
        self._report(rows, comp, up, down, true_s, iter_s)
        self.switching[:] = False
        telemetry = self._telemetry(r, rows)
        t0 = time.perf_counter()
        plan = decide(telemetry, self.policy, power_modes=cfg.power_modes)
        decision_s = time.perf_counter() - t0
        if plan is not None:
            index = {name: i for i, name in enumerate(f.names)}
            for p in plan.devices:
                i = index[p.name]
                self.split[i] = p.split
                self.predicted[i] = p.round_s
                if cfg.power_modes and p.power_mode and p.power_mode != f.modes[i]:
                    _set_mode(f, cfg, i, p.power_mode)
                    self.switching[i] = True
        round_s = float(true_s.max())
        self.clock_s += round_s
        return {"round": r, "devices": int(rows.size), "round_s": round_s, "oracle_s": oracle,
                "ratio_to_oracle": round_s / oracle, "informed_oracle_s": informed,
                "ratio_to_informed": round_s / informed, "predicted_round_s": None if plan is None else plan.round_s,
                "decision_s": decision_s, "offloading": int(np.count_nonzero(self.split[rows] < self.n_splits - 1)),
                "splits": np.bincount(self.split[rows], minlength=self.n_splits).tolist(),
                "median_abs_error": float(np.nanmedian(np.abs(err))) if known.any() else None,
                "_err": (rows[known], err[known])}

    def _report(self, rows: np.ndarray, comp: np.ndarray, up: np.ndarray, down: np.ndarray, true_s: np.ndarray,
                iter_s: np.ndarray) -> None:
        """What each device that ran this round reports with its upload."""
        f, rep, w = self.fleet, self.rep, LINK_SMOOTHING
        prof = [f.base[(f.classes[i], f.modes[i])] for i in rows.tolist()]
        rep.fwd[rows] = np.stack([p[0] for p in prof]) * comp[:, None]  # the profile, rescaled by live steps
        rep.bwd[rows] = np.stack([p[1] for p in prof]) * comp[:, None]
        first = ~rep.measured[rows]
        rep.up[rows] = np.where(first, up, 1 / ((1 - w) / np.where(first, 1, rep.up[rows]) + w / up))
        rep.down[rows] = np.where(first, down, 1 / ((1 - w) / np.where(first, 1, rep.down[rows]) + w / down))
        rep.measured[rows] = True
        rep.split[rows] = self.split[rows]
        rep.round_s[rows] = true_s
        rep.factor[rows] = comp
        s = self.n_splits
        for j, i in enumerate(rows.tolist()):
            if self.split[i] < s - 1:
                kept = rep.samples[i]
                kept.append((int(self.split[i]), float(iter_s[j]), float(rep.up[i]), float(rep.down[i]), float(comp[j])))
                del kept[:-STEP_ROUNDS]

    def _telemetry(self, r: int, rows: np.ndarray) -> TelemetryColumns:
        """What the server would send the controller, as columns (`GET /v1/telemetry?columns=true`)."""
        f, rep, cfg = self.fleet, self.rep, self.cfg
        ids = rows.tolist()
        owners = [(j, i) for j, i in enumerate(ids) for _ in rep.samples[i]]
        samples = [sample for i in ids for sample in rep.samples[i]]
        scale = [fac / float(rep.factor[i]) for (_, i), (*_, fac) in zip(owners, samples)]
        n = len(ids)
        return TelemetryColumns(
            round=r, model="vgg5", batch_size=cfg.batch_size, codec="fp32", micro_batches=1,
            activation_numel=list(VGG5_NUMEL), weight_bytes=list(VGG5_WEIGHT_BYTES), server_fwd=list(self.server.fwd),
            server_bwd=list(self.server.bwd), name=[f.names[i] for i in ids], device_class=[f.classes[i] for i in ids],
            power_mode=[f.modes[i] for i in ids], fwd=rep.fwd[rows].tolist(), bwd=rep.bwd[rows].tolist(),
            batch_size_of=[cfg.batch_size] * n, up_bps=rep.up[rows].tolist(), down_bps=rep.down[rows].tolist(),
            iterations=f.iterations[rows].astype(int).tolist(), split=rep.split[rows].astype(int).tolist(),
            energy_j=[None] * n, energy_source=["none"] * n, round_s=rep.round_s[rows].tolist(),
            latency_s=f.latency[rows].tolist(), duplex=["half" if h else "full" for h in f.half[rows].tolist()],
            codec_of=["fp32"] * n, micro_batches_of=[1] * n, upload_bps=[None] * n, power_mode_failed=[""] * n,
            power_mode_problem=[""] * n, switch_s=[None] * n, shard=self.fleet.shard[rows].tolist(),
            steps=StepColumns(device=[j for j, _ in owners], split=[int(v[0]) for v in samples],
                              codec=["fp32"] * len(samples), micro_batches=[1] * len(samples),
                              step_s=[v[1] for v in samples], up_bps=[v[2] for v in samples],
                              down_bps=[v[3] for v in samples], compute_scale=scale))


def _has_power(cls: str, mode: str) -> bool:
    try:
        power_model(cls, mode)
        return True
    except ValueError:
        return False


def _shard_oracle(x: CostInputs, on_device: np.ndarray) -> float:
    """Best round of one shard whose server is shared by its offloaders (`_shard_choice`)."""
    offloaders, cols = _shard_choice(x, on_device)
    rest = np.setdiff1d(np.arange(len(on_device)), offloaders)
    worst = float(on_device[rest].max()) if rest.size else 0.0
    if offloaders.size:
        c = cost_matrices(x.rows(offloaders), float(offloaders.size)).round_s
        worst = max(worst, float(c[np.arange(offloaders.size), cols].max()))
    return worst


def _shard_choice(x: CostInputs, on_device: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The best choice for one shard whose server is shared by its m offloaders: (the rows that
    offload, each one's split). Over m, the round is the worse of the (m+1)-th slowest on-device
    round and the slowest of the m slowest devices' best offload round with the server shared m
    ways. The first only falls with m and the second only grows, so the best m is where they cross
    (bisection)."""
    n, s = len(on_device), x.fwd.shape[2]
    order = np.argsort(-on_device, kind="stable")

    def offload(m: int) -> float:
        if m == 0:
            return 0.0
        return float(cost_matrices(x.rows(order[:m]), float(m)).round_s[:, :s - 1].min(axis=1).max())

    def rest(m: int) -> float:
        return float(on_device[order[m]]) if m < n else 0.0

    lo, hi = 0, n  # smallest m with offload(m) >= rest(m)
    while lo < hi:
        mid = (lo + hi) // 2
        if offload(mid) >= rest(mid):
            hi = mid
        else:
            lo = mid + 1
    m = min({max(lo - 1, 0), lo}, key=lambda m: (max(offload(m), rest(m)), m))
    rows = np.sort(order[:m])
    if not m:
        return rows, np.zeros(0, dtype=int)
    return rows, cost_matrices(x.rows(rows), float(m)).round_s[:, :s - 1].argmin(axis=1)


# ---- runs, results, plots ------------------------------------------------------------------------

def run_policies(cfg: SimConfig, out: Optional[Path] = None,
                 progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Every policy of `cfg` over the same fleet, traces and noise; writes `out` when given."""
    summary: dict[str, Any] = {"modelled": MODELLED, "real": REAL, "config": cfg.model_dump(mode="json"),
                               "policies": {}}
    per_device: dict[str, dict[str, Any]] = {}
    records: dict[str, list[dict[str, Any]]] = {}
    for policy in cfg.policies:
        sim = Simulation(cfg, policy)
        n = len(sim.fleet.names)
        err_sum, err_count = np.zeros(n), np.zeros(n)
        rows_out, started = [], time.perf_counter()
        for r in range(cfg.rounds):
            rec = sim.step(r)
            idx, err = rec.pop("_err")
            np.add.at(err_sum, idx, np.abs(err))
            np.add.at(err_count, idx, 1)
            rows_out.append(rec)
            if progress and (r == cfg.rounds - 1 or r % max(1, cfg.rounds // 10) == 0):
                progress(f"{policy}: round {r + 1}/{cfg.rounds}, {rec['devices']} devices, simulated round "
                         f"{rec['round_s']:.2f} s (oracle {rec['oracle_s']:.2f} s), decision {rec['decision_s'] * 1e3:.0f} ms, "
                         f"{time.perf_counter() - started:.0f} s so far")
        records[policy] = rows_out
        mean_err = np.where(err_count > 0, err_sum / np.maximum(err_count, 1), np.nan)
        per_device[policy] = {name: (None if math.isnan(v) else round(float(v), 5))
                              for name, v in zip(sim.fleet.names, mean_err.tolist())}
        summary["policies"][policy] = _summarise(rows_out, mean_err, time.perf_counter() - started)
    if out is not None:
        write_results(out, summary, records, per_device)
    return summary


def _summarise(rows: list[dict[str, Any]], mean_err: np.ndarray, wall_s: float) -> dict[str, Any]:
    adapted = rows[1:] or rows  # round 0 runs before any decision
    decisions = sorted(x["decision_s"] for x in rows)
    errs = mean_err[np.isfinite(mean_err)]
    return {
        "rounds": len(rows),
        "mean_round_s": statistics.fmean(x["round_s"] for x in adapted),
        "mean_oracle_s": statistics.fmean(x["oracle_s"] for x in adapted),
        "ratio_to_oracle": statistics.fmean(x["round_s"] for x in adapted) / statistics.fmean(x["oracle_s"] for x in adapted),
        "mean_informed_oracle_s": statistics.fmean(x["informed_oracle_s"] for x in adapted),
        "ratio_to_informed": (statistics.fmean(x["round_s"] for x in adapted)
                              / statistics.fmean(x["informed_oracle_s"] for x in adapted)),
        "worst_ratio_to_oracle": max(x["ratio_to_oracle"] for x in adapted),
        "decision_p50_s": statistics.median(decisions),
        "decision_max_s": decisions[-1],
        "prediction_error_median": float(np.median(errs)) if errs.size else None,
        "prediction_error_p90": float(np.quantile(errs, 0.9)) if errs.size else None,
        "simulated_s": sum(x["round_s"] for x in rows),
        "wall_s": wall_s,
    }


def write_results(out: Path, summary: dict[str, Any], records: dict[str, list[dict[str, Any]]],
                  per_device: dict[str, dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "rounds.json").write_text(json.dumps(records) + "\n")
    (out / "prediction_error.json").write_text(json.dumps(per_device) + "\n")
    try:
        _plots(out, records, per_device)
    except ImportError:  # matplotlib is in the server extra; the results stand without the figures
        print("matplotlib not installed: no figures (pip install 'ares-split[server]')", file=sys.stderr)


def _plots(out: Path, records: dict[str, list[dict[str, Any]]], per_device: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (policy, rows) in enumerate(records.items()):
        ax.plot([x["round"] for x in rows], [x["round_s"] for x in rows], label=policy)
        if i == 0:
            ax.plot([x["round"] for x in rows], [x["oracle_s"] for x in rows], "k--", label="oracle")
            ax.plot([x["round"] for x in rows], [x["informed_oracle_s"] for x in rows], "k:",
                    label="informed oracle (no jitter known)")
    ax.set_xlabel("round")
    ax.set_ylabel("simulated round time (s)")
    ax.legend()
    ax.set_title("Simulated round time (decisions: the real controller)")
    fig.tight_layout()
    fig.savefig(out / "round_time.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for policy, errs in per_device.items():
        v = np.sort([e for e in errs.values() if e is not None])
        if v.size:
            ax.plot(v * 100, np.arange(1, v.size + 1) / v.size, label=policy)
    ax.set_xlabel("mean |predicted - simulated| / simulated round time, per device (%)")
    ax.set_ylabel("fraction of devices")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "prediction_error.png", dpi=100)
    plt.close(fig)


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"modelled: {summary['modelled']}", f"real: {summary['real']}", "",
             f"{'policy':<22}{'round s':>10}{'oracle s':>10}{'x oracle':>10}{'x informed':>12}{'decide p50':>12}"
             f"{'pred err p50':>14}"]
    for policy, s in summary["policies"].items():
        err = s["prediction_error_median"]
        lines.append(f"{policy:<22}{s['mean_round_s']:>10.3f}{s['mean_oracle_s']:>10.3f}{s['ratio_to_oracle']:>10.3f}"
                     f"{s['ratio_to_informed']:>12.3f}"
                     f"{s['decision_p50_s'] * 1e3:>10.0f}ms{'' if err is None else f'{err * 100:>13.1f}%'}")
    return "\n".join(lines)
