"""Fixtures for the operator tests: the operator and a kubelet, on the real control plane.

`control_plane`, `namespace` and `kubectl` come from tests/cluster/fixtures.py (a plugin
tests/conftest.py loads, so tests/images shares the session's control plane).

- `operator`: the real operator (`kopf run --standalone -m ares_operator.handlers`) in a
  KopfRunner thread, authenticated as the chart's ServiceAccount with a TokenRequest token,
  so every call it makes is checked against exactly the chart's RBAC.
- `kubelet`: registers Nodes, binds and runs the namespace's pods as local processes.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The reconcile timer's interval is read when the handlers module is imported: keep ticks short.
os.environ.setdefault("ARES_TICK_SECONDS", "1")
# The kubernetes client reads KUBECONFIG's *path* once, at import: one path for the whole session,
# rewritten with the operator's identity for every test.
KUBECONFIG = Path(tempfile.mkdtemp(prefix="ares-k8s-")) / "kubeconfig"
os.environ["KUBECONFIG"] = str(KUBECONFIG)
atexit.register(shutil.rmtree, KUBECONFIG.parent, ignore_errors=True)

from cluster.controlplane import ControlPlane
from cluster.fixtures import OPERATOR_NS, OPERATOR_SA, Kubectl, admin_kubectl, fresh_namespace
from k8s_kubelet import Kubelet

from tests.support import free_port

CRD = ROOT / "crds" / "aresjobs.ares.io.yaml"


class Operator:
    """The real operator in a KopfRunner thread, restartable."""

    def __init__(self, control_plane: ControlPlane, namespace: str,
                 service_account: tuple[str, str] = (OPERATOR_NS, OPERATOR_SA)) -> None:
        self.control_plane, self.namespace = control_plane, namespace
        self.service_account = service_account  # (namespace, name) whose RBAC it runs with
        self.runner: Any = None
        self.outputs: list[str] = []

    def start(self) -> None:
        from kopf.testing import KopfRunner

        token = self.control_plane.token_for(*self.service_account)
        KUBECONFIG.write_text(json.dumps(self.control_plane.kubeconfig({"token": token}, self.namespace)))
        args = ["run", "--standalone", "--namespace", self.namespace, "--verbose", "-m", "ares_operator.handlers"]
        self.runner = KopfRunner(args, timeout=30)
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
def operator(kubectl: Kubectl, control_plane: ControlPlane, namespace: str) -> Iterator[Operator]:
    op = Operator(control_plane, namespace)
    op.start()
    try:
        yield op
    finally:
        op.stop()


@pytest.fixture
def server_port(monkeypatch: pytest.MonkeyPatch) -> int:
    """The loopback port the kubelet gives the job's server; the operator is told to dial it."""
    port = free_port()
    monkeypatch.setenv("ARES_SERVER_URL_TEMPLATE", f"https://127.0.0.1:{port}")  # checked for the Service's name
    return port


@pytest.fixture
def kubelet(control_plane: ControlPlane, namespace: str, server_port: int, tmp_path: Path) -> Iterator[Kubelet]:
    with Kubelet(control_plane.http(), tmp_path / "node", server_port, namespace) as k:
        yield k
        _print_logs(k)


def _print_logs(k: Kubelet) -> None:
    """Shown by pytest only when a test failed: what each pod printed, and the kubelet's own errors."""
    for name in sorted({p.name for p in k.pods.values()}):
        print(f"--- {name} ---\n{k.log(name)[-2500:]}")
    print(f"kubelet errors: {k.errors}")


@dataclass(frozen=True)
class SharedCluster:
    """A namespace with the operator and a kubelet, shared by the steps of one test class: one job
    whose start is costly, each step a test of one behaviour (marker `steps`, tests/conftest.py)."""

    namespace: str
    kubectl: Kubectl
    kubelet: Kubelet
    operator: Operator
    server_port: int
    metrics_port: int  # the operator's own /metrics, on loopback


@pytest.fixture(scope="class")
def shared_cluster(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedCluster]:
    folder = tmp_path_factory.mktemp("shared")
    with fresh_namespace(control_plane) as namespace, pytest.MonkeyPatch.context() as env:
        server_port, metrics_port = free_port(), free_port()
        env.setenv("ARES_SERVER_URL_TEMPLATE", f"https://127.0.0.1:{server_port}")
        env.setenv("ARES_METRICS_PORT", str(metrics_port))
        env.setenv("ARES_METRICS_ADDRESS", "127.0.0.1")
        with Kubelet(control_plane.http(), folder / "node", server_port, namespace) as k:
            op = Operator(control_plane, namespace)
            op.start()
            try:
                yield SharedCluster(namespace, admin_kubectl(control_plane, namespace, folder), k, op,
                                    server_port, metrics_port)
            finally:
                op.stop()
                _print_logs(k)
                print(f"--- operator ---\n{op.output[-5000:]}")

