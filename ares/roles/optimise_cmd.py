"""`ares optimise`: the standalone optimiser (the published ARESopt), over a fleet file.

Reads a fleet description (YAML or JSON: model costs, server profile, devices with profiles,
links and power), runs one policy and prints each device's split with its predicted time and
energy per iteration and per round, as a table or as JSON (`--json`). Nothing is trained and
no network is touched: it answers "what would ARES choose for this fleet, and what would it
cost?" before any device is switched on.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator

from ares.core.energy import PowerModel, power_model
from ares.core.costmodel import CODEC_BYTES, DeviceInput, Plan, Problem, model_costs
from ares.core.optimiser import POLICY_NAMES, NonePolicy, parse_policy
from ares.core.profiles import ComputeProfile, ServerProfile
from ares.core.yamlfile import safe_load



class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PowerSpec(_Strict):
    """Explicit board power in watts, for devices the built-in table does not know."""

    compute_w: float = Field(ge=0)
    tx_w: float = Field(ge=0)
    rx_w: float = Field(ge=0)
    source: Literal["modelled", "measured"] = "modelled"


class DeviceSpec(_Strict):
    name: str = Field(min_length=1)
    profile: Union[str, dict[str, Any]]  # a JSON file (relative to the fleet file) or an inline profile
    device_class: Optional[str] = None  # default: the profile's
    power_mode: Optional[str] = None  # default: the profile's
    power: Optional[PowerSpec] = None  # default: the table entry for device_class/power_mode
    up_mbps: float = Field(gt=0)
    down_mbps: float = Field(gt=0)
    iterations: int = Field(ge=0)
    alpha: Optional[float] = Field(None, ge=0, le=1)
    pinned_split: Optional[StrictInt] = Field(None, ge=0)  # strict: YAML `true` is not split 1


class FleetSpec(_Strict):
    """A fleet file; model costs come from `model:` or from explicit lists, not both."""

    model: Optional[str] = None
    activation_numel: Optional[list[int]] = None
    weight_bytes: Optional[list[int]] = None
    batch_size: int = Field(100, ge=1)
    codec: Literal["fp32", "fp16", "int8"] = "fp32"
    server: Union[str, dict[str, Any]]
    devices: list[DeviceSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_model_source(self) -> "FleetSpec":
        explicit = self.activation_numel is not None or self.weight_bytes is not None
        if self.model and explicit:
            raise ValueError("give either `model:` or `activation_numel:` + `weight_bytes:`, not both")
        if not self.model and (self.activation_numel is None or self.weight_bytes is None):
            raise ValueError("model costs missing: give `model: vgg5` or both `activation_numel:` and `weight_bytes:`")
        return self


class FleetError(ValueError):
    """A fleet file or flag that cannot work; the message says what would."""


def load_fleet(path: Path) -> FleetSpec:
    try:
        data = safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise FleetError(f"cannot read fleet file {path}: {e}") from None
    try:
        return FleetSpec.model_validate(data)
    except ValidationError as e:
        raise FleetError(f"fleet file {path} is invalid:\n{e}") from None


def _model_lists(spec: FleetSpec) -> tuple[list[int], list[int]]:
    if not spec.model:
        return list(spec.activation_numel or []), list(spec.weight_bytes or [])
    try:
        from ares.core.models import activation_numel, weight_bytes  # imports torch: only when asked
    except ImportError as e:
        raise FleetError(f"`model: {spec.model}` needs ares.core.models (and torch), which failed to import: {e}; "
                         "give `activation_numel:` and `weight_bytes:` explicitly instead") from None
    try:
        return activation_numel(spec.model), weight_bytes(spec.model)
    except ValueError as e:
        raise FleetError(str(e)) from None


def _load_profile(cls: Any, ref: Union[str, dict[str, Any]], base: Path, what: str) -> Any:
    try:
        if isinstance(ref, str):
            path = (base / ref).resolve()
            return _load_file(cls, path, path.stat().st_mtime_ns)
        return cls.from_dict(ref)
    except (OSError, ValueError, TypeError) as e:
        raise FleetError(f"{what}: {e}") from None


@functools.lru_cache(maxsize=256)
def _load_file(cls: Any, path: Path, mtime_ns: int) -> Any:
    """A profile file shared by many devices is read once while unchanged (profiles are frozen)."""
    return cls.load(path)


def parse_overrides(values: list[str], names: list[str], flag: str) -> dict[str, float]:
    """`--up-mbps 5` (every device) or `--up-mbps NAME=5` (one device), later ones winning."""
    out: dict[str, float] = {}
    for value in values:
        target, _, number = value.rpartition("=")
        try:
            mbps = float(number)
        except ValueError:
            raise FleetError(f"{flag} {value!r}: expected MBPS or NAME=MBPS") from None
        if not mbps > 0:
            raise FleetError(f"{flag} {value!r}: Mbit/s must be > 0")
        if target and target not in names:
            raise FleetError(f"{flag} {value!r}: no device {target!r}; devices: {', '.join(names)}")
        out.update({n: mbps for n in ([target] if target else names)})
    return out


def build_problem(spec: FleetSpec, base: Path, up: dict[str, float] | None = None,
                  down: dict[str, float] | None = None) -> Problem:
    """The optimiser's input from a validated fleet file; profiles rescaled to its batch size."""
    up, down = up or {}, down or {}
    numel, weights = _model_lists(spec)
    try:
        costs = model_costs(numel, weights, spec.batch_size, codec_bytes=CODEC_BYTES[spec.codec])
        server = _load_profile(ServerProfile, spec.server, base, "server profile").rescaled(spec.batch_size)
        devices = []
        shared: dict[str, ComputeProfile] = {}  # a file named by many devices: resolved and rescaled once
        for d in spec.devices:
            profile = shared.get(d.profile) if isinstance(d.profile, str) else None
            if profile is None:
                profile = _load_profile(ComputeProfile, d.profile, base, f"device {d.name!r} profile")
                profile = profile.rescaled(spec.batch_size)
                if isinstance(d.profile, str):
                    shared[d.profile] = profile
            power = (PowerModel(**d.power.model_dump()) if d.power else
                     power_model(d.device_class if d.device_class is not None else profile.device_class,
                                 d.power_mode if d.power_mode is not None else profile.power_mode))
            devices.append(DeviceInput(
                name=d.name, compute=profile, power=power, iterations=d.iterations, alpha=d.alpha,
                pinned_split=d.pinned_split,
                up_bps=up.get(d.name, d.up_mbps) * 1e6 / 8, down_bps=down.get(d.name, d.down_mbps) * 1e6 / 8))
        return Problem(tuple(devices), server, costs)
    except FleetError:
        raise
    except ValueError as e:
        raise FleetError(str(e)) from None


