"""A training process's first steps: `torch.optim.SGD` against `ares.core.sgd.MomentumSGD`.

Every device pod, server pod and `ares run` process trains with SGD and momentum. torch's
`Optimizer` imports its compiler stack (`torch._dynamo`) on a process's first step;
`MomentumSGD` calls the same update function without it. Each variant runs in fresh processes,
alternating, `--repeats` times each; every process imports torch, builds VGG5, takes its first
step, then `--steps` more. Printed per variant (means): the CPU and wall seconds of making the
optimiser and the first step, the peak resident memory, the wall time per later step, whether `torch._dynamo` was
imported, and `MomentumSGD`'s ratios to `torch.optim.SGD` (the baseline, measured in the same
run). Both must end with the same weights: the script stops if they do not.

    python bench/sgd_start.py [--repeats 3] [--steps 30] [--batch 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

WORK = r"""
import hashlib, json, resource, sys, time
import torch
from ares.core.models import build_model
from ares.core.sgd import MomentumSGD

variant, steps, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = build_model("vgg5", seed=0)
gen = torch.Generator().manual_seed(1)
x, y = torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
t0, c0 = time.monotonic(), time.process_time()
opt = (torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if variant == "torch.optim.SGD"
       else MomentumSGD(model.parameters(), lr=0.01, momentum=0.9))

def step():
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()

step()
first_wall, first_cpu = time.monotonic() - t0, time.process_time() - c0
t0 = time.monotonic()
for _ in range(steps):
    step()
later = (time.monotonic() - t0) / max(steps, 1)
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
print(json.dumps({"first_wall": first_wall, "first_cpu": first_cpu, "later": later, "digest": digest,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "dynamo": "torch._dynamo" in sys.modules}))
"""

VARIANTS = ("torch.optim.SGD", "MomentumSGD")


def run(variant: str, steps: int, batch: int) -> dict:
    out = subprocess.run([sys.executable, "-c", WORK, variant, str(steps), str(batch)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="processes per variant")
    ap.add_argument("--steps", type=int, default=30, help="steps after the first")
    ap.add_argument("--batch", type=int, default=20)
    args = ap.parse_args()
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for i in range(args.repeats):
        for v in VARIANTS:
            results[v].append(run(v, args.steps, args.batch))
            print(f"  {i + 1}/{args.repeats} {v}", file=sys.stderr, flush=True)
    digests = {r["digest"] for rs in results.values() for r in rs}
    if len(digests) != 1:
        raise SystemExit(f"the variants ended with different weights: {sorted(digests)}")
    print(f"VGG5, batch {args.batch}, SGD momentum 0.9; {args.repeats} processes per variant; "
          f"the same weights after {args.steps + 1} steps in every process")
    base = None
    for v in VARIANTS:
        rs = results[v]
        m = {k: statistics.mean(r[k] for r in rs) for k in ("first_cpu", "first_wall", "rss_mb", "later")}
        line = (f"{v:16s} make + first step {m['first_cpu']:5.2f} s cpu {m['first_wall']:5.2f} s wall  "
                f"peak rss {m['rss_mb']:6.0f} MB  later steps {m['later'] * 1000:6.1f} ms  "
                f"torch._dynamo {'imported' if any(r['dynamo'] for r in rs) else 'not imported'}")
        if base is None:
            base = m
        else:
            line += (f"\n{'':16s} x{m['first_cpu'] / base['first_cpu']:.2f} cpu, "
                     f"x{m['first_wall'] / base['first_wall']:.2f} wall of making it and its first step, "
                     f"x{m['rss_mb'] / base['rss_mb']:.2f} peak rss, x{m['later'] / base['later']:.2f} later steps "
                     f"of torch.optim.SGD")
        print(line, flush=True)


if __name__ == "__main__":
    main()
