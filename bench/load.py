"""Load: up to thousands of emulated devices against real `ares server` processes over HTTP/2.

For each fleet size in `--devices` (the first is the baseline the others are divided by), fresh
server processes are started (one server, or with `--shards K` a root and K shards, each device
on the shard `ares.core.sharding` assigns it), their resident memory read with no device
joined, then the devices run `--rounds` rounds of `--steps` steps each. The devices are
bench/load_devices.py processes (`--procs`, threads inside) that import no torch: each device
is the devices' own HTTP/2 client sending bodies this process encoded once with the real
encoder (`ares.core.wire`): the real device part's activations of a synthetic batch and their
labels for every step, and for every round an upload of the global model's device-side weights
(a zero update of the device part; the server's replica is what trains) with the round's
report. Every round passes the server's checks: the split's shapes and dtypes, a sample count
equal to the share the server assigned (`synthetic_train` = devices x steps x batch), an update
within bounds. Waiting devices wait on `GET /v1/round` as a device does: a long poll the server
answers when the round opens (at most 10 s later), `--poll-s` between answers that came early.

Reported per fleet size, and as ratios to the baseline:
- errors: refusals, broken replies, dropped connections, missed rounds (must be 0);
- server memory per device: (peak resident memory during the rounds - memory with no device
  joined) / devices, RSS of each server process with its children (granian's worker) sampled
  every 0.2 s; also at the end of the run, per shard (its own devices), and the marginal
  memory from one fleet size to the next (which fixed costs, such as freed memory the
  allocator keeps and worker threads, do not inflate);
- server CPU per step: the servers' user+system CPU over the rounds / steps (joins, uploads,
  the waiting devices' polls and the round closes included);
- step latency p50/p99 as the devices saw it (request start to the reply's last byte);
- the time from a round's last upload (its request's start: the last upload's reply comes only
  after the close it triggers) to the first device seeing the next round open, beside the
  close as the server records it (merge and evaluation: `close_s` of its round record) and
  what the merge itself costs at that fleet size (`ares.core.fedavg.merger`, timed here: per
  upload folded in, and the merged model at the close).

A progress line is printed every `--progress-s`; the results go to `--out` (JSON). Every
process started (servers, device processes) is stopped at the end, on an error and on Ctrl-C
or SIGTERM; if this process is killed outright, a small reaper process (`Reaper`) ends them and
removes their folders. A fleet is stopped, as an error, after `--fleet-timeout-s` or when the
machine has less than `--min-available-mb` of memory left.

    python bench/load.py --devices 32,100,300,1000 [--shards 4] [--rounds 3] [--steps 2] [--batch 20] [--split 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402

from ares.core import codec as codecs  # noqa: E402
from ares.core import wire  # noqa: E402
from ares.core.config import AggregationConfig, DataConfig, ServerConfig  # noqa: E402
from ares.core.data import make_synthetic_hard  # noqa: E402
from ares.core.fedavg import merger  # noqa: E402
from ares.core.messages import DeviceReport, StepTimings  # noqa: E402
from ares.core.models import build_model, model_spec, split_model  # noqa: E402
from ares.core.sharding import assign  # noqa: E402
from tests.support import (ServerProcess, ShardProcess, die_with_pytest, history, small_config,  # noqa: E402
                           start_together, stop_process, token, write_shard_token)

DEVICES_SCRIPT = Path(__file__).with_name("load_devices.py")
MB = 1_000_000  # memory in MB of 10^6 bytes, as the requirement states it


# ---- processes: memory and CPU of a process and its descendants --------------------------------

def tree(pid: int) -> list[int]:
    """`pid` and every live descendant (granian serves from a worker process)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            pass
    return out


