"""The kopf module: `kopf run --standalone -m ares_operator.handlers`.

Thin handlers over pure functions. On create/resume: validate, then Secret, ConfigMap, Service
and pods. Every tick (a timer): pods are reconciled (missing ones created, failed ones replaced
within their backoff limit), the server's status read, the optimiser run when due and its
splits written as pod annotations, and the job's status patched when it changed.
A tick reads the job's pods from a kopf index (`job_pods`, fed by one watch on the pods the
jobs own), not from a LIST, and writes only what changed: a steady tick of a 1,000-device job
makes no pod call at all (podindex.py says when it lists the pods instead).
Per-job state (tokens, the last plan, when it was made) is one typed `JobState` in kopf's
per-object memo; what every job shares (settings, the API client, metrics) is one `Context`.

No failure is silent: a refusal of the API server becomes a condition with its own reason
(refusals.py); any other error becomes condition Reconciled=False and a Warning Event, is
retried with backoff when retrying can help (the API server or network failing), and ends
the job (Failed, its children removed) when it cannot (the same spec fails the same way).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Optional

import kopf
import urllib3
from kubernetes.client.rest import ApiException

from ares.core.config import CONTROLLER_TOKEN_NAME
from ares.core.messages import ServerStatus, TelemetryColumns
from ares.runtime.tlsclient import ClientTls, explain
from ares_operator import builders, conditions, podindex, quota, reconcile, refusals, release, validation
from ares_operator import metrics as operator_metrics
from ares_operator import constants as c
from ares_operator import settings as ares_settings
from ares_operator import tls
from ares_operator import status as job_status
from ares_operator.builders import JobRef
from ares_operator.diffbase import CompressedDiffBaseStorage
from ares_operator.kube import Kube, NotOurs, QuotaShortfall, Refused, load_config
from ares_operator.kube import controller_uid as kube_controller_uid
from ares_operator.spec import JobSpec

RESOURCE = (c.GROUP, c.VERSION, c.PLURAL)
POD_RESOURCE = ("v1", "pods")  # core/v1 pods
MAX_BACKOFF_S = 300.0        # the longest wait between two tries after an error
MAX_FAILURES = 8             # consecutive errors of a running job before it is marked Failed
EVENTS_PER_TICK = 10         # Events of one kind a tick posts one by one; the rest in one more


@dataclasses.dataclass
class Context:
    """What every job's handlers share, made once at start-up."""

    settings: ares_settings.OperatorSettings
    kube: Kube
    metrics: operator_metrics.OperatorMetrics


@dataclasses.dataclass
class JobState:
    """What the operator remembers of one job between handler calls (lost on restart, and
    rebuilt from the cluster: tokens and TLS from their Secrets, counters from the status)."""

    children_ok: bool = False                 # Secret, ConfigMap, Service exist (pods follow each tick)
    tokens: dict[str, str] = dataclasses.field(default_factory=dict)
    tls: Optional[ClientTls] = None
    restarts: dict[str, int] = dataclasses.field(default_factory=dict)
    server_restarts: int = 0
    server_seen: Optional[bool] = None         # the server pod existed at the last plan (None: not looked yet)
    shard_restarts: dict[int, int] = dataclasses.field(default_factory=dict)
    shards_seen: Optional[frozenset[int]] = None  # the shard pods that existed at the last plan
    pod_problems: frozenset[tuple[str, str, str]] = frozenset()  # stuck containers already posted as Events
    unreachable_since: Optional[float] = None  # monotonic; the server's status has failed since
    unreachable_error: str = ""
    optimised_at: Optional[float] = None       # monotonic; the last plan
    planned: dict[str, int] = dataclasses.field(default_factory=dict)
    planned_options: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)
    planned_modes: dict[str, str] = dataclasses.field(default_factory=dict)  # split.choosePowerModes
    mode_failures: frozenset[tuple[str, str, str]] = frozenset()  # failed switches already posted as Events
    failures: int = 0                          # consecutive unexpected errors
    retry_at: Optional[float] = None           # monotonic; no reconcile before then (backoff)
    pending: podindex.PendingWrites = podindex.PendingWrites()  # pod writes the index has not shown yet
    devices: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # every device's last entry
    # Held by whichever handler of this job is at work: the create, resume and spec-change handlers
    # wait for it; a tick that finds it held skips (the next one comes soon). Re-entrant: a
    # reconcile annotates under it too.
    lock: threading.RLock = dataclasses.field(default_factory=threading.RLock, repr=False, compare=False)


def context(memo: kopf.Memo) -> Context:
    return memo.ctx


