"""Pods that cannot run, and a server pod that goes away, on the real control plane with the real
operator: what the job's conditions, counters and Events say.

No kubelet runs here: the test writes the pods' status through the `pods/status` subresource, as
a kubelet does (what `tests/k8s/k8s_kubelet.py` writes for pods it runs), with the waiting
reasons a real kubelet reports for an image it cannot pull.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from tests.support import wait_for
from tests.k8s.k8s_jobs import device_status, example_job

pytestmark = pytest.mark.k8s

BACKOFF = 'Back-off pulling image "ghcr.io/ares-split/ares-device-jetson:0.1.0"'
NOT_FOUND = ('failed to pull and unpack image "ghcr.io/ares-split/ares-device-jetson:0.1.0": '
             'failed to resolve reference: ghcr.io/ares-split/ares-device-jetson:0.1.0: not found')


def _container(name: str, state: dict[str, Any]) -> dict[str, Any]:
    running = "running" in state
    return {"name": name, "image": "img", "imageID": "", "restartCount": 0, "ready": running,
            "started": running, "state": state}


def _waiting(reason: str, message: str = "") -> dict[str, Any]:
    return {"waiting": {"reason": reason, **({"message": message} if message else {})}}


RUNNING = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
DONE = {"terminated": {"exitCode": 0, "reason": "Completed"}}


def _set_status(kubectl, pod: str, phase: str, init: dict[str, dict], main: dict[str, dict]) -> None:
    """What a kubelet writes: the phase and each container's state."""
    status = {"phase": phase, "initContainerStatuses": [_container(n, s) for n, s in init.items()],
              "containerStatuses": [_container(n, s) for n, s in main.items()]}
    kubectl.run("patch", "pod", pod, "--subresource=status", "--type=merge", "-p", json.dumps({"status": status}))


def _sidecar_unpullable(kubectl, pod: str, reason: str, message: str) -> None:
    """`Init:<reason>` in kubectl get pods: the host-control sidecar (an init container) cannot be pulled."""
    _set_status(kubectl, pod, "Pending", {"host-control": _waiting(reason, message)},
                {"device": _waiting("PodInitializing")})


def _status(kubectl, name: str) -> dict[str, Any]:
    return kubectl.json("get", "aresjobs", name).get("status") or {}


def _condition(kubectl, name: str, kind: str) -> dict[str, Any]:
    return next((c for c in _status(kubectl, name).get("conditions") or [] if c["type"] == kind), {})


def _events(kubectl, name: str, reason: str) -> list[dict[str, Any]]:
    return [e for e in kubectl.json("get", "events")["items"]
            if e["involvedObject"].get("kind") == "AresTrainingJob" and e["involvedObject"]["name"] == name
            and e["reason"] == reason]


def _pods(kubectl) -> dict[str, dict[str, Any]]:
    return {p["metadata"]["name"]: p for p in kubectl.json("get", "pods")["items"]}


def _apply(kubectl, name: str) -> None:
    kubectl.run("apply", "-f", "-", stdin=yaml.safe_dump(example_job(name)))
    wanted = {f"{name}-{p}" for p in ("server", "nano-maxn", "nano-5w", "pi")}
    wait_for(lambda: wanted <= set(_pods(kubectl)), 30, "the job's pods", interval=0.2)


