"""The power mode between trainer and sidecar: what is in force, and when a switch may happen.

The host-control sidecar applies `ares.io/power-mode` with nvpmodel and records in
`<state-dir>/hostctl.json` the mode in force (asked of nvpmodel at start and after every switch),
how long its last switch took, and a mode it could not switch to, with why:

    {"applied": {"power_mode": "MAXN", ...}, "switch_s": 0.4,
     "power_mode_failure": {"mode": "5W", "reason": "...", "time": 1767000000.0}, ...}

The trainer reads it at every round start (`read_host_mode`) and reports the mode its round runs
in, which the controller plans for. A switch waits for the gap between rounds: the trainer says
in a file of its own (`trainer.json`, in a volume the sidecar only reads) whether it is inside
a round (`write_trainer_state`), and the sidecar defers a switch while it is
(`trainer_busy`), for at most `BUSY_MAX_AGE_S` after the trainer last said so. Each side sets
its own flag before it reads the other's: the sidecar writes `"switching": true` and looks
at the trainer's again before it runs nvpmodel; the trainer says "busy" and then waits for a
switch under way to end (`SWITCH_WAIT_S` at most) before it joins the round. A switch that has
been waiting (`"pending"`, rounds back to back leave little gap) is let through the same way:
the trainer says "not busy" until it is done.

Pure Python (no torch), Python 3.10 compatible: it runs on the device. Readers never raise: a
missing, malformed or stale file means "not known".
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

HOSTCTL_FILE = "hostctl.json"
TRAINER_FILE = "trainer.json"
#: A trainer that said "busy" longer ago than this (a round deadline's worth) is taken to be gone.
BUSY_MAX_AGE_S = 900.0
MAX_FILE_BYTES = 1 << 16
SWITCH_WAIT_S = 30.0
_MODE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


@dataclass(frozen=True)
class HostMode:
    """The mode in force on the device's host, as its sidecar reports it."""

    power_mode: Optional[str]  # None: not known (no nvpmodel, or it did not say)
    failed: str = ""  # a mode the sidecar could not switch to ("" when none)
    problem: str = ""  # why, in words
    switch_s: Optional[float] = None  # how long its last switch took
    switching: bool = False  # a switch is under way (the trainer waits for it before its round)
    pending: bool = False  # a switch waits for the gap between rounds (the trainer makes one)


def _read_json(path: "os.PathLike[str] | str") -> Optional[dict]:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            return None
        data = json.loads(raw)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _mode(value: object) -> Optional[str]:
    return value if isinstance(value, str) and _MODE.match(value) else None


def read_host_mode(path: "os.PathLike[str] | str") -> Optional[HostMode]:
    """The sidecar's report of the power mode, or None when there is none to read."""
    data = _read_json(path)
    if data is None:
        return None
    applied = data.get("applied") if isinstance(data.get("applied"), dict) else {}
    failure = data.get("power_mode_failure") if isinstance(data.get("power_mode_failure"), dict) else {}
    switch = data.get("switch_s")
    ok_switch = (isinstance(switch, (int, float)) and not isinstance(switch, bool) and math.isfinite(switch)
                 and 0 <= switch <= 600)
    reason = failure.get("reason")
    return HostMode(power_mode=_mode(applied.get("power_mode")), failed=_mode(failure.get("mode")) or "",
                    problem=reason[:500] if isinstance(reason, str) else "",
                    switch_s=float(switch) if ok_switch else None, switching=data.get("switching") is True,
                    pending=_mode(data.get("pending")) is not None)


def write_trainer_state(path: "os.PathLike[str] | str", round_index: int, busy: bool) -> None:
    """Say whether the trainer is inside a round (atomically; errors are the caller's to ignore)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"round": round_index, "busy": busy, "time": time.time()}))
    os.chmod(tmp, 0o644)
    tmp.replace(path)


def trainer_busy(path: "os.PathLike[str] | str", now: Optional[float] = None,
                 max_age_s: float = BUSY_MAX_AGE_S) -> bool:
    """True while the trainer says it is inside a round and said so less than `max_age_s` ago."""
    data = _read_json(path)
    if data is None or data.get("busy") is not True:
        return False
    said = data.get("time")
    if isinstance(said, bool) or not isinstance(said, (int, float)) or not math.isfinite(said):
        return False
    now = time.time() if now is None else now
    return 0 <= now - said <= max_age_s