def rss_bytes(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
    return total


def cpu_seconds(pid: int) -> float:
    """user + system CPU of a process and its descendants (live ones, and reaped ones via cutime)."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(v) for v in fields[11:15]) / tick
        except (OSError, ValueError, IndexError):
            pass
    return total


def available_mb() -> float:
    """The machine's MemAvailable, in MB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / MB
    except (OSError, ValueError):
        pass
    return float("inf")


class Sampler(threading.Thread):
    """Resident memory of each server process tree every `period` s: peak and last."""

    def __init__(self, pids: list[int], period: float = 0.2):
        super().__init__(daemon=True)
        self.pids, self.period = pids, period
        self.peak = [0] * len(pids)
        self.last = [0] * len(pids)
        self.halt = threading.Event()

    def sample(self) -> None:
        for i, pid in enumerate(self.pids):
            self.last[i] = rss_bytes(pid)
            self.peak[i] = max(self.peak[i], self.last[i])

    def run(self) -> None:
        while not self.halt.wait(self.period):
            self.sample()

    def stop(self) -> None:
        self.halt.set()
        self.join()
        self.sample()


# ---- what outlives this process if it is killed -------------------------------------------------

REAPER = """
import os, shutil, signal, sys, time
folders = set()
for line in sys.stdin:  # '+FOLDER' in use, '-FOLDER' done with; the end of input: the bench has ended
    (folders.add if line[0] == '+' else folders.discard)(line[1:].rstrip('\\n'))
for pid in (int(p) for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid()):
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            cmd = f.read().decode(errors='replace')
        if any(folder in cmd for folder in folders):
            os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
if folders:
    time.sleep(0.5)  # the killed processes' files closed
for folder in folders:
    shutil.rmtree(folder, ignore_errors=True)
"""


class Reaper:
    """A small process that kills (SIGKILL), when this one ends however it ends, every process
    whose command line names a folder of the bench still in use, then removes those folders: a
    SIGKILLed bench leaves no server or device process behind, not even one still starting (a
    server only gets SIGTERM from PR_SET_PDEATHSIG, and a busy granian can take minutes to stop)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", REAPER], stdin=subprocess.PIPE, text=True,
                                     start_new_session=True)  # not in our group: a Ctrl-C leaves it to finish

    def _send(self, line: str) -> None:
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):
            pass

    def watch(self, folder: Path) -> None:
        self._send(f"+{folder}")

    def forget(self, folder: Path) -> None:
        self._send(f"-{folder}")

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


REAPER_PROCESS: Optional[Reaper] = None  # main() starts it


# ---- the servers ---------------------------------------------------------------------------------

class Servers:
    """The server processes of one fleet and which one each device talks to: one `ares server`
    (`--shards 1`), or a root (`ares server`) and K shard processes (`ares server --shard I --root
    URL`), each device on the shard `ares.core.sharding` assigns it. Started together; stopped
    together, also when one fails to start."""

    def __init__(self, cfg: ServerConfig, tmp: Path, shards: int, start_timeout_s: float = 300.0):
        self.cfg, self.tmp = cfg, tmp
        if shards == 1:
            self.procs = start_together(lambda healthy: ServerProcess(cfg, tmp, healthy=healthy), timeout=start_timeout_s)
            self.roles = ["server"]
            self.devices_of = [list(cfg.devices)]  # per process: the devices it holds sessions for
            self.home = {d: 0 for d in cfg.devices}
            return
        write_shard_token(cfg)
        (tmp / "root").mkdir()
        root_url = f"http://127.0.0.1:{cfg.port}"
        # started from this thread (a server dies with the thread that started it), then waited for
        self.procs = start_together(lambda healthy: ServerProcess(cfg, tmp / "root", healthy=healthy),
                                    *[lambda healthy, i=i: ShardProcess(cfg, tmp, i, root_url, healthy=healthy)
                                      for i in range(shards)], timeout=start_timeout_s)
        homes = assign(cfg.devices, shards, cfg.shard_pins)
        self.roles = ["root"] + [f"shard {i}" for i in range(shards)]
        self.devices_of = [[]] + [list(h) for h in homes]
        self.home = {d: 1 + i for i, h in enumerate(homes) for d in h}

    def url_of(self, device: str) -> str:
        return self.procs[self.home[device]].url

    def pids(self) -> list[int]:
        return [p.proc.pid for p in self.procs]

    def alive(self) -> bool:
        return all(p.proc.poll() is None for p in self.procs)

    def logs(self) -> str:
        """The end of each process's log (for an error)."""
        return "\n".join(f"--- {role}: {p.tmp / 'server.log'}\n" + (p.tmp / "server.log").read_text()[-1500:]
                         for role, p in zip(self.roles, self.procs))

    def history(self, rounds: int, wait_s: float = 120.0) -> list[dict]:
        """The root's (or the one server's) round records, once `rounds` are in its checkpoint: a
        device's last upload is answered before the round it closes is merged, evaluated and written
        (seconds on a loaded machine), so the records are waited for, up to `wait_s`."""
        end = time.monotonic() + wait_s
        records = history(self.cfg)
        while len(records) < rounds and time.monotonic() < end and self.alive():
            time.sleep(0.2)
            records = history(self.cfg)
        return records

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


# ---- the bodies the devices send ---------------------------------------------------------------

@dataclass
class Settings:
    model: str
    split: int
    batch: int
    steps: int
    rounds: int
    codec: str
    poll_s: float
    procs: int
    shards: int
    deadline_s: float
    seed: int = 1
    fleet_timeout_s: float = 1800.0
    start_timeout_s: float = 300.0
    min_available_mb: float = 1000.0
    round_gap_s: float = 0.0  # the close itself is measured, not the gap the controller gets


def encode_bodies(s: Settings, folder: Path) -> dict:
    """Written once per run: one step body (the real device part's activations of a synthetic
    batch, in the codec, with their labels) and one upload per round (the global model's
    device-side weights with that round's report), each with the real encoder."""
    folder.mkdir(parents=True, exist_ok=True)
    model = build_model(s.model, seed=s.seed)  # the server's initial model (same seed)
    device_part, _ = split_model(model, s.split)
    data = make_synthetic_hard(s.batch, 10, seed=s.seed)
    x, y = data.train.tensors
    with torch.no_grad():
        acts = device_part.train()(x)  # what the device sends: its part's output on its batch
    step = wire.encode({**codecs.pack("x", acts, s.codec), "y": y}, {})
    (folder / "step.bin").write_bytes(step)
    weights = {f"layers.{k}": v.detach().clone() for k, v in device_part.layers.state_dict().items()}
    uploads = []
    for r in range(s.rounds):
        report = DeviceReport(round=r, split=s.split, samples=s.steps * s.batch, timings=StepTimings(steps=s.steps))
        uploads.append(folder / f"upload-{r}.bin")
        uploads[-1].write_bytes(wire.encode(weights, report.model_dump(mode="json")))
    return {"step": str(folder / "step.bin"), "uploads": [str(p) for p in uploads],
            "step_bytes": len(step), "upload_bytes": uploads[0].stat().st_size}


def fleet_config(tmp: Path, names: list[str], s: Settings) -> ServerConfig:
    cfg = small_config(tmp, devices=tuple(names), rounds=s.rounds, batch_size=s.batch, max_steps_per_round=s.steps,
                       seed=s.seed)
    cfg = cfg.model_copy(update={
        "shards": s.shards, "model": s.model, "codec": s.codec, "round_deadline_s": s.deadline_s,
        "round_gap_s": s.round_gap_s, "aggregation": AggregationConfig(),
        # each device's share is exactly steps x batch samples: the sample count it reports
        "data": DataConfig(name="synthetic", synthetic_train=len(names) * s.steps * s.batch, synthetic_test=100,
                           seed=s.seed)})
    return type(cfg).model_validate(cfg.model_dump())  # its validators see the whole config


# ---- one fleet size ----------------------------------------------------------------------------

@dataclass
class Clients:
    """The device processes of one fleet; stopped (killed) if still running."""

    procs: list[subprocess.Popen] = field(default_factory=list)
    results: list[Path] = field(default_factory=list)
    progress: list[Path] = field(default_factory=list)

    def start(self, tmp: Path, servers: Servers, names: list[str], s: Settings, bodies: dict) -> None:
        groups = [names[i::s.procs] for i in range(s.procs)]
        for i, group in enumerate(g for g in groups if g):
            spec = {"devices": [{"name": n, "token": token(servers.cfg, n), "url": servers.url_of(n)} for n in group],
                    "rounds": s.rounds, "steps": s.steps, "split": s.split, "poll_s": s.poll_s, "wait_s": 10.0,
                    "timeout_s": s.deadline_s, "bodies": bodies, "progress": str(tmp / f"progress-{i}.json")}
            (tmp / f"spec-{i}.json").write_text(json.dumps(spec))
            self.results.append(tmp / f"result-{i}.json")
            self.progress.append(tmp / f"progress-{i}.json")
            log = open(tmp / f"devices-{i}.log", "wb")
            self.procs.append(subprocess.Popen(
                [sys.executable, str(DEVICES_SCRIPT), str(tmp / f"spec-{i}.json"), str(self.results[-1])],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, preexec_fn=die_with_pytest,
                env={**os.environ, "OMP_NUM_THREADS": "1"}))
            log.close()

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def totals(self) -> dict:
        out: dict = {}
        for path in self.progress:
            try:
                for k, v in json.loads(path.read_text()).items():
                    out[k] = out.get(k, 0) + v
            except (OSError, ValueError):
                pass
        return out

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                stop_process(p, grace_s=2)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def merge_costs(s: Settings, devices: int) -> tuple[float, float]:
    """What the server's merge costs (`ares.core.fedavg.merger`, the job's method, one thread, the
    best of three): seconds per upload folded in, and seconds for the merged model at the close
    after `devices` uploads (for a weighted mean a float64 running sum: the same at any count)."""
    reference = {k: v.clone() for k, v in build_model(s.model, seed=s.seed).state_dict().items()}
    upload = {k: v.clone() for k, v in reference.items()}
    fold, close = float("inf"), float("inf")
    for _ in range(3):
        merge = merger(AggregationConfig().method, reference)
        t0 = time.perf_counter()
        for _ in range(devices):
            merge.add(upload, float(s.steps * s.batch))
        t1 = time.perf_counter()
        merge.result()
        t2 = time.perf_counter()
        fold, close = min(fold, (t1 - t0) / devices), min(close, t2 - t1)
    return fold, close


def run_fleet(n: int, s: Settings, bodies: dict, progress_s: float, say, workdir: Optional[str] = None) -> dict:
    names = [f"dev-{i:04d}" for i in range(n)]
    errors_seen: list[str] = []
    with tempfile.TemporaryDirectory(prefix=f"ares-load-{n}-", dir=workdir) as d:
        tmp = Path(d)
        if REAPER_PROCESS is not None:
            REAPER_PROCESS.watch(tmp)
        cfg = fleet_config(tmp, names, s)
        say(f"[{n} devices] starting {servers_label(s.shards)} ({cfg.data.synthetic_train} synthetic samples)")
        t_start = time.monotonic()
        servers = Servers(cfg, tmp, s.shards, s.start_timeout_s)
        clients = Clients()
        try:
            time.sleep(1.0)  # settle after start-up
            idle = [rss_bytes(pid) for pid in servers.pids()]
            sampler = Sampler(servers.pids())
            sampler.sample()
            sampler.start()
            cpu0 = [cpu_seconds(pid) for pid in servers.pids()]
            t0 = time.monotonic()
            clients.start(tmp, servers, names, s, bodies)
            expected = n * s.rounds * s.steps
            next_line = t0 + progress_s
            while clients.running():
                time.sleep(0.2)
                if time.monotonic() - t0 > s.fleet_timeout_s:
                    clients.stop()
                    errors_seen.append(f"the fleet had not finished after {s.fleet_timeout_s:.0f} s: stopped")
                    break
                if available_mb() < s.min_available_mb:  # a shared machine: stop before it starves
                    clients.stop()
                    errors_seen.append(f"the machine had less than {s.min_available_mb:.0f} MB available: stopped")
                    break
                if not servers.alive():
                    raise RuntimeError("a server process died:\n" + servers.logs())
                if time.monotonic() >= next_line:
                    next_line += progress_s
                    p = clients.totals()
                    say(f"[{n} devices] {time.monotonic() - t0:5.0f} s: joins {p.get('joins', 0)}/{n * s.rounds}, "
                        f"steps {p.get('steps', 0)}/{expected}, uploads {p.get('uploads', 0)}/{n * s.rounds}, "
                        f"errors {p.get('errors', 0)}; server {sum(sampler.last) / MB:,.0f} MB "
                        f"(+{(sum(sampler.last) - sum(idle)) / MB:,.0f})")
            wall = time.monotonic() - t0
            cpu = sum(cpu_seconds(pid) for pid in servers.pids()) - sum(cpu0)
            sampler.stop()
            alive = servers.alive()
            records = servers.history(0 if errors_seen else s.rounds)
        finally:
            clients.stop()
            servers.stop()
            if REAPER_PROCESS is not None:
                REAPER_PROCESS.forget(tmp)  # all stopped (else the reaper ends what is left)
            if "sampler" in locals():
                sampler.halt.set()
        results = []
        for i, path in enumerate(clients.results):
            try:
                results.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                log = (tmp / f"devices-{i}.log").read_text()[-1500:]
                results.append({"error_list": [f"device process {i} left no result: {log}"], "step_s": [],
                                "rounds": {}, "cpu_s": 0.0, "torch_loaded": False, "polls": 0})
    total_wall = time.monotonic() - t_start

    steps = [v for r in results for v in r["step_s"]]
    errors = errors_seen + [e for r in results for e in r["error_list"]]
    if len(steps) != n * s.rounds * s.steps:
        errors.append(f"{len(steps)} steps answered of {n * s.rounds * s.steps}")
    if not alive:
        errors.append("a server process was not alive at the end")
    if len(records) != s.rounds or any(rec.get("missed") for rec in records):
        errors.append(f"{len(records)} rounds closed of {s.rounds}; missed: "
                      f"{sorted({m for rec in records for m in rec.get('missed', [])})[:5]}")
    rounds = []
    for r in range(s.rounds):
        seen = [res["rounds"].get(str(r), {}) for res in results]
        row = {"round": r}
        for key, pick in (("open_seen", min), ("first_join", min), ("last_upload_sent", max), ("last_upload_done", max)):
            values = [x[key] for x in seen if key in x]
            row[key] = pick(values) if values else None
        rec = records[r] if r < len(records) else {}
        row["close_s"] = rec.get("close_s")
        row["closed_by"] = rec.get("closed_by")
        rounds.append(row)
    gaps = [rounds[r]["open_seen"] - rounds[r - 1]["last_upload_sent"] for r in range(1, s.rounds)
            if rounds[r]["open_seen"] is not None and rounds[r - 1]["last_upload_sent"] is not None]
    for r in range(s.rounds):  # times relative to the fleet's start, for the JSON
        for key in ("open_seen", "first_join", "last_upload_sent", "last_upload_done"):
            if rounds[r][key] is not None:
                rounds[r][key] = round(rounds[r][key] - t0, 4)
    closes = [x["close_s"] for x in rounds if x["close_s"] is not None]
    say(f"[{n} devices] timing the merge of {n} uploads")
    fold, merge = merge_costs(s, n)
    per_process = [{"role": role, "devices": len(devs), "rss_idle_mb": i / MB, "rss_peak_mb": p / MB,
                    "rss_end_mb": e / MB, "rss_growth_mb": (p - i) / MB,
                    "rss_per_device_mb": (p - i) / MB / len(devs) if devs else None}
                   for role, devs, i, p, e in zip(servers.roles, servers.devices_of, idle, sampler.peak, sampler.last)]
    served = [x for x in per_process if x["devices"]]
    return {
        "devices": n, "shards": s.shards, "errors": len(errors), "error_samples": errors[:10],
        "steps_expected": n * s.rounds * s.steps, "steps_done": len(steps),
        "rss_idle_mb": sum(idle) / MB, "rss_peak_mb": sum(sampler.peak) / MB, "rss_end_mb": sum(sampler.last) / MB,
        "rss_per_device_mb": (sum(sampler.peak) - sum(idle)) / MB / n,
        "rss_end_per_device_mb": (sum(sampler.last) - sum(idle)) / MB / n,
        "rss_per_device_per_shard_mb": max(x["rss_per_device_mb"] for x in served),
        "processes": per_process,
        "cpu_s": cpu, "cpu_per_step_ms": cpu / max(len(steps), 1) * 1000,
        "step_p50_ms": pct(steps, 0.50) * 1000, "step_p99_ms": pct(steps, 0.99) * 1000,
        "step_mean_ms": statistics.fmean(steps) * 1000 if steps else float("nan"),
        "last_upload_to_open_s": statistics.fmean(gaps) if gaps else None,
        "last_upload_to_open_max_s": max(gaps) if gaps else None,
        "close_s": statistics.fmean(closes) if closes else None, "merge_s": merge, "fold_per_upload_ms": fold * 1000,
        "close_minus_merge_s": statistics.fmean(closes) - merge if closes else None,
        "rounds": rounds, "wall_s": wall, "wall_with_start_s": total_wall,
        "polls": sum(r.get("polls", 0) for r in results), "client_cpu_s": sum(r["cpu_s"] for r in results),
        "torch_in_device_processes": any(r["torch_loaded"] for r in results),
    }


# ---- the report --------------------------------------------------------------------------------

RATIOS = {"rss_per_device_mb": "rss_per_device", "cpu_per_step_ms": "cpu_per_step", "step_p50_ms": "step_p50",
          "step_p99_ms": "step_p99", "last_upload_to_open_s": "last_upload_to_open", "close_s": "close"}


def ratios(run: dict, base: dict) -> dict:
    out = {}
    for key, name in RATIOS.items():
        a, b = run.get(key), base.get(key)
        out[name] = a / b if a is not None and b else None
    return out


def table(runs: list[dict]) -> str:
    def f(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    sharded = runs[0]["shards"] > 1
    head = ("devices", "errors", "MB/dev", "on a shard" if sharded else "at the end", "marginal", "CPU ms/step",
            "p50 ms", "p99 ms", "upload->open s", "close s", "merge ms")
    rows = [head]
    for run in runs:
        rows.append((str(run["devices"]), str(run["errors"]), f(run["rss_per_device_mb"], ".2f"),
                     f(run["rss_per_device_per_shard_mb"] if sharded else run["rss_end_per_device_mb"], ".2f"),
                     f(run.get("rss_marginal_mb"), ".2f"), f(run["cpu_per_step_ms"], ".1f"),
                     f(run["step_p50_ms"], ".0f"), f(run["step_p99_ms"], ".0f"),
                     f(run["last_upload_to_open_s"], ".2f"), f(run["close_s"], ".2f"), f(run["merge_s"] * 1000, ".1f")))
    rows.append(())
    rows.append(("ratio to", str(runs[0]["devices"]), "MB/dev", "", "", "CPU/step", "p50", "p99", "upload->open",
                 "close", ""))
    for run in runs[1:]:
        r = run["ratios"]
        rows.append((str(run["devices"]), "", f(r["rss_per_device"], ".2f") + "x", "", "",
                     f(r["cpu_per_step"], ".2f") + "x", f(r["step_p50"], ".2f") + "x", f(r["step_p99"], ".2f") + "x",
                     f(r["last_upload_to_open"], ".2f") + "x", f(r["close"], ".2f") + "x", ""))
    widths = [max(len(row[i]) for row in rows if row) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) if row else "" for row in rows)


def servers_label(shards: int) -> str:
    return "one server" if shards == 1 else f"a root and {shards} shards"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "ares", "bench"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="32,100,300,1000",
                    help="fleet sizes, comma-separated; the first is the baseline (default 32,100,300,1000)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="steps per device per round")
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--split", type=int, default=3, help="every device's split (VGG5: 0..5 offload)")
    ap.add_argument("--model", default="vgg5")
    ap.add_argument("--codec", choices=codecs.CODECS, default="fp32")
    ap.add_argument("--poll-s", type=float, default=0.1, help="a waiting device's poll period (the device's: 0.1 s)")
    ap.add_argument("--procs", type=int, default=4, help="device processes the fleet is spread over")
    ap.add_argument("--shards", type=int, default=1, help="server shards: 1 = one server; K > 1 = a root and K shard processes")
    ap.add_argument("--deadline-s", type=float, default=600.0, help="round deadline and the devices' request timeout")
    ap.add_argument("--start-timeout-s", type=float, default=300.0,
                    help="how long the servers may take to answer /healthz (each builds its data set and model)")
    ap.add_argument("--fleet-timeout-s", type=float, default=1800.0, help="a fleet still running then is stopped")
    ap.add_argument("--min-available-mb", type=float, default=1000.0,
                    help="a fleet is stopped (an error) when the machine has less memory available")
    ap.add_argument("--progress-s", type=float, default=10.0)
    ap.add_argument("--out", default="results/bench-load/load.json")
    ap.add_argument("--workdir", help="where each fleet's folder (configs, tokens, logs) is made; default: the temp dir")
    args = ap.parse_args(argv)
    counts = [int(v) for v in args.devices.split(",") if v.strip()]
    if not counts or min(counts) < 1:
        ap.error("--devices: one or more positive fleet sizes")
    spec = model_spec(args.model)
    if not 0 <= args.split < len(spec.build_layers()) - 1:
        ap.error(f"--split: a split with a server part (0..{len(spec.build_layers()) - 2} for {args.model})")
    if args.shards < 1:
        ap.error("--shards: 1 (one server) or more (a root and that many shards)")
    s = Settings(model=args.model, split=args.split, batch=args.batch, steps=args.steps, rounds=args.rounds,
                 codec=args.codec, poll_s=args.poll_s, procs=args.procs, shards=args.shards, deadline_s=args.deadline_s,
                 fleet_timeout_s=args.fleet_timeout_s, start_timeout_s=args.start_timeout_s, min_available_mb=args.min_available_mb)
    torch.set_num_threads(1)  # the merge timing: one thread, as the server runs (OMP_NUM_THREADS=1)

    def stop_on_sigterm(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_on_sigterm)
    global REAPER_PROCESS
    REAPER_PROCESS = Reaper()
    try:
        return run_all(args, argv, s, counts)
    finally:
        REAPER_PROCESS.close()
        REAPER_PROCESS = None


def run_all(args: argparse.Namespace, argv: Optional[list[str]], s: Settings, counts: list[int]) -> int:
    def say(text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)

    commit = git_commit()
    load0 = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory(prefix="ares-load-bodies-", dir=args.workdir) as d:
        if REAPER_PROCESS is not None:
            REAPER_PROCESS.watch(Path(d))  # (removed by it if this process is killed)
        bodies = encode_bodies(s, Path(d))
        say(f"load: fleets {counts}, {s.model} split {s.split}, batch {s.batch}, {s.steps} steps x {s.rounds} rounds, "
            f"{s.codec}, step body {bodies['step_bytes']:,} B, upload {bodies['upload_bytes']:,} B, "
            f"{s.procs} device processes, {servers_label(s.shards)}, poll {s.poll_s} s")
        for n in counts:
            run = run_fleet(n, s, bodies, args.progress_s, say, args.workdir)
            if runs:
                prev = runs[-1]
                run["rss_marginal_mb"] = ((run["rss_peak_mb"] - run["rss_idle_mb"])
                                           - (prev["rss_peak_mb"] - prev["rss_idle_mb"])) / (n - prev["devices"]) \
                    if n != prev["devices"] else None
            run["ratios"] = ratios(run, runs[0] if runs else run)
            runs.append(run)
            say(f"[{n} devices] done in {run['wall_s']:.0f} s: errors {run['errors']}, "
                f"{run['rss_per_device_mb']:.2f} MB/device, {run['cpu_per_step_ms']:.1f} ms CPU/step, "
                f"p50 {run['step_p50_ms']:.0f} ms, p99 {run['step_p99_ms']:.0f} ms")
            for e in run["error_samples"]:
                say(f"    {e}")
    report = {"command": " ".join(["python", "bench/load.py", *(argv if argv is not None else sys.argv[1:])]),
              "commit": commit, "date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
              "cores": os.cpu_count(), "load_before": load0, "load_after": os.getloadavg(),
              "settings": s.__dict__, "bodies": {k: bodies[k] for k in ("step_bytes", "upload_bytes")}, "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print()
    print(f"load at {commit}, {s.model} split {s.split}, batch {s.batch}, {s.steps} steps x {s.rounds} rounds, "
          f"{servers_label(s.shards)}; load average {load0[0]:.1f} -> {report['load_after'][0]:.1f}")
    print(table(runs))
    print(f"results: {out}")
    return 0 if all(r["errors"] == 0 and not r["torch_in_device_processes"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
