"""An emulated IoT testbed on one machine: run a scenario under one policy, measure it, compare.

A scenario (`bench/scenarios/*.yaml`) names emulated devices (a published or derived compute
profile each, and a link), the training settings and a schedule of changes (link rates, Jetson
power modes) at round boundaries. `run_variant` runs it under one policy with the local runner:

- compute: every device process pads each layer's time to its emulated profile (`ares device
  --profile FILE`), so results do not depend on this machine's speed unless this machine is
  slower than the profile (the device logs say so; `slower_than_profile` lists those devices);
  a power-mode change rewrites that file, which the device re-reads at its next round start;
- links: as root, one network namespace per device, a veth pair to the server's namespace and
  `hostscripts/ares-shape` (tc htb), the script a real device uses; without root the device's
  in-process rate limit, labelled `inprocess` in every result.

Every variant then gets, per round, the oracle: the best round time over all split vectors
from the scenario's emulated profiles and link rates, with the server profile the run's own
telemetry measured (`oracle_round_time`); the same model's time and energy for the splits that
were used (so "x oracle" splits into the choice and the per-round overhead no split avoids:
FedAvg, evaluation, checkpoint, HTTP); and the controller's prediction for those splits
(`evaluate` over the telemetry at the start of that round) next to the measured time.
Timing changes at round r (links and power modes) hold from round r on; the adaptive policies
see them one round later (they decide from measurements), so `settle_rounds` after each change
are left out of a policy's "adapted" ratio to the oracle.

`compare` runs every variant of a scenario (what `ares bench` does): each variant's figures are
a `VariantResult`, the whole a `Comparison` (ares.roles.comparison), written as JSON.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ares.core.config import DataConfig, TrainingConfig
from ares.core.energy import power_model
from ares.core.costmodel import CODEC_BYTES, DeviceInput, Problem, evaluate, options_for
from ares.core.optimiser import oracle_round_time, parse_policy
from ares.core.profiles import (
    POWER_MODE_SLOWDOWN,
    PUBLISHED,
    ComputeProfile,
    ServerProfile,
    derive_power_mode,
)
from ares.core.rounds import RoundRecord, load_history
from ares.core.yamlfile import safe_load
from ares.roles.comparison import ComparedVariant, Comparison, LinkMode, RoundResult, VariantResult, VersusFL
from ares.roles.runconfig import DeviceSpec, LinkChange, RunConfig
from ares.roles.runner import Cluster, free_port, run, shielded, stop_on_signals
from ares.runtime.controller import (
    ASSUMED_POWER,
    fetch_status,
    fetch_telemetry,
    problem_from_telemetry,
)

log = logging.getLogger("ares.testbed")

SCENARIO_DIR = Path(__file__).resolve().parents[2] / "bench" / "scenarios"
SLOW_MACHINE_MARK = "slower than the emulated"  # what ares.runtime.device logs when it cannot keep up
DEFAULT_POLICIES = ("none", "fixed:1", "ares", "straggler", "straggler+fp16", "straggler+int8+pipe4", "straggler+auto")
CODECS = ("fp32", "fp16", "int8")
MAX_MICRO_BATCHES = 8
EVERY_OPTION = tuple((c, k) for c in CODECS for k in (1, 2, 4, 8))  # the reference oracle's choices
MBIT = 125_000.0  # bytes per second in one Mbit/s
WARMUP_ROUNDS = 1  # round 0 includes process start-up (imports, self-profiling): left out of the means


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EmulatedDevice(_Strict):
    name: str
    profile: str = Field(..., description="jetson-nano/MAXN | raspberry-pi | jetson-nano/<5W|custom1|custom3> "
                                          "(derived from MAXN) | a profile JSON path")
    up_mbps: float = Field(20.0, gt=0)
    down_mbps: Optional[float] = Field(None, gt=0, description="default: up_mbps")
    duplex: Literal["full", "half"] = Field("full", description="half: up and down share up_mbps (Wi-Fi; "
                                             "tc: one ifb queue for both directions)")

    @property
    def down(self) -> float:
        return self.down_mbps if self.down_mbps is not None else self.up_mbps


class Change(_Strict):
    """From round `round` on: a device's new link rates and/or Jetson power mode."""

    round: int = Field(..., ge=1)
    device: str
    up_mbps: Optional[float] = Field(None, gt=0)
    down_mbps: Optional[float] = Field(None, gt=0)
    power_mode: Optional[str] = None


