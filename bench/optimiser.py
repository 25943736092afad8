"""How long the optimiser takes to decide a large fleet: 10,000 devices x 7 splits in < 100 ms.

Builds a random fleet from the published Nano and Pi profiles (each device slowed or sped up
by a random factor, with its own links, power mode and iteration count), then times, for
every policy, `policy.choose(problem)` (the decision: one split per device, from the
problem's dataclasses) and `policy.decide(problem)` (the decision plus a full `Plan` of
10,000 `DevicePlan` objects with predicted costs). Prints medians of several runs, wall
clock and this process's CPU time (other work on a shared machine inflates the first), each
with its ratio to the budget.

`--modes`: the same fleet with every Jetson's other power modes in the decision (MAXN, 5W,
custom1, custom3; profiles derived from the one it runs in), first with the one fp32 option
(4 x 7 = 28 columns per Nano), then with six (codec, micro-batches) options (4 x 6 x 7 = 168);
each policy timed with and without the modes in the same run (the ratio is the modes' cost).

`--fleet-file`: `ares optimise` end to end on a generated fleet file of that many devices
(profiles from examples/profiles, random links and iteration counts): the YAML parse alone with
PyYAML's pure-Python `yaml.safe_load` and with the C loader the command uses, then the whole
command (read, validate, decide, print JSON to /dev/null).

Second part (`--local-run`): how good the predictions are. A short adaptive `ares run` with
three devices (one emulating the published Raspberry Pi); after each round the controller's
predicted round time for every device (splits.csv) is set against that device's session as the
server clocked it (join to accepted upload, state.json), and the error printed (goal: within 15%).

    python bench/optimiser.py [--devices 10000] [--repeats 7] [--modes] [--fleet-file] [--local-run]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ares.core.energy import power_model  # noqa: E402
from ares.core.costmodel import DeviceInput, Problem, model_costs, options_for, other_modes  # noqa: E402
from ares.core.optimiser import AresPolicy, FixedPolicy, NonePolicy, StragglerPolicy  # noqa: E402
from ares.core.profiles import PUBLISHED, ServerProfile, derive_power_mode  # noqa: E402
from ares.core.rounds import RoundRecord  # noqa: E402

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


def with_modes(problem: Problem, modes: bool, options: bool = True) -> Problem:
    """The fleet with every Jetson's other power modes when `modes`, and with six (codec, k)
    options when `options` (else the one fp32 option)."""
    from dataclasses import replace

    offered = options_for(VGG5_NUMEL, VGG5_WEIGHT_BYTES, 100, ("fp32", "fp16", "int8"), (1, 4)) if options else ()
    devices = tuple(replace(d, modes=other_modes(d.compute)) if modes else d for d in problem.devices)
    return Problem(devices, problem.server, problem.model, options=offered)


def modes_timing(n: int, repeats: int) -> float:
    """Each adaptive policy's decision with the Jetsons' modes against the same without them, with
    the job's one option and with six."""
    base = random_fleet(n)
    worst = 0.0
    for options in (False, True):
        plain, moded = with_modes(base, False, options), with_modes(base, True, options)
        print(f"with power modes: {n} devices, {moded.n_columns} columns ({moded.n_modes} modes x "
              f"{len(moded.options)} options x {moded.n_splits} splits) against {plain.n_columns} without modes")
        for policy in (AresPolicy(0.5), StragglerPolicy()):
            for what in ("choose", "decide"):
                without = median_seconds(lambda: getattr(policy, what)(plain), repeats)
                with_ = median_seconds(lambda: getattr(policy, what)(moded), repeats)
                if what == "choose":
                    worst = max(worst, with_[0])
                print(row(f"{policy.name} {what} modes", *with_) + f"   {with_[0] / without[0]:4.2f} x without modes")
        switched = sum(d.switches_mode for d in StragglerPolicy().decide(moded).devices)
        print(f"  straggler: {switched} of {n} devices switch mode")
    print(f"slowest decision (choose) with modes {worst * 1000:.1f} ms wall = {worst / BUDGET_S:.2f} x budget "
          f"({'within' if worst < BUDGET_S else 'OVER'} budget)")
    return worst


