"""A test kubelet: runs each pod's containers as local processes, talking to the API like a kubelet.

It lists pods over HTTP, materialises their volumes (Secret, ConfigMap, downwardAPI kept current
as annotations change, emptyDir, hostPath and PVC as directories that outlive the pod), starts the
containers' command and args with container paths mapped to those directories (in args and in
ConfigMap files), maps the job's server Service to one loopback port, and writes the pod's phase
and container statuses back through `pods/<name>/status`. Deleting a pod kills its processes.

Faithful to a real kubelet where it matters:
- each container runs as its security context's user and group (pod level, overridden per
  container), with the pod's fsGroup and supplementalGroups as extra groups; `runAsNonRoot`
  with uid 0 is refused (CreateContainerConfigError). The interpreter under a private home
  (/root is 0700) is reached through a private mount namespace of the process, nothing else.
- Secret, ConfigMap and downwardAPI files are owned by root, with `mode`/`defaultMode` (0644 by
  default); with an fsGroup they belong to that group and gain group read (as the kubelet's
  SetVolumeOwnership does); emptyDir is 0777 (+ setgid, fsGroup); a hostPath directory it creates
  is root's, 0755, and never gets the fsGroup; a PVC gets the fsGroup and its subPath directories
  are made like the volume's root.
- downwardAPI files change `downward_delay_s` after the annotation did (a real kubelet: seconds
  to a minute, its sync period).
- init containers run in order to completion before the main containers; an init container
  with `restartPolicy: Always` is a native sidecar: started before the main containers, kept
  running (restarted) while they run, stopped when they have all ended. The pod's
  `restartPolicy` (Never, OnFailure, Always) decides whether an ended main container is
  restarted; the pod's phase is Succeeded/Failed once every main container has ended for good.
  Container statuses (running, terminated with exit code, restartCount) are reported.
- The host-control sidecar's process is a stand-in that only sleeps: the real one shapes the
  pod's own eth0 (in the pod's network namespace) with tc (its own tests live in tests/host).
  With `real_sidecar` set (a folder of stand-in ares-shape/ares-unshape scripts) the real sidecar
  runs instead, its power modes on whatever `nvpmodel` the test put at the node's
  /usr/sbin/nvpmodel (a hostPath), its shaping on an interface that does not exist and through
  those scripts: it never touches this machine's network.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import httpx

from tests.support import die_with_pytest

Obj = dict[str, Any]
AS_ROOT = os.geteuid() == 0  # without root no user is switched and no file changes hands
# Containers whose process is replaced by a stand-in that only sleeps (see the module docstring).
STAND_INS = {"host-control": ["sleep", "infinity"]}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class _Container:
    """One container of a pod: its spec, its process (if started) and what the kubelet reports."""

    def __init__(self, spec: Obj, kind: str):
        self.spec, self.kind, self.name = spec, kind, spec["name"]  # kind: init, sidecar or main
        self.proc: Optional[subprocess.Popen] = None
        self.restarts = 0
        self.exit_code: Optional[int] = None   # of the last run, once it ended
        self.done = False                      # ended for good (not to be restarted)
        self.started_at: Optional[str] = None
        self.finished_at: Optional[str] = None
        self.waiting: Optional[tuple[str, str]] = None  # (reason, message) when it cannot start

    def poll(self) -> Optional[int]:
        """The exit code if the process has just ended (kernel signals as 128 + signal)."""
        if self.proc is None or self.exit_code is not None:
            return None
        code = self.proc.poll()
        if code is None:
            return None
        self.exit_code = 128 - code if code < 0 else code
        self.finished_at = _now()
        return self.exit_code

    def status(self) -> Obj:
        out: Obj = {"name": self.name, "image": self.spec.get("image", ""), "imageID": "",
                    "restartCount": self.restarts, "started": False, "ready": False}
        if self.waiting is not None:
            out["state"] = {"waiting": {"reason": self.waiting[0], "message": self.waiting[1]}}
        elif self.proc is None:
            out["state"] = {"waiting": {"reason": "PodInitializing"}}
        elif self.exit_code is None:
            out.update(started=True, ready=True, state={"running": {"startedAt": self.started_at}})
        else:
            out["state"] = {"terminated": {"exitCode": self.exit_code, "startedAt": self.started_at,
                                           "finishedAt": self.finished_at,
                                           "reason": "Completed" if self.exit_code == 0 else "Error"}}
        return out


class _Pod:
    def __init__(self, obj: Obj, root: Path):
        self.obj = obj
        meta = obj["metadata"]
        self.name, self.namespace, self.uid = meta["name"], meta["namespace"], meta["uid"]
        self.dir = root / "pods" / f"{self.name}-{self.uid[:8]}"
        spec = obj["spec"]
        self.init = [_Container(c, "sidecar" if c.get("restartPolicy") == "Always" else "init")
                     for c in spec.get("initContainers") or []]
        self.main = [_Container(c, "main") for c in spec["containers"]]
        self.restart_policy = spec.get("restartPolicy", "Always")
        self.phase = "Pending"
        self.annotations: Optional[dict] = None  # what the downwardAPI files show
        self.seen: list[tuple[float, dict]] = []  # (when seen on the API, annotations), oldest first
        self.volumes: dict[str, Path] = {}
        self.reported: Optional[Obj] = None

    @property
    def containers(self) -> list[_Container]:
        return self.init + self.main

    @property
    def procs(self) -> list[subprocess.Popen]:
        return [c.proc for c in self.containers if c.proc is not None]


def _killpg(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def _private_ancestor(path: Path) -> Optional[tuple[Path, Path]]:
    """(dir, child): the first ancestor of `path` that others cannot traverse (such as /root,
    0700) and its child on the way to `path`; None when every ancestor is open."""
    parts = path.parts
    for i in range(1, len(parts) - 1):
        here = Path(*parts[: i + 1])
        if not os.stat(here).st_mode & stat.S_IXOTH:
            return here, here / parts[i + 1]
    return None


class Kubelet:
    """Serves the pods of one namespace on a set of nodes it registers (there is no scheduler:
    a pod without a nodeName is bound here to the first node whose labels match its nodeSelector)."""

    def __init__(self, http: httpx.Client, root: Path, server_port: int, namespace: str,
                 nodes: tuple[str, ...] = ("edge-server", "jetson-nano-1", "jetson-nano-2", "raspberry-pi-1"),
                 python: str = sys.executable, real_sidecar: Optional[Path] = None):
        self.http = http
        self.real_sidecar = real_sidecar  # stand-in host scripts: run the real host-control sidecar
        # The node's directories must be reachable by the pods' users (pytest's tmp_path is 0700):
        # a fresh directory under the system's temp dir, linked from `root` for whoever looks.
        self.root = Path(tempfile.mkdtemp(prefix="ares-node-"))
        self.root.chmod(0o755)
        root.parent.mkdir(parents=True, exist_ok=True)
        if not root.exists():
            root.symlink_to(self.root)
        self.server_port, self.python = server_port, python
        self.namespace, self.nodes = namespace, nodes
        self.downward_delay_s = 0.0  # how long a changed annotation takes to reach downwardAPI files
        # The interpreter may live under a home others cannot enter: reach it in a mount namespace.
        self._private = _private_ancestor(Path(os.path.realpath(python)))
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
        for pod in list(self.pods.values()):
            self._kill(pod)
        shutil.rmtree(self.root, ignore_errors=True)

    # --- what tests use ----------------------------------------------------------------------------

    def kill(self, pod_name: str, container: Optional[str] = None) -> None:
        """SIGKILL a running pod's processes, as if its device lost power; or only one container's
        (its process group: granian's worker dies with its master)."""
        for pod in list(self.pods.values()):
            if pod.name == pod_name and pod.phase == "Running":
                for c in pod.containers:
                    if c.proc is not None and container in (None, c.name):
                        _killpg(c.proc)

    def processes(self, pod_name: str) -> dict[str, list[tuple[int, int, int]]]:
        """Per running container of the pod: (pid, uid, gid) of every process in its group."""
        out: dict[str, list[tuple[int, int, int]]] = {}
        for pod in list(self.pods.values()):
            if pod.name != pod_name:
                continue
            for c in pod.containers:
                if c.proc is not None and c.exit_code is None:
                    out[c.name] = _group_ids(c.proc.pid)
        return out

    def volume_dir(self, pod_name: str, volume: str) -> Optional[Path]:
        pod = next((p for p in list(self.pods.values()) if p.name == pod_name), None)
        return pod.volumes.get(volume) if pod else None

    def log(self, pod_name: str) -> str:
        # (a copy: the kubelet's thread adds and removes pods meanwhile)
        return "\n".join(p.read_text(errors="replace") for pod in list(self.pods.values()) if pod.name == pod_name
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
        """Volumes, then init containers in order (a native sidecar starts and stays), then the
        main containers. An init container that fails fails the pod (restartPolicy Never)."""
        spec = pod.obj["spec"]
        pod.dir.mkdir(parents=True, exist_ok=True)
        pod.volumes = {v["name"]: self._volume(pod, v) for v in spec.get("volumes") or []}
        pod.phase = "Pending"
        self._status(pod, {"phase": "Pending", "podIP": "127.0.0.1", "startTime": _now()})
        for c in pod.init:
            if not self._launch(pod, c):
                return self._end(pod, "Failed")
            if c.kind == "init":
                try:
                    c.proc.wait(120)
                except subprocess.TimeoutExpired:
                    _killpg(c.proc)
                c.poll()
                c.done = True
                if c.exit_code != 0:
                    return self._end(pod, "Failed")
        for c in pod.main:
            if not self._launch(pod, c):
                return self._end(pod, "Failed")
        pod.phase = "Running"
        self._report(pod)

    def _launch(self, pod: _Pod, c: _Container) -> bool:
        """Start the container's process as its user; False (and a waiting reason) if refused."""
        spec = c.spec
        pod_sc = pod.obj["spec"].get("securityContext") or {}
        sc = {**pod_sc, **(spec.get("securityContext") or {})}
        uid, gid = int(sc.get("runAsUser", 0)), int(sc.get("runAsGroup", 0))
        if sc.get("runAsNonRoot") and uid == 0:
            c.waiting = ("CreateContainerConfigError", "container has runAsNonRoot and image will run as root")
            return False
        groups = sorted({gid, *(int(g) for g in pod_sc.get("supplementalGroups") or []),
                         *([int(pod_sc["fsGroup"])] if "fsGroup" in pod_sc else [])})
        mounts = []
        for m in spec.get("volumeMounts") or []:
            host = pod.volumes[m["name"]]
            if m.get("subPath"):
                host = self._sub_path(host, m["subPath"])
            mounts.append((m["mountPath"], host))
        mounts.sort(key=lambda kv: -len(kv[0]))
        self._rewrite_files(pod, mounts)
        argv = [self._map(a, pod, mounts) for a in spec.get("command", []) + spec.get("args", [])]
        extra_env: dict[str, str] = {}
        if c.name in STAND_INS and self.real_sidecar is None:
            argv = list(STAND_INS[c.name])
        elif c.name in STAND_INS:  # the real sidecar, shaping nothing (see the module docstring)
            argv = [self.python, "-m", "ares", *[("ares-none0" if prev == "--interface" else a)
                                                 for prev, a in zip([""] + argv[1:], argv[1:])]]
            extra_env["ARES_HOSTSCRIPTS"] = str(self.real_sidecar)
        elif argv[:1] == ["ares"]:
            argv = [self.python, "-m", "ares", *argv[1:]]
        if "server" in argv[3:4]:
            argv += ["--host", "127.0.0.1", "--port", str(self.server_port)]
        https = [a for a in spec.get("args", []) if a.startswith("https://") and f".{pod.namespace}.svc" in a]
        if https:  # dialled on loopback, the certificate is still checked for the Service's name
            argv += ["--tls-server-name", https[0].removeprefix("https://").rsplit(":", 1)[0]]
        home = pod.dir / "home" / c.name  # the container's own writable working directory
        home.mkdir(parents=True, exist_ok=True)
        if AS_ROOT:
            os.chown(home, uid, gid)
        env = dict(os.environ, HOME=str(home), **{e["name"]: e.get("value", "") for e in spec.get("env") or []},
                   **extra_env)
        if (uid != 0 or gid != 0) and AS_ROOT:
            argv = self._as_user(argv, uid, gid, groups)
        log = open(pod.dir / f"{c.name}.log", "ab")
        # the container ends with the test process, however that ends (SIGKILL, a timeout): its
        # own session keeps it from pytest's signals, the parent-death signal does not
        c.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=home,
                                  start_new_session=True, preexec_fn=die_with_pytest)
        log.close()
        c.exit_code, c.waiting, c.started_at, c.finished_at = None, None, _now(), None
        return True

    def _as_user(self, argv: list[str], uid: int, gid: int, groups: list[int]) -> list[str]:
        """setpriv drops to uid/gid/groups just before exec (no capabilities are kept). Where the
        interpreter sits under a private home, a mount namespace of this process alone shows that
        one path: the home becomes a tmpfs holding a bind mount of the interpreter's tree."""
        # (a change of user clears the parent-death signal: setpriv sets it again)
        drop = ["setpriv", f"--reuid={uid}", f"--regid={gid}", f"--groups={','.join(map(str, groups))}",
                "--inh-caps=-all", "--pdeathsig", "TERM", "--", *argv]
        if self._private is None:
            return drop
        home, child = self._private
        stage = self.root / "stage"
        stage.mkdir(exist_ok=True)
        script = ('set -e; mount --bind "$1" "$2"; mount -t tmpfs -o mode=0755 tmpfs "$3"; '
                  'mkdir -p "$1"; mount --bind "$2" "$1"; shift 3; exec "$@"')
        return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script, "sh",
                str(child), str(stage), str(home), *drop]

    def _watch_exit(self, pod: _Pod) -> None:
        """Restart what the policy restarts; end the pod when every main container has ended."""
        if pod.phase != "Running":
            return
        for c in pod.main:
            code = c.poll()
            if code is None or c.done:
                continue
            if self.restart_again(pod.restart_policy, code):
                c.restarts += 1
                self._launch(pod, c)
            else:
                c.done = True
        if all(c.done for c in pod.main):
            return self._end(pod, "Succeeded" if all(c.exit_code == 0 for c in pod.main) else "Failed")
        for c in pod.init:
            if c.kind == "sidecar" and c.poll() is not None:  # a native sidecar is always restarted
                c.restarts += 1
                self._launch(pod, c)
        self._report(pod)

    @staticmethod
    def restart_again(policy: str, code: int) -> bool:
        return policy == "Always" or (policy == "OnFailure" and code != 0)

    def _end(self, pod: _Pod, phase: str) -> None:
        """Stop the sidecars (after the main containers, as the kubelet does) and report the end."""
        for c in pod.containers:
            if c.proc is not None and c.exit_code is None:
                c.proc.send_signal(signal.SIGTERM)
                try:
                    c.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
                _killpg(c.proc)
                c.poll()
            c.done = True
        pod.phase = phase
        self._report(pod)

    def _report(self, pod: _Pod) -> None:
        status = {"phase": pod.phase,
                  "initContainerStatuses": [c.status() for c in pod.init],
                  "containerStatuses": [c.status() for c in pod.main]}
        if status != pod.reported:
            self._status(pod, status)
            pod.reported = status

    def _kill(self, pod: _Pod) -> None:
        for proc in pod.procs:
            _killpg(proc)  # even if the leader exited: its children may not have

    def _status(self, pod: _Pod, status: Obj) -> None:
        self.http.patch(f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}/status", json={"status": status},
                        headers={"Content-Type": "application/merge-patch+json"})

    # --- volumes and paths ---------------------------------------------------------------------

    def _volume(self, pod: _Pod, vol: Obj) -> Path:
        fs_group = (pod.obj["spec"].get("securityContext") or {}).get("fsGroup")
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
        if "hostPath" in vol:  # made by the kubelet as root, 0755; fsGroup never applies to hostPath
            _make_dirs(path, 0o755)
            return path
        path.mkdir(parents=True, exist_ok=True)
        if "emptyDir" in vol or "persistentVolumeClaim" in vol:
            path.chmod(0o777)
            _own(path, fs_group, read_only=False)
        elif "secret" in vol:
            secret = self._get(f"/api/v1/namespaces/{pod.namespace}/secrets/{vol['secret']['secretName']}")
            data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
            self._files(path, data, vol["secret"], fs_group)
        elif "configMap" in vol:
            cm = self._get(f"/api/v1/namespaces/{pod.namespace}/configmaps/{vol['configMap']['name']}")
            self._files(path, {k: v.encode() for k, v in (cm.get("data") or {}).items()}, vol["configMap"], fs_group)
        elif "downwardAPI" in vol:
            self._downward_files(pod, vol, pod.obj["metadata"].get("annotations") or {}, path, fs_group)
        return path

    @staticmethod
    def _sub_path(volume: Path, sub: str) -> Path:
        """A subPath directory is made like its volume's root (its mode and group)."""
        path = volume / sub
        if not path.exists():
            info = volume.stat()
            _make_dirs(path, stat.S_IMODE(info.st_mode), info.st_gid)
        return path

    def _get(self, url: str) -> Obj:
        resp = self.http.get(url)
        resp.raise_for_status()
        return resp.json()

    @staticmethod
    def _files(path: Path, data: dict[str, bytes], source: Obj, fs_group: Optional[int]) -> None:
        """Projected files: owner root, `mode` or `defaultMode` (0644), the fsGroup's with group read."""
        items = source.get("items")
        default = source.get("defaultMode", 0o644)
        pairs = [(i["path"], data[i["key"]], i.get("mode", default)) for i in items] if items else \
            [(k, v, default) for k, v in data.items()]
        path.chmod(0o755)
        for name, content, mode in pairs:
            target = path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f".{target.name}.tmp"
            tmp.write_bytes(content)
            tmp.chmod(mode)
            _own(tmp, fs_group, read_only=True)
            tmp.replace(target)
        _own(path, fs_group, read_only=True)

    def _downward(self, pod: _Pod) -> None:
        """Rewrite downwardAPI files to show the annotations as they were `downward_delay_s` ago:
        every change reaches the files that long after this kubelet saw it."""
        annotations = pod.obj["metadata"].get("annotations") or {}
        now = time.monotonic()
        if pod.annotations is None:
            pod.annotations = dict(annotations)  # written when the pod's volumes were made
            pod.seen = [(now - self.downward_delay_s, dict(annotations))]
        if annotations != pod.seen[-1][1]:
            pod.seen.append((now, dict(annotations)))
        due = [i for i, (t, _) in enumerate(pod.seen) if now - t >= self.downward_delay_s]
        if not due:
            return
        pod.seen = pod.seen[due[-1]:]  # the newest due state and what came after it
        if pod.seen[0][1] == pod.annotations:
            return
        pod.annotations = dict(pod.seen[0][1])
        fs_group = (pod.obj["spec"].get("securityContext") or {}).get("fsGroup")
        for vol in pod.obj["spec"].get("volumes") or []:
            if "downwardAPI" in vol and vol["name"] in pod.volumes:
                self._downward_files(pod, vol, pod.annotations, pod.volumes[vol["name"]], fs_group)

    def _downward_files(self, pod: _Pod, vol: Obj, annotations: Obj, path: Path, fs_group: Optional[int]) -> None:
        data = {}
        for item in vol["downwardAPI"].get("items") or []:
            field = item["fieldRef"]["fieldPath"]
            if field == "metadata.annotations":
                text = "\n".join(f"{k}={json.dumps(v)}" for k, v in sorted(annotations.items()))
            else:  # metadata.annotations['key']
                text = annotations.get(field.split("['", 1)[1].rstrip("']"), "")
            data[item["path"]] = text.encode()
        items = [{"key": i["path"], "path": i["path"], **({"mode": i["mode"]} if "mode" in i else {})}
                 for i in vol["downwardAPI"].get("items") or []]
        self._files(path, data, {"items": items, "defaultMode": vol["downwardAPI"].get("defaultMode", 0o644)}, fs_group)

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
                    f.write_text(text)  # in place: mode and owner stay the kubelet's