def state(memo: kopf.Memo) -> JobState:
    """This job's state, made on first use (kopf gives each object a memo of its own)."""
    if "job" not in memo:
        memo.job = JobState()
    return memo.job


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _now() -> str:
    return _utcnow().strftime("%Y-%m-%dT%H:%M:%SZ")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """All kopf tuning in one place; our own settings go into the context every job shares."""
    ours = ares_settings.from_env()
    logging.getLogger("ares_operator").setLevel(ours.log_level)
    settings.persistence.finalizer = c.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=c.KOPF_PREFIX)
    settings.persistence.diffbase_storage = CompressedDiffBaseStorage(
        prefix=c.KOPF_PREFIX, key="last-handled-configuration")
    # The pod index's watch: only pods of some job, filtered by the API server, not all of a namespace's.
    settings.watching.label_selectors[POD_RESOURCE] = c.LABEL_JOB
    # Our Events are posted by us (Kube.post_event: phases, replacements, refusals, errors);
    # kopf's posting of log records is kept for its own failures only, so nothing is said twice.
    settings.posting.level = logging.ERROR
    settings.networking.request_timeout = 60
    settings.watching.server_timeout = 300          # re-list now and then; never trust one stream forever
    settings.execution.max_workers = 8
    # A tick that deletes its own job (TTL) is still running when the deletion arrives: look
    # again soon rather than after kopf's default minute.
    settings.background.cancellation_polling = 1
    load_config()
    ctx = Context(settings=ours, kube=Kube(), metrics=operator_metrics.OperatorMetrics())
    memo.ctx = ctx
    ctx.metrics.serve(ours.metrics.port, ours.metrics.address)
    if ours.watch_namespaces:
        try:
            released = release.release_unwatched(ctx.kube, ours.watch_namespaces, _now())
        except Exception as exc:  # noqa: BLE001 -- never keeps the operator from starting
            logger.warning("could not release the jobs of namespaces no longer watched: %s: %s",
                           type(exc).__name__, exc)
            released = []
        for ref in released:
            logger.warning("released %s/%s: its namespace is no longer watched", ref.namespace, ref.name)


@kopf.on.cleanup()
def stop_metrics(memo: kopf.Memo, **_: Any) -> None:
    """The operator stops: free the metrics port (a restarted operator in one process binds it again)."""
    if "ctx" in memo:
        context(memo).metrics.close()


@kopf.on.delete(*RESOURCE, optional=True)
def forget(name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    """A deleted job leaves the operator's metrics (its children go with the garbage collector)."""
    if "ctx" in memo:
        context(memo).metrics.forget(namespace, name)


@dataclasses.dataclass
class Call:
    """One handler call: the job, what kopf read of it, where the status patch goes, and the
    operator's context and the job's state."""

    job: JobRef
    status: Mapping[str, Any]
    meta: Mapping[str, Any]
    body: kopf.Body
    patch: kopf.Patch
    logger: logging.Logger
    ctx: Context
    state: JobState
    pods_index: Optional[Mapping[podindex.Key, Any]] = None  # kopf's `job_pods`; None: LIST the pods

    @classmethod
    def of(cls, name: str, namespace: str, uid: str, status: Mapping[str, Any], meta: Mapping[str, Any],
           body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, logger: logging.Logger,
           pods_index: Optional[Mapping[podindex.Key, Any]] = None) -> "Call":
        return cls(JobRef(name, namespace, uid), status, meta, body, patch, logger, context(memo), state(memo),
                   pods_index)

    def conditions(self) -> list[dict[str, Any]]:
        """The conditions as this call has left them so far (its patch over what kopf read)."""
        return list(self.patch.status.get("conditions") or self.status.get("conditions") or [])

    def set_condition(self, kind: str, value: bool, reason: str, message: str) -> None:
        self.patch.status["conditions"] = conditions.set_condition(
            self.conditions(), kind, value, reason, message, _now(), self.meta.get("generation"))

    def event(self, type_: str, reason: str, message: str) -> None:
        self.ctx.kube.post_event(self.body, type_, reason, message)


# --- create / resume -------------------------------------------------------------------------

@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
def start(name: str, namespace: str, uid: str, spec: Mapping[str, Any], status: Mapping[str, Any],
          meta: Mapping[str, Any], body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch,
          logger: logging.Logger, job_pods: Optional[kopf.Index] = None, **_: Any) -> None:
    if status.get("phase") in c.TERMINAL_PHASES:
        return  # a finished job keeps what it has; nothing is recreated on resume
    call = Call.of(name, namespace, uid, status, meta, body, memo, patch, logger, job_pods)
    with call.state.lock:
        reconcile_job(call, spec)
    patch.status.setdefault("startTime", status.get("startTime") or _now())


def reconcile_job(call: Call, raw_spec: Mapping[str, Any]) -> None:
    """Validate, create what is missing, reconcile: every error ends on the job, none in a log only."""
    try:
        parsed = _valid_spec(call, raw_spec)
        if parsed is not None and ensure_children(call, parsed):
            _guarded_reconcile(call, parsed)
    except Exception as exc:  # noqa: BLE001 -- reported on the job, retried or ended by _error
        call.ctx.metrics.reconcile_errors.labels(call.job.namespace, call.job.name).inc()
        _error(call, exc)
        return
    st = call.state
    st.failures, st.retry_at = 0, None
    if call.patch.status.get("phase") in c.TERMINAL_PHASES or call.status.get("phase") in c.TERMINAL_PHASES:
        return
    if not conditions.is_true(call.conditions(), c.COND_RECONCILED):
        call.set_condition(c.COND_RECONCILED, True, c.REASON_RECONCILED, "the last reconcile completed")


def transient(exc: BaseException) -> bool:
    """Errors that a later try may not meet: the API server or the network failing for a while."""
    if isinstance(exc, ApiException):
        return exc.status in (None, 0, 408, 429, 500, 502, 503, 504)
    return isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError))


