"""The split-point file: how a device learns its split (a downwardAPI projection or a local file).

The split file holds one integer and nothing else, as it always has. Where the controller also
chooses how a device runs its split steps (wire codec, micro-batches per batch), it writes them
beside it, in `<split file>.options`: JSON such as `{"codec": "int8", "micro_batches": 4}`.
A device without that file (an old controller, or a job that offers no options) runs as its
settings and the server say; a device too old to know the file ignores it and keeps working.

In a local run whose controller chooses power modes it also writes `<split file>.mode`: the
name of the mode (MAXN, 5W, custom1, custom3). A device with an emulated profile runs its next
round in that mode (the emulated nvpmodel); on Kubernetes the sidecar applies the pod's
`ares.io/power-mode` instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger("ares.device")
OPTIONS_SUFFIX = ".options"
MODE_SUFFIX = ".mode"
_MODE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
MAX_OPTIONS_BYTES = 4096


class StepOptions(BaseModel):
    """How a device runs its split steps, as the controller chose; a field left out keeps the device's own."""

    model_config = ConfigDict(extra="ignore", frozen=True)  # ignore: a newer controller may say more

    codec: Optional[Literal["fp32", "fp16", "int8"]] = None
    micro_batches: Optional[int] = Field(None, ge=1, le=8)


def options_path(split_file: str | Path) -> Path:
    """Where the options for a split file live: beside it."""
    path = Path(split_file)
    return path.with_name(path.name + OPTIONS_SUFFIX)


def read_options(split_file: str | Path, last_good: Optional[StepOptions]) -> Optional[StepOptions]:
    """The options beside a split file; None when there is no such file (the device's own settings
    hold); `last_good` (with a log line saying why) when it is unreadable or malformed."""
    path = options_path(split_file)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_OPTIONS_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("options file %s unreadable (%s); keeping %s", path, exc.strerror, last_good)
        return last_good
    try:
        if len(raw) > MAX_OPTIONS_BYTES:
            raise ValueError(f"over {MAX_OPTIONS_BYTES} bytes")
        return StepOptions.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:  # JSONDecodeError is a ValueError
        log.warning("options file %s malformed (%s); keeping %s", path, str(exc).splitlines()[0][:120], last_good)
        return last_good


def write_options(split_file: str | Path, codec: str, micro_batches: int) -> None:
    """Atomic write of the options beside a split file (write them before the split they go with)."""
    path = options_path(split_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = StepOptions(codec=codec, micro_batches=micro_batches).model_dump_json()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text + "\n")
    tmp.replace(path)


def mode_path(split_file: str | Path) -> Path:
    path = Path(split_file)
    return path.with_name(path.name + MODE_SUFFIX)


def read_mode(split_file: str | Path) -> Optional[str]:
    """The power mode beside a split file; None when there is none or it is not a mode name."""
    path = mode_path(split_file)
    try:
        with open(path, "rb") as f:
            text = f.read(64).decode("ascii", "replace").strip()
    except OSError:
        return None
    if not _MODE_NAME.match(text):
        log.warning("mode file %s holds %r, not a power mode name; ignored", path, text[:40])
        return None
    return text


def write_mode(split_file: str | Path, mode: str) -> None:
    """Atomic write of the power mode beside a split file (before the split it goes with)."""
    if not _MODE_NAME.match(mode):
        raise ValueError(f"not a power mode name: {mode!r}")
    path = mode_path(split_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(mode + "\n")
    tmp.replace(path)


def read_split(path: str | Path, layers: int, last_good: Optional[int]) -> Optional[int]:
    """The split in the file, or `last_good` (with a log line saying why) if it is missing or bad."""
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        if last_good is not None:
            log.warning("split file %s unreadable (%s); keeping split %s", path, exc.strerror, last_good)
        return last_good
    try:
        value = int(text)
    except ValueError:
        log.warning("split file %s holds %r, not an integer; keeping split %s", path, text[:40], last_good)
        return last_good
    if not 0 <= value < layers:
        log.warning("split file %s holds %d, outside 0..%d; keeping split %s", path, value, layers - 1, last_good)
        return last_good
    return value


def write_split(path: str | Path, split: int) -> None:
    """Atomic write, so a device never reads half a number."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(f"{split}\n")
    tmp.replace(path)
