"""Helpers the suite shares: free ports, model digests, polling, small configs, `ares server` processes.

Plain functions and classes, imported by test modules (`from tests.support import wait_for`);
the fixtures built on them live in tests/conftest.py.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional, TypeVar

import httpx
import yaml

from ares.core.config import CONTROLLER_TOKEN_NAME, DataConfig, LimitsConfig, ServerConfig, TrainingConfig
from ares.core.rounds import DeviceRound, RoundRecord
from ares.runtime.netns import TCP_PAYLOAD_SHARE

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_hash(server) -> str:
    """A digest of a TrainingServer's global model (names and bytes of every tensor): equal
    digests, the same model to the bit."""
    h = hashlib.sha256()
    for name, tensor in sorted(server.global_state().items()):
        h.update(name.encode())
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()


def die_with_pytest() -> None:
    """A preexec_fn: the child gets SIGTERM when the test process dies, however it dies (a
    SIGKILLed or timed-out pytest leaves no server behind; Linux prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))


def stop_process(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `grace_s`; reaped either way."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


T = TypeVar("T")
SLOW_POLL_S = 0.5  # the longest pause between polls that start a process (wait_for)
_processes_started = [0]


def process_started() -> None:
    """Said by helpers that start a process at every call (kubectl): wait_for spaces out polls that do."""
    _processes_started[0] += 1


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05, *,
             retry_on: tuple[type[BaseException], ...] = (), details: Callable[[], str] = lambda: "") -> T:
    """Poll `predicate` every `interval` s until it returns something truthy, and return that.

    The one polling helper of the suite (a poll on a condition, never a fixed sleep). An exception
    of a type in `retry_on` counts as "not yet" (e.g. a server still starting); any other one
    fails the test at once. At `timeout` it raises an AssertionError naming `what` with the last
    value or exception seen, and `details()` (logs) if given.

    A poll that starts a process (`kubectl`: see `process_started`) is spaced out: the pause after
    each one grows by half, up to `SLOW_POLL_S`, so a long wait on kubectl starts half as many
    processes as at 0.2 s, or fewer. Every other poll (a file, a log, a request to a server) keeps
    `interval`, and so catches short-lived states.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    pause = interval
    while True:
        started = _processes_started[0]
        try:
            last = predicate()
        except retry_on as exc:
            last = exc
        else:
            if last:
                return last
        now = time.monotonic()
        if now >= deadline:
            break
        spawned = _processes_started[0] != started
        pause = min(max(pause * 1.5, interval), max(SLOW_POLL_S, interval)) if spawned else interval
        time.sleep(min(pause, max(0.0, deadline - now)))
    extra = details()
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last: {last!r}"
                         + (f"\n{extra}" if extra else ""))


def small_config(tmp: Path, devices=("dev-a",), **training) -> ServerConfig:
    tokens = tmp / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    for name in devices:
        (tokens / name).write_text(secrets.token_urlsafe(24))
    (tokens / CONTROLLER_TOKEN_NAME).write_text(secrets.token_urlsafe(24))
    train = {"rounds": 3, "batch_size": 20, "seed": 1, **training}
    return ServerConfig(devices=tuple(devices), tokens_dir=str(tokens), checkpoint_dir=str(tmp / "ckpt"),
                        data=DataConfig(name="synthetic", synthetic_train=200, synthetic_test=100, seed=1),
                        training=TrainingConfig(**train), host="127.0.0.1", port=free_port(), round_deadline_s=60)


def token(cfg: ServerConfig, name: str) -> str:
    return (Path(cfg.tokens_dir) / name).read_text().strip()


def joined_app(tmp: Path):
    """The real app over an in-process TrainingServer, with dev-a joined to round 0 at split 2:
    (server, TestClient, dev-a's auth header, tokens, controller token)."""
    from fastapi.testclient import TestClient

    from ares.runtime.server import create_app
    from ares.runtime.training import TrainingServer, read_tokens

    cfg = small_config(tmp, devices=("dev-a", "dev-b"), rounds=3, batch_size=20)
    tokens, controller = read_tokens(cfg)
    server = TrainingServer(cfg, tokens, controller, profile=False)
    client = TestClient(create_app(cfg, trainer=server))
    auth = {"Authorization": f"Bearer {tokens['dev-a']}"}
    assert client.post("/v1/devices/dev-a/join", json={"round": 0, "split": 2}, headers=auth).status_code == 200
    return server, client, auth, tokens, controller


class ServerProcess:
    """`ares server` as a real process on loopback; stopped when the test ends."""

    def __init__(self, cfg: ServerConfig, tmp: Path, extra_args: tuple[str, ...] = (),
                 healthy: Optional[Callable[[], bool]] = None):
        self.cfg = cfg
        self.url = getattr(self, "url", f"http://127.0.0.1:{cfg.port}")
        path = tmp / "server.yaml"
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        self.log = open(tmp / "server.log", "wb")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        # Its own process group: granian's workers outlive a SIGKILLed master (they would keep the
        # port and serve stale state); kill() and stop() end the whole group, as a pod's death does.
        self.proc = subprocess.Popen([sys.executable, "-m", "ares", "server", "--config", str(path), *extra_args],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                     start_new_session=True, preexec_fn=die_with_pytest)
        self.tmp = tmp
        healthy = healthy or self._plain_healthy
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (tmp / "server.log").read_text()
            if healthy():
                return
            time.sleep(0.2)
        raise TimeoutError((tmp / "server.log").read_text())

    def _plain_healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """SIGKILL the server and its workers at once (a crashed pod); reaped."""
        self._kill_group()
        self.proc.wait(10)
        self.log.close()

    def _kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        stop_process(self.proc)
        self._kill_group()  # any worker the master left behind
        self.log.close()


# Host tests (network namespaces, tc).

def payload_mbit(wire_mbit: float) -> float:
    """What a transfer can measure on a link capped at `wire_mbit`: every frame's headers count
    against the cap (htb counts a super-packet with the headers of every segment it becomes)."""
    return wire_mbit * TCP_PAYLOAD_SHARE


def host_skip_reason() -> Optional[str]:
    if os.geteuid() != 0:
        return "host tests need root (network namespaces, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"host tests need '{tool}' from iproute2"
    return None


# Round records.

def device_round(split: int = 3, samples: int = 10, **fields) -> DeviceRound:
    """A device's part in a round, with only the fields given set (as a record read from disk)."""
    return DeviceRound(split=split, samples=samples, **fields)


def round_record(r: int, devices: dict[str, DeviceRound] | None = None, missed: list[str] | None = None,
                 **fields) -> RoundRecord:
    """A closed round with what every record has; more fields as given."""
    base = dict(accuracy=0.5, loss=1.0, closed_by="all devices done", duration_s=10.0)
    return RoundRecord(round=r, devices=devices or {}, missed=missed or [], **{**base, **fields})


# Device processes and what a server shows of a run.

def fault_config(tmp: Path, devices: Sequence[str], rounds: int, deadline_s: float) -> ServerConfig:
    cfg = small_config(tmp, devices=tuple(devices), rounds=rounds, batch_size=20, max_steps_per_round=4)
    return cfg.model_copy(update={"round_deadline_s": deadline_s, "round_gap_s": 0.2,
                                  "data": DataConfig(name="synthetic", synthetic_train=80 * len(devices),
                                                     synthetic_test=100, seed=1)})


class Devices:
    """`ares device` processes; killed when the test ends."""

    def __init__(self, tmp: Path, cfg: ServerConfig, url: Optional[str] = None):
        self.tmp, self.cfg, self.url = tmp, cfg, url or f"http://127.0.0.1:{cfg.port}"
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, split: int = 3, profile: Optional[Path] = None,
              wrap: Callable[[list[str]], list[str]] = list, extra: Sequence[str] = ()) -> subprocess.Popen:
        split_file = self.tmp / f"{name}.split"
        split_file.write_text(str(split))
        cmd = [sys.executable, "-m", "ares", "device", "--server", self.url, "--name", name,
               "--token-file", str(Path(self.cfg.tokens_dir) / name), "--split-file", str(split_file), "--cpu",
               *(["--profile", str(profile)] if profile else []), *extra]
        log = open(self.tmp / f"{name}.log", "ab")
        proc = subprocess.Popen(wrap(cmd), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        log.close()
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def status(url: str, cfg: ServerConfig) -> dict:
    try:
        r = httpx.get(f"{url}/v1/status", headers={"Authorization": f"Bearer {token(cfg, 'controller.token')}"},
                      timeout=5)
        return r.json() if r.status_code == 200 else {}
    except httpx.HTTPError:
        return {}


def history(cfg: ServerConfig) -> list[dict]:
    path = Path(cfg.checkpoint_dir) / "state.json"
    return json.loads(path.read_text())["history"] if path.exists() else []


# An in-process app over ASGI.

def async_env(tmp_path, **limits):
    from ares.runtime.server import create_app
    from ares.runtime.training import TrainingServer, read_tokens

    cfg = small_config(tmp_path, devices=("dev-a", "dev-b"), rounds=3, batch_size=20)
    cfg = cfg.model_copy(update={"limits": LimitsConfig(**limits)})
    tokens, controller = read_tokens(cfg)
    server = TrainingServer(cfg, tokens, controller, profile=False)
    app = create_app(cfg, trainer=server)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60)
    return server, client, {n: {"Authorization": f"Bearer {t}"} for n, t in tokens.items()}


