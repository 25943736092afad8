"""Host-control sidecar: make the device's power mode and uplink match its pod annotations.

The operator decides, the sidecar applies. It runs next to the trainer in a
device pod, polls the downwardAPI projection of the pod's annotations and, when
``ares.io/power-mode`` or ``ares.io/bandwidth`` changes, runs ``nvpmodel`` or the
``ares-shape``/``ares-unshape`` host scripts. A value it cannot apply is refused
with one log line and the last good setting stays. It also samples board power
into ``<state-dir>/power.json`` for the trainer and records what it applied in
``<state-dir>/hostctl.json``.

Power modes (ares.runtime.hostmode): the mode in force is asked of ``nvpmodel -q`` at start,
after every switch and every ``QUERY_EVERY_S``, so a mode changed by hand is reported too. A
switch waits while the trainer says it is inside a round (``--trainer-file``), never mid-round;
its duration is measured. A mode that could not be applied (refused, or nvpmodel failed) is
reported as ``power_mode_failure`` until a later switch succeeds: the trainer passes it on and
the controller plans for the mode in force.

Deciding (``plan``) is a pure function of the annotations, what was applied and
what the host offers; everything else here is I/O around it.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

from ares.runtime.hostmode import trainer_busy
from ares.runtime.hostscripts import hostscript
from ares.runtime.power import INA3221_PATH, Ina3221Source, PowerSampler, write_power_file

log = logging.getLogger("ares.sidecar")

ANN_POWER_MODE = "ares.io/power-mode"
ANN_BANDWIDTH = "ares.io/bandwidth"

#: Bandwidth before the first pass is unknown (a restarted sidecar may find a cap
#: left by its predecessor in the pod's network namespace), so the first pass
#: always shapes or unshapes.
UNKNOWN = "unknown"

#: Same rule as hostscripts/ares-shape: bit units only ("mbps" would be bytes in tc).
_RATE = re.compile(r"^[0-9]+(\.[0-9]+)?[kmgt]?bit$")
_ZERO_RATE = re.compile(r"^0+(\.0+)?[kmgt]?bit$")
_UNLIMITED = ("", "unlimited", "none")
_GO_QUOTED = re.compile(r'^"(?:[^"\\]|\\.)*"$')
_POWER_MODEL = re.compile(r"<\s*POWER_MODEL\s+ID=(\d+)\s+NAME=(\S+)\s*>")
_MODE_IN_FORCE = re.compile(r"^NV Power Mode:\s*(\S+)\s*$", re.MULTILINE)

#: A failed command is not retried with the same arguments sooner than this.
RETRY_AFTER_S = 30.0
#: How often a resolved server name is looked up again (Services can be recreated).
RESOLVE_EVERY_S = 30.0
#: hostctl.json keeps this many past actions.
HISTORY = 20
#: How often the mode in force is asked of nvpmodel again (it may be changed by hand).
QUERY_EVERY_S = 30.0


# --- decisions (pure) -------------------------------------------------------


@dataclass(frozen=True)
class SetPowerMode:
    name: str
    mode_id: int


@dataclass(frozen=True)
class Shape:
    rate: str
    server_ip: str


@dataclass(frozen=True)
class Unshape:
    pass


Action = Union[SetPowerMode, Shape, Unshape]


@dataclass(frozen=True)
class Refusal:
    annotation: str
    value: str
    reason: str


@dataclass(frozen=True)
class Applied:
    """What the sidecar last applied successfully."""

    power_mode: Optional[str] = None
    bandwidth: Optional[str] = UNKNOWN  # None: no cap
    server_ip: Optional[str] = None


@dataclass(frozen=True)
class HostFacts:
    """What this host offers, gathered once per pass by the I/O side."""

    power_modes: Mapping[str, int] = field(default_factory=dict)
    power_modes_problem: Optional[str] = None  # why power modes cannot be set at all
    server_ip: Optional[str] = None


@dataclass(frozen=True)
class Plan:
    actions: Tuple[Action, ...] = ()
    refusals: Tuple[Refusal, ...] = ()


def go_unquote(quoted: str) -> str:
    """Undo Go's strconv.Quote, as kubelet writes downwardAPI annotation values."""
    if not _GO_QUOTED.match(quoted):
        raise ValueError(f"not a quoted string: {quoted!r}")
    # Go's escapes (\n \t \" \\ \xNN \uNNNN \UNNNNNNNN) are a subset of Python's,
    # and the regex above admits nothing but one string literal.
    value = ast.literal_eval(quoted)
    if not isinstance(value, str):
        raise ValueError(f"not a string: {quoted!r}")
    return value


def parse_annotations(text: str) -> Dict[str, str]:
    """Parse ``key="value"`` lines; a line that does not parse is skipped."""
    result = {}
    for line in text.splitlines():
        key, sep, quoted = line.partition("=")
        if not sep or not key:
            continue
        try:
            result[key] = go_unquote(quoted)
        except (ValueError, SyntaxError):
            continue
    return result