class Scenario(_Strict):
    name: str
    description: str = ""
    model: str = "vgg5"
    training: TrainingConfig = TrainingConfig(rounds=8, max_steps_per_round=5)
    data: DataConfig = DataConfig(name="synthetic", synthetic_train=5000, synthetic_test=500)
    devices: list[EmulatedDevice] = Field(..., min_length=1)
    schedule: list[Change] = []
    policies: list[str] = list(DEFAULT_POLICIES)
    profile_scale: float = Field(1.0, gt=0, description="multiply every emulated time (tests run faster)")
    settle_rounds: int = Field(2, ge=0, description="rounds after a change before a policy counts as adapted")
    round_deadline_s: float = Field(600.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> "Scenario":
        names = {d.name for d in self.devices}
        for c in self.schedule:
            if c.device not in names:
                raise ValueError(f"schedule names device {c.device!r}; devices: {sorted(names)}")
            if c.round >= self.training.rounds:
                raise ValueError(f"schedule change at round {c.round} never happens: rounds are 0..{self.training.rounds - 1}")
            if c.power_mode is not None and c.power_mode not in POWER_MODE_SLOWDOWN:
                raise ValueError(f"power mode {c.power_mode!r} unknown; known: {', '.join(POWER_MODE_SLOWDOWN)}")
        for p in self.policies:
            variant_of(p)
        timeline(self)  # every profile resolves and every power-mode change can be derived
        return self


# ---- what every device looks like at every round: pure functions of the scenario ----------

@dataclass(frozen=True)
class DeviceState:
    """One device during one round: its emulated profile and its link."""

    profile: ComputeProfile
    up_mbps: float
    down_mbps: float
    duplex: str = "full"


def base_profile(ref: str) -> ComputeProfile:
    """A published profile, a Nano mode derived from MAXN, or a profile JSON file."""
    if ref in PUBLISHED:
        return PUBLISHED[ref]
    cls, _, mode = ref.partition("/")
    if cls == "jetson-nano" and mode in POWER_MODE_SLOWDOWN:
        return derive_power_mode(PUBLISHED["jetson-nano/MAXN"], mode)
    path = Path(ref)
    if not path.exists():
        derived = ", ".join(f"jetson-nano/{m}" for m in POWER_MODE_SLOWDOWN if m != "MAXN")
        raise ValueError(f"profile {ref!r} is neither a published key ({', '.join(PUBLISHED)}), "
                         f"a derived Nano mode ({derived}) nor a file")
    return ComputeProfile.load(path)


def timeline(scenario: Scenario) -> list[dict[str, DeviceState]]:
    """Each round's device states, with the scheduled changes applied from their round on."""
    scale = scenario.profile_scale
    state = {}
    for d in scenario.devices:
        profile = base_profile(d.profile)
        state[d.name] = DeviceState(profile.scaled(scale) if scale != 1 else profile, d.up_mbps, d.down, d.duplex)
    rounds = []
    for r in range(scenario.training.rounds):
        for c in (c for c in scenario.schedule if c.round == r):
            s = state[c.device]
            profile = derive_power_mode(s.profile, c.power_mode) if c.power_mode else s.profile
            up = c.up_mbps if c.up_mbps is not None else s.up_mbps
            down = c.down_mbps if c.down_mbps is not None else (c.up_mbps if c.up_mbps is not None else s.down_mbps)
            state[c.device] = DeviceState(profile, up, down, s.duplex)
        rounds.append(dict(state))
    return rounds


def adapted_rounds(scenario: Scenario) -> list[int]:
    """Rounds at least `settle_rounds` after the start and after the last change before them."""
    changes = sorted({0, *(c.round for c in scenario.schedule)})
    return [r for r in range(scenario.training.rounds)
            if r - max(c for c in changes if c <= r) >= scenario.settle_rounds]


@dataclass(frozen=True)
class Variant:
    """One way to run the scenario: a split mode, a policy, a wire codec and micro-batches per batch."""

    key: str  # as written in the scenario: none, fixed:1, ares, straggler, straggler+fp16, straggler+int8+pipe4
    mode: str
    policy: str
    codec: Literal["fp32", "fp16", "int8"]
    micro_batches: int = 1
    auto: bool = False  # the policy chooses each device's codec and micro-batches (EVERY_OPTION)
    power_modes: bool = False  # the policy chooses each Jetson's power mode (emulated: profile and power table)

    @property
    def label(self) -> str:
        base = {"none": "FL (none)"}.get(self.key.split("+")[0], self.key.split("+")[0])
        if self.mode.startswith("fixed:"):
            base = f"split learning ({self.mode})"
        modes = " + modes" if self.power_modes else ""
        if self.auto:
            return base + " + auto (codec, k)" + modes
        return base + (f" + {self.codec}" if self.codec != "fp32" else "") + (
            f" + pipe{self.micro_batches}" if self.micro_batches > 1 else "") + modes

    @property
    def folder(self) -> str:
        return self.key.replace(":", "-").replace("+", "-")

    @property
    def options(self) -> tuple[tuple[str, int], ...]:
        """The (codec, micro-batches) choices this variant's devices have, which its oracle gets too."""
        return EVERY_OPTION if self.auto else ((self.codec, self.micro_batches),)


def variant_of(key: str) -> Variant:
    """A policy (`none`, `fixed:N`, `ares`, `straggler`) and optional modifiers joined by `+`:
    a codec (`fp16` or `int8`; default fp32) and `pipeK` (K micro-batches per batch, 1..8); or
    `auto` (adaptive policies only): the policy chooses each device's codec and K; and, last,
    `modes` (adaptive policies only): the policy chooses each Jetson's power mode too."""
    base, *mods = key.split("+")
    if mods and mods[-1] == "modes":
        if base == "none" or base.startswith("fixed:"):
            raise ValueError(f"policy {key!r}: +modes goes after an adaptive policy (ares, straggler)")
        return replace(variant_of("+".join([base, *mods[:-1]])), key=key, power_modes=True)
    if "auto" in mods:
        if mods != ["auto"] or base == "none" or base.startswith("fixed:"):
            raise ValueError(f"policy {key!r}: +auto goes alone after an adaptive policy (ares+auto, straggler+auto)")
        parse_policy(base)
        return Variant(key, "adaptive", base, "fp32", 1, auto=True)
    codec, k = None, None
    for m in mods:
        if m in CODECS:
            if codec is not None:
                raise ValueError(f"policy {key!r}: two codecs ({codec}, {m}); give at most one")
            codec = m
        elif m.startswith("pipe") and m[4:].isdigit():
            if k is not None:
                raise ValueError(f"policy {key!r}: two pipe modifiers; give at most one")
            k = int(m[4:])
            if not 1 <= k <= MAX_MICRO_BATCHES:
                raise ValueError(f"policy {key!r}: pipe{k}: micro-batches must be within 1..{MAX_MICRO_BATCHES}")
        else:
            raise ValueError(f"policy {key!r}: modifier {m!r} not understood; after a policy may follow "
                             f"+fp16 or +int8 (the codec) and +pipeK (K micro-batches, 1..{MAX_MICRO_BATCHES}), "
                             "e.g. straggler+int8+pipe4; or +auto alone")
    parse_policy(base)
    codec, k = codec or "fp32", k or 1
    if base == "none" or base.startswith("fixed:"):
        return Variant(key, base, "straggler", codec, k)
    return Variant(key, "adaptive", base, codec, k)


# ---- links: network namespaces with tc, or the in-process limit ------------------------------

def link_mode(requested: str = "auto") -> LinkMode:
    """`tc` when asked or when root with ip and tc; else `inprocess`."""
    from ares.runtime.netns import NetnsError, require_tools

    if requested == "inprocess":
        return "inprocess"
    try:
        require_tools()
        return "tc"
    except NetnsError as exc:
        if requested == "tc":
            raise
        log.warning("links are emulated in-process (%s)", exc)
        return "inprocess"


def rate(mbps: Optional[float]) -> Optional[str]:
    """Mbit/s as an ares-shape rate (whole kbit, which the script's rate syntax accepts)."""
    return None if mbps is None else f"{max(1, round(mbps * 1000))}kbit"


def shape(ns, up_mbps: Optional[float], down_mbps: Optional[float]) -> None:
    """Cap a device namespace's link in Mbit/s each way (None lifts a cap), via hostscripts/ares-shape."""
    ns.shape(up=rate(up_mbps), down=rate(down_mbps))


@dataclass
class NetnsCluster(Cluster):
    """A local run whose devices live in network namespaces, each behind a tc-shaped veth link."""

    namespaces: dict = field(default_factory=dict)  # device name -> ares.runtime.netns.DeviceNamespace

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, ns in self.namespaces.items():
            self.device_prefix[name] = ns.exec_args([])
            self.server_host[name] = ns.plan.host_addr

    def start(self, host: str = "0.0.0.0") -> None:
        super().start(host="0.0.0.0")  # reachable from every namespace; each device uses its own veth address

    def set_link(self, device: str, up_mbps: Optional[float], down_mbps: Optional[float]) -> None:
        spec = next(s for s in self.specs if s.name == device)
        if spec.duplex == "half" and up_mbps is not None:
            self.namespaces[device].shape_shared(max(1, round(up_mbps * 1000)))
        else:
            shape(self.namespaces[device], up_mbps, down_mbps)


@contextlib.contextmanager
def namespaces(names: list[str], first_index: int = 0) -> Iterator[dict]:
    """One `DeviceNamespace` per device, indices first_index.., named after this process
    (`owner_tag`: ares-ns<i>-<tag>, ares-h<i>-<tag>, ...). Each is recorded for removal before it
    is made, and all are removed on exit, however it comes (a stop signal waits for the removal)."""
    from ares.runtime.netns import DeviceNamespace, owner_tag

    tag = owner_tag()
    made: dict = {}
    try:
        for i, n in enumerate(names):
            made[n] = ns = DeviceNamespace(first_index + i, owner=tag)
            with shielded():  # a stop signal lets the `ip` commands of one namespace finish
                ns.create()
        yield made
    finally:
        with shielded():
            for ns in made.values():
                ns.teardown()


# ---- running one variant --------------------------------------------------------------------

def run_config(scenario: Scenario, variant: Variant, results: Path, port: int = 0) -> RunConfig:
    first = timeline(scenario)[0]
    devices = [DeviceSpec(name=d.name, device_class=first[d.name].profile.device_class or "cpu",
                          power_mode=first[d.name].profile.power_mode,
                          profile=str(results / "emulated" / f"{d.name}.json"),
                          up_mbps=first[d.name].up_mbps, down_mbps=first[d.name].down_mbps, duplex=d.duplex)
               for d in scenario.devices]
    schedule = [LinkChange(round=r, device=name, up_mbps=s.up_mbps, down_mbps=s.down_mbps)
                for r, (before, now) in enumerate(zip(timeline(scenario), timeline(scenario)[1:]), start=1)
                for name, s in now.items() if (s.up_mbps, s.down_mbps) != (before[name].up_mbps, before[name].down_mbps)]
    return RunConfig(model=scenario.model, devices=devices, mode=variant.mode, policy=variant.policy,
                     data=scenario.data, training=scenario.training, codec=variant.codec,
                     micro_batches=variant.micro_batches, results_dir=str(results),
                     offer_codecs=list(CODECS) if variant.auto else [],
                     offer_micro_batches=sorted({k for _, k in EVERY_OPTION}) if variant.auto else [],
                     power_modes=variant.power_modes,
                     port=port, round_deadline_s=scenario.round_deadline_s, schedule=schedule)


def _write_profile(path: Path, profile: ComputeProfile) -> None:
    """Atomically: the device re-reads the file when its mtime changes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    profile.save(tmp)
    tmp.replace(path)


class _RoundHook:
    """Runs at every round change: keeps the telemetry, switches power modes at round boundaries.

    A power mode for round r is written once every device has joined round r-1: each device
    re-reads its profile right before it joins, so the new mode holds from round r exactly (a
    round too short for the runner to see is caught up at the next call, one round late).
    """

    def __init__(self, scenario: Scenario, profiles: Path):
        self.states = timeline(scenario)
        self.profiles = profiles
        self.written = {n: s.profile for n, s in self.states[0].items()}
        self.telemetry: dict[int, object] = {}
        self.deadline_s = scenario.round_deadline_s

    def __call__(self, cluster: Cluster, status) -> None:
        with contextlib.suppress(Exception):  # a failed read costs one prediction, never the run
            self.telemetry[status.round] = fetch_telemetry(cluster.url, cluster.controller_token)
        nxt = status.round + 1
        if status.phase == "finished" or nxt >= len(self.states):
            return
        changed = {n: s.profile for n, s in self.states[nxt].items() if s.profile != self.written[n]}
        if changed:
            self._wait_all_joined(cluster, status.round)
            for name, profile in changed.items():
                log.info("round %d: %s -> %s %s", nxt, name, profile.device_class, profile.power_mode)
                _write_profile(self.profiles / f"{name}.json", profile)
                self.written[name] = profile

    def _wait_all_joined(self, cluster: Cluster, round_index: int) -> None:
        deadline = time.monotonic() + self.deadline_s
        while time.monotonic() < deadline:
            try:
                s = fetch_status(cluster.url, cluster.controller_token)
            except Exception:
                s = None
            if s and (s.round != round_index or all(d.phase in ("training", "uploaded") for d in s.devices.values())):
                return
            time.sleep(0.05)


def run_variant(scenario: Scenario, variant: Variant, results: Path, links: LinkMode,
                netns: Optional[dict] = None, progress: bool = False) -> VariantResult:
    """Run the scenario under one variant; returns its measured and modelled rounds (also variant.json).
    A re-run replaces the variant's previous results (its folder is removed first: left there, its
    checkpoint would be resumed and its figures reported again)."""
    if results.exists():
        shutil.rmtree(results)
    results.mkdir(parents=True)
    states = timeline(scenario)
    for name, s in states[0].items():
        _write_profile(results / "emulated" / f"{name}.json", s.profile)
    cfg = run_config(scenario, variant, results, port=free_port())
    if links == "tc":
        cluster = NetnsCluster(cfg, results, cfg.port, namespaces=netns or {})
    else:
        cluster = Cluster(cfg, results, cfg.port)
    hook = _RoundHook(scenario, results / "emulated")
    summary = run(cfg, progress=progress, cluster=cluster, on_round=hook)
    (results / "telemetry.json").write_text(json.dumps({r: t.model_dump(mode="json") for r, t in hook.telemetry.items()}))
    return analyse_folder(scenario, variant, results, links, summary["wall_s"])


def analyse_folder(scenario: Scenario, variant: Variant, results: Path, links: LinkMode,
                   wall_s: Optional[float] = None) -> VariantResult:
    """A variant's numbers from what its run left on disk (state.json, telemetry.json, logs); writes variant.json."""
    from ares.core.messages import Telemetry

    history = load_history(results / "checkpoints" / "state.json")
    raw = json.loads((results / "telemetry.json").read_text())
    telemetry = {int(r): Telemetry.model_validate(t) for r, t in raw.items()}
    decisions = []
    if (results / "splits.csv").exists():
        with open(results / "splits.csv", newline="") as f:
            decisions = list(csv.DictReader(f))
    out = replace(analyse(scenario, variant, history, telemetry, links, decisions), wall_s=wall_s,
                  results_dir=str(results),
                  slower_than_profile=_slow_devices(results / "logs", [d.name for d in scenario.devices]))
    (results / "variant.json").write_text(json.dumps(out.as_json(), indent=2))
    return out


