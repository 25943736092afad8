"""The arm64 images (Raspberry Pi, Jetson, arm64 edge servers), built and run here under qemu.

`scripts/build-images --multiarch` builds the images for both architectures (cached by the hash
of their inputs, like the host's) and makes one manifest list per image naming the two. Then:

1. the arm64 device container says `aarch64`, imports its CPU-only torch, holds no CUDA
   library, and stays small;
2. its sidecar's tools (ip, tc, the host scripts) are arm64 binaries and run, as far as qemu's
   user-mode emulation lets them reach the kernel;
3. the device side's unit tests pass on the torch the arm64 images carry;
4. an arm64 device container trains one round, as uid 10001, against an x86_64 server
   container over HTTP/2 (one step of a small batch: emulation is slow);
5. each manifest list names both architectures, and each entry is the image built for it.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from images.podman_cli import CANNOT_PROVIDE_PODMAN, SCRIPT, Podman, container_job, first_round_closed
from tests.support import ROOT, free_port

# Not in the default run (pyproject's addopts): `pytest -m arm64`, as .ci/arm64 does.
pytestmark = [pytest.mark.images, pytest.mark.arm64, pytest.mark.timeout(3600)]

UID = 10001
NAMES = ("operator", "server", "device")
ARM64_TORCH = "2.10.0"  # scripts/build-images' ARM64_TORCH
MAX_DEVICE_IMAGE_BYTES = 1_500_000_000
# Libraries of NVIDIA's CUDA stack and torch's CUDA parts; any of them means a CUDA build.
CUDA_LIBRARY = re.compile(r"lib(cuda|cudart|cublas|cublasLt|cudnn\w*|cufft|curand|cusolver|cusparse\w*|nccl|"
                          r"nvrtc|nvJitLink|nvToolsExt|torch_cuda\w*|c10_cuda|caffe2_nvrtc)[.-]")


@pytest.fixture(scope="module")
def arm64_images(images: Podman) -> Podman:
    """The arm64 images (tag TAG-arm64) and the manifest lists (TAG-multiarch), built by the script."""
    proc = subprocess.run([str(SCRIPT), "--multiarch"], capture_output=True, text=True, timeout=3600)
    if proc.returncode == CANNOT_PROVIDE_PODMAN:
        pytest.skip(f"arm64 images cannot be built here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, f"scripts/build-images --multiarch failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    return Podman(env=images.env, prefix=images.prefix, tag=f"{images.tag}-arm64")


@pytest.fixture
def arm64(arm64_images: Podman) -> Iterator[Podman]:
    """podman for the arm64 images; containers started through it are removed after the test."""
    try:
        yield arm64_images
    finally:
        arm64_images.cleanup()


def run_arm64(podman: Podman, *args: str, opts: tuple[str, ...] = ("--network", "none"),
              image: str = "device", timeout: float = 600) -> str:
    return podman("run", "--rm", "--pull=never", *opts, podman.ref(image), *args, timeout=timeout).stdout


def inspect(podman: Podman, ref: str) -> dict:
    return json.loads(podman("image", "inspect", ref).stdout)[0]


# --- 1. architecture, torch, no CUDA, size ------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_arm64_images_are_arm64_with_the_hosts_user_and_entrypoint(arm64, images, name):
    arm, host = inspect(arm64, arm64.ref(name)), inspect(images, images.ref(name))
    assert arm["Architecture"] == "arm64" and arm["Os"] == "linux"
    assert arm["Config"]["User"] == str(UID)
    assert arm["Config"]["Entrypoint"] == host["Config"]["Entrypoint"]
    assert arm["Config"]["Labels"]["io.ares.inputs"] != host["Config"]["Labels"]["io.ares.inputs"]


def test_arm64_device_container_is_aarch64_and_imports_cpu_torch(arm64):
    check = ("import os, platform, torch, torchvision; "
             "print(platform.machine(), torch.__version__, torch.version.cuda, torch.cuda.is_available(), "
             "torch.backends.cuda.is_built(), torchvision.__version__, os.getuid())")
    out = run_arm64(arm64, "-c", f"uname -m; python3 -c '{check}'", opts=("--network", "none", "--entrypoint", "/bin/sh"))
    uname, line = out.split("\n", 1)
    assert uname == "aarch64"
    machine, torch_version, cuda_version, cuda, cuda_built, vision, uid = line.split()
    assert machine == "aarch64"
    assert torch_version in (ARM64_TORCH, f"{ARM64_TORCH}+cpu"), line
    assert (cuda_version, cuda, cuda_built) == ("None", "False", "False"), line  # a CPU-only build
    assert vision.startswith("0.25.")
    assert uid == str(UID)


def test_arm64_device_image_holds_no_cuda_libraries(arm64):
    """Every shared library in the image, listed by name: torch's CPU library is there, no CUDA one."""
    listing = run_arm64(arm64, "/", "-xdev", "(", "-name", "*.so", "-o", "-name", "*.so.*", ")", "-printf", "%f\n",
                        opts=("--network", "none", "--user", "0", "--entrypoint", "find"))
    libraries = set(listing.split())
    assert "libtorch_cpu.so" in libraries, "the scan found no torch library at all"
    assert len(libraries) > 100
    cuda = sorted(lib for lib in libraries if CUDA_LIBRARY.match(lib))
    assert not cuda, f"CUDA libraries in the arm64 device image: {cuda}"
    packages = run_arm64(arm64, "-m", "pip", "list", "--format=freeze",
                         opts=("--network", "none", "--entrypoint", "python3"))
    nvidia = [p for p in packages.split() if re.match(r"(nvidia-|cuda-|triton)", p, re.I)]
    assert not nvidia, nvidia


