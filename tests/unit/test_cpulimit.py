"""Torch's threads follow the container's CPU limit (a cgroup's CFS quota), read as the kernel
writes it on cgroup v1 and v2, from inside a container and on a host."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ares.runtime.cpulimit import cpu_quota, fit_threads_to_cpu_limit, threads_for

POD = "/kubepods/burstable/pod1234/c0ffee"


def v1_tree(root: Path, quotas: dict[str, int], mount: str = "cpu,cpuacct") -> Path:
    """A cgroup v1 cpu controller: `quotas` maps a folder (relative to the mount) to its
    cfs_quota_us (-1: none), with a 100 ms period everywhere."""
    for folder, quota in quotas.items():
        d = root / mount / folder.strip("/")
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        (d / "cpu.cfs_period_us").write_text("100000\n")
    return root


def v2_tree(root: Path, limits: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    for folder, limit in limits.items():
        d = root / folder.strip("/")
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpu.max").write_text(f"{limit}\n")
    return root


def test_v1_inside_a_container_reads_its_own_cgroup_at_the_mount_root(tmp_path):
    """runc bind-mounts the container's own cgroup at the controller's mount; /proc/self/cgroup
    still names the host's path, which does not exist inside."""
    root = v1_tree(tmp_path, {"/": 150000})
    assert cpu_quota(root, f"4:cpu,cpuacct:{POD}\n3:memory:{POD}\n") == 1.5


def test_v1_on_a_host_takes_the_smallest_quota_on_the_path(tmp_path):
    root = v1_tree(tmp_path, {"/": -1, "/kubepods": -1, "/kubepods/burstable/pod1234": 300000, POD: 200000})
    assert cpu_quota(root, f"4:cpu,cpuacct:{POD}\n") == 2.0
    root = v1_tree(tmp_path / "b", {"/": -1, "/kubepods/burstable/pod1234": 100000, POD: -1}, mount="cpu")
    assert cpu_quota(root, f"2:cpuacct,cpu:{POD}\n") == 1.0  # the pod's limit holds its container too
    assert cpu_quota(v1_tree(tmp_path / "c", {"/": -1, POD: -1}), f"4:cpu,cpuacct:{POD}\n") is None


def test_v2_reads_cpu_max_up_the_path(tmp_path):
    root = v2_tree(tmp_path, {"/": "max 100000", "/kubepods.slice": "max 100000", POD: "250000 100000"})
    assert cpu_quota(root, f"0::{POD}\n") == 2.5
    assert cpu_quota(v2_tree(tmp_path / "ns", {"/": "50000 100000"}), "0::/\n") == 0.5  # a cgroup namespace
    assert cpu_quota(v2_tree(tmp_path / "none", {"/": "max 100000"}), "0::/\n") is None


def test_a_hybrid_host_uses_v1_where_the_v2_mount_has_no_controllers(tmp_path):
    root = v1_tree(tmp_path, {"/": -1, "/user.slice": 50000})
    assert cpu_quota(root, "5:cpu,cpuacct:/user.slice\n0::/user.slice/user-1000.slice\n") == 0.5


@pytest.mark.parametrize("text", ["", "garbage", "-5 100000", "100000 0", "max"])
def test_files_it_cannot_read_as_a_quota_are_no_quota(tmp_path, text):
    root = v2_tree(tmp_path, {"/": text})
    assert cpu_quota(root, "0::/\n") is None
    assert cpu_quota(tmp_path / "nothing-mounted", "0::/\n") is None


@pytest.mark.parametrize("cores, quota, threads", [(16, 4.0, 4), (16, 1.5, 2), (4, 0.5, 1), (2, 8.0, 2), (8, None, 8),
                                                   (16, 2.0, 2), (16, 2.001, 3)])
def test_threads_are_the_quota_rounded_up_at_most_one_per_core(cores, quota, threads):
    assert threads_for(cores, quota) == threads


def test_the_thread_count_a_user_chose_is_left_alone(tmp_path):
    root = v1_tree(tmp_path, {"/": 100000})
    assert fit_threads_to_cpu_limit({"OMP_NUM_THREADS": "3"}, root, f"4:cpu:{POD}\n") is None


def test_a_process_under_a_limit_runs_that_many_threads(tmp_path):
    """In a fresh process (torch's pool is sized once): a 1-CPU quota on a machine of any size."""
    root = v1_tree(tmp_path, {"/": 100000})
    probe = ("import sys, torch\n"
             "from pathlib import Path\n"
             "from ares.runtime.cpulimit import fit_threads_to_cpu_limit\n"
             "decided = fit_threads_to_cpu_limit({}, Path(sys.argv[1]), '4:cpu,cpuacct:/x')\n"
             "print(decided.before, decided.after, torch.get_num_threads(), decided.describe())\n")
    out = subprocess.run([sys.executable, "-c", probe, str(root)], capture_output=True, text=True, check=True,
                         timeout=120).stdout.split(maxsplit=3)
    assert (out[1], out[2]) == ("1", "1"), out
    assert out[3].strip() == (f"1 torch thread for a CPU limit of 1 (not {out[0]}, one per core)" if out[0] != "1"
                              else "1 torch thread (CPU limit 1)")