def _error(call: Call, exc: Exception) -> None:
    """An unexpected error: condition Reconciled=False and a Warning Event (once per distinct
    error), then another try after a backoff; or, where trying again cannot help (the same spec
    fails the same way while its children are being created, or a running job fails again and
    again), the job ends Failed and what was made for it is removed."""
    st, job = call.state, call.job
    st.failures += 1
    error = f"{type(exc).__name__}: {exc}"[:2000]
    call.logger.error("reconcile of %s failed: %s", job.name, error, exc_info=exc)
    creating = not st.children_ok and not conditions.is_true(call.conditions(), c.COND_CREATED)
    if not transient(exc) and (creating or st.failures >= MAX_FAILURES):
        removed = _remove_children(call)
        message = (f"the operator could not {'create' if creating else 'run'} this job: {error}. "
                   f"Retrying cannot help; {removed}")
        call.event("Warning", c.REASON_RECONCILE_ERROR, message)
        call.set_condition(c.COND_RECONCILED, False, c.REASON_RECONCILE_ERROR, message)
        call.set_condition(c.COND_FAILED, True, c.REASON_RECONCILE_ERROR, message)
        call.patch.status.update({"phase": c.PHASE_FAILED, "completionTime": _now()})
        return
    delay = min(call.ctx.settings.tick_s * 2 ** (st.failures - 1), MAX_BACKOFF_S)
    st.retry_at = time.monotonic() + delay
    message = f"{error} (try {st.failures}; next in {delay:.0f}s)"
    old = conditions.find(call.conditions(), c.COND_RECONCILED)
    if old is None or old.get("status") != "False" or not str(old.get("message", "")).startswith(error):
        call.event("Warning", c.REASON_RECONCILE_ERROR, message)
    call.set_condition(c.COND_RECONCILED, False, c.REASON_RECONCILE_ERROR, message)


def _remove_children(call: Call) -> str:
    """Delete every child of this job that it controls; say what happened, for the message."""
    try:
        gone = call.ctx.kube.delete_children(call.job.namespace, call.job)
    except Exception as exc:  # noqa: BLE001 -- said in the message; the garbage collector removes them with the job
        return f"removing its objects failed ({type(exc).__name__}: {exc}); they go when the job is deleted"
    return f"removed what was created for it ({', '.join(gone)})" if gone else "nothing was created for it"


def ensure_children(call: Call, spec: JobSpec) -> bool:
    """Every child is first created as a dry run and the namespace's quotas checked against the
    whole job, so that a refusal (RBAC, Pod Security, RuntimeClass, quota, a leftover namesake)
    is reported on the job and nothing is left half-created; then created for real."""
    st = call.state
    if st.children_ok:
        # A tick that read the job before this condition was stored rewrites the conditions
        # without it (timers run beside the create handler): put it back rather than lose it.
        # (A False one, a refusal by the reconcile, stays as _blocked wrote it.)
        if conditions.find(call.status.get("conditions") or [], c.COND_CREATED) is None:
            call.set_condition(c.COND_CREATED, True, c.REASON_CREATED, _CREATED)
        return True
    kube, job = call.ctx.kube, call.job
    try:
        objs = builders.children(job, spec, call.ctx.settings)
        for obj in objs:
            kube.create(obj, dry_run=True)
        _check_quota(kube, job, objs)
        _tokens(call, spec)
        kube.create(builders.config_map(job, spec))
        for svc in builders.services(job, spec):
            kube.create(svc)
    except (Refused, NotOurs, QuotaShortfall) as exc:
        _blocked(call, exc)
        return False
    st.children_ok = True
    call.set_condition(c.COND_CREATED, True, c.REASON_CREATED, _CREATED)
    return True


_CREATED = "Secret, ConfigMap and Service exist; pods are created and kept by every tick"


def _check_quota(kube: Kube, job: JobRef, objs: list[builders.Obj]) -> None:
    """Raises QuotaShortfall when the job's children not yet created do not fit a quota together."""
    quotas = kube.list_quotas(job.namespace)
    if not quotas:
        return
    existing = {p["metadata"]["name"] for p in kube.list_pods(job.namespace, job.name, job.uid)}
    pods = [o for o in objs if o["kind"] == "Pod" and o["metadata"]["name"] not in existing]
    others: dict[str, int] = {}
    if not existing:  # a job seen for the first time: its Secrets, ConfigMap and Service are new too
        others = {"secrets": 2, "configmaps": 1, "services": len([o for o in objs if o["kind"] == "Service"])}
    short = quota.shortfalls(quotas, quota.job_demand(pods, others))
    if short:
        raise QuotaShortfall(short)


