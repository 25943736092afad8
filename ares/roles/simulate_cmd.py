"""`ares simulate`: thousands of devices in virtual time, every decision by the real controller.

Compute, links, the server's sharing, noise and availability are modelled; the split (and power
mode) decisions are `ares.runtime.controller.decide` with a real policy, on the telemetry the
simulated devices would report (`ares.roles.simulate` says exactly what is modelled). Writes
summary.json, rounds.json (per policy, per round), prediction_error.json (per policy, per device),
round_time.png and prediction_error.png to the results folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def run(args: argparse.Namespace) -> int:
    from ares.roles.simulate import DeviceGroup, SimConfig, format_summary, load_config, run_policies

    cfg = load_config(args.config) if args.config else SimConfig()
    updates: dict[str, Any] = {}
    if args.devices is not None:
        updates["fleet"] = [DeviceGroup(count=max(1, args.devices - args.devices // 2)),
                            DeviceGroup(count=args.devices // 2, profile="raspberry-pi")] if args.devices > 1 else [
            DeviceGroup(count=1)]
    for key in ("rounds", "seed", "shards"):
        if getattr(args, key) is not None:
            updates[key] = getattr(args, key)
    if args.policies:
        updates["policies"] = [p.strip() for p in args.policies.split(",") if p.strip()]
    if args.share_server:
        updates["share_server"] = True
    if args.power_modes:
        updates["power_modes"] = True
    if updates:
        cfg = SimConfig.model_validate({**cfg.model_dump(), **{k: v for k, v in updates.items() if k != "fleet"},
                                        **({"fleet": [g.model_dump() for g in updates["fleet"]]} if "fleet" in updates else {})})
    out = Path(args.out)
    n = sum(g.count for g in cfg.fleet)
    print(f"simulating {n} devices x {cfg.rounds} rounds, policies {', '.join(cfg.policies)}, seed {cfg.seed}"
          + (f", {cfg.shards} server shards" if cfg.shards else ""), flush=True)
    summary = run_policies(cfg, out, progress=None if args.quiet else (lambda line: print(line, flush=True)))
    print(json.dumps(summary["policies"], indent=2) if args.json else format_summary(summary))
    print(f"results in {out}")
    return 0


def register(subparsers: Any) -> None:
    """Add `simulate` to the `ares` command line."""
    p = subparsers.add_parser("simulate", help="a fleet in virtual time, decisions by the real controller",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="simulation YAML/JSON (fleet, noise, events, FedScale traces; docs: the simulator)")
    p.add_argument("--devices", type=int, help="a fleet of this many: half published Nanos (MAXN), half Pis")
    p.add_argument("--rounds", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--shards", type=int, help="server shards, each shared by its offloading devices (0: none)")
    p.add_argument("--policies", help="comma-separated: straggler,ares,none,fixed:N")
    p.add_argument("--share-server", action="store_true", help="the straggler policy models the shared server")
    p.add_argument("--power-modes", action="store_true", help="the controller may choose the Jetsons' power modes")
    p.add_argument("--out", default="results/simulate", help="results folder (default results/simulate)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)
