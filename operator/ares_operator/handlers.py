"""The kopf module: `kopf run --standalone -m ares_operator.handlers`.

Thin handlers over pure functions. On create/resume: validate, then Secret, ConfigMap, Service
and pods. Every tick (a timer): pods are reconciled (missing ones created, failed ones replaced
within their backoff limit), the server's status read, the optimiser run when due and its
splits written as pod annotations, and the job's status patched when it changed.
Per-job state (tokens, the last plan, when it was made) lives in kopf's per-object memo.
"""

from __future__ import annotations

import datetime
import logging
import secrets
import time
from collections.abc import Mapping
from typing import Any, Optional

import kopf

from ares.core.config import CONTROLLER_TOKEN_NAME
from ares.core.messages import ServerStatus
from ares.runtime.tlsclient import ClientTls, explain
from ares_operator import builders, conditions, reconcile, validation
from ares_operator import metrics as operator_metrics
from ares_operator import constants as c
from ares_operator import settings as ares_settings
from ares_operator import tls
from ares_operator import status as job_status
from ares_operator.builders import JobRef
from ares_operator.kube import Kube, NotOurs, Refused, load_config
from ares_operator.kube import controller_uid as kube_controller_uid
from ares_operator.spec import JobSpec

RESOURCE = (c.GROUP, c.VERSION, c.PLURAL)


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _now() -> str:
    return _utcnow().strftime("%Y-%m-%dT%H:%M:%SZ")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """All kopf tuning in one place; our own settings go into the memo every job copies."""
    ours = ares_settings.from_env()
    logging.getLogger("ares_operator").setLevel(ours.log_level)
    settings.persistence.finalizer = c.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=c.KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=c.KOPF_PREFIX, key="last-handled-configuration")
    # Our Events are posted by us (Kube.post_event: phases, replacements, refusals); kopf's posting
    # of log records is kept for its own handler failures only, so nothing is said twice.
    settings.posting.level = logging.ERROR
    settings.networking.request_timeout = 60
    settings.watching.server_timeout = 300          # re-list now and then; never trust one stream forever
    settings.execution.max_workers = 8
    # A tick that deletes its own job (TTL) is still running when the deletion arrives: look
    # again soon rather than after kopf's default minute.
    settings.background.cancellation_polling = 1
    load_config()
    memo.settings = ours
    memo.kube = Kube()
    memo.metrics = operator_metrics.OperatorMetrics()
    memo.metrics.serve(ours.metrics.port, ours.metrics.address)


@kopf.on.cleanup()
def stop_metrics(memo: kopf.Memo, **_: Any) -> None:
    """The operator stops: free the metrics port (a restarted operator in one process binds it again)."""
    if getattr(memo, "metrics", None) is not None:
        memo.metrics.close()


