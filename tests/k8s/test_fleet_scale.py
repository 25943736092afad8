"""A job at the device limit (1,000) on the real control plane, through the real operator.

Admission: the CRD's CEL rules over devices fit the API server's cost budget with room to spare;
a 1,000-device job is admitted and one device more is refused with the API server's message.

The operator: every device pod is made, a change of the job's split point reaches every pod's
annotation, and then, while nothing changes, ticks go by without a LIST of the job's pods and
without a write to any pod; the job object stays under 100 KB and `kubectl get aresjobs` one
short line. How long a tick takes is measured in bench/operator_tick.py, not asserted here.

No kubelet: 1,000 processes are too many for the test machine. The test stands in for one the
way tests/k8s/test_pod_problems_e2e.py does: it writes each device pod's status through the
`pods/status` subresource, running for all but three, whose image the "kubelet" cannot pull.
No server runs either (the job stays Pending): the operator's pods, annotations and status are
under test here, the server's fleet size elsewhere.
"""

from __future__ import annotations

import copy
import json
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from ares_operator import constants as c
from ares_operator import status as job_status
from ares_operator.spec import DEVICES_MAX
from cluster.controlplane import ControlPlane
from tests.support import ROOT, free_port, wait_for

pytestmark = pytest.mark.k8s

STUCK = ("d0007", "d0500", "d0993")  # devices whose image cannot be pulled
OBJECT_LIMIT = 100_000               # bytes of the job object (compact JSON, as etcd stores it)


def fleet_job(devices: int, name: str = "fleet") -> dict[str, Any]:
    """A job of `devices` CPU devices, each pinned to a node of its own, the split fixed at 2."""
    return {"apiVersion": "ares.io/v1alpha1", "kind": "AresTrainingJob", "metadata": {"name": name},
            "spec": {"dataset": {"name": "synthetic"}, "split": {"mode": "fixed", "point": 2},
                     "devices": [{"name": f"d{i:04d}", "deviceClass": "cpu", "nodeName": f"node-{i:04d}"}
                                 for i in range(devices)]}}


# --- admission --------------------------------------------------------------------------------

def test_a_job_at_the_device_limit_is_admitted_and_one_more_refused(kubectl):
    accepted = kubectl.run("apply", "--server-side", "--dry-run=server", "-f", "-",
                           stdin=json.dumps(fleet_job(DEVICES_MAX)), check=False)
    assert accepted.returncode == 0, accepted.stderr
    refused = kubectl.run("apply", "--server-side", "--dry-run=server", "-f", "-",
                          stdin=json.dumps(fleet_job(DEVICES_MAX + 1)), check=False)
    assert refused.returncode != 0
    assert f"spec.devices: Too many: {DEVICES_MAX + 1}: must have at most {DEVICES_MAX} items" in refused.stderr


def _crd_with_devices_max(devices: int) -> dict[str, Any]:
    """The CRD under a group of its own (created, not an update of the installed one: the API
    server estimates every rule's cost on create), with devices.maxItems changed."""
    crd = copy.deepcopy(yaml.safe_load((ROOT / "crds" / "aresjobs.ares.io.yaml").read_text()))
    crd["metadata"]["name"] = "aresjobs.headroom.ares.io"
    crd["spec"]["group"] = "headroom.ares.io"
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    schema["properties"]["spec"]["properties"]["devices"]["maxItems"] = devices
    return crd


def test_the_rules_over_devices_cost_a_fifth_of_the_cel_budget_at_most(kubectl):
    """The API server refuses a CRD whose CEL rules' estimated cost is over its budget, and a
    rule inside each device costs in proportion to devices.maxItems. Five times the limit still
    fits: a rule added over devices that eats the headroom fails here, not on a user's cluster.
    Far beyond it (12,000) is refused, so the budget is really checked."""
    fits = kubectl.run("create", "--dry-run=server", "-f", "-", check=False,
                       stdin=json.dumps(_crd_with_devices_max(5 * DEVICES_MAX)))
    assert fits.returncode == 0, fits.stderr
    over = kubectl.run("create", "--dry-run=server", "-f", "-", check=False,
                       stdin=json.dumps(_crd_with_devices_max(12_000)))
    assert over.returncode != 0 and "estimated rule cost exceeds budget" in over.stderr, over.stderr


# --- the operator at 1,000 devices --------------------------------------------------------------

