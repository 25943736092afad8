"""How long the controller takes to decide a fleet from its telemetry: `controller.decide`, end to end.

The fleet: `ares simulate`'s (half published Nanos, half Pis, links 5-50 Mbit/s) runs four rounds
under the straggler policy with power modes, so its telemetry holds what a fleet reports after a
few rounds (profiles, links, up to three step samples per offloading device, Jetsons in their
modes); each device's last four sessions are added as the server reports them, and the whole
read back from its JSON, as the controller receives it. Timed, each the
median of `--repeats` (wall and this process's CPU time), `controller.decide(telemetry, policy)`
for:

- straggler: the default policy, the job's one (codec, micro-batches) option;
- straggler + power modes: every Jetson's four modes in the decision (4 x 7 columns);
- straggler + modes + 6 options: and six (codec, k) options (4 x 6 x 7 = 168 columns per Jetson);
- straggler, shared server (`share_server=True`, one option; budget 1 s);
- ares: the published rule (one option).

The telemetry is columns (`TelemetryColumns`), read back from their JSON as a controller reads
the server's reply. Two baselines, measured in the same run: the same decisions at
`--baseline-devices` (1,000), and
the same decision made over one object per device, as the controller made it before it read the
telemetry into arrays: `policy.decide(problem_from_telemetry(telemetry))` (a `DeviceInput` and a
`ComputeProfile` per device, read back into arrays by the policy). The collector is paused for
both, as `decide` pauses it. Budgets: 100 ms, 1 s for the shared server. Then the parts of each
decision at `--devices`: reading the telemetry into arrays (`arrays_from_telemetry`), the
policy's choice over them (`choose`), and its choice with the plan (`decide`); and what reading the
server's reply into that input costs before the decision, as columns and as one object per device.

    python bench/decision.py [--devices 10000] [--baseline-devices 1000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ares.core.messages import SessionColumns, Telemetry, TelemetryColumns  # noqa: E402
from ares.core.optimiser import AresPolicy, SplitPolicy, StragglerPolicy  # noqa: E402
from ares.roles.simulate import DeviceGroup, SimConfig, Simulation  # noqa: E402
from ares.runtime import controller  # noqa: E402
from bench.simulate import median_s  # noqa: E402

BUDGET_S, SHARED_BUDGET_S = 0.100, 1.0
OFFER = tuple((c, k) for c in ("fp32", "fp16", "int8") for k in (1, 4))
CASES: dict[str, tuple[SplitPolicy, dict]] = {
    "straggler": (StragglerPolicy(), {}),
    "straggler + power modes": (StragglerPolicy(), {"power_modes": True}),
    "straggler + modes + 6 options": (StragglerPolicy(), {"power_modes": True, "offer": OFFER}),
    "straggler, shared server": (StragglerPolicy(share_server=True), {}),
    "ares": (AresPolicy(), {}),
}


def fleet_telemetry(n: int) -> TelemetryColumns:
    """The telemetry of n simulated devices after four rounds, with their last four sessions, as the
    controller receives it: columns, read back from their JSON (`fetch_columns`)."""
    sim = Simulation(SimConfig(rounds=4, power_modes=True, fleet=[
        DeviceGroup(count=n - n // 2), DeviceGroup(count=n // 2, profile="raspberry-pi")]), "straggler")
    for r in range(4):
        sim.step(r)
    t = sim._telemetry(4, sim.fleet.available.nonzero()[0])
    sessions = [(i, r, split, round_s) for i, (split, round_s) in enumerate(zip(t.split, t.round_s)) for r in range(1, 5)]
    t = t.model_copy(update={"sessions": SessionColumns(
        device=[i for i, *_ in sessions], round=[r for _, r, *_ in sessions], split=[v[2] for v in sessions],
        session_s=[v[3] * (1.02 + 0.01 * v[1]) for v in sessions], steps_s=[v[3] * 0.9 for v in sessions])})
    return TelemetryColumns.model_validate_json(t.model_dump_json())


def reading_ms(t: TelemetryColumns, repeats: int) -> dict[str, tuple[float, float]]:
    """(MB, median CPU ms) of reading the server's reply into the controller's input: as columns, and
    as one object per device (`Telemetry`, what `fetch_telemetry` returns)."""
    columns, rows = t.model_dump_json(), t.rows().model_dump_json()
    return {"columns": (len(columns) / 1e6, median_ms(lambda: TelemetryColumns.model_validate_json(columns), repeats)[1]),
            "one object per device": (len(rows) / 1e6, median_ms(lambda: Telemetry.model_validate_json(rows),
                                                                   max(3, repeats // 2))[1])}


def median_ms(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median wall ms, median CPU ms of this process) of `fn()`, after one run to warm up."""
    fn()
    wall, cpu = median_s(fn, repeats)
    return wall * 1e3, cpu * 1e3


