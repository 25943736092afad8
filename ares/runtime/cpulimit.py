"""Torch's threads sized to the CPUs a container may use, not the cores its node has.

torch starts one thread per core it sees (the process's CPU affinity) and does not read the
CPU limit a container runs under: a server pod limited to 4 CPUs on a 16-core node would run
16 threads, which use up the pod's quota of a period in a quarter of it and are then stopped
(throttled) for the rest, in every step. Kubernetes sets a CPU limit as a CFS quota on the
container's cgroup (`cpu.max` on cgroup v2, `cpu.cfs_quota_us` over `cpu.cfs_period_us` on v1).

At start the server's worker and `ares device` take the smallest quota on their cgroup's path
(the container's own, then its parents: a pod's cgroup holds the sum of its containers'
limits), round it up to whole CPUs, and lower torch's thread count to it. A thread count the
user chose (`OMP_NUM_THREADS`, as `ares run` sets for its devices) is left alone.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

log = logging.getLogger("ares.cpulimit")

CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_CPU_DIRS = ("cpu,cpuacct", "cpu")  # where cgroup v1's cpu controller is mounted, by distribution


@dataclass(frozen=True)
class Threads:
    """What was decided: torch's threads before and after, and the quota (CPUs) that set it."""

    before: int
    after: int
    quota_cpus: Optional[float]

    def describe(self) -> str:
        threads = f"{self.after} torch thread{'' if self.after == 1 else 's'}"
        if self.quota_cpus is None:
            return f"{threads} (no CPU limit)"
        if self.after == self.before:
            return f"{threads} (CPU limit {self.quota_cpus:g})"
        return f"{threads} for a CPU limit of {self.quota_cpus:g} (not {self.before}, one per core)"


def _paths(proc_cgroup: str) -> tuple[Optional[str], Optional[str]]:
    """The process's cgroup path on v2 ("0::/path") and in v1's cpu controller ("N:cpu,cpuacct:/path")."""
    v2 = v1 = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestors(base: Path, path: str) -> list[Path]:
    """`base/path` and each parent up to `base`, those that exist; `base` alone where the path is
    not under it (a container sees its own cgroup at the mount's root)."""
    here = base / path.strip("/")
    out = []
    while True:
        if here.is_dir():
            out.append(here)
        if here == base or base not in here.parents:
            break
        here = here.parent
    return out or ([base] if base.is_dir() else [])


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _v2_quota(folder: Path) -> Optional[float]:
    text = _read(folder / "cpu.max")  # "max 100000" or "400000 100000"
    if not text:
        return None
    quota, _, period = text.partition(" ")
    try:
        return int(quota) / int(period) if quota != "max" and int(quota) > 0 else None
    except (ValueError, ZeroDivisionError):
        return None


def _v1_quota(folder: Path) -> Optional[float]:
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    try:
        return int(quota) / int(period) if int(quota) > 0 else None  # -1: no quota
    except (TypeError, ValueError, ZeroDivisionError):
        return None


def cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Optional[str] = None) -> Optional[float]:
    """The smallest CPU quota, in CPUs, on this process's cgroup path; None where there is none
    (or no cgroup file system to read)."""
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup")) or ""
    v2, v1 = _paths(proc_cgroup)
    quotas: list[float] = []
    if v2 is not None and (root / "cgroup.controllers").is_file():
        quotas += [q for f in _ancestors(root, v2) if (q := _v2_quota(f)) is not None]
    elif v1 is not None:
        for name in V1_CPU_DIRS:
            if (root / name).is_dir():
                quotas += [q for f in _ancestors(root / name, v1) if (q := _v1_quota(f)) is not None]
                break
    return min(quotas, default=None)


def threads_for(cores: int, quota_cpus: Optional[float]) -> int:
    """One thread per core, at most the quota rounded up to whole CPUs, at least one."""
    if quota_cpus is None:
        return max(1, cores)
    return max(1, min(cores, math.ceil(quota_cpus - 1e-9)))


def fit_threads_to_cpu_limit(env: Mapping[str, str] = os.environ, root: Path = CGROUP_ROOT,
                             proc_cgroup: Optional[str] = None) -> Optional[Threads]:
    """Lowers torch's intra-op threads to the container's CPU limit; None where the user chose
    the count (`OMP_NUM_THREADS`). Logs what it decided."""
    if env.get("OMP_NUM_THREADS"):
        return None
    import torch

    before = torch.get_num_threads()
    quota = cpu_quota(root, proc_cgroup)
    after = min(before, threads_for(before, quota))
    if after != before:
        torch.set_num_threads(after)
    decided = Threads(before=before, after=after, quota_cpus=quota)
    log.info("%s", decided.describe())
    return decided