METADATA_ONLY = {"Accept": "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"}


def device_pods_metadata(http: httpx.Client, namespace: str) -> dict[str, dict[str, Any]]:
    """The device pods' metadata by name: a list of metadata only (1,000 whole pods are 8 MB)."""
    resp = http.get(f"/api/v1/namespaces/{namespace}/pods", headers=METADATA_ONLY,
                    params={"labelSelector": f"{c.LABEL_ROLE}={c.ROLE_DEVICE}"})
    resp.raise_for_status()
    return {item["metadata"]["name"]: item["metadata"] for item in resp.json().get("items") or []}


class StandInKubelet:
    """Writes each device pod's status once, as a kubelet would: running (trainer started, sidecar
    running), or for the pods of `stuck` Pending with the trainer's image not pullable. It stops
    looking once it has seen `expected` pods."""

    def __init__(self, control_plane: ControlPlane, namespace: str, stuck: tuple[str, ...], expected: int):
        self.http, self.namespace, self.expected = control_plane.http(), namespace, expected
        self.stuck = {f"fleet-{d}" for d in stuck}
        self.done: set[str] = set()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stand-in-kubelet", daemon=True)

    def __enter__(self) -> "StandInKubelet":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(30)
        self.http.close()

    def _loop(self) -> None:
        while len(self.done) < self.expected and not self._stop.wait(1):
            try:
                for name in device_pods_metadata(self.http, self.namespace):
                    if name not in self.done and not self._stop.is_set():
                        self._write(name)
                        self.done.add(name)
            except httpx.HTTPError as exc:
                self.errors.append(repr(exc))

    def _write(self, name: str) -> None:
        def container(cname: str, state: dict) -> dict:
            running = "running" in state
            return {"name": cname, "image": "img", "imageID": "", "restartCount": 0, "ready": running,
                    "started": running, "state": state}

        running = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
        if name in self.stuck:
            phase, trainer = "Pending", {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}
        else:
            phase, trainer = "Running", running
        status = {"phase": phase, "initContainerStatuses": [container(c.CONTAINER_SIDECAR, running)],
                  "containerStatuses": [container(c.CONTAINER_DEVICE, trainer)]}
        resp = self.http.patch(f"/api/v1/namespaces/{self.namespace}/pods/{name}/status",
                               json={"status": status}, headers={"Content-Type": "application/merge-patch+json"})
        if resp.status_code != 200:
            self.errors.append(f"{name}: {resp.status_code} {resp.text[:200]}")


@pytest.fixture
def fleet_operator(control_plane: ControlPlane, namespace: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """The real operator, its metrics on a loopback port of its own (returned); no server listens
    where it would dial the job's server."""
    from tests.k8s.conftest import Operator

    port = free_port()
    monkeypatch.setenv("ARES_METRICS_PORT", str(port))
    monkeypatch.setenv("ARES_METRICS_ADDRESS", "127.0.0.1")
    monkeypatch.setenv("ARES_SERVER_URL_TEMPLATE", f"https://127.0.0.1:{free_port()}")
    op = Operator(control_plane, namespace)
    op.start()
    try:
        yield port
    finally:
        op.stop()
        print(f"--- operator ---\n{op.output[-5000:]}")


def say(line: str) -> None:
    """A figure for whoever runs the test with -s: to the real stderr, which the operator's runner
    (click's, in a thread) does not take over as it does sys.stdout."""
    print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.__stderr__, flush=True)