def test_arm64_device_image_is_small(arm64):
    size = inspect(arm64, arm64.ref("device"))["Size"]
    assert size <= MAX_DEVICE_IMAGE_BYTES, f"the arm64 device image is {size / 1e9:.2f} GB"
    # No compilers, no pip cache.
    out = run_arm64(arm64, "-c", "for t in gcc cc c++ g++; do command -v $t || true; done; "
                    "ls /root/.cache/pip 2>/dev/null | head -1",
                    opts=("--network", "none", "--user", "0", "--entrypoint", "/bin/sh"))
    assert out.strip() == "", out


# --- 2. the sidecar's tools, for arm64 -----------------------------------------------------------

SIDECAR_SCRIPT = r"""set -e
python3 - <<'PY'
import shutil
for tool in ("ip", "tc", "bash"):
    with open(shutil.which(tool), "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183, tool  # EM_AARCH64
    print(tool, "aarch64")
PY
ip -V; tc -V
for s in ares-shape ares-unshape ares-power; do test -x "$(command -v $s)"; done
test -f /usr/share/ares/nvpmodel.conf
python3 -c 'from ares.runtime.hostscripts import hostscript as h; print(h("ares-shape"))'
echo "--- link"; ip -j link show dev lo
echo "--- no such interface"; ares-shape nosuch0 127.0.0.2 5mbit 2>&1 && exit 1 || echo "rc=$?"
echo "--- byte rate"; ares-shape lo 127.0.0.2 5mbps 2>&1 && exit 1 || echo "rc=$?"
echo 4321 >/tmp/power; echo "--- power"; ares-power --path /tmp/power
echo "--- sidecar"; ares sidecar --help | head -1
echo "--- qdisc"; if tc qdisc show dev lo 2>&1; then
    ares-shape lo 127.0.0.2 5mbit; echo "--- shaped"; tc qdisc show dev lo; tc class show dev lo
    ares-unshape lo; echo "--- unshaped"; tc qdisc show dev lo
fi
"""


