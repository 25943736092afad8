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
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from ares.core.config import CONTROLLER_TOKEN_NAME, ServerConfig
from ares.core.models import build_model, n_layers
from ares.core.optimiser import parse_policy
from ares.core.profiles import PUBLISHED, ComputeProfile
from ares.roles.runconfig import DeviceSpec, RunConfig
from ares.runtime.controller import Controller, FileSplitSink, fetch_status, fetch_telemetry
from ares.runtime.splitfile import write_split
from ares.runtime.tlsclient import ClientTls

log = logging.getLogger("ares.run")


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

    def __post_init__(self) -> None:
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
        self.procs["server"] = self._spawn(["server", "--config", str(config), *self._server_tls()], "server", env)
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
        self.procs[spec.name] = self._spawn(args, spec.name, env, self.device_prefix.get(spec.name, []))

    def _server_tls(self) -> list[str]:
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
        logfile = open(self.root / "logs" / f"{name}.log", "ab")
        # its own process group: stop() can end what it started (granian's worker, too)
        return subprocess.Popen([*prefix, *self.command, *args], stdout=logfile, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)

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
        while time.monotonic() < deadline:
            if self.procs["server"].poll() is not None:
                raise RuntimeError(f"server exited with code {self.procs['server'].returncode}; "
                                   f"see {self.root / 'logs' / 'server.log'}")
            try:
                verify = self.client_tls.context() if self.client_tls else True
                if httpx.get(f"{self.url}/healthz", timeout=2.0, verify=verify).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not healthy after {timeout_s:.0f} s; see {self.root / 'logs' / 'server.log'}")

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM everything; whatever has not exited after `grace_s` loses its whole group."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                # the whole group: a SIGKILLed granian leaves its worker serving the port
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


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
    """Run a whole training locally; returns the summary (also written to summary.json)."""
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
        controller = Controller(lambda: fetch_telemetry(cluster.url, cluster.controller_token, tls=cluster.client_tls),
                                policy,
                                FileSplitSink(root / "splits"), pinned, offer=cfg.offer())
    view = _Progress(progress, cfg, specs)
    started = time.time()
    try:
        cluster.start()
        if controller:
            controller.last = {s.name: cluster.initial_split(s) for s in specs.values()}
        seen_round = -1
        while True:
            status = fetch_status(cluster.url, cluster.controller_token, tls=cluster.client_tls)
            view.update(status)
            if status.round != seen_round:
                seen_round = status.round
                _apply_schedule(cfg, cluster, status.round)
                if controller and status.round > 0 and status.phase != "finished":
                    plan = controller.run_once()
                    if plan:
                        for p in plan.devices:
                            splits_log.append({"time": round(time.time() - started, 3), "round": status.round,
                                               "device": p.name, "split": p.split, "predicted_round_s": p.round_s,
                                               "predicted_iteration_s": p.iteration_s, "policy": plan.policy,
                                               "codec": p.codec, "micro_batches": p.micro_batches})
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
    finally:
        cluster.stop()
        view.close()
    return write_results(cfg, root, splits_log, time.time() - started)


def _apply_schedule(cfg: RunConfig, cluster: Cluster, round_index: int) -> None:
    for change in cfg.schedule:
        if change.round == round_index:
            log.info("round %d: %s link -> up %s / down %s Mbit/s", round_index, change.device,
                     change.up_mbps, change.down_mbps)
            cluster.set_link(change.device, change.up_mbps, change.down_mbps)


def write_results(cfg: RunConfig, root: Path, splits_log: list[dict], wall_s: float) -> dict:
    state = json.loads((root / "checkpoints" / "state.json").read_text())
    history = state["history"]
    with open(root / "rounds.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["round", "accuracy", "loss", "duration_s", "closed_by", "devices", "missed"])
        for r in history:
            w.writerow([r["round"], f"{r['accuracy']:.4f}", f"{r['loss']:.4f}", f"{r['duration_s']:.3f}",
                        r["closed_by"], len(r["devices"]), " ".join(r["missed"])])
    fields = ["round", "device", "split", "samples", "steps", "round_s", "up_bps", "down_bps", "energy_j", "energy_source"]
    with open(root / "devices.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in history:
            for name, d in sorted(r["devices"].items()):
                w.writerow({"round": r["round"], "device": name, **d})
    with open(root / "splits.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["time", "round", "device", "split", "predicted_round_s",
                                          "predicted_iteration_s", "policy", "codec", "micro_batches"])
        w.writeheader()
        w.writerows(splits_log)
    energy: dict[str, float] = {}
    for r in history:
        for name, d in r["devices"].items():
            if d.get("energy_j") is not None:
                energy[name] = energy.get(name, 0.0) + d["energy_j"]
    durations = [r["duration_s"] for r in history]
    summary = {"config": cfg.model_dump(mode="json"), "rounds": len(history),
               "final_accuracy": history[-1]["accuracy"] if history else None,
               "best_accuracy": max((r["accuracy"] for r in history), default=None),
               "mean_round_s": sum(durations) / len(durations) if durations else None,
               "device_energy_j": energy, "wall_s": wall_s}
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    _plot(history, root / "run.png")
    return summary


def _plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(rounds, [r["accuracy"] for r in history], marker="o")
    a.set(xlabel="round", ylabel="test accuracy", title="Accuracy")
    b.plot(rounds, [r["duration_s"] for r in history], marker="o", color="tab:orange")
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
