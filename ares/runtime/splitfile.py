"""The split-point file: how a device learns its split (a downwardAPI projection or a local file)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

log = logging.getLogger("ares.device")


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