def _earlier_run(variant_json: Path) -> tuple[LinkMode, Optional[float]]:
    """The links and wall time of a variant's run, from the variant.json it left (a run that
    has none, or one from before they were kept: in-process links, no wall time)."""
    earlier = json.loads(variant_json.read_text()) if variant_json.exists() else {}
    return earlier.get("links", "inprocess"), earlier.get("wall_s")


def _slow_devices(logs: Path, names: list[str]) -> list[str]:
    return [n for n in names if (logs / f"{n}.log").exists() and SLOW_MACHINE_MARK in (logs / f"{n}.log").read_text()]


# ---- what a run means: oracle, prediction, ratios -------------------------------------------

def oracle_problem(states: dict[str, DeviceState], telemetry, iterations: dict[str, int],
                   options: Optional[Sequence[tuple[str, int]]] = None, links: LinkMode = "inprocess") -> Problem:
    """The scenario's truth for one round: emulated profiles and link rates, the measured server,
    and the (codec, micro-batches) `options` the devices may take (default: the run's own).
    A tc link gives only the payload share of its rate (`payload_share`)."""
    batch = telemetry.batch_size
    server = ServerProfile(fwd=tuple(telemetry.server_fwd), bwd=tuple(telemetry.server_bwd), batch_size=batch)
    if options is None:
        codec = telemetry.codec if telemetry.codec in CODEC_BYTES else "fp32"
        options = ((codec, getattr(telemetry, "micro_batches", 1)),)
    opts = tuple(o for c, k in options for o in options_for(telemetry.activation_numel, telemetry.weight_bytes,
                                                              batch, (c,), (k,)))
    latency = {d.name: d.latency_s or 0.0 for d in telemetry.devices}  # the environment's, as measured
    share = {n: payload_share(links, s.duplex) for n, s in states.items()}
    devices = tuple(DeviceInput(name=n, compute=s.profile.rescaled(batch), up_bps=s.up_mbps * MBIT * share[n],
                                down_bps=s.down_mbps * MBIT * share[n], power=_power(s.profile), iterations=iterations[n],
                                latency_s=latency.get(n, 0.0), duplex=s.duplex)
                    for n, s in states.items())
    return Problem(devices, server, opts[0].model, options=opts, codec=opts[0].codec)


