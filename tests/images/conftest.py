"""Fixtures for the image tests: the images built by scripts/build-images, and podman to run them.

`images` (session) runs scripts/build-images, which caches: in CI (.ci/run builds them first)
and on a second run it only checks the input hashes. The tests skip only where podman cannot
be provided (the script exits 3: not root and the tools missing, or no apt-get). Two workers of
a parallel run may ask at once (test_operator_image.py runs in the control plane's group): a lock
makes the second wait for the first's build, then find it cached.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
from collections.abc import Iterator

import pytest

from cluster.nodes import CACHE
from images.podman_cli import CANNOT_PROVIDE_PODMAN, SCRIPT, Podman

BUILD_LOCK = CACHE / "build-images.lock"  # beside the script's own cache


@pytest.fixture(scope="session")
def images() -> Podman:
    BUILD_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(BUILD_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
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
