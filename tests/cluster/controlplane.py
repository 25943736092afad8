"""A real Kubernetes control plane on loopback, as controller-runtime's envtest runs one.

etcd + kube-apiserver (RBAC authorisation, the default admission plugins, PodSecurity
included) + kube-controller-manager (garbage collector, namespace lifecycle, service
accounts and their tokens, the root CA publisher), built by `scripts/build-control-plane`.
There is no scheduler and no kubelet: the test kubelet (tests/k8s/k8s_kubelet.py) registers
a Node, binds the pods meant for it and runs them as local processes.

Identities: `admin` (group system:masters) holds a client certificate signed by our CA; any
ServiceAccount gets a real token through the TokenRequest API (`token_for`), so the operator
can run with exactly the RBAC the chart grants.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import httpx

from tests.support import free_port, stop_process

ROOT = Path(__file__).resolve().parents[2]
PR_SET_PDEATHSIG = 1
BUILD_SCRIPT = ROOT / "scripts" / "build-control-plane"
# Which Kubernetes the session control plane is (its binaries' folder); unset: the build's default.
VERSION_ENV = "ARES_K8S_VERSION"
# The controllers a test cluster needs; the rest (deployments, nodes, ...) stay off so nothing
# acts behind the tests' backs (a Deployment is accepted and never rolled out).
CONTROLLERS = ("garbage-collector-controller,namespace-controller,serviceaccount-controller,"
               "serviceaccount-token-controller,root-ca-certificate-publisher-controller,"
               # what RBAC and quotas need to behave as on a real cluster: the built-in admin/edit/view
               # roles take in aggregated rules; a ResourceQuota's status.used is kept.
               "clusterrole-aggregation-controller,resourcequota-controller")
# With real nodes (tests/cluster/nodes.py): what kubelets, a scheduler and kube-proxy need besides.
# Nodes become Ready and lose the not-ready taint, Deployments roll out, Services get EndpointSlices.
NODE_CONTROLLERS = (CONTROLLERS + ",node-lifecycle-controller,deployment-controller,replicaset-controller,"
                    "endpointslice-controller,endpointslice-mirroring-controller,pod-garbage-collector-controller")
# The first address of the Service range: the `kubernetes` Service, which pods reach the API server by.
KUBERNETES_SERVICE_IP = "10.96.0.1"


class ControlPlaneUnavailable(RuntimeError):
    """The binaries are not built (and could not be); the tests that need them skip with this."""


def k8s_version() -> Optional[str]:
    """The Kubernetes version the tests run on: $ARES_K8S_VERSION (e.g. v1.35.4), or None for the
    build script's default."""
    return os.environ.get(VERSION_ENV) or None


def bin_dir(version: Optional[str] = None) -> Path:
    """Where scripts/build-control-plane put the binaries of Kubernetes `version` (by default
    `k8s_version()`); raises if they are not all there."""
    version = version or k8s_version()
    env = dict(os.environ, K8S_VERSION=version) if version else None
    proc = subprocess.run([str(BUILD_SCRIPT), "--print-bin"], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        build = f"K8S_VERSION={version} scripts/build-control-plane" if version else "scripts/build-control-plane"
        raise ControlPlaneUnavailable(f"control plane not built in {proc.stdout.strip() or '?'}: run {build}"
                                      f"{' (' + proc.stderr.strip() + ')' if proc.stderr.strip() else ''}")
    return Path(proc.stdout.strip())


def tested_versions() -> list[str]:
    """The Kubernetes versions the tests prove, oldest first (CI runs the cluster tests on each)."""
    proc = subprocess.run([str(BUILD_SCRIPT), "--tested-versions"], capture_output=True, text=True, check=True)
    return proc.stdout.split()


def _die_with_parent() -> None:
    """A test run killed hard (timeout, ^C twice) leaves no control plane behind: the kernel
    kills each of its processes when the test process dies (Linux prctl)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _openssl(*args: str, stdin: Optional[bytes] = None) -> bytes:
    return subprocess.run(["openssl", *args], input=stdin, capture_output=True, check=True).stdout


def _make_pki(d: Path, address: str = "127.0.0.1") -> None:
    """A CA, the API server's serving cert (127.0.0.1, `address`, the `kubernetes` Service's IP and
    names), an admin client cert, the SA signing key."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"), "-days", "2",
             "-subj", "/CN=ares-test-ca")
    names = ",".join(dict.fromkeys([
        "IP:127.0.0.1", f"IP:{address}", f"IP:{KUBERNETES_SERVICE_IP}", "DNS:localhost", "DNS:kubernetes",
        "DNS:kubernetes.default", "DNS:kubernetes.default.svc", "DNS:kubernetes.default.svc.cluster.local"]))
    for name, subj, ext in (
        ("apiserver", "/CN=kube-apiserver", f"subjectAltName={names}\nextendedKeyUsage=serverAuth"),
        ("admin", "/O=system:masters/CN=admin", "extendedKeyUsage=clientAuth"),
    ):
        csr = _openssl("req", *ec, "-keyout", str(d / f"{name}.key"), "-subj", subj)
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-CA", str(d / "ca.crt"), "-CAkey", str(d / "ca.key"), "-CAcreateserial",
                 "-days", "2", "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.crt"), stdin=csr)
    _openssl("genrsa", "-out", str(d / "sa.key"), "2048")
    _openssl("rsa", "-in", str(d / "sa.key"), "-pubout", "-out", str(d / "sa.pub"))


