"""Pure decisions of the reconcile tick: which pods to create or replace, and how the job ends.

Input is what the operator observed (the job's pods, counters, the server's status); output is
an `Actions` value the handler carries out. Replacement counters live in the job's status and
in each pod's `ares.io/attempt` annotation, so a restarted operator neither forgets them nor
counts one failure twice.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from ares.core.messages import ServerStatus
from ares_operator import builders
from ares_operator import constants as c
from ares_operator.builders import JobRef, Obj
from ares_operator.settings import OperatorSettings
from ares_operator.spec import DeviceSpec, JobSpec


@dataclasses.dataclass(frozen=True)
class Waiting:
    """A container the kubelet cannot start or keep running (ErrImagePull, CrashLoopBackOff, ...)."""

    pod: str
    container: str
    kubelet_reason: str   # the container's state.waiting.reason
    message: str = ""     # the kubelet's state.waiting.message, one line, capped

    @property
    def reason(self) -> str:
        """The job's condition and Event reason (c.WAITING_REASONS)."""
        return c.WAITING_REASONS[self.kubelet_reason]

    @property
    def text(self) -> str:
        """`pod demo-pi container device: ImagePullBackOff: Back-off pulling image "..."`."""
        said = f": {self.message}" if self.message else ""
        return f"pod {self.pod} container {self.container}: {self.kubelet_reason}{said}"


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
    exit_code: Optional[int] = None  # of the pod's main container (trainer or server), once it ended
    exit_message: str = ""           # what it left in its termination log (e.g. why TLS refused the server)
    waiting: tuple[Waiting, ...] = ()  # containers stuck in a waiting reason of c.WAITING_REASONS
    started: bool = False            # the main container's startup probe has passed (kubelet's `started`)
    uid: str = ""                    # the pod's metadata.uid (tells a pod from its namesake replacement)

    @classmethod
    def of(cls, pod: Mapping[str, Any]) -> "PodView":
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        annotations = meta.get("annotations") or {}
        try:
            attempt = int(annotations.get(c.ANNOTATION_ATTEMPT, 0))
        except ValueError:
            attempt = 0
        status = pod.get("status") or {}
        return cls(name=meta.get("name", ""), role=labels.get(c.LABEL_ROLE, ""),
                   device=labels.get(c.LABEL_DEVICE, ""),
                   phase=status.get("phase") or "Pending", attempt=attempt,
                   terminating=bool(meta.get("deletionTimestamp")), annotations=dict(annotations),
                   exit_code=main_exit_code(status.get("containerStatuses") or []),
                   exit_message=main_exit_message(status.get("containerStatuses") or []),
                   waiting=waiting_containers(meta.get("name", ""), status),
                   started=main_started(status.get("containerStatuses") or []), uid=meta.get("uid", ""))

    @property
    def ended(self) -> bool:
        """The pod is done, or its main container is (the pod may still be stopping its sidecar)."""
        return self.phase in ("Failed", "Succeeded") or self.exit_code is not None

    @property
    def failed(self) -> bool:
        return self.phase == "Failed" or (self.exit_code is not None and self.exit_code != 0)

    @property
    def active(self) -> bool:
        """Holds a node and may still run: what clean-up and suspend delete."""
        return not self.terminating and not self.ended


MAIN_CONTAINERS = (c.CONTAINER_DEVICE, c.CONTAINER_SERVER)


def main_started(container_statuses: Sequence[Mapping[str, Any]]) -> bool:
    """The trainer's (or server's) container has started: running, and its startup probe passed."""
    return any(cs.get("name") in MAIN_CONTAINERS and bool(cs.get("started")) for cs in container_statuses)


def main_exit_code(container_statuses: Sequence[Mapping[str, Any]]) -> Optional[int]:
    """The exit code of the trainer (or server) container if it has terminated, else None.

    The pod's phase says Running as long as any container runs; the operator reads the
    container's own state so a trainer that exited is noticed at the next tick."""
    for cs in container_statuses:
        if cs.get("name") in MAIN_CONTAINERS:
            terminated = (cs.get("state") or {}).get("terminated")
            if terminated is not None:
                return int(terminated.get("exitCode", 1))
    return None


def main_exit_message(container_statuses: Sequence[Mapping[str, Any]]) -> str:
    """The terminated main container's message (its /dev/termination-log), one line, capped."""
    for cs in container_statuses:
        if cs.get("name") in MAIN_CONTAINERS:
            message = ((cs.get("state") or {}).get("terminated") or {}).get("message") or ""
            return " ".join(message.split())[:300]
    return ""


