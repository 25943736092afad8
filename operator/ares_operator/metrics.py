"""The operator's own Prometheus metrics, served on a port of their own.

Jobs by phase, reconcile errors, optimiser runs and how long they took, split changes written to
pods, how long each tick took, and the ticks that listed a job's pods rather than read the pod
index. One `OperatorMetrics` per operator start, with its own registry, so a restarted operator
(in a test, in one process) registers nothing twice; the handlers reach it through the memo.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import start_http_server

from ares_operator import constants as c

log = logging.getLogger("ares_operator.metrics")
PHASES = (c.PHASE_PENDING, c.PHASE_RUNNING, c.PHASE_SUSPENDED, c.PHASE_SUCCEEDED, c.PHASE_FAILED)


class _Phases:
    """A collector over the last phase seen per job: `ares_operator_jobs{phase}` (every phase,
    zeros included) and `ares_operator_job_phase{namespace,job,phase}` (1 for the job's phase)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.phases: dict[tuple[str, str], str] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self.lock:
            phases = dict(self.phases)
        jobs = GaugeMetricFamily("ares_operator_jobs", "AresTrainingJobs by phase", labels=["phase"])
        for phase in PHASES:
            jobs.add_metric([phase], sum(1 for p in phases.values() if p == phase))
        one = GaugeMetricFamily("ares_operator_job_phase", "1 for the phase each AresTrainingJob is in",
                                labels=["namespace", "job", "phase"])
        for (namespace, job), phase in sorted(phases.items()):
            one.add_metric([namespace, job, phase], 1)
        yield jobs
        yield one


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._phases = _Phases()
        self.registry.register(self._phases)
        self.reconcile_errors = Counter(
            "ares_operator_reconcile_errors", "Reconcile ticks that raised, by job",
            ["namespace", "job"], registry=self.registry)
        self.optimiser_runs = Counter(
            "ares_operator_optimiser_runs", "Optimiser runs on fresh telemetry, by job",
            ["namespace", "job"], registry=self.registry)
        self.optimiser_seconds = Histogram(
            "ares_operator_optimiser_duration_seconds", "Wall time of one optimiser run",
            ["namespace", "job"], registry=self.registry,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
        self.split_changes = Counter(
            "ares_operator_split_changes", "Split points changed on device pods, by job and device",
            ["namespace", "job", "device"], registry=self.registry)
        self.tick_seconds = Histogram(
            "ares_operator_tick_duration_seconds", "Wall time of one reconcile tick (its status patch is kopf's, after it)",
            ["namespace", "job"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0))
        self.pod_lists = Counter(
            "ares_operator_pod_lists", "LISTs of a job's pods, by why the pod index was not read instead: "
            "no-index (none kept), index-behind (it does not show the operator's last writes yet), "
            "after-changes (pods were just created or deleted)",
            ["namespace", "job", "reason"], registry=self.registry)
        self._server: Any = None

    # --- what the handlers call --------------------------------------------------------------

    def phase(self, namespace: str, job: str, phase: Optional[str]) -> None:
        if phase:
            with self._phases.lock:
                self._phases.phases[(namespace, job)] = phase

    def forget(self, namespace: str, job: str) -> None:
        """A deleted job leaves every series."""
        with self._phases.lock:
            self._phases.phases.pop((namespace, job), None)
        for metric in (self.reconcile_errors, self.optimiser_runs, self.optimiser_seconds, self.tick_seconds):
            try:
                metric.remove(namespace, job)
            except KeyError:
                pass
        for metric in (self.split_changes, self.pod_lists):
            for labels in [k for k in _label_sets(metric) if k[:2] == (namespace, job)]:
                metric.remove(*labels)

    def optimised(self, namespace: str, job: str, seconds: float) -> None:
        self.optimiser_runs.labels(namespace, job).inc()
        self.optimiser_seconds.labels(namespace, job).observe(seconds)

    def splits_changed(self, namespace: str, job: str, old: Mapping[str, str], new: Mapping[str, int]) -> None:
        """Count devices whose split annotation is about to change (old: as on the pod)."""
        for device, split in new.items():
            if old.get(device) != str(split):
                self.split_changes.labels(namespace, job, device).inc()

    # --- serving -----------------------------------------------------------------------------

    def serve(self, port: int, address: str = "0.0.0.0") -> Optional[int]:
        """Serve /metrics on `port` (0: not at all). Returns the port, or None when not serving;
        a port in use is logged, not fatal (the operator's work matters more than its metrics)."""
        if not port:
            return None
        try:
            self._server, _ = start_http_server(port, address, registry=self.registry)
        except OSError as exc:
            log.error("operator metrics not served: cannot listen on %s:%d: %s", address, port, exc)
            return None
        log.info("operator metrics on http://%s:%d/metrics", address, port)
        return port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _label_sets(metric: Any) -> list[tuple[str, ...]]:
    return list(getattr(metric, "_metrics", {}).keys())
