"""What only a real API server shows: the chart installs, CEL rules are evaluated, RBAC is the
chart's, Pod Security admission, the garbage collector and Events.

Runs against the control plane of tests/cluster (etcd, kube-apiserver, kube-controller-manager),
with the real kubectl and helm built next to it.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from cluster.fixtures import OPERATOR_NS
from tests.support import ROOT, wait_for
from tests.k8s.k8s_jobs import example_job as _job

pytestmark = pytest.mark.k8s


def _apply(kubectl, job: dict, check: bool = False) -> subprocess.CompletedProcess:
    return kubectl.run("apply", "-f", "-", stdin=yaml.safe_dump(job), check=check)


def _children(kubectl) -> dict[str, list[dict]]:
    return {kind: kubectl.json("get", kind)["items"] for kind in ("pods", "secrets", "configmaps", "services")
            } | {"configmaps": [c for c in kubectl.json("get", "configmaps")["items"]
                                if c["metadata"]["name"] != "kube-root-ca.crt"]}


def _conditions(kubectl, name: str) -> dict[str, dict]:
    status = kubectl.json("get", "aresjobs", name).get("status") or {}
    return {c["type"]: c for c in status.get("conditions") or []}


def _events(kubectl, name: str) -> list[dict]:
    return [e for e in kubectl.json("get", "events")["items"]
            if e["involvedObject"].get("kind") == "AresTrainingJob" and e["involvedObject"]["name"] == name]


# --- 1. the chart, the CRD and the examples install on a real API server ---------------------

def test_chart_installs_everything_it_claims(kubectl):
    crd = kubectl.json("get", "crd", "aresjobs.ares.io")
    established = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert established["Established"] == "True" and established["NamesAccepted"] == "True"
    kinds = {(o["kind"], o["metadata"]["name"]) for o in kubectl.json(
        "get", "serviceaccount,deployment", "-n", OPERATOR_NS)["items"]}
    assert ("ServiceAccount", "ares") in kinds and ("Deployment", "ares") in kinds
    role = kubectl.json("get", "clusterrole", "ares")
    assert any("aresjobs/finalizers" in r.get("resources", []) and "update" in r["verbs"] for r in role["rules"])
    binding = kubectl.json("get", "clusterrolebinding", "ares")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ares", "namespace": OPERATOR_NS}]
    # `kubectl apply -f crds/` works on top of the chart's copy (how users upgrade CRDs).
    proc = kubectl.run("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    assert "aresjobs.ares.io" in proc.stdout


def test_every_example_applies(kubectl):
    manifests = [p for p in sorted((ROOT / "examples").glob("*.yaml"))
                 if yaml.safe_load(p.read_text()).get("kind") == "AresTrainingJob"]
    assert len(manifests) >= 2
    for path in manifests:
        proc = kubectl.run("apply", "--dry-run=server", "-f", str(path), check=False)
        assert proc.returncode == 0, f"{path.name}: {proc.stderr}"


def test_the_chart_claims_the_kubernetes_versions_the_tests_prove(kubectl):
    """The chart's kubeVersion floor is the oldest Kubernetes the tests run on (CI runs them on
    every version `scripts/build-control-plane --tested-versions` lists, this server among them);
    helm renders the chart for each of those and for the floor's .0 (what GitOps tools render
    with), and refuses the minor below. The session's `helm install` already passed this server's."""
    from cluster.controlplane import tested_versions  # the version list lives with the build script

    server = json.loads(kubectl.run("version", "-o", "json").stdout)["serverVersion"]["gitVersion"]
    tested = tested_versions()
    assert server in tested, (f"the tests run on Kubernetes {server}, which is not among the tested versions "
                              f"{tested}: add it to TESTED_VERSIONS in scripts/build-control-plane")
    claim = yaml.safe_load((ROOT / "charts" / "ares" / "Chart.yaml").read_text())["kubeVersion"]
    floor = tuple(int(x) for x in re.match(r">=\s*v?(\d+)\.(\d+)", claim).groups())
    oldest = tuple(int(x) for x in re.findall(r"\d+", tested[0])[:2])
    assert floor == oldest, f"chart claims {claim!r}; the oldest Kubernetes the tests run on is {tested[0]}"

    def render(version: str) -> subprocess.CompletedProcess:
        return subprocess.run(["helm", "template", "ares", str(ROOT / "charts" / "ares"), "--kube-version", version],
                              env=kubectl.env, capture_output=True, text=True, timeout=60)

    for version in [f"v{floor[0]}.{floor[1]}.0", *tested]:
        proc = render(version)
        assert proc.returncode == 0, f"helm refuses Kubernetes {version}: {proc.stderr}"
    below = f"v{floor[0]}.{floor[1] - 1}.0"
    proc = render(below)
    assert proc.returncode != 0 and "incompatible with Kubernetes" in proc.stderr, \
        f"helm renders for {below}, below the oldest Kubernetes the tests run on"


# --- 3. CEL rules, evaluated by the API server -----------------------------------------------

INVALID = [
    ({"devices__2__split": 7}, "vgg5 has 7 layers: a pinned split must be in 0..6"),
    ({"split__mode": "fixed", "split__point": 9}, "split.point is beyond the model's last layer"),
    ({"split__mode": "fixed"}, "split.mode fixed needs split.point or a pinned split on every device"),
    ({"devices__1__name": "nano-maxn"}, "Duplicate value"),
    ({"devices__2__powerMode": "MAXN"}, "powerMode is for Jetson device classes only"),
    ({"server__resources": {"requests": {"cpu": "two"}}}, "spec.server.resources.requests.cpu"),
    ({"devices__0__nodeSelector": {"a": "b"}}, "give nodeName or nodeSelector, not both"),
    ({"training__offer": {"codecs": ["int8", "bf16"]}}, 'Unsupported value: "bf16"'),
    ({"training__offer": {"microBatches": [2, 9]}}, "should be less than or equal to 8"),
    ({"training__offer": {"codecs": ["int8", "int8"]}}, 'Duplicate value: "int8"'),
    ({"split__policy": "ares", "split__shareServer": True}, "split.shareServer is only for mode adaptive with policy"),
    ({"split__mode": "none", "split__shareServer": True}, "split.shareServer is only for mode adaptive with policy"),
]


@pytest.mark.parametrize("changes, message", INVALID, ids=[
    "split-beyond-model", "point-beyond-model", "fixed-without-point", "duplicate-device", "powermode-on-pi",
    "bad-quantity", "node-name-and-selector", "offer-codec", "offer-micro-batches", "offer-duplicate",
    "share-server-with-ares", "share-server-without-adaptive"])
def test_invalid_jobs_are_refused_with_the_rules_message(kubectl, changes, message):
    proc = _apply(kubectl, _job("bad", **changes))
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert kubectl.json("get", "aresjobs")["items"] == []


def test_an_offer_is_accepted_and_kept(kubectl):
    """training.offer: what the adaptive controller may choose per device (codec, micro-batches)."""
    _apply(kubectl, _job(training__offer={"codecs": ["fp16", "int8"], "microBatches": [1, 2, 4, 8]}), check=True)
    assert kubectl.json("get", "aresjobs", "demo")["spec"]["training"]["offer"] == \
        {"codecs": ["fp16", "int8"], "microBatches": [1, 2, 4, 8]}
    proc = _apply(kubectl, _job(training__offer={"codecs": ["int8"]}))
    assert proc.returncode != 0 and "model, dataset and training are fixed" in proc.stderr, proc.stderr


@pytest.mark.parametrize("name", ["5g-demo", "demo.v2", "x" * 57])
def test_job_names_that_make_invalid_service_names_are_refused(kubectl, name):
    proc = _apply(kubectl, _job(name))
    assert proc.returncode != 0 and "metadata.name must be a DNS-1035 label" in proc.stderr, proc.stderr


@pytest.mark.parametrize("changes, message", [
    ({"model": "resnet18"}, "model, dataset and training are fixed once the job exists"),
    ({"training__rounds": 5}, "model, dataset and training are fixed once the job exists"),
    ({"devices__2__name": "pi-2"}, "devices cannot be added, removed or renamed"),
], ids=["model", "training", "device-name"])
def test_immutable_fields_cannot_change(kubectl, changes, message):
    _apply(kubectl, _job(), check=True)
    proc = _apply(kubectl, _job(**changes))
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    # What may change, changes.
    _apply(kubectl, _job(devices__1__powerMode="MAXN", devices__2__bandwidth="5mbit"), check=True)


# --- 2. exactly the chart's RBAC; a missing rule is reported on the job ----------------------

def test_a_missing_rbac_rule_is_reported_on_the_job(kubectl, operator):
    role = kubectl.json("get", "clusterrole", "ares")
    original = json.dumps(role["rules"])
    rules = [dict(r, resources=[x for x in r["resources"] if x != "secrets"]) for r in role["rules"]]
    kubectl.run("patch", "clusterrole", "ares", "--type=merge", "-p", json.dumps({"rules": rules}))
    try:
        _apply(kubectl, _job(), check=True)
        cond = wait_for(lambda: (c := _conditions(kubectl, "demo").get("ChildrenCreated"))
                        and c["status"] == "False" and c, 60, "the refusal on the job", interval=0.2)
        assert cond["reason"] == "Forbidden"
        assert "may not" in cond["message"] and "secrets" in cond["message"] and "RBAC" in cond["message"]
        event = wait_for(lambda: [e for e in _events(kubectl, "demo") if e["reason"] == "Forbidden"],
                         30, "a Warning event", interval=0.2)
        assert event[0]["type"] == "Warning"
        assert "Forbidden" in kubectl.run("describe", "aresjob", "demo").stdout
        # Nothing half-made: the dry run was refused before anything was created.
        assert all(not items for items in _children(kubectl).values()), _children(kubectl)
    finally:
        kubectl.run("patch", "clusterrole", "ares", "--type=merge", "-p", json.dumps({"rules": json.loads(original)}))
    # With the rule back, the next tick creates the job's children.
    wait_for(lambda: _conditions(kubectl, "demo").get("ChildrenCreated", {}).get("status")
             == "True", 60, "children once allowed", interval=0.2)
    assert len(kubectl.json("get", "pods")["items"]) == 4


# --- 4. Pod Security admission -----------------------------------------------------------------

@pytest.mark.parametrize("namespace", [{"pod-security.kubernetes.io/enforce": "baseline"}], indirect=True,
                         ids=["baseline"])
def test_a_baseline_namespace_is_reported_and_nothing_is_half_created(kubectl, operator, namespace):
    _apply(kubectl, _job(), check=True)
    cond = wait_for(lambda: (c := _conditions(kubectl, "demo").get("ChildrenCreated"))
                    and c["status"] == "False" and c, 60, "the Pod Security refusal", interval=0.2)
    assert cond["reason"] == "PodSecurityForbidden"
    assert "NET_ADMIN" in cond["message"] and "pod-security.kubernetes.io/enforce=privileged" in cond["message"]
    assert [e for e in _events(kubectl, "demo") if e["reason"] == "PodSecurityForbidden"]
    assert all(not items for items in _children(kubectl).values()), _children(kubectl)
    # The administrator relabels the namespace: the job goes ahead.
    kubectl.run("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=privileged", "--overwrite")
    wait_for(lambda: len(kubectl.json("get", "pods")["items"]) == 4, 60, "the pods", interval=0.2)


# --- 5. garbage collection and owner uids ------------------------------------------------------

def test_deleting_a_job_collects_its_children_and_a_namesake_never_adopts_them(kubectl, operator):
    _apply(kubectl, _job(), check=True)
    wait_for(lambda: len(kubectl.json("get", "pods")["items"]) == 4, 60, "the children", interval=0.2)
    old_uid = kubectl.json("get", "aresjobs", "demo")["metadata"]["uid"]
    # No kubelet runs here: pods bound to a node stay Terminating after deletion, as on a node that
    # is slow to stop them. The job of the same name comes back meanwhile.
    kubectl.run("delete", "aresjob", "demo", "--wait=true")
    wait_for(lambda: not kubectl.json("get", "secrets")["items"], 60, "the old Secret collected", interval=0.2)
    _apply(kubectl, _job(), check=True)
    new_uid = kubectl.json("get", "aresjobs", "demo")["metadata"]["uid"]
    assert new_uid != old_uid
    cond = wait_for(lambda: (c := _conditions(kubectl, "demo").get("ChildrenCreated"))
                    and c["reason"] == "NameConflict" and c, 60, "the name conflict", interval=0.2)
    assert "another owner" in cond["message"]
    # The old pods finish terminating (their node confirms); only then are new ones made.
    for pod in kubectl.json("get", "pods")["items"]:
        assert pod["metadata"]["ownerReferences"][0]["uid"] == old_uid
    kubectl.run("delete", "pods", "--all", "--grace-period=0", "--force")
    pods = wait_for(lambda: len(p := kubectl.json("get", "pods")["items"]) == 4 and p,
                    60, "the new job's pods", interval=0.2)
    for obj in [*pods, *kubectl.json("get", "secrets")["items"], *kubectl.json("get", "services")["items"]]:
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref["uid"] == new_uid and ref["controller"] is True and ref["blockOwnerDeletion"] is True
    kubectl.run("delete", "aresjob", "demo", "--wait=true")
    kubectl.run("delete", "pods", "--all", "--grace-period=0", "--force")
    wait_for(lambda: all(not items for items in _children(kubectl).values()), 60, "every child collected", interval=0.2)


# --- 6. Events -----------------------------------------------------------------------------------

def test_a_refused_spec_is_an_event(kubectl, operator):
    # The schema accepts any host directory without '..'; the administrator's policy does not.
    _apply(kubectl, _job("host-data", dataset__name="cifar10", dataset__path="/etc/ares"), check=True)
    wait_for(lambda: (kubectl.json("get", "aresjobs", "host-data").get("status") or {})
             .get("phase") == "Failed", 60, "phase Failed", interval=0.2)
    events = wait_for(lambda: [e for e in _events(kubectl, "host-data") if e["reason"] == "NotAllowedByPolicy"],
                      30, "a NotAllowedByPolicy event", interval=0.2)
    assert events[0]["type"] == "Warning" and "'/etc/ares' is not an allowed host directory" in events[0]["message"]
    described = kubectl.run("describe", "aresjob", "host-data").stdout
    assert "NotAllowedByPolicy" in described and "Events:" in described


def test_a_squatted_pod_name_is_reported_and_the_job_recovers(kubectl, operator):
    """Someone else's pod under a name the job needs is never adopted, and never deleted by us."""
    kubectl.run("apply", "-f", "-", stdin=yaml.safe_dump(_job()))
    wait_for(lambda: len(kubectl.json("get", "pods")["items"]) == 4, 60, "the children", interval=0.2)
    squatter = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "demo-pi", "labels": {"ares.io/job": "demo"}},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]}}

    def squat() -> bool:  # the unbound pi pod goes at once; the operator races us to recreate it
        kubectl.run("delete", "pod", "demo-pi", "--ignore-not-found", "--wait=false")
        kubectl.run("apply", "-f", "-", stdin=yaml.safe_dump(squatter), check=False)
        got = kubectl.run("get", "pod", "demo-pi", "-o", "json", check=False)
        return got.returncode == 0 and not json.loads(got.stdout)["metadata"].get("ownerReferences")
    wait_for(squat, 60, "our pod under the job's name", interval=0.05)
    cond = wait_for(lambda: (c := _conditions(kubectl, "demo").get("ChildrenCreated"))
                    and c["status"] == "False" and c, 60, "the conflict", interval=0.2)
    assert cond["reason"] == "NameConflict" and "demo-pi" in cond["message"]
    assert not kubectl.json("get", "pod", "demo-pi")["metadata"].get("ownerReferences")  # not adopted
    kubectl.run("delete", "pod", "demo-pi", "--wait=false")
    def owned() -> bool:
        got = kubectl.run("get", "pod", "demo-pi", "-o", "json", check=False)
        return got.returncode == 0 and bool(json.loads(got.stdout)["metadata"].get("ownerReferences"))
    wait_for(owned, 60, "the job's own pi pod", interval=0.2)
    wait_for(lambda: _conditions(kubectl, "demo")["ChildrenCreated"]["status"] == "True",
             60, "ChildrenCreated again", interval=0.2)