def waiting_containers(pod: str, status: Mapping[str, Any]) -> tuple[Waiting, ...]:
    """Containers the kubelet reports waiting for a reason that does not clear by itself: init
    containers first (the host-control sidecar is one; a pod whose sidecar cannot be pulled shows
    `Init:ImagePullBackOff`, its main container only PodInitializing), then the main ones.
    Waiting while starting (ContainerCreating, PodInitializing) is not a problem."""
    found: list[Waiting] = []
    for key in ("initContainerStatuses", "containerStatuses"):
        for cs in status.get(key) or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason") or ""
            if reason in c.WAITING_REASONS:
                found.append(Waiting(pod, cs.get("name", ""), reason,
                                     " ".join(str(waiting.get("message") or "").split())[:500]))
    return tuple(found)


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
    server_seen: bool = False            # the server pod this plan leaves was seen (see plan_pods)
    shard_restarts: Mapping[int, int] = dataclasses.field(default_factory=dict)  # shard -> replacements
    shards_seen: frozenset[int] = frozenset()  # the shard pods this plan leaves that were seen
    gave_up: tuple[str, ...] = ()        # devices past their backoff limit
    notes: tuple[str, ...] = ()          # what happened, for the log and events
    outcome: Optional[Outcome] = None    # the job ends


def plan_pods(job: JobRef, spec: JobSpec, settings: OperatorSettings, pods: Sequence[PodView],
              restarts: Mapping[str, int], server_restarts: int, splits: Mapping[str, int],
              options: Mapping[str, tuple[str, int]] | None = None, server_seen: bool = False,
              shard_restarts: Mapping[int, int] | None = None, shards_seen: frozenset[int] = frozenset()) -> Actions:
    """Create what is missing; replace what failed, within its backoff limit (with the device's
    current split and, where the job offers them, step options).

    `server_seen`: the server pod existed when the operator last looked (the previous plan's
    `Actions.server_seen`). A server pod that has gone since (deleted, evicted) is replaced as a
    failed one is: it counts against serverBackoffLimit and says so. Its first creation, a
    re-creation after a suspension and one after a replacement that is already counted do not.

    A job with shards (spec.server.shards > 1) has a pod a shard beside the server (its root):
    each is replaced as the server is (`plan_shards`), against serverBackoffLimit of its own.

    A suspended job (runPolicy.suspend) has no pods: every active one is deleted and nothing is
    created; counters are kept, and the server resumes from its checkpoint when it comes back.
    """
    by_name = {p.name: p for p in pods}
    shard_counts = {i: max((shard_restarts or {}).get(i, 0), _attempt(by_name, job.shard_name(i)))
                    for i in shard_indexes(spec)}
    if spec.run_policy.suspend:
        counts = {d.name: max(restarts.get(d.name, 0), _attempt(by_name, job.device_pod_name(d.name)))
                  for d in spec.devices}
        gone = tuple(p.name for p in pods if not p.terminating)
        return Actions(delete=gone, restarts=counts,
                       server_restarts=max(server_restarts, _attempt(by_name, job.server_name)),
                       shard_restarts=shard_counts,
                       notes=(f"suspended: deleting pods {list(gone)}",) if gone else ())
    create: list[Obj] = []
    delete: list[str] = []
    notes: list[str] = []
    counts = {d.name: max(restarts.get(d.name, 0), _attempt(by_name, job.device_pod_name(d.name)))
              for d in spec.devices}
    gave_up: list[str] = []
    layers = c.MODEL_LAYERS[spec.model]

    # The server: replaced (it resumes from its checkpoint) up to serverBackoffLimit times, when it
    # failed or when its pod went away after it had been seen.
    srv_count = max(server_restarts, _attempt(by_name, job.server_name))
    server = by_name.get(job.server_name)
    limit = spec.run_policy.server_backoff_limit
    seen = False  # a pod created now is seen when a later listing shows it
    if server is None:
        if server_seen:
            if srv_count >= limit:
                return Actions(restarts=counts, server_restarts=srv_count, outcome=Outcome(
                    c.PHASE_FAILED, c.REASON_SERVER_FAILED,
                    f"server pod deleted after {srv_count} restarts (serverBackoffLimit {limit})"))
            srv_count += 1
            notes.append(f"server pod deleted; re-created (restart {srv_count}), resuming from checkpoint")
        create.append(_with_attempt(builders.server_pod(job, spec, settings), srv_count))
    elif server.terminating:
        # Deleted by someone else: counted once it has gone. One the operator deleted to replace
        # it (an earlier attempt than the count) is counted already.
        seen = server_seen and server.attempt >= srv_count
    elif server.ended:
        if srv_count >= limit:
            return Actions(restarts=counts, server_restarts=srv_count, outcome=Outcome(
                c.PHASE_FAILED, c.REASON_SERVER_FAILED,
                f"server pod {server.phase.lower()} {srv_count + 1} times (serverBackoffLimit {limit})"))
        srv_count += 1
        delete.append(server.name)
        create.append(_with_attempt(builders.server_pod(job, spec, settings), srv_count))
        notes.append(f"server pod {server.phase.lower()}; replaced (restart {srv_count}), resuming from checkpoint")
    else:
        seen = True

    shards = plan_shards(job, spec, settings, by_name, shard_counts, shards_seen)
    if shards.outcome is not None:
        return Actions(restarts=counts, server_restarts=srv_count, shard_restarts=shards.shard_restarts,
                       outcome=shards.outcome)
    create += shards.create
    delete += shards.delete
    notes += shards.notes

    for dev in spec.devices:
        name = job.device_pod_name(dev.name)
        pod = by_name.get(name)
        split = splits.get(dev.name, builders.initial_split(spec, dev, layers))
        chosen = (options or {}).get(dev.name)
        if pod is None:
            if counts[dev.name] > spec.run_policy.backoff_limit:
                gave_up.append(dev.name)
            else:
                create.append(builders.device_pod(job, spec, dev, settings, split, counts[dev.name], chosen))
        elif not pod.terminating and pod.failed:
            if counts[dev.name] >= spec.run_policy.backoff_limit:
                gave_up.append(dev.name)  # keep the failed pod for its logs
                continue
            counts[dev.name] += 1
            delete.append(name)
            create.append(builders.device_pod(job, spec, dev, settings, split, counts[dev.name], chosen))
            why = f"trainer exited with code {pod.exit_code}" if pod.exit_code is not None else "pod failed"
            why += f" ({pod.exit_message})" if pod.exit_message else ""
            notes.append(f"device {dev.name}: {why}; replaced (restart {counts[dev.name]} "
                         f"of {spec.run_policy.backoff_limit})")

    outcome = None
    if len(gave_up) == len(spec.devices):
        outcome = Outcome(c.PHASE_FAILED, c.REASON_ALL_DEVICES_LOST,
                          f"every device failed more than its backoffLimit ({spec.run_policy.backoff_limit})")
    return Actions(create=tuple(create), delete=tuple(delete), restarts=counts, server_restarts=srv_count,
                   server_seen=seen, shard_restarts=shards.shard_restarts, shards_seen=shards.shards_seen,
                   gave_up=tuple(gave_up), notes=tuple(notes), outcome=outcome)


