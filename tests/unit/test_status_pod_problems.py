"""What the operator makes of pods that cannot run, or that go away: pure reconcile and status."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

from ares.core.messages import ServerStatus
from ares_operator import constants as c
from ares_operator import reconcile, status
from ares_operator.builders import JobRef
from ares_operator.settings import ImageSettings, OperatorSettings
from ares_operator.spec import parse_spec

JOB = JobRef("demo", "lab", "uid-1")
SETTINGS = OperatorSettings(images=ImageSettings(server="srv:1", device="dev:1", device_jetson="jet:1"))
PULL_BACKOFF = 'Back-off pulling image "registry.example/ares-device:9.9"'
DEVICES = ("nano-maxn", "nano-5w", "pi")


def spec(**run_policy):
    raw = yaml.safe_load((ROOT / "examples" / "job.yaml").read_text())["spec"]
    raw["runPolicy"].update(run_policy)
    return parse_spec(raw)


def waiting(name, reason, message=""):
    return {"name": name, "state": {"waiting": {"reason": reason, **({"message": message} if message else {})}}}


def running(name):
    return {"name": name, "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}


def raw_pod(name, phase="Pending", init=(), main=(), attempt=0, terminating=False):
    role, device = ("server", "") if name == "demo-server" else ("device", name.removeprefix("demo-"))
    meta = {"name": name, "labels": {c.LABEL_ROLE: role, c.LABEL_DEVICE: device},
            "annotations": {c.ANNOTATION_ATTEMPT: str(attempt)}}
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "status": {"phase": phase, "initContainerStatuses": list(init),
                                         "containerStatuses": list(main)}}


def view(*args, **kwargs):
    return reconcile.PodView.of(raw_pod(*args, **kwargs))


def healthy(name):
    if name == "demo-server":
        return view(name, "Running", init=[{"name": "prepare-checkpoints", "state": {"terminated": {"exitCode": 0}}}],
                    main=[running("server")])
    return view(name, "Running", init=[running("host-control")], main=[running("device")])


def sidecar_unpullable(name, reason="ImagePullBackOff", message=PULL_BACKOFF):
    """`Init:ImagePullBackOff`: the sidecar (an init container) cannot be pulled; the trainer waits."""
    return view(name, init=[waiting("host-control", reason, message)], main=[waiting("device", "PodInitializing")])


# --- PodView reads the kubelet's waiting reasons ---------------------------------------------------

@pytest.mark.parametrize("kubelet_reason, reason", [
    ("ErrImagePull", "ImagePullFailed"),
    ("ImagePullBackOff", "ImagePullFailed"),
    ("InvalidImageName", "ImagePullFailed"),
    ("CreateContainerConfigError", "ContainerCreateFailed"),
    ("CreateContainerError", "ContainerCreateFailed"),
    ("CrashLoopBackOff", "ContainerCrashLooping"),
])
@pytest.mark.parametrize("where", ["initContainerStatuses", "containerStatuses"])
def test_waiting_reasons_are_read_from_every_container(kubelet_reason, reason, where):
    pod = raw_pod("demo-pi")
    container = "host-control" if where == "initContainerStatuses" else "device"
    pod["status"][where] = [waiting(container, kubelet_reason, "the kubelet's\n  words")]
    (stuck,) = reconcile.PodView.of(pod).waiting
    assert stuck == reconcile.Waiting("demo-pi", container, kubelet_reason, "the kubelet's words")
    assert stuck.reason == reason
    assert stuck.text == f"pod demo-pi container {container}: {kubelet_reason}: the kubelet's words"


def test_starting_containers_are_no_problem_and_init_containers_come_first():
    assert view("demo-pi", init=[waiting("host-control", "ContainerCreating")],
                main=[waiting("device", "PodInitializing")]).waiting == ()
    assert healthy("demo-pi").waiting == ()
    both = view("demo-pi", init=[waiting("host-control", "CrashLoopBackOff")], main=[waiting("device", "ErrImagePull")])
    assert [w.container for w in both.waiting] == ["host-control", "device"]
    assert view("demo-pi", main=[waiting("device", "CreateContainerError", "x" * 2000)]).waiting[0].message == "x" * 500
    assert view("demo-pi", main=[waiting("device", "CrashLoopBackOff")]).waiting[0].text == \
        "pod demo-pi container device: CrashLoopBackOff"


# --- ServerReady and DevicesReady say what the kubelet says ------------------------------------------

def test_server_ready_names_the_stuck_container():
    stuck = view("demo-server", init=[{"name": "prepare-checkpoints", "state": {"terminated": {"exitCode": 0}}}],
                 main=[waiting("server", "ImagePullBackOff", 'Back-off pulling image "srv:9"')])
    assert status.server_condition(None, None, "", 60.0, stuck) == (
        False, "ImagePullFailed", 'pod demo-server container server: ImagePullBackOff: Back-off pulling image "srv:9"')
    # Unreachable for long, but its pod is stuck: the stuck container is what to fix.
    assert status.server_condition(None, 600.0, "ConnectError", 60.0, stuck)[1] == "ImagePullFailed"
    # Without a problem (or a pod on its way out) as before.
    assert status.server_condition(None, None, "", 60.0, healthy("demo-server"))[1] == c.REASON_SERVER_STARTING
    gone = view("demo-server", main=[waiting("server", "ErrImagePull")], terminating=True)
    assert status.server_condition(None, None, "", 60.0, gone)[1] == c.REASON_SERVER_STARTING
    serving = ServerStatus(phase="training", round=1, rounds=20)
    assert status.server_condition(serving, None, "", 60.0, stuck)[:2] == (True, c.REASON_SERVER_SERVING)


def test_devices_ready_names_every_stuck_container():
    pods = [sidecar_unpullable("demo-nano-maxn"), view("demo-nano-5w"),
            sidecar_unpullable("demo-pi", "ErrImagePull", "rpc error: code = NotFound")]
    assert status.devices_condition(JOB, spec(), pods) == (False, "ImagePullFailed", (
        f"0/3 device pods running; pod demo-nano-maxn container host-control: ImagePullBackOff: {PULL_BACKOFF}; "
        "pod demo-pi container host-control: ErrImagePull: rpc error: code = NotFound"))
    assert status.devices_condition(JOB, spec(), pods, ("nano-5w",))[2].endswith("; gave up on ['nano-5w']")


def test_devices_ready_is_false_while_a_running_pods_sidecar_crash_loops():
    looping = view("demo-pi", "Running", init=[waiting("host-control", "CrashLoopBackOff", "back-off 40s")],
                   main=[running("device")])
    pods = [healthy("demo-nano-maxn"), healthy("demo-nano-5w"), looping]
    assert status.devices_condition(JOB, spec(), pods) == (
        False, "ContainerCrashLooping", "3/3 device pods running; pod demo-pi container host-control: "
                                        "CrashLoopBackOff: back-off 40s")


@pytest.mark.parametrize("pods, want", [
    ([healthy(f"demo-{d}") for d in DEVICES], (True, c.REASON_DEVICES_RUNNING, "3/3 device pods running")),
    ([healthy("demo-pi")], (False, c.REASON_DEVICES_WAITING, "1/3 device pods running")),
    ([view(f"demo-{d}") for d in DEVICES], (False, c.REASON_DEVICES_WAITING, "0/3 device pods running")),
    ([dataclasses.replace(sidecar_unpullable("demo-pi"), terminating=True)],
     (False, c.REASON_DEVICES_WAITING, "0/3 device pods running")),
], ids=["all-running", "some-missing", "all-pending", "stuck-but-terminating"])
def test_devices_ready_without_problems_is_as_before(pods, want):
    assert status.devices_condition(JOB, spec(), pods) == want


def test_a_long_list_of_stuck_containers_is_cut():
    many = tuple(reconcile.Waiting(f"demo-d{i}", "device", "ErrImagePull") for i in range(8))
    pods = [reconcile.PodView(name="demo-pi", role="device", device="pi", phase="Pending", attempt=0,
                              terminating=False, annotations={}, waiting=many)]
    message = status.devices_condition(JOB, spec(), pods)[2]
    assert message.count("ErrImagePull") == 5 and message.endswith("; and 3 more")


# --- one Warning Event per problem, not one per tick -----------------------------------------------

def test_each_stuck_container_is_posted_once():
    pods = [sidecar_unpullable("demo-pi", "ErrImagePull", "not found")]
    seen, events = status.problem_events(pods, frozenset())
    assert events == [("ImagePullFailed", "pod demo-pi container host-control: ErrImagePull: not found")]
    # The next ticks: the kubelet backs off (ImagePullBackOff), retries (ErrImagePull): the same problem.
    for again in (sidecar_unpullable("demo-pi"), sidecar_unpullable("demo-pi", "ErrImagePull", "not found")):
        seen, events = status.problem_events([again], seen)
        assert events == []
    # Another pod stuck too: only it is posted. Its sidecar crash-looping instead: a new problem.
    seen, events = status.problem_events([sidecar_unpullable("demo-pi"), sidecar_unpullable("demo-nano-5w")], seen)
    assert [m.split(":")[0] for _, m in events] == ["pod demo-nano-5w container host-control"]
    looping = view("demo-pi", "Running", init=[waiting("host-control", "CrashLoopBackOff")], main=[running("device")])
    seen, events = status.problem_events([looping, sidecar_unpullable("demo-nano-5w")], seen)
    assert events == [("ContainerCrashLooping", "pod demo-pi container host-control: CrashLoopBackOff")]
    # Cleared, then back: posted again. A terminating pod's containers are not news.
    seen, events = status.problem_events([healthy("demo-pi")], seen)
    assert (seen, events) == (frozenset(), [])
    gone = view("demo-pi", main=[waiting("device", "ErrImagePull")], terminating=True)
    assert status.problem_events([gone], seen) == (frozenset(), [])
    assert status.problem_events([looping], seen)[1] == events_of(looping)


def events_of(pod):
    return [(w.reason, w.text) for w in pod.waiting]


# --- a deleted server pod is a replacement ---------------------------------------------------------

def devices():
    return [healthy(f"demo-{d}") for d in DEVICES]


def plan(pods, server_restarts=0, seen=False, **run_policy):
    return reconcile.plan_pods(JOB, spec(**run_policy), SETTINGS, pods, {}, server_restarts, {}, server_seen=seen)


def attempt(obj):
    return obj["metadata"]["annotations"][c.ANNOTATION_ATTEMPT]


def test_the_first_server_pod_is_created_silently():
    actions = plan(devices())
    (server,) = actions.create
    assert server["metadata"]["name"] == "demo-server" and attempt(server) == "0"
    assert actions.server_restarts == 0 and actions.notes == () and not actions.server_seen


def test_a_server_pod_deleted_after_it_was_seen_is_a_counted_replacement():
    actions = plan(devices(), seen=True)
    (server,) = actions.create
    assert attempt(server) == "1" and actions.server_restarts == 1 and actions.outcome is None
    assert actions.notes == ("server pod deleted; re-created (restart 1), resuming from checkpoint",)
    assert not actions.server_seen  # the new pod is seen when a listing shows it
    # At serverBackoffLimit, as for a failed server: the job fails and nothing is created.
    spent = plan(devices(), server_restarts=3, seen=True)
    assert spent.create == () and spent.outcome.reason == c.REASON_SERVER_FAILED
    assert "deleted" in spent.outcome.message and "serverBackoffLimit 3" in spent.outcome.message


def test_server_seen_follows_the_server_pod():
    """Each plan's `server_seen` is what the next plan is given (the handler keeps it in JobState)."""
    assert plan([healthy("demo-server"), *devices()]).server_seen
    assert plan([view("demo-server"), *devices()]).server_seen  # pending (stuck, say) counts: it existed
    # Deleted by someone: terminating, still seen, so its end is counted once it has gone.
    assert plan([view("demo-server", "Running", terminating=True), *devices()], seen=True).server_seen
    # Suspended: deleted by the operator, not counted when it comes back.
    assert not plan([healthy("demo-server"), *devices()], seen=True, suspend=True).server_seen