def _guarded_reconcile(call: Call, spec: JobSpec) -> None:
    try:
        _reconcile(call, spec)
    except (Refused, NotOurs, QuotaShortfall) as exc:
        _blocked(call, exc)
        return
    # A refusal of an earlier tick (say, a pod's namesake still terminating) has cleared.
    created = conditions.find(call.conditions(), c.COND_CREATED)
    if created is not None and created.get("status") == "False":
        call.set_condition(c.COND_CREATED, True, c.REASON_CREATED, _CREATED)


def _blocked(call: Call, exc: Exception) -> None:
    """A refusal becomes a condition and a Warning event (once per change), and is retried next tick."""
    reason, message = refusal_message(exc, call.job)
    call.logger.warning("%s", message)
    old = conditions.find(call.conditions(), c.COND_CREATED)
    if old is None or old.get("reason") != reason or old.get("message") != message:
        call.event("Warning", reason, message)
    call.set_condition(c.COND_CREATED, False, reason, message)
    call.patch.status.setdefault("phase", call.status.get("phase") or c.PHASE_PENDING)


def refusal_message(exc: Exception, job: JobRef) -> tuple[str, str]:
    """(reason, message) that tell a cluster user what was refused, why, and what to change."""
    if isinstance(exc, NotOurs):
        return c.REASON_NAME_CONFLICT, (
            f"{exc}. Another object holds a name this job needs (children are named <job>-<device>, "
            "<job>-server, <job>-shard-<index>, <job>-tokens, <job>-tls, <job>-config): rename the job or the device.")
    if isinstance(exc, QuotaShortfall):
        return c.REASON_QUOTA, (
            f"the namespace's ResourceQuota cannot hold the whole job: {'; '.join(exc.lines)}. "
            "Nothing was created for this job: lower its resources or ask for a larger quota.")
    assert isinstance(exc, Refused)
    return refusals.explain(exc.refusal, job.namespace)


def _valid_spec(call: Call, raw_spec: Mapping[str, Any]) -> Optional[JobSpec]:
    """The typed spec; or None after marking the job Failed with every problem found."""
    settings = call.ctx.settings
    parsed, problems = validation.validate(call.job.name, raw_spec, settings)
    if parsed is not None and not problems:
        return parsed
    message = "; ".join(problems)
    refused = parsed is not None and bool(validation.policy_problems(parsed, settings))
    reason = c.REASON_NOT_ALLOWED if refused else c.REASON_INVALID_SPEC
    call.logger.warning("invalid spec, nothing created: %s", message)
    if call.status.get("phase") != c.PHASE_FAILED:
        call.event("Warning", reason, f"invalid spec, nothing created: {message}")
    call.set_condition(c.COND_SPEC_VALID, False, reason, message)
    call.set_condition(c.COND_FAILED, True, reason, message)
    call.patch.status.update({"phase": c.PHASE_FAILED, "observedGeneration": call.meta.get("generation"),
                              "completionTime": _now()})
    return None


def _tokens(call: Call, spec: JobSpec) -> dict[str, str]:
    """Made once, kept in the Secret: a resumed operator reads them back instead of inventing new ones."""
    st, kube, job = call.state, call.ctx.kube, call.job
    if st.tokens:
        return st.tokens
    existing = kube.read_secret(job.namespace, job.secret_name)
    if existing is not None and kube_controller_uid(existing) != job.uid:
        raise NotOurs(f"Secret {job.secret_name} belongs to another owner (a deleted job of the same name?); "
                      "waiting for the garbage collector to remove it")
    values = builders.tokens(spec, builders.decode_secret(existing or {}), lambda: secrets.token_urlsafe(32))
    if existing is None and not kube.create(builders.tokens_secret(job, values)):
        # Someone (an earlier run of this handler) was faster: theirs are the tokens in use.
        values = builders.decode_secret(kube.read_secret(job.namespace, job.secret_name) or {})
    st.tokens = values
    return values


def _tls(call: Call, spec: JobSpec, reread: bool = False) -> None:
    """The job's TLS Secret (tls.py), made once: a create that finds one keeps it. Its CA goes
    into the job's state, to check the server's certificate. Re-read whenever pods are
    (re)created, so a Secret deleted to rotate is made anew before the new pods mount it."""
    st, kube, job = call.state, call.ctx.kube, call.job
    if st.tls is not None and not reread:
        return
    existing = kube.read_secret(job.namespace, job.tls_secret_name)
    if existing is not None and kube_controller_uid(existing) != job.uid:
        raise NotOurs(f"Secret {job.tls_secret_name} belongs to another owner (a deleted job of the same name?); "
                      "waiting for the garbage collector to remove it")
    if existing is None:
        made = tls.secret(job, spec)
        existing = made if kube.create(made) else kube.read_secret(job.namespace, job.tls_secret_name) or made
    st.tls = ClientTls(ca_pem=tls.ca_pem(existing), server_name=job.server_host())


