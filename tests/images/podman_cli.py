"""podman for the image tests: the `Podman` runner, the build script, and a job folder as the
server and device containers mount it (tokens, server config, checkpoint, split file, token secret)."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from ares.core.config import CONTROLLER_TOKEN_NAME, DataConfig, ServerConfig, TrainingConfig
from tests.support import wait_for

UID = 10001  # the images' user

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build-images"
CANNOT_PROVIDE_PODMAN = 3  # scripts/build-images' exit status for that


@dataclass
class Podman:
    """podman with the script's containers.conf; `ref(name)` is the image the script built."""

    env: dict[str, str]
    prefix: str
    tag: str
    started: list[str] = field(default_factory=list)

    def ref(self, name: str) -> str:
        return f"{self.prefix}-{name}:{self.tag}"

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def start(self, image: str, *args: str, opts: tuple[str, ...] = ()) -> str:
        """A detached container (removed when the test ends); returns its name."""
        name = f"ares-test-{uuid.uuid4().hex[:10]}"
        self.started.append(name)
        self("run", "-d", "--name", name, *opts, self.ref(image), *args)
        return name

    def logs(self, name: str) -> str:
        proc = self("logs", name, check=False)
        return proc.stdout + proc.stderr

    def cleanup(self) -> None:
        while self.started:
            self("rm", "-f", "-t", "2", self.started.pop(), check=False)


@dataclass(frozen=True)
class ContainerJob:
    """The folders a server container and one device container mount, as a pod's volumes would."""

    job: Path  # /job in the server: tokens/ and server.yaml (read-only)
    ckpt: Path  # /ckpt in the server, owned by the images' user
    podinfo: Path  # the device's split file (a downwardAPI volume in a pod)
    secret: Path  # the device's token (a Secret volume in a pod)
    device_token: str
    controller_token: str


def container_job(tmp_path: Path, device: str, port: int, *, train: int, test: int, batch: int,
                  deadline_s: float, max_steps: int | None = None) -> ContainerJob:
    """A one-round job for `device` against a server on 127.0.0.1:`port`, at split 2."""
    job = tmp_path / "job"
    (job / "tokens").mkdir(parents=True)
    device_token = secrets.token_urlsafe(24)
    controller_token = secrets.token_urlsafe(24)
    (job / "tokens" / device).write_text(device_token)
    (job / "tokens" / CONTROLLER_TOKEN_NAME).write_text(controller_token)
    steps = {"max_steps_per_round": max_steps} if max_steps is not None else {}
    cfg = ServerConfig(devices=(device,), tokens_dir="/job/tokens", checkpoint_dir="/ckpt",
                       data=DataConfig(name="synthetic", synthetic_train=train, synthetic_test=test, seed=1),
                       training=TrainingConfig(rounds=1, batch_size=batch, seed=1, **steps),
                       host="127.0.0.1", port=port, round_deadline_s=deadline_s)
    (job / "server.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    os.chown(ckpt, UID, UID)
    podinfo = tmp_path / "podinfo"
    podinfo.mkdir()
    (podinfo / "split-point").write_text("2\n")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "token").write_text(device_token)
    for d in (job, job / "tokens", podinfo, secret):
        d.chmod(0o755)
    for f in [*job.rglob("*"), podinfo / "split-point", secret / "token"]:
        if f.is_file():
            f.chmod(0o644)
    return ContainerJob(job, ckpt, podinfo, secret, device_token, controller_token)


def first_round_closed(port: int, controller_token: str, timeout: float, what: str, details,
                       interval: float = 0.25) -> httpx.Response:
    """The server's `/v1/status` over HTTP/2 (prior knowledge) once round 0 has closed."""
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", http1=False, http2=True, timeout=5,
                      headers={"Authorization": f"Bearer {controller_token}"}) as client:
        def closed():
            try:
                reply = client.get("/v1/status")
            except httpx.HTTPError:
                return None
            return reply if reply.status_code == 200 and reply.json()["round"] >= 1 else None

        return wait_for(closed, timeout, what, interval=interval, details=details)


def process_ids(podman, container: str) -> tuple[int, int]:
    """Real uid and gid (on this host: rootful podman, no user namespace) of the container's process."""
    pid = int(podman("inspect", "--format", "{{.State.Pid}}", container).stdout.strip())
    assert pid > 0, f"{container} is not running:\n{podman.logs(container)}"
    status = Path(f"/proc/{pid}/status").read_text()
    return tuple(int(re.search(rf"^{key}:\s+(\d+)", status, re.M).group(1)) for key in ("Uid", "Gid"))