def parse_nvpmodel_conf(text: str) -> Dict[str, int]:
    """Power-mode names to nvpmodel ids, from ``< POWER_MODEL ID=n NAME=x >`` lines."""
    return {name: int(mode_id) for mode_id, name in _POWER_MODEL.findall(text)}


def parse_nvpmodel_query(text: str) -> Optional[str]:
    """The mode in force from ``nvpmodel -q`` (its ``NV Power Mode: NAME`` line), or None."""
    found = _MODE_IN_FORCE.search(text)
    return found.group(1) if found else None


def normalize_bandwidth(value: str) -> Optional[str]:
    """``20Mbit`` -> ``20mbit``; empty/``unlimited`` -> None; ValueError when invalid."""
    rate = value.strip().lower()
    if rate in _UNLIMITED:
        return None
    if not _RATE.match(rate):
        raise ValueError("want a bit rate such as 20mbit, 5Mbit or 512kbit, or 'unlimited'")
    if _ZERO_RATE.match(rate):
        raise ValueError("a cap of zero would cut the device off; use 'unlimited' to lift it")
    return rate


def plan(annotations: Mapping[str, str], applied: Applied, facts: HostFacts) -> Plan:
    """The actions that bring the host to what the annotations ask, and what is refused."""
    actions: List[Action] = []
    refusals: List[Refusal] = []

    mode = annotations.get(ANN_POWER_MODE, "").strip()
    if mode and mode != applied.power_mode:
        if facts.power_modes_problem:
            refusals.append(Refusal(ANN_POWER_MODE, mode, facts.power_modes_problem))
        elif mode not in facts.power_modes:
            accepted = ", ".join(sorted(facts.power_modes, key=facts.power_modes.__getitem__))
            refusals.append(
                Refusal(ANN_POWER_MODE, mode, f"unknown power mode; accepted: {accepted}")
            )
        else:
            actions.append(SetPowerMode(mode, facts.power_modes[mode]))

    raw = annotations.get(ANN_BANDWIDTH, "")
    try:
        rate = normalize_bandwidth(raw)
    except ValueError as exc:
        refusals.append(Refusal(ANN_BANDWIDTH, raw, str(exc)))
    else:
        if rate is None:
            if applied.bandwidth is not None:
                actions.append(Unshape())
        elif facts.server_ip is None:
            refusals.append(
                Refusal(ANN_BANDWIDTH, raw, "no server address (--server unset or not resolvable)")
            )
        elif (rate, facts.server_ip) != (applied.bandwidth, applied.server_ip):
            actions.append(Shape(rate, facts.server_ip))
    return Plan(tuple(actions), tuple(refusals))


def after(applied: Applied, action: Action) -> Applied:
    """``applied`` once ``action`` has succeeded."""
    if isinstance(action, SetPowerMode):
        return replace(applied, power_mode=action.name)
    if isinstance(action, Shape):
        return replace(applied, bandwidth=action.rate, server_ip=action.server_ip)
    return replace(applied, bandwidth=None, server_ip=None)


# --- I/O ---------------------------------------------------------------------


def command_for(action: Action, args: argparse.Namespace) -> List[str]:
    if isinstance(action, SetPowerMode):
        return [args.nvpmodel, "-f", str(args.nvpmodel_conf), "-m", str(action.mode_id)]
    if isinstance(action, Shape):
        return [str(hostscript("ares-shape")), args.interface, action.server_ip, action.rate]
    return [str(hostscript("ares-unshape")), args.interface]


def describe(action: Action) -> Tuple[str, Optional[str]]:
    if isinstance(action, SetPowerMode):
        return "power_mode", action.name
    if isinstance(action, Shape):
        return "bandwidth", action.rate
    return "bandwidth", "unlimited"


