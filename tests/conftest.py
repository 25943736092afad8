"""Shared fixtures: small configs and real server processes; the control-plane plugin."""

from __future__ import annotations

import ctypes
import hashlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional, TypeVar

import httpx
import pytest
import yaml

from ares.core.config import CONTROLLER_TOKEN_NAME, DataConfig, ServerConfig, TrainingConfig

ROOT = Path(__file__).resolve().parents[1]

# The real control plane, namespace and kubectl fixtures (tests/cluster/fixtures.py), here so
# that tests/k8s and tests/images share one session control plane.
pytest_plugins = ["cluster.fixtures"]


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


@pytest.fixture
def server_process(tmp_path):
    started = []

    def start(cfg: ServerConfig) -> ServerProcess:
        started.append(ServerProcess(cfg, tmp_path))
        return started[-1]

    yield start
    for s in started:
        s.stop()