def report(plan: Plan, baseline: Plan, problem: Problem) -> dict[str, Any]:
    """The plan plus inputs worth seeing next to it, as plain data (what --json prints)."""
    out = plan.as_dict()
    inputs = {d.name: d for d in problem.devices}
    for row in out["devices"]:
        d = inputs[row["name"]]
        row.update(up_mbps=d.up_bps * 8 / 1e6, down_mbps=d.down_bps * 8 / 1e6, profile_source=d.compute.source,
                   device_class=d.compute.device_class, power_mode=d.compute.power_mode)
    out["baseline_none"] = {"round_s": baseline.round_s, "energy_round_j": baseline.energy_round_j}
    return out


def _print_table(data: dict[str, Any]) -> None:
    headers = ["device", "class/mode", "split", "s/iter", "s/round", "J/iter", "J/round", "up/down Mbit/s", "source"]
    rows = [[d["name"], "/".join(x for x in (d["device_class"], d["power_mode"]) if x), str(d["split"]),
             f"{d['iteration_s']:.4f}", f"{d['round_s']:.2f}", f"{d['energy_iteration_j']:.4f}",
             f"{d['energy_round_j']:.1f}", f"{d['up_mbps']:g}/{d['down_mbps']:g}",
             f"{d['profile_source']}, energy {d['energy_source']}"] for d in data["devices"]]
    base = data["baseline_none"]
    footer = (f"policy {data['policy']}{' (server shared)' if data['server_shared'] else ''}: "
              f"round {data['round_s']:.2f} s, energy {data['energy_round_j']:.1f} J per round; "
              f"all on device (none): {base['round_s']:.2f} s, {base['energy_round_j']:.1f} J "
              f"({_change(data['round_s'], base['round_s'])} time, "
              f"{_change(data['energy_round_j'], base['energy_round_j'])} energy)")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
        for r in [headers, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        print(footer)
        return
    table = Table(*headers)
    for r in rows:
        table.add_row(*r)
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    console.print(footer, soft_wrap=True)


def _change(value: float, baseline: float) -> str:
    return f"{(value / baseline - 1) * 100:+.1f}%" if baseline else "n/a"


def run(args: argparse.Namespace) -> int:
    try:
        path = Path(args.fleet)
        spec = load_fleet(path)
        names = [d.name for d in spec.devices]
        up = parse_overrides(args.up_mbps or [], names, "--up-mbps")
        down = parse_overrides(args.down_mbps or [], names, "--down-mbps")
        problem = build_problem(spec, path.parent, up, down)
        policy = parse_policy(args.policy, args.alpha, share_server=args.share_server)  # refuses it off straggler
        plan = policy.decide(problem)
    except (FleetError, ValueError) as e:
        print(f"ares optimise: error: {e}", file=sys.stderr)
        return 2
    data = report(plan, NonePolicy().decide(problem), problem)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        _print_table(data)
    return 0


def register(subparsers: Any) -> None:
    """Add `optimise` to the `ares` command line."""
    p = subparsers.add_parser("optimise", help="choose split points for a fleet file and predict time and energy",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("fleet", help="fleet file (YAML or JSON), e.g. examples/fleet-paper5.yaml")
    p.add_argument("--policy", default="ares", help=f"one of {', '.join(POLICY_NAMES)} (default: ares)")
    p.add_argument("--alpha", type=float, default=None,
                   help="time weight 0..1 (energy sensitivity = 1 - alpha); default 0.5 for ares, 0 for straggler")
    p.add_argument("--share-server", action="store_true",
                   help="straggler: the server's compute is shared by every offloading device")
    p.add_argument("--up-mbps", action="append", metavar="[NAME=]MBPS",
                   help="override uplink Mbit/s for every device, or for NAME (repeatable)")
    p.add_argument("--down-mbps", action="append", metavar="[NAME=]MBPS",
                   help="override downlink Mbit/s for every device, or for NAME (repeatable)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ares optimise", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
