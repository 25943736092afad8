"""scripts/build-images --print-config run many times at once: the images fixture and the nodes'
prefetch both ask for it while the suite starts. Each run rewrites the podman config; with one
fixed temporary name, a run whose file another run had renamed away exited 1 ("mv: cannot stat")."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_concurrent_print_config_runs_all_succeed_and_leave_one_whole_config(tmp_path):
    env = {**os.environ, "ARES_CACHE": str(tmp_path)}
    runs = [subprocess.Popen([str(ROOT / "scripts" / "build-images"), "--print-config"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(24)]
    outputs = [p.communicate(timeout=120) for p in runs]
    results = [(p.returncode, out, err) for p, (out, err) in zip(runs, outputs)]
    conf = tmp_path / "containers" / "containers.conf"
    assert all(code == 0 for code, _, _ in results), [err for code, _, err in results if code]
    assert {out.strip() for _, out, _ in results} == {str(conf)}
    text = conf.read_text()
    assert 'runtime = "runc"' in text and text.rstrip().endswith('events_logger = "file"'), text
    assert sorted(p.name for p in conf.parent.iterdir()) == ["containers.conf"]  # no temporary file left
    assert conf.stat().st_mode & 0o777 == 0o644