def payload_share(links: LinkMode, duplex: str = "full") -> float:
    """What of a link's rate can carry data: a tc cap counts every frame's headers (no transport
    gets more than TCP's payload through it), and on a half-duplex one the ACKs of each
    direction's data share the rate too; an in-process cap paces the payload bytes alone."""
    from ares.runtime.netns import HALF_DUPLEX_ACK_SHARE, TCP_PAYLOAD_SHARE

    if links != "tc":
        return 1.0
    return TCP_PAYLOAD_SHARE * (1 - HALF_DUPLEX_ACK_SHARE if duplex == "half" else 1.0)


def _power(profile: ComputeProfile):
    """The table's power model; a custom profile's unknown class gets the controller's labelled guess."""
    try:
        return power_model(profile.device_class, profile.power_mode)
    except ValueError:
        return ASSUMED_POWER


def options_used(decisions: Sequence[dict], round_index: int) -> dict[str, tuple[str, int]]:
    """Each device's (codec, micro-batches) in a round: the controller's last decision made at or
    before it (splits.csv; a decision made as round r opens holds in round r), else the run's own."""
    used: dict[str, tuple[str, int]] = {}
    for d in decisions:
        if int(d["round"]) <= round_index and d.get("codec"):
            used[d["device"]] = (d["codec"], int(d["micro_batches"]))
    return used