FAKE_NVPMODEL = r"""#!/bin/sh
# A stand-in for a Jetson's nvpmodel: -q says the mode in force, -m ID switches to the mode of
# that ID in the -f conf (after a short pause, as the real one takes); IDs in FAIL_IDS fail.
state="{state}"
conf=/etc/nvpmodel.conf
echo "nvpmodel $*" >> "{log}"
while [ $# -gt 0 ]; do
    case $1 in
        -f) conf=$2; shift 2 ;;
        -q) [ -f "$state" ] || printf 'MAXN 0\n' > "$state"
            read -r name id < "$state"
            printf 'NV Fan Mode:quiet\nNV Power Mode: %s\n%s\n' "$name" "$id"; exit 0 ;;
        -m) for bad in {fail_ids}; do
                if [ "$2" = "$bad" ]; then echo "NVPM ERROR: failed to set power mode $2" >&2; exit 1; fi
            done
            name=$(sed -n "s/.*POWER_MODEL ID=$2 NAME=\([^ >]*\).*/\1/p" "$conf")
            [ -n "$name" ] || {{ echo "NVPM ERROR: no mode $2" >&2; exit 1; }}
            sleep 0.2
            printf '%s %s\n' "$name" "$2" > "$state"; exit 0 ;;
        *) shift ;;
    esac
done
"""