def resolve(host: str) -> Optional[str]:
    """First IPv4 address of ``host`` (else IPv6), or None."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return None
    addresses = [info[4][0] for info in infos]
    ipv4 = [a for a in addresses if ":" not in a]
    return (ipv4 or addresses or [None])[0]


def load_power_modes(args: argparse.Namespace) -> Tuple[Dict[str, int], Optional[str]]:
    """(modes, problem): problem says why power modes cannot be set on this host."""
    if shutil.which(args.nvpmodel) is None:
        return {}, f"{args.nvpmodel} not found: power modes work only on a Jetson"
    try:
        modes = parse_nvpmodel_conf(Path(args.nvpmodel_conf).read_text())
    except OSError as exc:
        return {}, f"cannot read {args.nvpmodel_conf}: {exc.strerror}"
    if not modes:
        return {}, f"no POWER_MODEL entries in {args.nvpmodel_conf}"
    return modes, None


def write_json(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


class Agent:
    """Holds the sidecar's state between passes; ``step()`` is one pass."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.state_dir = Path(args.state_dir)
        self.applied = Applied()
        self.power_modes, self.power_modes_problem = load_power_modes(args)
        self.server_ip: Optional[str] = None
        self.resolved_at = -RESOLVE_EVERY_S
        self.failed: Dict[Action, float] = {}
        self.refusals: Tuple[Refusal, ...] = ()
        self.history: List[dict] = []
        self.annotations_missing = False
        self.power_source: Optional[str] = None
        self._last_report: Optional[dict] = None
        self.switching = False
        self.switch_s: Optional[float] = None
        self.mode_failure: Optional[dict] = None  # {"mode", "reason", "time"}: the last mode not applied
        self.queried_at = -math.inf
        self.deferred: Optional[str] = None  # a mode waiting for the trainer's round to end

    def query_mode(self) -> None:
        """Ask nvpmodel which mode is in force (at most every QUERY_EVERY_S unless forced by a switch)."""
        if self.power_modes_problem:
            return
        self.queried_at = time.monotonic()
        try:
            result = subprocess.run([self.args.nvpmodel, "-f", str(self.args.nvpmodel_conf), "-q"],
                                    capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("nvpmodel -q failed: %s", exc)
            return
        mode = parse_nvpmodel_query(result.stdout) if result.returncode == 0 else None
        if mode is None:
            log.warning("nvpmodel -q did not say the mode in force: %s", (result.stderr or result.stdout).strip()[-200:])
            return
        if mode != self.applied.power_mode:
            log.info("power mode in force: %s", mode)
            self.applied = replace(self.applied, power_mode=mode)

    def trainer_busy(self) -> bool:
        return bool(self.args.trainer_file) and trainer_busy(self.args.trainer_file)

    def facts(self) -> HostFacts:
        now = time.monotonic()
        if self.args.server and (self.server_ip is None or now - self.resolved_at >= RESOLVE_EVERY_S):
            self.server_ip = resolve(self.args.server) or self.server_ip
            self.resolved_at = now
        return HostFacts(self.power_modes, self.power_modes_problem, self.server_ip)

    def read_annotations(self) -> Optional[Dict[str, str]]:
        try:
            text = Path(self.args.annotations).read_text()
        except OSError as exc:
            if not self.annotations_missing:
                log.warning("cannot read %s (%s); keeping current settings",
                            self.args.annotations, exc.strerror)
            self.annotations_missing = True
            return None
        self.annotations_missing = False
        return parse_annotations(text)

    def step(self) -> None:
        if time.monotonic() - self.queried_at >= self.args.mode_query:
            self.query_mode()
        annotations = self.read_annotations()
        if annotations is not None:
            decided = plan(annotations, self.applied, self.facts())
            for refusal in decided.refusals:
                if refusal not in self.refusals:
                    log.warning("refused %s=%r: %s; keeping %s", refusal.annotation,
                                refusal.value, refusal.reason, self._current(refusal.annotation))
                    if refusal.annotation == ANN_POWER_MODE:
                        self.mode_failure = {"mode": refusal.value, "reason": refusal.reason, "time": time.time()}
            self.refusals = decided.refusals
            if not any(isinstance(a, SetPowerMode) for a in decided.actions):
                self.deferred = None  # nothing waits any more (the annotation went back)
            for action in decided.actions:
                if isinstance(action, SetPowerMode):
                    self.switch_mode(action)
                else:
                    self.execute(action)
        self.report()

    def switch_mode(self, action: SetPowerMode) -> None:
        """Switch between rounds only: not while the trainer is inside one. The flag `switching` is
        written before the trainer's is read again, so a round cannot start unseen (hostmode)."""
        failed_at = self.failed.get(action)
        if failed_at is not None and time.monotonic() - failed_at < RETRY_AFTER_S:
            self.deferred = None
            return  # failed moments ago: not again yet (reported as power_mode_failure)
        if self.trainer_busy():
            if self.deferred != action.name:
                log.info("power mode %s waits for the round under way to end", action.name)
                self.deferred = action.name
            return
        self.switching = True
        self.report()
        try:
            if self.trainer_busy():  # a round began meanwhile: the next gap
                return
            self.deferred = None
            started = time.monotonic()
            ok = self.execute(action)
            if ok:
                self.switch_s = time.monotonic() - started
                self.mode_failure = None
                self.query_mode()  # what nvpmodel says is in force now
            else:
                detail = self.history[-1]["detail"] if self.history else ""
                self.mode_failure = {"mode": action.name, "reason": f"nvpmodel failed: {detail}"[:500],
                                     "time": time.time()}
        finally:
            self.switching = False

    def _current(self, annotation: str) -> str:
        value = self.applied.power_mode if annotation == ANN_POWER_MODE else self.applied.bandwidth
        return "no setting" if value is None else f"last good value {value!r}"

    def execute(self, action: Action) -> bool:
        """Run one action; True when it succeeded."""
        failed_at = self.failed.get(action)
        if failed_at is not None and time.monotonic() - failed_at < RETRY_AFTER_S:
            return False
        what, value = describe(action)
        cmd = [what]
        try:
            cmd = command_for(action, self.args)  # may not find a host script
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            ok, detail = result.returncode == 0, (result.stderr or result.stdout).strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            ok, detail = False, str(exc)
        if ok:
            self.failed.pop(action, None)
            self.applied = after(self.applied, action)
            log.info("applied %s=%s (%s)", what, value, " ".join(cmd))
        else:
            self.failed[action] = time.monotonic()
            log.error("failed to apply %s=%s: %s: %s", what, value, " ".join(cmd), detail)
        entry = {"time": time.time(), "setting": what, "value": value, "ok": ok,
                 "command": cmd, "detail": detail[-500:]}
        self.history = (self.history + [entry])[-HISTORY:]
        return ok

    def report(self) -> None:
        """Write hostctl.json when something in it changed."""
        report = {
            "applied": asdict(self.applied),
            "refusals": [asdict(r) for r in self.refusals],
            "history": self.history,
            "power_source": self.power_source,
            "power_modes": self.power_modes,
            "power_modes_problem": self.power_modes_problem,
            "switching": self.switching,
            "pending": self.deferred,
            "switch_s": self.switch_s,
            "power_mode_failure": self.mode_failure,
        }
        if report != self._last_report:
            write_json(self.state_dir / "hostctl.json", dict(report, updated=time.time()))
            self._last_report = report


def start_power_sampler(agent: Agent) -> Optional[PowerSampler]:
    source = Ina3221Source(agent.args.power_path)
    try:
        source.read_mw()
    except (OSError, ValueError) as exc:
        log.info("no power monitor at %s (%s); power.json will not be written",
                    agent.args.power_path, exc)
        return None
    agent.power_source = source.name
    power_file = agent.state_dir / "power.json"
    log.info("sampling %s every %.2fs into %s", agent.args.power_path,
             agent.args.power_period, power_file)
    return PowerSampler(
        source, agent.args.power_period, on_sample=lambda r: write_power_file(power_file, r)
    ).start()


def run(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Path(args.state_dir).mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    agent = Agent(args)
    if agent.power_modes_problem:
        log.info("power modes disabled: %s", agent.power_modes_problem)
    sampler = start_power_sampler(agent)
    log.info("watching %s every %.2fs (interface %s, server %s)", args.annotations, args.poll,
             args.interface, args.server or "unset")
    try:
        while not stop.is_set():
            agent.step()
            stop.wait(args.poll if agent.deferred is None else min(args.poll, 0.05))  # a gap is short
    finally:
        if sampler is not None:
            sampler.stop()
    log.info("stopped")
    return 0


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotations", required=True, type=Path,
                        help="downwardAPI file with the pod's metadata.annotations")
    parser.add_argument("--interface", default="eth0", help="interface to shape (default: eth0)")
    parser.add_argument("--server", default=None,
                        help="server host name or address; traffic to it is capped")
    parser.add_argument("--nvpmodel", default="nvpmodel",
                        help="nvpmodel command (default: nvpmodel; absent off Jetson)")
    parser.add_argument("--nvpmodel-conf", default=Path("/etc/nvpmodel.conf"), type=Path,
                        help="nvpmodel.conf naming the power modes (default: /etc/nvpmodel.conf)")
    parser.add_argument("--power-path", default=INA3221_PATH, type=Path,
                        help=f"sysfs file with board power in mW (default: {INA3221_PATH})")
    parser.add_argument("--power-period", default=0.5, type=_positive,
                        help="seconds between power samples (default: 0.5)")
    parser.add_argument("--mode-query", default=QUERY_EVERY_S, type=_positive,
                        help=f"seconds between asking nvpmodel the mode in force (default: {QUERY_EVERY_S:g})")
    parser.add_argument("--trainer-file", default=None, type=Path,
                        help="the trainer's trainer.json: power modes switch only while it is not inside a round")
    parser.add_argument("--state-dir", required=True, type=Path,
                        help="shared folder for power.json and hostctl.json")
    parser.add_argument("--poll", default=1.0, type=_positive,
                        help="seconds between annotation checks (default: 1.0)")


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add the ``sidecar`` subcommand to the ``ares`` command line."""
    parser = subparsers.add_parser(
        "sidecar",
        help="apply power mode and bandwidth annotations on a device, sample board power",
        description=__doc__.split("\n\n")[0],
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ares-sidecar", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
