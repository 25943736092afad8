"""Torch processes sharing cores: CPU spent by spinning OpenMP threads against passive ones.

The test suite runs three workers and the servers, devices and pods they start on two cores, each
torch process with one thread per core unless told otherwise. Each process here trains VGG5 on one
batch for a fixed number of steps with torch's default number of threads; `--procs` of them run at
once. The same work runs twice in one invocation, so the figures compare like with like on this
machine as it is now:

    spinning   OpenMP's default: threads spin between parallel regions, then sleep
    passive    OMP_WAIT_POLICY=PASSIVE (what tests/conftest.py sets for the suite)

Printed per variant: the mean CPU seconds and wall seconds per process, and the passive variant's
ratios to the spinning one (the baseline). One process alone shows what passive waiting costs on
an idle machine (`--procs 1`).

    python bench/omp_contention.py [--procs 3] [--steps 40] [--batch 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORK = r"""
import json, sys, time
import torch
from ares.core.models import build_model

steps, batch = int(sys.argv[1]), int(sys.argv[2])
model = build_model("vgg5", seed=0)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

def step():
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()

for _ in range(3):  # warm-up: allocator, kernels, the optimiser's first-use imports
    step()
t0, c0 = time.monotonic(), time.process_time()
for _ in range(steps):
    step()
print(json.dumps({"wall": time.monotonic() - t0, "cpu": time.process_time() - c0, "threads": torch.get_num_threads()}))
"""


def run(procs: int, steps: int, batch: int, passive: bool) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    children = [subprocess.Popen([sys.executable, "-c", WORK, str(steps), str(batch)], env=env,
                                 stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    out = []
    for child in children:
        stdout, _ = child.communicate()
        if child.returncode != 0:
            raise SystemExit(f"a worker failed ({child.returncode})")
        out.append(json.loads(stdout))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=3, help="processes training at once")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=20)
    args = ap.parse_args()
    print(f"{args.procs} process(es) at once, {args.steps} VGG5 steps of batch {args.batch} each, "
          f"{os.cpu_count()} cores")
    base = None
    for name, passive in (("spinning", False), ("passive", True)):
        results = run(args.procs, args.steps, args.batch, passive)
        cpu = statistics.mean(r["cpu"] for r in results)
        wall = statistics.mean(r["wall"] for r in results)
        line = f"{name:9s} threads {results[0]['threads']}  cpu {cpu:6.2f} s  wall {wall:6.2f} s per process"
        if base is None:
            base = (cpu, wall)
        else:
            line += f"   x{cpu / base[0]:.2f} cpu, x{wall / base[1]:.2f} wall of spinning"
        print(line, flush=True)


if __name__ == "__main__":
    main()
