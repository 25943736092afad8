"""`ares run`: the whole system on one machine.

It starts the edge server and one process per device (the same `ares server` / `ares device`
commands the pods run), runs the controller loop after every round (adaptive mode) writing
split files where the operator would write pod annotations, applies scheduled link changes,
shows live progress, and writes a results folder:

    rounds.csv     round, accuracy, loss, duration, which devices missed it
    devices.csv    per round and device: split, steps, samples, round time, throughput, energy
    splits.csv     every split decision: when, for which device, predicted round time
    summary.json   the config, final accuracy, mean round time, per-device energy
    run.png        accuracy and round time per round
    logs/          server and device logs

Stopping. The process that calls `run` owns every child it starts, and they end with it however it
stops: inside `stop_on_signals` SIGTERM, SIGINT and SIGHUP raise `Stopped`, so the run unwinds
through its `finally` blocks; a child is recorded in the same step that starts it (`shielded`: a
stop signal waits until both are done), and `Cluster.stop` ends every child's process group,
devices first, then anything else that carries the cluster's ARES_OWNER marker. Each child also
gets SIGTERM from the kernel if this process dies without unwinding (SIGKILL: PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import itertools
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import yaml

from ares.core.config import CONTROLLER_TOKEN_NAME, ServerConfig
from ares.core.optimiser import parse_policy
from ares.core.profiles import PUBLISHED, ComputeProfile
from ares.core.rounds import RoundRecord, load_history
from ares.roles.runconfig import DeviceSpec, LinkChange, RunConfig
from ares.runtime.controller import Controller, FileSplitSink, fetch_columns, fetch_status
from ares.runtime.netns import owner_alive, owner_tag
from ares.runtime.splitfile import write_split
from ares.runtime.tlsclient import ClientTls, transport

log = logging.getLogger("ares.run")


# ---- stopping: one owner of every child, however the run ends --------------------------------

OWNER_ENV = "ARES_OWNER"  # in every child's environment, "<owner tag>.<cluster>.<random>"; theirs inherit it
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1
# A stopped run's processes have this long to exit before their groups get SIGKILL (a normal end
# gives 10 s): a server caught starting up ends only once its worker has imported torch.
STOPPING_GRACE_S = 3.0


class Stopped(KeyboardInterrupt):
    """A stop signal as an exception, so the run unwinds through every `finally`. A KeyboardInterrupt
    (what lets Ctrl-C through lets it through); never an Exception, so no `except Exception` can
    keep a stopping run going."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """128 + the signal, as a shell reports a process the signal ended."""
        return 128 + self.signum


class _StopState:
    installed = False
    shield = 0  # depth of `shielded` blocks
    pending: Optional[int] = None  # a signal that came inside one
    stopping = False  # Stopped was raised: later signals change nothing


_stop = _StopState()


def _on_signal(signum: int, frame: object) -> None:
    if _stop.stopping:
        return  # already unwinding: a second Ctrl-C must not cut the cleanup short
    if _stop.shield:
        _stop.pending = signum
        return
    _stop.stopping = True
    raise Stopped(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While inside: SIGTERM, SIGINT and SIGHUP raise `Stopped` in the main thread (inside a
    `shielded` block, when it ends); a signal ignored on entry (nohup) stays ignored. Nested uses,
    and uses outside the main thread, change nothing."""
    if _stop.installed or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, _on_signal)
    _stop.installed, _stop.stopping, _stop.pending = True, False, None
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        _stop.installed, _stop.stopping, _stop.pending = False, False, None


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """A stop signal that arrives inside waits until the block is done, then raises `Stopped`:
    a child is never started without being recorded, a stop is never left half done."""
    _stop.shield += 1
    try:
        yield
    finally:
        _stop.shield -= 1
        if not _stop.shield and _stop.pending is not None and not _stop.stopping:
            signum, _stop.pending = _stop.pending, None
            _stop.stopping = True
            raise Stopped(signum)


