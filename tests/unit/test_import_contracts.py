"""The layering in .importlinter holds (core < runtime < roles; the core and the device side stay
free of server, operator and Kubernetes dependencies)."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    result = subprocess.run([exe, "--config", str(ROOT / ".importlinter")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_device_role_imports_no_server_or_operator_packages():
    code = ("import sys; import ares.runtime.device, ares.runtime.link; "
            "bad = [m for m in ('fastapi', 'granian', 'kopf', 'kubernetes', 'matplotlib') if m in sys.modules]; "
            "print(bad); raise SystemExit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
