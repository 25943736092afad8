"""`ares bench SCENARIO`: the testbed comparison, one scenario under every policy, side by side.

Runs FL (`none`), classic split learning (one fixed split), the published `ares` policy,
`straggler`, `straggler` with fp16 activations and `straggler` with pipelined steps (fp32 and
int8), one after another with the same seed and rounds (`ares.roles.testbed`), then prints one
table: mean round time and device energy per round as ratios to FL, final accuracy and its
difference to FL in points; the oracle round time (best over all split vectors, with the same
codec and micro-batches as the variant) and each policy's ratio to it once adapted; the
controller's predicted vs measured round time.

A policy is `none`, `fixed:N`, `ares` or `straggler`, optionally followed by `+fp16` or `+int8`
(activations and gradients on the wire) and `+pipeK` (K micro-batches per batch, 1..8), in any
order: `straggler+int8+pipe4`.
Writes comparison.json, round_time.png and split_timeline.png next to each run's own folder.

Ctrl-C, SIGTERM or SIGHUP at any moment ends every process `ares bench` started and removes its
network namespaces and veths (ares-ns<i>-<tag>, ares-h<i>-<tag>: named after the `ares bench`
process) before it exits. After a SIGKILL, `ares bench --cleanup` removes what was left.
"""

# Names: the command is `ares bench`; in the code what it runs is the testbed *comparison*
# (ares.roles.testbed runs it, ares.roles.comparison holds its results, this module prints them),
# and "bench" means only the benchmark scripts under bench/.

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

from ares.roles.comparison import Comparison, VariantResult


def run(args: argparse.Namespace) -> int:
    from ares.roles.runner import stop_on_signals

    if args.cleanup:
        return cleanup()
    if not args.scenario:
        raise ValueError("a scenario is needed (or --cleanup)")
    with stop_on_signals():  # from here on a stop signal unwinds: what is started is ended
        return _compare(args)


def cleanup() -> int:
    """`ares bench --cleanup`: remove what runs killed without a chance to clean up (SIGKILL) left."""
    from ares.roles.runner import cleanup_orphans

    removed = cleanup_orphans()
    for pid in removed["processes"]:
        print(f"killed process {pid}")
    for name in removed["network"]:
        print(f"removed {name}")
    if not any(removed.values()):
        print("nothing left behind by an ARES run that has ended")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from ares.roles.testbed import load_scenario

    scenario = load_scenario(args.scenario)
    updates: dict[str, Any] = {}
    if args.policies:
        updates["policies"] = [p.strip() for p in args.policies.split(",") if p.strip()]
    if args.rounds is not None:
        updates["training"] = {**scenario.training.model_dump(), "rounds": args.rounds}
    if args.max_steps is not None:
        updates["training"] = {**updates.get("training", scenario.training.model_dump()), "max_steps_per_round": args.max_steps}
    if args.duplex:
        updates["devices"] = [{**d.model_dump(), "duplex": args.duplex} for d in scenario.devices]
        if args.duplex == "half":
            updates["name"] = f"{scenario.name}-half"
    if updates:
        scenario = type(scenario).model_validate({**scenario.model_dump(), **updates})
    out = Path(args.out or f"results/bench/{scenario.name}")
    from ares.roles.testbed import compare, reanalyse

    def progress(v: VariantResult) -> None:
        if not args.json:
            print(f"  {v.label}: mean round {v.mean_round_s:.2f} s, final accuracy {v.final_accuracy:.4f}", flush=True)

    if not args.json:
        print(f"scenario {scenario.name}: {len(scenario.devices)} devices, {scenario.training.rounds} rounds, "
              f"policies {', '.join(scenario.policies)}", flush=True)
    from ares.runtime.netns import NetnsError

    try:
        if args.reanalyse:
            report = reanalyse(scenario, out)
        else:
            report = compare(scenario, out, links=args.links, progress=False, first_index=args.ns_index, on_variant=progress)
    except NetnsError as exc:
        print(f"ares bench: {exc}; use --links inprocess to run without network namespaces", file=sys.stderr)
        return 2
    plot(report, out)
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print(table(report))
        print(f"results: {out}/comparison.json, {out}/round_time.png, {out}/split_timeline.png")
    return 0


