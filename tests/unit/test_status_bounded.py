"""The job's status at any fleet size: counts over every device, and only the devices that most
need attention listed (every one of a small job, in the spec's order); Events capped per tick."""

from __future__ import annotations

import json

import pytest

from ares.core.messages import DeviceStatus, ServerStatus
from ares_operator import status as job_status
from ares_operator.builders import JobRef
from ares_operator.reconcile import PodView, Waiting
from ares_operator.spec import parse_spec

JOB = JobRef("fleet", "lab", "uid-1")


def _spec(n: int):
    return parse_spec({"devices": [{"name": f"d{i:04d}", "deviceClass": "cpu"} for i in range(n)]})


def _pod(device: str, phase: str = "Running", **kw) -> PodView:
    return PodView(name=JOB.device_pod_name(device), role="device", device=device, phase=phase, attempt=0,
                   terminating=False, annotations={"ares.io/split-point": "2"}, **kw)


def test_a_small_job_lists_every_device_in_the_spec_order():
    spec = _spec(3)
    pods = [_pod("d0000"), _pod("d0001", phase="Pending"), _pod("d0002")]
    new = job_status.summary(JOB, spec, pods, None, {}, {}, 0)
    held = job_status.bounded(new["devices"])
    assert [d["name"] for d in held["devices"]] == ["d0000", "d0001", "d0002"]
    assert held["deviceSummary"] == {"listed": 3, "podPhases": {"Pending": 1, "Running": 2}, "phases": {},
                                     "splits": {"2": 3}, "problems": 0, "restarts": 0}


def _entry(name: str, **fields):
    return {"name": name, "podPhase": "Running", "restarts": 0, **fields}


def test_a_large_job_lists_the_devices_that_most_need_attention_worst_first():
    fleet = [_entry(f"d{i:04d}", split=3, phase="training", roundSeconds=10.0 + i / 1000) for i in range(1000)]
    fleet[500] = _entry("d0500", podPhase="Pending", problem="ImagePullBackOff")
    fleet[400] = _entry("d0400", podPhase="Failed", exitCode=4, restarts=3)
    fleet[300] = _entry("d0300", podPhase="Missing")
    fleet[200] = _entry("d0200", phase="missed", roundSeconds=2.0)
    fleet[100] = _entry("d0100", restarts=1, roundSeconds=1.0)
    held = job_status.bounded(fleet, limit=8)
    assert [d["name"] for d in held["devices"]] == [
        "d0500", "d0400", "d0300", "d0200", "d0100",  # stuck, failed, missing, missed a round, replaced
        "d0999", "d0998", "d0997"]                     # then the slowest last rounds
    summary = held["deviceSummary"]
    assert summary["listed"] == 8 and summary["problems"] == 1 and summary["restarts"] == 4
    assert summary["podPhases"] == {"Failed": 1, "Missing": 1, "Pending": 1, "Running": 997}
    assert summary["phases"] == {"missed": 1, "training": 995} and summary["splits"] == {"3": 995}
    assert summary["slowestRoundSeconds"] == 10.999 and summary["medianRoundSeconds"] == pytest.approx(10.5, abs=0.01)


def test_the_status_of_1000_devices_stays_small():
    """What the tick writes for a 1,000-device job with every field the server reports: a few KB."""
    spec = _spec(1000)
    server = ServerStatus(round=3, rounds=100, phase="training", accuracy=0.5, devices={
        d.name: DeviceStatus(split=3, phase="training", up_bps=2.5e6, down_bps=2.5e6, energy_j=123.456,
                             energy_source="modelled", round_s=10.0 + i / 100)
        for i, d in enumerate(spec.devices)})
    new = job_status.summary(JOB, spec, [_pod(d.name) for d in spec.devices], server, {}, {}, 0)
    assert len(new["devices"]) == 1000
    new.update(job_status.bounded(new["devices"]))
    size = len(json.dumps(new, separators=(",", ":")))
    assert len(new["devices"]) == job_status.DEVICES_LISTED_MAX and size < 12_000, size
    assert new["deviceSummary"]["energyJ"] == pytest.approx(123.456 * 1000)


def test_a_stuck_container_is_the_devices_problem():
    stuck = _pod("d0000", phase="Pending", waiting=(Waiting("fleet-d0000", "device", "ImagePullBackOff", "no"),))
    entry = job_status.summary(JOB, _spec(1), [stuck], None, {}, {}, 0)["devices"][0]
    assert entry["problem"] == "ImagePullBackOff"


def test_what_the_server_has_not_reported_is_kept_from_memory_for_unlisted_devices():
    """A large job's status holds 32 devices; the operator remembers every device's last entry,
    so an unreadable server does not wipe the fields of the other 968."""
    spec = _spec(100)
    remembered = {d.name: {"name": d.name, "phase": "training", "upBps": 1.0} for d in spec.devices}
    new = job_status.summary(JOB, spec, [_pod(d.name) for d in spec.devices], None, {"devices": []}, {}, 0, remembered)
    assert all(d["phase"] == "training" and d["upBps"] == 1.0 for d in new["devices"])


def test_after_the_end_unlisted_devices_are_counted_as_their_pods_now_are():
    listed = [_entry("d0000", podPhase="Deleted")]
    pods = [_pod("d0001", phase="Succeeded"), _pod("d0002")]
    summary = job_status.followed_summary(JOB, ["d0000", "d0001", "d0002", "d0003"], listed,
                                          {"listed": 1, "podPhases": {"Running": 4}}, pods)
    assert summary == {"listed": 1, "podPhases": {"Deleted": 2, "Running": 1, "Succeeded": 1}}


@pytest.mark.parametrize("n, limit, want", [
    (3, 10, 3),
    (10, 10, 10),
    (11, 10, 11),    # ten, and one that counts the eleventh
    (1000, 10, 11),
])
def test_events_of_one_tick_are_capped(n, limit, want):
    events = [("ImagePullFailed" if i % 2 else "ContainerCrashLooping", f"pod p{i}: stuck") for i in range(n)]
    posted = job_status.capped_events(events, limit)
    assert len(posted) == want and posted[:min(n, limit)] == events[:limit]
    if n > limit:
        assert posted[-1][0] == events[limit][0]
        assert posted[-1][1].startswith(f"and {n - limit} more (") and "deviceSummary" in posted[-1][1]


def test_a_count_that_went_away_is_sent_as_null():
    """The status is a JSON merge patch: a split no device uses any more must be deleted, not kept."""
    old = {"listed": 32, "splits": {"2": 945, "4": 55}, "podPhases": {"Running": 1000}}
    new = {"listed": 32, "splits": {"4": 1000}, "podPhases": {"Running": 1000}}
    assert job_status.merge_patch(old, new) == {"listed": 32, "splits": {"2": None, "4": 1000},
                                                "podPhases": {"Running": 1000}}
    assert job_status.merge_patch(None, new) == new and job_status.merge_patch(old, [1]) == [1]
    assert job_status.merge_patch([{"a": 1}], [{"b": 2}]) == [{"b": 2}]  # lists: replaced whole


def test_the_crd_says_how_many_devices_the_status_lists():
    from tests.support import ROOT
    import yaml

    crd = yaml.safe_load((ROOT / "crds" / "aresjobs.ares.io.yaml").read_text())
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert f"up to {job_status.DEVICES_LISTED_MAX}," in status["devices"]["description"]
    assert f"the {job_status.DEVICES_LISTED_MAX} that most need attention" in status["devices"]["description"]
    assert set(status["deviceSummary"]["properties"]) == set(job_status.device_summary(
        [{"name": "a", "roundSeconds": 1.0, "energyJ": 1.0}], 1))
