"""What a job's spec may ask of the cluster, and how the operator reports what goes wrong.

Pure functions only: the job policy (images, host paths), the pods it builds from a hostile
spec, the quota sums, the refusal and error paths of the handlers with a recording API stand-in.
The same attempts run through the real API server in tests/k8s/test_job_safety.py.
"""

from __future__ import annotations

import logging
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

from ares_operator import builders, handlers, quota, validation
from ares_operator import constants as c
from ares_operator import status as job_status
from ares_operator.builders import JobRef
from ares_operator.reconcile import Outcome, PodView
from ares_operator.settings import ImageSettings, JobPolicy, OperatorSettings, from_env
from ares_operator.spec import parse_spec

JOB = JobRef("demo", "team-a", "uid-1")
IMAGES = ImageSettings(server="reg.example/ares-server:1", device="reg.example/ares-device:1",
                       device_jetson="reg.example/ares-device-jetson:1")
SETTINGS = OperatorSettings(images=IMAGES)


def _spec(**changes) -> dict:
    raw = yaml.safe_load((ROOT / "examples" / "job.yaml").read_text())["spec"]
    for path, value in changes.items():
        node = raw
        *parents, leaf = path.split("__")
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[int(leaf) if leaf.isdigit() else leaf] = value
    return raw


def _all_containers(pod: dict) -> list[dict]:
    return [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]


# --- images ---------------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["devices__0__image", "devices__2__image", "server__image"])
def test_an_image_of_the_users_choice_is_refused(field):
    spec, problems = validation.validate("demo", _spec(**{field: "evil.example/root:latest"}), SETTINGS)
    assert spec is not None
    assert len(problems) == 1 and "'evil.example/root:latest' is not allowed" in problems[0]
    assert "jobPolicy.allowedImages" in problems[0]
    assert validation.policy_problems(spec, SETTINGS) == problems


def test_allowed_images_are_exact_or_prefixes_and_the_operators_own_always_pass():
    policy = JobPolicy(allowed_images=("reg.example/team-a/*", "other.example/trainer:2"))
    assert policy.image_allowed(IMAGES.device, IMAGES)
    assert policy.image_allowed("reg.example/team-a/trainer:7", IMAGES)
    assert policy.image_allowed("other.example/trainer:2", IMAGES)
    assert not policy.image_allowed("other.example/trainer:3", IMAGES)
    assert not policy.image_allowed("reg.example/team-b/trainer:7", IMAGES)
    assert not policy.image_allowed("reg.example/team-a", IMAGES)  # the prefix with its slash
    ok = OperatorSettings(images=IMAGES, policy=policy)
    assert validation.validate("demo", _spec(devices__0__image="reg.example/team-a/trainer:7"), ok)[1] == []


def test_the_sidecar_and_the_init_step_never_run_the_jobs_image():
    """The two containers that run as root take the administrator's images only."""
    policy = JobPolicy(allowed_images=("reg.example/team-a/*",))
    settings = OperatorSettings(images=IMAGES, policy=policy)
    raw = _spec(devices__0__image="reg.example/team-a/t:1", devices__2__image="reg.example/team-a/t:1",
                server__image="reg.example/team-a/s:1")
    spec, problems = validation.validate("demo", raw, settings)
    assert problems == []
    objs = builders.children(JOB, spec, settings)
    pods = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Pod"}
    for name, pod in pods.items():
        for container in _all_containers(pod):
            root = container.get("securityContext", {}).get("runAsUser") == 0
            privileged = container.get("securityContext", {}).get("privileged")
            if root or privileged:
                assert container["image"] in (IMAGES.server, IMAGES.device, IMAGES.device_jetson), (name, container)
            else:  # the job's own image runs only as the unprivileged app user
                assert container["securityContext"]["runAsNonRoot"] is True
                assert pod["spec"]["securityContext"]["runAsUser"] == c.APP_UID
    assert pods["demo-pi"]["spec"]["containers"][0]["image"] == "reg.example/team-a/t:1"
    assert pods["demo-server"]["spec"]["containers"][0]["image"] == "reg.example/team-a/s:1"
    assert pods["demo-server"]["spec"]["initContainers"][0]["image"] == IMAGES.server


# --- host paths -------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/", "/etc", "/var/lib/ares", "/var/lib/ares/datasets/../../../etc",
                                  "/var/lib/ares/datasets/./x", "/var/lib/ares/datasetsX",
                                  "/var/lib/ares/checkpoints/team-b", "/var/lib/ares/datasets//x"])