def _f(value: Optional[float], fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(report: Comparison) -> str:
    """The comparison as plain text (one row per policy; ratios are measured side by side)."""
    links = {"tc": "tc htb in network namespaces", "inprocess": "IN-PROCESS rate limit (no root: not tc)"}[report.links]
    head = ["policy", "round s", "x FL", "J/round", "x FL", "model J x FL", "accuracy", "pts vs FL",
            "oracle s", "x oracle", "choice x oracle", "pred err", "worst dev err", "worst dev mean"]
    rows = [[v.label, _f(v.mean_round_s, ".2f"), _f(fl.time_vs_fl, ".3f"), _f(v.energy_per_round_j, ".1f"),
             _f(fl.energy_vs_fl, ".3f"), _f(fl.model_energy_vs_fl, ".3f"),
             "-" if v.final_accuracy is None else f"{v.final_accuracy * 100:.1f}%",
             _f(fl.accuracy_points_vs_fl, "+.1f"), _f(v.adapted_oracle_s, ".2f"), _f(v.vs_oracle, ".3f"),
             _f(v.choice_vs_oracle, ".3f"),
             "-" if v.prediction_error is None else f"{v.prediction_error * 100:.1f}%",
             "-" if v.worst_device_prediction_error is None else f"{v.worst_device_prediction_error * 100:.1f}%",
             "-" if not v.device_prediction_error else f"{max(v.device_prediction_error.values()) * 100:.1f}%"]
            for v, fl in ((c.result, c.vs_fl) for c in report.variants)]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [f"scenario {report.scenario.name}, links: {links}"]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [head, *rows]]
    results = [c.result for c in report.variants]
    adapted = results[0].adapted_rounds if results else []
    lines += [
        ("round s, J/round: measured means over rounds 1.. (round 0 includes process start-up); J/round is each "
         "device's power model x its measured compute and transfer times"),
        "model J: the same power models x the emulated profiles and link rates, for the splits each policy used",
        (f"oracle s, x oracle: over the adapted rounds {adapted}; oracle = best split vector from the emulated "
         "profiles and link rates (server as measured, same codec and micro-batches as the variant); "
         "choice x oracle: the splits used, in that model"),
        "accuracy: the global model's test accuracy after the last round; pts vs FL: minus FL's, in points",
        "pred err: the controller's predicted vs measured round time (telemetry at the round's start), mean |error|",
        "worst dev err: the same for each device's session (join to upload), the worst single device and round",
        "worst dev mean: each device's session error averaged over rounds, the worst device's",
        ("J/round of a variant with modes: each device's power table in the mode it ran in (emulated modes); "
         "a Jetson's measured energy where its sidecar reads an INA3221 (energy_source: measured)"),
    ]
    for v in results:
        sources = sorted(set(v.energy_sources.values()))
        if sources:
            lines.append(f"energy, {v.label}: " + (f"all {sources[0]}" if len(sources) == 1 else ", ".join(
                f"{n} {s}" for n, s in v.energy_sources.items())))
        if v.power_modes:
            lines.append(f"power modes chosen, {v.label}: " + ", ".join(f"{n} {m}" for n, m in v.power_modes.items()))
            lines.append(f"  rounds over 1.1x their prediction because a slowed device overran: "
                         f"{v.slowed_overruns or 'none'}")
    # FL's server never runs a split step, so its server profile is the start-up self-profile: left out
    best = [v.adapted_oracle_any_s for v in results if v.adapted_oracle_any_s and v.mode != "none"]
    if best:
        span = f"{min(best):.2f}" if max(best) - min(best) < 0.005 else f"{min(best):.2f}-{max(best):.2f}"
        lines.append(f"oracle over every codec (fp32, fp16, int8) and k in 1, 2, 4, 8 per device: {span} s per round "
                     "(the best any variant could reach in this model, with each split run's measured server)")
    for v in results:
        if v.slower_than_profile:
            lines.append(f"warning: {v.label}: this machine was slower than the emulated profile of "
                         f"{', '.join(v.slower_than_profile)}: those steps took the real time")
    return "\n".join(lines)