@dataclass
class ControlPlane:
    """Start with `start()` (or as a context manager); everything lives under `workdir`."""

    workdir: Path
    bin: Path = field(default_factory=bin_dir)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    api_port: int = 0
    # Run on the ready API server before kube-controller-manager starts: CRDs installed here are in
    # the garbage collector's first discovery (later ones wait for its 30 s resync: a first delete
    # of a custom resource's children used to take ~40 s).
    before_controllers: Optional[Callable[["ControlPlane"], None]] = None
    # Where the API server listens and what it advertises. Loopback (the default) serves the test
    # kubelet; pods on real nodes need an address they route to (a host bridge's, nodes.py), which
    # then also becomes the `kubernetes` Service's endpoint.
    address: str = "127.0.0.1"
    controllers: str = CONTROLLERS

    @property
    def url(self) -> str:
        return f"https://{self.address}:{self.api_port}"

    @property
    def pki(self) -> Path:
        return self.workdir / "pki"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    def kubeconfig(self, user: dict, namespace: str = "default") -> dict:
        ca = (self.pki / "ca.crt").read_bytes()
        import base64
        return {
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {
                "server": self.url, "certificate-authority-data": base64.b64encode(ca).decode()}}],
            "users": [{"name": "user", "user": user}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user", "namespace": namespace}}],
        }

    def admin_user(self) -> dict:
        return {"client-certificate": str(self.pki / "admin.crt"), "client-key": str(self.pki / "admin.key")}

    def http(self, **kw) -> httpx.Client:
        """An admin client for the API (as the test kubelet and fixtures use)."""
        # One SSL context with both: httpx 0.28 drops `cert=` when `verify` is a path.
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return httpx.Client(base_url=self.url, verify=ctx, timeout=30, **kw)

    # --- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> "ControlPlane":
        try:
            self.start()
        except BaseException:
            self.stop()  # what did start (etcd, the API server) does not outlive a failed start
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 90.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pki.mkdir(exist_ok=True)
        _make_pki(self.pki, self.address)
        etcd_port, peer_port, self.api_port, cm_port = free_port(), free_port(), free_port(), free_port()
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        self._spawn("etcd", [
            str(self.bin / "etcd"), "--data-dir", str(self.workdir / "etcd"), "--name", "test",
            "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"test=http://127.0.0.1:{peer_port}",
            "--unsafe-no-fsync", "--log-level", "warn"])
        p = self.pki
        self._spawn("kube-apiserver", [
            str(self.bin / "kube-apiserver"), "--etcd-servers", f"http://127.0.0.1:{etcd_port}",
            "--bind-address", self.address, "--advertise-address", self.address,
            "--secure-port", str(self.api_port), "--cert-dir", str(self.workdir / "apiserver-certs"),
            "--tls-cert-file", str(p / "apiserver.crt"), "--tls-private-key-file", str(p / "apiserver.key"),
            "--client-ca-file", str(p / "ca.crt"),
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file", str(p / "sa.pub"),
            "--service-account-signing-key-file", str(p / "sa.key"),
            "--service-cluster-ip-range", "10.96.0.0/16", "--allow-privileged=true",
            # No Endpoints for the `kubernetes` Service: loopback is not a valid endpoint address
            # (before 1.37 the reconciler failed every 10 s; 1.37 refuses to start with one).
            "--endpoint-reconciler-type", "none" if self.address.startswith("127.") else "lease",
            # `kubectl logs`/`exec` reach a real kubelet at its node's InternalIP, with a client cert.
            "--kubelet-preferred-address-types", "InternalIP",
            "--kubelet-client-certificate", str(p / "admin.crt"), "--kubelet-client-key", str(p / "admin.key"),
            "--authorization-mode", "RBAC",
            # On top of the defaults (PodSecurity among them): what stricter clusters enforce, so
            # that children with blockOwnerDeletion need `update` on aresjobs/finalizers.
            "--enable-admission-plugins", "OwnerReferencesPermissionEnforcement",
            "--profiling=false", "--v", "1"])
        self.admin_kubeconfig.write_text(json.dumps(self.kubeconfig(self.admin_user())))
        self._wait_ready(timeout)
        if self.before_controllers is not None:
            self.before_controllers(self)
        self._spawn("kube-controller-manager", [
            str(self.bin / "kube-controller-manager"), "--kubeconfig", str(self.admin_kubeconfig),
            "--authentication-kubeconfig", str(self.admin_kubeconfig),
            "--authorization-kubeconfig", str(self.admin_kubeconfig),
            "--bind-address", "127.0.0.1", "--secure-port", str(cm_port),
            "--leader-elect=false", "--controllers", self.controllers,
            "--service-account-private-key-file", str(p / "sa.key"), "--root-ca-file", str(p / "ca.crt"),
            "--concurrent-gc-syncs", "5", "--v", "1"])
        self.wait_service_account("default", timeout=timeout)

    def stop(self) -> None:
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            proc = self.procs.pop(name, None)
            if proc is not None and proc.poll() is None:
                stop_process(proc, 10)
        shutil.rmtree(self.workdir / "etcd", ignore_errors=True)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.workdir / "logs" / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=_die_with_parent)

    def log(self, name: str) -> str:
        return (self.workdir / "logs" / f"{name}.log").read_text(errors="replace")

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log(name)[-3000:]}")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.http() as http:
            while True:
                self._check_alive()
                try:
                    if http.get("/readyz").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"kube-apiserver not ready after {timeout:.0f}s:\n"
                                       f"{self.log('kube-apiserver')[-3000:]}")
                time.sleep(0.2)

    def wait_service_account(self, namespace: str, name: str = "default", timeout: float = 60.0) -> None:
        """Pods cannot be created in a namespace before its default ServiceAccount exists."""
        deadline = time.monotonic() + timeout
        with self.http() as http:
            while http.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}").status_code != 200:
                self._check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no ServiceAccount {namespace}/{name} after {timeout:.0f}s:\n"
                                       f"{self.log('kube-controller-manager')[-3000:]}")
                time.sleep(0.1)

    def token_for(self, namespace: str, service_account: str, seconds: int = 3600) -> str:
        """A real, bound ServiceAccount token (TokenRequest API), as a pod would be given."""
        with self.http() as http:
            resp = http.post(f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
                             json={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                   "spec": {"expirationSeconds": seconds}})
            resp.raise_for_status()
            return resp.json()["status"]["token"]


def tool_env(bin: Path, kubeconfig: Path) -> dict[str, str]:
    """The environment for kubectl/helm: our builds first on PATH, this cluster's kubeconfig."""
    return dict(os.environ, PATH=f"{bin}{os.pathsep}{os.environ.get('PATH', '')}", KUBECONFIG=str(kubeconfig),
                HELM_CACHE_HOME=str(kubeconfig.parent / "helm-cache"),
                HELM_CONFIG_HOME=str(kubeconfig.parent / "helm-config"),
                HELM_DATA_HOME=str(kubeconfig.parent / "helm-data"))
