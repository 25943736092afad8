"""Fixtures for the operator tests: the API emulator, kubectl pointed at it, the operator, a kubelet.

- `apiserver`: kmock's emulator with every fix kopf and kubectl need (see k8s_apiserver.py),
  on a loopback port in its own thread, with the AresTrainingJob CRD applied by kubectl.
- `kubectl`: runs the real kubectl binary against it (a kubeconfig in a temp dir).
- `operator`: the real operator (`kopf run --standalone -m ares_operator.handlers`) in a
  KopfRunner thread; `operator.restart()` stops it and starts a fresh one.
- `kubelet`: runs the pods' containers as local processes (see k8s_kubelet.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]
for extra in (ROOT, ROOT / "operator"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))
# The reconcile timer's interval is read when the handlers module is imported: keep ticks short.
os.environ.setdefault("ARES_TICK_SECONDS", "1")
# The kubernetes client reads KUBECONFIG's *path* once, at import: one path for the whole session,
# rewritten for every test's emulator.
KUBECONFIG = Path(tempfile.mkdtemp(prefix="ares-k8s-")) / "kubeconfig"
os.environ["KUBECONFIG"] = str(KUBECONFIG)

from k8s_apiserver import ApiserverThread  # noqa: E402
from k8s_kubelet import Kubelet  # noqa: E402

CRD = ROOT / "crds" / "aresjobs.ares.io.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 30.0, every: float = 0.2) -> Any:
    """Poll until `probe()` is truthy; fail with `what` (and the last value) at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


class Kubectl:
    def __init__(self, kubeconfig: Path):
        self.env = dict(os.environ, KUBECONFIG=str(kubeconfig))

    def run(self, *args: str, check: bool = True, stdin: Optional[str] = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(["kubectl", *args], env=self.env, capture_output=True, text=True,
                              input=stdin, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "-o", "json").stdout)

    def table(self, *args: str) -> list[dict[str, str]]:
        """`kubectl get` output as rows of {COLUMN: value}."""
        lines = [line for line in self.run("get", *args).stdout.splitlines() if line.strip()]
        if not lines:
            return []
        header = lines[0]
        starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
        names = header.split()
        rows = []
        for line in lines[1:]:
            cells = [line[a:b].strip() for a, b in zip(starts, starts[1:] + [None])]
            rows.append(dict(zip(names, cells)))
        return rows


@pytest.fixture
def apiserver(tmp_path: Path) -> Iterator[ApiserverThread]:
    with ApiserverThread() as api:
        yield api


@pytest.fixture
def kubectl(apiserver: ApiserverThread) -> Kubectl:
    config = KUBECONFIG
    config.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": apiserver.url}}],
        "users": [{"name": "tester", "user": {"token": "test"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester", "namespace": "default"}}],
    }))
    k = Kubectl(config)
    k.run("apply", "-f", str(CRD))
    return k


class Operator:
    """The real operator in a KopfRunner thread, restartable."""

    ARGS = ["run", "--standalone", "--all-namespaces", "--verbose", "-m", "ares_operator.handlers"]

    def __init__(self) -> None:
        self.runner: Any = None
        self.outputs: list[str] = []

    def start(self) -> None:
        from kopf.testing import KopfRunner

        self.runner = KopfRunner(self.ARGS, timeout=30)
        self.runner.__enter__()

    def stop(self) -> None:
        if self.runner is not None:
            runner, self.runner = self.runner, None
            runner.__exit__(None, None, None)
            self.outputs.append(runner.output)
            if runner.exception is not None:
                raise runner.exception

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def output(self) -> str:
        """What the operators stopped so far printed (a running one's output is not ready yet)."""
        return "\n".join(self.outputs)


@pytest.fixture
def operator(kubectl: Kubectl, monkeypatch: pytest.MonkeyPatch) -> Iterator[Operator]:
    op = Operator()
    op.start()
    try:
        yield op
    finally:
        op.stop()


@pytest.fixture
def server_port(monkeypatch: pytest.MonkeyPatch) -> int:
    """The loopback port the kubelet gives the job's server; the operator is told to dial it."""
    port = free_port()
    monkeypatch.setenv("ARES_SERVER_URL_TEMPLATE", f"http://127.0.0.1:{port}")
    return port


@pytest.fixture
def kubelet(apiserver: ApiserverThread, server_port: int, tmp_path: Path) -> Iterator[Kubelet]:
    with Kubelet(apiserver.url, tmp_path / "node", server_port) as k:
        yield k
        # Shown by pytest only when the test failed: what each pod printed, and the kubelet's own errors.
        for name in sorted({p.name for p in k.pods.values()}):
            print(f"--- {name} ---\n{k.log(name)[-2500:]}")
        print(f"kubelet errors: {k.errors}")
