"""Fixtures for the operator tests: a real control plane, kubectl and helm, the operator, a kubelet.

- `control_plane` (session): etcd + kube-apiserver + kube-controller-manager built by
  scripts/build-control-plane (tests/cluster/controlplane.py); the chart is helm-installed once
  into `ares-system` (CRD, RBAC, ServiceAccount, Deployment; nothing runs that Deployment).
- `namespace`: a fresh namespace per test (labelled for privileged Pod Security, as the
  README tells users), deleted afterwards.
- `kubectl`: the real kubectl, as cluster admin, in that namespace.
- `operator`: the real operator (`kopf run --standalone -m ares_operator.handlers`) in a
  KopfRunner thread, authenticated as the chart's ServiceAccount with a TokenRequest token,
  so every call it makes is checked against exactly the chart's RBAC.
- `kubelet`: registers Nodes, binds and runs the namespace's pods as local processes.
"""

from __future__ import annotations

import itertools
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
for extra in (ROOT, ROOT / "operator", ROOT / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))
# The reconcile timer's interval is read when the handlers module is imported: keep ticks short.
os.environ.setdefault("ARES_TICK_SECONDS", "1")
# The kubernetes client reads KUBECONFIG's *path* once, at import: one path for the whole session,
# rewritten with the operator's identity for every test.
KUBECONFIG = Path(tempfile.mkdtemp(prefix="ares-k8s-")) / "kubeconfig"
os.environ["KUBECONFIG"] = str(KUBECONFIG)

from cluster.controlplane import ControlPlane, ControlPlaneUnavailable, bin_dir, tool_env  # noqa: E402
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
    def __init__(self, kubeconfig: Path, control_plane: Optional[ControlPlane] = None):
        self.kubeconfig = kubeconfig
        self.env = tool_env(control_plane.bin, kubeconfig) if control_plane else dict(os.environ, KUBECONFIG=str(kubeconfig))

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


OPERATOR_NS = "ares-system"
OPERATOR_SA = "ares"  # the chart's ServiceAccount for release "ares"
_counter = itertools.count()


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    try:
        binaries = bin_dir()
    except ControlPlaneUnavailable as exc:
        if os.environ.get("CI"):
            raise  # .ci/run builds it: in CI a missing control plane is a failure, not a skip
        pytest.skip(str(exc))
    cp = ControlPlane(tmp_path_factory.mktemp("control-plane"), bin=binaries)
    with cp:
        env = tool_env(cp.bin, cp.admin_kubeconfig)
        # The chart, as a user installs it; `--wait` is not used: no controller runs Deployments here.
        proc = subprocess.run(["helm", "install", "ares", str(ROOT / "charts" / "ares"), "-n", OPERATOR_NS,
                               "--create-namespace"], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        subprocess.run(["kubectl", "wait", "--for=condition=Established", "--timeout=60s",
                        "crd/aresjobs.ares.io"], env=env, check=True, capture_output=True, timeout=90)
        # What a k3s cluster with the NVIDIA container toolkit has: the runtime class Jetson pods name.
        subprocess.run(["kubectl", "apply", "-f", "-"], env=env, check=True, capture_output=True, timeout=60,
                       input="apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata: {name: nvidia}\nhandler: nvidia\n",
                       text=True)
        yield cp


@pytest.fixture
def namespace(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"t{next(_counter)}-{os.getpid() % 10000}"
    labels = getattr(request, "param", None) or {"pod-security.kubernetes.io/enforce": "privileged"}
    with control_plane.http() as http:
        resp = http.post("/api/v1/namespaces", json={"apiVersion": "v1", "kind": "Namespace",
                                                     "metadata": {"name": name, "labels": labels}})
        resp.raise_for_status()
        control_plane.wait_service_account(name)
        yield name
        http.delete(f"/api/v1/namespaces/{name}")


@pytest.fixture
def kubectl(control_plane: ControlPlane, namespace: str, tmp_path: Path) -> "Kubectl":
    config = tmp_path / "admin.kubeconfig"
    config.write_text(json.dumps(control_plane.kubeconfig(control_plane.admin_user(), namespace)))
    return Kubectl(config, control_plane)


class Operator:
    """The real operator in a KopfRunner thread, restartable."""

    def __init__(self, control_plane: ControlPlane, namespace: str) -> None:
        self.control_plane, self.namespace = control_plane, namespace
        self.runner: Any = None
        self.outputs: list[str] = []

    def start(self) -> None:
        from kopf.testing import KopfRunner

        token = self.control_plane.token_for(OPERATOR_NS, OPERATOR_SA)
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
        # Shown by pytest only when the test failed: what each pod printed, and the kubelet's own errors.
        for name in sorted({p.name for p in k.pods.values()}):
            print(f"--- {name} ---\n{k.log(name)[-2500:]}")
        print(f"kubelet errors: {k.errors}")
