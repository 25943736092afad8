"""Energy of one device: a three-state power model and the published energy formula.

A device draws `compute_w` while it runs its part of the model, `tx_w` while it sends and
`rx_w` while it receives (whole-board watts, as the ARES authors measured them on the
Jetson Nano's INA3221). Energy of one iteration at split s is

    E(s) = P_compute * t_device(s) + P_tx * t_up(s) + P_rx * t_down(s)

Time spent waiting for the server is not charged: the published model ignores idle power.

Where the figures come from:
- Jetson Nano (published, measured by the authors, mW compute/transmit/receive):
  MAXN 7253/2320/2260, 5W 4205/1917/1912, custom modes (1 or 3 cores at 5W clocks)
  2396/1755/1754.
- Raspberry Pi 4B: the figures the ARES prototype publishes, 6.4 W compute, 3.8 W transmit and
  3.1 W receive (earlier versions of this table carried our own estimate, 6.4/3.4/3.3 W).
Every table entry is `source="modelled"`; a reading from a power sensor can be passed as a
`PowerModel(..., source="measured")` instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class PowerModel:
    """Board power in watts while computing, transmitting and receiving."""

    compute_w: float
    tx_w: float
    rx_w: float
    source: str = "modelled"  # "modelled" (from a table) | "measured" (from a sensor)

    def __post_init__(self) -> None:
        for name in ("compute_w", "tx_w", "rx_w"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"PowerModel.{name} must be finite watts >= 0, got {value!r}")
        if self.source not in ("modelled", "measured"):
            raise ValueError(f"PowerModel.source must be 'modelled' or 'measured', got {self.source!r}")


def _mw(compute: float, tx: float, rx: float) -> PowerModel:
    return PowerModel(compute / 1000, tx / 1000, rx / 1000)


_NANO_CUSTOM = _mw(2396, 1755, 1754)

# (device class, power mode) -> power model; see the module docstring for sources.
POWER_TABLE: dict[tuple[str, str], PowerModel] = {
    ("jetson-nano", "MAXN"): _mw(7253, 2320, 2260),
    ("jetson-nano", "5W"): _mw(4205, 1917, 1912),
    ("jetson-nano", "custom1"): _NANO_CUSTOM,
    ("jetson-nano", "custom3"): _NANO_CUSTOM,
    ("raspberry-pi", ""): PowerModel(6.4, 3.8, 3.1),
}


def power_model(device_class: str, power_mode: str) -> PowerModel:
    """The table's power model for a device; mode names match case-insensitively."""
    for (cls, mode), model in POWER_TABLE.items():
        if cls == device_class and mode.lower() == (power_mode or "").lower():
            return model
    known = ", ".join(f"{c}/{m}" if m else c for c, m in POWER_TABLE)
    raise ValueError(f"no power model for device class {device_class!r} in mode {power_mode!r}; "
                     f"known: {known} (or give compute_w/tx_w/rx_w explicitly)")


def energy_j(power: PowerModel, t_compute: float, t_up: float, t_down: float) -> float:
    """Joules for t_compute seconds of compute, t_up of sending and t_down of receiving."""
    return power.compute_w * t_compute + power.tx_w * t_up + power.rx_w * t_down
