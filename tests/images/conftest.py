"""Fixtures for the image tests: the images built by scripts/build-images, and podman to run them.

`images` (session) runs scripts/build-images, which caches: in CI (.ci/run builds them first)
and on a second run it only checks the input hashes. The tests skip only where podman cannot
be provided (the script exits 3: not root and the tools missing, or no apt-get).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def images() -> Podman:
    proc = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=3600)
    if proc.returncode == CANNOT_PROVIDE_PODMAN:
        pytest.skip(f"podman cannot run here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, f"scripts/build-images failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    conf = subprocess.run([str(SCRIPT), "--print-config"], capture_output=True, text=True, check=True)
    env = {**os.environ, "CONTAINERS_CONF": conf.stdout.strip()}
    return Podman(env=env, prefix=os.environ.get("ARES_IMAGE_PREFIX", "localhost/ares"),
                  tag=os.environ.get("ARES_IMAGE_TAG", "dev"))


@pytest.fixture
def podman(images: Podman) -> Iterator[Podman]:
    """The session's podman; containers started through it are removed after the test."""
    try:
        yield images
    finally:
        images.cleanup()