# --- the pods, as the index or a LIST shows them ----------------------------------------------

@kopf.index(*POD_RESOURCE, labels={c.LABEL_JOB: kopf.PRESENT})
async def job_pods(body: kopf.Body, **_: Any) -> dict[podindex.Key, reconcile.PodView]:
    """Every pod a job controls, by (namespace, job uid): what a tick reads instead of a LIST."""
    return podindex.entry(body)


def observed_pods(call: Call) -> list[reconcile.PodView]:
    """The job's pods: from the index once it shows this operator's last pod writes; else listed."""
    st, job = call.state, call.job
    indexed = podindex.view(call.pods_index, job.namespace, job.uid)
    if indexed is None:
        st.pending = podindex.PendingWrites()  # a LIST every time: nothing to wait for
        return list_pods(call, "no-index")
    behind = podindex.unseen(indexed, st.pending)
    if not behind:
        st.pending = behind
        return indexed
    listed = list_pods(call, "index-behind")
    st.pending = podindex.after_list(listed, behind)
    return listed


def list_pods(call: Call, reason: str) -> list[reconcile.PodView]:
    job = call.job
    call.ctx.metrics.pod_lists.labels(job.namespace, job.name, reason).inc()
    return [reconcile.PodView.of(p) for p in call.ctx.kube.list_pods(job.namespace, job.name, job.uid)]


# --- the tick --------------------------------------------------------------------------------

@kopf.timer(*RESOURCE, interval=ares_settings.tick_seconds(), initial_delay=ares_settings.tick_seconds())
def tick(name: str, namespace: str, uid: str, spec: Mapping[str, Any], status: Mapping[str, Any],
         meta: Mapping[str, Any], body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch,
         logger: logging.Logger, job_pods: Optional[kopf.Index] = None, **_: Any) -> None:
    began = time.perf_counter()
    call = Call.of(name, namespace, uid, status, meta, body, memo, patch, logger, job_pods)
    call.ctx.metrics.phase(namespace, name, status.get("phase"))
    if status.get("phase") in c.TERMINAL_PHASES:
        _finished(call, spec)
        return
    if call.state.retry_at is not None and time.monotonic() < call.state.retry_at:
        return  # backing off after an error
    if not call.state.lock.acquire(blocking=False):
        logger.debug("another handler of %s is at work; the next tick looks again", name)
        return
    try:
        reconcile_job(call, spec)
    finally:
        call.state.lock.release()
    call.ctx.metrics.phase(namespace, name, patch.status.get("phase") or status.get("phase"))
    call.ctx.metrics.tick_seconds.labels(namespace, name).observe(time.perf_counter() - began)


@kopf.on.update(*RESOURCE, field="spec")
def spec_changed(name: str, namespace: str, uid: str, spec: Mapping[str, Any], status: Mapping[str, Any],
                 meta: Mapping[str, Any], body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch,
                 logger: logging.Logger, job_pods: Optional[kopf.Index] = None, **_: Any) -> None:
    """Pinned splits, power modes and bandwidth caps reach the pods now, not at the next tick.
    (Every other field is immutable, or read by each tick: the CRD refuses edits nothing applies.)"""
    if status.get("phase") in c.TERMINAL_PHASES:
        patch.status["observedGeneration"] = meta.get("generation")  # seen; nothing left to change
        return
    call = Call.of(name, namespace, uid, status, meta, body, memo, patch, logger, job_pods)
    parsed, problems = validation.validate(name, spec, call.ctx.settings)
    if parsed is None or problems:
        return  # the next tick marks it Failed
    try:
        with call.state.lock:
            annotate(call, parsed, observed_pods(call))
    except Exception as exc:  # noqa: BLE001 -- the next tick applies them again; said on the job now
        _error(call, exc)