def test_a_host_path_outside_the_allowed_prefixes_is_refused(path):
    raw = _spec(dataset__name="cifar10", dataset__path=path)
    problems = validation.validate("demo", raw, SETTINGS)[1]
    assert len(problems) == 1 and problems[0].startswith("spec.dataset.path:")  # the schema's pattern, or the policy
    spec = parse_spec(_spec())  # the policy alone, as if the schema had let it through
    policy_only = validation.policy_problems(spec.model_copy(update={
        "dataset": spec.dataset.model_copy(update={"name": "cifar10", "path": path})}), SETTINGS)
    assert len(policy_only) == 1 and "jobPolicy.allowedHostPaths" in policy_only[0]


def test_data_is_mounted_read_only_from_an_allowed_path_and_not_at_all_for_generated_data():
    spec, problems = validation.validate("demo", _spec(dataset__name="cifar10",
                                                       dataset__path="/var/lib/ares/datasets/CIFAR10"), SETTINGS)
    assert problems == []
    for pod in (o for o in builders.children(JOB, spec, SETTINGS) if o["kind"] == "Pod"):
        data = [v for v in pod["spec"]["volumes"] if v["name"] == "data"]
        assert data == [{"name": "data", "hostPath": {"path": "/var/lib/ares/datasets/CIFAR10",
                                                      "type": "DirectoryOrCreate"}}]
        mounts = [m for ct in _all_containers(pod) for m in ct.get("volumeMounts", []) if m["name"] == "data"]
        assert mounts and all(m["readOnly"] is True for m in mounts)
    for name in ("synthetic", "synthetic-easy"):  # whatever the path says, no host directory at all
        spec, problems = validation.validate("demo", _spec(dataset__name=name, dataset__path="/etc"), SETTINGS)
        assert problems == []
        volumes = [v for o in builders.children(JOB, spec, SETTINGS) if o["kind"] == "Pod" for v in o["spec"]["volumes"]]
        assert {"name": "data", "emptyDir": {}} in volumes and not any(
            "hostPath" in v and v["name"] == "data" for v in volumes)


def test_policy_settings_come_from_the_environment():
    ours = from_env({"ARES_ALLOWED_IMAGES": "a.example/x:1, b.example/*", "ARES_ALLOWED_HOST_PATHS": "/data,/srv/ds",
                     "ARES_WATCH_NAMESPACES": "team-a,team-b"})
    assert ours.policy.allowed_images == ("a.example/x:1", "b.example/*")
    assert ours.policy.allowed_host_paths == ("/data", "/srv/ds")
    assert ours.watch_namespaces == ("team-a", "team-b")
    assert from_env({}).policy.allowed_host_paths == (c.DEFAULT_ALLOWED_HOST_PATH,)
    assert from_env({}).policy.allowed_images == ()


# --- quantities and quotas ------------------------------------------------------------------

