"""The cost model: every device's predicted time and energy at every split, a pure function.

The cost model (per device i at split s; one "iteration" is one batch):

    device_s(s)    = fwd[s] + bwd[s]                       (device part, from its ComputeProfile)
    server_s(s)    = server.fwd[s] + server.bwd[s]          (server part; 0 at s = L-1)
    up_s(s)        = up_bytes[s] / up_bps                   (activations + labels, device -> server)
    down_s(s)      = down_bytes[s] / down_bps               (their gradient, server -> device)
    iteration_s(s) = device_s + server_s + up_s + down_s + latency     (k = 1: one request per batch)
    round_s(s)     = iterations * iteration_s(s) + weight_bytes[s] / down_bps + weight_bytes[s] / up_bps
                     + 2 * latency + session_overhead               (join and upload requests)
    E_iteration(s) = P_compute * device_s + P_tx * up_s + P_rx * down_s
    E_round(s)     = iterations * E_iteration(s) + P_rx * weight_bytes[s] / down_bps + P_tx * weight_bytes[s] / up_bps

Byte counts are true: 4 bytes per fp32 value (2 for fp16, 1 for int8), labels included
(`model_costs`). `latency` is a device's per-request overhead in seconds (`DeviceInput.latency_s`);
`step_overhead` (`DeviceInput.step_overhead_s`) is what a device's offloaded steps took beyond
this model, measured (codec work, framing, a busy server), added to every iteration that
offloads (s < L-1); `session_overhead` (`DeviceInput.session_overhead_s`) is what its sessions
took beyond their steps and this model's weight transfers, measured (encoding, decoding and
checking the weights, building the device part), added once per round at every split.
The round of the whole fleet lasts as long as its slowest device; its energy is the sum.

Pipelined steps (k micro-batches per batch, `Option.micro_batches`). Per micro-batch the stages
take f = fwd/k, u = up/k + latency, v = server/k, d = down/k, b = bwd/k. The device runs all k
forwards first (each sent as soon as it exists), then each backward as its gradient arrives.
Forward, uplink, server and downlink form a flow shop of k identical jobs, so micro-batch j
leaves the downlink at A + (j-1) M with A = f + u + v + d and M the slowest of those stages
(full duplex: max(f, u, v, d); half duplex, where up and down share one rate: max(f, u + d, v)).
The backwards then end at

    iteration_s = max(k (f + b),  A + k b,  A + (k-1) M + b)

(exact for full duplex: `tests/unit/test_costmodel_pipelining.py` checks it against an event-driven
simulation of the same schedule; for half duplex it is the flow-shop approximation, checked
against the simulation within a stated bound). k = 1 gives the sequential step above. Energy
does not depend on k: the same compute, the same bytes.

Options. A problem may offer several (codec, k) `Option`s, each with its own byte counts; the
policies then choose a split *and* an option per device (a column of the (devices x options
x splits) cost matrix), restricted per device by `DeviceInput.codecs` / `.micro_batches`.
At the last split nothing travels, so only the first option is offered there.

Columns. The model's matrices have one row per device and one column per (option, split): a
`Column` names one, by the option's index in `Problem.options` and the split. A device's
current choice (`DeviceInput.current`) is a `Column`; so is what `column_of` finds. Inside,
the matrices' columns run option-major (`Column.flat`), which the vectorised code indexes.

Power modes. A device whose class has power modes (a Jetson) may list in `DeviceInput.modes`
the other modes it can be switched to, each a `PowerMode` with its own compute profile (measured,
or derived from MAXN and marked so) and power model; the mode in force is the device's own
`compute` and `power`. The columns then run over (mode, option, split), mode-major, mode 0 being
the mode in force: compute time and power follow the mode, bytes do not. A column in another
mode adds the switch's pause (`DeviceInput.switch_s`) to that device's round: a mode is switched
between rounds only, and the round that starts in it waits for the switch. `pinned_mode` keeps a
device at one mode. A device without `modes` has one mode, and the matrices are as before.

`evaluate` predicts any assignment of splits (and options); the policies (`ares.core.optimiser`)
choose columns and turn them into a `Plan` through `plan_columns`, so the predictions of every
policy are comparable. No torch here: plain numbers and numpy.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ares.core.energy import PowerModel, power_model
from ares.core.profiles import ComputeProfile, ServerProfile, modes_of, profile_in_mode


@dataclass(frozen=True)
class ModelCosts:
    """Bytes moved per batch for each split (already codec-aware) and device-side weight bytes per split."""

    up_bytes: tuple[int, ...]  # activations of layer s for one batch + labels; 0 at s = L-1
    down_bytes: tuple[int, ...]  # gradient of those activations; 0 at s = L-1
    weight_bytes: tuple[int, ...]  # device-side params+buffers for split s (down at join, up at round end)

    def __post_init__(self) -> None:
        lengths = {len(self.up_bytes), len(self.down_bytes), len(self.weight_bytes)}
        if len(lengths) != 1 or not self.up_bytes:
            raise ValueError(f"ModelCosts lists must be non-empty and equally long, got lengths {sorted(lengths)}")
        for name in ("up_bytes", "down_bytes", "weight_bytes"):
            values = tuple(int(v) for v in getattr(self, name))
            if any(v < 0 for v in values):
                raise ValueError(f"ModelCosts.{name} must be >= 0, got {values}")
            object.__setattr__(self, name, values)
        if self.up_bytes[-1] or self.down_bytes[-1]:
            raise ValueError("ModelCosts: nothing travels per batch at the last split (all on the device)")

    @property
    def n_splits(self) -> int:
        return len(self.weight_bytes)


CODEC_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}  # bytes per value on the wire (int8's per-channel scale is negligible)
DUPLEX = ("full", "half")
# Link rates a device may have, bytes/s (8 mbit/s .. 8 Tbit/s): outside them the cost model's
# seconds and joules lose all meaning (1e-300 B/s overflows to inf), so they are refused.
MIN_BPS, MAX_BPS = 1e-3, 1e12


@dataclass(frozen=True)
class Option:
    """One way to run a split step: the wire codec, micro-batches per batch, and the bytes that follow."""

    codec: str
    micro_batches: int
    model: "ModelCosts"

    def __post_init__(self) -> None:
        if self.codec not in CODEC_BYTES:
            raise ValueError(f"unknown codec {self.codec!r}; accepted: {', '.join(CODEC_BYTES)}")
        if isinstance(self.micro_batches, bool) or not isinstance(self.micro_batches, int) or self.micro_batches < 1:
            raise ValueError(f"micro_batches must be an integer >= 1, got {self.micro_batches!r}")

    @property
    def label(self) -> str:
        return self.codec + (f"/k{self.micro_batches}" if self.micro_batches > 1 else "")


def options_for(activation_numel: Sequence[int], weight_bytes: Sequence[int], batch_size: int,
                codecs: Sequence[str] = ("fp32",), micro_batches: Sequence[int] = (1,)) -> tuple[Option, ...]:
    """Every (codec, k) pair the job allows, each with its byte counts; the first is the default."""
    return tuple(Option(c, k, model_costs(activation_numel, weight_bytes, batch_size, CODEC_BYTES[c]))
                 for c in codecs for k in micro_batches)


def model_costs(activation_numel: Sequence[int], weight_bytes: Sequence[int], batch_size: int,
                codec_bytes: int = 4, label_bytes: int = 8) -> ModelCosts:
    """Per-batch bytes for every split from values per sample after each layer.

    `activation_numel` may list L-1 layers or all L (the last one's output never travels).
    Up carries activations plus one label per sample (int64 by default); down their gradient.
    """
    n = len(weight_bytes)
    numel = list(activation_numel)
    if len(numel) == n:
        numel = numel[:-1]
    if len(numel) != n - 1:
        raise ValueError(f"activation_numel has {len(activation_numel)} entries; with {n} splits "
                         f"it needs {n - 1} or {n}")
    if batch_size < 1 or codec_bytes < 1 or label_bytes < 0:
        raise ValueError("batch_size and codec_bytes must be >= 1 and label_bytes >= 0")
    up = tuple(batch_size * (v * codec_bytes + label_bytes) for v in numel) + (0,)
    down = tuple(batch_size * v * codec_bytes for v in numel) + (0,)
    return ModelCosts(up, down, tuple(weight_bytes))


@dataclass(frozen=True)
class Column:
    """One column of the cost matrices: a split, run with one of the problem's options (its index
    in `Problem.options`; with one option, always 0), in one of the device's power modes (0: the
    mode in force, i >= 1: `DeviceInput.modes[i - 1]`)."""

    option: int
    split: int
    mode: int = 0

    def flat(self, n_splits: int, n_options: int | None = None) -> int:
        """Where this column lies in the matrices' flat column axis (mode-major, then option-major;
        `n_options` is needed only past the mode in force)."""
        if n_options is None:
            if self.mode:
                raise ValueError("a column in another power mode needs n_options to find its place")
            return self.option * n_splits + self.split
        return (self.mode * n_options + self.option) * n_splits + self.split

    @classmethod
    def at(cls, flat: int, n_splits: int, n_options: int | None = None) -> "Column":
        """The column at a position of the matrices' flat column axis (without `n_options`: one
        with a single power mode, the one in force)."""
        if n_options is None:
            return cls(*divmod(int(flat), n_splits))
        mode, rest = divmod(int(flat), n_options * n_splits)
        option, split = divmod(rest, n_splits)
        return cls(option, split, mode)


@dataclass(frozen=True)
class PowerMode:
    """A power mode a device may be switched to: its compute profile and board power in that mode.
    `compute.source` says whether the profile was measured in the mode or derived from another."""

    name: str
    compute: ComputeProfile
    power: PowerModel

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a power mode needs a name")


def other_modes(profile: ComputeProfile, measured: Mapping[str, ComputeProfile] | None = None,
                power: Mapping[str, PowerModel] | None = None) -> tuple[PowerMode, ...]:
    """Every power mode of the profile's device class but the one it is in, each with its profile
    (measured where `measured` has it, else derived from `profile`) and power model (`power`'s
    where given, e.g. measured, else the table's); () for a class without modes."""
    return tuple(PowerMode(m, profile_in_mode(profile, m, measured),
                           (power or {}).get(m) or power_model(profile.device_class, m))
                 for m in modes_of(profile.device_class) if m != profile.power_mode)


@dataclass(frozen=True)
class DeviceInput:
    """Everything the optimiser knows about one device."""

    name: str
    compute: ComputeProfile
    up_bps: float  # bytes per second, device -> server
    down_bps: float  # bytes per second, server -> device
    power: PowerModel
    iterations: int  # batches per round
    alpha: float | None = None  # this device's time weight (energy sensitivity = 1 - alpha); None -> policy's
    pinned_split: int | None = None
    duplex: str = "full"  # "half": up and down share one rate (Wi-Fi); up_bps is that rate
    latency_s: float = 0.0  # per request (one per micro-batch, plus join and upload)
    step_overhead_s: float = 0.0  # per offloaded iteration, measured beyond the model (controller)
    # or, where known per column, one figure per split for each of the problem's options, in their order
    step_overheads: tuple[tuple[float, ...], ...] | None = None
    session_overhead_s: float = 0.0  # per round, measured beyond its steps and the weights' transfer (controller)
    codecs: tuple[str, ...] | None = None  # options this device may take (None: every option of the problem)
    micro_batches: tuple[int, ...] | None = None
    current: Column | None = None  # the column it runs now (in the mode in force): kept unless clearly beaten
    modes: tuple[PowerMode, ...] = ()  # other power modes it may be switched to (the one in force: compute, power)
    pinned_mode: str | None = None  # the only mode it may run in (None: any of its modes)
    switch_s: float = 0.0  # the pause a mode switch costs, charged to the round that starts in the new mode
    shard: int = 0  # the server shard it trains at (a shared server is shared by its shard's offloaders)

    @property
    def mode(self) -> str:
        """The power mode in force (its profile's)."""
        return self.compute.power_mode

    @property
    def mode_names(self) -> tuple[str, ...]:
        """Its modes in column order: the one in force, then `modes`."""
        return (self.compute.power_mode, *(m.name for m in self.modes))

    def __post_init__(self) -> None:
        object.__setattr__(self, "modes", tuple(self.modes))
        if self.modes:  # one mode alone cannot repeat
            names = self.mode_names
            if len(set(names)) != len(names):
                raise ValueError(f"device {self.name!r}: power modes repeat a name (the one in force first): "
                                 f"{list(names)}")
        if self.pinned_mode is not None and self.pinned_mode not in (names := self.mode_names):
            raise ValueError(f"device {self.name!r}: pinned mode {self.pinned_mode!r} is not one of its modes {list(names)}")
        if not math.isfinite(self.switch_s) or self.switch_s < 0:
            raise ValueError(f"device {self.name!r}: switch_s must be >= 0 seconds, got {self.switch_s!r}")
        if self.current is not None and isinstance(self.current, Column) and self.current.mode != 0:
            raise ValueError(f"device {self.name!r}: its current column runs in the mode in force (mode 0)")
        if self.duplex not in DUPLEX:
            raise ValueError(f"device {self.name!r}: duplex must be one of {DUPLEX}, got {self.duplex!r}")
        if not math.isfinite(self.latency_s) or self.latency_s < 0:
            raise ValueError(f"device {self.name!r}: latency_s must be >= 0 seconds, got {self.latency_s!r}")
        if not math.isfinite(self.step_overhead_s) or self.step_overhead_s < 0:
            raise ValueError(f"device {self.name!r}: step_overhead_s must be >= 0 seconds, got {self.step_overhead_s!r}")
        if not math.isfinite(self.session_overhead_s) or self.session_overhead_s < 0:
            raise ValueError(f"device {self.name!r}: session_overhead_s must be >= 0 seconds, "
                             f"got {self.session_overhead_s!r}")
        if self.step_overheads is not None and not all(math.isfinite(v) and v >= 0
                                                       for row in self.step_overheads for v in row):
            raise ValueError(f"device {self.name!r}: step_overheads must be finite seconds >= 0")
        if self.current is not None and not isinstance(self.current, Column):
            raise ValueError(f"device {self.name!r}: current must be a Column(option, split), got {self.current!r}")
        for name in ("up_bps", "down_bps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not MIN_BPS <= value <= MAX_BPS:
                raise ValueError(f"device {self.name!r}: {name} must be within {MIN_BPS:g}..{MAX_BPS:g} bytes/s "
                                 f"({MIN_BPS * 8e-6:g}..{MAX_BPS * 8e-6:g} Mbit/s), got {value!r}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(f"device {self.name!r}: iterations must be an integer >= 0, got {self.iterations!r}")
        if self.alpha is not None:
            check_alpha(self.alpha)


@dataclass(frozen=True)
class Problem:
    """A fleet, the server and the model: the whole input of a decision."""

    devices: tuple[DeviceInput, ...]
    server: ServerProfile
    model: ModelCosts
    options: tuple[Option, ...] = ()  # (codec, k) choices; empty: one, (codec, 1) with `model`
    codec: str = "fp32"  # the codec `model`'s byte counts are for
    noise: float = 0.0  # how much a device's step time moves from one round to the next (`round_noise`)

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", tuple(self.devices))
        if not self.devices:
            raise ValueError("a problem needs at least one device")
        if not self.options:
            object.__setattr__(self, "options", (Option(self.codec, 1, self.model),))
        object.__setattr__(self, "options", tuple(self.options))
        n = self.model.n_splits
        if any(o.model.n_splits != n for o in self.options):
            raise ValueError(f"every option's byte counts need {n} splits")
        labels = [(o.codec, o.micro_batches) for o in self.options]
        if len(set(labels)) != len(labels):
            raise ValueError(f"options repeat a (codec, micro_batches) pair: {labels}")
        if self.server.n_splits != n:
            raise ValueError(f"server profile has {self.server.n_splits} splits, the model {n}")
        names = [d.name for d in self.devices]
        if len(set(names)) != len(names):
            dupes = sorted({x for x in names if names.count(x) > 1})
            raise ValueError(f"device names must be unique; repeated: {dupes}")
        for d in self.devices:
            if d.compute.n_splits != n:
                raise ValueError(f"device {d.name!r}: profile has {d.compute.n_splits} splits, the model {n}")
            if d.step_overheads is not None and [len(row) for row in d.step_overheads] != [n] * len(self.options):
                raise ValueError(f"device {d.name!r}: step_overheads needs one figure per option and split "
                                 f"({len(self.options)} x {n}), got {[len(row) for row in d.step_overheads]}")
            for m in d.modes:
                if m.compute.n_splits != n or m.compute.batch_size != d.compute.batch_size:
                    raise ValueError(f"device {d.name!r}: mode {m.name!r} has a profile of {m.compute.n_splits} "
                                     f"splits at batch {m.compute.batch_size}; the mode in force, {n} at "
                                     f"{d.compute.batch_size}")
            if d.compute.batch_size != self.server.batch_size:
                raise ValueError(f"device {d.name!r}: profile is for batch {d.compute.batch_size}, the server's "
                                 f"for {self.server.batch_size}; rescale one (profile.rescaled(batch))")
            if d.pinned_split is not None:
                check_split(d.pinned_split, n, f"device {d.name!r}: pinned split")
            if d.current is not None and not (0 <= d.current.option < len(self.options) and 0 <= d.current.split < n):
                raise ValueError(f"device {d.name!r}: current column (option {d.current.option}, split "
                                 f"{d.current.split}) is not one of the {len(self.options)} x {n} (option x split) columns")

    @property
    def n_splits(self) -> int:
        return self.model.n_splits

    @cached_property
    def mode_counts(self) -> np.ndarray:
        """(N,): how many power modes each device has (1 + its other modes), read once per problem
        (a problem never changes)."""
        return np.fromiter((1 + len(d.modes) for d in self.devices), int, len(self.devices))

    @cached_property
    def n_modes(self) -> int:
        """Power modes on the column axis: the most any device has (1 when none lists other modes)."""
        return int(self.mode_counts.max())

    @property
    def n_columns(self) -> int:
        return self.n_modes * len(self.options) * self.n_splits

    def arrays(self) -> "ProblemArrays":
        """The problem as arrays, what the policies decide over (made anew on every call)."""
        return ProblemArrays.of(self)



@dataclass(frozen=True)
class DevicePlan:
    """One device's split and its predicted costs (the four times are per iteration)."""

    name: str
    split: int
    iteration_s: float
    round_s: float
    energy_iteration_j: float
    energy_round_j: float
    device_s: float
    server_s: float
    up_s: float
    down_s: float
    energy_source: str = "modelled"  # "measured" when the power model came from a sensor
    codec: str = "fp32"
    micro_batches: int = 1
    power_mode: str = ""  # the mode it runs the round in
    mode_source: str = ""  # its profile's source in that mode: "measured" | "derived" | "published"
    switches_mode: bool = False  # the mode differs from the one in force (the round pays the switch)


@dataclass(frozen=True)
class Plan:
    """A decision for the whole fleet: the round lasts as long as the slowest device."""

    policy: str
    devices: tuple[DevicePlan, ...]
    round_s: float
    energy_round_j: float
    server_shared: bool = False

    def split_of(self, name: str) -> int:
        for d in self.devices:
            if d.name == name:
                return d.split
        raise KeyError(f"no device {name!r} in this plan; devices: {[d.name for d in self.devices]}")

    @property
    def splits(self) -> dict[str, int]:
        return {d.name: d.split for d in self.devices}

    @property
    def power_modes(self) -> dict[str, str]:
        """Each device's power mode for the round (its mode in force where it has no other)."""
        return {d.name: d.power_mode for d in self.devices}

    def as_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "round_s": self.round_s, "energy_round_j": self.energy_round_j,
                "server_shared": self.server_shared,
                "devices": [dict(d.__dict__) for d in self.devices]}



def check_alpha(alpha: float) -> float:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (time weight) must be within 0..1, got {alpha!r}")
    return float(alpha)


def check_split(split: int, n: int, what: str) -> int:
    if isinstance(split, bool) or not isinstance(split, (int, np.integer)) or not 0 <= split < n:
        raise ValueError(f"{what} {split!r} is out of range: valid split points are 0..{n - 1} "
                         f"({n - 1} keeps every layer on the device)")
    return int(split)



# ---- the cost model, vectorised over devices (rows) and columns (modes x options x splits) -----
# Flat column c is `Column.at(c, S, O)`: mode-major, then option-major; with one mode and one option
# the columns are the splits.

@dataclass(frozen=True)
class CostInputs:
    """The problem as arrays: one row per device; per mode and option, one column per split."""

    fwd: np.ndarray  # (N, M, S): per power mode (0: the one in force; padded with it past a device's own)
    bwd: np.ndarray  # (N, M, S)
    server_s: np.ndarray  # (S,)
    up_bytes: np.ndarray  # (O, S)
    down_bytes: np.ndarray  # (O, S)
    micro: np.ndarray  # (O,)
    weight_bytes: np.ndarray  # (S,)
    up_bps: np.ndarray  # (N, 1)
    down_bps: np.ndarray  # (N, 1)
    iterations: np.ndarray  # (N, 1)
    power: np.ndarray  # (N, M, 3): compute, tx, rx watts per power mode
    latency: np.ndarray  # (N, 1)
    session: np.ndarray  # (N, 1) seconds per round beyond steps and weights (session_overhead_s)
    step_overhead: np.ndarray  # (N, options x splits), 0 at the last split
    half: np.ndarray  # (N, 1) bool
    names: tuple[str, ...]  # for errors
    switch: np.ndarray | None = None  # (N, M) seconds a round in that mode waits for the switch (0 for mode 0)

    @classmethod
    def of(cls, problem: Problem) -> "CostInputs":
        d, m = problem.devices, problem.model
        n, s, n_modes = len(d), problem.n_splits, problem.n_modes

        def matrix(values: Any, width: int) -> np.ndarray:  # fromiter over a flat stream: fast for big fleets
            return np.fromiter(itertools.chain.from_iterable(values), float, n * width).reshape(n, width)

        def column(values: Any) -> np.ndarray:
            return np.fromiter(values, float, n)[:, None]

        opts = problem.options
        if n_modes == 1:
            fwd = matrix((x.compute.fwd for x in d), s)[:, None, :]
            bwd = matrix((x.compute.bwd for x in d), s)[:, None, :]
            power = matrix(((x.power.compute_w, x.power.tx_w, x.power.rx_w) for x in d), 3)[:, None, :]
            switch = None
        else:  # one pass: per device and mode, fwd + bwd + watts; padded with the mode in force (never valid)
            rows: list[tuple[float, ...]] = []
            for x in d:
                first = x.compute.fwd + x.compute.bwd + (x.power.compute_w, x.power.tx_w, x.power.rx_w)
                rows.append(first)
                for y in x.modes:
                    rows.append(y.compute.fwd + y.compute.bwd + (y.power.compute_w, y.power.tx_w, y.power.rx_w))
                rows.extend([first] * (n_modes - 1 - len(x.modes)))
            table = np.fromiter(itertools.chain.from_iterable(rows), float, n * n_modes * (2 * s + 3)).reshape(
                n, n_modes, 2 * s + 3)
            fwd, bwd, power = table[:, :, :s], table[:, :, s:2 * s], table[:, :, 2 * s:]
            switch = np.column_stack([np.zeros(n), np.repeat(column(x.switch_s for x in d), n_modes - 1, axis=1)])
        return cls(
            fwd=fwd, bwd=bwd,
            server_s=np.array(problem.server.fwd) + np.array(problem.server.bwd),
            up_bytes=np.array([o.model.up_bytes for o in opts], dtype=float),
            down_bytes=np.array([o.model.down_bytes for o in opts], dtype=float),
            micro=np.array([o.micro_batches for o in opts], dtype=float),
            weight_bytes=np.array(m.weight_bytes, dtype=float),
            up_bps=column(x.up_bps for x in d), down_bps=column(x.down_bps for x in d),
            iterations=column(x.iterations for x in d),
            power=power,
            latency=column(x.latency_s for x in d),
            session=column(x.session_overhead_s for x in d),
            step_overhead=_step_overheads(d, len(opts) * s) * np.tile(np.arange(s) < s - 1, len(opts)),
            half=np.fromiter((x.duplex == "half" for x in d), bool, n)[:, None],
            names=tuple(x.name for x in d), switch=switch)

    def rows(self, idx: np.ndarray) -> "CostInputs":
        return replace(self, fwd=self.fwd[idx], bwd=self.bwd[idx], up_bps=self.up_bps[idx],
                       down_bps=self.down_bps[idx], iterations=self.iterations[idx], power=self.power[idx],
                       latency=self.latency[idx], session=self.session[idx], step_overhead=self.step_overhead[idx],
                       half=self.half[idx], switch=None if self.switch is None else self.switch[idx],
                       names=tuple(map(self.names.__getitem__, np.asarray(idx).tolist())))

    @property
    def n_modes(self) -> int:
        return self.fwd.shape[1]


@dataclass(frozen=True)
class ProblemArrays:
    """A problem as arrays, one row per device: what the policies decide over and `plan_columns`
    turns into a plan. `Problem.arrays()` makes one from the dataclasses; the controller makes one
    from telemetry directly (at 10,000 devices, building a `DeviceInput` per device and reading
    them back into arrays took most of a decision's time)."""

    x: CostInputs  # the cost model's inputs; `x.names` are the devices' names
    options: tuple[Option, ...]
    mode_counts: np.ndarray  # (N,) int: its power modes, the one in force included
    valid: np.ndarray  # (N, C) bool: the columns it may take before pins (`valid_columns`)
    alpha: np.ndarray  # (N,) its own time weight; nan: the policy's
    pinned_split: np.ndarray  # (N,) int; -1: none
    pinned_mode: np.ndarray  # (N,) int, the index of its pinned mode (0: the one in force); -1: none
    current: np.ndarray  # (N,) int, the flat column it runs now (`Column.flat`); -1: none
    mode_labels: np.ndarray  # (N, M) int: per mode, its row in `labels` (past its own modes: mode 0's)
    labels: tuple[tuple[str, str, str], ...]  # (power mode, its profile's source, its power model's source)
    noise: float = 0.0  # the fleet's round-to-round spread of step times, a lognormal sigma (`Problem.noise`)
    shard: np.ndarray | None = None  # (N,) int: the server shard each trains at; None: one server

    @classmethod
    def of(cls, problem: Problem) -> "ProblemArrays":
        s, opts, d, n = problem.n_splits, problem.options, problem.devices, len(problem.devices)
        barred = np.zeros((n, len(opts) * s), dtype=bool)  # the options a device's codecs or ks rule out
        for i, x in enumerate(d):
            if x.codecs is None and x.micro_batches is None:
                continue
            for o, opt in enumerate(opts):
                if ((x.codecs is not None and opt.codec not in x.codecs)
                        or (x.micro_batches is not None and opt.micro_batches not in x.micro_batches)):
                    barred[i, o * s:o * s + s - 1] = True
        # each mode's label: the modes in force, then every device's other modes one after another
        label = operator.attrgetter("compute.power_mode", "compute.source", "power.source")
        in_force = list(map(label, d))
        others = list(map(label, itertools.chain.from_iterable(x.modes for x in d)))
        labels = {key: i for i, key in enumerate(dict.fromkeys(in_force + others))}
        mode_labels = np.repeat(np.array([labels[key] for key in in_force], dtype=int)[:, None], problem.n_modes, axis=1)
        if others:
            count = problem.mode_counts - 1  # each device's other modes
            row = np.repeat(np.arange(n), count)
            mode_labels[row, 1 + np.arange(len(others)) - np.repeat(np.cumsum(count) - count, count)] = [
                labels[key] for key in others]

        def ints(values: Any) -> np.ndarray:
            return np.fromiter(values, int, n)

        return cls(x=CostInputs.of(problem), options=opts, mode_counts=problem.mode_counts,
                   valid=valid_columns(s, len(opts), problem.mode_counts, barred),
                   alpha=np.fromiter((math.nan if x.alpha is None else x.alpha for x in d), float, n),
                   pinned_split=ints(-1 if x.pinned_split is None else x.pinned_split for x in d),
                   pinned_mode=ints(-1 if x.pinned_mode is None else x.mode_names.index(x.pinned_mode) for x in d),
                   current=ints(-1 if x.current is None else x.current.flat(s, len(opts)) for x in d),
                   mode_labels=mode_labels, labels=tuple(labels), noise=problem.noise,
                   shard=ints(x.shard for x in d) if any(x.shard for x in d) else None)

    @property
    def names(self) -> tuple[str, ...]:
        return self.x.names

    @property
    def n_splits(self) -> int:
        return self.x.weight_bytes.shape[0]

    @property
    def n_modes(self) -> int:
        return self.x.n_modes

    @property
    def n_columns(self) -> int:
        return self.n_modes * len(self.options) * self.n_splits

    def rows(self, idx: np.ndarray, n_modes: int | None = None) -> "ProblemArrays":
        """These devices alone (`idx`), with the columns of their first `n_modes` power modes only
        (default: every mode's)."""
        m = self.n_modes if n_modes is None else n_modes
        x = self.x.rows(idx)
        if m < self.n_modes:
            x = replace(x, fwd=x.fwd[:, :m], bwd=x.bwd[:, :m], power=x.power[:, :m],
                        switch=None if x.switch is None or m == 1 else x.switch[:, :m])
        width = m * len(self.options) * self.n_splits
        return replace(self, x=x, mode_counts=self.mode_counts[idx], valid=self.valid[idx, :width],
                       alpha=self.alpha[idx], pinned_split=self.pinned_split[idx], pinned_mode=self.pinned_mode[idx],
                       current=self.current[idx], mode_labels=self.mode_labels[idx, :m],
                       shard=None if self.shard is None else self.shard[idx])

    def shards(self) -> list[np.ndarray]:
        """The rows of each server shard, shard by shard (one server: every row)."""
        if self.shard is None:
            return [np.arange(len(self.names))]
        return [np.flatnonzero(self.shard == k) for k in np.unique(self.shard).tolist()]

    def server_share(self, cols: np.ndarray) -> np.ndarray:
        """(N, 1): how many ways each device's server is shared at these columns: the offloaders of
        its shard (at least 1)."""
        off = np.asarray(cols) % self.n_splits < self.n_splits - 1
        shard = np.zeros(len(off), dtype=int) if self.shard is None else self.shard
        counts = np.bincount(shard[off], minlength=int(shard.max(initial=0)) + 1)
        return np.maximum(counts[shard], 1).astype(float)[:, None]

    def column_modes(self) -> np.ndarray:
        """(C,): the mode index (0: the one in force) of every flat column."""
        return np.arange(self.n_columns) // (len(self.options) * self.n_splits)

    def allowed(self) -> np.ndarray:
        """(N, C) mask of the columns each device may take: valid ones, at its pinned split and in its
        pinned mode where it has them."""
        cols = np.arange(self.n_columns)
        split_ok = (self.pinned_split[:, None] < 0) | (cols % self.n_splits == self.pinned_split[:, None])
        mode_ok = (self.pinned_mode[:, None] < 0) | (self.column_modes()[None, :] == self.pinned_mode[:, None])
        return self.valid & split_ok & mode_ok


def valid_columns(n_splits: int, n_options: int, mode_counts: np.ndarray, barred: np.ndarray | None = None) -> np.ndarray:
    """(N, C): the columns each device may take: at the last split only the first option (nothing
    travels), no mode beyond a device's own (`mode_counts`), no (option, split) cell that `barred`
    (N, options x splits) rules out (the device's codecs and micro-batches)."""
    s, width = n_splits, n_options * n_splits
    valid = np.ones((len(mode_counts), width), dtype=bool)
    valid[:, [o * s + s - 1 for o in range(1, n_options)]] = False
    if barred is not None:
        valid &= ~barred
    n_modes = int(mode_counts.max())
    if n_modes == 1:
        return valid
    return np.tile(valid, (1, n_modes)) & (np.repeat(np.arange(n_modes), width)[None, :] < mode_counts[:, None])


class Costs:
    """Every device's costs in every column, as flat (N, C) matrices. Inside they are kept per option,
    over (mode, device, split) with broadcasting (`cost_matrices` says why), and a matrix is laid
    out in full only when asked for (`pick` reads single cells without it)."""

    FIELDS = ("device_s", "server_s", "up_s", "down_s", "iteration_s", "round_s", "energy_iteration_j",
              "energy_round_j")

    def __init__(self, shape: tuple[int, int, int, int], parts: Mapping[str, Sequence[np.ndarray]]) -> None:
        self._shape, self._parts, self._flat = shape, parts, {}

    def _get(self, name: str) -> np.ndarray:
        if name not in self._flat:
            n, m, n_opt, s = self._shape
            out = np.empty(self._shape)
            for o, part in enumerate(self._parts[name]):
                out[:, :, o, :] = np.broadcast_to(part, (m, n, s)).transpose(1, 0, 2)
            self._flat[name] = out.reshape(n, m * n_opt * s)
        return self._flat[name]

    def pick(self, name: str, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The cells (rows[i], cols[i]) of one matrix."""
        n, m, n_opt, s = self._shape
        mode, rest = np.divmod(cols, n_opt * s)
        option, split = np.divmod(rest, s)
        out = np.empty(len(cols))
        for o, part in enumerate(self._parts[name]):
            at = option == o
            out[at] = np.broadcast_to(part, (m, n, s))[mode[at], rows[at], split[at]]
        return out

    device_s = property(lambda self: self._get("device_s"))
    server_s = property(lambda self: self._get("server_s"))
    up_s = property(lambda self: self._get("up_s"))
    down_s = property(lambda self: self._get("down_s"))
    iteration_s = property(lambda self: self._get("iteration_s"))
    round_s = property(lambda self: self._get("round_s"))
    energy_iteration_j = property(lambda self: self._get("energy_iteration_j"))
    energy_round_j = property(lambda self: self._get("energy_round_j"))


def pipelined_iteration(f: Any, u: Any, v: Any, d: Any, b: Any, k: Any, half: Any = False) -> Any:
    """Seconds per batch for k micro-batches with per-micro-batch stage times f, u, v, d, b (see the
    module docstring). Works elementwise on numpy arrays; k = 1 is f + u + v + d + b."""
    a = f + u + v + d
    if np.ndim(k) == 0 and k == 1:
        # one micro-batch: the stages one after another; each bound below is then a + b, to the bit
        # (k (f + b) <= a + b, and (k - 1) M adds 0), without their passes over the arrays
        flow = a + b
    else:
        full = np.maximum(np.maximum(f, u), np.maximum(v, d))
        m = np.where(half, np.maximum(np.maximum(f, u + d), v), full) if np.any(half) else full
        flow = np.maximum(np.maximum(k * (f + b), a + k * b), a + (k - 1) * m + b)
    if not np.any(half):  # every link full duplex: no half-duplex arithmetic at all
        return flow
    # half duplex: the one link carries every upload and download, after the first forward
    return np.where(half, np.maximum(flow, f + k * (u + d) + b), flow)


def _step_overheads(devices: Sequence[DeviceInput], columns: int) -> np.ndarray:
    """(N, columns): each device's per-column figures where given, else its one figure everywhere."""
    out = np.repeat(np.fromiter((x.step_overhead_s for x in devices), float, len(devices))[:, None], columns, axis=1)
    for i, x in enumerate(devices):
        if x.step_overheads is not None:
            out[i] = [v for row in x.step_overheads for v in row]
    return out


def _predicted(*, fwd: Any, bwd: Any, server: Any, up_bytes: Any, down_bytes: Any, k: Any, last: Any,
               weight_bytes: Any, up_bps: Any, down_bps: Any, iterations: Any, latency: Any, session: Any,
               step_overhead: Any, half: Any, pc: Any, ptx: Any, prx: Any, switch: Any,
               memo: dict[Any, Any] | None = None) -> dict[str, Any]:
    """The cost model's arithmetic (the module docstring), elementwise over operands that broadcast
    together: `cost_matrices` passes them per option, shaped over (mode, device, split), `cell_costs`
    one value per cell. One place for it, so that both give the same floats. `memo`: where
    `cost_matrices` keeps, from one option to the next, the terms that do not depend on the option
    (the device part, the weights' energy) and the energies of options that move the same bytes
    (which do not depend on k or the server)."""
    def once(key: Any, make: Callable[[], Any]) -> Any:
        if memo is None:
            return make()
        if key not in memo:
            memo[key] = make()
        return memo[key]

    with np.errstate(over="ignore", invalid="ignore"):  # absurd inputs overflow: refused by the callers
        device = once("device", lambda: fwd + bwd)
        up = up_bytes / up_bps
        down = down_bytes / down_bps
        lat = np.where(last, 0.0, latency)  # one request per micro-batch; none at the last split
        iteration = pipelined_iteration(_per_micro_batch(fwd, k), up / k + lat, server / k, down / k,
                                        _per_micro_batch(bwd, k), k, half)
        iteration = iteration + step_overhead
        weights_down = weight_bytes / down_bps
        weights_up = weight_bytes / up_bps
        round_s = iterations * iteration + (weights_down + weights_up + 2 * latency + session)
        if switch is not None:
            round_s = round_s + switch

        def energies() -> tuple[Any, Any]:
            e = once("compute energy", lambda: pc * device) + ptx * up + prx * down
            return e, iterations * e + once("weights' energy", lambda: prx * weights_down + ptx * weights_up)

        moved = None if memo is None else (np.asarray(up_bytes).tobytes(), np.asarray(down_bytes).tobytes())
        energy = once(("energies", moved), energies)
    return dict(device_s=device, server_s=server, up_s=up, down_s=down, iteration_s=iteration, round_s=round_s,
                energy_iteration_j=energy[0], energy_round_j=energy[1])


def _per_micro_batch(v: Any, k: Any) -> Any:
    """v / k; v itself for one micro-batch (the same floats, without a pass over a large array)."""
    return v if np.ndim(k) == 0 and k == 1 else v / k


def _refuse_overflow(arrays: Sequence[np.ndarray], names: Sequence[str], axis: int = 0) -> None:
    """A ValueError naming the first device whose predicted round time or energy is not finite, in
    any of `arrays` (the devices on `axis`). A finite round implies a finite iteration, likewise for
    energy, so those two are the ones to look at."""
    with np.errstate(over="ignore", invalid="ignore"):
        # every cell is >= 0, so finite sums mean finite cells: one pass each without a temporary in
        # the common case; sums that overflow from huge finite cells are looked at cell by cell
        if all(math.isfinite(v.sum()) for v in arrays):
            return
    bad = np.zeros(len(names), dtype=bool)
    for v in arrays:
        bad |= ~np.isfinite(np.moveaxis(v, axis, 0).reshape(len(names), -1)).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"device {names[i]!r}: its predicted time or energy is not finite (overflow); "
                         "its profile, link rates, power or iterations are out of any sensible range")


def cost_matrices(x: CostInputs, server_share: float | np.ndarray = 1.0) -> Costs:
    """Every device's costs in every column; server time multiplied by `server_share` (>= 1 when shared;
    a scalar, or an array that broadcasts to (N, C): one share per device or per cell).

    Computed one option at a time, over (mode, device, split): every operand either runs over all
    three or over (device, split), repeated along the outermost axis, so numpy's loops run over
    long rows. (Over (device, mode, split) an operand per device and split repeats every 7 values:
    numpy's loops then run 7 values at a time, four times slower a value.) With one micro-batch the
    pipelining arithmetic drops out; options that move the same bytes (a codec with several k)
    share their energies. The arithmetic of each cell is `_predicted`'s, whatever the layout."""
    n_opt, s = x.up_bytes.shape
    n, m = x.fwd.shape[0], x.n_modes

    def each_split(v: np.ndarray) -> np.ndarray:  # per device (N, 1) -> (N, S), laid out
        return np.ascontiguousarray(np.broadcast_to(v, (n, s)))

    def each_mode(v: np.ndarray) -> np.ndarray:  # (N, M) -> (M, N, S), laid out
        return np.ascontiguousarray(np.broadcast_to(v.T[:, :, None], (m, n, s)))

    share = np.asarray(server_share, dtype=float)
    with np.errstate(over="ignore", invalid="ignore"):
        if share.ndim == 0:
            server = [each_split(x.server_s * share)] * n_opt
        else:  # one share per device or cell
            per_cell = (np.tile(x.server_s, m * n_opt) * np.broadcast_to(share, (n, m * n_opt * s))).reshape(
                n, m, n_opt, s)
            server = [np.ascontiguousarray(per_cell[:, :, o].transpose(1, 0, 2)) for o in range(n_opt)]
    common = dict(
        fwd=np.ascontiguousarray(x.fwd.transpose(1, 0, 2)), bwd=np.ascontiguousarray(x.bwd.transpose(1, 0, 2)),
        last=np.arange(s) == s - 1, weight_bytes=x.weight_bytes, up_bps=x.up_bps, down_bps=x.down_bps,
        iterations=each_split(x.iterations), latency=x.latency, session=x.session,
        half=each_split(x.half) if x.half.any() else False, pc=each_mode(x.power[:, :, 0]),
        ptx=each_mode(x.power[:, :, 1]), prx=each_mode(x.power[:, :, 2]),
        switch=None if x.switch is None else each_mode(x.switch))
    parts: dict[str, list[np.ndarray]] = {f: [] for f in Costs.FIELDS}
    memo: dict[Any, Any] = {}  # what the options share (`_predicted`)
    for o in range(n_opt):
        part = _predicted(**common, server=server[o], up_bytes=x.up_bytes[o], down_bytes=x.down_bytes[o],
                          k=float(x.micro[o]), step_overhead=np.ascontiguousarray(x.step_overhead[:, o * s:(o + 1) * s]),
                          memo=memo)
        for f in Costs.FIELDS:
            parts[f].append(part[f])
    energies = {id(e): e for e in parts["energy_round_j"]}.values()  # each once
    _refuse_overflow([*parts["round_s"], *energies], x.names, axis=1)
    return Costs((n, m, n_opt, s), parts)


def cell_costs(x: CostInputs, rows: np.ndarray, cols: np.ndarray,
               server_share: float | np.ndarray = 1.0) -> dict[str, np.ndarray]:
    """The cost model at the cells (rows[i], cols[i]) alone, by `Costs.FIELDS`: what a plan needs,
    without a matrix laid out (`server_share`: one for all, or one per cell). The same arithmetic as
    `cost_matrices`, so the same floats."""
    n_opt, s = x.up_bytes.shape
    mode, rest = np.divmod(cols, n_opt * s)
    option, split = np.divmod(rest, s)

    def per_row(v: np.ndarray) -> np.ndarray:  # (N, 1) -> one value per cell
        return v[rows, 0]

    with np.errstate(over="ignore", invalid="ignore"):
        server = x.server_s[split] * np.asarray(server_share, dtype=float)
    power = x.power[rows, mode]
    parts = _predicted(
        fwd=x.fwd[rows, mode, split], bwd=x.bwd[rows, mode, split], server=server, up_bytes=x.up_bytes[option, split],
        down_bytes=x.down_bytes[option, split], k=x.micro[option], last=split == s - 1,
        weight_bytes=x.weight_bytes[split], up_bps=per_row(x.up_bps), down_bps=per_row(x.down_bps),
        iterations=per_row(x.iterations), latency=per_row(x.latency), session=per_row(x.session),
        step_overhead=x.step_overhead[rows, option * s + split], half=per_row(x.half), pc=power[:, 0],
        ptx=power[:, 1], prx=power[:, 2], switch=None if x.switch is None else x.switch[rows, mode])
    _refuse_overflow([parts["round_s"], parts["energy_round_j"]], [x.names[i] for i in np.asarray(rows).tolist()])
    return parts


def _plan(policy: str, p: ProblemArrays, cols: np.ndarray, shared: bool, cells: dict[str, np.ndarray]) -> Plan:
    s, n_opt = p.n_splits, len(p.options)
    mode, rest = np.divmod(cols, s * n_opt)
    option, split = np.divmod(rest, s)
    pick = [cells[f].tolist() for f in
            ("iteration_s", "round_s", "energy_iteration_j", "energy_round_j", "device_s", "server_s", "up_s", "down_s")]
    def each(values: Sequence[Any], index: np.ndarray) -> list:  # values[index[i]] for every i
        table = np.empty(len(values), dtype=object)
        table[:] = values
        return table[index].tolist()

    label = p.mode_labels[np.arange(len(cols)), mode]
    power_mode, mode_source, energy_source = (each([lab[j] for lab in p.labels], label) for j in range(3))
    fields = (p.names, split.tolist(), *pick, energy_source, each([o.codec for o in p.options], option),
              each([o.micro_batches for o in p.options], option), power_mode, mode_source, (mode > 0).tolist())
    return Plan(policy, _device_plans(fields), round_s=max(pick[1]), energy_round_j=math.fsum(pick[3]),
                server_shared=shared)


_PLAN_FIELDS = tuple(f.name for f in dataclasses.fields(DevicePlan))


def _device_plans(fields: Sequence[Sequence[Any]]) -> tuple[DevicePlan, ...]:
    """One `DevicePlan` per device from one sequence per field (in the dataclass's order), each
    made as `copy` and `pickle` make an object: its attribute dict filled, `__init__` not run. A
    frozen dataclass's `__init__` sets every field through `object.__setattr__`: 1.7 us for the 16
    fields of a plan, 17 ms of a 10,000-device decision, against 11 ms so. `DevicePlan` checks
    nothing in `__init__` (it has no `__post_init__`), so nothing is skipped."""
    new, out = object.__new__, []
    for values in zip(*fields):
        plan = new(DevicePlan)
        plan.__dict__.update(zip(_PLAN_FIELDS, values))
        out.append(plan)
    return tuple(out)


def plan_columns(p: ProblemArrays, cols: np.ndarray, policy: str, share_server: bool) -> Plan:
    """The one way every plan is made: the cost model at the given columns (in the mode it runs in:
    a round in a new mode pays the switch)."""
    cols = np.asarray(cols, dtype=int)
    share = p.server_share(cols)[:, 0] if share_server else 1.0
    return _plan(policy, p, cols, share_server, cell_costs(p.x, np.arange(len(cols)), cols, share))


def _option_index(problem: Problem | ProblemArrays, codec: str, micro_batches: int) -> int:
    for o, opt in enumerate(problem.options):
        if (opt.codec, opt.micro_batches) == (codec, micro_batches):
            return o
    raise ValueError(f"no option {codec}/k={micro_batches} in this problem; options: "
                     f"{[o.label for o in problem.options]}")


def iteration_table(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """(iteration seconds, bytes moved per iteration), each indexed [device, option, split], as the
    model sees them without any device's step overheads: what a measured step is held against."""
    x = CostInputs.of(problem)
    c = cost_matrices(replace(x, step_overhead=np.zeros_like(x.step_overhead)))
    shape = (len(problem.devices), len(problem.options), problem.n_splits)
    in_force = c.iteration_s[:, :shape[1] * shape[2]]  # mode 0: the mode the steps ran in
    return in_force.reshape(shape), np.broadcast_to(x.up_bytes + x.down_bytes, shape)


def session_table(problem: Problem | ProblemArrays | None = None, x: CostInputs | None = None) -> np.ndarray:
    """Indexed [device, option, split]: what the model charges a round beyond its iterations (the
    weights each way, the join and upload requests), without any session overhead: what the rest
    of a measured session, beyond its steps, is held against (`x`: the problem's inputs, where
    already made; given alone, for its rows)."""
    if x is None:
        x = problem.x if isinstance(problem, ProblemArrays) else CostInputs.of(problem)
    n_opt, s = x.up_bytes.shape
    # the mode in force only, the mode the sessions ran in (the same floats as in the whole matrices)
    in_force = replace(x, fwd=x.fwd[:, :1], bwd=x.bwd[:, :1], power=x.power[:, :1], session=np.zeros_like(x.session),
                       switch=None)
    c = cost_matrices(in_force)
    return (c.round_s - x.iterations * c.iteration_s).reshape(-1, n_opt, s)


def column_of(problem: Problem | ProblemArrays, codec: str, micro_batches: int, split: int) -> Column | None:
    """The column of (codec, k, split) in the problem's cost matrices; None when not offered."""
    try:
        return Column(_option_index(problem, codec, micro_batches), split)
    except ValueError:
        return None


def evaluate(problem: Problem, splits: Mapping[str, int], share_server: bool = False,
             policy: str = "given", options: Mapping[str, tuple[str, int]] | None = None,
             modes: Mapping[str, str] | None = None) -> Plan:
    """Predicted costs of any assignment of splits (every device named exactly once), each device
    with its (codec, micro_batches) from `options` (default: the problem's first option) and in its
    power mode from `modes` (default: the one in force)."""
    names = [d.name for d in problem.devices]
    missing, extra = sorted(set(names) - set(splits)), sorted(set(splits) - set(names))
    if missing or extra:
        raise ValueError(f"splits must name every device once; missing {missing}, unknown {extra}")
    s = problem.n_splits
    arr = np.array([check_split(splits[n], s, f"device {n!r}: split") for n in names])
    opt = np.array([_option_index(problem, *options[n]) if options and n in options else 0 for n in names])
    opt = np.where(arr == s - 1, 0, opt)
    mode = np.zeros_like(arr)
    for i, d in enumerate(problem.devices):
        if modes and d.name in modes:
            if modes[d.name] not in d.mode_names:
                raise ValueError(f"device {d.name!r}: no power mode {modes[d.name]!r}; its modes: {list(d.mode_names)}")
            mode[i] = d.mode_names.index(modes[d.name])
    return plan_columns(problem.arrays(), (mode * len(problem.options) + opt) * s + arr, policy, share_server)