def install_fake_nvpmodel(folder: Path, fail_ids: Sequence[int] = ()) -> Path:
    """An `nvpmodel` in `folder` that keeps its mode in `folder/nvpmodel.state` and logs its calls
    to `folder/nvpmodel.log` (FAKE_NVPMODEL); returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "nvpmodel"
    exe.write_text(FAKE_NVPMODEL.format(state=folder / "nvpmodel.state", log=folder / "nvpmodel.log",
                                        fail_ids=" ".join(str(i) for i in fail_ids) or "none"))
    exe.chmod(0o755)
    return exe


# Server shards: a root and its shards as real processes, devices on threads of the test process.

def write_shard_token(cfg: ServerConfig) -> str:
    """The job's shard token (ares.runtime.shardproto.SHARD_TOKEN_NAME), written once."""
    path = Path(cfg.tokens_dir) / "shard.token"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(24))
    return path.read_text().strip()


class ShardProcess(ServerProcess):
    """`ares server --shard I --root URL` on a port of its own (the same one again for a restart);
    its config and log in tmp/shard-I-START."""

    def __init__(self, cfg: ServerConfig, tmp: Path, index: int, root_url: str, port: Optional[int] = None,
                 start: int = 0, healthy: Optional[Callable[[], bool]] = None, extra: tuple[str, ...] = ()):
        self.index, self.root_url, self.extra = index, root_url, extra
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        folder = tmp / f"shard-{index}-{start}"
        folder.mkdir(parents=True, exist_ok=True)
        super().__init__(cfg, folder, ("--shard", str(index), "--root", root_url, "--port", str(self.port), *extra),
                         healthy=healthy)

    def restart(self, tmp: Path, start: int = 1) -> "ShardProcess":
        """A new process for the same shard on the same port (a replaced pod)."""
        return ShardProcess(self.cfg, tmp, self.index, self.root_url, self.port, start, extra=self.extra)

    def round_state(self, device: str) -> dict:
        """The shard's `GET /v1/round`, asked with a device's token ({} while it does not answer)."""
        try:
            r = httpx.get(f"{self.url}/v1/round", headers={"Authorization": f"Bearer {token(self.cfg, device)}"},
                          timeout=5)
            return r.json() if r.status_code == 200 else {}
        except httpx.HTTPError:
            return {}


