"""Pure: what the job's status says, from the server's status and the pods."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

from ares.core.messages import ServerStatus
from ares_operator import builders, conditions
from ares_operator import constants as c
from ares_operator.builders import JobRef
from ares_operator.reconcile import Outcome, PodView, Waiting
from ares_operator.spec import JobSpec


def summary(job: JobRef, spec: JobSpec, pods: Sequence[PodView], server: Optional[ServerStatus],
            previous: Mapping[str, Any], restarts: Mapping[str, int], server_restarts: int,
            remembered: Optional[Mapping[str, Mapping[str, Any]]] = None) -> dict[str, Any]:
    """Progress, accuracy and every device's entry (`devices`, all of them, in the spec's order:
    `bounded` then keeps what the status holds). A field the server has not reported keeps its
    last value: from the status, or from `remembered` (the operator's memory of every device's
    last entry, which a large job's status does not hold)."""
    by_name = {p.name: p for p in pods}
    rounds = server.rounds if server else spec.training.rounds
    done = server.round if server else int(previous.get("round") or 0)
    ready = sum(1 for d in spec.devices if _running(by_name.get(job.device_pod_name(d.name))))
    before = {**devices_by_name(previous), **(remembered or {})}
    out: dict[str, Any] = {
        "round": done, "rounds": rounds, "progress": f"{done}/{rounds}",
        "devicesReady": ready, "devicesTotal": len(spec.devices), "ready": f"{ready}/{len(spec.devices)}",
        "serverRestarts": server_restarts,
        "devices": [_device(d.name, by_name.get(job.device_pod_name(d.name)), server,
                            before.get(d.name) or {}, restarts.get(d.name, 0))
                    for d in spec.devices],
    }
    if server and server.accuracy is not None:
        out["accuracy"] = round(server.accuracy, 4)
    if server and server.loss is not None:
        out["loss"] = round(server.loss, 4)
    return out


# status.devices holds every device of a job of up to this many; of a larger job, the this many
# that most need attention, worst first (`attention`), and status.deviceSummary counts them all.
# An entry is about 250 bytes: the status stays under 10 KB at any fleet size, where listing
# 1,000 devices would take 250 KB of a job object etcd caps at 1.5 MiB, and rewrite it every tick.
DEVICES_LISTED_MAX = 32
_NOT_RUNNING = ("Missing", "Pending", "Unknown", "Terminating", "Deleted")
_TRAINING_PROBLEMS = ("missed", "refused")


def attention(entry: Mapping[str, Any]) -> tuple[int, float, int]:
    """How much a device entry needs attention, smallest first: a container the kubelet cannot
    start or keep running; a failed pod or trainer; a pod not running; a round the server says it
    missed or refused; a replaced pod; then the slowest last round first."""
    exit_code = entry.get("exitCode")
    if entry.get("problem"):
        rank = 0
    elif entry.get("podPhase") == "Failed" or (exit_code is not None and exit_code != 0):
        rank = 1
    elif entry.get("podPhase") in _NOT_RUNNING:
        rank = 2
    elif entry.get("phase") in _TRAINING_PROBLEMS:
        rank = 3
    elif entry.get("restarts"):
        rank = 4
    else:
        rank = 5
    return rank, -float(entry.get("roundSeconds") or 0.0), -int(entry.get("restarts") or 0)


def bounded(devices: Sequence[Mapping[str, Any]], limit: int = DEVICES_LISTED_MAX) -> dict[str, Any]:
    """What the status holds of every device's entry: `devices`, all of them in the spec's order
    for a job of up to `limit` devices, else the `limit` that most need attention, worst first
    (ties in the spec's order); and `deviceSummary`, counts over all of them."""
    if len(devices) <= limit:
        listed = [dict(d) for d in devices]
    else:
        listed = [dict(d) for d in sorted(devices, key=attention)[:limit]]
    return {"devices": listed, "deviceSummary": device_summary(devices, len(listed))}


def device_summary(devices: Sequence[Mapping[str, Any]], listed: int) -> dict[str, Any]:
    """Counts over every device: pod phases, training phases, split points, devices with a stuck
    container, replacements; the slowest and median last round; the energy used. Zero counts
    are left out; maps are keyed by the value counted (splits as strings)."""
    rounds = sorted(float(d["roundSeconds"]) for d in devices if d.get("roundSeconds") is not None)
    energy = [float(d["energyJ"]) for d in devices if d.get("energyJ") is not None]
    out: dict[str, Any] = {
        "listed": listed,
        "podPhases": _counts(d.get("podPhase") for d in devices),
        "phases": _counts(d.get("phase") for d in devices),
        "splits": _counts(str(d["split"]) if d.get("split") is not None else None for d in devices),
        "problems": sum(1 for d in devices if d.get("problem")),
        "restarts": sum(int(d.get("restarts") or 0) for d in devices),
    }
    if rounds:
        out["slowestRoundSeconds"] = round(rounds[-1], 3)
        out["medianRoundSeconds"] = round(rounds[(len(rounds) - 1) // 2], 3)
    if energy:
        out["energyJ"] = round(sum(energy), 3)
    return out


def merge_patch(old: Any, new: Any) -> Any:
    """`new` as a JSON merge patch over `old` (how the status is patched): a key of a map that
    `new` no longer has is sent as null, or the API server would keep it (a split no device uses
    any more would still be counted). Lists and other values are replaced whole."""
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return new
    out: dict[str, Any] = {key: None for key in old if key not in new}
    out.update({key: merge_patch(old.get(key), value) for key, value in new.items()})
    return out


def _counts(values: Iterable[Optional[str]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for value in values:
        if value:
            out[value] = out.get(value, 0) + 1
    return dict(sorted(out.items()))


def devices_by_name(status: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """status.devices as {name: entry}: a list keyed by name (a map in statuses written before)."""
    devices = status.get("devices") or []
    if isinstance(devices, Mapping):
        return {name: dict(entry or {}) for name, entry in devices.items()}
    return {entry["name"]: dict(entry) for entry in devices if isinstance(entry, Mapping) and entry.get("name")}


def phase(server: Optional[ServerStatus], previous: Optional[str]) -> str:
    """Running once the server has trained: in a round, or between rounds after round 0 closed
    (the round gap, a round waiting for joins). A check that falls between rounds no longer
    leaves a training job Pending. An unreachable server keeps the phase it had."""
    if server is not None and (server.phase == "training" or (server.phase == "waiting" and server.round >= 1)):
        return c.PHASE_RUNNING
    return c.PHASE_RUNNING if previous == c.PHASE_RUNNING else c.PHASE_PENDING


def _running(pod: Optional[PodView]) -> bool:
    return bool(pod and pod.phase == "Running" and pod.active)


def suspension(spec: JobSpec, previous: Mapping[str, Any], conds: list[dict[str, Any]], now: str,
               generation: Optional[int]) -> dict[str, Any]:
    """What runPolicy.suspend changes in the status: phase Suspended and condition Suspended=True
    while it holds; on resume the condition turns False and startTime restarts (the
    activeDeadlineSeconds clock, as for a Kubernetes Job). Empty when suspend never held."""
    if spec.run_policy.suspend:
        return {"phase": c.PHASE_SUSPENDED, "conditions": conditions.set_condition(
            conds, c.COND_SUSPENDED, True, c.REASON_SUSPENDED,
            "runPolicy.suspend is true: the job's pods are deleted; it resumes from its checkpoint", now, generation)}
    if conditions.is_true(previous.get("conditions") or [], c.COND_SUSPENDED):
        return {"startTime": now, "conditions": conditions.set_condition(
            conds, c.COND_SUSPENDED, False, c.REASON_RESUMED, "runPolicy.suspend is false: running again",
            now, generation)}
    return {}


def _device(name: str, pod: Optional[PodView], server: Optional[ServerStatus], previous: Mapping[str, Any],
            restarts: int) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name}
    out.update({k: v for k, v in previous.items()
                if k in ("split", "phase", "upBps", "downBps", "energyJ", "energySource", "roundSeconds")})
    out["podPhase"] = (pod.phase if not pod.terminating else "Terminating") if pod else "Missing"
    if pod and pod.exit_code is not None:
        out["exitCode"] = pod.exit_code
    if pod and pod.waiting and not pod.terminating:
        out["problem"] = pod.waiting[0].kubelet_reason
    out["restarts"] = restarts
    if pod and c.ANNOTATION_SPLIT in pod.annotations:
        try:
            out["split"] = int(pod.annotations[c.ANNOTATION_SPLIT])
        except ValueError:
            pass
    reported = server.devices.get(name) if server else None
    if reported is not None:
        fields = {"split": reported.split, "phase": reported.phase, "upBps": reported.up_bps,
                  "downBps": reported.down_bps, "energyJ": reported.energy_j,
                  "energySource": reported.energy_source, "roundSeconds": reported.round_s}
        out.update({k: v for k, v in fields.items() if v is not None})
    return out


LIVE_POD_PHASES = frozenset({"Pending", "Running", "Terminating"})


def ended_conditions(spec: JobSpec, conds: list[dict[str, Any]], outcome: Outcome, cleaned: Sequence[str],
                     now: str, generation: Optional[int]) -> list[dict[str, Any]]:
    """DevicesReady and ServerReady of an ended job: False, saying what runPolicy.cleanPodPolicy did."""
    policy = spec.run_policy.clean_pod_policy
    why = f"cleanPodPolicy {policy}"
    if outcome.reason == c.REASON_DEADLINE_EXCEEDED and policy == c.CLEAN_POD_NONE:
        why = "nothing runs past activeDeadlineSeconds, whatever cleanPodPolicy None keeps"  # pods_to_clean
    if cleaned:
        fate = f"its pods {', '.join(sorted(cleaned))} are removed ({why})"
    else:
        fate = f"its pods are kept (cleanPodPolicy {policy})"
    for kind in (c.COND_DEVICES_READY, c.COND_SERVER_READY):
        conds = conditions.set_condition(conds, kind, False, c.REASON_JOB_FINISHED,
                                         f"the job has ended ({outcome.phase}); {fate}", now, generation)
    return conds


def ended_devices(job: JobRef, devices: Sequence[Mapping[str, Any]], cleaned: Sequence[str]) -> list[dict[str, Any]]:
    """Per-device status of an ended job: a pod removed by the clean-up says so."""
    gone = set(cleaned)
    return [{**entry, "podPhase": "Deleted"} if job.device_pod_name(entry["name"]) in gone else dict(entry)
            for entry in devices]


def followed_devices(job: JobRef, devices: Sequence[Mapping[str, Any]], pods: Sequence[PodView]) -> list[dict[str, Any]]:
    """After the end: each device's podPhase as its pod now is (Succeeded, Failed), or Deleted."""
    by_name = {p.name: p for p in pods}
    out: list[dict[str, Any]] = []
    for entry in devices:
        entry = dict(entry)
        pod = by_name.get(job.device_pod_name(entry["name"]))
        if entry.get("podPhase") in LIVE_POD_PHASES:
            entry["podPhase"] = ("Terminating" if pod.terminating else pod.phase) if pod else "Deleted"
            if pod and pod.exit_code is not None:
                entry["exitCode"] = pod.exit_code
        out.append(entry)
    return out


def followed_summary(job: JobRef, names: Sequence[str], listed: Sequence[Mapping[str, Any]],
                     summary: Mapping[str, Any], pods: Sequence[PodView]) -> dict[str, Any]:
    """After the end: deviceSummary.podPhases counted again as `followed_devices` follows the listed
    devices: a listed device as its entry says; any other as its pod now is, or Deleted."""
    by_name = {p.name: p for p in pods}
    entries = {entry["name"]: entry for entry in listed}
    phases = []
    for name in names:
        if name in entries:
            phases.append(entries[name].get("podPhase"))
            continue
        pod = by_name.get(job.device_pod_name(name))
        phases.append(("Terminating" if pod.terminating else pod.phase) if pod else "Deleted")
    return {**summary, "podPhases": _counts(phases)}


def capped_events(events: Sequence[tuple[str, str]], limit: int) -> list[tuple[str, str]]:
    """(reason, message) Events to post: the first `limit` as they are, the rest as one more Event
    that counts them, with the first one's reason (a fleet of 1,000 pods failing to pull one
    image is 11 Events, not 1,000 API calls in one tick)."""
    if len(events) <= limit:
        return list(events)
    rest = events[limit:]
    reasons = ", ".join(sorted({reason for reason, _ in rest}))
    return [*events[:limit], (rest[0][0], f"and {len(rest)} more ({reasons}): status.devices lists the worst, "
                                          "status.deviceSummary counts them all")]


def server_condition(server: Optional[ServerStatus], unreachable_for: Optional[float],
                     error: str, grace_s: float, pod: Optional[PodView] = None) -> tuple[bool, str, str]:
    """ServerReady: serving; stuck (a container of its pod `pod` cannot start: the kubelet's
    waiting reason, e.g. ImagePullFailed); starting (its pod is not up, or only briefly
    unreadable); or unreachable (its pod runs but /v1/status has failed for longer than `grace_s`)."""
    if server is not None:
        return True, c.REASON_SERVER_SERVING, f"server phase {server.phase}"
    if pod is not None and not pod.terminating and pod.waiting:
        return False, pod.waiting[0].reason, _problems_message(pod.waiting)
    if unreachable_for is not None and unreachable_for > grace_s:
        return False, c.REASON_SERVER_UNREACHABLE, (
            f"the server pod is running but its /v1/status has failed for {unreachable_for:.0f}s: {error}")
    return False, c.REASON_SERVER_STARTING, "server not serving status yet"


def split_message(planned: Mapping[str, int], options: Mapping[str, tuple[str, int]] | None = None) -> str:
    """`splits nano-1=3, pi=1`: what kubectl describe shows, not a Python dict; with step options
    (a job with an offer) `splits nano-1=3, pi=1; step options nano-1=int8:4, pi=fp32:1`."""
    text = "splits " + ", ".join(f"{name}={split}" for name, split in sorted(planned.items()))
    if options:
        text += "; step options " + ", ".join(f"{name}={codec}:{k}" for name, (codec, k) in sorted(options.items()))
    return text


def devices_condition(job: JobRef, spec: JobSpec, pods: Sequence[PodView],
                      gave_up: Sequence[str] = ()) -> tuple[bool, str, str]:
    """DevicesReady: every device pod running, none with a container the kubelet cannot start or
    keep running (a crash-looping sidecar included). Otherwise False: with the first such
    container's reason (ImagePullFailed, ContainerCreateFailed, ContainerCrashLooping) and every
    one in the message, or DevicesNotRunning while pods are only on their way."""
    by_name = {p.name: p for p in pods}
    devices = [by_name.get(job.device_pod_name(d.name)) for d in spec.devices]
    ready = sum(1 for pod in devices if _running(pod))
    stuck = tuple(w for pod in devices if pod is not None and not pod.terminating for w in pod.waiting)
    message = f"{ready}/{len(spec.devices)} device pods running"
    if stuck:
        message += f"; {_problems_message(stuck)}"
    if gave_up:
        message += f"; gave up on {list(gave_up)}"
    if stuck:
        return False, stuck[0].reason, message
    if ready == len(spec.devices):
        return True, c.REASON_DEVICES_RUNNING, message
    return False, c.REASON_DEVICES_WAITING, message


PROBLEMS_SHOWN = 5  # containers named in one condition message; the rest are counted


def _problems_message(stuck: Sequence[Waiting]) -> str:
    text = "; ".join(w.text for w in stuck[:PROBLEMS_SHOWN])
    if len(stuck) > PROBLEMS_SHOWN:
        text += f"; and {len(stuck) - PROBLEMS_SHOWN} more"
    return text


ProblemKey = tuple[str, str, str]  # (pod, container, condition reason)


def problem_events(pods: Sequence[PodView], reported: frozenset[ProblemKey]
                   ) -> tuple[frozenset[ProblemKey], list[tuple[str, str]]]:
    """Which stuck containers to post a Warning Event for: each one once, when it appears (or its
    kind changes), not every tick. The kubelet alternates ErrImagePull and ImagePullBackOff while
    it retries: one problem, one Event. Returns what is now reported (for the next call) and
    (reason, message) per Event; a problem that clears and comes back is posted again."""
    now: dict[ProblemKey, Waiting] = {}
    for pod in pods:
        if not pod.terminating:
            for w in pod.waiting:
                now.setdefault((w.pod, w.container, w.reason), w)
    events = [(w.reason, w.text) for key, w in now.items() if key not in reported]
    return frozenset(now), events


def server_ran(status: Mapping[str, Any]) -> bool:
    """Whether the status shows that the job's server pod existed: it trained (phase Running),
    was read (ServerReady Serving), ran unreadable, or was stuck in a waiting reason. What the
    operator goes by when it has not itself seen the pod yet (just started): a pod of such a job
    that is missing was deleted. Not so for a suspended job: its pods were deleted to suspend it."""
    if status.get("phase") == c.PHASE_SUSPENDED:
        return False
    if status.get("phase") == c.PHASE_RUNNING:
        return True
    ready = conditions.find(status.get("conditions") or [], c.COND_SERVER_READY)
    reason = str((ready or {}).get("reason") or "")
    return reason in (c.REASON_SERVER_SERVING, c.REASON_SERVER_UNREACHABLE) or reason in c.WAITING_REASONS.values()


def shards(job: JobRef, spec: JobSpec, pods: Sequence[PodView], restarts: Mapping[int, int]) -> list[dict[str, Any]]:
    """status.shards of a job with spec.server.shards > 1 (at most spec.SHARDS_MAX entries, about
    100 bytes each): each shard's pod phase, whether it serves (started, running), its devices
    and its pod's replacements. Empty for an unsharded job."""
    by_name = {p.name: p for p in pods}
    counts = [len(names) for names in builders.shard_devices(spec)] if spec.server.shards > 1 else []
    out: list[dict[str, Any]] = []
    for index, devices in enumerate(counts):
        pod = by_name.get(job.shard_name(index))
        phase = "Missing" if pod is None else "Terminating" if pod.terminating else pod.phase
        out.append({"index": index, "pod": job.shard_name(index), "podPhase": phase,
                    "ready": bool(pod is not None and not pod.terminating and pod.phase == "Running" and pod.started),
                    "devices": devices, "restarts": int(restarts.get(index, 0))})
    return out


def shards_seen(status: Mapping[str, Any]) -> frozenset[int]:
    """The shard pods the status shows existing (what the operator goes by when it has not itself
    seen them yet, as `server_ran` for the server): a missing one of these was deleted."""
    if status.get("phase") == c.PHASE_SUSPENDED:
        return frozenset()
    return frozenset(int(e["index"]) for e in status.get("shards") or []
                     if isinstance(e, Mapping) and isinstance(e.get("index"), int)
                     and e.get("podPhase") not in (None, "Missing", "Terminating"))


def shard_restarts(status: Mapping[str, Any]) -> dict[int, int]:
    return {int(e["index"]): int(e.get("restarts") or 0) for e in status.get("shards") or []
            if isinstance(e, Mapping) and isinstance(e.get("index"), int)}
