"""How long the optimiser takes to decide a large fleet: 10,000 devices x 7 splits in < 100 ms.

Builds a random fleet from the published Nano and Pi profiles (each device slowed or sped up
by a random factor, with its own links, power mode and iteration count), then times
`policy.decide(problem)` for every policy: arrays in, one split per device and the full
predicted plan out. Prints the median of several runs and its ratio to the budget.

    python bench/optimiser.py [--devices 10000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ares.core.energy import power_model  # noqa: E402
from ares.core.optimiser import (  # noqa: E402
    AresPolicy, DeviceInput, FixedPolicy, NonePolicy, Problem, StragglerPolicy, model_costs,
)
from ares.core.profiles import PUBLISHED, ServerProfile, derive_power_mode  # noqa: E402

BUDGET_S = 0.100
VGG5_NUMEL = [32768, 8192, 16384, 4096, 4096, 128]
VGG5_WEIGHT_BYTES = [4104, 4104, 79120, 79120, 227864, 2325528, 2330688]


def random_fleet(n: int, seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    nano = PUBLISHED["jetson-nano/MAXN"]
    kinds = [(nano, "jetson-nano", "MAXN"), (PUBLISHED["raspberry-pi"], "raspberry-pi", "")] + [
        (derive_power_mode(nano, m), "jetson-nano", m) for m in ("5W", "custom1", "custom3")]
    devices = []
    for i, (k, factor, up, down, iters) in enumerate(zip(
            rng.integers(0, len(kinds), n), rng.uniform(0.7, 1.5, n), rng.uniform(1, 50, n),
            rng.uniform(1, 50, n), rng.integers(20, 200, n))):
        profile, cls, mode = kinds[k]
        devices.append(DeviceInput(f"d{i}", profile.scaled(float(factor)), float(up) * 1e6 / 8, float(down) * 1e6 / 8,
                                   power_model(cls, mode), int(iters)))
    server = ServerProfile.from_cumulative(nano.scaled(0.1))
    return Problem(tuple(devices), server, model_costs(VGG5_NUMEL, VGG5_WEIGHT_BYTES, 100))


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    problem = random_fleet(args.devices)
    print(f"optimiser decision time, {args.devices} devices x {problem.n_splits} splits, "
          f"median of {args.repeats} (budget {BUDGET_S * 1000:.0f} ms)")
    worst = 0.0
    for policy in (AresPolicy(0.5), StragglerPolicy(), FixedPolicy(3), NonePolicy()):
        t = median_seconds(lambda: policy.decide(problem), args.repeats)
        worst = max(worst, t)
        print(f"  {policy.name:<10} {t * 1000:7.1f} ms   {t / BUDGET_S:5.2f} x budget")
    # The shared-server search is O(N^2 L) in the worst case: shown at a fleet size it is meant for.
    small = random_fleet(500)
    t = median_seconds(lambda: StragglerPolicy(share_server=True).decide(small), 3)
    print(f"  straggler --share-server, 500 devices: {t * 1000:.1f} ms")
    print(f"worst policy at {args.devices} devices: {worst * 1000:.1f} ms = {worst / BUDGET_S:.2f} x budget "
          f"({'within' if worst < BUDGET_S else 'OVER'} budget)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
