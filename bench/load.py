"""Load: many emulated devices against one real `ares server` process over HTTP/2.

Each emulated device is the real device client (`HttpLink`: httpx, HTTP/2 prior knowledge, one
connection) doing what a device does each round: wait for the round to open, join, send its
steps (random activations of the right shape for its split, real labels range), upload its
weights and sample count. No device-side compute: the server and the wire are what is measured.
Devices run as threads spread over a few processes (one process would measure the client's GIL).

Printed: errors (must be 0), step latency p50/p99 as the devices saw it, server CPU per step
(the server process's user+system CPU over the run divided by the steps; round overhead
included), and the same latency for one device alone measured first in the same run, as the
baseline the fleet's figures are divided by.

    python bench/load.py [--devices 32] [--rounds 10] [--steps 3] [--split 3] [--batch 20]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ares.core.config import DataConfig  # noqa: E402
from ares.core.messages import DeviceReport, StepTimings  # noqa: E402
from ares.core.models import activation_shapes  # noqa: E402
from ares.runtime.link import HttpLink, LinkError  # noqa: E402
from tests.conftest import ServerProcess, small_config, token  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """user + system CPU of a process and all its descendants (granian serves from a child)."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += cpu_seconds(int(child))
    except (OSError, ValueError):
        pass
    return total


def run_device(url: str, name: str, tok: str, rounds: int, steps: int, split: int, batch: int,
               shape: tuple, out: list, errors: list) -> None:
    link = HttpLink(url, name, tok, timeout_s=300.0)
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    try:
        for r in range(rounds):
            deadline = time.monotonic() + 600
            while True:
                status = link.status()
                if status.phase == "finished":
                    return
                if status.round >= r and status.accepting:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"round {r} did not open")
                time.sleep(0.05)
            reply, weights, _ = link.join(r, split)
            for _ in range(steps):
                t0 = time.perf_counter()
                link.step(r, split, x, y)
                out.append(time.perf_counter() - t0)
            link.upload(DeviceReport(round=r, split=split, samples=steps * batch,
                                     timings=StepTimings(steps=steps)), weights)
    except (LinkError, OSError, TimeoutError, ValueError) as exc:
        errors.append(f"{name}: {exc.__class__.__name__}: {exc}")
    finally:
        link.close()


def worker(url: str, devices: list[tuple[str, str]], rounds: int, steps: int, split: int, batch: int,
           shape: tuple, queue) -> None:
    torch.set_num_threads(1)
    latencies: list[float] = []
    errors: list[str] = []
    threads = [threading.Thread(target=run_device, args=(url, n, t, rounds, steps, split, batch, shape,
                                                        latencies, errors)) for n, t in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queue.put((latencies, errors))


def fleet(url: str, devices: list[tuple[str, str]], procs: int, rounds: int, steps: int, split: int,
          batch: int, shape: tuple) -> tuple[list[float], list[str]]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    groups = [devices[i::procs] for i in range(procs)]
    ps = [ctx.Process(target=worker, args=(url, g, rounds, steps, split, batch, shape, queue)) for g in groups if g]
    for p in ps:
        p.start()
    latencies, errors = [], []
    for _ in ps:
        lat, err = queue.get()
        latencies += lat
        errors += err
    for p in ps:
        p.join()
    return latencies, errors


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=3, help="steps per device per round")
    ap.add_argument("--split", type=int, default=3)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--procs", type=int, default=4, help="client processes the devices are spread over")
    args = ap.parse_args()
    shape = activation_shapes("vgg5")[args.split]
    names = [f"dev-{i:02d}" for i in range(args.devices)]

    def start(tmp: Path, devices: list[str], rounds: int) -> ServerProcess:
        cfg = small_config(tmp, devices=tuple(devices), rounds=rounds, batch_size=args.batch,
                           max_steps_per_round=args.steps)
        per_device = args.steps * args.batch
        cfg = cfg.model_copy(update={
            "round_deadline_s": 600.0, "round_gap_s": 0.2,
            "data": DataConfig(name="synthetic", synthetic_train=per_device * len(devices), synthetic_test=100, seed=1)})
        return ServerProcess(cfg, tmp)

    # baseline: one device alone, same server settings
    with tempfile.TemporaryDirectory() as d:
        server = start(Path(d), ["solo"], 3)
        try:
            base, base_err = fleet(server.url, [("solo", token(server.cfg, "solo"))], 1, 3, args.steps,
                                   args.split, args.batch, shape)
        finally:
            server.stop()

    with tempfile.TemporaryDirectory() as d:
        server = start(Path(d), names, args.rounds)
        try:
            cpu0, t0 = cpu_seconds(server.proc.pid), time.perf_counter()
            lat, errors = fleet(server.url, [(n, token(server.cfg, n)) for n in names], args.procs,
                                args.rounds, args.steps, args.split, args.batch, shape)
            wall, cpu = time.perf_counter() - t0, cpu_seconds(server.proc.pid) - cpu0
            alive = server.proc.poll() is None
        finally:
            server.stop()

    errors += base_err
    expected = args.devices * args.rounds * args.steps
    print(f"load: {args.devices} devices x {args.rounds} rounds x {args.steps} steps, split {args.split}, "
          f"batch {args.batch}, HTTP/2 (granian), {args.procs} client processes")
    print(f"steps answered: {len(lat)} of {expected}; errors: {len(errors)}; server alive: {alive}")
    for e in errors[:10]:
        print("  ", e)
    p50, p99 = pct(lat, 0.50), pct(lat, 0.99)
    b50, b99 = pct(base, 0.50), pct(base, 0.99)
    print(f"step latency p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms "
          f"(one device alone: p50 {b50 * 1000:.1f} ms, p99 {b99 * 1000:.1f} ms; "
          f"ratio p50 {p50 / b50:.2f}x, p99 {p99 / b99:.2f}x)")
    print(f"server CPU per step: {cpu / max(len(lat), 1) * 1000:.1f} ms (round overhead included; "
          f"{cpu:.1f} s CPU over {wall:.1f} s wall, {len(lat) / wall:.1f} steps/s)")
    print(f"mean step latency {statistics.fmean(lat) * 1000:.1f} ms")
    return 0 if not errors and len(lat) == expected and alive else 1


if __name__ == "__main__":
    sys.exit(main())