def start_together(*makers: Callable[..., ServerProcess], timeout: float = 90) -> list[ServerProcess]:
    """Start several server processes at once and wait until each answers /healthz. Each maker
    takes `healthy` and passes it on (started here, in the test's thread: a child's parent-death
    signal follows the thread that started it). If one fails, all are stopped and its error raised."""
    started: list[ServerProcess] = []
    try:
        for make in makers:
            started.append(make(healthy=lambda: True))
        deadline = time.monotonic() + timeout
        for s in started:
            while not s._plain_healthy():
                assert s.proc.poll() is None, (s.tmp / "server.log").read_text()
                if time.monotonic() > deadline:
                    raise TimeoutError((s.tmp / "server.log").read_text())
                time.sleep(0.2)
    except BaseException:
        for s in started:
            s.stop()
        raise
    return started


class DeviceThreads:
    """`DeviceTrainer`s on threads of the test process, each over HTTP/2 (`HttpLink`) to its own
    URL: its server, or its shard. What each run returned or raised is kept by name."""

    def __init__(self, tmp: Path, cfg: ServerConfig, reconnect_s: float = 60.0):
        import threading

        self.tmp, self.cfg, self.reconnect_s = tmp, cfg, reconnect_s
        self.threads: dict[str, "threading.Thread"] = {}
        self.logs: dict[str, list] = {}
        self.errors: dict[str, BaseException] = {}
        self.links: list = []
        self._stop = threading.Event()

    def start(self, name: str, url: str, split: int = 3, profile: Optional[str] = None) -> None:
        """`profile`: a published device class (ares.core.profiles.PUBLISHED) whose compute it emulates."""
        import threading

        from ares.core.config import DeviceSettings
        from ares.core.profiles import PUBLISHED
        from ares.runtime.device import DeviceTrainer
        from ares.runtime.link import HttpLink

        split_file = self.tmp / f"{name}.split"
        split_file.write_text(str(split))
        settings = DeviceSettings(name=name, server_url=url, token_file=str(Path(self.cfg.tokens_dir) / name),
                                  split_file=str(split_file))
        link = HttpLink(url, name, token(self.cfg, name), timeout_s=60)
        self.links.append(link)

        def run() -> None:
            try:
                trainer = DeviceTrainer(settings, link, emulate=PUBLISHED[profile] if profile else None)
                trainer.reconnect_s = self.reconnect_s
                self.logs[name] = trainer.run(stop=self._stop.is_set)
            except BaseException as exc:  # noqa: BLE001 - kept for the test to assert on
                self.errors[name] = exc

        self.threads[name] = threading.Thread(target=run, name=f"device-{name}", daemon=True)
        self.threads[name].start()

    def wait(self, timeout: float) -> None:
        """Until every device's run has returned (the job finished), or fail."""
        deadline = time.monotonic() + timeout
        for name, thread in self.threads.items():
            thread.join(max(0.0, deadline - time.monotonic()))
            assert not thread.is_alive(), f"device {name} still running after {timeout:g}s"

    def stop(self) -> None:
        self._stop.set()
        for link in self.links:
            link.close()  # a device waiting on its server fails at its next request and ends
        for thread in self.threads.values():
            thread.join(10)