def test_integer_quantities_build_valid_pods():
    spec = parse_spec(_spec(server__resources={"requests": {"cpu": 2, "nvidia.com/gpu": 1},
                                               "limits": {"nvidia.com/gpu": 1}},
                            devices__2__resources={"requests": {"cpu": 1, "memory": "1Gi"}}))
    pods = {o["metadata"]["name"]: o for o in builders.children(JOB, spec, SETTINGS) if o["kind"] == "Pod"}
    server = pods["demo-server"]["spec"]["containers"][0]["resources"]
    assert server["requests"]["cpu"] == "2" and server["requests"]["nvidia.com/gpu"] == "1"
    assert server["limits"]["cpu"] == "4"
    assert pods["demo-pi"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "1"
    # Every quantity in every pod is a string, as the Kubernetes client's models require.
    for pod in pods.values():
        for ct in _all_containers(pod):
            for kind in ("requests", "limits"):
                assert all(isinstance(v, str) for v in ct["resources"].get(kind, {}).values()), ct["name"]


@pytest.mark.parametrize("text, value", [("500m", "0.5"), ("2Gi", str(2**31)), (2, "2"), ("1e3", "1000"),
                                         ("1.5", "1.5"), ("100M", "100000000"), ("bogus", None), ("1x", None)])
def test_quantities_parse(text, value):
    got = quota.parse_quantity(text)
    assert (got is None and value is None) or got == Decimal(value)


def test_a_pods_demand_counts_sidecars_with_containers_and_init_steps_alone():
    pod = {"spec": {"initContainers": [
        {"name": "prep", "resources": {"requests": {"cpu": "3"}}},
        {"name": "side", "restartPolicy": "Always", "resources": {"requests": {"cpu": "100m", "memory": "32Mi"}}}],
        "containers": [{"name": "main", "resources": {"requests": {"cpu": "1", "memory": "1Gi"},
                                                      "limits": {"memory": "2Gi"}}}]}}
    demand = quota.pod_demand(pod)
    assert demand["requests.cpu"] == Decimal(3) == demand["cpu"]  # the init step alone is the peak
    assert demand["requests.memory"] == Decimal(2**30) + 32 * 2**20
    assert demand["limits.memory"] == Decimal(2 * 2**30)


def test_a_quota_that_holds_each_pod_but_not_the_job_is_found_before_anything_is_created():
    spec = parse_spec(_spec())
    pods = [o for o in builders.children(JOB, spec, SETTINGS) if o["kind"] == "Pod"]
    demand = quota.job_demand(pods, {"secrets": 2})
    # Four pods: the server asks 2 CPUs (examples/job.yaml; its init step runs alone, before it),
    # each device 0.5 + its sidecar's 10m.
    assert demand["requests.cpu"] == 2 + 3 * Decimal("0.51") and demand["pods"] == 4
    small = {"metadata": {"name": "small"}, "spec": {"hard": {"requests.cpu": "3", "pods": "10"}},
             "status": {"hard": {"requests.cpu": "3", "pods": "10"}, "used": {"requests.cpu": "500m"}}}
    assert all(quota.shortfalls([small], quota.pod_demand(p) | {"pods": 1}) == [] for p in pods)  # one by one: fit
    (line,) = quota.shortfalls([small], demand)
    assert line.startswith("ResourceQuota small: requests.cpu needs 3.53 more, 2.5 of 3 left")
    scoped = {**small, "spec": {**small["spec"], "scopes": ["BestEffort"]}}
    assert quota.shortfalls([scoped], demand) == []  # left to the API server
    counted = {"metadata": {"name": "n"}, "status": {"hard": {"count/secrets": "3"}, "used": {"count/secrets": "2"}}}
    assert quota.shortfalls([counted], demand) == ["ResourceQuota n: count/secrets needs 2 more, 1 of 3 left"]


# --- errors: reported, retried with backoff, or ended ----------------------------------------

class _Kube:
    """Records what the handlers ask of the API; fails where told."""

    def __init__(self, fail_on: str = "", exc: Exception = RuntimeError("injected")):
        self.fail_on, self.exc = fail_on, exc
        self.events: list[tuple[str, str, str]] = []
        self.created: list[str] = []
        self.deleted_children = 0

    def _maybe_fail(self, what: str) -> None:
        if what == self.fail_on:
            raise self.exc

    def create(self, obj, dry_run=False):
        self._maybe_fail(f"create {obj['kind']}{' dry' if dry_run else ''}")
        if not dry_run:
            self.created.append(f"{obj['kind']} {obj['metadata']['name']}")
        return True

    def list_quotas(self, namespace):
        self._maybe_fail("list quotas")
        return []

    def read_secret(self, namespace, name):
        return None

    def post_event(self, body, type_, reason, message):
        self.events.append((type_, reason, message))

    def delete_children(self, namespace, job):
        self.deleted_children += 1
        gone, self.created = list(self.created), []
        return gone


def _call(kube, status=None):
    import kopf

    from ares_operator import metrics

    ctx = handlers.Context(settings=OperatorSettings(images=IMAGES), kube=kube, metrics=metrics.OperatorMetrics())
    return handlers.Call(JOB, status or {}, {"generation": 1}, None, kopf.Patch(), logging.getLogger("test"),
                         ctx, handlers.JobState())


def _conditions(call) -> dict[str, dict]:
    return {cond["type"]: cond for cond in call.patch.status.get("conditions") or []}


@pytest.mark.parametrize("step", ["create Secret dry", "create Pod dry", "list quotas", "create Secret",
                                  "create ConfigMap", "create Service"])
def test_an_error_while_creating_ends_the_job_and_removes_what_was_made(step):
    kube = _Kube(fail_on=step)
    call = _call(kube)
    handlers.reconcile_job(call, _spec())
    conds = _conditions(call)
    assert call.patch.status["phase"] == c.PHASE_FAILED
    assert conds[c.COND_FAILED]["reason"] == conds[c.COND_RECONCILED]["reason"] == c.REASON_RECONCILE_ERROR
    assert "RuntimeError: injected" in conds[c.COND_FAILED]["message"]
    assert [(t, r) for t, r, _ in kube.events] == [("Warning", c.REASON_RECONCILE_ERROR)]
    assert kube.deleted_children == 1 and kube.created == []


def test_a_transient_error_is_retried_with_backoff_and_said_once(monkeypatch):
    from kubernetes.client.rest import ApiException

    monkeypatch.setattr(handlers, "_guarded_reconcile", lambda call, spec: None)  # creation only

    kube = _Kube(fail_on="create Service", exc=ApiException(status=503, reason="Service Unavailable"))
    call = _call(kube)
    handlers.reconcile_job(call, _spec())
    conds = _conditions(call)
    assert "phase" not in call.patch.status or call.patch.status["phase"] != c.PHASE_FAILED
    assert conds[c.COND_RECONCILED]["status"] == "False" and "try 1" in conds[c.COND_RECONCILED]["message"]
    first_wait = call.state.retry_at
    assert first_wait is not None and kube.deleted_children == 0
    # The next try fails the same way: no second event, a longer wait.
    again = _call(kube, status={"conditions": call.patch.status["conditions"]})
    again.state = call.state
    handlers.reconcile_job(again, _spec())
    assert len(kube.events) == 1 and again.state.failures == 2
    assert again.state.retry_at - first_wait > call.ctx.settings.tick_s * 0.9
    # It clears: Reconciled=True, counters reset.
    kube.fail_on = ""
    cleared = _call(kube, status={"conditions": again.patch.status["conditions"]})
    cleared.state = again.state
    handlers.reconcile_job(cleared, _spec())
    assert _conditions(cleared)[c.COND_RECONCILED]["status"] == "True" and cleared.state.failures == 0


@pytest.mark.parametrize("exc, expected", [
    (ConnectionResetError(), True), (TimeoutError(), True), (ValueError("x"), False),
    (OverflowError("date value out of range"), False), (KeyError("k"), False)])
def test_transient_errors_are_those_of_the_network(exc, expected):
    assert handlers.transient(exc) is expected


# --- the end of a job --------------------------------------------------------------------------

def test_after_the_end_the_status_says_what_cleanPodPolicy_did():
    spec = parse_spec(_spec(runPolicy__cleanPodPolicy="None"))
    outcome = Outcome(c.PHASE_SUCCEEDED, c.REASON_COMPLETED, "trained")
    conds = job_status.ended_conditions(spec, [], outcome, (), "now", 1)
    assert all("kept (cleanPodPolicy None)" in cond["message"] for cond in conds)
    spec = parse_spec(_spec())
    conds = job_status.ended_conditions(spec, [], outcome, ("demo-pi",), "now", 1)
    assert all("demo-pi are removed (cleanPodPolicy Running)" in cond["message"] for cond in conds)
    devices = [{"name": "pi", "podPhase": "Running"}, {"name": "nano-5w", "podPhase": "Running"}]
    assert job_status.ended_devices(JOB, devices, ("demo-pi",)) == [{"name": "pi", "podPhase": "Deleted"},
                                                                   {"name": "nano-5w", "podPhase": "Running"}]


def test_a_finished_jobs_device_phases_follow_their_pods():
    devices = [{"name": "pi", "podPhase": "Running", "split": 2}, {"name": "nano-5w", "podPhase": "Running"},
               {"name": "nano-maxn", "podPhase": "Failed"}]
    pods = [PodView(name="demo-pi", role="device", device="pi", phase="Succeeded", attempt=0, terminating=False,
                    annotations={}, exit_code=0)]
    assert job_status.followed_devices(JOB, devices, pods) == [
        {"name": "pi", "podPhase": "Succeeded", "split": 2, "exitCode": 0},
        {"name": "nano-5w", "podPhase": "Deleted"}, {"name": "nano-maxn", "podPhase": "Failed"}]


def test_status_devices_is_a_list_keyed_by_name_and_reads_the_old_map():
    assert job_status.devices_by_name({"devices": [{"name": "pi", "split": 2}]}) == {"pi": {"name": "pi", "split": 2}}
    assert job_status.devices_by_name({"devices": {"pi": {"split": 2}}}) == {"pi": {"split": 2}}  # written before
    assert job_status.devices_by_name({}) == {}
    spec = parse_spec(_spec())
    summary = job_status.summary(JOB, spec, [], None, {"devices": {"pi": {"split": 1, "restarts": 9}}}, {"pi": 2}, 0)
    assert [d["name"] for d in summary["devices"]] == ["nano-maxn", "nano-5w", "pi"]
    pi = summary["devices"][2]
    assert pi == {"name": "pi", "split": 1, "podPhase": "Missing", "restarts": 2}