def over_objects(t: Telemetry, policy: SplitPolicy, kw: dict) -> object:
    """The decision over one object per device, the collector paused as `decide` pauses it."""
    with controller._collector_paused():
        return policy.decide(controller.problem_from_telemetry(t, **kw))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--baseline-devices", type=int, default=1_000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    print(f"controller.decide(telemetry), median of {args.repeats}, wall / CPU ms; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    fleets = {n: fleet_telemetry(n) for n in (args.baseline_devices, args.devices)}
    for n, t in fleets.items():
        modes = Counter(m for m, c in zip(t.power_mode, t.device_class) if c == "jetson-nano")
        print(f"  {n} devices: {len(t.steps.device)} step samples, {len(t.sessions.device)} sessions; Jetsons by "
              f"power mode: {dict(modes)}", flush=True)
    times = {(name, n): median_ms(lambda: controller.decide(t, policy, **kw), args.repeats)
             for name, (policy, kw) in CASES.items() for n, t in fleets.items()}
    big = fleets[args.devices]
    objects = {name: median_ms(lambda: over_objects(big, policy, kw), max(3, args.repeats // 2))
               for name, (policy, kw) in CASES.items()}
    for name, (policy, kw) in CASES.items():  # the same plan both ways
        assert controller.decide(big, policy, **kw) == over_objects(big, policy, kw), name
    n, base = args.devices, args.baseline_devices
    print(f"\n{'decision':<31}{base:>7} devices{n:>8} devices   x budget (CPU)   {n}/{base}   arrays/objects "
          f"(objects: CPU ms)")
    for name in CASES:
        budget = SHARED_BUDGET_S if "shared" in name else BUDGET_S
        (bw, bc), (w, c), (_, oc) = times[(name, base)], times[(name, n)], objects[name]
        print(f"  {name:<29}{bw:6.1f} /{bc:6.1f}{w:7.1f} /{c:6.1f}   {c / (budget * 1e3):5.2f} of {budget * 1e3:4.0f} ms"
              f"   {c / bc:7.1f}x   {c / oc:6.2f} ({oc:.0f} ms)")
    if hasattr(controller, "arrays_from_telemetry"):  # the parts, where the decision is made over arrays
        print(f"\nof which, at {n} devices (CPU ms): reading the telemetry into arrays / the policy's choice over "
              f"them / its choice and plan")
        for name, (policy, kw) in CASES.items():
            with controller._collector_paused():
                arrays = controller.arrays_from_telemetry(big, **kw)
                parts = [median_ms(fn, args.repeats)[1] for fn in (
                    lambda: controller.arrays_from_telemetry(big, **kw), lambda: policy.choose(arrays),
                    lambda: policy.decide(arrays))]
            print(f"  {name:<29}{parts[0]:7.1f} /{parts[1]:6.1f} /{parts[2]:6.1f}")
    print(f"\nreading the server's reply at {n} devices (before the decision; CPU ms):")
    for form, (mb, ms) in reading_ms(big, args.repeats).items():
        print(f"  {form:<29}{mb:5.1f} MB  {ms:7.1f} ms")
    worst = max(times[(name, n)][1] for name in CASES if "shared" not in name)
    shared = times[("straggler, shared server", n)][1]
    print(f"slowest decision at {n} devices {worst:.1f} ms CPU ({'within' if worst < BUDGET_S * 1e3 else 'OVER'} "
          f"{BUDGET_S * 1e3:.0f} ms); shared server {shared:.1f} ms CPU "
          f"({'within' if shared < SHARED_BUDGET_S * 1e3 else 'OVER'} {SHARED_BUDGET_S:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
