"""The Helm chart, tested with the real helm binary and kubernetes-validate.

helm is built from its Go module by scripts/build-control-plane (with kubectl and the control
plane); tests/k8s installs the chart on a real API server, these tests render and lint it.
"""

from __future__ import annotations

import os
import shutil
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
from cluster.controlplane import ControlPlaneUnavailable, bin_dir

CHART = ROOT / "charts" / "ares"
CRD_SOURCE = ROOT / "crds" / "aresjobs.ares.io.yaml"


def fetch_helm() -> Path:
    """The helm that scripts/build-control-plane built."""
    try:
        return bin_dir() / "helm"
    except ControlPlaneUnavailable as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def helm() -> Path:
    return fetch_helm()


def helm_template(helm: Path, tmp_path: Path, values: dict | None = None,
                  *extra: str) -> subprocess.CompletedProcess:
    args = [str(helm), "template", "ares", str(CHART), "--namespace", "ares-system", *extra]
    if values is not None:
        values_file = tmp_path / "values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        args += ["--values", str(values_file)]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def render(helm: Path, tmp_path: Path, values: dict | None = None, *extra: str) -> list[dict]:
    result = helm_template(helm, tmp_path, values, *extra)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def operator_container(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def grants(rules: list[dict], group: str, resource: str, verb: str) -> bool:
    return any(group in r.get("apiGroups", []) and resource in r.get("resources", [])
               and verb in r.get("verbs", []) for r in rules)


def crd() -> dict:
    return yaml.safe_load(CRD_SOURCE.read_text())


NAMESPACED = {"watchNamespaces": ["team-a", "team-b"], "logLevel": "DEBUG",
              "extraEnv": [{"name": "ARES_TICK_SECONDS", "value": "10"}]}


def test_helm_lint_strict(helm):
    for values in ([], ["--set", "watchNamespaces={team-a}"]):
        result = subprocess.run([str(helm), "lint", "--strict", str(CHART), *values],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", [None, NAMESPACED], ids=["defaults", "namespaced"])
def test_rendered_manifests_validate_strictly(helm, tmp_path, values):
    result = helm_template(helm, tmp_path, values, "--include-crds")
    assert result.returncode == 0, result.stderr
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(result.stdout)
    validate = Path(sys.executable).with_name("kubernetes-validate")
    checked = subprocess.run([str(validate), "--strict", str(manifest)],
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    kinds = {d["kind"] for d in yaml.safe_load_all(result.stdout) if d}
    assert {"CustomResourceDefinition", "Deployment", "ServiceAccount"} <= kinds


def test_operator_deployment_defaults(helm, tmp_path):
    docs = render(helm, tmp_path)
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = operator_container(docs)
    assert container["command"][:3] == ["kopf", "run", "--standalone"]
    assert "--all-namespaces" in container["args"]
    env = {e["name"]: e["value"] for e in container["env"]}
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert env == {
        "ARES_SERVER_IMAGE": f"ghcr.io/ares-split/ares-server:{app_version}",
        "ARES_DEVICE_IMAGE": f"ghcr.io/ares-split/ares-device:{app_version}",
        "ARES_DEVICE_JETSON_IMAGE": f"ghcr.io/ares-split/ares-device-jetson:{app_version}",
        "ARES_WATCH_NAMESPACES": "",
        "ARES_ALLOWED_IMAGES": "",
        "ARES_ALLOWED_HOST_PATHS": "/var/lib/ares/datasets",
        "ARES_LOG_LEVEL": "INFO",
        "ARES_METRICS_PORT": "8000",
    }
    # the operator's own /metrics: a named port, and the annotations Prometheus' pod discovery reads
    assert {"name": "metrics", "containerPort": 8000, "protocol": "TCP"} in container["ports"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8000"
    assert container["image"] == f"ghcr.io/ares-split/ares-operator:{app_version}"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_env_names_are_the_ones_the_operator_reads(helm, tmp_path):
    constants = pytest.importorskip("ares_operator.constants")
    operator_env = {v for k, v in vars(constants).items() if k.startswith("ENV_")}
    env = {e["name"] for e in operator_container(render(helm, tmp_path, NAMESPACED))["env"]}
    assert env <= operator_env, f"chart sets variables the operator ignores: {env - operator_env}"


def test_values_reach_the_deployment(helm, tmp_path):
    values = {**NAMESPACED, "jobImages": {"server": {"repository": "reg.local:5000/srv", "tag": "dev"},
                                          "device": {"repository": "reg.local:5000/dev", "tag": ""},
                                          "deviceJetson": {"repository": "reg.local:5000/jet",
                                                           "tag": "r36"}}}
    container = operator_container(render(helm, tmp_path, values))
    assert [a for a in container["args"] if a.startswith("--namespace")] == [
        "--namespace=team-a", "--namespace=team-b"]
    assert "--all-namespaces" not in container["args"] and "--verbose" in container["args"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["ARES_SERVER_IMAGE"] == "reg.local:5000/srv:dev"
    assert env["ARES_DEVICE_IMAGE"].startswith("reg.local:5000/dev:")
    assert env["ARES_DEVICE_JETSON_IMAGE"] == "reg.local:5000/jet:r36"
    assert env["ARES_LOG_LEVEL"] == "DEBUG" and env["ARES_TICK_SECONDS"] == "10"


# What the operator does in a watched namespace (see operator/ares_operator/kube.py and kopf's docs).
NEEDED = [
    ("ares.io", "aresjobs", "list"), ("ares.io", "aresjobs", "watch"),
    ("ares.io", "aresjobs", "patch"), ("ares.io", "aresjobs", "delete"),
    ("ares.io", "aresjobs/status", "patch"),
    ("", "pods", "create"), ("", "pods", "list"), ("", "pods", "patch"), ("", "pods", "delete"),
    ("", "services", "create"), ("", "configmaps", "create"), ("", "secrets", "create"),
    ("", "secrets", "get"), ("", "events", "create"),
]


def test_cluster_wide_rbac_grants_what_the_operator_needs_and_no_more(helm, tmp_path):
    docs = render(helm, tmp_path)
    work = one(docs, "ClusterRole", "ares")["rules"]
    framework = one(docs, "ClusterRole", "ares-framework")["rules"]
    for group, resource, verb in NEEDED:
        assert grants(work, group, resource, verb), (group, resource, verb)
    assert grants(framework, "", "namespaces", "list")
    assert grants(framework, "apiextensions.k8s.io", "customresourcedefinitions", "watch")
    for rule in work + framework:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
    assert not grants(work, "", "secrets", "list"), "listing secrets would expose every token"
    assert not any(grants(framework, "", "namespaces", v) for v in ("create", "delete", "patch"))
    binding = one(docs, "ClusterRoleBinding", "ares")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ares",
                                    "namespace": "ares-system"}]


def test_rbac_uses_the_crd_group_and_plural(helm, tmp_path):
    spec = crd()["spec"]
    work = one(render(helm, tmp_path), "ClusterRole", "ares")["rules"]
    assert grants(work, spec["group"], spec["names"]["plural"], "watch")
    assert grants(work, spec["group"], spec["names"]["plural"] + "/status", "patch")


def test_watched_namespaces_get_roles_not_cluster_rights(helm, tmp_path):
    docs = render(helm, tmp_path, NAMESPACED)
    roles = [d for d in docs if d["kind"] == "Role"]
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for role in roles:
        for group, resource, verb in NEEDED:
            assert grants(role["rules"], group, resource, verb)
    operators = {b["roleRef"]["name"] for b in docs if b["kind"] == "ClusterRoleBinding"}
    cluster_rules = [r for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] in operators
                     for r in d["rules"]]
    assert not grants(cluster_rules, "", "pods", "create")
    assert not grants(cluster_rules, "", "secrets", "get")
    assert not grants(cluster_rules, "ares.io", "aresjobs", "watch")
    # Outside the watched namespaces: only what releasing a job of a namespace no longer watched needs.
    assert grants(cluster_rules, "ares.io", "aresjobs", "list") and grants(cluster_rules, "ares.io", "aresjobs", "patch")
    assert not grants(cluster_rules, "ares.io", "aresjobs", "delete")


def test_rbac_and_service_account_can_be_turned_off(helm, tmp_path):
    docs = render(helm, tmp_path, {"rbac": {"create": False},
                                   "serviceAccount": {"create": False, "name": "my-operator"}})
    assert {d["kind"] for d in docs} == {"Deployment", "Job"}  # the uninstall hook uses the given account
    assert one(docs, "Job")["spec"]["template"]["spec"]["serviceAccountName"] == "my-operator"
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "my-operator"


def test_chart_crd_is_an_exact_copy_of_the_source():
    copy = CHART / "crds" / CRD_SOURCE.name
    assert copy.read_bytes() == CRD_SOURCE.read_bytes(), "run scripts/sync-crd"
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == sorted(
        p.name for p in CRD_SOURCE.parent.glob("*.yaml"))
    check = subprocess.run([str(ROOT / "scripts" / "sync-crd"), "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_sync_crd_check_notices_drift(tmp_path):
    """--check must fail on a stale copy (run on a scratch tree, never the real chart)."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "sync-crd", tmp_path / "scripts")
    (tmp_path / "crds").mkdir()
    (tmp_path / "crds" / "x.yaml").write_text("a: 1\n")
    sync = str(tmp_path / "scripts" / "sync-crd")
    assert subprocess.run([sync, "--check"], capture_output=True).returncode == 1
    assert subprocess.run([sync], capture_output=True).returncode == 0
    assert subprocess.run([sync, "--check"], capture_output=True).returncode == 0
    (tmp_path / "crds" / "x.yaml").write_text("a: 2\n")
    assert subprocess.run([sync, "--check"], capture_output=True).returncode == 1


BAD_VALUES = {
    "log level": {"logLevel": "LOUD"},
    "namespace name": {"watchNamespaces": ["Team_A"]},
    "duplicate namespace": {"watchNamespaces": ["a", "a"]},
    "tag type": {"image": {"repository": "ghcr.io/x/y", "tag": 5, "pullPolicy": "Always"}},
    "pull policy": {"image": {"repository": "ghcr.io/x/y", "tag": "", "pullPolicy": "Sometimes"}},
    "repository with tag": {"jobImages": {"server": {"repository": "ghcr.io/x/y:1", "tag": ""},
                                          "device": {"repository": "a/b", "tag": ""},
                                          "deviceJetson": {"repository": "a/c", "tag": ""}}},
    "unknown key": {"replicas": 2},
    "privileged port": {"healthPort": 80},
    "metrics port": {"metrics": {"enabled": True, "port": 80}},
    "env name": {"extraEnv": [{"name": "1BAD", "value": "x"}]},
    "relative host path": {"jobPolicy": {"allowedImages": [], "allowedHostPaths": ["data"]}},
    "host path with ..": {"jobPolicy": {"allowedImages": [], "allowedHostPaths": ["/var/lib/../../etc"]}},
    "host path with a comma": {"jobPolicy": {"allowedImages": [], "allowedHostPaths": ["/a,/b"]}},
    "image with a comma": {"jobPolicy": {"allowedImages": ["a.example/x:1,b.example/y:2"], "allowedHostPaths": []}},
}


@pytest.mark.parametrize("values", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_schema_rejects_bad_values(helm, tmp_path, values):
    result = helm_template(helm, tmp_path, values)
    assert result.returncode != 0
    assert "schema" in result.stderr.lower(), result.stderr


def test_values_file_is_valid_and_every_value_documented():
    schema = yaml.safe_load((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(values)
    assert undocumented_values((CHART / "values.yaml").read_text()) == []


def undocumented_values(text: str) -> list[str]:
    """Keys with a value that carry no `# --` comment, themselves or on a parent mapping."""
    missing, documented_parents = [], []  # stack of (indent, documented)
    comment_block: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comment_block.append(stripped)
            continue
        match = re.match(r"^(\s*)([A-Za-z]\w*):\s*(\S.*)?$", line)
        if not match:
            comment_block = []
            continue
        indent = len(match.group(1))
        while documented_parents and documented_parents[-1][0] >= indent:
            documented_parents.pop()
        documented = any(c.startswith("# --") for c in comment_block) or any(
            d for _, d in documented_parents)
        if match.group(3) is None:
            documented_parents.append((indent, documented))
        elif not documented:
            missing.append(match.group(2))
        comment_block = []
    return missing


def test_documentation_check_notices_a_missing_comment():
    assert undocumented_values("a:\n  # -- yes\n  b: 1\n  c: 2\n") == ["c"]
    assert undocumented_values("# -- all of it\nr:\n  x: 1\n") == []


def test_notes_tell_what_to_do_next(helm, control_plane):
    # helm install checks the chart's kubeVersion against a cluster: the real API server's.
    from cluster.controlplane import tool_env

    result = subprocess.run([str(helm), "install", "demo", str(CHART), "--dry-run=server",
                             "--namespace", "ares-system", "--set", "watchNamespaces={team-a}"],
                            capture_output=True, text=True, timeout=60,
                            env=tool_env(control_plane.bin, control_plane.admin_kubeconfig))
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "rollout status deployment/demo-ares" in notes
    assert "kubectl apply -n team-a -f examples/job.yaml" in notes
    assert "kubectl get aresjobs" in notes
    # What the operator may do, the label a job's namespace needs, how to uninstall.
    assert "in the namespaces above only" in notes and "privileged" in notes
    assert "kubectl label namespace team-a pod-security.kubernetes.io/enforce=privileged" in notes
    assert "/var/lib/ares/datasets" in notes and "pre-delete hook" in notes
    wide = subprocess.run([str(helm), "install", "demo", str(CHART), "--dry-run=server", "--namespace", "ares-system"],
                          capture_output=True, text=True, timeout=60,
                          env=tool_env(control_plane.bin, control_plane.admin_kubeconfig))
    assert wide.returncode == 0, wide.stderr
    assert "in EVERY namespace of the cluster" in wide.stdout and "watchNamespaces={team-a}" in wide.stdout


def test_users_get_aresjobs_through_the_built_in_roles(helm, tmp_path):
    docs = render(helm, tmp_path)
    edit, view = one(docs, "ClusterRole", "ares-aresjobs-edit"), one(docs, "ClusterRole", "ares-aresjobs-view")
    labels = edit["metadata"]["labels"]
    assert labels["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert labels["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    for verb in ("create", "list", "watch", "delete", "patch"):
        assert grants(edit["rules"], "ares.io", "aresjobs", verb)
    assert not grants(edit["rules"], "ares.io", "aresjobs/status", "patch")  # status is the operator's
    assert not any(grants(view["rules"], "ares.io", "aresjobs", v) for v in ("create", "patch", "delete"))
    assert not [b for b in docs if b["kind"].endswith("Binding") and b["roleRef"]["name"].startswith("ares-aresjobs")]


def test_job_policy_values_reach_the_operator(helm, tmp_path):
    values = {"jobPolicy": {"allowedImages": ["reg.example/team-a/*", "reg.example/x:1"],
                            "allowedHostPaths": ["/data", "/srv/datasets"]}, "watchNamespaces": ["team-a"]}
    env = {e["name"]: e["value"] for e in operator_container(render(helm, tmp_path, values))["env"]}
    assert env["ARES_ALLOWED_IMAGES"] == "reg.example/team-a/*,reg.example/x:1"
    assert env["ARES_ALLOWED_HOST_PATHS"] == "/data,/srv/datasets"
    assert env["ARES_WATCH_NAMESPACES"] == "team-a"
    from ares_operator.settings import from_env

    policy = from_env(env).policy
    assert policy.allowed_images == ("reg.example/team-a/*", "reg.example/x:1")
    assert policy.allowed_host_paths == ("/data", "/srv/datasets")


def test_uninstall_stops_jobs_first_unless_told_not_to(helm, tmp_path):
    docs = render(helm, tmp_path, {"watchNamespaces": ["team-a"]})
    hook = one(docs, "Job")
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
    pod = hook["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "ares_operator.release", "--stop"]
    assert container["image"] == operator_container(docs)["image"]
    assert {"name": "ARES_WATCH_NAMESPACES", "value": "team-a"} in container["env"]
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert not [d for d in render(helm, tmp_path, {"stopJobsOnUninstall": False}) if d["kind"] == "Job"]


def test_example_job_is_valid_for_the_chart_crd():
    """examples/job.yaml passes the CRD's schema and lands in a namespace the defaults watch."""
    example = ROOT / "examples" / "job.yaml"
    if not example.exists():
        pytest.skip("examples/job.yaml not written yet")
    job = yaml.safe_load(example.read_text())
    chart_crd = yaml.safe_load((CHART / "crds" / CRD_SOURCE.name).read_text())
    assert job["apiVersion"] == f"{chart_crd['spec']['group']}/{chart_crd['spec']['versions'][0]['name']}"
    assert job["kind"] == chart_crd["spec"]["names"]["kind"]
    schema = chart_crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    jsonschema.Draft4Validator(schema).validate(job)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["watchNamespaces"] == [] or job["metadata"].get("namespace") in values["watchNamespaces"]