def run_ticks(listings, seen=False, server_restarts=0):
    """Plan after plan, the way the handler chains them; returns every plan."""
    out = []
    for pods in listings:
        actions = reconcile.plan_pods(JOB, spec(), SETTINGS, pods, {}, server_restarts, {}, server_seen=seen)
        seen, server_restarts = actions.server_seen, actions.server_restarts
        out.append(actions)
    return out


def test_a_failed_server_replaced_is_counted_once_while_its_pod_goes():
    failed = view("demo-server", "Failed", main=[{"name": "server", "state": {"terminated": {"exitCode": 1}}}])
    old = view("demo-server", "Failed", main=[{"name": "server", "state": {"terminated": {"exitCode": 1}}}],
               terminating=True)
    # Failed -> replaced (its namesake still terminating, the create found it) -> gone -> created -> running.
    ticks = run_ticks([[failed, *devices()], [old, *devices()], devices(),
                       [view("demo-server", attempt=1), *devices()]], seen=True)
    assert [a.server_restarts for a in ticks] == [1, 1, 1, 1]
    assert [len(a.notes) for a in ticks] == [1, 0, 0, 0]
    assert [attempt(o) for a in ticks for o in a.create if o["metadata"]["name"] == "demo-server"] == ["1", "1"]
    assert ticks[-1].server_seen