def modes_used(decisions: Sequence[dict], round_index: int) -> dict[str, str]:
    """Each device's power mode in a round, where the controller chose one: its last decision made
    at or before the round (splits.csv), as `options_used`."""
    used: dict[str, str] = {}
    for d in decisions:
        if int(d["round"]) <= round_index and d.get("power_mode"):
            used[d["device"]] = d["power_mode"]
    return used


def in_modes(states: dict[str, DeviceState], modes: dict[str, str]) -> dict[str, DeviceState]:
    """The round's device states with each Jetson in the mode it ran in (its emulated profile derived)."""
    return {n: replace(s, profile=derive_power_mode(s.profile, modes[n]))
            if modes.get(n) and modes[n] != s.profile.power_mode and modes[n] in POWER_MODE_SLOWDOWN else s
            for n, s in states.items()}


def analyse(scenario: Scenario, variant: Variant, history: Sequence[RoundRecord], telemetry: dict[int, object],
            links: LinkMode, decisions: Sequence[dict] = ()) -> VariantResult:
    """Per round: measured time and energy, the oracle, the emulated truth and the controller's
    prediction for the splits (and codec, micro-batches) used; then their means (`steady`: from
    round WARMUP_ROUNDS on). The run's wall time, folder and slow devices are the caller's."""
    states = timeline(scenario)
    server = telemetry.get(max(telemetry)) if telemetry else None
    own = (variant.codec, variant.micro_batches)
    rounds = [_round_result(scenario, variant, h, states[h.round], server, telemetry.get(h.round), links, own,
                            options_used(decisions, h.round),
                            modes_used(decisions, h.round) if variant.power_modes else {})
              for h in history]
    adapted = [x for x in rounds if x.round in adapted_rounds(scenario)]
    changes = {c.round for c in scenario.schedule}
    steady = [x for x in rounds if x.round >= WARMUP_ROUNDS] or rounds
    predicted = [x for x in steady if x.predicted_s and x.round not in changes]
    device_errors: dict[str, list[float]] = {}
    for x in predicted:
        for n, p in x.device_predicted_s.items():
            m = x.device_measured_s.get(n)
            if m:
                device_errors.setdefault(n, []).append(abs(p - m) / m)
    return VariantResult(
        scenario=scenario.name, variant=variant.key, label=variant.label, mode=variant.mode,
        policy=variant.policy if variant.mode == "adaptive" else None, codec=variant.codec,
        micro_batches=variant.micro_batches, links=links,
        rounds=rounds,
        mean_round_s=_mean_of([x.measured_s for x in steady]),
        energy_per_round_j=_mean_of([x.energy_j for x in steady]),
        model_energy_per_round_j=_mean_of([x.model_energy_j for x in steady]),
        final_accuracy=rounds[-1].accuracy if rounds else None,
        oracle_round_s=_mean_of([x.oracle_s for x in steady]),
        model_round_s=_mean_of([x.model_s for x in steady]),
        adapted_rounds=[x.round for x in adapted],
        adapted_round_s=_mean_of([x.measured_s for x in adapted]),
        adapted_oracle_s=_mean_of([x.oracle_s for x in adapted]),
        adapted_oracle_any_s=_mean_of([x.oracle_any_s for x in adapted]),
        vs_oracle=_ratio(_mean_of([x.measured_s for x in adapted]), _mean_of([x.oracle_s for x in adapted])),
        choice_vs_oracle=_ratio(_mean_of([x.model_s for x in adapted]), _mean_of([x.oracle_s for x in adapted])),
        overhead_s=_diff(_mean_of([x.measured_s for x in steady]), _mean_of([x.model_s for x in steady])),
        prediction_error=(_mean(abs(x.predicted_s - x.measured_s) / x.measured_s for x in predicted)
                          if predicted else None),
        # each device's predicted session (join to upload) against the server's clock of it
        device_prediction_error={n: _mean(e) for n, e in device_errors.items()},
        worst_device_prediction_error=max((max(e) for e in device_errors.values()), default=None),
        power_modes=_mode_sequences(steady) if variant.power_modes else {},
        energy_sources=_energy_sources([h for h in history if h.round >= WARMUP_ROUNDS] or list(history)),
        slowed_overruns=[x.round for x in predicted if _slowed_overrun(x)] if variant.power_modes else [],
    )