def test_arm64_sidecar_tools_run(arm64):
    """As the sidecar runs them (root, NET_ADMIN), in the container's own network namespace.

    qemu's user-mode emulation passes on only the link, address and route messages of rtnetlink:
    `ip` works, but tc's qdisc and class requests get EOPNOTSUPP from qemu (not from the kernel).
    So under qemu the arm64 tools are checked up to the kernel (ip over netlink, the scripts'
    checks, which ask `ip` for the interface); the shaping itself runs here only where the
    emulator passes tc's requests on, and is tested on x86 by tests/host.
    """
    out = run_arm64(arm64, "-c", SIDECAR_SCRIPT,
                    opts=("--network", "none", "--user", "0", "--cap-add", "NET_ADMIN", "--entrypoint", "/bin/sh"))
    assert "ip aarch64" in out and "tc aarch64" in out and "bash aarch64" in out
    assert "iproute2" in out
    assert "/usr/local/bin/ares-shape" in out
    link = json.loads(out.split("--- link\n", 1)[1].split("--- no such interface", 1)[0])
    assert link[0]["ifname"] == "lo" and "LOOPBACK" in link[0]["flags"], link
    missing = out.split("--- no such interface", 1)[1].split("--- byte rate", 1)[0]
    assert "no such interface 'nosuch0'" in missing and "rc=2" in missing, missing
    byte_rate = out.split("--- byte rate", 1)[1].split("--- power", 1)[0]
    assert "bad rate" in byte_rate and "rc=2" in byte_rate, byte_rate
    assert out.split("--- power\n", 1)[1].split("\n", 1)[0] == "4321"
    assert "usage: ares sidecar" in out
    qdisc = out.split("--- qdisc\n", 1)[1]
    if "--- shaped" in qdisc:
        shaped, unshaped = qdisc.split("--- shaped", 1)[1].split("--- unshaped", 1)
        assert "qdisc htb" in shaped and re.search(r"rate 5Mbit", shaped), shaped
        assert "htb" not in unshaped, unshaped
    else:
        assert "Operation not supported" in qdisc, qdisc  # qemu's refusal, as above


# --- 3. the device side's unit tests on the arm64 torch ----------------------------------------

DEVICE_SIDE_IMPORTS = ("torch", "ares.runtime.device", "ares.runtime.training", "ares.core.models")
NOT_IN_THE_IMAGE = ("ares_operator", "kubernetes", "kopf", "hypothesis", "cluster", "subprocess", "tests.support")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def device_side_unit_tests() -> list[str]:
    """The unit tests of the model, training and device code: those importing torch or the device or
    training modules, and nothing the arm64 server image lacks (the operator, the test helpers)."""
    chosen = []
    for path in sorted((ROOT / "tests" / "unit").glob("test_*.py")):
        imports = _imports(path)
        if (any(i == m or i.startswith(m + ".") for i in imports for m in DEVICE_SIDE_IMPORTS)
                and not any(i == m or i.startswith(m + ".") for i in imports for m in NOT_IN_THE_IMAGE)):
            chosen.append(path.name)
    return chosen


def test_device_side_unit_tests_pass_on_the_arm64_torch(arm64, tmp_path):
    """Run under qemu in the arm64 server image (the device's torch layer, plus the server's
    packages that some of these tests use), with pytest copied from the test venv (pure Python)."""
    tests = device_side_unit_tests()
    assert len(tests) >= 5, tests
    assert "test_models.py" in tests
    site = Path(pytest.__file__).parent.parent
    lib = tmp_path / "lib"
    for name in ("pytest", "_pytest", "pluggy", "iniconfig", "pytest_asyncio"):
        shutil.copytree(site / name, lib / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(site / "py.py", lib / "py.py")  # pytest's shim module
    for meta in site.glob("*.dist-info"):
        if meta.name.split("-")[0].lower() in ("pytest", "pluggy", "iniconfig", "pytest_asyncio"):
            shutil.copytree(meta, lib / meta.name)
    for d in [lib, *lib.rglob("*")]:
        d.chmod(0o755 if d.is_dir() else 0o644)
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest", "-c", "/dev/null",
            "-o", "asyncio_default_fixture_loop_scope=function",
            "--rootdir", "/repo", *[f"/repo/tests/unit/{t}" for t in tests]]
    proc = arm64("run", "--rm", "--pull=never", "--network", "none", "--entrypoint", "python3",
                 "-v", f"{ROOT / 'tests'}:/repo/tests:ro", "-v", f"{lib}:/pylib:ro",
                 "--env", "PYTHONPATH=/pylib:/repo:/repo/tests", "--env", "PYTHONDONTWRITEBYTECODE=1",
                 "--workdir", "/repo", arm64.ref("server"), *args, check=False, timeout=3000)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{tests}\n{out[-6000:]}"
    summary = proc.stdout.strip().splitlines()[-1]  # stderr has podman's note on the platform
    assert re.search(r"\d+ passed", summary) and "failed" not in summary and "error" not in summary, summary