def _die_with_parent() -> Optional[Callable[[], None]]:
    """A preexec_fn: the child gets SIGTERM when the thread that started it ends, SIGKILL included
    (Linux PR_SET_PDEATHSIG; None elsewhere). It survives `ip netns exec`, which execs in place."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    term = int(signal.SIGTERM)

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, term)
        if os.getppid() != parent:  # the parent died before prctl: no signal will come
            os._exit(1)

    return preexec


def _environ_marker(pid: int) -> Optional[str]:
    """The ARES_OWNER value in a process's environment (as it started), if any."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
    except OSError:
        return None
    key = OWNER_ENV.encode() + b"="
    for item in env.split(b"\0"):
        if item.startswith(key):
            return item[len(key):].decode(errors="replace")
    return None


def marked_processes(match: Callable[[int, str], bool]) -> list[int]:
    """Pids whose ARES_OWNER marker satisfies `match(pid, marker)` (this process excluded); empty
    off Linux."""
    me = os.getpid()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
    return [pid for pid in pids if pid != me and (m := _environ_marker(pid)) is not None and match(pid, m)]


def kill_marked(match: Callable[[int, str], bool], timeout_s: float = 5.0) -> list[int]:
    """SIGKILL every process whose marker satisfies `match(pid, marker)` and wait (up to
    `timeout_s`) until none is left; returns their pids."""
    pids = marked_processes(match)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while pids and time.monotonic() < deadline:
        if not marked_processes(match):  # a zombie's environment reads empty: it no longer counts
            break
        time.sleep(0.05)
    return pids


def _net_namespace(path: str) -> Optional[int]:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _our_networks() -> set[int]:
    """This process's network namespace and the ARES ones named under /run/netns: where the
    processes of a run whose lease this process can see live (an owner's lease is in its own
    network namespace, so a run in a container with a network of its own is never looked at)."""
    try:
        names = [n for n in os.listdir("/run/netns") if n.startswith("ares-")]
    except OSError:
        names = []
    found = {_net_namespace("/proc/self/ns/net"), *(_net_namespace(f"/run/netns/{n}") for n in names)}
    return {ino for ino in found if ino is not None}


def cleanup_orphans() -> dict[str, list]:
    """What runs that ended without unwinding (SIGKILL) left: processes carrying the marker of an
    owner that is gone (killed) and, as root with iproute2, network namespaces and veths named
    after such an owner (removed). Nothing of a running run, and nothing else on the host."""
    from ares.runtime.netns import NetnsError, remove_orphans

    networks = _our_networks()

    def orphan(pid: int, marker: str) -> bool:
        return (_net_namespace(f"/proc/{pid}/ns/net") in networks
                and not owner_alive(marker.split(".", 1)[0]))

    out: dict[str, list] = {"processes": kill_marked(orphan), "network": []}
    try:
        out["network"] = remove_orphans()
    except NetnsError as exc:
        log.info("network namespaces not looked at: %s", exc)
    return out


