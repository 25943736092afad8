"""The container images, built with scripts/build-images and run with podman.

1. operator, server and device images build (from this tree) and declare uid 10001 and their
   entrypoints; server and device share the torch layers;
2. the operator image carries kopf and no torch (test_operator_image.py runs it against the
   control plane);
3. a server container and a device container (host network, loopback only) train one round
   of a tiny synthetic job over HTTP/2, both as uid 10001, the split file mounted read-only;
4. the device image carries what the host-control sidecar needs.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from images.podman_cli import UID, container_job, first_round_closed, process_ids
from tests.support import ROOT, free_port, wait_for

# The first run builds the images (a cold build is minutes: torch); later runs only hash inputs.
pytestmark = [pytest.mark.images, pytest.mark.timeout(3600)]

ENTRYPOINTS = {
    "operator": ["kopf", "run", "--standalone", "-m", "ares_operator.handlers"],
    "server": ["ares"],
    "device": ["ares"],
}


def inspect(podman, ref: str) -> dict:
    return json.loads(podman("image", "inspect", ref).stdout)[0]


def _shared_torch_block(dockerfile: Path) -> str:
    text = dockerfile.read_text()
    start = text.index("\n", text.index("# ---- shared torch layers"))
    return text[start:text.index("# ---- end of the shared torch layers ----")]


def test_server_and_device_dockerfiles_share_the_torch_stage():
    """Byte for byte, so both builds (podman or buildx) reuse one torch layer."""
    server = _shared_torch_block(ROOT / "images" / "server" / "Dockerfile")
    device = _shared_torch_block(ROOT / "images" / "device" / "Dockerfile")
    assert "torch==${TORCH_VERSION}" in server
    assert server == device


# --- 1. built, as expected -------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ENTRYPOINTS))
def test_image_built_with_user_and_entrypoint(images, name):
    config = inspect(images, images.ref(name))["Config"]
    assert config["User"] == str(UID)
    assert config["Entrypoint"] == ENTRYPOINTS[name]
    assert config["Labels"].get("io.ares.inputs"), "built without the input-hash label"


def test_server_and_device_share_the_torch_layers(images):
    server = inspect(images, images.ref("server"))["RootFS"]["Layers"]
    device = inspect(images, images.ref("device"))["RootFS"]["Layers"]
    shared = [a for a, b in zip(server, device) if a == b]
    # base image, torch, user: the big torch layer is stored (and pushed) once
    assert len(shared) >= 3, f"server and device share only {len(shared)} layers"


def test_build_is_cached(images):
    """A second scripts/build-images finds every image up to date and builds nothing."""
    proc = subprocess.run([str(ROOT / "scripts" / "build-images")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "building" not in proc.stderr, proc.stderr
    for name in ENTRYPOINTS:
        assert f"{images.ref(name)} is up to date" in proc.stderr


# --- 2. operator ---------------------------------------------------------------------------------

def test_operator_image_has_kopf_and_no_torch(podman):
    ref = podman.ref("operator")
    help_text = podman("run", "--rm", "--network", "none", "--entrypoint", "kopf", ref, "run", "--help").stdout
    assert "--standalone" in help_text and "--liveness" in help_text
    check = ("import os, kopf, kubernetes, ares_operator.handlers; import importlib.util as u; "
             "print(os.getuid(), os.getgid(), u.find_spec('torch') is None)")
    out = podman("run", "--rm", "--network", "none", "--entrypoint", "python3", ref, "-c", check).stdout.split()
    assert out == [str(UID), str(UID), "True"], out  # uid/gid 10001, and no torch in the operator image


# --- 3. server and device train one round --------------------------------------------------------

def test_server_and_device_containers_train_one_round(podman, tmp_path):
    port = free_port()
    cj = container_job(tmp_path, "dev-a", port, train=200, test=100, batch=20, deadline_s=120)
    job, ckpt, podinfo, secret = cj.job, cj.ckpt, cj.podinfo, cj.secret
    controller_token = cj.controller_token
    limits = ("--network", "host", "--cpus", "1")  # a CFS quota on each container's cgroup

    # The device first: it waits for the server, so its uid is checked while it surely runs.
    device = podman.start("device", "device", "--server", f"http://127.0.0.1:{port}", "--name", "dev-a",
                          "--token-file", "/run/ares/token", "--split-file", "/etc/podinfo/split-point", "--cpu",
                          opts=(*limits, "-v", f"{secret}:/run/ares:ro", "-v", f"{podinfo}:/etc/podinfo:ro"))
    assert process_ids(podman, device) == (UID, UID)
    server = podman.start("server", "server", "--config", "/job/server.yaml",
                          opts=(*limits, "-v", f"{job}:/job:ro", "-v", f"{ckpt}:/ckpt"))
    assert process_ids(podman, server) == (UID, UID)

    def logs() -> str:
        return f"--- server\n{podman.logs(server)[-4000:]}\n--- device\n{podman.logs(device)[-4000:]}"

    reply = first_round_closed(port, controller_token, 240, "round 0 closed", logs, interval=0.25)
    assert reply.http_version == "HTTP/2"  # prior knowledge: the server speaks h2c
    body = reply.json()
    assert body["rounds"] == 1
    assert body["accuracy"] is not None and 0.0 <= body["accuracy"] <= 1.0, body
    dev = body["devices"]["dev-a"]
    assert dev["last_round"] == 0 and dev["split"] == 2, body  # trained, at the split from the file
    assert (ckpt / "global.safetensors").is_file(), "the server (uid 10001) wrote no checkpoint"
    server_log = podman.logs(server)
    assert re.search(r"round 0 closed .*accuracy \d", server_log), logs()
    # torch alone would run one thread per core of the machine in each (the server's in its worker)
    one_thread = r"1 torch thread (for a CPU limit of 1 \(not \d+, one per core\)|\(CPU limit 1\))"
    assert re.search(one_thread, server_log) and re.search(one_thread, podman.logs(device)), logs()


# --- 4. device image and the sidecar -------------------------------------------------------------

def test_device_image_has_what_the_sidecar_needs(podman):
    script = ("set -e; ip -V; tc -V; for s in ares-shape ares-unshape ares-power; do "
              "test -x \"$(command -v $s)\"; done; test -f /usr/share/ares/nvpmodel.conf; "
              "python3 -c 'from ares.runtime.hostscripts import hostscript as h; print(h(\"ares-shape\"))'; "
              "ares sidecar --help")
    out = podman("run", "--rm", "--network", "none", "--entrypoint", "/bin/sh", podman.ref("device"),
                 "-c", script).stdout
    assert "iproute2" in out
    assert "/usr/local/bin/ares-shape" in out
    assert "usage: ares sidecar" in out


# --- 5. into the real nodes' stores ---------------------------------------------------------------

def test_a_killed_export_into_a_node_leaves_its_copy_only_where_the_cleanup_removes_it(images):
    """A node's images come from `podman save` piped into containerd. podman copies the image into
    its TMPDIR first, and a killed import left that copy (gigabytes) in /var/tmp for good."""
    from cluster.nodes import SAVE_TMP, node_lock, remove_save_leftovers, save_image

    with node_lock():  # not while a prefetch imports (CI runs one beside the suite)
        save = save_image(images.ref("operator"), images.env)
        try:
            copy = wait_for(lambda: [p for p in SAVE_TMP.rglob("*") if p.is_file() and p.stat().st_size > 1 << 20],
                            120, "podman's copy of the image under SAVE_TMP", interval=0.2)
        finally:
            save.kill()
            save.wait()
            save.stdout.close()
        assert copy and all(p.exists() for p in copy)  # what a killed export leaves behind
        remove_save_leftovers()  # what cleanup_host does at every start and end of the nodes
        assert not SAVE_TMP.exists()
