"""Pure decisions of the reconcile tick: which pods to create or replace, and how the job ends.

Input is what the operator observed (the job's pods, counters, the server's status); output is
an `Actions` value the handler carries out. Replacement counters live in the job's status and
in each pod's `ares.io/attempt` annotation, so a restarted operator neither forgets them nor
counts one failure twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from ares.core.messages import ServerStatus
from ares_operator import builders
from ares_operator import constants as c
from ares_operator.builders import JobRef, Obj
from ares_operator.settings import OperatorSettings
from ares_operator.spec import DeviceSpec, JobSpec


@dataclasses.dataclass(frozen=True)
class PodView:
    """The few things the operator reads from a pod."""

    name: str
    role: str
    device: str
    phase: str              # Pending, Running, Succeeded, Failed, Unknown
    attempt: int
    terminating: bool
    annotations: Mapping[str, str]

    @classmethod
    def of(cls, pod: Mapping[str, Any]) -> "PodView":
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        annotations = meta.get("annotations") or {}
        try:
            attempt = int(annotations.get(c.ANNOTATION_ATTEMPT, 0))
        except ValueError:
            attempt = 0
        return cls(name=meta.get("name", ""), role=labels.get(c.LABEL_ROLE, ""),
                   device=labels.get(c.LABEL_DEVICE, ""),
                   phase=(pod.get("status") or {}).get("phase") or "Pending", attempt=attempt,
                   terminating=bool(meta.get("deletionTimestamp")), annotations=dict(annotations))


@dataclasses.dataclass(frozen=True)
class Outcome:
    phase: str    # Succeeded or Failed
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Actions:
    create: tuple[Obj, ...] = ()
    delete: tuple[str, ...] = ()
    restarts: Mapping[str, int] = dataclasses.field(default_factory=dict)  # device -> replacements
    server_restarts: int = 0
    gave_up: tuple[str, ...] = ()        # devices past their backoff limit
    notes: tuple[str, ...] = ()          # what happened, for the log and events
    outcome: Optional[Outcome] = None    # the job ends


def plan_pods(job: JobRef, spec: JobSpec, settings: OperatorSettings, pods: Sequence[PodView],
              restarts: Mapping[str, int], server_restarts: int, splits: Mapping[str, int]) -> Actions:
    """Create what is missing; replace what failed, within its backoff limit."""
    by_name = {p.name: p for p in pods}
    create: list[Obj] = []
    delete: list[str] = []
    notes: list[str] = []
    counts = {d.name: max(restarts.get(d.name, 0), _attempt(by_name, job.device_pod_name(d.name)))
              for d in spec.devices}
    gave_up: list[str] = []
    layers = c.MODEL_LAYERS[spec.model]

    # The server: replaced (it resumes from its checkpoint) up to serverBackoffLimit times.
    srv_count = max(server_restarts, _attempt(by_name, job.server_name))
    server = by_name.get(job.server_name)
    if server is None:
        create.append(_with_attempt(builders.server_pod(job, spec, settings), srv_count))
    elif not server.terminating and server.phase in ("Failed", "Succeeded"):
        if srv_count >= spec.run_policy.server_backoff_limit:
            return Actions(restarts=counts, server_restarts=srv_count, outcome=Outcome(
                c.PHASE_FAILED, c.REASON_SERVER_FAILED,
                f"server pod {server.phase.lower()} {srv_count + 1} times "
                f"(serverBackoffLimit {spec.run_policy.server_backoff_limit})"))
        srv_count += 1
        delete.append(server.name)
        create.append(_with_attempt(builders.server_pod(job, spec, settings), srv_count))
        notes.append(f"server pod {server.phase.lower()}; replaced (restart {srv_count}), resuming from checkpoint")

    for dev in spec.devices:
        name = job.device_pod_name(dev.name)
        pod = by_name.get(name)
        split = splits.get(dev.name, builders.initial_split(spec, dev, layers))
        if pod is None:
            if counts[dev.name] > spec.run_policy.backoff_limit:
                gave_up.append(dev.name)
            else:
                create.append(builders.device_pod(job, spec, dev, settings, split, counts[dev.name]))
        elif not pod.terminating and pod.phase == "Failed":
            if counts[dev.name] >= spec.run_policy.backoff_limit:
                gave_up.append(dev.name)  # keep the failed pod for its logs
                continue
            counts[dev.name] += 1
            delete.append(name)
            create.append(builders.device_pod(job, spec, dev, settings, split, counts[dev.name]))
            notes.append(f"device {dev.name}: pod failed; replaced (restart {counts[dev.name]} "
                         f"of {spec.run_policy.backoff_limit})")

    outcome = None
    if len(gave_up) == len(spec.devices):
        outcome = Outcome(c.PHASE_FAILED, c.REASON_ALL_DEVICES_LOST,
                          f"every device failed more than its backoffLimit ({spec.run_policy.backoff_limit})")
    return Actions(create=tuple(create), delete=tuple(delete), restarts=counts, server_restarts=srv_count,
                   gave_up=tuple(gave_up), notes=tuple(notes), outcome=outcome)


def _attempt(by_name: Mapping[str, PodView], name: str) -> int:
    pod = by_name.get(name)
    return pod.attempt if pod else 0


def _with_attempt(pod: Obj, attempt: int) -> Obj:
    pod["metadata"].setdefault("annotations", {})[c.ANNOTATION_ATTEMPT] = str(attempt)
    return pod


def training_outcome(server: Optional[ServerStatus]) -> Optional[Outcome]:
    """The server decides when training is over: its last round, or its own failure."""
    if server is None:
        return None
    if server.phase == "finished":
        acc = f", accuracy {server.accuracy:.4f}" if server.accuracy is not None else ""
        return Outcome(c.PHASE_SUCCEEDED, c.REASON_COMPLETED, f"trained {server.rounds} rounds{acc}")
    if server.phase == "failed":
        return Outcome(c.PHASE_FAILED, c.REASON_SERVER_REPORTED_FAILURE, "the server reported a failed run")
    return None


def desired_splits(spec: JobSpec, planned: Mapping[str, int]) -> dict[str, int]:
    """Pinned and fixed splits always; the optimiser's plan for the others once there is one."""
    out = dict(planned)
    out.update(builders.pinned_splits(spec))
    return out


def annotation_patches(spec: JobSpec, job: JobRef, pods: Sequence[PodView],
                       splits: Mapping[str, int]) -> dict[str, dict[str, str]]:
    """Per pod, the host-control annotations that differ from the spec (and the plan)."""
    by_name = {p.name: p for p in pods}
    patches: dict[str, dict[str, str]] = {}
    for dev in spec.devices:
        pod = by_name.get(job.device_pod_name(dev.name))
        if pod is None or pod.terminating or pod.phase in ("Failed", "Succeeded"):
            continue
        want = _wanted(dev, splits.get(dev.name))
        diff = {k: v for k, v in want.items() if pod.annotations.get(k) != v}
        if diff:
            patches[pod.name] = diff
    return patches


def _wanted(dev: DeviceSpec, split: Optional[int]) -> dict[str, str]:
    want = builders.host_control_annotations(dev)
    if split is not None:
        want[c.ANNOTATION_SPLIT] = str(split)
    return want
