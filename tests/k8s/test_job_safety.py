"""A job is not a way to root a node, no failure is silent, nothing is left behind.

Tried on the real control plane as the least-privileged user who may create a job (`edit` in
one namespace, through the chart's aggregated ClusterRoles), with the real operator running
under the chart's ServiceAccount and RBAC.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

import pytest
import yaml

from cluster.fixtures import OPERATOR_NS, OPERATOR_SA
from tests.support import ROOT, wait_for
from tests.k8s.k8s_jobs import example_job as _job

pytestmark = pytest.mark.k8s

EDITOR, VIEWER = "team-a-editor", "team-a-viewer"
TRAINER = "team-a-trainer"  # may manage aresjobs in the namespace and nothing else (no pods)
ADMIN_IMAGES = ("ghcr.io/ares-split/ares-server:0.1.0", "ghcr.io/ares-split/ares-device:0.1.0",
                "ghcr.io/ares-split/ares-device-jetson:0.1.0")  # the operator's defaults (settings.ImageSettings)


def _as(kubectl, user: str, *args: str, stdin: str | None = None, check: bool = False) -> subprocess.CompletedProcess:
    return kubectl.run(f"--as={user}", *args, stdin=stdin, check=check)


def _grant(kubectl, namespace: str) -> None:
    kubectl.run("create", "rolebinding", "editors", "--clusterrole=edit", f"--user={EDITOR}", "-n", namespace)
    kubectl.run("create", "rolebinding", "viewers", "--clusterrole=view", f"--user={VIEWER}", "-n", namespace)
    kubectl.run("create", "rolebinding", "trainers", "--clusterrole=ares-aresjobs-edit", f"--user={TRAINER}",
                "-n", namespace)
    # The aggregation controller folds the chart's rules into edit and view.
    wait_for(lambda: _as(kubectl, EDITOR, "auth", "can-i", "create", "aresjobs").stdout.strip() == "yes",
             60, "aresjobs in the built-in edit role", interval=0.2)


def _status(kubectl, name: str) -> dict[str, Any]:
    return kubectl.json("get", "aresjobs", name).get("status") or {}


def _conditions(kubectl, name: str) -> dict[str, dict]:
    return {c["type"]: c for c in _status(kubectl, name).get("conditions") or []}


def _events(kubectl, name: str) -> list[dict]:
    return [e for e in kubectl.json("get", "events")["items"]
            if e["involvedObject"].get("kind") == "AresTrainingJob" and e["involvedObject"]["name"] == name]


def _children(kubectl, job: str) -> list[str]:
    found = kubectl.json("get", "pods,secrets,configmaps,services", "-l", f"ares.io/job={job}")["items"]
    return [f"{o['kind']} {o['metadata']['name']}" for o in found]


# --- 1. a namespace editor: aresjobs yes, root on a node no -----------------------------------------

def test_editors_and_viewers_use_aresjobs_through_the_built_in_roles(kubectl, namespace):
    _grant(kubectl, namespace)
    for verb in ("create", "list", "watch", "delete", "patch"):
        assert _as(kubectl, EDITOR, "auth", "can-i", verb, "aresjobs").stdout.strip() == "yes", verb
    for verb in ("get", "list", "watch"):
        assert _as(kubectl, VIEWER, "auth", "can-i", verb, "aresjobs").stdout.strip() == "yes", verb
    assert _as(kubectl, VIEWER, "auth", "can-i", "create", "aresjobs").stdout.strip() == "no"
    # Not outside their namespace.
    assert _as(kubectl, EDITOR, "auth", "can-i", "create", "aresjobs", "-n", "default").stdout.strip() == "no"
    proc = _as(kubectl, EDITOR, "apply", "-f", "-", stdin=yaml.safe_dump(_job()))
    assert proc.returncode == 0, proc.stderr
    rows = [line.split()[0] for line in _as(kubectl, VIEWER, "get", "aresjobs", check=True).stdout.splitlines()[1:]]
    assert rows == ["demo"]
    assert _as(kubectl, VIEWER, "delete", "aresjob", "demo").returncode != 0
    assert _as(kubectl, EDITOR, "delete", "aresjob", "demo", "--wait=true").returncode == 0


# Attempts a namespace editor makes to get more than a job is for. Each is refused by the API
# server (CEL or schema: `kubectl apply` fails) or by the operator (phase Failed, condition
# SpecValid=False with the reason, nothing created).
ATTEMPTS = [
    ("device-image", {"devices__2__image": "evil.example/root:latest"}, "operator", "NotAllowedByPolicy"),
    ("jetson-image", {"devices__0__image": "evil.example/root:latest"}, "operator", "NotAllowedByPolicy"),
    ("server-image", {"server__image": "evil.example/root:latest"}, "operator", "NotAllowedByPolicy"),
    ("host-root", {"dataset__name": "cifar10", "dataset__path": "/"}, "api", "dataset.path"),
    ("host-dotdot", {"dataset__name": "cifar10", "dataset__path": "/var/lib/ares/datasets/../../../etc"}, "api",
     "dataset.path"),
    ("host-etc", {"dataset__name": "cifar10", "dataset__path": "/etc"}, "operator", "NotAllowedByPolicy"),
    ("host-checkpoints", {"dataset__name": "auto", "dataset__path": "/var/lib/ares/checkpoints/other-team"},
     "operator", "NotAllowedByPolicy"),
]


@pytest.mark.parametrize("changes, by, says", [a[1:] for a in ATTEMPTS], ids=[a[0] for a in ATTEMPTS])
def test_no_job_spec_gives_an_editor_root_or_the_host(kubectl, operator, namespace, changes, by, says):
    _grant(kubectl, namespace)
    assert _as(kubectl, TRAINER, "auth", "can-i", "create", "pods").stdout.strip() == "no"
    proc = _as(kubectl, TRAINER, "apply", "-f", "-", stdin=yaml.safe_dump(_job("bad", **changes)))
    if by == "api":
        assert proc.returncode != 0 and says in proc.stderr, proc.stderr
        assert kubectl.json("get", "aresjobs")["items"] == []
        return
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: _status(kubectl, "bad").get("phase") == "Failed", 60, "phase Failed", interval=0.2)
    cond = _conditions(kubectl, "bad")["SpecValid"]
    assert cond["status"] == "False" and cond["reason"] == says, cond
    assert "allowed" in cond["message"] and "jobPolicy" in cond["message"]
    assert [e for e in _events(kubectl, "bad") if e["reason"] == says and e["type"] == "Warning"]
    assert _children(kubectl, "bad") == []


def test_whatever_an_editor_writes_only_the_administrators_images_run_as_root(kubectl, operator, namespace):
    """Fields a pod would have but the CRD does not (privileged, hostNetwork, volumes...) are pruned
    by the API server; what the operator builds is checked container by container."""
    _grant(kubectl, namespace)
    job = _job("tricky", dataset__name="cifar10", dataset__path="/var/lib/ares/datasets/CIFAR10",
               devices__0__image=ADMIN_IMAGES[1])  # allowed: the operator's own image, on a Jetson device
    for device in job["spec"]["devices"]:
        device.update(privileged=True, hostNetwork=True, securityContext={"runAsUser": 0, "privileged": True},
                      volumes=[{"name": "root", "hostPath": {"path": "/"}}], command=["sh", "-c", "id"])
    job["spec"]["server"].update(hostPID=True, securityContext={"runAsUser": 0})
    proc = _as(kubectl, TRAINER, "apply", "-f", "-", stdin=yaml.safe_dump(job))
    assert proc.returncode != 0 and 'unknown field "spec.devices[0].privileged"' in proc.stderr, proc.stderr
    # Told not to validate, the API server prunes what the schema does not know.
    proc = _as(kubectl, TRAINER, "apply", "--validate=false", "-f", "-", stdin=yaml.safe_dump(job))
    assert proc.returncode == 0, proc.stderr
    assert "privileged" not in json.dumps(kubectl.json("get", "aresjobs", "tricky")["spec"])
    pods = wait_for(lambda: len(p := kubectl.json("get", "pods", "-l", "ares.io/job=tricky")["items"]) == 4 and p,
                    60, "the job's pods", interval=0.2)
    uid = kubectl.json("get", "aresjobs", "tricky")["metadata"]["uid"]
    for pod in pods:
        spec = pod["spec"]
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        assert spec["securityContext"]["runAsUser"] == 10001 and spec["securityContext"]["runAsNonRoot"] is True
        host_paths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            security = container.get("securityContext") or {}
            if security.get("privileged") or security.get("runAsUser") == 0:
                assert container["image"] in ADMIN_IMAGES, (pod["metadata"]["name"], container["name"])
            else:
                assert security.get("runAsNonRoot") is True and security.get("allowPrivilegeEscalation") is False
            assert container.get("command") == ["ares"] or container["name"] == "prepare-checkpoints"
            for mount in container.get("volumeMounts", []):
                path = host_paths.get(mount["name"])
                if path is None:
                    continue
                # Writable host directories: only the job's own checkpoint directory, and the
                # Jetson sidecar's nvpmodel state (the administrator's image).
                if not mount.get("readOnly"):
                    assert path == f"/var/lib/ares/checkpoints/{namespace}/tricky-{uid}" or (
                        path == "/var/lib/nvpmodel" and container["image"] in ADMIN_IMAGES), (path, container["name"])
                if mount["name"] == "data":
                    assert path == "/var/lib/ares/datasets/CIFAR10" and mount["readOnly"] is True


# --- 2. quantities, quotas, RuntimeClass, names ------------------------------------------------

def test_integer_quantities_and_extended_resources_reach_the_pods(kubectl, operator):
    job = _job("ints", server__resources={"requests": {"cpu": 2, "nvidia.com/gpu": 1},
                                          "limits": {"nvidia.com/gpu": 1}},
               devices__2__resources={"requests": {"cpu": 1}})
    kubectl.run("apply", "-f", "-", stdin=yaml.safe_dump(job))
    server = wait_for(lambda: kubectl.run("get", "pod", "ints-server", "-o", "json", check=False).stdout,
                      60, "the server pod", interval=0.2)
    resources = json.loads(server)["spec"]["containers"][0]["resources"]
    assert resources["requests"]["cpu"] == "2" and resources["requests"]["nvidia.com/gpu"] == "1"
    pi = wait_for(lambda: kubectl.run("get", "pod", "ints-pi", "-o", "json", check=False).stdout, 30, "the pi pod",
                  interval=0.2)
    assert json.loads(pi)["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "1"
    wait_for(lambda: _conditions(kubectl, "ints").get("ChildrenCreated", {}).get("status") == "True",
             30, "ChildrenCreated", interval=0.2)
    # status.devices as `kubectl describe` shows it: each device under its own name, as written.
    wait_for(lambda: len(_status(kubectl, "ints").get("devices") or []) == 3, 30, "status.devices", interval=0.2)
    described = kubectl.run("describe", "aresjob", "ints").stdout
    for device in ("nano-maxn", "nano-5w", "pi"):
        assert re.search(rf"^\s+Name:\s+{device}$", described, re.M), described


def test_a_quota_that_cannot_hold_the_whole_job_leaves_nothing_created(kubectl, operator):
    # Each pod fits alone (the server asks 2 CPUs, a device 0.51), all four do not (3.53).
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "small"},
             "spec": {"hard": {"requests.cpu": "3", "pods": "10"}}}
    kubectl.run("apply", "-f", "-", stdin=yaml.safe_dump(quota))
    wait_for(lambda: (kubectl.json("get", "resourcequota", "small").get("status") or {}).get("hard"),
             30, "the quota's status", interval=0.2)
    kubectl.run("apply", "-f", "-", stdin=yaml.safe_dump(_job()))
    cond = wait_for(lambda: (c := _conditions(kubectl, "demo").get("ChildrenCreated")) and c["status"] == "False"
                    and c, 60, "the quota refusal", interval=0.2)
    assert cond["reason"] == "QuotaExceeded", cond
    assert "ResourceQuota small: requests.cpu needs 3.53 more" in cond["message"] and "RBAC" not in cond["message"]
    assert [e for e in _events(kubectl, "demo") if e["reason"] == "QuotaExceeded" and e["type"] == "Warning"]
    assert _children(kubectl, "demo") == []
    # A larger quota: the job goes ahead.
    kubectl.run("patch", "resourcequota", "small", "--type=merge", "-p", '{"spec": {"hard": {"requests.cpu": "10"}}}')
    wait_for(lambda: len(kubectl.json("get", "pods")["items"]) == 4, 60, "the pods", interval=0.2)


def test_a_missing_runtime_class_is_named_as_such(kubectl, operator):
    runtime_class = kubectl.json("get", "runtimeclass", "nvidia")
    kubectl.run("delete", "runtimeclass", "nvidia")
    try:
        kubectl.run("apply", "-f", "-", stdin=yaml.safe_dump(_job()))
        cond = wait_for(lambda: (c := _conditions(kubectl, "demo").get("ChildrenCreated")) and c["status"] == "False"
                        and c, 60, "the refusal", interval=0.2)
        assert cond["reason"] == "RuntimeClassNotFound", cond
        assert 'RuntimeClass "nvidia" not found' in cond["message"] and "RBAC" not in cond["message"]
        assert _children(kubectl, "demo") == []
    finally:
        kubectl.run("apply", "-f", "-", stdin=json.dumps(
            {k: v for k, v in runtime_class.items() if k in ("apiVersion", "kind", "handler")}
            | {"metadata": {"name": "nvidia"}}))
    wait_for(lambda: len(kubectl.json("get", "pods")["items"]) == 4, 60, "the pods once it exists", interval=0.2)


def test_two_jobs_whose_pod_names_collide_are_told_apart(kubectl, operator):
    first = _job("edge")
    first["spec"]["devices"] = [{"name": "b-pi", "deviceClass": "cpu"}]
    second = _job("edge-b")
    second["spec"]["devices"] = [{"name": "pi", "deviceClass": "cpu"}]
    kubectl.run("apply", "-f", "-", stdin=yaml.safe_dump(first))
    wait_for(lambda: kubectl.run("get", "pod", "edge-b-pi", check=False).returncode == 0, 60, "edge's pod",
             interval=0.2)
    kubectl.run("apply", "-f", "-", stdin=yaml.safe_dump(second))
    cond = wait_for(lambda: (c := _conditions(kubectl, "edge-b").get("ChildrenCreated")) and c["status"] == "False"
                    and c, 60, "the conflict", interval=0.2)
    assert cond["reason"] == "NameConflict" and "edge-b-pi" in cond["message"]
    assert _children(kubectl, "edge-b") == []  # nothing half-made
    owner = kubectl.json("get", "pod", "edge-b-pi")["metadata"]["ownerReferences"][0]["name"]
    assert owner == "edge"


# --- 3. faults at each step of creation and of the tick ------------------------------------------

FAULTS = ["validate", "build", "dry-run", "quota", "tokens", "config", "service", "tls", "pod", "status"]
CREATING = {"validate", "build", "dry-run", "quota", "tokens", "config", "service"}


def _inject(monkeypatch) -> None:
    """Each job named f-<step> fails at <step> with RuntimeError('injected <step>'); the others run."""
    from ares_operator import builders, handlers, kube, tls
    from ares_operator import status as job_status
    from ares_operator import validation

    def fail_for(step: str, name: str) -> None:
        if name == f"f-{step}":
            raise RuntimeError(f"injected {step}")

    def wrap(module, attr, step, name_of):
        real = getattr(module, attr)

        def patched(*args, **kwargs):
            fail_for(step, name_of(*args, **kwargs))
            return real(*args, **kwargs)
        monkeypatch.setattr(module, attr, patched)

    wrap(validation, "validate", "validate", lambda name, *a, **k: name)
    wrap(builders, "children", "build", lambda job, *a, **k: job.name)
    wrap(handlers, "_check_quota", "quota", lambda kube_, job, objs: job.name)
    wrap(handlers, "_tokens", "tokens", lambda call, spec: call.job.name)
    wrap(tls, "secret", "tls", lambda job, spec, *a, **k: job.name)
    wrap(job_status, "summary", "status", lambda job, *a, **k: job.name)
    real_create = kube.Kube.create

    def create(self, obj, dry_run=False):
        kind = obj["kind"]
        job = obj["metadata"].get("labels", {}).get("ares.io/job", "")
        step = {("Pod", True): "dry-run", ("ConfigMap", False): "config", ("Service", False): "service",
                ("Pod", False): "pod"}.get((kind, dry_run))
        if step:
            fail_for(step, job)
        return real_create(self, obj, dry_run)
    monkeypatch.setattr(kube.Kube, "create", create)


def test_an_error_at_any_step_ends_on_the_job_as_a_condition_and_an_event(kubectl, control_plane, namespace,
                                                                           monkeypatch):
    from tests.k8s.conftest import Operator

    _inject(monkeypatch)
    op = Operator(control_plane, namespace)
    op.start()
    try:
        for step in FAULTS:
            kubectl.run("apply", "-f", "-", stdin=yaml.safe_dump(_job(f"f-{step}")))
        for step in FAULTS:
            name = f"f-{step}"
            cond = wait_for(lambda: (c := _conditions(kubectl, name).get("Reconciled")) and c["status"] == "False"
                            and c, 30, f"the error of {name} on the job", interval=0.2)
            assert cond["reason"] == "ReconcileError" and f"injected {step}" in cond["message"], cond
            events = wait_for(lambda: [e for e in _events(kubectl, name) if e["type"] == "Warning"
                                       and f"injected {step}" in e["message"]], 30, f"a Warning event for {name}",
                              interval=0.2)
            assert events[0]["reason"] == "ReconcileError"
            status = _status(kubectl, name)
            if step in CREATING:  # the same spec would fail the same way: ended, and nothing left
                assert status["phase"] == "Failed" and _conditions(kubectl, name)["Failed"]["reason"] == "ReconcileError"
                wait_for(lambda: _children(kubectl, name) == [], 30, f"{name}'s children removed", interval=0.2)
            else:  # a job running: retried with backoff, not ended at the first error
                assert status.get("phase") != "Failed" and "try " in cond["message"], status
        # A job with no fault went ahead beside them.
        kubectl.run("apply", "-f", "-", stdin=yaml.safe_dump(_job("healthy")))
        wait_for(lambda: _conditions(kubectl, "healthy").get("Reconciled", {}).get("status") == "True",
                 30, "the healthy job reconciled", interval=0.2)
    finally:
        op.stop()


# --- 6. no orphans: unwatched namespaces, uninstall ------------------------------------------------

def _held(kubectl, name: str, namespace: str) -> bool:
    job = kubectl.json("get", "aresjobs", name, "-n", namespace)
    return "operator.ares.io/finalizer" in (job["metadata"].get("finalizers") or [])


def test_a_namespace_no_longer_watched_has_its_jobs_released(kubectl, control_plane, namespace, operator,
                                                            monkeypatch):
    from tests.k8s.conftest import Operator

    kubectl.run("apply", "-f", "-", stdin=yaml.safe_dump(_job()))
    wait_for(lambda: _held(kubectl, "demo", namespace) and len(kubectl.json("get", "pods")["items"]) == 4,
             60, "the job held, its pods made", interval=0.2)
    operator.stop()
    other = f"{namespace}-other"
    kubectl.run("create", "namespace", other)
    try:
        monkeypatch.setenv("ARES_WATCH_NAMESPACES", other)
        narrowed = Operator(control_plane, other)
        narrowed.start()
        try:
            wait_for(lambda: not _held(kubectl, "demo", namespace), 60, "the finalizer removed", interval=0.2)
            cond = _conditions(kubectl, "demo")["Reconciled"]
            assert cond["status"] == "False" and cond["reason"] == "NamespaceNotWatched"
            assert "watchNamespaces" in cond["message"]
            assert [e for e in _events(kubectl, "demo") if e["reason"] == "NamespaceNotWatched"]
            proc = kubectl.run("delete", "aresjob", "demo", "--wait=true", "--timeout=30s", check=False)
            assert proc.returncode == 0, proc.stderr  # no finalizer nobody removes
        finally:
            narrowed.stop()
    finally:
        kubectl.run("delete", "namespace", other, "--wait=false")


def test_the_uninstall_hook_stops_every_job_and_lets_it_go(kubectl, control_plane, namespace, operator, tmp_path):
    kubectl.run("apply", "-f", "-", stdin=yaml.safe_dump(_job()))
    wait_for(lambda: _held(kubectl, "demo", namespace) and len(kubectl.json("get", "pods")["items"]) == 4,
             60, "the job held, its pods made", interval=0.2)
    operator.stop()
    # What the chart's pre-delete hook runs, as the operator's ServiceAccount (its RBAC is still there).
    hook = yaml.safe_load(subprocess.run(
        ["helm", "template", "ares", str(ROOT / "charts" / "ares"), "-n", OPERATOR_NS, "-s",
         "templates/uninstall-hook.yaml"], env=kubectl.env, capture_output=True, text=True, check=True).stdout)
    (container,) = hook["spec"]["template"]["spec"]["containers"]
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
    assert hook["spec"]["template"]["spec"]["serviceAccountName"] == OPERATOR_SA
    config = tmp_path / "operator.kubeconfig"
    config.write_text(json.dumps(control_plane.kubeconfig({"token": control_plane.token_for(OPERATOR_NS, OPERATOR_SA)})))
    env = {**os.environ, "KUBECONFIG": str(config), "PYTHONPATH": str(ROOT / "operator")}
    argv = [sys.executable if a == "python" else a for a in container["command"]]
    proc = subprocess.run([*argv, "--namespace", namespace], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and f"released {namespace}/demo" in proc.stdout, proc.stderr
    status = _status(kubectl, "demo")
    assert status["phase"] == "Failed" and _conditions(kubectl, "demo")["Failed"]["reason"] == "OperatorUninstalled"
    assert not _held(kubectl, "demo", namespace)
    for pod in kubectl.json("get", "pods")["items"]:  # no kubelet: bound pods stay Terminating
        assert pod["metadata"].get("deletionTimestamp"), pod["metadata"]["name"]
    assert kubectl.run("delete", "aresjob", "demo", "--wait=true", "--timeout=30s", check=False).returncode == 0


def test_a_namespaced_install_and_its_uninstall_in_the_documented_order(kubectl, control_plane, namespace):
    """The recommended install (one namespace), then the documented way out: jobs deleted while the
    operator runs, then `helm uninstall`. Nothing of either is left but the CRD."""
    from tests.k8s.conftest import Operator

    release, home = "team", f"{namespace}-ops"
    helm = ["helm", "-n", home]
    proc = subprocess.run([*helm, "install", release, str(ROOT / "charts" / "ares"), "--create-namespace",
                           "--set", f"watchNamespaces={{{namespace}}}"], env=kubectl.env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "in the namespaces above only" in proc.stdout
    try:
        # The operator as that release's ServiceAccount: its rights are a Role in `namespace` only.
        sa = f"{release}-ares"
        assert kubectl.run("auth", "can-i", "create", "pods", "-n", namespace,
                           f"--as=system:serviceaccount:{home}:{sa}").stdout.strip() == "yes"
        assert kubectl.run("auth", "can-i", "get", "secrets", "-n", "kube-system",
                           f"--as=system:serviceaccount:{home}:{sa}", check=False).stdout.strip() == "no"
        op = Operator(control_plane, namespace, service_account=(home, sa))
        op.start()
        try:
            kubectl.run("apply", "-f", "-", stdin=yaml.safe_dump(_job()))
            wait_for(lambda: _held(kubectl, "demo", namespace) and len(kubectl.json("get", "pods")["items"]) == 4,
                     60, "the job held, its pods made", interval=0.2)
            proc = kubectl.run("delete", "aresjobs", "--all", "--wait=true", "--timeout=60s", check=False)
            assert proc.returncode == 0, proc.stderr
        finally:
            op.stop()
        proc = subprocess.run([*helm, "uninstall", release, "--no-hooks", "--wait"], env=kubectl.env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert kubectl.json("get", "aresjobs")["items"] == []
        left = [o["metadata"]["name"] for o in kubectl.json("get", "clusterroles,clusterrolebindings")["items"]
                if o["metadata"]["name"].startswith(f"{release}-ares")]
        assert left == []
        assert kubectl.run("get", "crd", "aresjobs.ares.io", check=False).returncode == 0  # Helm keeps CRDs
    finally:
        subprocess.run([*helm, "uninstall", release, "--no-hooks"], env=kubectl.env, capture_output=True, timeout=120)
        kubectl.run("delete", "namespace", home, "--wait=false", check=False)
