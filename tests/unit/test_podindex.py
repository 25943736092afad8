"""The pod index a tick reads instead of listing pods: what it holds, and when a tick may trust it.

The index lags the API: a tick trusts it only once it shows the operator's own last pod writes
(created pods there, deleted ones going), and lists the pods until then. The handler's wiring is
checked with a recording stand-in for the API client: a steady tick of a large job makes no
pod call at all, one behind the index lists once.
"""

from __future__ import annotations

import logging

import kopf
import pytest

from ares_operator import builders, handlers, podindex
from ares_operator import constants as c
from ares_operator.builders import JobRef
from ares_operator.reconcile import PodView
from ares_operator.settings import from_env
from ares_operator.spec import parse_spec

JOB = JobRef("fleet", "lab", "uid-1")


def _pod(name: str, uid: str, terminating: bool = False, phase: str = "Running") -> PodView:
    return PodView(name=name, role="device", device=name, phase=phase, attempt=0, terminating=terminating,
                   annotations={}, uid=uid)


# --- what the index holds -------------------------------------------------------------------------

def test_a_pod_is_indexed_under_its_controlling_job():
    pod = builders.device_pod(JOB, parse_spec({"devices": [{"name": "pi", "deviceClass": "cpu"}]}),
                              parse_spec({"devices": [{"name": "pi", "deviceClass": "cpu"}]}).devices[0],
                              from_env({}), split=2)
    pod["metadata"]["uid"] = "pod-uid"
    pod["status"] = {"phase": "Running"}
    (key, view), = podindex.entry(pod).items()
    assert key == ("lab", "uid-1") and view == PodView.of(pod) and view.uid == "pod-uid"
    assert view.annotations[c.ANNOTATION_SPLIT] == "2"


@pytest.mark.parametrize("refs", [
    [],
    [{"uid": "uid-1", "controller": False}],  # owned, not controlled: not the job's
], ids=["no-owner", "not-a-controller"])
def test_a_pod_no_job_controls_is_not_indexed(refs):
    assert podindex.entry({"metadata": {"name": "x", "namespace": "lab", "ownerReferences": refs}}) == {}


def test_the_view_is_a_copy_and_none_without_an_index():
    store = [_pod("a", "1")]
    index = {("lab", "uid-1"): store}
    seen = podindex.view(index, "lab", "uid-1")
    assert seen == store and seen is not store
    assert podindex.view(index, "lab", "uid-2") == []    # a job with no pods yet
    assert podindex.view(None, "lab", "uid-1") is None   # no index: the caller lists


# --- when the index is current -----------------------------------------------------------------

CASES = [
    # (index shows, pending writes, what is still unseen)
    ([_pod("a", "1")], podindex.PendingWrites(), podindex.PendingWrites()),
    ([], podindex.PendingWrites(created=frozenset({"a"})), podindex.PendingWrites(created=frozenset({"a"}))),
    ([_pod("a", "1")], podindex.PendingWrites(created=frozenset({"a"})), podindex.PendingWrites()),
    # a replacement: the old pod deleted (uid 1), a new one of its name created
    ([_pod("a", "1")], podindex.PendingWrites(frozenset({"a"}), frozenset({"1"})),
     podindex.PendingWrites(frozenset({"a"}), frozenset({"1"}))),
    ([_pod("a", "1", terminating=True)], podindex.PendingWrites(frozenset({"a"}), frozenset({"1"})),
     podindex.PendingWrites(created=frozenset({"a"}))),  # the old one going; the new one not there yet
    ([_pod("a", "1", terminating=True), _pod("a", "2")], podindex.PendingWrites(frozenset({"a"}), frozenset({"1"})),
     podindex.PendingWrites()),
    ([_pod("a", "2")], podindex.PendingWrites(frozenset({"a"}), frozenset({"1"})), podindex.PendingWrites()),
]


@pytest.mark.parametrize("pods, pending, want", CASES, ids=[
    "nothing-pending", "created-not-shown", "created-shown", "deleted-still-running", "deleted-going-new-missing",
    "both-shown", "old-gone-new-shown"])
def test_the_index_is_trusted_once_it_shows_the_last_writes(pods, pending, want):
    assert podindex.unseen(pods, pending) == want
    assert bool(podindex.unseen(pods, pending)) == bool(want)


