"""Let go of jobs the operator will no longer look after, so that none is left orphaned.

kopf holds a finalizer on every job it handles. Two things would leave that finalizer with no
operator to remove it (and `kubectl delete aresjob` or `kubectl delete namespace` hanging):

- `watchNamespaces` narrowed: at start-up the operator releases the jobs of namespaces it no
  longer watches. It may no longer touch their pods, so it reports instead: condition
  Reconciled=False, reason NamespaceNotWatched, a Warning Event, and the finalizer removed
  (deleting the job then removes its pods through their owner references).
- the operator uninstalled: the chart's pre-delete hook runs `python -m ares_operator.release
  --stop` first, which ends every running job of the watched namespaces cleanly: its pods
  deleted, phase Failed with reason OperatorUninstalled, the finalizer removed.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from kubernetes.client.rest import ApiException

from ares_operator import conditions
from ares_operator import constants as c
from ares_operator.builders import JobRef
from ares_operator.kube import Kube, load_config

log = logging.getLogger(__name__)


def _ref(job: Mapping[str, Any]) -> JobRef:
    meta = job["metadata"]
    return JobRef(meta["name"], meta["namespace"], meta["uid"])


def held(job: Mapping[str, Any]) -> bool:
    return c.FINALIZER in (job.get("metadata", {}).get("finalizers") or [])


def release_unwatched(kube: Kube, watched: Sequence[str], now: str) -> list[JobRef]:
    """Release every job this operator holds outside `watched`; the jobs released."""
    try:
        jobs = kube.list_jobs(None)
    except ApiException as exc:  # RBAC without the cluster-wide read: nothing to do but say so
        log.warning("cannot list AresTrainingJobs in all namespaces (%s); jobs of namespaces no longer "
                    "watched keep their finalizer", exc.reason)
        return []
    released = []
    for job in jobs:
        if job["metadata"]["namespace"] in watched or not held(job):
            continue
        message = (f"the operator no longer watches namespace {job['metadata']['namespace']} (chart value "
                   "watchNamespaces): this job is not managed any more and its pods may still run. Delete the "
                   "job (its pods go with it), or watch the namespace again to resume it.")
        _report(kube, job, c.REASON_NOT_WATCHED, message, now)
        kube.remove_finalizer(job, c.FINALIZER)
        released.append(_ref(job))
    return released


def stop_all(kube: Kube, namespaces: Optional[Sequence[str]], now: str) -> list[JobRef]:
    """End every job held in `namespaces` (None: all): pods deleted, Failed, finalizer removed."""
    jobs = kube.list_jobs(None) if not namespaces else [j for ns in namespaces for j in kube.list_jobs(ns)]
    stopped = []
    for job in jobs:
        if not held(job):
            continue
        ref = _ref(job)
        if (job.get("status") or {}).get("phase") not in c.TERMINAL_PHASES:
            removed = kube.delete_children(ref.namespace, ref)
            message = ("the ARES operator was uninstalled while this job ran: it was stopped "
                       f"({', '.join(removed) or 'no objects'} removed). Reinstall the chart and create it again.")
            _report(kube, job, c.REASON_OPERATOR_REMOVED, message, now, failed=True)
        kube.remove_finalizer(job, c.FINALIZER)
        stopped.append(ref)
    return stopped


def _report(kube: Kube, job: Mapping[str, Any], reason: str, message: str, now: str, failed: bool = False) -> None:
    status = job.get("status") or {}
    generation = job["metadata"].get("generation")
    conds = conditions.set_condition(status.get("conditions") or [], c.COND_RECONCILED, False, reason, message,
                                     now, generation)
    patch: dict[str, Any] = {}
    if failed:
        conds = conditions.set_condition(conds, c.COND_FAILED, True, reason, message, now, generation)
        patch.update(phase=c.PHASE_FAILED, completionTime=now)
    patch["conditions"] = conds
    kube.patch_job_status(job["metadata"]["namespace"], job["metadata"]["name"], patch)
    kube.post_event(job, "Warning", reason, message)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ares_operator.release", description=(
        "End the AresTrainingJobs this operator holds, before the operator is uninstalled: their pods "
        "are deleted, each is marked Failed (reason OperatorUninstalled) and its finalizer removed."))
    parser.add_argument("--stop", action="store_true", help="do it (without this flag, only list the jobs)")
    parser.add_argument("--namespace", action="append", default=[],
                        help="a namespace to release (repeatable; default ARES_WATCH_NAMESPACES, else all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ares_operator.settings import from_env

    namespaces = args.namespace or list(from_env().watch_namespaces) or None
    load_config()
    kube = Kube()
    if not args.stop:
        jobs = kube.list_jobs(None) if not namespaces else [j for ns in namespaces for j in kube.list_jobs(ns)]
        for job in jobs:
            if held(job):
                print(f"{job['metadata']['namespace']}/{job['metadata']['name']}")
        return 0
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for ref in stop_all(kube, namespaces, now):
        print(f"released {ref.namespace}/{ref.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