def _slowed_overrun(x: RoundResult, over: float = 0.10) -> bool:
    """The round took over (1 + over)x its prediction, and its longest session was a device in a mode
    slower than its class's fastest that overran its own prediction by as much."""
    if not x.predicted_s or x.measured_s <= x.predicted_s * (1 + over) or not x.device_measured_s:
        return False
    name = max(x.device_measured_s, key=x.device_measured_s.__getitem__)
    mode, predicted = x.power_modes.get(name), x.device_predicted_s.get(name)
    slowed = mode in POWER_MODE_SLOWDOWN and POWER_MODE_SLOWDOWN[mode] > min(POWER_MODE_SLOWDOWN.values())
    return slowed and predicted is not None and x.device_measured_s[name] > predicted * (1 + over)


def _energy_sources(history: Sequence[RoundRecord]) -> dict[str, str]:
    """Per device, the source of its reported energy over the rounds ("mixed" where it changed)."""
    seen: dict[str, set[str]] = {}
    for h in history:
        for n, d in h.devices.items():
            if d.energy_j is not None:
                seen.setdefault(n, set()).add(d.energy_source)
    return {n: next(iter(v)) if len(v) == 1 else "mixed" for n, v in sorted(seen.items())}


def _mode_sequences(rounds: Sequence[RoundResult]) -> dict[str, str]:
    """Per device, the modes it ran in, in order, each once per run of rounds ("MAXN>custom3")."""
    seqs: dict[str, list[str]] = {}
    for x in rounds:
        for n, m in x.power_modes.items():
            if not seqs.get(n) or seqs[n][-1] != m:
                seqs.setdefault(n, []).append(m)
    return {n: ">".join(v) for n, v in seqs.items()}


