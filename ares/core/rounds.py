"""The record of a closed round: what the server keeps in its history and checkpoints.

The server appends one `RoundRecord` per closed round and writes the whole history to
`checkpoints/state.json` (`{"round", "model", "history": [...]}`); the local runner, the testbed
and the benchmarks read it back from there. The JSON is the one records have always had, and
records written before a field existed still parse: such a field is None (or its default) and
stays absent when the record is written again (`as_json`).

Also here, the figures read off records: each device's session (join to accepted upload, by
the server's clock), a round's time outside its sessions, and what the controller holds the
model against.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict

from ares.core.messages import SessionSample

ClosedBy = Literal["all devices done", "deadline"]


class _Record(BaseModel):
    # frozen: a closed round does not change; extra keys are kept, so a record from another
    # version is written back as it was read
    model_config = ConfigDict(extra="allow", frozen=True)

    def as_json(self) -> dict[str, Any]:
        """The record as stored: its fields in order, those it was read without left out (NaN
        stays NaN: `json.dumps` writes it as the server always has)."""
        return self.model_dump(exclude_unset=True)


class DeviceRound(_Record):
    """One device's part in a closed round: its split and samples, when its session began and
    ended (seconds from the round's start), and the timings it reported (`StepTimings`)."""

    split: int
    samples: int
    joined_s: Optional[float] = None    # None: a record from before sessions were kept
    uploaded_s: Optional[float] = None
    steps: int = 0
    device_fwd_s: float = 0.0
    device_bwd_s: float = 0.0
    up_bps: Optional[float] = None
    down_bps: Optional[float] = None
    round_s: float = 0.0
    energy_j: Optional[float] = None
    energy_source: str = "none"
    latency_s: Optional[float] = None
    steps_s: Optional[float] = None     # None: a record from before the steps' time was kept

    @property
    def session_s(self) -> Optional[float]:
        """Join to accepted upload, by the server's clock (None without both)."""
        if self.joined_s is None or self.uploaded_s is None:
            return None
        return self.uploaded_s - self.joined_s


class RoundRecord(_Record):
    """A closed round: the global model's test accuracy and loss after it, why it closed, how
    long it took, the devices whose uploads were merged and those that missed it."""

    round: int
    accuracy: float           # NaN when the evaluation failed
    loss: float
    closed_by: ClosedBy
    duration_s: float         # first join to the round's close
    close_s: Optional[float] = None  # merge + evaluation; None: a record from before it was kept
    devices: dict[str, DeviceRound]
    missed: list[str]

    def sessions(self) -> dict[str, float]:
        """Each merged device's session, join to accepted upload, by the server's clock (none for
        a record written before sessions were kept)."""
        return {n: s for n, d in self.devices.items() if (s := d.session_s) is not None}

    def outside_sessions(self) -> Optional[float]:
        """Seconds of the round outside its longest device session; None for a round without
        sessions (nobody uploaded, or a record from before they were kept)."""
        longest = max(self.sessions().values(), default=None)
        return None if longest is None else max(0.0, self.duration_s - longest)


def recent_sessions(history: Sequence[RoundRecord], recent: int = 4) -> dict[str, list[SessionSample]]:
    """Each device's last `recent` sessions with the time its steps took (oldest first): what the
    controller holds the model's fixed cost of a round against (none from older records)."""
    out: dict[str, list[SessionSample]] = {}
    for record in history[-4 * recent:]:  # a device that missed most of these has little to say
        for name, session_s in record.sessions().items():
            d = record.devices[name]
            if d.steps_s is not None:
                out.setdefault(name, []).append(SessionSample(round=record.round, split=d.split,
                                                              session_s=max(0.0, session_s), steps_s=d.steps_s))
    return {n: v[-recent:] for n, v in out.items()}


def round_overhead(history: Sequence[RoundRecord], recent: int = 3) -> float:
    """Seconds of a round outside the longest device session (join to accepted upload): the skew
    of the joins, the merge and the evaluation. Mean of the last `recent` rounds after round 0
    (its joins wait for process start-up); round 0's merge and evaluation alone while it is the
    only one. No split or option changes it, so predictions add it to the slowest device."""
    later = [x for x in (r.outside_sessions() for r in history if r.round >= 1) if x is not None][-recent:]
    if later:
        return sum(later) / len(later)
    first = [r.close_s for r in history if r.close_s is not None]
    return max(0.0, first[-1]) if first else 0.0


def parse_history(records: Sequence[Any]) -> list[RoundRecord]:
    """Records as stored (JSON objects) -> `RoundRecord`s."""
    return [RoundRecord.model_validate(r) for r in records]


def load_history(state: Path) -> list[RoundRecord]:
    """The closed rounds in a server's `checkpoints/state.json`."""
    return parse_history(json.loads(Path(state).read_text()).get("history", []))
