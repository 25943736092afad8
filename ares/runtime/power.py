"""Board power: read it, integrate it into energy, hand it to the trainer.

The sidecar owns the power monitor (it may need privileges the trainer must not
have), so the two containers meet at a small JSON file in a shared volume:

    {"power_mw": 4205.0, "energy_j": 12.5, "time": 1767000000.0, "source": "ina3221"}

The sidecar writes it atomically (tmp file + rename) and the trainer reads it
with ``read_power_file``, which never raises: a missing, malformed or stale file
just means "no measurement", and the trainer falls back to its power model.

Pure Python (no torch), Python 3.10 compatible: it runs on the device.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol

log = logging.getLogger(__name__)

#: Where a Jetson Nano's INA3221 monitor exposes total board input power (mW).
INA3221_PATH = Path("/sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0/in_power0_input")

#: A reading older than this is not trusted (the sidecar died or stalled).
DEFAULT_MAX_AGE_S = 10.0


class PowerSource(Protocol):
    """Anything that reports the board's power draw right now."""

    name: str

    def read_mw(self) -> float: ...


@dataclass(frozen=True)
class PowerReading:
    """One sample as shared with the trainer."""

    power_mw: float
    energy_j: float
    time: float  # unix seconds
    source: str


class Ina3221Source:
    """Reads mW from an INA3221 sysfs file (one integer per read)."""

    name = "ina3221"

    def __init__(self, path: "os.PathLike[str] | str" = INA3221_PATH) -> None:
        self.path = Path(path)

    def read_mw(self) -> float:
        """Raise ``OSError``/``ValueError`` when the file is absent or not a number."""
        text = self.path.read_text().strip()
        value = float(int(text))  # sysfs holds an integer; refuse "4.2e3", "nan"
        if value < 0:
            raise ValueError(f"{self.path} holds a negative power: {text}")
        return value


class PowerSampler:
    """Samples a source at a fixed period and integrates energy (trapezoid rule).

    ``on_sample`` (e.g. writing the shared file) runs in the sampling thread after
    every good sample. A failed read is logged once per failure streak and does
    not stop sampling; the integration skips the gap rather than guessing.
    """

    def __init__(
        self,
        source: PowerSource,
        period_s: float = 0.5,
        on_sample: Optional[Callable[[PowerReading], None]] = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if period_s <= 0:
            raise ValueError(f"period_s must be > 0, got {period_s}")
        self.source = source
        self.period_s = period_s
        self.on_sample = on_sample
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._last_t: Optional[float] = None
        self._latest_mw: Optional[float] = None
        self._energy_j = 0.0
        self._failing = False

    @property
    def latest_mw(self) -> Optional[float]:
        with self._lock:
            return self._latest_mw

    @property
    def energy_j(self) -> float:
        with self._lock:
            return self._energy_j

    def sample_once(self) -> Optional[PowerReading]:
        """Take one sample; return it, or None when the source failed."""
        try:
            mw = self.source.read_mw()
        except (OSError, ValueError) as exc:
            if not self._failing:
                log.warning("power source %s failed: %s", self.source.name, exc)
            self._failing = True
            self._last_t = None  # do not integrate across the gap
            return None
        if self._failing:
            log.info("power source %s is back", self.source.name)
        self._failing = False
        now = self._clock()
        with self._lock:
            if self._last_t is not None and self._latest_mw is not None:
                dt = max(0.0, now - self._last_t)
                self._energy_j += (self._latest_mw + mw) / 2.0 * dt / 1000.0
            self._last_t = now
            self._latest_mw = mw
            reading = PowerReading(mw, self._energy_j, self._wall_clock(), self.source.name)
        if self.on_sample is not None:
            self.on_sample(reading)
        return reading

    def start(self) -> "PowerSampler":
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="power-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "PowerSampler":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = self._clock()
            try:
                self.sample_once()
            except Exception:  # a broken on_sample must not kill sampling
                log.exception("power sample handler failed")
            self._stop.wait(max(0.0, self.period_s - (self._clock() - started)))


def write_power_file(path: "os.PathLike[str] | str", reading: PowerReading) -> None:
    """Write ``reading`` as JSON so that a reader sees the old or the new file, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(reading), f)
        os.chmod(tmp, 0o644)  # readable by a trainer running as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_power_file(
    path: "os.PathLike[str] | str",
    max_age_s: float = DEFAULT_MAX_AGE_S,
    now: Optional[float] = None,
) -> Optional[PowerReading]:
    """The latest reading, or None if the file is missing, malformed or stale. Never raises."""
    try:
        data = json.loads(Path(path).read_text())
        reading = PowerReading(
            power_mw=_finite(data["power_mw"]),
            energy_j=_finite(data["energy_j"]),
            time=_finite(data["time"]),
            source=data["source"],
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(reading.source, str) or reading.power_mw < 0 or reading.energy_j < 0:
        return None
    now = time.time() if now is None else now
    if now - reading.time > max_age_s:
        return None
    return reading


def _finite(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"not a number: {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"not finite: {value!r}")
    return float(value)
