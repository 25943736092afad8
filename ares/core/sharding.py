"""Which server shard holds which device: rendezvous (highest-random-weight) hashing.

A job with `shards: k > 1` splits its devices over k shard processes. Device `d` goes to the
shard `i` in 0..k-1 whose score `sha256(d + "/" + i)` (its first 8 bytes, big-endian) is the
highest; a tie, which needs a 64-bit collision, goes to the lower index. A device pinned in
`shard_pins` goes where its pin says instead.

Why this rule: every process computes it alone from the config, the same on every machine and
Python version (sha256 of UTF-8, no `hash()` and its per-process salt); devices spread evenly;
and when k changes only the devices whose best shard changed move: going from k to k+1 shards
moves about 1/(k+1) of the devices, each to the new shard, and none between the old ones.
"""

from __future__ import annotations

import hashlib
from typing import Mapping, Optional, Sequence


def score(device: str, index: int) -> int:
    """The device's weight for shard `index`: the first 8 bytes of sha256("device/index")."""
    return int.from_bytes(hashlib.sha256(f"{device}/{index}".encode()).digest()[:8], "big")


def shard_for(device: str, shards: int, pins: Optional[Mapping[str, int]] = None) -> int:
    """The shard (0..shards-1) that holds `device`."""
    if shards < 1:
        raise ValueError(f"a job has at least one shard, not {shards}")
    if pins and device in pins:
        pinned = pins[device]
        if not 0 <= pinned < shards:
            raise ValueError(f"device {device!r} is pinned to shard {pinned}; shards are 0..{shards - 1}")
        return pinned
    best, best_score = 0, -1
    for index in range(shards):
        s = score(device, index)
        if s > best_score:
            best, best_score = index, s
    return best


def assign(devices: Sequence[str], shards: int, pins: Optional[Mapping[str, int]] = None) -> list[tuple[str, ...]]:
    """Each shard's devices, in the order `devices` lists them (one tuple per shard, maybe empty)."""
    out: list[list[str]] = [[] for _ in range(max(shards, 1))]
    for device in devices:
        out[shard_for(device, shards, pins)].append(device)
    return [tuple(d) for d in out]