def test_a_created_pod_gone_before_the_index_saw_it_is_not_waited_for():
    pending = podindex.PendingWrites(frozenset({"a", "b"}), frozenset({"9"}))
    # The LIST shows b, not a (deleted meanwhile): only b is still to be seen; deletions always are.
    assert podindex.after_list([_pod("b", "2")], pending) == podindex.PendingWrites(frozenset({"b"}), frozenset({"9"}))
    assert podindex.PendingWrites().add(["x"], ["", "5"]) == podindex.PendingWrites(frozenset({"x"}), frozenset({"5"}))


# --- the tick's pod calls ------------------------------------------------------------------------

class RecordingKube:
    """The API client's pod calls as a tick makes them, recorded; the pods as `pods` says."""

    def __init__(self, pods: list[dict]):
        self.pods, self.calls = pods, []

    def list_pods(self, namespace, job, uid):
        self.calls.append(("list", job))
        return self.pods

    def annotate_pod(self, namespace, name, annotations):
        self.calls.append(("annotate", name))
        for pod in self.pods:  # what a LIST shows from now on
            if pod["metadata"]["name"] == name:
                pod["metadata"]["annotations"] = {**pod["metadata"].get("annotations", {}), **annotations}

    def create(self, obj, dry_run=False):
        self.calls.append(("create", obj["metadata"]["name"]))
        return True

    def delete_pod(self, namespace, name, uid=""):
        self.calls.append(("delete", name, uid))

    def post_event(self, body, type_, reason, message):
        self.calls.append(("event", reason))

    def read_secret(self, namespace, name):
        raise AssertionError("no Secret is read by a tick that creates nothing")


def _fleet(n: int):
    raw = {"split": {"mode": "fixed", "point": 2},
           "devices": [{"name": f"d{i:04d}", "deviceClass": "cpu"} for i in range(n)]}
    spec = parse_spec(raw)
    pods = []
    for i, dev in enumerate(spec.devices):
        pod = builders.device_pod(JOB, spec, dev, from_env({}), split=2)
        pod["metadata"]["uid"] = f"p{i}"
        pod["status"] = {"phase": "Running", "containerStatuses": [
            {"name": c.CONTAINER_DEVICE, "started": True, "state": {"running": {}}}]}
        pods.append(pod)
    server = builders.server_pod(JOB, spec, from_env({}))
    server["metadata"]["uid"] = "srv"
    return spec, [server, *pods]


def _tick_call(kube, index, status=None, **state):
    from ares.runtime.tlsclient import ClientTls
    from ares_operator import metrics

    ctx = handlers.Context(settings=from_env({}), kube=kube, metrics=metrics.OperatorMetrics())
    st = handlers.JobState(children_ok=True, tls=ClientTls(ca_pem="", server_name="x"), server_seen=True, **state)
    return handlers.Call(JOB, status or {}, {"generation": 1}, {"metadata": {"name": "fleet"}}, kopf.Patch(),
                         logging.getLogger("test"), ctx, st, index)


def test_a_steady_tick_reads_the_index_and_makes_no_pod_call():
    spec, pods = _fleet(200)
    kube = RecordingKube(pods)
    index = {podindex.key("lab", "uid-1"): [PodView.of(p) for p in pods]}
    first = _tick_call(kube, index)
    handlers._reconcile(first, spec)
    assert [call for call in kube.calls if call[0] != "event"] == []  # every pod as it should be
    status = dict(first.patch.status)
    assert status["devicesReady"] == 200 and len(status["devices"]) == 32
    assert status["deviceSummary"]["podPhases"] == {"Running": 200} and status["deviceSummary"]["splits"] == {"2": 200}
    # The same job a tick later (its status now as patched): nothing to do, nothing called, nothing patched.
    kube.calls.clear()
    again = _tick_call(kube, index, status=status, devices=first.state.devices)
    handlers._reconcile(again, spec)
    assert kube.calls == [] and not again.patch.status.get("devices")


