"""Compute profiles: how long the device part and the server part of a model take per batch.

A `ComputeProfile` holds, for every split point s = 0..L-1, the per-batch seconds of the
*device part* (layers 0..s, cumulative), forward and backward separately. A `ServerProfile`
holds the per-batch seconds of the *server part* for split s (layers s+1..L-1), so its entry
L-1 is 0. The optimiser needs nothing else about compute.

`PUBLISHED` carries the per-split timings the ARES authors measured (VGG5, CIFAR-10, batch
100) on a Jetson Nano in MAXN mode and on a Raspberry Pi. Other Nano power modes were not
published per split; `derive_power_mode` estimates them from MAXN with the scale factors in
`POWER_MODE_SLOWDOWN` (documented there) and marks the result `source="derived"`. A profile
measured on the device (`source="measured"`) always beats a derived one.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

SOURCES = ("published", "measured", "derived")


def _times(name: str, values: Sequence[float]) -> tuple[float, ...]:
    """Validate one list of per-split seconds: non-empty, finite, not negative."""
    out = tuple(map(float, values))
    if not out:
        raise ValueError(f"{name} needs one entry per split point, got none")
    if min(out) >= 0 and all(map(math.isfinite, out)):  # the common case, without a loop in Python
        return out
    bad = [v for v in out if not math.isfinite(v) or v < 0]
    if bad:
        raise ValueError(f"{name} must hold finite seconds >= 0, got {bad[0]!r}")
    return out


def _check_common(kind: str, fwd: tuple[float, ...], bwd: tuple[float, ...], batch_size: int, source: str) -> None:
    if len(fwd) != len(bwd):
        raise ValueError(f"{kind}: fwd has {len(fwd)} splits but bwd has {len(bwd)}; they must match")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{kind}: batch_size must be a positive integer, got {batch_size!r}")
    if source not in SOURCES:
        raise ValueError(f"{kind}: source must be one of {', '.join(SOURCES)}, got {source!r}")


def _from_mapping(cls: type, data: Mapping[str, Any]) -> Any:
    """Build a profile from a JSON-like mapping; unknown keys are an error, not silently dropped."""
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; known keys: {sorted(known)}")
    return cls(**data)


@dataclass(frozen=True)
class ComputeProfile:
    """Per-batch seconds of the *device part* for every split s = 0..L-1 (cumulative over layers 0..s)."""

    fwd: tuple[float, ...]
    bwd: tuple[float, ...]
    batch_size: int = 100
    device_class: str = ""  # "jetson-nano", "raspberry-pi", "server", "cpu", ...
    power_mode: str = ""  # "MAXN", "5W", "custom1", "custom3", ""
    source: str = "published"  # "published" | "measured" | "derived"
    note: str = ""  # where the numbers come from, for people reading a profile file

    def __post_init__(self) -> None:
        object.__setattr__(self, "fwd", _times("fwd", self.fwd))
        object.__setattr__(self, "bwd", _times("bwd", self.bwd))
        _check_common("ComputeProfile", self.fwd, self.bwd, self.batch_size, self.source)

    @property
    def n_splits(self) -> int:
        return len(self.fwd)

    def total(self, s: int) -> float:
        """Forward plus backward seconds of the device part at split s, per batch."""
        return self.fwd[s] + self.bwd[s]

    def scaled(self, factor: float, **changes: Any) -> "ComputeProfile":
        """Every time multiplied by `factor` (a slower or faster mode); marked derived."""
        if not math.isfinite(factor) or factor <= 0:
            raise ValueError(f"scale factor must be a finite number > 0, got {factor!r}")
        changes.setdefault("source", "derived")
        return replace(self, fwd=tuple(v * factor for v in self.fwd), bwd=tuple(v * factor for v in self.bwd), **changes)

    def rescaled(self, batch_size: int) -> "ComputeProfile":
        """The same device at another batch size, assuming time grows linearly with the batch."""
        return _rescale(self, batch_size)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fwd": list(self.fwd), "bwd": list(self.bwd)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ComputeProfile":
        return _from_mapping(cls, data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ComputeProfile":
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class ServerProfile:
    """Per-batch seconds of the *server part* for split s (layers s+1..L-1); entry L-1 is 0."""

    fwd: tuple[float, ...]
    bwd: tuple[float, ...]
    batch_size: int = 100
    source: str = "measured"
    note: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "fwd", _times("server fwd", self.fwd))
        object.__setattr__(self, "bwd", _times("server bwd", self.bwd))
        _check_common("ServerProfile", self.fwd, self.bwd, self.batch_size, self.source)
        if self.fwd[-1] != 0 or self.bwd[-1] != 0:
            raise ValueError("ServerProfile: the last entry (split L-1, nothing on the server) must be 0; "
                             "did you pass cumulative device-part times? use ServerProfile.from_cumulative")

    @property
    def n_splits(self) -> int:
        return len(self.fwd)

    def total(self, s: int) -> float:
        return self.fwd[s] + self.bwd[s]

    def rescaled(self, batch_size: int) -> "ServerProfile":
        return _rescale(self, batch_size)

    @classmethod
    def from_cumulative(cls, profile: ComputeProfile, **changes: Any) -> "ServerProfile":
        """Server-part times from cumulative times measured on the server's own hardware.

        The server part at split s is everything after layer s: total - cumulative(s), clamped
        at 0 because measured cumulative times are not always monotonic (noise).
        """
        last = profile.n_splits - 1
        fwd = tuple(max(0.0, profile.fwd[last] - v) for v in profile.fwd[:last]) + (0.0,)
        bwd = tuple(max(0.0, profile.bwd[last] - v) for v in profile.bwd[:last]) + (0.0,)
        fields = {"batch_size": profile.batch_size, "source": profile.source, "note": profile.note}
        return cls(fwd=fwd, bwd=bwd, **{**fields, **changes})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fwd": list(self.fwd), "bwd": list(self.bwd)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ServerProfile":
        return _from_mapping(cls, data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ServerProfile":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _rescale(profile: Any, batch_size: int) -> Any:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    k = batch_size / profile.batch_size
    return replace(profile, fwd=tuple(v * k for v in profile.fwd), bwd=tuple(v * k for v in profile.bwd),
                   batch_size=batch_size)


_PUBLISHED_NOTE = "ARES paper/prototype: VGG5 on CIFAR-10, batch 100, cumulative device-part seconds"

PUBLISHED: dict[str, ComputeProfile] = {
    "jetson-nano/MAXN": ComputeProfile(
        fwd=(0.00935, 0.01496, 0.01994, 0.02016, 0.04313, 0.10707, 0.12375),
        bwd=(0.01922, 0.01168, 0.01646, 0.02846, 0.02261, 0.09011, 0.08125),
        device_class="jetson-nano", power_mode="MAXN", source="published", note=_PUBLISHED_NOTE),
    "raspberry-pi": ComputeProfile(
        fwd=(0.861, 0.947, 1.447, 1.467, 1.647, 1.777, 1.852),
        bwd=(0.492, 0.545, 1.531, 1.476, 1.928, 2.005, 2.092),
        device_class="raspberry-pi", power_mode="", source="published", note=_PUBLISHED_NOTE),
}

# Estimated slowdown of a Jetson Nano mode relative to MAXN (4 cores at 1479 MHz, GPU 921.6 MHz).
# Not measured per split by the authors; replace with a measured profile when you have one.
#  5W:      2 cores at 918 MHz, GPU 640 MHz. The GPU clock ratio is 1.44 and the CPU clock ratio
#           1.61; small-batch VGG5 on the Nano is largely kernel-launch (CPU) bound, so 1.6.
#  custom3: 3 cores at the 5W clocks: the same clocks with one more core for the data loader
#           and the CUDA driver threads, so a little faster than 5W: 1.5.
#  custom1: 1 core at the 5W clocks: Python, the driver and data loading share one core: 2.2.
POWER_MODE_SLOWDOWN: dict[str, float] = {"MAXN": 1.0, "5W": 1.6, "custom3": 1.5, "custom1": 2.2}


#: The power modes of each device class that has them (names as in hostscripts/nvpmodel.conf).
POWER_MODES: dict[str, tuple[str, ...]] = {"jetson-nano": ("MAXN", "5W", "custom1", "custom3")}

#: Seconds a round waits for a power-mode switch when none was measured: `nvpmodel -m` takes cores
#: off line and sets clocks (tenths of a second); the process then runs its next step cold. An
#: assumption, on the long side, charged once to the round that starts in the new mode.
DEFAULT_SWITCH_S = 1.0


def modes_of(device_class: str) -> tuple[str, ...]:
    """The power modes a device class offers; () for classes without modes."""
    return POWER_MODES.get(device_class, ())


def profile_in_mode(profile: ComputeProfile, mode: str,
                    measured: Mapping[str, ComputeProfile] | None = None) -> ComputeProfile:
    """A device's profile in `mode`: measured in that mode where known, else derived from the one
    given (its own mode's) and marked `source="derived"`."""
    if measured and mode in measured:
        return measured[mode]
    if mode == profile.power_mode:
        return profile
    return derive_power_mode(profile, mode)


def derive_power_mode(profile: ComputeProfile, mode: str) -> ComputeProfile:
    """Estimate a Jetson Nano profile in another power mode from one in MAXN (see POWER_MODE_SLOWDOWN)."""
    if mode not in POWER_MODE_SLOWDOWN:
        raise ValueError(f"unknown power mode {mode!r}; known modes: {', '.join(POWER_MODE_SLOWDOWN)}")
    base = POWER_MODE_SLOWDOWN.get(profile.power_mode)
    if base is None:
        raise ValueError(f"can only derive from a profile in one of {', '.join(POWER_MODE_SLOWDOWN)}, "
                         f"got power_mode {profile.power_mode!r}")
    factor = POWER_MODE_SLOWDOWN[mode] / base
    note = f"derived from {profile.power_mode} x{factor:g} (estimated slowdown, see ares.core.profiles)"
    return profile.scaled(factor, power_mode=mode, note=note)
