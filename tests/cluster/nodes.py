"""Real Kubernetes nodes on this host, beside a control plane of controlplane.py.

Two kubelets, each with its own containerd (runc, the CNI bridge plugin), root and cert dirs,
ports, cgroup root, pod log dir and bridge, form two nodes; one kube-scheduler and one
kube-proxy (iptables mode) serve both; CoreDNS runs as a host process behind the `kube-dns`
Service, so pods resolve `<service>.<namespace>.svc` through kube-proxy as on any cluster. All of
it is built by scripts/build-node (and scripts/build-control-plane); runc is the host's.

The network, all of it on this host:

- `aresn-host`, an empty bridge holding `HOST_IP` (10.244.0.1/32): the API server listens there,
  the kubelets advertise it as their InternalIP, CoreDNS serves there. The Service range
  (10.96.0.0/16) is routed into this bridge, so ClusterIP traffic kube-proxy does not translate is
  dropped here instead of leaving the machine.
- `aresn-1`, `aresn-2`: one bridge per node (10.244.N.0/24, gateway 10.244.N.1), forwarding on
  (per interface: the host's net.ipv4.ip_forward is left as it is) and iptables on bridged
  traffic (per bridge), no masquerading.

Cgroup v1 (this host): the kubelet refuses it unless its configuration says
`failCgroupV1: false`; `cgroupDriver: cgroupfs`. containerd needs `restrict_oom_score_adj`
(runc cannot set negative OOM scores in this VM: "can't get final child's PID from pipe: EOF").
Each node's containerd runs without NRI: its socket is one per host (/var/run/nri/nri.sock), and
two containerds starting at once failed with "bind: address already in use" for it.

What stays between runs: each node's containerd root under ~/.cache/ares/nodes (its images;
an image is imported again only when podman's image ID changed). What does not: everything
else. `stop()` (and a start that finds what a killed run left, from the record it keeps under
/run) stops the processes, unmounts, removes the bridges, routes, iptables chains and cgroups it
made, and puts back the sysctls the kubelet changes (vm.overcommit_memory, kernel.panic,
kernel.panic_on_oops, ...), and removes what a killed `podman save` left of an image import.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from cluster.controlplane import ControlPlane, tool_env
from tests.support import stop_process

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts" / "build-node"
CACHE = Path(os.environ.get("ARES_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ares")
STORE = CACHE / "nodes"              # containerd roots (images), kept between runs
SAVE_TMP = STORE / "podman-save"     # `podman save`'s temporary copy of an image (GBs): removed by cleanup_host
STATE = Path("/run/ares-nodes")      # everything else of a run, and the record of what it changed
HOST_BRIDGE = "aresn-host"
HOST_IP = "10.244.0.1"
CLUSTER_CIDR = "10.244.0.0/16"
SERVICE_RANGE = "10.96.0.0/16"
DNS_IP = "10.96.0.10"
PAUSE_IMAGE = "localhost/ares-pause:1"
RUNC = "/usr/sbin/runc"
# What kubelet and kube-proxy may change (kubelet: its kernel tunables; the bridge plugin, kube-proxy).
SYSCTLS = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
           "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes", "net/ipv4/ip_forward",
           "net/ipv4/conf/all/forwarding", "net/ipv4/conf/all/route_localnet",
           "net/bridge/bridge-nf-call-iptables", "net/bridge/bridge-nf-call-ip6tables",
           "net/netfilter/nf_conntrack_max", "net/netfilter/nf_conntrack_tcp_timeout_established",
           "net/netfilter/nf_conntrack_tcp_timeout_close_wait", "net/netfilter/nf_conntrack_tcp_be_liberal")
# kube-proxy's and the kubelets' chains (the CNI config has no masquerading and no host ports:
# no CNI-* chains, and those of podman's CNI networks are never touched).
OWN_CHAIN_PREFIXES = ("KUBE-",)
# A Jetson pod's sidecar mounts the host's nvpmodel and its configuration (hostPath, type File).
# Where the host has none, a stand-in that records its calls is put there for the run, and removed.
NVPMODEL_CONF = Path("/etc/nvpmodel.conf")
NVPMODEL_BIN = Path("/usr/sbin/nvpmodel")
NVPMODEL_CALLS = Path("/var/lib/nvpmodel/ares-test-calls")
FAKE_NVPMODEL = f"""#!/bin/sh
# stand-in for NVIDIA's nvpmodel on a test node: records its arguments
echo "$@" >> {NVPMODEL_CALLS}
"""
PR_SET_PDEATHSIG = 1
LOCK = Path("/run/ares-nodes.lock")  # one user of the nodes' names, bridges and stores at a time
PREFIX = os.environ.get("ARES_IMAGE_PREFIX", "localhost/ares")
TAG = os.environ.get("ARES_IMAGE_TAG", "dev")


class NodesUnavailable(RuntimeError):
    """Not built, or not root: the real-node tests skip with this (outside CI)."""


@dataclass(frozen=True)
class NodeSpec:
    name: str
    index: int                     # its bridge aresn-<index>, subnet 10.244.<index>.0/24
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def bridge(self) -> str:
        return f"aresn-{self.index}"

    @property
    def gateway(self) -> str:
        return f"10.244.{self.index}.1"

    @property
    def subnet(self) -> str:
        return f"10.244.{self.index}.0/24"


# Named as the README and examples/job.yaml place pods (by kubernetes.io/hostname): a Raspberry Pi
# node and a Jetson node; pods on the Jetson node run with RuntimeClass `nvidia` (handler runc here).
PI = NodeSpec("raspberry-pi-1", 1, {"node.kubernetes.io/instance-type": "raspberry-pi"})
JETSON = NodeSpec("jetson-nano-1", 2, {"node.kubernetes.io/instance-type": "jetson-nano"})
NODES = (PI, JETSON)


def image(name: str) -> str:
    """The reference of a project image scripts/build-images built (podman's)."""
    return f"{PREFIX}-{name}:{TAG}"


# Which node needs which image: the server runs on the Jetson node only (the tests' job places it
# there), the operator on the Pi node (the chart's nodeSelector in the tests), device pods on both.
# The 6 GB images take minutes to import: each goes only where a pod needs it.
IMAGES_BY_NODE = {PI.name: [image("operator"), image("device")], JETSON.name: [image("device"), image("server")]}


@contextlib.contextmanager
def node_lock() -> Iterator[None]:
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def node_bin(version: Optional[str] = None) -> Path:
    env = dict(os.environ, K8S_VERSION=version) if version else None
    proc = subprocess.run([str(BUILD_SCRIPT), "--print-bin"], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        build = f"K8S_VERSION={version} scripts/build-node" if version else "scripts/build-node"
        raise NodesUnavailable(f"node components not built in {proc.stdout.strip() or '?'}: run {build}")
    return Path(proc.stdout.strip())


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def sh(*argv: str, check: bool = True, input: Optional[bytes] = None, timeout: float = 60) -> str:
    proc = subprocess.run(list(argv), capture_output=True, input=input, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
    return proc.stdout.decode(errors="replace")


def read_sysctl(name: str) -> Optional[str]:
    try:
        return (Path("/proc/sys") / name).read_text().strip()
    except OSError:
        return None


def _write_sysctl(name: str, value: str) -> None:
    try:
        (Path("/proc/sys") / name).write_text(value + "\n")
    except OSError:
        pass


def _chains(cmd: str) -> dict[str, list[str]]:
    """{table: [chain, ...]} of iptables or ip6tables."""
    out: dict[str, list[str]] = {}
    for table in ("filter", "nat", "mangle", "raw"):
        try:
            rules = sh(cmd, "-w", "-t", table, "-S", check=True)
        except (RuntimeError, FileNotFoundError):
            continue
        out[table] = [line.split()[1] for line in rules.splitlines() if line.startswith(("-N ", "-P "))]
    return out


def _remove_chains(cmd: str, keep: dict[str, list[str]]) -> None:
    """Delete every rule jumping to a KUBE-* chain that was not there before, then those chains."""
    for table, before in _chains(cmd).items():
        ours = {c for c in before if c.startswith(OWN_CHAIN_PREFIXES) and c not in keep.get(table, [])}
        if not ours:
            continue
        for line in sh(cmd, "-w", "-t", table, "-S", check=False).splitlines():
            parts = shlex.split(line)
            if len(parts) > 2 and parts[0] == "-A" and parts[1] not in ours and (
                    "-j" in parts and parts[parts.index("-j") + 1] in ours):
                sh(cmd, "-w", "-t", table, "-D", *parts[1:], check=False)
        for chain in ours:
            sh(cmd, "-w", "-t", table, "-F", chain, check=False)
        for chain in ours:
            sh(cmd, "-w", "-t", table, "-X", chain, check=False)


def _iptables_save() -> str:
    """The rules (no counters) of both families, for comparison before/after."""
    out = []
    for cmd in ("iptables-save", "ip6tables-save"):
        try:
            text = sh(cmd, check=False)
        except FileNotFoundError:
            continue
        out += [line for line in text.splitlines() if line and not line.startswith(("#", ":"))]
        out += [line.split()[0] for line in text.splitlines() if line.startswith(":")]
    return "\n".join(sorted(out))


def _mounts_under(*roots: Path) -> list[str]:
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point == str(r) or point.startswith(str(r) + "/") for r in roots):
            found.append(point)
    return sorted(set(found), key=lambda p: -p.count("/"))


def _pids_of(exes: list[Path]) -> list[int]:
    """Processes running one of these binaries (by /proc/PID/exe)."""
    targets = {str(p.resolve()) for p in exes}
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                exe = os.readlink(d / "exe").removesuffix(" (deleted)")
            except OSError:
                continue
            if exe in targets:
                pids.append(int(d.name))
    return pids


def _cgroup_dirs(name: str) -> list[Path]:
    return [d / name for d in Path("/sys/fs/cgroup").iterdir() if d.is_dir() and d.name != "unified"]


def _remove_cgroup_tree(root: Path) -> None:
    if not root.exists():
        return
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [root]:
        for _ in range(50):
            try:
                procs = (d / "cgroup.procs").read_text().split()
            except OSError:
                procs = []
            for pid in procs:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)


def pause_image_tar(pause_binary: Path) -> bytes:
    """A docker-archive of one static binary that waits for a signal: the pods' sandbox image
    (registry.k8s.io/pause cannot be pulled here)."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as t:
        info = tarfile.TarInfo("pause")
        data = pause_binary.read_bytes()
        info.size, info.mode = len(data), 0o755
        t.addfile(info, io.BytesIO(data))
    layer_bytes = layer.getvalue()
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
                         "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer_bytes).hexdigest()]}}
                        ).encode()
    manifest = json.dumps([{"Config": "config.json", "RepoTags": [PAUSE_IMAGE], "Layers": ["layer.tar"]}]).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as t:
        for name, data in (("layer.tar", layer_bytes), ("config.json", config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return out.getvalue()


@dataclass
class Node:
    spec: NodeSpec
    bin: Path
    run: Path                      # STATE/<name>
    ports: dict[str, int]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def store(self) -> Path:
        return STORE / self.name

    @property
    def socket(self) -> Path:
        return self.run / "containerd.sock"

    @property
    def cgroup_root(self) -> str:
        return f"ares-{self.name}"

    def ctr(self, *args: str, input: Optional[bytes] = None, timeout: float = 600, check: bool = True) -> str:
        return sh(str(self.bin / "ctr"), "-a", str(self.socket), "-n", "k8s.io", *args,
                  input=input, timeout=timeout, check=check)

    def containerd_config(self) -> str:
        cni = self.run / "cni"
        return f"""version = 3
root = "{self.store / 'containerd'}"
state = "{self.run / 'containerd-state'}"
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.run / 'containerd.sock.ttrpc'}"
[debug]
  address = ""