def _own(path: Path, fs_group: Optional[int], read_only: bool) -> None:
    """What the kubelet's SetVolumeOwnership does with an fsGroup: the group's, g+r (read-only
    volumes) or g+rw, and setgid plus g+x on directories."""
    if fs_group is None or not AS_ROOT:
        return
    os.chown(path, -1, int(fs_group))
    mode = stat.S_IMODE(path.stat().st_mode) | (0o440 if read_only else 0o660)
    if path.is_dir():
        mode |= stat.S_ISGID | 0o110
    path.chmod(mode)


def _make_dirs(path: Path, mode: int, gid: int = 0) -> None:
    missing = []
    here = path
    while not here.exists():
        missing.append(here)
        here = here.parent
    for d in reversed(missing):
        d.mkdir()
        d.chmod(mode)
        if AS_ROOT:
            os.chown(d, 0, gid)


def _group_ids(pgid: int) -> list[tuple[int, int, int]]:
    """(pid, real uid, real gid) of every live process in a process group, from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid or fields[0] == "Z":
                continue
            lines = {k: v.split() for k, v in (line.split(":", 1) for line in
                                               (entry / "status").read_text().splitlines() if ":" in line)}
            out.append((int(entry.name), int(lines["Uid"][0]), int(lines["Gid"][0])))
        except (OSError, IndexError, KeyError, ValueError):
            continue
    return out
