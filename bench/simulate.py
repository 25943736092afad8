"""`ares simulate` at fleet scale: the run, the decision's time and the straggler policy against the oracle.

Three parts, each with a baseline measured in the same run:

1. Decision time. A simulated fleet of 10,000 devices (half published Nanos, half Pis) runs four
   rounds under the straggler policy, so its telemetry holds what a fleet reports after a few
   rounds (profiles, links, up to three step samples per offloading device). Then, timed several
   times each (median): `ares.runtime.controller.decide` on that telemetry end to end, the
   policy's own `decide(problem)` on the problem the controller builds, and the shared-server
   straggler policy on the same problem. Baseline: the same at 1,000 devices. Printed against
   the budgets (100 ms for the decision, 1 s for the shared-server policy) and 10,000 against 1,000.
2. The straggler policy against the oracle (`--oracle-devices`, default 1,000; `--rounds`): with the simulator's
   default noise and with the per-round jitter off (the hidden speed factors and step overhead
   kept), so the share of the gap that the noise makes is seen; against the oracle (which knows
   each round's jitter) and the informed oracle (the best choice made before the round); `none` (every layer on the
   device) as the baseline.
3. `--full`: the whole command, 10,000 devices x 100 rounds under the straggler policy, wall and
   CPU time against the 10-minute budget, and 1,000 devices x 100 rounds as its baseline.

    python bench/simulate.py [--devices 10000] [--repeats 5] [--full] [--out results/bench-simulate]
    python bench/simulate.py --skip-decision --oracle-devices 10000 --rounds 20   (part 2 at 10,000)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ares.core.optimiser import StragglerPolicy  # noqa: E402
from ares.roles.simulate import DeviceGroup, Noise, SimConfig, Simulation, format_summary, run_policies  # noqa: E402
from ares.runtime.controller import decide, problem_from_telemetry  # noqa: E402

DECISION_BUDGET_S, SHARED_BUDGET_S, RUN_BUDGET_S = 0.100, 1.0, 600.0


def fleet(n: int) -> list[DeviceGroup]:
    return [DeviceGroup(count=n - n // 2), DeviceGroup(count=n // 2, profile="raspberry-pi")]


def median_s(fn, repeats: int) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds of this process)."""
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def decision_times(n: int, repeats: int) -> dict[str, tuple[float, float]]:
    sim = Simulation(SimConfig(rounds=4, fleet=fleet(n)), "straggler")
    for r in range(4):
        sim.step(r)
    rows = sim.fleet.available.nonzero()[0]
    telemetry = sim._telemetry(4, rows)
    problem = problem_from_telemetry(telemetry)
    samples = sum(len(d.measured_steps) for d in telemetry.devices)
    print(f"  {n} devices: {samples} step samples in the telemetry", flush=True)
    return {
        "controller.decide (telemetry -> plan)": median_s(lambda: decide(telemetry, StragglerPolicy()), repeats),
        "  of which problem_from_telemetry": median_s(lambda: problem_from_telemetry(telemetry), repeats),
        "straggler decide(problem)": median_s(lambda: StragglerPolicy().decide(problem), repeats),
        "straggler choose(problem)": median_s(lambda: StragglerPolicy().choose(problem), repeats),
        "straggler shared decide(problem)": median_s(lambda: StragglerPolicy(share_server=True).decide(problem),
                                                    max(1, repeats // 2)),
    }


def decision_part(args: argparse.Namespace) -> None:
    print("1. decision time (median wall / CPU)", flush=True)
    base = decision_times(args.baseline_devices, args.repeats)
    big = decision_times(args.devices, args.repeats)
    for name, (w, c) in big.items():
        bw, _ = base[name]
        budget = SHARED_BUDGET_S if "shared" in name else DECISION_BUDGET_S
        print(f"  {name:<42} {args.devices}: {w * 1e3:8.1f} ms wall {c * 1e3:8.1f} ms CPU; "
              f"{w / budget:6.2f}x the {budget * 1e3:.0f} ms budget; {w / bw:5.1f}x {args.baseline_devices} devices "
              f"({bw * 1e3:.1f} ms)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--baseline-devices", type=int, default=1_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--full", action="store_true", help="also the whole 10,000 x 100 run and its baseline")
    ap.add_argument("--skip-decision", action="store_true", help="leave out part 1")
    ap.add_argument("--skip-oracle", action="store_true", help="leave out part 2")
    ap.add_argument("--oracle-devices", type=int, help="part 2's fleet (default --baseline-devices)")
    ap.add_argument("--out", default="results/bench-simulate")
    args = ap.parse_args()
    out = Path(args.out)

    if not args.skip_decision:
        decision_part(args)
    n_oracle = args.oracle_devices or args.baseline_devices
    if not args.skip_oracle:
        print(f"\n2. straggler against the oracle, {n_oracle} devices x {args.rounds} rounds", flush=True)
        for label, noise in (("default noise", Noise()), ("no per-round jitter", Noise(compute_jitter=0, link_jitter=0))):
            cfg = SimConfig(rounds=args.rounds, fleet=fleet(n_oracle), policies=["straggler", "none"], noise=noise)
            summary = run_policies(cfg, out / f"oracle-{n_oracle}-{label.replace(' ', '-')}")
            s, none = summary["policies"]["straggler"], summary["policies"]["none"]
            print(f"  {label}: straggler {s['ratio_to_oracle']:.4f}x the oracle (worst round "
                  f"{s['worst_ratio_to_oracle']:.4f}x), {s['ratio_to_informed']:.4f}x the informed oracle; "
                  f"none {none['ratio_to_oracle']:.4f}x; straggler/none "
                  f"{s['mean_round_s'] / none['mean_round_s']:.4f}; prediction error per device median "
                  f"{s['prediction_error_median'] * 100:.1f}%, p90 {s['prediction_error_p90'] * 100:.1f}%", flush=True)

    if args.full:
        print(f"\n3. the whole run, straggler, {args.rounds} rounds", flush=True)
        times = {}
        for n in (args.baseline_devices, args.devices):
            cfg = SimConfig(rounds=args.rounds, fleet=fleet(n), policies=["straggler"])
            w, c = time.perf_counter(), time.process_time()
            summary = run_policies(cfg, out / f"full-{n}", progress=lambda line: print("   ", line, flush=True))
            times[n] = (time.perf_counter() - w, time.process_time() - c)
            print(format_summary(summary))
            print(f"  {n} devices x {args.rounds} rounds: {times[n][0]:.0f} s wall, {times[n][1]:.0f} s CPU; "
                  f"{times[n][0] / RUN_BUDGET_S:.2f}x the 10-minute budget", flush=True)
        print(f"  {args.devices} against {args.baseline_devices} devices: "
              f"{times[args.devices][0] / times[args.baseline_devices][0]:.1f}x wall", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