def shard_indexes(spec: JobSpec) -> range:
    """The job's shards: none for an unsharded job (its server holds every device)."""
    return range(spec.server.shards if spec.server.shards > 1 else 0)


def plan_shards(job: JobRef, spec: JobSpec, settings: OperatorSettings, by_name: Mapping[str, PodView],
                counts: Mapping[int, int], seen_before: frozenset[int]) -> Actions:
    """Each shard pod as the server pod: created when missing; replaced when it failed or when it
    went away after it had been seen (`seen_before`), each replacement counted against
    serverBackoffLimit for that shard. A replaced shard starts empty and takes the root's round;
    its devices wait for it (they lose at most the round in progress)."""
    limit = spec.run_policy.server_backoff_limit
    create: list[Obj] = []
    delete: list[str] = []
    notes: list[str] = []
    out = dict(counts)
    seen: set[int] = set()
    for i in shard_indexes(spec):
        name = job.shard_name(i)
        pod = by_name.get(name)
        if pod is None:
            if i in seen_before:
                if out[i] >= limit:
                    return Actions(shard_restarts=out, outcome=Outcome(
                        c.PHASE_FAILED, c.REASON_SERVER_FAILED,
                        f"shard {i} pod deleted after {out[i]} restarts (serverBackoffLimit {limit})"))
                out[i] += 1
                notes.append(f"shard {i} pod deleted; re-created (restart {out[i]}), taking the root's round")
            create.append(_with_attempt(builders.shard_pod(job, spec, settings, i), out[i]))
        elif pod.terminating:
            if i in seen_before and pod.attempt >= out[i]:
                seen.add(i)
        elif pod.failed:  # one that exited 0 did so because training is over: left alone
            if out[i] >= limit:
                return Actions(shard_restarts=out, outcome=Outcome(
                    c.PHASE_FAILED, c.REASON_SERVER_FAILED,
                    f"shard {i} pod {pod.phase.lower()} {out[i] + 1} times (serverBackoffLimit {limit})"))
            out[i] += 1
            delete.append(name)
            create.append(_with_attempt(builders.shard_pod(job, spec, settings, i), out[i]))
            notes.append(f"shard {i} pod {pod.phase.lower()}; replaced (restart {out[i]}), taking the root's round")
        else:
            seen.add(i)
    return Actions(create=tuple(create), delete=tuple(delete), shard_restarts=out, shards_seen=frozenset(seen),
                   notes=tuple(notes))


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
        if server.failure_reason == "diverged":
            return Outcome(c.PHASE_FAILED, c.REASON_TRAINING_DIVERGED,
                           server.failure or f"training diverged (non-finite loss) in round {server.round}")
        return Outcome(c.PHASE_FAILED, c.REASON_SERVER_REPORTED_FAILURE, server.failure or "the server reported a failed run")
    return None


