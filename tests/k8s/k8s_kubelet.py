"""A test kubelet: runs each pod's containers as local processes, talking to the API like a kubelet.

It lists pods over HTTP, materialises their volumes (Secret, ConfigMap, downwardAPI kept current
as annotations change, emptyDir, hostPath and PVC as directories that outlive the pod), starts the
containers' command and args with container paths mapped to those directories (in args and in
ConfigMap files), maps the job's server Service to one loopback port, and writes the pod's phase
back through `pods/<name>/status` when the process starts and exits. Deleting a pod kills its
processes. The host-control sidecar is not run (it needs root and tc on a real node; its own tests
live in tests/host): a pod counts as Running while its trainer runs.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import httpx

Obj = dict[str, Any]
SKIPPED_CONTAINERS = {"host-control"}


class _Pod:
    def __init__(self, obj: Obj, root: Path):
        self.obj = obj
        meta = obj["metadata"]
        self.name, self.namespace, self.uid = meta["name"], meta["namespace"], meta["uid"]
        self.dir = root / "pods" / f"{self.name}-{self.uid[:8]}"
        self.procs: list[subprocess.Popen] = []
        self.phase = "Pending"
        self.annotations: Optional[dict] = None


def _killpg(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


class Kubelet:
    """Serves the pods of one namespace on a set of nodes it registers (there is no scheduler:
    a pod without a nodeName is bound here to the first node whose labels match its nodeSelector)."""

    def __init__(self, http: httpx.Client, root: Path, server_port: int, namespace: str,
                 nodes: tuple[str, ...] = ("edge-server", "jetson-nano-1", "jetson-nano-2", "raspberry-pi-1"),
                 python: str = sys.executable):
        self.http = http
        self.root, self.server_port, self.python = root, server_port, python
        self.namespace, self.nodes = namespace, nodes
        self.pods: dict[str, _Pod] = {}  # by uid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kubelet", daemon=True)
        self.errors: list[str] = []

    def __enter__(self) -> "Kubelet":
        self._register_nodes()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)
        for pod in self.pods.values():
            self._kill(pod)

    # --- what tests use ----------------------------------------------------------------------------

    def kill(self, pod_name: str) -> None:
        """SIGKILL a running pod's processes, as if its device lost power."""
        for pod in self.pods.values():
            if pod.name == pod_name and pod.phase == "Running":
                for proc in pod.procs:
                    _killpg(proc)  # the whole process group: granian's worker dies with its master

    def log(self, pod_name: str) -> str:
        return "\n".join(p.read_text(errors="replace") for pod in self.pods.values() if pod.name == pod_name
                         for p in sorted(pod.dir.glob("*.log")))

    # --- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self._sync()
            except Exception as exc:  # keep going; the test will see the effect (or the error)
                self.errors.append(repr(exc))

    def _register_nodes(self) -> None:
        """A Node per name, labelled as a kubelet labels its own (kubernetes.io/hostname)."""
        for name in self.nodes:
            node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {
                "kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}}}
            resp = self.http.post("/api/v1/nodes", json=node)
            if resp.status_code not in (201, 409):
                resp.raise_for_status()

    def _bind(self, pod: Obj) -> Optional[str]:
        """The scheduler's one job, done here: bind a pending pod to a node of ours that fits."""
        wanted = pod["spec"].get("nodeSelector") or {}
        for name in self.nodes:
            labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}
            if all(labels.get(k) == v for k, v in wanted.items()):
                meta = pod["metadata"]
                resp = self.http.post(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/binding", json={
                    "apiVersion": "v1", "kind": "Binding", "metadata": {"name": meta["name"], "uid": meta["uid"]},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": name}})
                return name if resp.status_code == 201 else None
        return None

    def _sync(self) -> None:
        resp = self.http.get(f"/api/v1/namespaces/{self.namespace}/pods")
        resp.raise_for_status()
        items = resp.json()["items"]
        for p in items:
            if not p["spec"].get("nodeName") and not p["metadata"].get("deletionTimestamp"):
                p["spec"]["nodeName"] = self._bind(p)
        ours = [p for p in items if p["spec"].get("nodeName") in self.nodes]
        for p in ours:
            if p["metadata"].get("deletionTimestamp"):
                self._finish_deletion(p)
        live = {p["metadata"]["uid"]: p for p in ours if not p["metadata"].get("deletionTimestamp")}
        for uid, pod in list(self.pods.items()):
            if uid not in live:
                self._kill(pod)
                del self.pods[uid]
        for uid, obj in live.items():
            pod = self.pods.get(uid)
            if pod is None:
                pod = self.pods[uid] = _Pod(obj, self.root)
                self._start(pod)
            pod.obj = obj
            self._downward(pod)
            self._watch_exit(pod)

    def _finish_deletion(self, obj: Obj) -> None:
        """A bound pod stays Terminating until its kubelet has stopped it and says so (grace 0)."""
        meta = obj["metadata"]
        pod = self.pods.pop(meta["uid"], None)
        if pod is not None:
            self._kill(pod)
        self.http.request("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", json={
            "apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
            "preconditions": {"uid": meta["uid"]}})

    def _start(self, pod: _Pod) -> None:
        spec = pod.obj["spec"]
        volumes = {v["name"]: self._volume(pod, v) for v in spec.get("volumes") or []}
        for container in spec["containers"]:
            if container["name"] in SKIPPED_CONTAINERS:
                continue
            mounts = sorted(((m["mountPath"], volumes[m["name"]]) for m in container.get("volumeMounts") or []),
                            key=lambda kv: -len(kv[0]))
            self._rewrite_files(pod, mounts)
            argv = [self._map(a, pod, mounts) for a in container.get("command", []) + container.get("args", [])]
            if argv[:1] == ["ares"]:
                argv = [self.python, "-m", "ares", *argv[1:]]
            if "server" in argv[3:4]:
                argv += ["--host", "127.0.0.1", "--port", str(self.server_port)]
            https = [a for a in container.get("args", []) if a.startswith("https://") and f".{pod.namespace}.svc" in a]
            if https:  # dialled on loopback, the certificate is still checked for the Service's name
                argv += ["--tls-server-name", https[0].removeprefix("https://").rsplit(":", 1)[0]]
            env = dict(os.environ, **{e["name"]: e.get("value", "") for e in container.get("env") or []})
            log = open(pod.dir / f"{container['name']}.log", "wb")
            pod.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                              cwd=pod.dir, start_new_session=True))
        pod.phase = "Running"
        self._status(pod, {"phase": "Running", "podIP": "127.0.0.1",
                           "startTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def _watch_exit(self, pod: _Pod) -> None:
        if pod.phase != "Running" or any(p.poll() is None for p in pod.procs):
            return
        codes = [p.returncode for p in pod.procs]
        pod.phase = "Succeeded" if all(c == 0 for c in codes) else "Failed"
        self._status(pod, {"phase": pod.phase, "containerStatuses": [
            {"name": str(i), "state": {"terminated": {"exitCode": c}}} for i, c in enumerate(codes)]})

    def _kill(self, pod: _Pod) -> None:
        for proc in pod.procs:
            _killpg(proc)  # even if the leader exited: its children may not have

    def _status(self, pod: _Pod, status: Obj) -> None:
        self.http.patch(f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}/status", json={"status": status},
                        headers={"Content-Type": "application/merge-patch+json"})

    # --- volumes and paths ---------------------------------------------------------------------

    def _volume(self, pod: _Pod, vol: Obj) -> Path:
        if "hostPath" in vol:  # shared by every pod on this "node", like a real host directory
            path = self.root / "host" / vol["hostPath"]["path"].lstrip("/")
        elif "persistentVolumeClaim" in vol:
            path = self.root / "pvc" / pod.namespace / vol["persistentVolumeClaim"]["claimName"]
        else:
            path = pod.dir / "volumes" / vol["name"]
        if "hostPath" in vol and vol["hostPath"].get("type") == "File":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
            return path
        path.mkdir(parents=True, exist_ok=True)
        if "secret" in vol:
            secret = self._get(f"/api/v1/namespaces/{pod.namespace}/secrets/{vol['secret']['secretName']}")
            data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
            self._files(path, data, vol["secret"].get("items"))
        elif "configMap" in vol:
            cm = self._get(f"/api/v1/namespaces/{pod.namespace}/configmaps/{vol['configMap']['name']}")
            self._files(path, {k: v.encode() for k, v in (cm.get("data") or {}).items()}, vol["configMap"].get("items"))
        return path

    def _get(self, url: str) -> Obj:
        resp = self.http.get(url)
        resp.raise_for_status()
        return resp.json()

    @staticmethod
    def _files(path: Path, data: dict[str, bytes], items: Optional[list[Obj]]) -> None:
        pairs = [(i["path"], data[i["key"]]) for i in items] if items else list(data.items())
        for name, content in pairs:
            (path / name).write_bytes(content)

    def _downward(self, pod: _Pod) -> None:
        """Rewrite downwardAPI files when the annotations change (atomically, as the kubelet does)."""
        annotations = pod.obj["metadata"].get("annotations") or {}
        if annotations == pod.annotations:
            return
        pod.annotations = dict(annotations)
        for vol in pod.obj["spec"].get("volumes") or []:
            for item in (vol.get("downwardAPI") or {}).get("items") or []:
                field = item["fieldRef"]["fieldPath"]
                if field == "metadata.annotations":
                    text = "\n".join(f"{k}={json.dumps(v)}" for k, v in sorted(annotations.items()))
                else:  # metadata.annotations['key']
                    text = annotations.get(field.split("['", 1)[1].rstrip("']"), "")
                target = pod.dir / "volumes" / vol["name"] / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_suffix(".tmp")
                tmp.write_text(text)
                tmp.replace(target)

    def _map(self, arg: str, pod: _Pod, mounts: list[tuple[str, Path]]) -> str:
        ns = pod.namespace
        if ".svc" in arg and f".{ns}.svc" in arg:  # the job's server Service -> its loopback port
            scheme = next((s for s in ("http://", "https://") if arg.startswith(s)), "")
            return f"{scheme}127.0.0.1:{self.server_port}" if scheme else "127.0.0.1"
        for mount_path, host in mounts:
            if arg == mount_path or arg.startswith(mount_path + "/"):
                return str(host) + arg[len(mount_path):]
        return arg

    def _rewrite_files(self, pod: _Pod, mounts: list[tuple[str, Path]]) -> None:
        """Config files name container paths too (server.yaml's tokens_dir, checkpoint_dir)."""
        for _, host in mounts:
            if host.is_dir() and host.is_relative_to(pod.dir):
                for f in host.glob("*.yaml"):
                    text = f.read_text()
                    for mount_path, target in mounts:
                        text = text.replace(f": {mount_path}\n", f": {target}\n")
                    f.write_text(text)