def plot(report: Comparison, out: Path) -> None:
    """round_time.png: measured round time per policy with the oracle; split_timeline.png: splits per device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [c.result for c in report.variants]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for v in variants:
        ax.plot([r.round for r in v.rounds], [r.measured_s for r in v.rounds], marker="o", label=v.label)
    ref = next((v for v in variants if v.codec == "fp32" and v.micro_batches == 1 and all(r.oracle_s for r in v.rounds)), None)
    if ref:
        ax.plot([r.round for r in ref.rounds], [r.oracle_s for r in ref.rounds], "k--", label="oracle (fp32)")
    ax.set(xlabel="round", ylabel="seconds", title=f"Round time, scenario {report.scenario.name} ({report.links} links)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "round_time.png", dpi=100)
    plt.close(fig)

    names = [d.name for d in report.scenario.devices]
    top = max((s for v in variants for r in v.rounds for s in r.splits.values()), default=0)
    fig, axes = plt.subplots(len(variants), 1, figsize=(9, 1.9 * len(variants) + 0.6), sharex=True, squeeze=False)
    for ax, v in zip(axes[:, 0], variants):
        for n in names:
            pts = [(r.round, r.splits[n]) for r in v.rounds if n in r.splits]
            ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", marker=".", label=n)
        ax.set(ylabel="split", title=v.label, ylim=(-0.4, top + 0.4), yticks=range(top + 1))
        ax.title.set_fontsize(9)
    axes[0, 0].legend(fontsize=7, ncol=len(names))
    axes[-1, 0].set_xlabel("round")
    fig.tight_layout()
    fig.savefig(out / "split_timeline.png", dpi=100)
    plt.close(fig)


def register(subparsers: Any) -> None:
    """Add `bench` to the `ares` command line."""
    p = subparsers.add_parser("bench", help="run a testbed scenario under every policy and compare",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", nargs="?",
                   help="paper5 | bandwidth-drop | power-mode-change | paper5-100mbit (bench/scenarios/) or a YAML file")
    p.add_argument("--policies", help="comma-separated, overrides the scenario's: none,fixed:1,ares,straggler,"
                                      "straggler+fp16,straggler+pipe4,straggler+int8+pipe4 (+fp16|+int8, +pipeK)")
    p.add_argument("--rounds", type=int, help="override the scenario's rounds")
    p.add_argument("--max-steps", type=int, help="override the scenario's max_steps_per_round")
    p.add_argument("--duplex", choices=["full", "half"],
                   help="every device's link: half = up and down share the rate (Wi-Fi); results under SCENARIO-half")
    p.add_argument("--links", choices=["auto", "tc", "inprocess"], default="auto",
                   help="tc: network namespaces + tc (root); inprocess: rate limit in the device; auto: tc when root")
    p.add_argument("--ns-index", type=int, default=0, help="first network namespace index (ares-ns<i>-<tag>)")
    p.add_argument("--out", help="results folder (default results/bench/SCENARIO)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.add_argument("--reanalyse", action="store_true", help="recompute the table and figures from --out; run nothing")
    p.add_argument("--cleanup", action="store_true",
                   help="run nothing: end the processes and remove the namespaces and veths that ARES runs which "
                        "are no longer running left behind (after a SIGKILL)")
    p.set_defaults(func=run)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ares bench")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except KeyboardInterrupt as exc:  # Stopped: everything it started has been ended
        return getattr(exc, "exit_code", 130)


if __name__ == "__main__":
    sys.exit(main())