@kopf.on.delete(*RESOURCE, optional=True)
def forget(name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    """A deleted job leaves the operator's metrics (its children go with the garbage collector)."""
    if getattr(memo, "metrics", None) is not None:
        memo.metrics.forget(namespace, name)


# --- create / resume -------------------------------------------------------------------------

@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
def start(name: str, namespace: str, uid: str, spec: Mapping[str, Any], status: Mapping[str, Any],
          meta: Mapping[str, Any], body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch,
          logger: logging.Logger, **_: Any) -> None:
    if status.get("phase") in c.TERMINAL_PHASES:
        return  # a finished job keeps what it has; nothing is recreated on resume
    job = JobRef(name, namespace, uid)
    parsed = _valid_spec(job, spec, status, meta, body, memo, patch, logger)
    if parsed is None:
        return
    if _ensure_children(job, parsed, status, meta, body, memo, patch, logger):
        _guarded_reconcile(job, parsed, status, meta, body, memo, patch, logger)
    patch.status.setdefault("startTime", status.get("startTime") or _now())


def _ensure_children(job: JobRef, spec: JobSpec, status: Mapping[str, Any], meta: Mapping[str, Any],
                     body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, logger: logging.Logger) -> bool:
    """Every child is first created as a dry run, so that a refusal (RBAC, Pod Security, a
    leftover namesake) is reported on the job and nothing is left half-created; then for real."""
    if getattr(memo, "children_ok", False):
        # A tick that read the job before this condition was stored rewrites the conditions
        # without it (timers run beside the create handler): put it back rather than lose it.
        # (A False one, a refusal by the reconcile, stays as _blocked wrote it.)
        if conditions.find(status.get("conditions") or [], c.COND_CREATED) is None:
            _set_condition(patch, status, meta, c.COND_CREATED, True, c.REASON_CREATED, _CREATED)
        return True
    kube: Kube = memo.kube
    try:
        for obj in builders.children(job, spec, memo.settings):
            kube.create(obj, dry_run=True)
        _tokens(kube, job, spec, memo)
        kube.create(builders.config_map(job, spec))
        kube.create(builders.service(job))
    except (Refused, NotOurs) as exc:
        _blocked(exc, job, status, meta, body, memo, patch, logger)
        return False
    memo.children_ok = True
    _set_condition(patch, status, meta, c.COND_CREATED, True, c.REASON_CREATED, _CREATED)
    return True


_CREATED = "Secret, ConfigMap and Service exist; pods are created and kept by every tick"


def _guarded_reconcile(job: JobRef, spec: JobSpec, status: Mapping[str, Any], meta: Mapping[str, Any],
                       body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, logger: logging.Logger) -> None:
    if "conditions" in (patch.status or {}):  # set earlier in this handler: build on them, not on the old ones
        status = {**status, "conditions": patch.status["conditions"]}
    try:
        _reconcile(job, spec, status, meta, body, memo, patch, logger)
    except (Refused, NotOurs) as exc:
        _blocked(exc, job, status, meta, body, memo, patch, logger)
        return
    # A refusal of an earlier tick (say, a pod's namesake still terminating) has cleared.
    created = conditions.find(patch.status.get("conditions") or status.get("conditions") or [], c.COND_CREATED)
    if created is not None and created.get("status") == "False":
        _set_condition(patch, status, meta, c.COND_CREATED, True, c.REASON_CREATED, _CREATED)


def _blocked(exc: Exception, job: JobRef, status: Mapping[str, Any], meta: Mapping[str, Any], body: kopf.Body,
             memo: kopf.Memo, patch: kopf.Patch, logger: logging.Logger) -> None:
    """A refusal becomes a condition and a Warning event (once per change), and is retried next tick."""
    reason, message = refusal_message(exc, job)
    logger.warning("%s", message)
    old = conditions.find(status.get("conditions") or [], c.COND_CREATED)
    if old is None or old.get("reason") != reason or old.get("message") != message:
        _event(memo, body, "Warning", reason, message)
    _set_condition(patch, status, meta, c.COND_CREATED, False, reason, message)
    patch.status.setdefault("phase", status.get("phase") or c.PHASE_PENDING)


def refusal_message(exc: Exception, job: JobRef) -> tuple[str, str]:
    """(reason, message) that tell a cluster user what was refused, why, and what to change."""
    if isinstance(exc, NotOurs):
        return c.REASON_NAME_CONFLICT, str(exc)
    assert isinstance(exc, Refused)
    if exc.pod_security:
        return c.REASON_POD_SECURITY, (
            f"Pod Security refused {exc.kind} {exc.name} in namespace {job.namespace}: {exc.detail}. "
            "Device pods run the host-control sidecar, which needs NET_ADMIN to cap bandwidth with tc "
            "(and privileged, with the host's /etc/nvpmodel.conf, to switch Jetson power modes): label the "
            "namespace pod-security.kubernetes.io/enforce=privileged. Nothing was created for this job.")
    if exc.status == 403:
        return c.REASON_FORBIDDEN, (
            f"the operator may not {exc.verb} {exc.kind} {exc.name} in namespace {job.namespace}: {exc.detail}. "
            "Its ServiceAccount lacks this permission: reinstall the chart's RBAC (charts/ares) or add the rule.")
    return c.REASON_REFUSED, f"the API server refused to {exc.verb} {exc.kind} {exc.name}: {exc.detail}"


def _set_condition(patch: kopf.Patch, status: Mapping[str, Any], meta: Mapping[str, Any], kind: str,
                   value: bool, reason: str, message: str) -> None:
    patch.status["conditions"] = conditions.set_condition(
        patch.status.get("conditions") or status.get("conditions") or [], kind, value, reason, message,
        _now(), meta.get("generation"))


def _valid_spec(job: JobRef, spec: Mapping[str, Any], status: Mapping[str, Any], meta: Mapping[str, Any],
                body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, logger: logging.Logger) -> Optional[JobSpec]:
    """The typed spec; or None after marking the job Failed with every problem found."""
    parsed, problems = validation.validate(job.name, spec)
    gen = meta.get("generation")
    if parsed is not None and not problems:
        return parsed
    message = "; ".join(problems)
    logger.warning("invalid spec, nothing created: %s", message)
    if status.get("phase") != c.PHASE_FAILED:
        _event(memo, body, "Warning", c.REASON_INVALID_SPEC, f"invalid spec, nothing created: {message}")
    conds = conditions.set_condition(status.get("conditions") or [], c.COND_SPEC_VALID, False,
                                     c.REASON_INVALID_SPEC, message, _now(), gen)
    conds = conditions.set_condition(conds, c.COND_FAILED, True, c.REASON_INVALID_SPEC, message, _now(), gen)
    patch.status.update({"phase": c.PHASE_FAILED, "conditions": conds, "observedGeneration": gen,
                         "completionTime": _now()})
    return None


def _tokens(kube: Kube, job: JobRef, spec: JobSpec, memo: kopf.Memo) -> dict[str, str]:
    """Made once, kept in the Secret: a resumed operator reads them back instead of inventing new ones."""
    if getattr(memo, "tokens", None):
        return memo.tokens
    existing = kube.read_secret(job.namespace, job.secret_name)
    if existing is not None and kube_controller_uid(existing) != job.uid:
        raise NotOurs(f"Secret {job.secret_name} belongs to another owner (a deleted job of the same name?); "
                      "waiting for the garbage collector to remove it")
    values = builders.tokens(spec, builders.decode_secret(existing or {}), lambda: secrets.token_urlsafe(32))
    if existing is None and not kube.create(builders.tokens_secret(job, values)):
        # Someone (an earlier run of this handler) was faster: theirs are the tokens in use.
        values = builders.decode_secret(kube.read_secret(job.namespace, job.secret_name) or {})
    memo.tokens = values
    return values


def _tls(kube: Kube, job: JobRef, spec: JobSpec, memo: kopf.Memo, reread: bool = False) -> None:
    """The job's TLS Secret (tls.py), made once: a create that finds one keeps it. Its CA goes
    into the memo, to check the server's certificate. Re-read whenever pods are (re)created, so
    a Secret deleted to rotate is made anew before the new pods mount it."""
    if getattr(memo, "tls", None) is not None and not reread:
        return
    existing = kube.read_secret(job.namespace, job.tls_secret_name)
    if existing is not None and kube_controller_uid(existing) != job.uid:
        raise NotOurs(f"Secret {job.tls_secret_name} belongs to another owner (a deleted job of the same name?); "
                      "waiting for the garbage collector to remove it")
    if existing is None:
        made = tls.secret(job, spec)
        existing = made if kube.create(made) else kube.read_secret(job.namespace, job.tls_secret_name) or made
    memo.tls = ClientTls(ca_pem=tls.ca_pem(existing), server_name=job.server_host())


# --- the tick --------------------------------------------------------------------------------

@kopf.timer(*RESOURCE, interval=ares_settings.tick_seconds(), initial_delay=ares_settings.tick_seconds())
def tick(name: str, namespace: str, uid: str, spec: Mapping[str, Any], status: Mapping[str, Any],
         meta: Mapping[str, Any], body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch,
         logger: logging.Logger, **_: Any) -> None:
    job = JobRef(name, namespace, uid)
    memo.metrics.phase(namespace, name, status.get("phase"))
    if status.get("phase") in c.TERMINAL_PHASES:
        _expire(job, spec, status, memo.kube)
        return
    parsed, problems = validation.validate(name, spec)
    if parsed is None or problems:
        _valid_spec(job, spec, status, meta, body, memo, patch, logger)
        return
    try:
        if _ensure_children(job, parsed, status, meta, body, memo, patch, logger):
            _guarded_reconcile(job, parsed, status, meta, body, memo, patch, logger)
    except Exception:
        memo.metrics.reconcile_errors.labels(namespace, name).inc()
        raise
    memo.metrics.phase(namespace, name, patch.status.get("phase") or status.get("phase"))


@kopf.on.update(*RESOURCE, field="spec")
def spec_changed(name: str, namespace: str, uid: str, spec: Mapping[str, Any], status: Mapping[str, Any],
                 meta: Mapping[str, Any], memo: kopf.Memo, patch: kopf.Patch, logger: logging.Logger,
                 **_: Any) -> None:
    """Pinned splits, power modes and bandwidth caps reach the pods now, not at the next tick."""
    if status.get("phase") in c.TERMINAL_PHASES:
        patch.status["observedGeneration"] = meta.get("generation")  # seen; nothing left to change
        return
    job = JobRef(name, namespace, uid)
    parsed, problems = validation.validate(name, spec)
    if parsed is None or problems:
        return  # the next tick marks it Failed
    kube: Kube = memo.kube
    pods = [reconcile.PodView.of(p) for p in kube.list_pods(namespace, name, uid)]
    _annotate(kube, job, parsed, pods, memo, logger)


def _reconcile(job: JobRef, spec: JobSpec, status: Mapping[str, Any], meta: Mapping[str, Any],
               body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, logger: logging.Logger) -> None:
    kube: Kube = memo.kube
    ours: ares_settings.OperatorSettings = memo.settings
    pods = [reconcile.PodView.of(p) for p in kube.list_pods(job.namespace, job.name, job.uid)]
    devices_status = status.get("devices") or {}
    restarts = {d.name: max(int((devices_status.get(d.name) or {}).get("restarts") or 0),
                            getattr(memo, "restarts", {}).get(d.name, 0)) for d in spec.devices}
    server_restarts = max(int(status.get("serverRestarts") or 0), getattr(memo, "server_restarts", 0))
    splits = reconcile.desired_splits(spec, _planned(memo))
    options = reconcile.desired_options(spec, _planned_options(memo))
    actions = reconcile.plan_pods(job, spec, ours, pods, restarts, server_restarts, splits, options)
    _tls(kube, job, spec, memo, reread=bool(actions.create))  # before any pod that mounts it
    memo.restarts, memo.server_restarts = dict(actions.restarts), actions.server_restarts
    for note in actions.notes:
        logger.info(note)
        _event(memo, body, "Warning", c.REASON_PODS_REPLACED, note)
    for pod_name in actions.delete:
        kube.delete_pod(job.namespace, pod_name)
    for obj in actions.create:
        if kube.create(obj):
            logger.info("created pod %s", obj["metadata"]["name"])
    if actions.delete or actions.create:
        pods = [reconcile.PodView.of(p) for p in kube.list_pods(job.namespace, job.name, job.uid)]

    server = _server_status(job, pods, memo, logger) if not actions.outcome else None
    if server is not None and server.phase in ("waiting", "training") and spec.split.mode == "adaptive":
        _optimise(job, spec, memo, logger)
    _annotate(kube, job, spec, pods, memo, logger)

    outcome = (actions.outcome or reconcile.deadline_outcome(spec, status.get("startTime"), _utcnow())
               or reconcile.training_outcome(server))
    new = _status(job, spec, status, meta, pods, server, actions, outcome, memo)
    if outcome is not None:
        for pod_name in reconcile.pods_to_clean(spec, pods, outcome):  # runPolicy.cleanPodPolicy
            kube.delete_pod(job.namespace, pod_name)
        logger.info("job %s: %s (%s)", outcome.phase, outcome.reason, outcome.message)
    if new.get("phase") != status.get("phase"):
        _phase_event(memo, body, new, outcome)
    changed = {k: v for k, v in new.items() if status.get(k) != v}
    if changed:
        patch.status.update(changed)


def _phase_event(memo: kopf.Memo, body: kopf.Body, new: Mapping[str, Any],
                 outcome: Optional[reconcile.Outcome]) -> None:
    """Every phase transition is an Event on the job (`kubectl describe aresjob` shows them)."""
    phase = new.get("phase")
    if outcome is not None:
        _event(memo, body, "Normal" if phase == c.PHASE_SUCCEEDED else "Warning", outcome.reason,
               f"{phase}: {outcome.message}")
    else:
        _event(memo, body, "Normal", str(phase), f"job is {phase}: round {new.get('progress', '?')}")


def _server_status(job: JobRef, pods: list[reconcile.PodView], memo: kopf.Memo,
                   logger: logging.Logger) -> Optional[ServerStatus]:
    from ares.runtime import controller  # the same controller code the local runner uses

    server_pod = next((p for p in pods if p.name == job.server_name), None)
    if server_pod is None or server_pod.phase != "Running" or server_pod.terminating:
        return None
    try:
        found = controller.fetch_status(_url(job, memo), memo.tokens[CONTROLLER_TOKEN_NAME],
                                        memo.settings.server.timeout_s, tls=getattr(memo, "tls", None))
    except Exception as exc:  # a server still starting or restarting: read it again next tick
        if explain(exc) is not None:  # rotated? the next tick reads the Secret again
            logger.warning("server of %s refused over TLS: %s", job.name, explain(exc))
            memo.tls = None
        logger.debug("server of %s not readable yet: %s", job.name, exc)
        if getattr(memo, "unreachable_since", None) is None:
            memo.unreachable_since = time.monotonic()
        memo.unreachable_error = f"{type(exc).__name__}: {exc}"[:500]
        return None
    memo.unreachable_since = None
    return found


def server_condition(server: Optional[ServerStatus], unreachable_for: Optional[float],
                     error: str, grace_s: float) -> tuple[bool, str, str]:
    """ServerReady: serving; starting (its pod is not up, or only briefly unreadable); or
    unreachable (its pod runs but /v1/status has failed for longer than `grace_s`)."""
    if server is not None:
        return True, c.REASON_SERVER_SERVING, f"server phase {server.phase}"
    if unreachable_for is not None and unreachable_for > grace_s:
        return False, c.REASON_SERVER_UNREACHABLE, (
            f"the server pod is running but its /v1/status has failed for {unreachable_for:.0f}s: {error}")
    return False, c.REASON_SERVER_STARTING, "server not serving status yet"


def _optimise(job: JobRef, spec: JobSpec, memo: kopf.Memo, logger: logging.Logger) -> None:
    """Telemetry -> optimiser -> plan in memo, at most every split.reoptimiseIntervalSeconds.

    With a training.offer the policy also chooses each device's (codec, micro-batches), as the
    local runner's controller does (the same `decide`)."""
    from ares.core.optimiser import parse_policy
    from ares.runtime import controller

    last = getattr(memo, "optimised_at", None)
    if last is not None and time.monotonic() - last < spec.split.reoptimise_interval_seconds:
        return
    try:
        telemetry = controller.fetch_telemetry(_url(job, memo), memo.tokens[CONTROLLER_TOKEN_NAME],
                                               memo.settings.server.timeout_s, tls=getattr(memo, "tls", None))
    except Exception as exc:
        logger.debug("telemetry of %s not readable yet: %s", job.name, exc)
        return
    began = time.perf_counter()
    offer = spec.training.offer_pairs()
    plan = controller.decide(telemetry, parse_policy(spec.split.policy, spec.split.alpha),
                             builders.pinned_splits(spec), offer)
    memo.metrics.optimised(job.namespace, job.name, time.perf_counter() - began)
    if plan is None:
        return  # not enough measurements yet; ask again next tick
    memo.optimised_at = time.monotonic()
    splits = dict(plan.splits)
    options = controller.plan_options(plan) if offer else {}
    if splits != _planned(memo) or options != _planned_options(memo):
        logger.info("new split plan for %s: %s%s", job.name, splits, f", step options {options}" if options else "")
    memo.planned, memo.planned_options = splits, options


def _planned(memo: kopf.Memo) -> dict[str, int]:
    return dict(getattr(memo, "planned", None) or {})


def _planned_options(memo: kopf.Memo) -> dict[str, tuple[str, int]]:
    return dict(getattr(memo, "planned_options", None) or {})


class AnnotationSink:
    """The operator's `SplitSink`: splits become the pods' `ares.io/split-point` annotations,
    and (a job with a training.offer) each device's step options `ares.io/step-options`.

    It writes the host-control annotations from the spec (power mode, bandwidth) at the same
    time, and only what differs from what the pods (as last listed) already carry.
    """

    def __init__(self, kube: Kube, job: JobRef, spec: JobSpec, pods: list[reconcile.PodView],
                 logger: logging.Logger):
        self.kube, self.job, self.spec, self.pods, self.logger = kube, job, spec, pods, logger

    def write(self, splits: Mapping[str, int],
              options: Mapping[str, tuple[str, int]] | None = None) -> dict[str, int]:
        """Returns, per device, the split it is changed to (only those that change)."""
        changed: dict[str, int] = {}
        by_name = {p.name: p for p in self.pods}
        for pod_name, values in reconcile.annotation_patches(self.spec, self.job, self.pods, splits, options).items():
            self.logger.info("annotating %s: %s", pod_name, values)
            self.kube.annotate_pod(self.job.namespace, pod_name, values)
            if c.ANNOTATION_SPLIT in values:
                changed[by_name[pod_name].device] = int(values[c.ANNOTATION_SPLIT])
        return changed


def _annotate(kube: Kube, job: JobRef, spec: JobSpec, pods: list[reconcile.PodView], memo: kopf.Memo,
              logger: logging.Logger) -> None:
    changed = AnnotationSink(kube, job, spec, pods, logger).write(
        reconcile.desired_splits(spec, _planned(memo)), reconcile.desired_options(spec, _planned_options(memo)))
    for device in changed:
        memo.metrics.split_changes.labels(job.namespace, job.name, device).inc()


def _url(job: JobRef, memo: kopf.Memo) -> str:
    ours: ares_settings.OperatorSettings = memo.settings
    return ours.server.url(job.name, job.namespace)


def _status(job: JobRef, spec: JobSpec, status: Mapping[str, Any], meta: Mapping[str, Any],
            pods: list[reconcile.PodView], server: Optional[ServerStatus], actions: reconcile.Actions,
            outcome: Optional[reconcile.Outcome], memo: kopf.Memo) -> dict[str, Any]:
    now, gen = _now(), meta.get("generation")
    new = job_status.summary(job, spec, pods, server, status, actions.restarts, actions.server_restarts)
    conds = status.get("conditions") or []
    conds = conditions.set_condition(conds, c.COND_SPEC_VALID, True, c.REASON_VALID, "spec accepted", now, gen)
    since = getattr(memo, "unreachable_since", None)
    ok, reason, message = server_condition(server, None if since is None else time.monotonic() - since,
                                           getattr(memo, "unreachable_error", ""), c.SERVER_UNREACHABLE_AFTER_S)
    conds = conditions.set_condition(conds, c.COND_SERVER_READY, ok, reason, message, now, gen)
    ready, total = new["devicesReady"], new["devicesTotal"]
    lost = f"; gave up on {list(actions.gave_up)}" if actions.gave_up else ""
    conds = conditions.set_condition(conds, c.COND_DEVICES_READY, ready == total,
                                     c.REASON_DEVICES_RUNNING if ready == total else c.REASON_DEVICES_WAITING,
                                     f"{ready}/{total} device pods running{lost}", now, gen)
    if spec.split.mode == "adaptive":
        planned = _planned(memo)
        conds = conditions.set_condition(conds, c.COND_SPLITS_APPLIED, bool(planned),
                                         c.REASON_PLAN_APPLIED if planned else c.REASON_PLAN_PENDING,
                                         split_message(planned, _planned_options(memo)) if planned
                                         else "waiting for measurements", now, gen)
    new["observedGeneration"] = gen
    if outcome is None:
        new["phase"] = job_status.phase(server, status.get("phase"))
    else:
        new["phase"] = outcome.phase
        new["completionTime"] = now
        kind = c.COND_SUCCEEDED if outcome.phase == c.PHASE_SUCCEEDED else c.COND_FAILED
        conds = conditions.set_condition(conds, kind, True, outcome.reason, outcome.message, now, gen)
        # Its pods are being removed: nothing is ready any more, whatever was true a tick ago.
        for kind in (c.COND_DEVICES_READY, c.COND_SERVER_READY):
            conds = conditions.set_condition(conds, kind, False, c.REASON_JOB_FINISHED,
                                             f"the job has ended ({outcome.phase}); its pods are removed", now, gen)
        new["devicesReady"] = 0
        new["ready"] = f"0/{new.get('devicesTotal', len(spec.devices))}"
        if outcome.phase == c.PHASE_SUCCEEDED and server is not None:
            new["round"] = server.rounds
            new["progress"] = f"{server.rounds}/{server.rounds}"
    new["conditions"] = conds
    if outcome is None:  # runPolicy.suspend: phase Suspended, or resumed (startTime restarts)
        new.update(job_status.suspension(spec, status, conds, now, gen))
    return new


def _event(memo: kopf.Memo, body: kopf.Body, type_: str, reason: str, message: str) -> None:
    memo.kube.post_event(body, type_, reason, message)


def split_message(planned: Mapping[str, int], options: Mapping[str, tuple[str, int]] | None = None) -> str:
    """`splits nano-1=3, pi=1`: what kubectl describe shows, not a Python dict; with step options
    (a job with an offer) `splits nano-1=3, pi=1; step options nano-1=int8:4, pi=fp32:1`."""
    text = "splits " + ", ".join(f"{name}={split}" for name, split in sorted(planned.items()))
    if options:
        text += "; step options " + ", ".join(f"{name}={codec}:{k}" for name, (codec, k) in sorted(options.items()))
    return text


def _expire(job: JobRef, spec: Mapping[str, Any], status: Mapping[str, Any], kube: Kube) -> None:
    """runPolicy.ttlSecondsAfterFinished: delete the finished job; its children go with it."""
    ttl = (spec.get("runPolicy") or {}).get("ttlSecondsAfterFinished")
    done = status.get("completionTime")
    if ttl is None or not done:
        return
    ended = datetime.datetime.strptime(done, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    if datetime.datetime.now(datetime.timezone.utc) - ended >= datetime.timedelta(seconds=int(ttl)):
        kube.delete_job(job.namespace, job.name)