def test_a_deleted_server_is_counted_once_it_has_gone_and_once_only():
    ticks = run_ticks([[healthy("demo-server"), *devices()],
                       [view("demo-server", "Running", terminating=True), *devices()],
                       devices(),
                       devices(),  # the create failed (a quota, say): the same deletion is not counted again
                       [view("demo-server", attempt=1), *devices()]])
    assert [a.server_restarts for a in ticks] == [0, 0, 1, 1, 1]
    assert [a.notes for a in ticks][2] == ("server pod deleted; re-created (restart 1), resuming from checkpoint",)
    assert sum(len(a.notes) for a in ticks) == 1


def test_a_suspended_job_resumes_without_a_replacement():
    s = spec(suspend=True)
    suspended = reconcile.plan_pods(JOB, s, SETTINGS, [healthy("demo-server"), *devices()], {}, 0, {}, server_seen=True)
    assert "demo-server" in suspended.delete and not suspended.server_seen
    resumed = run_ticks([[]], seen=suspended.server_seen)[0]
    assert resumed.server_restarts == 0 and resumed.notes == () and len(resumed.create) == 4


@pytest.mark.parametrize("job_status, ran", [
    ({}, False),
    ({"phase": "Pending", "conditions": [{"type": "ServerReady", "reason": "ServerStarting"}]}, False),
    ({"phase": "Pending", "conditions": [{"type": "ServerReady", "reason": "Serving"}]}, True),
    ({"phase": "Pending", "conditions": [{"type": "ServerReady", "reason": "ServerUnreachable"}]}, True),
    ({"phase": "Pending", "conditions": [{"type": "ServerReady", "reason": "ImagePullFailed"}]}, True),
    ({"phase": "Running"}, True),
    ({"phase": "Suspended", "conditions": [{"type": "ServerReady", "reason": "Serving"}]}, False),
], ids=["new", "starting", "serving", "unreachable", "stuck", "running", "suspended"])
def test_a_restarted_operator_reads_from_the_status_whether_the_server_ran(job_status, ran):
    assert status.server_ran(job_status) is ran