def _round_result(scenario: Scenario, variant: Variant, h: RoundRecord, states: dict[str, DeviceState], server,
                  telemetry, links: LinkMode, own: tuple[str, int], decided: dict[str, tuple[str, int]],
                  modes: Optional[dict[str, str]] = None) -> RoundResult:
    """One round: what was measured, the oracle and the model for it (with the last telemetry's
    server), and the controller's prediction from the telemetry at its start (from round 1).
    A variant whose policy chooses power modes is modelled in the modes it ran in (`modes`)."""
    r = h.round
    modes = modes or {}
    states = in_modes(states, modes)
    splits = {n: d.split for n, d in h.devices.items()}
    options = {n: decided.get(n, own) for n in splits}
    steps = {n: (d.steps if (d := h.devices.get(n)) else 0) or scenario.training.max_steps_per_round or 1
             for n in states}
    energy = [d.energy_j for d in h.devices.values() if d.energy_j is not None]
    fixed_s = h.outside_sessions()
    predicted_s, device_predicted_s = (_predicted(telemetry, splits, variant, options, modes) if r > 0 else (None, {}))
    oracle_s = oracle_any_s = model_s = model_energy_j = oracle_model_s = None
    if server is not None:
        # the oracle's round: the best split vector's slowest device plus this round's measured
        # time outside every device's session (join skew, merge, evaluation), which no choice changes
        fixed = fixed_s or 0.0
        oracle_model_s = oracle_round_time(oracle_problem(states, server, steps, variant.options, links))
        oracle_s = oracle_model_s + fixed
        oracle_any_s = oracle_round_time(oracle_problem(states, server, steps, EVERY_OPTION, links)) + fixed
        if splits:
            used = evaluate(oracle_problem({n: states[n] for n in splits}, server, steps, variant.options,
                                           links), splits, options=options)
            model_s, model_energy_j = used.round_s + fixed, used.energy_round_j
    return RoundResult(
        round=r, measured_s=h.duration_s, accuracy=h.accuracy, missed=list(h.missed), splits=splits,
        energy_j=math.fsum(energy) if energy else None, oracle_s=oracle_s, oracle_any_s=oracle_any_s,
        model_s=model_s, model_energy_j=model_energy_j, fixed_s=fixed_s, oracle_model_s=oracle_model_s,
        options={n: f"{c}/k{k}" for n, (c, k) in options.items()}, predicted_s=predicted_s,
        power_modes={n: s.profile.power_mode for n, s in states.items() if s.profile.power_mode},
        device_predicted_s=device_predicted_s, device_measured_s=h.sessions())


