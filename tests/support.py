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


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05, *,
             retry_on: tuple[type[BaseException], ...] = (), details: Callable[[], str] = lambda: "") -> T:
    """Poll `predicate` every `interval` s until it returns something truthy, and return that.

    The one polling helper of the suite (a poll on a condition, never a fixed sleep). An exception
    of a type in `retry_on` counts as "not yet" (e.g. a server still starting); any other one
    fails the test at once. At `timeout` it raises an AssertionError naming `what` with the last
    value or exception seen, and `details()` (logs) if given.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = predicate()
        except retry_on as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
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