def test_containers_that_cannot_start_are_named_on_the_job_once(kubectl, server_port, operator):
    _apply(kubectl, "demo")
    _set_status(kubectl, "demo-server", "Pending", {"prepare-checkpoints": DONE},
                {"server": _waiting("ImagePullBackOff", 'Back-off pulling image "ghcr.io/ares-split/ares-server:0.1.0"')})
    _sidecar_unpullable(kubectl, "demo-nano-maxn", "ErrImagePull", NOT_FOUND)
    _sidecar_unpullable(kubectl, "demo-nano-5w", "ImagePullBackOff", BACKOFF)

    server = wait_for(lambda: (c := _condition(kubectl, "demo", "ServerReady")).get("reason") == "ImagePullFailed"
                      and c, 30, "ServerReady ImagePullFailed", interval=0.2,
                      details=lambda: json.dumps(_status(kubectl, "demo").get("conditions")))
    assert server["status"] == "False" and server["message"] == (
        'pod demo-server container server: ImagePullBackOff: Back-off pulling image '
        '"ghcr.io/ares-split/ares-server:0.1.0"')
    stuck = (f"0/3 device pods running; pod demo-nano-maxn container host-control: ErrImagePull: {NOT_FOUND}; "
             f"pod demo-nano-5w container host-control: ImagePullBackOff: {BACKOFF}")
    devices = wait_for(lambda: (c := _condition(kubectl, "demo", "DevicesReady")).get("message") == stuck and c,
                       30, "DevicesReady naming both stuck sidecars", interval=0.2,
                       details=lambda: json.dumps(_condition(kubectl, "demo", "DevicesReady")))
    assert (devices["status"], devices["reason"]) == ("False", "ImagePullFailed")
    assert _status(kubectl, "demo")["phase"] == "Pending"

    # One Warning Event per stuck container, with the kubelet's words.
    wait_for(lambda: len(_events(kubectl, "demo", "ImagePullFailed")) == 3, 30, "three ImagePullFailed events",
             interval=0.2)
    said = sorted(e["message"] for e in _events(kubectl, "demo", "ImagePullFailed"))
    assert said == sorted([server["message"], f"pod demo-nano-maxn container host-control: ErrImagePull: {NOT_FOUND}",
                           f"pod demo-nano-5w container host-control: ImagePullBackOff: {BACKOFF}"])
    assert all(e["type"] == "Warning" for e in _events(kubectl, "demo", "ImagePullFailed"))

    # The kubelet backs off and retries: the same problem, a new waiting reason. The condition
    # follows; no new Event, however many ticks pass.
    _sidecar_unpullable(kubectl, "demo-nano-maxn", "ImagePullBackOff", BACKOFF)
    wait_for(lambda: "demo-nano-maxn container host-control: ImagePullBackOff"
             in _condition(kubectl, "demo", "DevicesReady").get("message", ""), 30, "the new waiting reason",
             interval=0.2)
    # A sidecar that starts and then keeps failing is a problem of another kind: its own Event.
    _set_status(kubectl, "demo-nano-5w", "Running",
                {"host-control": _waiting("CrashLoopBackOff", "back-off 20s restarting failed container")},
                {"device": RUNNING})
    wait_for(lambda: _events(kubectl, "demo", "ContainerCrashLooping"), 30, "a ContainerCrashLooping event",
             interval=0.2)
    assert [e["message"] for e in _events(kubectl, "demo", "ContainerCrashLooping")] == [
        "pod demo-nano-5w container host-control: CrashLoopBackOff: back-off 20s restarting failed container"]
    assert len(_events(kubectl, "demo", "ImagePullFailed")) == 3

    # Pulled at last: DevicesReady says what it said before, without the stuck containers.
    for pod in ("demo-nano-maxn", "demo-nano-5w", "demo-pi"):
        _set_status(kubectl, pod, "Running", {"host-control": RUNNING}, {"device": RUNNING})
    ready = wait_for(lambda: (c := _condition(kubectl, "demo", "DevicesReady")).get("status") == "True" and c,
                     30, "DevicesReady True", interval=0.2)
    assert (ready["reason"], ready["message"]) == ("AllRunning", "3/3 device pods running")


def test_a_deleted_server_pod_is_a_counted_replacement(kubectl, server_port, operator):
    _apply(kubectl, "demo")
    first = _pods(kubectl)["demo-server"]
    assert first["metadata"]["annotations"]["ares.io/attempt"] == "0"
    _set_status(kubectl, "demo-server", "Running", {"prepare-checkpoints": DONE}, {"server": RUNNING})
    # A tick has listed the server pod: it shows the device pod's phase written after it.
    _set_status(kubectl, "demo-pi", "Running", {"host-control": RUNNING}, {"device": RUNNING})
    wait_for(lambda: device_status(_status(kubectl, "demo"), "pi").get("podPhase") == "Running", 30,
             "the operator to see the pods", interval=0.2, retry_on=(StopIteration,))
    assert _status(kubectl, "demo")["serverRestarts"] == 0 and not _events(kubectl, "demo", "PodReplaced")

    kubectl.run("delete", "pod", "demo-server", "--grace-period=0", "--force")
    new = wait_for(lambda: (p := _pods(kubectl).get("demo-server")) and p["metadata"]["uid"] != first["metadata"]["uid"]
                   and p, 30, "a new server pod", interval=0.2)
    assert new["metadata"]["annotations"]["ares.io/attempt"] == "1"
    wait_for(lambda: _status(kubectl, "demo").get("serverRestarts") == 1, 30, "serverRestarts 1", interval=0.2)
    (event,) = _events(kubectl, "demo", "PodReplaced")
    assert event["type"] == "Warning"
    assert event["message"] == "server pod deleted; re-created (restart 1), resuming from checkpoint"

    # Counted once: ticks later (they show a device pod's new phase) still one restart, one Event.
    _set_status(kubectl, "demo-nano-maxn", "Running", {"host-control": RUNNING}, {"device": RUNNING})
    wait_for(lambda: device_status(_status(kubectl, "demo"), "nano-maxn").get("podPhase") == "Running", 30,
             "a later tick", interval=0.2, retry_on=(StopIteration,))
    assert _status(kubectl, "demo")["serverRestarts"] == 1
    assert len(_events(kubectl, "demo", "PodReplaced")) == 1
    assert _pods(kubectl)["demo-server"]["metadata"]["uid"] == new["metadata"]["uid"]