def _reconcile(call: Call, spec: JobSpec) -> None:
    kube, job, st, status = call.ctx.kube, call.job, call.state, call.status
    ours = call.ctx.settings
    # Read before the pods are listed: a pod seen by a concurrent call is then in this listing too.
    seen = st.server_seen if st.server_seen is not None else job_status.server_ran(status)
    shards_seen = st.shards_seen if st.shards_seen is not None else job_status.shards_seen(status)
    pods = observed_pods(call)
    devices_status = job_status.devices_by_name(status)
    restarts = {d.name: max(int((devices_status.get(d.name) or {}).get("restarts") or 0),
                            st.restarts.get(d.name, 0)) for d in spec.devices}
    server_restarts = max(int(status.get("serverRestarts") or 0), st.server_restarts)
    recorded = job_status.shard_restarts(status)
    shard_restarts = {i: max(recorded.get(i, 0), st.shard_restarts.get(i, 0)) for i in reconcile.shard_indexes(spec)}
    splits = reconcile.desired_splits(spec, st.planned)
    options = reconcile.desired_options(spec, st.planned_options)
    actions = reconcile.plan_pods(job, spec, ours, pods, restarts, server_restarts, splits, options, seen,
                                  shard_restarts, shards_seen)
    _tls(call, spec, reread=bool(actions.create))  # before any pod that mounts it
    st.restarts, st.server_restarts = dict(actions.restarts), actions.server_restarts
    st.server_seen = actions.server_seen
    st.shard_restarts, st.shards_seen = dict(actions.shard_restarts), actions.shards_seen
    for note in actions.notes:
        call.logger.info(note)
    for reason, message in job_status.capped_events([(c.REASON_PODS_REPLACED, n) for n in actions.notes],
                                                    EVENTS_PER_TICK):
        call.event("Warning", reason, message)
    delete_pods(call, pods, actions.delete)
    for obj in actions.create:
        if kube.create(obj):
            call.logger.info("created pod %s", obj["metadata"]["name"])
        st.pending = st.pending.add(created=[obj["metadata"]["name"]])  # made now or before: the index must show it
    if actions.delete or actions.create:
        pods = list_pods(call, "after-changes")
        st.pending = podindex.after_list(pods, st.pending)
    st.pod_problems, stuck = job_status.problem_events(pods, st.pod_problems)
    for reason, message in stuck:  # a container the kubelet cannot start: once, when it appears
        call.logger.warning("%s", message)
    for reason, message in job_status.capped_events(stuck, EVENTS_PER_TICK):
        call.event("Warning", reason, message)

    server = server_status(call, pods) if not actions.outcome else None
    if server is not None and server.phase in ("waiting", "training") and spec.split.mode == "adaptive":
        optimise(call, spec)
    annotate(call, spec, pods)

    outcome = (actions.outcome or reconcile.deadline_outcome(spec, status.get("startTime"), _utcnow())
               or reconcile.training_outcome(server))
    cleaned: tuple[str, ...] = ()
    if outcome is not None:
        cleaned = reconcile.pods_to_clean(spec, pods, outcome)  # runPolicy.cleanPodPolicy
        delete_pods(call, pods, cleaned)
        call.logger.info("job %s: %s (%s)", outcome.phase, outcome.reason, outcome.message)
    new = _status(call, spec, pods, server, actions, outcome, cleaned)
    if new.get("phase") != status.get("phase"):
        _phase_event(call, new, outcome)
    changed = {k: job_status.merge_patch(status.get(k), v) for k, v in new.items() if status.get(k) != v}
    if changed:
        call.patch.status.update(changed)


def delete_pods(call: Call, pods: list[reconcile.PodView], names: tuple[str, ...]) -> None:
    """Delete these pods, each the very pod seen (its uid as precondition), and remember them until
    the index shows them going."""
    uids = {p.name: p.uid for p in pods}
    for pod_name in names:
        call.ctx.kube.delete_pod(call.job.namespace, pod_name, uids.get(pod_name, ""))
        call.state.pending = call.state.pending.add(deleted=[uids.get(pod_name, "")])


def _phase_event(call: Call, new: Mapping[str, Any], outcome: Optional[reconcile.Outcome]) -> None:
    """Every phase transition is an Event on the job (`kubectl describe aresjob` shows them)."""
    phase = new.get("phase")
    if outcome is not None:
        call.event("Normal" if phase == c.PHASE_SUCCEEDED else "Warning", outcome.reason, f"{phase}: {outcome.message}")
    else:
        call.event("Normal", str(phase), f"job is {phase}: round {new.get('progress', '?')}")


def server_status(call: Call, pods: list[reconcile.PodView]) -> Optional[ServerStatus]:
    from ares.runtime import controller  # the same controller code the local runner uses

    job, st = call.job, call.state
    server_pod = next((p for p in pods if p.name == job.server_name), None)
    if server_pod is None or server_pod.phase != "Running" or server_pod.terminating:
        return None
    try:
        found = controller.fetch_status(_url(call), st.tokens[CONTROLLER_TOKEN_NAME],
                                        call.ctx.settings.server.timeout_s, tls=st.tls)
    except Exception as exc:  # noqa: BLE001 -- a server still starting or restarting: read it again next tick
        if explain(exc) is not None:  # rotated? the next tick reads the Secret again
            call.logger.warning("server of %s refused over TLS: %s", job.name, explain(exc))
            st.tls = None
        call.logger.debug("server of %s not readable yet: %s", job.name, exc)
        if not server_pod.started:  # still loading (its startup probe allows it minutes): not unreachable
            st.unreachable_since = None
        elif st.unreachable_since is None:
            st.unreachable_since = time.monotonic()
        st.unreachable_error = f"{type(exc).__name__}: {exc}"[:500]
        return None
    st.unreachable_since = None
    return found


