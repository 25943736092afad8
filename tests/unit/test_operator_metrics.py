"""The operator's own Prometheus metrics: what they expose, what a deleted job leaves, how they are served."""

from __future__ import annotations

import socket

import httpx
from prometheus_client import generate_latest

from ares_operator.metrics import OperatorMetrics


def sample(m: OperatorMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_jobs_by_phase_and_per_job_phase():
    m = OperatorMetrics()
    m.phase("lab", "a", "Running")
    m.phase("lab", "b", "Running")
    m.phase("lab", "b", "Succeeded")  # the last phase seen wins
    m.phase("lab", "c", None)         # no phase yet: not counted
    assert sample(m, "ares_operator_jobs", phase="Running") == 1
    assert sample(m, "ares_operator_jobs", phase="Succeeded") == 1
    assert sample(m, "ares_operator_jobs", phase="Failed") == 0  # every phase is always there
    assert sample(m, "ares_operator_job_phase", namespace="lab", job="b", phase="Succeeded") == 1
    assert sample(m, "ares_operator_job_phase", namespace="lab", job="b", phase="Running") is None


def test_optimiser_split_changes_errors_and_forget():
    m = OperatorMetrics()
    m.optimised("lab", "a", 0.004)
    m.optimised("lab", "a", 0.2)
    m.split_changes.labels("lab", "a", "pi").inc()
    m.reconcile_errors.labels("lab", "a").inc()
    m.phase("lab", "a", "Running")
    assert sample(m, "ares_operator_optimiser_runs_total", namespace="lab", job="a") == 2
    assert sample(m, "ares_operator_optimiser_duration_seconds_count", namespace="lab", job="a") == 2
    assert sample(m, "ares_operator_optimiser_duration_seconds_bucket", namespace="lab", job="a", le="0.005") == 1
    assert sample(m, "ares_operator_split_changes_total", namespace="lab", job="a", device="pi") == 1
    assert sample(m, "ares_operator_reconcile_errors_total", namespace="lab", job="a") == 1
    m.forget("lab", "a")
    text = generate_latest(m.registry).decode()
    assert 'job="a"' not in text and sample(m, "ares_operator_jobs", phase="Running") == 0


def test_served_on_its_own_port_and_a_busy_port_is_not_fatal():
    m = OperatorMetrics()
    m.phase("lab", "a", "Running")
    assert m.serve(0) is None  # 0: off
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        assert m.serve(port, "127.0.0.1") == port
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert 'ares_operator_job_phase{job="a",namespace="lab",phase="Running"} 1.0' in text
        assert OperatorMetrics().serve(port, "127.0.0.1") is None  # in use: logged, not raised
    finally:
        m.close()
    again = OperatorMetrics()  # freed by close(): a restarted operator binds it again
    assert again.serve(port, "127.0.0.1") == port
    again.close()