def test_a_tick_behind_the_index_lists_once_and_the_next_trusts_it():
    spec, pods = _fleet(3)
    kube = RecordingKube(pods)
    stale = {podindex.key("lab", "uid-1"): [PodView.of(p) for p in pods if p["metadata"]["name"] != "fleet-d0001"]}
    call = _tick_call(kube, stale, pending=podindex.PendingWrites(created=frozenset({"fleet-d0001"})))
    handlers._reconcile(call, spec)
    assert ("list", "fleet") in kube.calls and not [c_ for c_ in kube.calls if c_[0] == "create"]
    assert call.state.pending == podindex.PendingWrites(created=frozenset({"fleet-d0001"}))  # still to be seen
    assert call.ctx.metrics.registry.get_sample_value(
        "ares_operator_pod_lists_total", {"namespace": "lab", "job": "fleet", "reason": "index-behind"}) == 1
    kube.calls.clear()
    current = {podindex.key("lab", "uid-1"): [PodView.of(p) for p in pods]}
    call = _tick_call(kube, current, pending=call.state.pending)
    handlers._reconcile(call, spec)
    assert ("list", "fleet") not in kube.calls and not call.state.pending


def test_a_replaced_pod_is_deleted_by_its_uid_and_waited_for():
    spec, pods = _fleet(3)
    pods[2]["status"] = {"phase": "Failed"}
    kube = RecordingKube(pods)
    index = {podindex.key("lab", "uid-1"): [PodView.of(p) for p in pods]}
    call = _tick_call(kube, index)
    call.state.tls = None  # pods are created: the tick reads the TLS Secret first
    kube.read_secret = lambda namespace, name: None
    created = []
    kube.create = lambda obj, dry_run=False: created.append(obj["metadata"]["name"]) or True
    handlers._reconcile(call, spec)
    assert ("delete", "fleet-d0001", "p1") in kube.calls
    assert "fleet-d0001" in created
    assert "p1" in call.state.pending.deleted


def _annotated(name: str, uid: str, **annotations: str) -> PodView:
    return PodView(name=name, role="device", device=name, phase="Running", attempt=0, terminating=False,
                   annotations=annotations, uid=uid)


def test_an_annotation_patched_here_is_waited_for():
    pending = podindex.PendingWrites().add(annotated=[("a", c.ANNOTATION_SPLIT, "4")])
    old = [_annotated("a", "1", **{c.ANNOTATION_SPLIT: "2"})]
    assert podindex.unseen(old, pending) == pending                      # the index shows the old value
    new = [_annotated("a", "1", **{c.ANNOTATION_SPLIT: "4"})]
    assert not podindex.unseen(new, pending)
    # A later value replaces the earlier one still pending; a LIST showing someone else's value ends the wait.
    later = pending.add(annotated=[("a", c.ANNOTATION_SPLIT, "5")])
    assert later.annotated == frozenset({("a", c.ANNOTATION_SPLIT, "5")})
    assert podindex.after_list([_annotated("a", "1", **{c.ANNOTATION_SPLIT: "6"})], later) == podindex.PendingWrites()
    assert podindex.after_list(new, pending) == pending                   # listed as written: the index will show it


def test_patches_not_yet_in_the_index_are_not_made_twice():
    """A handler that annotates right after another (a spec change after a tick) finds the index
    behind the first one's patches: it lists the pods, sees them, and patches nothing again."""
    spec, pods = _fleet(3)
    kube = RecordingKube(pods)
    stale = {podindex.key("lab", "uid-1"): [PodView.of(p) for p in pods]}
    call = _tick_call(kube, stale, planned={"d0000": 5, "d0001": 5, "d0002": 5})
    adaptive = parse_spec({"split": {"mode": "adaptive"},
                           "devices": [{"name": d.name, "deviceClass": "cpu"} for d in spec.devices]})
    handlers.annotate(call, adaptive, handlers.observed_pods(call))
    assert sorted(name for kind, name in kube.calls) == ["fleet-d0000", "fleet-d0001", "fleet-d0002"]
    kube.calls.clear()
    handlers.annotate(call, adaptive, handlers.observed_pods(call))
    assert kube.calls == [("list", "fleet")]  # the index is behind: listed once, nothing patched again
    assert len(call.state.pending.annotated) == 3  # as listed: the index must still show them
    kube.calls.clear()
    caught_up = _tick_call(kube, {podindex.key("lab", "uid-1"): [PodView.of(p) for p in pods]},
                           planned=call.state.planned, pending=call.state.pending)
    handlers.annotate(caught_up, adaptive, handlers.observed_pods(caught_up))
    assert kube.calls == [] and not caught_up.state.pending