[metrics]
  address = ""
[plugins.'io.containerd.nri.v1.nri']
  disable = true
[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[plugins.'io.containerd.cri.v1.runtime']
  enable_selinux = false
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "{RUNC}"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["{self.bin / 'cni'}"]
    conf_dir = "{cni / 'conf'}"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{PAUSE_IMAGE}"
"""

    def cni_config(self) -> dict:
        return {"cniVersion": "1.0.0", "name": f"ares-{self.name}", "plugins": [
            {"type": "bridge", "bridge": self.spec.bridge, "isGateway": False, "ipMasq": False, "hairpinMode": True,
             "ipam": {"type": "host-local", "dataDir": str(self.run / "cni" / "ipam"),
                      "ranges": [[{"subnet": self.spec.subnet, "rangeStart": f"10.244.{self.spec.index}.10",
                                   "gateway": self.spec.gateway}]],
                      "routes": [{"dst": "0.0.0.0/0", "gw": self.spec.gateway}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ]}

    def kubelet_config(self, ca: Path) -> dict:
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            # cgroup v1 hosts: refused unless said so (and cgroupfs: no systemd here).
            "failCgroupV1": False, "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{self.cgroup_root}",
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "address": HOST_IP, "port": self.ports["kubelet"], "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": self.ports["healthz"],
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                               "x509": {"clientCAFile": str(ca)}},
            "authorization": {"mode": "AlwaysAllow"},
            "clusterDNS": [DNS_IP], "clusterDomain": "cluster.local",
            "resolvConf": str(self.run / "resolv.conf"),
            "podLogsDir": str(self.run / "pod-logs"),
            "failSwapOn": False, "maxPods": 30,
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "serializeImagePulls": False,
            "syncFrequency": "5s",   # how soon a changed annotation reaches a downwardAPI volume
            "fileCheckFrequency": "0s", "nodeStatusUpdateFrequency": "5s",
        }


@dataclass
class Nodes:
    """Start with `start()` (or as a context manager) beside a started ControlPlane whose `address`
    is HOST_IP and whose controllers include the node ones (controlplane.NODE_CONTROLLERS)."""

    control_plane: ControlPlane
    bin: Path
    specs: tuple[NodeSpec, ...] = NODES
    # Imported into each node's containerd before its kubelet starts (a kubelet that found an older
    # image of the same name would start pods from it at once): {node name: [podman reference]}.
    images: dict[str, list[str]] = field(default_factory=dict)
    podman_env: Optional[dict[str, str]] = None
    import_seconds: float = 0.0
    nodes: dict[str, Node] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def record(self) -> Path:
        return STATE / "host-before.json"

    # --- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> "Nodes":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @staticmethod
    def prepare_host(bin: Path) -> None:
        """Before the control plane starts (its API server listens on HOST_IP): undo what a killed
        run left, record the host's state, make the host bridge."""
        cleanup_host(bin)
        STATE.mkdir(parents=True, exist_ok=True)
        before = {"sysctls": {n: read_sysctl(n) for n in SYSCTLS},
                  "chains": {"iptables": _chains("iptables"), "ip6tables": _chains("ip6tables")},
                  "rules": _iptables_save(),
                  "var_lib_ares": Path("/var/lib/ares").exists(),
                  "checkpoints": Path("/var/lib/ares/checkpoints").exists(),
                  "nvpmodel_state": NVPMODEL_CALLS.parent.exists(),
                  "made": [str(f) for f in (NVPMODEL_CONF, NVPMODEL_BIN) if not f.exists()]}
        (STATE / "host-before.json").write_text(json.dumps(before))
        if str(NVPMODEL_CONF) in before["made"]:
            shutil.copyfile(ROOT / "hostscripts" / "nvpmodel.conf", NVPMODEL_CONF)
        if str(NVPMODEL_BIN) in before["made"]:
            NVPMODEL_BIN.write_text(FAKE_NVPMODEL)
            NVPMODEL_BIN.chmod(0o755)
        sh("ip", "link", "add", HOST_BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{HOST_IP}/32", "dev", HOST_BRIDGE)
        sh("ip", "link", "set", HOST_BRIDGE, "up")
        sh("ip", "route", "add", SERVICE_RANGE, "dev", HOST_BRIDGE)

    def start(self, timeout: float = 120) -> None:
        cp = self.control_plane
        ca = cp.pki / "ca.crt"
        from tests.support import free_port
        self._write_pause()
        for spec in self.specs:
            run = STATE / spec.name
            for sub in ("cni/conf", "cni/ipam", "pod-logs", "kubelet", "certs", "logs"):
                (run / sub).mkdir(parents=True, exist_ok=True)
            node = Node(spec, self.bin, run, {"kubelet": free_port(), "healthz": free_port(), "stream": free_port()})
            self.nodes[spec.name] = node
            node.store.mkdir(parents=True, exist_ok=True)
            sh("ip", "link", "add", spec.bridge, "type", "bridge")
            sh("ip", "addr", "add", f"{spec.gateway}/24", "dev", spec.bridge)
            sh("ip", "link", "set", spec.bridge, "type", "bridge", "nf_call_iptables", "1")
            sh("ip", "link", "set", spec.bridge, "up")
            _write_sysctl(f"net/ipv4/conf/{spec.bridge}/forwarding", "1")
            (run / "cni" / "conf" / "10-bridge.conflist").write_text(json.dumps(node.cni_config()))
            (run / "resolv.conf").write_text(f"nameserver {HOST_IP}\n")
            (run / "containerd.toml").write_text(node.containerd_config())
            for d in _cgroup_dirs(node.cgroup_root):
                d.mkdir(exist_ok=True)
                if d.parent.name == "cpuset":
                    for f in ("cpuset.cpus", "cpuset.mems"):
                        (d / f).write_text((d.parent / f).read_text())
            self._spawn(f"containerd-{spec.name}", [str(self.bin / "containerd"), "--config", str(run / "containerd.toml")],
                        run / "logs")
        started = time.monotonic()
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(len(self.nodes)) as pool:  # the nodes' imports side by side
            list(pool.map(lambda n: self.import_images(n, dict.fromkeys([PAUSE_IMAGE, *self.images.get(n.name, [])]),
                                                       self.podman_env), self.nodes.values()))
        self.import_seconds = time.monotonic() - started
        kubeconfig = str(cp.admin_kubeconfig)
        for node in self.nodes.values():
            (node.run / "kubelet.yaml").write_text(json.dumps(node.kubelet_config(ca)))
            labels = ",".join(f"{k}={v}" for k, v in node.spec.labels.items())
            self._spawn(f"kubelet-{node.name}", [
                str(self.bin / "kubelet"), "--config", str(node.run / "kubelet.yaml"), "--kubeconfig", kubeconfig,
                "--hostname-override", node.name, "--node-ip", HOST_IP, "--root-dir", str(node.run / "kubelet"),
                "--cert-dir", str(node.run / "certs"), "--node-labels", labels, "--v", "1"], node.run / "logs")
        proxy_config = STATE / "kube-proxy.yaml"
        proxy_config.write_text(json.dumps({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "mode": "iptables", "clusterCIDR": CLUSTER_CIDR, "bindAddress": HOST_IP,
            "clientConnection": {"kubeconfig": kubeconfig},
            "hostnameOverride": self.specs[0].name,
            "healthzBindAddress": f"127.0.0.1:{free_port()}", "metricsBindAddress": f"127.0.0.1:{free_port()}",
            # Leave the host's conntrack sysctls and route_localnet alone.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            "iptables": {"localhostNodePorts": False, "syncPeriod": "5s", "minSyncPeriod": "0s"},
            "nodePortAddresses": [f"{HOST_IP}/32"],
        }))
        (STATE / "logs").mkdir(exist_ok=True)
        self._spawn("kube-proxy", [str(self.bin / "kube-proxy"), "--config", str(proxy_config)], STATE / "logs")
        sched_port = free_port()
        self._spawn("kube-scheduler", [
            str(self.bin / "kube-scheduler"), "--kubeconfig", kubeconfig, "--authentication-kubeconfig", kubeconfig,
            "--authorization-kubeconfig", kubeconfig, "--bind-address", "127.0.0.1", "--secure-port", str(sched_port),
            "--leader-elect=false", "--v", "1"], STATE / "logs")
        self._start_dns(kubeconfig, free_port())
        self.kubectl("apply", "-f", "-", stdin=runtime_class_manifest())
        self._wait_ready(timeout)

    def _start_dns(self, kubeconfig: str, port: int) -> None:
        corefile = STATE / "Corefile"
        corefile.write_text(f""".:{port} {{
    bind {HOST_IP}
    errors
    ready 127.0.0.1:{self._free()}
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
    loadbalance
}}
""")
        self._spawn("coredns", [str(self.bin / "coredns"), "-conf", str(corefile)], STATE / "logs")
        # The Service pods' resolv.conf names (kubelet clusterDNS), its endpoint this host's CoreDNS.
        ports = [{"name": "dns", "protocol": "UDP", "port": 53, "targetPort": port},
                 {"name": "dns-tcp", "protocol": "TCP", "port": 53, "targetPort": port}]
        self.kubectl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kube-dns", "namespace": "kube-system",
                                                                 "labels": {"k8s-app": "kube-dns"}},
             "spec": {"clusterIP": DNS_IP, "ports": ports}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": "kube-dns-host", "namespace": "kube-system",
                          "labels": {"kubernetes.io/service-name": "kube-dns",
                                     "endpointslice.kubernetes.io/managed-by": "ares-tests"}},
             "addressType": "IPv4", "endpoints": [{"addresses": [HOST_IP], "conditions": {"ready": True}}],
             "ports": [{"name": p["name"], "protocol": p["protocol"], "port": port} for p in ports]},
        ]}))

    @staticmethod
    def _free() -> int:
        from tests.support import free_port
        return free_port()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            nodes = json.loads(self.kubectl("get", "nodes", "-o", "json"))["items"]
            ready = {n["metadata"]["name"] for n in nodes
                     if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))
                     and not any(t["key"] == "node.kubernetes.io/not-ready" for t in n["spec"].get("taints", []))}
            if ready >= set(self.nodes):
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n}\n{self.log('kubelet-' + n)[-2000:]}" for n in self.nodes)
                raise RuntimeError(f"nodes not ready after {timeout:.0f}s (ready: {sorted(ready)}):\n{logs}")
            time.sleep(0.5)

    def kubectl(self, *args: str, stdin: Optional[str] = None, check: bool = True) -> str:
        env = tool_env(self.control_plane.bin, self.control_plane.admin_kubeconfig)
        proc = subprocess.run(["kubectl", *args], env=env, capture_output=True, text=True, input=stdin, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {proc.stderr}")
        return proc.stdout

    def _write_pause(self) -> None:
        (STATE / "pause.tar").write_bytes(pause_image_tar(self.bin / "pause"))

    def _spawn(self, name: str, argv: list[str], logs: Path) -> None:
        log = open(logs / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=_die_with_parent)
        (STATE / "pids").mkdir(exist_ok=True)
        (STATE / "pids" / name).write_text(str(self.procs[name].pid))

    def log(self, name: str) -> str:
        for d in [STATE / "logs", *(n.run / "logs" for n in self.nodes.values())]:
            if (d / f"{name}.log").exists():
                return (d / f"{name}.log").read_text(errors="replace")
        return ""

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log(name)[-3000:]}")

    # --- images ---------------------------------------------------------------------------------

    def import_images(self, node: Node, refs: dict[str, Optional[dict]], podman_env: Optional[dict] = None) -> list[str]:
        """Import each image (podman's, by reference) into the node's containerd, unless the image
        podman has now (its ID) is already there. Returns the references imported."""
        deadline = time.monotonic() + 60
        while subprocess.run([str(self.bin / "ctr"), "-a", str(node.socket), "version"],
                             capture_output=True, timeout=10).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd of {node.name} did not start:\n"
                                   f"{self.log('containerd-' + node.name)[-3000:]}")
            time.sleep(0.2)
        imported = []
        marks = node.store / "imported"
        marks.mkdir(exist_ok=True)
        for ref in refs:
            if ref == PAUSE_IMAGE:
                image_id = hashlib.sha256((STATE / "pause.tar").read_bytes()).hexdigest()
            else:
                image_id = subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", ref], env=podman_env,
                                          capture_output=True, text=True, check=True).stdout.strip()
            mark = marks / hashlib.sha256(ref.encode()).hexdigest()[:16]
            present = ref in node.ctr("images", "ls", "-q").split()
            if present and mark.exists() and mark.read_text() == image_id:
                continue
            if ref == PAUSE_IMAGE:
                node.ctr("images", "import", "-", input=(STATE / "pause.tar").read_bytes())
            else:
                save = save_image(ref, podman_env)
                imp = subprocess.run([str(self.bin / "ctr"), "-a", str(node.socket), "-n", "k8s.io", "images",
                                      "import", "--local", "-"], stdin=save.stdout, capture_output=True, timeout=1800)
                save.stdout.close()
                if save.wait() != 0 or imp.returncode != 0:
                    raise RuntimeError(f"importing {ref} into {node.name}: {imp.stderr.decode(errors='replace')}")
                self._discard_layers(node, ref)
            mark.write_text(image_id)
            imported.append(ref)
        return imported

    @staticmethod
    def _discard_layers(node: Node, ref: str) -> None:
        """Drop the image's layer blobs once unpacked (what containerd's discard_unpacked_layers
        does for the images CRI pulls): containers start from the snapshots, and a 6 GB image
        then takes 6 GB of disk on a node, not 12."""
        line = next(l for l in node.ctr("images", "ls", f"name=={ref}").splitlines()[1:] if l.split()[0] == ref)
        manifests = [json.loads(node.ctr("content", "get", line.split()[2]))]
        layers: list[str] = []
        while manifests:
            m = manifests.pop()
            manifests += [json.loads(node.ctr("content", "get", d["digest"])) for d in m.get("manifests", [])
                          if d.get("platform", {}).get("architecture") in (None, "amd64")]
            layers += [d["digest"] for d in m.get("layers", [])]
        if layers:
            node.ctr("content", "rm", *layers, check=False)

    # --- inside pods ----------------------------------------------------------------------------

    def container_pid(self, pod: str, container: str, namespace: str) -> Optional[int]:
        """The host PID of a running container's process, from its node's containerd."""
        for node in self.nodes.values():
            for line in node.ctr("tasks", "ls").splitlines()[1:]:
                cid, pid, status = line.split()[:3]
                if status != "RUNNING":
                    continue
                info = json.loads(node.ctr("containers", "info", cid, check=False) or "{}")
                labels = info.get("Labels") or {}
                if (labels.get("io.kubernetes.pod.name") == pod and labels.get("io.kubernetes.pod.namespace") == namespace
                        and labels.get("io.kubernetes.container.name") == container):
                    return int(pid)
        return None

    # --- teardown -------------------------------------------------------------------------------

    def stop(self) -> None:
        # Pods first, while kubelets run: their volumes are unmounted and containers removed by the kubelets.
        if "kubelet-" + self.specs[0].name in self.procs and all(p.poll() is None for p in self.procs.values()):
            try:
                self.kubectl("delete", "deployments", "--all", "--all-namespaces", "--wait=false", check=False)
                self.kubectl("delete", "pods", "--all", "--all-namespaces", "--grace-period=1", "--wait=false", check=False)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and json.loads(
                        self.kubectl("get", "pods", "-A", "-o", "json", check=False) or '{"items": []}')["items"]:
                    time.sleep(0.5)
            except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError):
                pass
        for node in self.nodes.values():
            try:  # what the kubelets did not remove yet: containers and sandboxes go; images stay
                for line in node.ctr("tasks", "ls", check=False, timeout=20).splitlines()[1:]:
                    node.ctr("tasks", "kill", "-s", "SIGKILL", line.split()[0], check=False, timeout=20)
            except (subprocess.TimeoutExpired, RuntimeError):
                pass
        for name in [n for n in self.procs if not n.startswith("containerd")] + \
                [n for n in self.procs if n.startswith("containerd")]:
            proc = self.procs.pop(name)
            if proc.poll() is None:
                stop_process(proc, 15)
        cleanup_host(self.bin)