def _mean_of(values: list[Optional[float]]) -> Optional[float]:
    """Mean of one column; None when a row lacks it (an unknown is not averaged away)."""
    return _mean(values) if values and all(v is not None for v in values) else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _diff(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a - b if a is not None and b is not None else None


def _predicted(telemetry, splits: dict[str, int], variant: Variant, options: dict[str, tuple[str, int]],
               modes: Optional[dict[str, str]] = None) -> tuple[Optional[float], dict[str, float]]:
    """The controller's model of the splits (and options, and power modes) used in a round, from the
    telemetry at its start: the round's time, and each device's session (join to upload). A mode
    switch happens before the device joins: in the round's time, not in its session."""
    if telemetry is None:
        return None, {}
    problem = problem_from_telemetry(telemetry, offer=variant.options, power_modes=variant.power_modes)
    if problem is None or {d.name for d in problem.devices} != set(splits):
        return None, {}  # a device not measured yet (no transfer seen): no prediction
    known = {d.name: m for d in problem.devices if (m := (modes or {}).get(d.name)) in d.mode_names}
    plan = evaluate(problem, splits, options=options, modes=known)
    switch = {d.name: d.switch_s for d in problem.devices}
    return plan.round_s + telemetry.round_overhead_s, {
        d.name: d.round_s - (switch[d.name] if d.switches_mode else 0.0) for d in plan.devices}


def _mean(values) -> float:
    values = list(values)
    return math.fsum(values) / len(values)


# ---- the whole comparison -------------------------------------------------------------------

def load_scenario(ref: str) -> Scenario:
    """A scenario file, or the name of one in bench/scenarios/."""
    path = Path(ref)
    if not path.exists():
        path = SCENARIO_DIR / f"{ref}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no scenario {ref!r}; known: {', '.join(known) or 'none'} (or give a file)")
    return Scenario.model_validate(safe_load(path.read_text()))


def compare(scenario: Scenario, out: Path, links: str = "auto", progress: bool = False,
            first_index: int = 0, on_variant=None) -> Comparison:
    """Every policy of the scenario, one after another, same seed and rounds; writes comparison.json.
    Stopped by a signal (`stop_on_signals`, in the main thread) at any moment, between two variants
    too, it ends every process and removes every namespace it made, then raises `Stopped`."""
    with stop_on_signals():
        mode = link_mode(links)
        out.mkdir(parents=True, exist_ok=True)
        variants = [variant_of(p) for p in scenario.policies]
        results = []
        with (namespaces([d.name for d in scenario.devices], first_index) if mode == "tc" else contextlib.nullcontext({})) as ns:
            for v in variants:
                log.info("scenario %s: running %s (%s links)", scenario.name, v.label, mode)
                results.append(run_variant(scenario, v, out / v.folder, mode, ns, progress))
                if on_variant:
                    on_variant(results[-1])
        return _report(scenario, out, mode, results)


def reanalyse(scenario: Scenario, out: Path) -> Comparison:
    """The comparison again from a finished comparison's folder, without running anything."""
    results = []
    for v in map(variant_of, scenario.policies):
        folder = out / v.folder
        if (folder / "telemetry.json").exists():
            links, wall_s = _earlier_run(folder / "variant.json")
            results.append(analyse_folder(scenario, v, folder, links, wall_s))
    if not results:
        raise FileNotFoundError(f"no finished runs of {scenario.name} under {out}")
    return _report(scenario, out, results[0].links, results)


def _report(scenario: Scenario, out: Path, links: LinkMode, results: list[VariantResult]) -> Comparison:
    report = Comparison(scenario, links, ratios(results))
    report.write(out / "comparison.json")
    return report


def ratios(results: list[VariantResult]) -> list[ComparedVariant]:
    """Each variant's round time, energy and accuracy as ratios to FL (`none`), where FL ran."""
    fl = next((r for r in results if r.mode == "none"), None)
    return [ComparedVariant(r, VersusFL(
        time_vs_fl=_ratio(r.mean_round_s, fl and fl.mean_round_s),
        energy_vs_fl=_ratio(r.energy_per_round_j, fl and fl.energy_per_round_j),
        model_energy_vs_fl=_ratio(r.model_energy_per_round_j, fl and fl.model_energy_per_round_j),
        accuracy_vs_fl=_ratio(r.final_accuracy, fl and fl.final_accuracy),
        accuracy_points_vs_fl=_points(r.final_accuracy, fl and fl.final_accuracy))) for r in results]


def _points(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """Accuracy difference in percentage points (a - b) x 100."""
    return (a - b) * 100 if a is not None and b is not None else None