def slack_fleet(n: int, seed: int = 0) -> Problem:
    """One slow Pi pinned on the device sets a long round; n - 1 Pis on fast links all save energy
    by offloading to a fast server, even shared n ways (the shared-server search's worst case)."""
    rng = np.random.default_rng(seed)
    pi, pi_power = PUBLISHED["raspberry-pi"], power_model("raspberry-pi", "")
    devices = [DeviceInput("slow", pi.scaled(3.0), 1e6, 1e6, pi_power, 100, pinned_split=6)]
    devices += [DeviceInput(f"d{i}", pi.scaled(float(rng.uniform(0.8, 1.2))), 12.5e6, 12.5e6, pi_power, 100)
                for i in range(n - 1)]
    server = ServerProfile.from_cumulative(PUBLISHED["jetson-nano/MAXN"].scaled(0.001))
    return Problem(tuple(devices), server, model_costs(VGG5_NUMEL, VGG5_WEIGHT_BYTES, 100))


def median_seconds(fn, repeats: int) -> tuple[float, float]:
    """Median wall-clock and CPU seconds of `fn()`."""
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def row(label: str, wall: float, cpu: float) -> str:
    return (f"  {label:<20} wall {wall * 1000:7.1f} ms ({wall / BUDGET_S:4.2f} x budget)   "
            f"cpu {cpu * 1000:7.1f} ms ({cpu / BUDGET_S:4.2f} x budget)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--local-run", action="store_true", help="also: predicted vs measured round time")
    parser.add_argument("--fleet-file", action="store_true", help="only: `ares optimise` on a generated fleet file")
    parser.add_argument("--modes", action="store_true", help="only: the decision with the Jetsons' power modes")
    args = parser.parse_args()
    if args.modes:
        modes_timing(args.devices, args.repeats)
        return 0
    if args.fleet_file:
        fleet_file_timing(args.devices, args.repeats)
        return 0
    problem = random_fleet(args.devices)
    print(f"optimiser decision time, {args.devices} devices x {problem.n_splits} splits, "
          f"median of {args.repeats}, budget {BUDGET_S * 1000:.0f} ms; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    worst_choose = worst_decide = 0.0
    for policy in (AresPolicy(0.5), StragglerPolicy(), FixedPolicy(3), NonePolicy()):
        wall, cpu = median_seconds(lambda: policy.choose(problem), args.repeats)
        worst_choose = max(worst_choose, wall)
        print(row(f"{policy.name} choose", wall, cpu))
        wall, cpu = median_seconds(lambda: policy.decide(problem), args.repeats)
        worst_decide = max(worst_decide, wall)
        print(row(f"{policy.name} decide", wall, cpu))
    # The shared-server search is O(N^2 L) in the worst case: shown at a fleet size it is meant for.
    small = random_fleet(500)
    print(row("straggler shared/500", *median_seconds(lambda: StragglerPolicy(share_server=True).decide(small), 3)))
    for n in (500, 2000):  # the worst case: every device saves energy by offloading, so every count is tried
        slack = slack_fleet(n)
        print(row(f"shared, slack/{n}", *median_seconds(lambda: StragglerPolicy(share_server=True).decide(slack), 3)))
    for label, worst in (("decision (choose)", worst_choose), ("decision + plan (decide)", worst_decide)):
        print(f"slowest {label} at {args.devices} devices: {worst * 1000:.1f} ms wall = "
              f"{worst / BUDGET_S:.2f} x budget ({'within' if worst < BUDGET_S else 'OVER'} budget)")
    if args.local_run:
        predicted_vs_measured()
    return 0


def write_fleet_file(n: int, folder: Path, seed: int = 0) -> Path:
    """A fleet file of n devices over the shipped example profiles, as a user would write it."""
    import shutil

    import yaml

    rng = np.random.default_rng(seed)
    examples = Path(__file__).resolve().parents[1] / "examples"
    shutil.copytree(examples / "profiles", folder / "profiles", dirs_exist_ok=True)
    kinds = ["pi4", "nano-maxn", "nano-5w", "nano-custom1", "nano-custom3"]
    fleet = yaml.safe_load((examples / "fleet-paper5.yaml").read_text())
    fleet["devices"] = [{"name": f"d{i}", "profile": f"profiles/{kinds[k]}.json", "up_mbps": round(float(up), 2),
                         "down_mbps": round(float(down), 2), "iterations": int(it)}
                        for i, (k, up, down, it) in enumerate(zip(rng.integers(0, len(kinds), n), rng.uniform(1, 50, n),
                                                                  rng.uniform(1, 50, n), rng.integers(20, 200, n)))]
    path = folder / f"fleet-{n}.yaml"
    path.write_text(yaml.safe_dump(fleet, sort_keys=False))
    return path


def fleet_file_timing(n: int, repeats: int) -> None:
    import contextlib
    import tempfile

    import yaml

    from ares.core.yamlfile import SAFE_LOADER, safe_load
    from ares.roles import optimise_cmd

    with tempfile.TemporaryDirectory() as tmp:
        path = write_fleet_file(n, Path(tmp))
        text = path.read_text()
        print(f"`ares optimise` on a generated fleet file: {n} devices, {len(text) / 1e6:.2f} MB of YAML, "
              f"median of {repeats}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        def seconds(label: str, wall_cpu: tuple[float, float]) -> None:  # no budget here: a file, not a decision
            print(f"  {label:<28} wall {wall_cpu[0] * 1000:7.0f} ms   cpu {wall_cpu[1] * 1000:7.0f} ms")

        python = median_seconds(lambda: yaml.safe_load(text), repeats)
        c = median_seconds(lambda: safe_load(text), repeats)
        seconds("parse: yaml.safe_load", python)
        seconds(f"parse: {SAFE_LOADER.__name__}", c)
        print(f"  C loader: {python[0] / c[0]:.1f}x faster (wall)")

        def command() -> None:
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
                assert optimise_cmd.main([str(path), "--policy", "straggler", "--json"]) == 0

        seconds("ares optimise, whole", median_seconds(command, repeats))


def predicted_vs_measured(rounds: int = 6) -> None:
    import csv
    import tempfile

    from ares.core.config import DataConfig, TrainingConfig
    from ares.roles.runconfig import DeviceSpec, RunConfig
    from ares.roles.runner import run

    out = Path(tempfile.mkdtemp()) / "results"
    cfg = RunConfig(devices=[DeviceSpec(name="pi", profile="raspberry-pi"), DeviceSpec(name="cpu-a"),
                             DeviceSpec(name="cpu-b", up_mbps=40, down_mbps=40)],
                    mode="adaptive", policy="straggler", results_dir=str(out),
                    data=DataConfig(name="synthetic", synthetic_train=1500, synthetic_test=200),
                    training=TrainingConfig(rounds=rounds, batch_size=50, max_steps_per_round=4))
    run(cfg, progress=False)
    # the device's session by the server's clock, join to accepted upload: what the model predicts
    # (devices.csv's round_s leaves out the weights' download and upload)
    from ares.core.rounds import load_history

    history = load_history(out / "checkpoints" / "state.json")
    measured = {(h.round, name): s for h in history for name, s in h.sessions().items()}
    with open(out / "splits.csv") as f:
        predicted = {(int(r["round"]), r["device"]): float(r["predicted_round_s"]) for r in csv.DictReader(f)}
    errors: dict[str, list[float]] = {}
    print(f"predicted vs measured round time, local run ({out.parent}; load average {os.getloadavg()[0]:.1f}):")
    for key in sorted(predicted):
        if key in measured:
            err = abs(predicted[key] - measured[key]) / measured[key]
            errors.setdefault(key[1], []).append(err)
            print(f"  round {key[0]} {key[1]:<6} predicted {predicted[key]:6.2f} s  measured {measured[key]:6.2f} s  "
                  f"error {err:6.1%}")
    if errors:
        every = [e for v in errors.values() for e in v]
        print("per device, mean error: " + ", ".join(f"{n} {statistics.fmean(v):.1%}" for n, v in sorted(errors.items()))
              + f" (goal: within 15%); median of all {statistics.median(every):.1%}, worst single round {max(every):.1%}")
        print("noise floor, each device's sessions at one split against their own mean (no model can do better "
              "on average): " + ", ".join(f"{n} {v:.1%}" for n, v in sorted(spread(history).items())))


def spread(history: list[RoundRecord]) -> dict[str, float]:
    """Per device, the mean |session - mean of its sessions at the same split| / session, rounds >= 1."""
    groups: dict[tuple[str, int], list[float]] = {}
    for h in history:
        if h.round >= 1:
            for name, s in h.sessions().items():
                groups.setdefault((name, h.devices[name].split), []).append(s)
    out: dict[str, list[float]] = {}
    for (name, _), values in groups.items():
        mean = statistics.fmean(values)
        out.setdefault(name, []).extend(abs(v - mean) / v for v in values)
    return {n: statistics.fmean(v) for n, v in out.items()}


if __name__ == "__main__":
    sys.exit(main())