# --- after the end ----------------------------------------------------------------------------------

def test_pods_stopped_at_the_deadline_are_not_blamed_on_clean_pod_policy_none():
    s = parse_spec({**yaml.safe_load((ROOT / "examples" / "job.yaml").read_text())["spec"],
                    "runPolicy": {"cleanPodPolicy": "None", "activeDeadlineSeconds": 60}})
    late = reconcile.Outcome(c.PHASE_FAILED, c.REASON_DEADLINE_EXCEEDED, "ran longer")
    cleaned = reconcile.pods_to_clean(s, [healthy("demo-server"), healthy("demo-pi")], late)
    assert sorted(cleaned) == ["demo-pi", "demo-server"]
    for cond in status.ended_conditions(s, [], late, cleaned, "now", 1):
        assert cond["message"] == ("the job has ended (Failed); its pods demo-pi, demo-server are removed "
                                   "(nothing runs past activeDeadlineSeconds, whatever cleanPodPolicy None keeps)")
    # Succeeded with cleanPodPolicy None: every pod, the server's too, is kept, and the job says so.
    done = reconcile.Outcome(c.PHASE_SUCCEEDED, c.REASON_COMPLETED, "trained")
    assert reconcile.pods_to_clean(s, [healthy("demo-server")], done) == ()
    assert {cond["message"] for cond in status.ended_conditions(s, [], done, (), "now", 1)} == {
        "the job has ended (Succeeded); its pods are kept (cleanPodPolicy None)"}


def test_a_server_still_starting_is_never_called_unreachable(monkeypatch):
    """Its startup probe allows minutes to load torch, the data and a checkpoint: until the kubelet
    says the container started, a failing /v1/status is a server starting, not an unreachable one."""
    import logging

    import kopf

    from ares.runtime import controller
    from ares_operator import handlers, metrics
    from ares_operator.builders import JobRef
    from ares_operator.reconcile import PodView
    from ares_operator.settings import from_env

    def refused(*args, **kwargs):
        raise ConnectionRefusedError("connection refused")
    monkeypatch.setattr(controller, "fetch_status", refused)
    ctx = handlers.Context(settings=from_env({}), kube=None, metrics=metrics.OperatorMetrics())
    call = handlers.Call(JobRef("demo", "ns", "uid"), {}, {"generation": 1}, None, kopf.Patch(),
                         logging.getLogger("test"), ctx, handlers.JobState(tokens={"controller.token": "t"}))
    loading = PodView(name="demo-server", role="server", device="", phase="Running", attempt=0, terminating=False,
                      annotations={}, started=False)
    assert handlers.server_status(call, [loading]) is None and call.state.unreachable_since is None
    serving = dataclasses.replace(loading, started=True)
    assert handlers.server_status(call, [serving]) is None and call.state.unreachable_since is not None
    assert PodView.of({"metadata": {"name": "demo-server"}, "status": {"phase": "Running", "containerStatuses": [
        {"name": "server", "started": True, "state": {"running": {}}}]}}).started