def deadline_outcome(spec: JobSpec, started: Optional[str], now: datetime.datetime) -> Optional[Outcome]:
    """runPolicy.activeDeadlineSeconds, counted from status.startTime (reset when a suspended
    job resumes, as a Kubernetes Job does); a suspended job's clock does not run."""
    limit = spec.run_policy.active_deadline_seconds
    if limit is None or not started or spec.run_policy.suspend:
        return None
    begun = parse_time(started)
    if begun is None or (now - begun).total_seconds() < limit:
        return None
    return Outcome(c.PHASE_FAILED, c.REASON_DEADLINE_EXCEEDED,
                   f"the job ran longer than activeDeadlineSeconds ({limit} s)")


def parse_time(value: str) -> Optional[datetime.datetime]:
    try:
        return datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    except (TypeError, ValueError):
        return None


def pods_to_clean(spec: JobSpec, pods: Sequence[PodView], outcome: Outcome) -> tuple[str, ...]:
    """Which pods go when the job ends: runPolicy.cleanPodPolicy (None, Running, All).

    A job past its deadline stops every active pod whatever the policy (as a Kubernetes Job does):
    nothing may keep training, or holding a node, after it."""
    policy = spec.run_policy.clean_pod_policy
    if outcome.reason == c.REASON_DEADLINE_EXCEEDED and policy == c.CLEAN_POD_NONE:
        policy = c.CLEAN_POD_RUNNING
    if policy == c.CLEAN_POD_ALL:
        return tuple(p.name for p in pods if not p.terminating)
    if policy == c.CLEAN_POD_RUNNING:
        return tuple(p.name for p in pods if p.active)
    return ()


def desired_splits(spec: JobSpec, planned: Mapping[str, int]) -> dict[str, int]:
    """Pinned and fixed splits always; the optimiser's plan for the others once there is one."""
    out = dict(planned)
    out.update(builders.pinned_splits(spec))
    return out


def desired_options(spec: JobSpec, planned: Mapping[str, tuple[str, int]]) -> dict[str, tuple[str, int]]:
    """The plan's (codec, micro-batches) per device, for a job that offers them; none otherwise
    (a device the plan has not reached keeps what its pod carries)."""
    if not spec.training.offer_pairs():
        return {}
    names = {d.name for d in spec.devices}
    return {name: pair for name, pair in planned.items() if name in names}


def desired_modes(spec: JobSpec, planned: Mapping[str, str]) -> dict[str, str]:
    """The plan's power mode per Jetson, for a job that lets the policy choose them; none otherwise
    (the spec's powerMode is what the pods carry)."""
    if not spec.split.choose_power_modes:
        return {}
    jetsons = {d.name for d in spec.devices if d.device_class in c.JETSON_CLASSES}
    return {name: mode for name, mode in planned.items() if name in jetsons and mode}


def annotation_patches(spec: JobSpec, job: JobRef, pods: Sequence[PodView], splits: Mapping[str, int],
                       options: Mapping[str, tuple[str, int]] | None = None,
                       modes: Mapping[str, str] | None = None) -> dict[str, dict[str, str]]:
    """Per pod, the host-control annotations that differ from the spec (and the plan).

    Step options that changed go in the same patch as the split (first in it): the API server
    applies one patch at once and the kubelet projects one pod's downwardAPI files in one atomic
    swap, so a device never reads a new split without the options chosen with it."""
    by_name = {p.name: p for p in pods}
    patches: dict[str, dict[str, str]] = {}
    for dev in spec.devices:
        pod = by_name.get(job.device_pod_name(dev.name))
        if pod is None or not pod.active:
            continue
        want = _wanted(dev, splits.get(dev.name), (options or {}).get(dev.name), (modes or {}).get(dev.name))
        if spec.split.choose_power_modes and not want[c.ANNOTATION_POWER_MODE]:
            del want[c.ANNOTATION_POWER_MODE]  # no plan for it yet: what the pod carries stays
        diff = {k: v for k, v in want.items() if pod.annotations.get(k) != v}
        if diff:
            patches[pod.name] = diff
    return patches


def _wanted(dev: DeviceSpec, split: Optional[int], options: Optional[tuple[str, int]],
            mode: Optional[str] = None) -> dict[str, str]:
    want: dict[str, str] = {}
    if options is not None:
        want[c.ANNOTATION_STEP_OPTIONS] = builders.step_options_annotation(*options)
    want.update(builders.host_control_annotations(dev, mode))
    if split is not None:
        want[c.ANNOTATION_SPLIT] = str(split)
    return want