def runtime_class_manifest() -> str:
    """What the NVIDIA container toolkit registers on a Jetson k3s node; runc runs it here."""
    return "apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata: {name: nvidia}\nhandler: runc\n"


def cleanup_host(bin: Path) -> None:
    """Undo all a run of `Nodes` did to the host (idempotent; also after a run that was killed)."""
    record = STATE / "host-before.json"
    before = json.loads(record.read_text()) if record.exists() else None
    # 1. Our processes (every binary of the node build and the control plane's, by executable),
    # and the containers' shims; then whatever is left in the nodes' cgroups.
    exes = [bin / n for n in ("kubelet", "kube-proxy", "kube-scheduler", "coredns", "containerd",
                              "containerd-shim-runc-v2")]
    for pid in _pids_of(exes) if STATE.exists() else []:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    pids_dir = STATE / "pids"
    if pids_dir.exists():
        for f in pids_dir.iterdir():
            try:
                os.kill(int(f.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    for spec in NODES:
        for d in _cgroup_dirs(f"ares-{spec.name}"):
            _remove_cgroup_tree(d)
    # 2. Mounts (pod volumes, container root file systems, network namespaces, overlay snapshots).
    roots = [STATE, STORE]
    for _ in range(3):
        for point in _mounts_under(*roots):
            subprocess.run(["umount", "-l", point], capture_output=True)
    # 3. Links and routes; the containers' veths went with their namespaces.
    for dev in [HOST_BRIDGE, *(s.bridge for s in NODES)]:
        subprocess.run(["ip", "link", "del", dev], capture_output=True)
    for line in sh("ip", "-o", "link", "show", check=False).splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith("veth") and " master aresn-" in line:
            subprocess.run(["ip", "link", "del", name], capture_output=True)
    # 4. iptables chains kube-proxy, the kubelets and CNI made; sysctls as they were.
    if before is not None:
        for cmd in ("iptables", "ip6tables"):
            _remove_chains(cmd, before["chains"].get(cmd, {}))
        for name, value in before["sysctls"].items():
            if value is not None and read_sysctl(name) != value:
                _write_sysctl(name, value)
        for made in before.get("made", []):
            Path(made).unlink(missing_ok=True)
        if not before.get("nvpmodel_state"):
            shutil.rmtree(NVPMODEL_CALLS.parent, ignore_errors=True)
        if not before.get("checkpoints"):
            shutil.rmtree("/var/lib/ares/checkpoints", ignore_errors=True)
        if not before.get("var_lib_ares"):
            shutil.rmtree("/var/lib/ares", ignore_errors=True)
    # 5. Files the kubelets and CNI share with the host.
    for link in Path("/var/log/containers").glob("*.log") if Path("/var/log/containers").exists() else []:
        try:
            if str(STATE) in os.readlink(link):
                link.unlink()
        except OSError:
            pass
    results = Path("/var/lib/cni/results")
    if results.exists():
        for f in results.iterdir():
            if f.name.startswith("ares-"):
                f.unlink(missing_ok=True)
    remove_save_leftovers()
    shutil.rmtree(STATE, ignore_errors=True)


def save_image(ref: str, podman_env: Optional[dict[str, str]] = None) -> subprocess.Popen:
    """`podman save` of a project image to a pipe (stdout). podman first copies the image into its
    TMPDIR (/var/tmp by default) and leaves that copy, gigabytes, when it is killed: so its TMPDIR
    is SAVE_TMP, which cleanup_host empties."""
    SAVE_TMP.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(["podman", "save", "--format", "docker-archive", ref], stdout=subprocess.PIPE,
                            env={**(podman_env or os.environ), "TMPDIR": str(SAVE_TMP)})


def remove_save_leftovers() -> None:
    shutil.rmtree(SAVE_TMP, ignore_errors=True)


# What iptables-save shows of a table merely loaded: its name, its built-in chains, COMMIT. On a
# machine where nothing had used iptables before, the first use loads the tables (a clean CI
# machine): those lines appear without anything being left behind.
_LOADED_TABLE = {"COMMIT", ":INPUT", ":FORWARD", ":OUTPUT", ":PREROUTING", ":POSTROUTING"}


def host_changes(before_rules: str) -> list[str]:
    """What differs from the iptables rules recorded before (empty: nothing left behind): rules
    and chains of our own, not the tables and built-in chains the kernel shows once loaded."""
    def counted(text: str) -> set[str]:
        return {line for line in text.splitlines() if not line.startswith("*") and line not in _LOADED_TABLE}

    now, was = counted(_iptables_save()), counted(before_rules)
    return sorted(now - was) + [f"missing: {r}" for r in sorted(was - now)]


def prefetch(bin: Path, podman_env: dict[str, str]) -> float:
    """Import the images into the nodes' containerd stores (IMAGES_BY_NODE) with only containerd
    running, nothing else of a node: what CI does at the lowest CPU priority while the rest of
    the suite runs, so that the real-node tests find them there. Returns the seconds it took."""
    started = time.monotonic()
    with node_lock():
        cleanup_host(bin)
        STATE.mkdir(parents=True, exist_ok=True)
        nodes = Nodes(None, bin)  # type: ignore[arg-type]
        try:
            nodes._write_pause()
            (STATE / "logs").mkdir(exist_ok=True)
            for spec in NODES:
                run = STATE / spec.name
                run.mkdir(parents=True, exist_ok=True)
                node = Node(spec, bin, run, {})
                nodes.nodes[spec.name] = node
                node.store.mkdir(parents=True, exist_ok=True)
                (run / "containerd.toml").write_text(node.containerd_config())
                nodes._spawn(f"containerd-{spec.name}", [str(bin / "containerd"), "--config", str(run / "containerd.toml")],
                             STATE / "logs")
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(len(nodes.nodes)) as pool:
                list(pool.map(lambda n: nodes.import_images(n, dict.fromkeys([PAUSE_IMAGE, *IMAGES_BY_NODE[n.name]]),
                                                            podman_env), nodes.nodes.values()))
        finally:
            for proc in nodes.procs.values():
                proc.terminate()
                proc.wait(15)
            nodes.procs.clear()
            cleanup_host(bin)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description="The tests' real nodes, by hand.")
    parser.add_argument("--prefetch", action="store_true",
                        help="import the project's images (podman's) into the nodes' containerd stores")
    parser.add_argument("--cleanup", action="store_true", help="undo what a killed run left on this host")
    args = parser.parse_args()
    bin = node_bin(os.environ.get("ARES_K8S_VERSION"))
    if args.cleanup:
        with node_lock():
            cleanup_host(bin)
    if args.prefetch:
        conf = subprocess.run([str(ROOT / "scripts" / "build-images"), "--print-config"], capture_output=True,
                              text=True, check=True).stdout.strip()
        print(f"nodes: images imported in {prefetch(bin, dict(os.environ, CONTAINERS_CONF=conf)):.0f} s")


if __name__ == "__main__":
    main()