def optimise(call: Call, spec: JobSpec) -> None:
    """Telemetry -> optimiser -> plan in the job's state, at most every split.reoptimiseIntervalSeconds.

    With a training.offer the policy also chooses each device's (codec, micro-batches), as the
    local runner's controller does (the same `decide`); with split.choosePowerModes, each Jetson's
    power mode (a switch its host reports failed is an Event; the plan keeps the mode in force)."""
    from ares.core.optimiser import parse_policy
    from ares.runtime import controller

    st, job = call.state, call.job
    if st.optimised_at is not None and time.monotonic() - st.optimised_at < spec.split.reoptimise_interval_seconds:
        return
    try:
        telemetry = controller.fetch_columns(_url(call), st.tokens[CONTROLLER_TOKEN_NAME],
                                             call.ctx.settings.server.timeout_s, tls=st.tls)
    except Exception as exc:  # noqa: BLE001 -- not serving telemetry yet: ask again next tick
        call.logger.debug("telemetry of %s not readable yet: %s", job.name, exc)
        return
    began = time.perf_counter()
    offer = spec.training.offer_pairs()
    modes = spec.split.choose_power_modes
    plan = controller.decide(telemetry, parse_policy(spec.split.policy, spec.split.alpha, spec.split.share_server),
                             builders.pinned_splits(spec), offer, modes, builders.pinned_modes(spec))
    call.ctx.metrics.optimised(job.namespace, job.name, time.perf_counter() - began)
    if modes:
        power_mode_events(call, telemetry)
    if plan is None:
        return  # not enough measurements yet; ask again next tick
    st.optimised_at = time.monotonic()
    splits = dict(plan.splits)
    options = controller.plan_options(plan) if offer else {}
    if splits != st.planned or options != st.planned_options:
        call.logger.info("new split plan for %s: %s%s", job.name, splits,
                         f", step options {options}" if options else "")
    st.planned, st.planned_options = splits, options
    st.planned_modes = controller.plan_modes(plan) if modes else {}


def power_mode_events(call: Call, telemetry: TelemetryColumns) -> None:
    """A Warning Event per device and mode its host-control sidecar could not switch to (once each)."""
    problems = {(name, mode, in_force): problem for name, mode, in_force, problem in zip(
        telemetry.name, telemetry.power_mode_failed, telemetry.power_mode, telemetry.power_mode_problem) if mode}
    failed = frozenset(problems)
    for name, mode, in_force in sorted(failed - call.state.mode_failures):
        problem = problems[(name, mode, in_force)]
        call.event("Warning", "PowerModeNotApplied",
                   f"device {name}: power mode {mode} could not be applied ({problem or 'no reason given'}); "
                   f"planning for the mode in force, {in_force or 'unknown'}"[:1000])
    call.state.mode_failures = frozenset(failed)


class AnnotationSink:
    """The operator's `SplitSink`: splits become the pods' `ares.io/split-point` annotations,
    and (a job with a training.offer) each device's step options `ares.io/step-options`.

    It writes the host-control annotations from the spec (power mode, bandwidth) at the same
    time, and only what differs from what the pods (as last seen) already carry: one patch per
    pod whose values change, none for the others. `written` hears of each patch made.
    """

    def __init__(self, kube: Kube, job: JobRef, spec: JobSpec, pods: list[reconcile.PodView],
                 logger: logging.Logger, written: Optional[Callable[[str, Mapping[str, str]], None]] = None):
        self.kube, self.job, self.spec, self.pods, self.logger = kube, job, spec, pods, logger
        self.written = written

    def write(self, splits: Mapping[str, int], options: Mapping[str, tuple[str, int]] | None = None,
              modes: Mapping[str, str] | None = None) -> dict[str, int]:
        """Returns, per device, the split it is changed to (only those that change)."""
        changed: dict[str, int] = {}
        by_name = {p.name: p for p in self.pods}
        for pod_name, values in reconcile.annotation_patches(self.spec, self.job, self.pods, splits, options,
                                                             modes).items():
            self.logger.info("annotating %s: %s", pod_name, values)
            self.kube.annotate_pod(self.job.namespace, pod_name, values)
            if self.written is not None:
                self.written(pod_name, values)
            if c.ANNOTATION_SPLIT in values:
                changed[by_name[pod_name].device] = int(values[c.ANNOTATION_SPLIT])
        return changed


def annotate(call: Call, spec: JobSpec, pods: list[reconcile.PodView]) -> None:
    """What differs from `pods`, patched; each patch remembered until the index shows it."""
    st, job = call.state, call.job

    def written(pod_name: str, values: Mapping[str, str]) -> None:
        st.pending = st.pending.add(annotated=[(pod_name, k, v) for k, v in values.items()])

    changed = AnnotationSink(call.ctx.kube, job, spec, pods, call.logger, written).write(
        reconcile.desired_splits(spec, st.planned), reconcile.desired_options(spec, st.planned_options),
        reconcile.desired_modes(spec, st.planned_modes))
    for device in changed:
        call.ctx.metrics.split_changes.labels(job.namespace, job.name, device).inc()


def _url(call: Call) -> str:
    return call.ctx.settings.server.url(call.job.name, call.job.namespace)