def _metric(port: int, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`, from the operator's /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def _splits(pods: dict[str, dict[str, Any]]) -> set[str]:
    return {(meta.get("annotations") or {}).get(c.ANNOTATION_SPLIT, "") for meta in pods.values()}


@pytest.mark.slow
@pytest.mark.timeout(600)  # about 90 s on a quiet 2-core machine; 5 minutes at a load of 20 and more
def test_a_1000_device_job_through_the_operator(control_plane, namespace, kubectl, fleet_operator):
    port, n = fleet_operator, DEVICES_MAX
    with StandInKubelet(control_plane, namespace, STUCK, n) as kubelet, control_plane.http() as http:
        kubectl.run("apply", "--server-side", "-f", "-", stdin=json.dumps(fleet_job(n)))

        # Every device pod made, with the split of the spec.
        pods = wait_for(lambda: (p := device_pods_metadata(http, namespace)) and len(p) == n and p, 300,
                        f"{n} device pods", interval=2)
        assert _splits(pods) == {"2"}
        say(f"{n} device pods made")
        wait_for(lambda: kubectl.json("get", "aresjob", "fleet").get("status", {}).get("devicesReady")
                 == n - len(STUCK), 180, "the job's status counting the running pods", interval=2)
        assert not kubelet.errors, kubelet.errors[:5]
        say("the status counts the running pods")

        # A new split point reaches every pod's annotation.
        kubectl.run("patch", "aresjob", "fleet", "--type=merge", "-p", '{"spec": {"split": {"point": 4}}}')
        pods = wait_for(lambda: (p := device_pods_metadata(http, namespace)) and _splits(p) == {"4"} and p, 180,
                        "split 4 on every device pod", interval=2)
        wait_for(lambda: kubectl.json("get", "aresjob", "fleet")["status"]["deviceSummary"]["splits"] == {"4": n},
                 60, "the status counting split 4", interval=1)

        say("split 4 on every pod and in the status")

        # Nothing changes: ticks go by without a LIST of the job's pods and without a pod write.
        ticks, lists = (_metric(port, "ares_operator_tick_duration_seconds_count", job="fleet"),
                        _metric(port, "ares_operator_pod_lists_total", job="fleet"))
        versions = {name: meta["resourceVersion"] for name, meta in pods.items()}
        wait_for(lambda: _metric(port, "ares_operator_tick_duration_seconds_count", job="fleet") >= ticks + 3, 120,
                 "three more ticks", interval=1)
        assert _metric(port, "ares_operator_pod_lists_total", job="fleet") == lists
        after = {name: meta["resourceVersion"] for name, meta in device_pods_metadata(http, namespace).items()}
        assert after == versions, [name for name in after if after[name] != versions.get(name)][:10]

    # The status: counts over all, the worst listed first, the stuck ones named.
    status = kubectl.json("get", "aresjob", "fleet")["status"]
    assert status["devicesTotal"] == n and status["ready"] == f"{n - len(STUCK)}/{n}"
    assert len(status["devices"]) == job_status.DEVICES_LISTED_MAX
    assert [d["name"] for d in status["devices"][:len(STUCK)]] == list(STUCK)
    assert {d["problem"] for d in status["devices"][:len(STUCK)]} == {"ImagePullBackOff"}
    summary = status["deviceSummary"]
    assert summary["podPhases"] == {"Pending": len(STUCK), "Running": n - len(STUCK)}
    assert summary["problems"] == len(STUCK) and summary["listed"] == job_status.DEVICES_LISTED_MAX
    ready = next(cond for cond in status["conditions"] if cond["type"] == c.COND_DEVICES_READY)
    assert ready["status"] == "False" and ready["reason"] == "ImagePullFailed"

    # The job object, as kubectl shows it, and as stored (managed fields included).
    shown = kubectl.run("get", "aresjob", "fleet", "-o", "json").stdout
    compact = len(json.dumps(json.loads(shown), separators=(",", ":")))
    with control_plane.http() as http:
        stored = http.get(f"/apis/ares.io/v1alpha1/namespaces/{namespace}/aresjobs/fleet").content
    say(f"job object at {n} devices: {compact} bytes compact, {len(shown)} as kubectl indents it, "
        f"{len(stored)} stored with managedFields")
    assert compact < OBJECT_LIMIT, compact
    assert len(stored) < 1024 * 1024, len(stored)  # etcd's limit is 1.5 MiB

    # `kubectl get aresjobs`: one short line a job.
    header, *rows = [line for line in kubectl.run("get", "aresjobs").stdout.splitlines() if line.strip()]
    assert header.split() == ["NAME", "PHASE", "ROUND", "ACCURACY", "DEVICES", "AGE"] and len(rows) == 1
    assert rows[0].split()[:2] == ["fleet", "Pending"] and f"{n - len(STUCK)}/{n}" in rows[0].split()
    assert len(rows[0]) < 100, rows[0]

    count = _metric(port, "ares_operator_tick_duration_seconds_count", job="fleet")
    mean = _metric(port, "ares_operator_tick_duration_seconds_sum", job="fleet") / max(count, 1)
    say(f"operator: {count:.0f} ticks, {mean:.3f} s mean (the first ones made every pod); "
        f"{_metric(port, 'ares_operator_pod_lists_total', job='fleet'):.0f} pod LISTs")
