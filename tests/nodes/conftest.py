"""The real-node cluster: a control plane whose API server pods reach, two real nodes, the chart.

`real_cluster` (module-scoped, for tests marked `nodes`): a control plane of its own
(tests/cluster/controlplane.py with the node controllers, listening on the host bridge's
address) and the nodes of tests/cluster/nodes.py (`raspberry-pi-1`, `jetson-nano-1`, kubelet +
containerd + runc each; kube-scheduler, kube-proxy and CoreDNS for both), the project's images
imported from podman into the nodes that run them, and charts/ares helm-installed with those
images, watching the namespace `team-a` (Pod Security enforce=privileged). Not the session's
control plane of tests/cluster/fixtures.py: that one leaves Deployments unrolled and has no
scheduler, so that the test kubelet alone decides where pods run.

Skips where it cannot run (not root, scripts/build-node or scripts/build-control-plane not
run, no podman), except under CI=true, where .ci/run builds everything and a skip would hide it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.controlplane import NODE_CONTROLLERS, ControlPlane, ControlPlaneUnavailable, bin_dir, k8s_version, tool_env
from cluster.fixtures import Kubectl
from cluster.nodes import (HOST_IP, IMAGES_BY_NODE, PI, PREFIX, TAG, Nodes, NodesUnavailable, cleanup_host,
                           host_changes, node_bin, node_lock, read_sysctl)

ROOT = Path(__file__).resolve().parents[2]
IMAGES_SCRIPT = ROOT / "scripts" / "build-images"
NAMESPACE = "team-a"
OPERATOR_NS = "ares-system"
UNPULLABLE = "localhost/ares-unpullable:none"  # no node has it, and no registry serves it


@dataclass
class RealCluster:
    control_plane: ControlPlane
    nodes: Nodes
    kubectl: Kubectl            # cluster admin, in NAMESPACE
    namespace: str
    import_seconds: float       # what importing the images took this run (0 when cached)
    start_seconds: float        # control plane + nodes + chart, without the imports

    def helm(self, *args: str) -> subprocess.CompletedProcess:
        env = tool_env(self.control_plane.bin, self.control_plane.admin_kubeconfig)
        return subprocess.run(["helm", *args], env=env, capture_output=True, text=True, timeout=300)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"real nodes cannot run in CI: {reason}")
    pytest.skip(reason)


def _podman_env() -> dict[str, str]:
    proc = subprocess.run([str(IMAGES_SCRIPT), "operator", "server", "device"], capture_output=True, text=True,
                          timeout=3600)
    if proc.returncode != 0:
        _unavailable(f"scripts/build-images failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    conf = subprocess.run([str(IMAGES_SCRIPT), "--print-config"], capture_output=True, text=True, check=True)
    return {**os.environ, "CONTAINERS_CONF": conf.stdout.strip()}


def _install_chart(cp: ControlPlane) -> None:
    """helm install as a user would, with this machine's images; before the controllers start, so
    that the garbage collector knows aresjobs from its start."""
    env = tool_env(cp.bin, cp.admin_kubeconfig)
    subprocess.run(["kubectl", "apply", "-f", "-"], env=env, check=True, capture_output=True, timeout=60, text=True,
                   input=json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {
                       "name": NAMESPACE, "labels": {"pod-security.kubernetes.io/enforce": "privileged"}}}))
    values = [f"image.repository={PREFIX}-operator", f"image.tag={TAG}",
              f"jobImages.server.repository={PREFIX}-server", f"jobImages.server.tag={TAG}",
              f"jobImages.device.repository={PREFIX}-device", f"jobImages.device.tag={TAG}",
              # No Jetson image here: the Jetson node runs the device image (its RuntimeClass is runc).
              f"jobImages.deviceJetson.repository={PREFIX}-device", f"jobImages.deviceJetson.tag={TAG}",
              f"watchNamespaces={{{NAMESPACE}}}", f"nodeSelector.kubernetes\\.io/hostname={PI.name}",
              # A job may name this image (test_an_image_no_node_can_pull_is_named_on_the_job_with_an_event): the node, not the policy, refuses it.
              f"jobPolicy.allowedImages={{{UNPULLABLE}}}"]
    argv = ["helm", "install", "ares", str(ROOT / "charts" / "ares"), "-n", OPERATOR_NS, "--create-namespace"]
    for v in values:
        argv += ["--set", v]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# Module-scoped: one set-up for all the tests of tests/nodes/test_real_nodes.py, torn down after
# them rather than at the end of the whole run (idle kubelets and pods would load the rest).
@pytest.fixture(scope="module")
def real_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCluster]:
    if os.geteuid() != 0:
        _unavailable("real nodes need root (bridges, iptables, cgroups, mounts)")
    try:
        cp_bin, n_bin = bin_dir(), node_bin(k8s_version())
    except (ControlPlaneUnavailable, NodesUnavailable) as exc:
        _unavailable(str(exc))
    podman_env = _podman_env()
    with node_lock():  # one set of nodes per host at a time (fixed names, bridges, stores)
        yield from _real_cluster(tmp_path_factory, cp_bin, n_bin, podman_env)


def _real_cluster(tmp_path_factory: pytest.TempPathFactory, cp_bin: Path, n_bin: Path,
                  podman_env: dict[str, str]) -> Iterator[RealCluster]:
    started = time.monotonic()
    try:
        Nodes.prepare_host(n_bin)
        record = json.loads((Path("/run/ares-nodes") / "host-before.json").read_text())
        before_rules, before_sysctls = record["rules"], record["sysctls"]
        cp = ControlPlane(tmp_path_factory.mktemp("node-control-plane"), bin=cp_bin, address=HOST_IP,
                          controllers=NODE_CONTROLLERS, before_controllers=_install_chart)
        with cp, Nodes(cp, n_bin, images=IMAGES_BY_NODE, podman_env=podman_env) as nodes:
            import_seconds = nodes.import_seconds
            config = tmp_path_factory.mktemp("node-kubectl") / "admin.kubeconfig"
            config.write_text(json.dumps(cp.kubeconfig(cp.admin_user(), NAMESPACE)))
            yield RealCluster(cp, nodes, Kubectl(config, cp), NAMESPACE, import_seconds,
                              time.monotonic() - started - import_seconds)
        left = host_changes(before_rules)
        assert not left, f"iptables rules left behind: {left}"
        changed = {n: (v, read_sysctl(n)) for n, v in before_sysctls.items() if read_sysctl(n) != v}
        assert not changed, f"sysctls not restored (before, now): {changed}"
    finally:
        cleanup_host(n_bin)