def _status(call: Call, spec: JobSpec, pods: list[reconcile.PodView], server: Optional[ServerStatus],
            actions: reconcile.Actions, outcome: Optional[reconcile.Outcome],
            cleaned: tuple[str, ...]) -> dict[str, Any]:
    now, gen, status, st, job = _now(), call.meta.get("generation"), call.status, call.state, call.job
    new = job_status.summary(job, spec, pods, server, status, actions.restarts, actions.server_restarts,
                             st.devices)
    conds = status.get("conditions") or []
    conds = conditions.set_condition(conds, c.COND_SPEC_VALID, True, c.REASON_VALID, "spec accepted", now, gen)
    since = st.unreachable_since
    server_pod = next((p for p in pods if p.name == job.server_name), None)
    ok, reason, message = job_status.server_condition(server, None if since is None else time.monotonic() - since,
                                                      st.unreachable_error, c.SERVER_UNREACHABLE_AFTER_S, server_pod)
    conds = conditions.set_condition(conds, c.COND_SERVER_READY, ok, reason, message, now, gen)
    ok, reason, message = job_status.devices_condition(job, spec, pods, actions.gave_up)
    conds = conditions.set_condition(conds, c.COND_DEVICES_READY, ok, reason, message, now, gen)
    if spec.split.mode == "adaptive":
        planned = st.planned
        conds = conditions.set_condition(conds, c.COND_SPLITS_APPLIED, bool(planned),
                                         c.REASON_PLAN_APPLIED if planned else c.REASON_PLAN_PENDING,
                                         job_status.split_message(planned, st.planned_options) if planned
                                         else "waiting for measurements", now, gen)
    if spec.server.shards > 1:
        new["shards"] = job_status.shards(job, spec, pods, actions.shard_restarts)
    new["observedGeneration"] = gen
    if outcome is None:
        new["phase"] = job_status.phase(server, status.get("phase"))
    else:
        new["phase"] = outcome.phase
        new["completionTime"] = now
        kind = c.COND_SUCCEEDED if outcome.phase == c.PHASE_SUCCEEDED else c.COND_FAILED
        conds = conditions.set_condition(conds, kind, True, outcome.reason, outcome.message, now, gen)
        conds = job_status.ended_conditions(spec, conds, outcome, cleaned, now, gen)
        new["devices"] = job_status.ended_devices(job, new["devices"], cleaned)
        new["devicesReady"] = 0
        new["ready"] = f"0/{new.get('devicesTotal', len(spec.devices))}"
        if outcome.phase == c.PHASE_SUCCEEDED and server is not None:
            new["round"] = server.rounds
            new["progress"] = f"{server.rounds}/{server.rounds}"
    new["conditions"] = conds
    if outcome is None:  # runPolicy.suspend: phase Suspended, or resumed (startTime restarts)
        new.update(job_status.suspension(spec, status, conds, now, gen))
    st.devices = {entry["name"]: entry for entry in new["devices"]}
    new.update(job_status.bounded(new["devices"]))  # every device counted, the worst listed
    return new


# --- after the end ---------------------------------------------------------------------------

def _finished(call: Call, raw_spec: Mapping[str, Any]) -> None:
    """A finished job: its devices' pod phases followed until their pods are done, then nothing
    but runPolicy.ttlSecondsAfterFinished."""
    job, status = call.job, call.status
    devices = [{"name": name, **entry} for name, entry in job_status.devices_by_name(status).items()]
    counts = status.get("deviceSummary") or {}
    if any(d.get("podPhase") in job_status.LIVE_POD_PHASES for d in devices) or \
            job_status.LIVE_POD_PHASES & set(counts.get("podPhases") or {}):
        try:
            pods = observed_pods(call)
        except Exception as exc:  # noqa: BLE001 -- a courtesy: the job's outcome is already recorded
            call.logger.debug("pods of finished job %s not listed: %s", job.name, exc)
        else:
            followed = job_status.followed_devices(job, devices, pods)
            if followed != status.get("devices"):
                call.patch.status["devices"] = followed
            if counts:
                names = [d.get("name") for d in raw_spec.get("devices") or [] if isinstance(d, Mapping)]
                summary = job_status.followed_summary(job, [n for n in names if n], followed, counts, pods)
                if summary != counts:
                    call.patch.status["deviceSummary"] = job_status.merge_patch(counts, summary)
    _expire(job, raw_spec, status, call.ctx.kube)


def _expire(job: JobRef, spec: Mapping[str, Any], status: Mapping[str, Any], kube: Kube) -> None:
    """runPolicy.ttlSecondsAfterFinished: delete the finished job; its children go with it."""
    ttl = (spec.get("runPolicy") or {}).get("ttlSecondsAfterFinished")
    ended = reconcile.parse_time(status.get("completionTime") or "")
    if ttl is None or ended is None:
        return
    if _utcnow() - ended >= datetime.timedelta(seconds=int(ttl)):
        kube.delete_job(job.namespace, job.name)
