"""bench/load.py at a tiny size: real `ares server` processes, emulated devices over HTTP/2.

Two fleets (4 devices, then 8: the baseline and one more) of VGG5 at split 3, 2 rounds of 2
steps of 4 samples. Asserts that every device completed every round with no error, that the
device processes never imported torch, that the report holds every figure with a sane value
and the ratios to the baseline, and that nothing the bench started is left running. No timings
are asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # two server starts: minutes on a loaded 2-core VM

ROOT = Path(__file__).resolve().parents[2]
FLEETS, ROUNDS, STEPS = (4, 8), 2, 2


def processes_under(folder: Path) -> list[str]:
    """Command lines of live processes that name a path inside `folder` (the bench's servers and devices)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(folder) in cmd:
            found.append(f"{entry.name}: {cmd}")
    return found


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("load")
    work = tmp / "work"
    work.mkdir()
    out = tmp / "load.json"
    done = subprocess.run(
        [sys.executable, "bench/load.py", "--devices", ",".join(map(str, FLEETS)), "--rounds", str(ROUNDS),
         "--steps", str(STEPS), "--batch", "4", "--split", "3", "--procs", "2", "--progress-s", "1",
         "--workdir", str(work), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=540, check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return json.loads(out.read_text()), done.stdout, work


def test_every_device_completes_every_round_without_torch(bench):
    report, _, _ = bench
    assert [r["devices"] for r in report["runs"]] == list(FLEETS)
    for run in report["runs"]:
        assert run["errors"] == 0, run["error_samples"]
        assert run["steps_done"] == run["steps_expected"] == run["devices"] * ROUNDS * STEPS
        assert run["torch_in_device_processes"] is False
        assert [r["round"] for r in run["rounds"]] == list(range(ROUNDS))
        assert all(r["closed_by"] == "all devices done" for r in run["rounds"])


def test_the_report_holds_sane_figures_and_ratios_to_the_baseline(bench):
    report, stdout, _ = bench
    base, bigger = report["runs"]
    for run in report["runs"]:
        assert run["rss_peak_mb"] >= run["rss_idle_mb"] > 0
        assert run["rss_per_device_mb"] > 0  # each device's replica, momentum and upload: megabytes
        assert run["cpu_per_step_ms"] > 0
        assert run["step_p99_ms"] >= run["step_p50_ms"] > 0
        assert run["last_upload_to_open_s"] > 0
        assert run["close_s"] > 0 and run["merge_s"] > 0 and run["fold_per_upload_ms"] > 0
        for r in run["rounds"]:  # a round opens after the previous one's last upload was sent
            assert r["first_join"] >= r["open_seen"]
            assert r["last_upload_done"] >= r["last_upload_sent"] > r["open_seen"]
    assert base["ratios"]["step_p50"] == pytest.approx(1.0)
    assert bigger["ratios"]["step_p50"] == pytest.approx(bigger["step_p50_ms"] / base["step_p50_ms"])
    assert bigger["ratios"]["rss_per_device"] == pytest.approx(bigger["rss_per_device_mb"] / base["rss_per_device_mb"])
    assert bigger["rss_marginal_mb"] is not None
    assert report["settings"]["split"] == 3 and report["commit"]
    # the printed table and the progress lines
    assert "upload->open" in stdout and "ratio to" in stdout
    assert "[8 devices]" in stdout and "starting one server" in stdout


def test_nothing_the_bench_started_is_left_running(bench):
    _, _, work = bench
    assert processes_under(work) == []
    assert list(work.iterdir()) == []  # every fleet's folder removed


def test_a_root_and_two_shards_each_device_on_its_shard(tmp_path):
    out = tmp_path / "load.json"
    done = subprocess.run(
        [sys.executable, "bench/load.py", "--devices", "6", "--shards", "2", "--rounds", str(ROUNDS),
         "--steps", str(STEPS), "--batch", "4", "--procs", "2", "--workdir", str(tmp_path), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=540, check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["errors"] == 0 and run["steps_done"] == 6 * ROUNDS * STEPS, run["error_samples"]
    assert [p["role"] for p in run["processes"]] == ["root", "shard 0", "shard 1"]
    assert run["processes"][0]["devices"] == 0 and run["processes"][0]["rss_per_device_mb"] is None
    assert sum(p["devices"] for p in run["processes"]) == 6
    assert run["rss_per_device_per_shard_mb"] > 0
    assert [r["closed_by"] for r in run["rounds"]] == ["all devices done"] * ROUNDS
    assert processes_under(tmp_path) == []