# --- 4. an arm64 device trains against an x86_64 server ------------------------------------------

def test_arm64_device_trains_one_round_against_an_x86_64_server(arm64, podman, tmp_path):
    port = free_port()
    cj = container_job(tmp_path, "pi", port, train=40, test=20, batch=8, deadline_s=900, max_steps=1)
    job, ckpt, podinfo, secret = cj.job, cj.ckpt, cj.podinfo, cj.secret
    controller_token = cj.controller_token
    limits = ("--network", "host", "--env", "OMP_NUM_THREADS=1")

    server = podman.start("server", "server", "--config", "/job/server.yaml",
                          opts=(*limits, "-v", f"{job}:/job:ro", "-v", f"{ckpt}:/ckpt"))
    assert inspect(podman, podman.ref("server"))["Architecture"] == "amd64"
    device = arm64.start("device", "device", "--server", f"http://127.0.0.1:{port}", "--name", "pi",
                         "--token-file", "/run/ares/token", "--split-file", "/etc/podinfo/split-point",
                         "--device-class", "raspberry-pi",
                         opts=(*limits, "--pull=never", "-v", f"{secret}:/run/ares:ro",
                               "-v", f"{podinfo}:/etc/podinfo:ro"))

    def logs() -> str:
        return f"--- server\n{podman.logs(server)[-4000:]}\n--- device (arm64)\n{arm64.logs(device)[-4000:]}"

    # The device's process: qemu runs it, with the container's uid, and the guest sees aarch64.
    out = arm64("exec", device, "sh", "-c", "uname -m; id -u; id -g").stdout.split()
    assert out == ["aarch64", str(UID), str(UID)], out
    pid = int(arm64("inspect", "--format", "{{.State.Pid}}", device).stdout.strip())
    status = Path(f"/proc/{pid}/status").read_text()
    assert re.search(rf"^Uid:\s+{UID}\s", status, re.M), status

    reply = first_round_closed(port, controller_token, 900, "round 0 closed by the arm64 device", logs, interval=1)
    assert reply.http_version == "HTTP/2"
    body = reply.json()
    assert body["rounds"] == 1
    assert body["accuracy"] is not None and 0.0 <= body["accuracy"] <= 1.0, body
    dev = body["devices"]["pi"]
    assert dev["last_round"] == 0 and dev["split"] == 2, body
    assert (ckpt / "global.safetensors").is_file(), "the server wrote no checkpoint"
    assert re.search(r"round 0 closed .*accuracy \d", podman.logs(server)), logs()


# --- 5. manifest lists ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_manifest_list_names_both_architectures(arm64, images, name):
    listed = json.loads(images("manifest", "inspect", f"{images.prefix}-{name}:{images.tag}-multiarch").stdout)
    assert listed["mediaType"].endswith(("manifest.list.v2+json", "image.index.v1+json")), listed["mediaType"]
    by_arch = {m["platform"]["architecture"]: m for m in listed["manifests"]}
    assert set(by_arch) == {"amd64", "arm64"}, listed
    assert all(m["platform"]["os"] == "linux" for m in listed["manifests"])
    # Each entry is the image built for that architecture, by digest.
    for podman, arch in ((images, "amd64"), (arm64, "arm64")):
        digest = inspect(podman, podman.ref(name))["Digest"]
        assert by_arch[arch]["digest"] == digest, (arch, by_arch[arch], digest)
