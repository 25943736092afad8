"""pytest plugin (tests/conftest.py loads it): the real control plane and kubectl, for every test directory.

One plugin, so that tests/k8s and tests/images share a single session control plane.

- `control_plane` (session): etcd + kube-apiserver + kube-controller-manager built by
  scripts/build-control-plane (controlplane.py), of the Kubernetes version $ARES_K8S_VERSION names
  (default: the build script's); the chart is helm-installed once into
  `ares-system` (CRD, RBAC, ServiceAccount `ares`, Deployment; nothing runs that Deployment).
  Skips where the binaries are not built, except in CI (.ci/run builds them).
- `namespace`: a fresh namespace per test (labelled for privileged Pod Security, as the
  README tells users; indirect parametrisation gives other labels), deleted afterwards.
- `kubectl`: the real kubectl, as cluster admin, in that namespace.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

from cluster.controlplane import VERSION_ENV, ControlPlane, ControlPlaneUnavailable, bin_dir, tool_env
from tests.support import process_started

ROOT = Path(__file__).resolve().parents[2]
OPERATOR_NS = "ares-system"
OPERATOR_SA = "ares"  # the chart's ServiceAccount for release "ares"
_counter = itertools.count()


class Kubectl:
    def __init__(self, kubeconfig: Path, control_plane: Optional[ControlPlane] = None):
        self.kubeconfig = kubeconfig
        self.env = tool_env(control_plane.bin, kubeconfig) if control_plane else dict(os.environ, KUBECONFIG=str(kubeconfig))

    def run(self, *args: str, check: bool = True, stdin: Optional[str] = None) -> subprocess.CompletedProcess:
        process_started()  # a poll on kubectl is spaced out (wait_for)
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


def pytest_report_header() -> str:
    try:
        where = str(bin_dir())
    except ControlPlaneUnavailable as exc:
        where = str(exc)
    return f"kubernetes: {where} (${VERSION_ENV} picks the version)"


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    try:
        binaries = bin_dir()
    except ControlPlaneUnavailable as exc:
        if os.environ.get("CI"):
            raise  # .ci/run builds it: in CI a missing control plane is a failure, not a skip
        pytest.skip(str(exc))
    cp = ControlPlane(tmp_path_factory.mktemp("control-plane"), bin=binaries, before_controllers=_install_chart)
    with cp:
        yield cp


def _install_chart(cp: ControlPlane) -> None:
    """Before the controllers start, so that the garbage collector knows aresjobs from its start."""
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


@contextlib.contextmanager
def fresh_namespace(control_plane: ControlPlane, labels: Optional[dict[str, str]] = None) -> Iterator[str]:
    """A new namespace (privileged Pod Security unless `labels` say otherwise), deleted on exit."""
    name = f"t{next(_counter)}-{os.getpid() % 10000}"
    labels = labels or {"pod-security.kubernetes.io/enforce": "privileged"}
    with control_plane.http() as http:
        resp = http.post("/api/v1/namespaces", json={"apiVersion": "v1", "kind": "Namespace",
                                                     "metadata": {"name": name, "labels": labels}})
        resp.raise_for_status()
        try:
            control_plane.wait_service_account(name)
            yield name
        finally:
            http.delete(f"/api/v1/namespaces/{name}")


def admin_kubectl(control_plane: ControlPlane, namespace: str, folder: Path) -> Kubectl:
    """kubectl as cluster admin, in `namespace`; its kubeconfig written into `folder`."""
    config = folder / "admin.kubeconfig"
    config.write_text(json.dumps(control_plane.kubeconfig(control_plane.admin_user(), namespace)))
    return Kubectl(config, control_plane)


@pytest.fixture
def namespace(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    with fresh_namespace(control_plane, getattr(request, "param", None)) as name:
        yield name


@pytest.fixture
def kubectl(control_plane: ControlPlane, namespace: str, tmp_path: Path) -> Kubectl:
    return admin_kubectl(control_plane, namespace, tmp_path)