_clusters = itertools.count(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_profile(ref: str, base: Path) -> Path:
    """A profile path, or a published key (jetson-nano/MAXN) written out as a file."""
    if ref in PUBLISHED:
        out = base / f"{ref.replace('/', '-')}.json"
        PUBLISHED[ref].save(out)
        return out
    path = Path(ref)
    if not path.exists():
        raise FileNotFoundError(f"profile {ref!r} is neither a file nor a published key ({', '.join(PUBLISHED)})")
    ComputeProfile.load(path)  # fail early on a bad file
    return path


@dataclass
class Cluster:
    """The processes of one local run, and where their files live."""

    cfg: RunConfig
    root: Path
    port: int
    url: str = ""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    controller_token: str = ""
    layers: int = 0
    command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "ares"])
    device_prefix: dict[str, list[str]] = field(default_factory=dict)  # e.g. ip netns exec NS
    server_host: dict[str, str] = field(default_factory=dict)           # device -> address of the server
    client_tls: Optional[ClientTls] = None  # set by start() when cfg.tls: trust the run's throwaway CA
    marker: str = ""  # ARES_OWNER of its children: this process's owner tag, the cluster's number, a nonce

    def __post_init__(self) -> None:
        from ares.core.models import build_model, n_layers  # torch: not for `ares bench --cleanup`

        self.marker = self.marker or f"{owner_tag()}.{next(_clusters)}.{secrets.token_hex(3)}"
        self.url = f"{'https' if self.cfg.tls else 'http'}://127.0.0.1:{self.port}"
        self.layers = n_layers(build_model(self.cfg.model, seed=None))
        for sub in ("tokens", "splits", "links", "logs", "checkpoints", "profiles"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @property
    def specs(self) -> list[DeviceSpec]:
        return self.cfg.device_specs()

    def server_config(self, host: str = "127.0.0.1") -> ServerConfig:
        c = self.cfg
        return ServerConfig(model=c.model, data=c.data, training=c.training, devices=tuple(s.name for s in self.specs),
                            tokens_dir=str(self.root / "tokens"), codec=c.codec, micro_batches=c.micro_batches, round_deadline_s=c.round_deadline_s,
                            checkpoint_dir=str(self.root / "checkpoints"), host=host, port=self.port,
                            http_server=c.http_server)

    def initial_split(self, spec: DeviceSpec) -> int:
        mode = self.cfg.mode
        if spec.pinned_split is not None:
            return spec.pinned_split
        if mode == "none":
            return self.layers - 1
        if mode.startswith("fixed:"):
            return int(mode[6:])
        return spec.initial_split if spec.initial_split is not None else self.layers // 2

    def start(self, host: str = "127.0.0.1") -> None:
        for spec in self.specs:
            (self.root / "tokens" / spec.name).write_text(secrets.token_urlsafe(24))
            write_split(self.root / "splits" / f"{spec.name}.split", self.initial_split(spec))
            self.set_link(spec.name, spec.up_mbps, spec.down_mbps)
        self.controller_token = secrets.token_urlsafe(24)
        (self.root / "tokens" / CONTROLLER_TOKEN_NAME).write_text(self.controller_token)
        config = self.root / "server.yaml"
        config.write_text(yaml.safe_dump(self.server_config(host).model_dump(mode="json"), sort_keys=False))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._spawn(["server", "--config", str(config), *self.server_tls_args()], "server", env)
        self.wait_healthy()
        for spec in self.specs:
            self.start_device(spec, env)

    def start_device(self, spec: DeviceSpec, env: Optional[dict] = None) -> None:
        env = dict(env or os.environ)
        env.update(OMP_NUM_THREADS=str(self.cfg.threads_per_device), PYTHONUNBUFFERED="1")
        host = self.server_host.get(spec.name, "127.0.0.1")
        scheme, tls = ("https", ["--ca", self.client_tls.ca_file]) if self.client_tls else ("http", [])
        args = ["device", "--server", f"{scheme}://{host}:{self.port}", *tls, "--name", spec.name,
                "--token-file", str(self.root / "tokens" / spec.name),
                "--split-file", str(self.root / "splits" / f"{spec.name}.split"),
                "--rate-limit-file", str(self.root / "links" / f"{spec.name}.json"),
                "--device-class", spec.device_class, "--power-mode", spec.power_mode, "--duplex", spec.duplex,
                "--http1" if self.cfg.http_server == "uvicorn" else "--http2"]
        if spec.profile:
            args += ["--profile", str(resolve_profile(spec.profile, self.root / "profiles"))]
        self._spawn(args, spec.name, env, self.device_prefix.get(spec.name, []))

    def server_tls_args(self) -> list[str]:
        """With cfg.tls: a throwaway CA (its key never written), a server certificate for every
        address a device dials, and the `ares server` flags that serve it."""
        if not self.cfg.tls:
            return []
        from ares.core.pki import Authority

        ca = Authority("ares run")
        ips = sorted({"127.0.0.1", *self.server_host.values()})
        leaf = ca.issue_server(["localhost"], ips)
        tls = self.root / "tls"
        tls.mkdir(exist_ok=True)
        for name, data in (("ca.crt", ca.cert_pem), ("tls.crt", leaf.cert_pem), ("tls.key", leaf.key_pem)):
            path = tls / name
            path.touch(mode=0o600)
            path.write_bytes(data)
        self.client_tls = ClientTls(ca_file=str(tls / "ca.crt"))
        return ["--tls-cert", str(tls / "tls.crt"), "--tls-key", str(tls / "tls.key")]

    def _spawn(self, args: list[str], name: str, env: dict, prefix: list[str] = ()) -> subprocess.Popen:
        """Start a child and record it in one step (a stop signal waits until both are done): its own
        process group, so stop() ends what it started (granian's worker too); the cluster's marker
        in its environment; SIGTERM from the kernel should this process die without unwinding."""
        env = {**env, OWNER_ENV: self.marker}
        with open(self.root / "logs" / f"{name}.log", "ab") as logfile, shielded():
            proc = subprocess.Popen([*prefix, *self.command, *args], stdout=logfile, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True, preexec_fn=_die_with_parent())
            self.procs[name] = proc
        return proc

    def set_link(self, device: str, up_mbps: Optional[float], down_mbps: Optional[float]) -> None:
        """In-process link cap for a device (Mbit/s); picked up at its next step."""
        data = {"up_bps": up_mbps * 125_000 if up_mbps else None, "down_bps": down_mbps * 125_000 if down_mbps else None,
                "duplex": next((s.duplex for s in self.specs if s.name == device), "full")}
        tmp = self.root / "links" / f".{device}.tmp"
        tmp.write_text(json.dumps(data))
        tmp.replace(self.root / "links" / f"{device}.json")

    def wait_healthy(self, timeout_s: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        with httpx.Client(transport=transport(self.client_tls), timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.procs["server"].poll() is not None:
                    raise RuntimeError(f"server exited with code {self.procs['server'].returncode}; "
                                       f"see {self.root / 'logs' / 'server.log'}")
                try:
                    if client.get(f"{self.url}/healthz").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"server not healthy after {timeout_s:.0f} s; see {self.root / 'logs' / 'server.log'}")

    def stop(self, grace_s: float = 10.0) -> None:
        """End everything it started, devices first (then the server has no connection to wait
        for): SIGTERM to each process group, SIGKILL to a group still there after `grace_s`, then
        SIGKILL to whatever is left of the groups (granian's worker outlives a SIGKILLed master) and
        to any process carrying this cluster's marker. A stop signal that arrives meanwhile waits
        until this is done."""
        with shielded():
            devices = [p for n, p in self.procs.items() if n != "server"]
            server = [p for n, p in self.procs.items() if n == "server"]
            for group in (devices, server):
                for proc in group:
                    _signal_group(proc, signal.SIGTERM)
                deadline = time.monotonic() + grace_s
                for proc in group:
                    try:
                        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        _signal_group(proc, signal.SIGKILL)
                        proc.wait()
            for proc in self.procs.values():
                _signal_group(proc, signal.SIGKILL)  # an empty group: nothing happens
            kill_marked(lambda pid, m: m == self.marker)


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    """`signum` to the child's process group (its pid: start_new_session), while the group exists."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signum)


def set_aside(root: Path) -> Optional[Path]:
    """Move a results folder that holds anything to the first free `<name>.N` beside it, so a new
    run starts fresh and nothing of the old one is lost; None when there was nothing to move."""
    if not root.is_dir() or not any(root.iterdir()):
        return None
    n = 1
    while (target := root.with_name(f"{root.name}.{n}")).exists():
        n += 1
    root.rename(target)
    return target


def run(cfg: RunConfig, progress: bool = True, cluster: Optional[Cluster] = None,
        on_round=None) -> dict:
    """Run a whole training locally; returns the summary (also written to summary.json).
    Stopped by a signal (`stop_on_signals`, in the main thread), it ends every process it started
    and raises `Stopped`."""
    with stop_on_signals():
        return _run(cfg, progress, cluster, on_round)


def _run(cfg: RunConfig, progress: bool, cluster: Optional[Cluster], on_round) -> dict:
    root = Path(cfg.results_dir)
    if (root / "checkpoints" / "state.json").exists():
        # the server would resume that run, finished or not, and its figures would pass for ours
        raise ValueError(f"{root} holds a previous run (checkpoints/state.json): choose another results "
                         "folder or move it aside (`ares run` does: set_aside)")
    root.mkdir(parents=True, exist_ok=True)
    cluster = cluster or Cluster(cfg, root, cfg.port or free_port())
    specs = {s.name: s for s in cluster.specs}
    pinned = {s.name: s.pinned_split for s in specs.values() if s.pinned_split is not None}
    splits_log: list[dict] = []
    controller = None
    if cfg.mode == "adaptive":
        policy = parse_policy(cfg.policy, cfg.alpha)
        controller = Controller(lambda: fetch_columns(cluster.url, cluster.controller_token, tls=cluster.client_tls),
                                policy,
                                FileSplitSink(root / "splits"), pinned, offer=cfg.offer(),
                                power_modes=cfg.power_modes,
                                pinned_modes={s.name: s.pinned_mode for s in specs.values() if s.pinned_mode})
    view = None
    grace_s = 10.0
    started = time.time()
    try:
        view = _Progress(progress, cfg, specs)
        cluster.start()
        if controller:
            controller.last = {s.name: cluster.initial_split(s) for s in specs.values()}
        seen_round = -1
        while True:
            status = fetch_status(cluster.url, cluster.controller_token, tls=cluster.client_tls)
            view.update(status)
            if status.round != seen_round:
                for change in due_changes(cfg.schedule, seen_round, status.round):
                    log.info("round %d: %s link -> up %s / down %s Mbit/s", change.round, change.device,
                             change.up_mbps, change.down_mbps)
                    cluster.set_link(change.device, change.up_mbps, change.down_mbps)
                seen_round = status.round
                if controller and status.round > 0 and status.phase != "finished":
                    plan = controller.run_once()
                    if plan:
                        for p in plan.devices:
                            splits_log.append({"time": round(time.time() - started, 3), "round": status.round,
                                               "device": p.name, "split": p.split, "predicted_round_s": p.round_s,
                                               "predicted_iteration_s": p.iteration_s, "policy": plan.policy,
                                               "codec": p.codec, "micro_batches": p.micro_batches,
                                               "power_mode": p.power_mode, "mode_source": p.mode_source})
                if on_round:
                    on_round(cluster, status)
            if status.phase in ("finished", "failed"):
                break
            dead = [n for n, p in cluster.procs.items() if p.poll() is not None and p.returncode != 0]
            if "server" in dead:
                raise RuntimeError(f"the server exited; see {root / 'logs' / 'server.log'}")
            time.sleep(0.1)  # the controller must decide within the server's round gap
        for name, proc in cluster.procs.items():
            if name != "server":
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    log.warning("device %s did not exit after the last round", name)
    except KeyboardInterrupt:  # Stopped, or Ctrl-C: the server need not shut down in an orderly way
        grace_s = STOPPING_GRACE_S
        raise
    finally:
        try:
            cluster.stop(grace_s)
        finally:
            if view is not None:
                view.close()
    return write_results(cfg, root, splits_log, time.time() - started)


def due_changes(schedule: list[LinkChange], seen: int, now: int) -> list[LinkChange]:
    """The link changes for the rounds after `seen` up to `now`, in round order. On a loaded machine
    the runner can miss a round shorter than its poll takes: that round's change is then applied
    one round late, not dropped (it was, and the rest of the run kept the old link)."""
    return sorted((c for c in schedule if seen < c.round <= now), key=lambda c: c.round)


def write_results(cfg: RunConfig, root: Path, splits_log: list[dict], wall_s: float) -> dict:
    history = load_history(root / "checkpoints" / "state.json")
    with open(root / "rounds.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["round", "accuracy", "loss", "duration_s", "closed_by", "devices", "missed"])
        for r in history:
            w.writerow([r.round, f"{r.accuracy:.4f}", f"{r.loss:.4f}", f"{r.duration_s:.3f}",
                        r.closed_by, len(r.devices), " ".join(r.missed)])
    fields = ["round", "device", "split", "samples", "steps", "round_s", "up_bps", "down_bps", "energy_j", "energy_source"]
    with open(root / "devices.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in history:
            for name, d in sorted(r.devices.items()):
                w.writerow({"round": r.round, "device": name, **d.as_json()})
    with open(root / "splits.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["time", "round", "device", "split", "predicted_round_s",
                                          "predicted_iteration_s", "policy", "codec", "micro_batches",
                                          "power_mode", "mode_source"])
        w.writeheader()
        w.writerows(splits_log)
    energy: dict[str, float] = {}
    for r in history:
        for name, d in r.devices.items():
            if d.energy_j is not None:
                energy[name] = energy.get(name, 0.0) + d.energy_j
    durations = [r.duration_s for r in history]
    summary = {"config": cfg.model_dump(mode="json"), "rounds": len(history),
               "final_accuracy": history[-1].accuracy if history else None,
               "best_accuracy": max((r.accuracy for r in history), default=None),
               "mean_round_s": sum(durations) / len(durations) if durations else None,
               "device_energy_j": energy, "wall_s": wall_s}
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    _plot(history, root / "run.png")
    return summary


def _plot(history: list[RoundRecord], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r.round for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(rounds, [r.accuracy for r in history], marker="o")
    a.set(xlabel="round", ylabel="test accuracy", title="Accuracy")
    b.plot(rounds, [r.duration_s for r in history], marker="o", color="tab:orange")
    b.set(xlabel="round", ylabel="seconds", title="Round time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class _Progress:
    """Live table on a terminal (rich); one plain line per round otherwise."""

    def __init__(self, enabled: bool, cfg: RunConfig, specs: dict[str, DeviceSpec]):
        self.enabled, self.cfg, self.last_round = enabled, cfg, -1
        self.live = None
        if enabled and sys.stdout.isatty():
            from rich.live import Live

            self.live = Live(refresh_per_second=4)
            self.live.start()

    def update(self, status) -> None:
        if not self.enabled:
            return
        if self.live is not None:
            from rich.table import Table

            t = Table(title=f"ARES  round {status.round}/{status.rounds}  {status.phase}  "
                            f"accuracy {status.accuracy if status.accuracy is not None else '-'}")
            for col in ("device", "split", "phase", "last round s", "up Mbit/s", "energy J"):
                t.add_column(col)
            for name, d in status.devices.items():
                t.add_row(name, str(d.split), d.phase, f"{d.round_s:.2f}" if d.round_s else "-",
                          f"{d.up_bps * 8 / 1e6:.1f}" if d.up_bps else "-",
                          f"{d.energy_j:.1f}" if d.energy_j is not None else "-")
            self.live.update(t)
        elif status.round != self.last_round and status.round > 0:
            acc = f"{status.accuracy:.4f}" if status.accuracy is not None else "-"
            splits = " ".join(f"{n}:{d.split}" for n, d in status.devices.items())
            print(f"round {status.round}/{status.rounds}  accuracy {acc}  splits {splits}", flush=True)
        self.last_round = status.round

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
