"""Shared fixtures: real server processes; the control-plane plugin. Helpers: tests/support.py."""

from __future__ import annotations

import pytest

from ares.core.config import ServerConfig
from tests.support import ServerProcess

# The real control plane, namespace and kubectl fixtures (tests/cluster/fixtures.py), here so
# that tests/k8s and tests/images share one session control plane.
pytest_plugins = ["cluster.fixtures"]


@pytest.fixture
def server_process(tmp_path):
    started = []

    def start(cfg: ServerConfig) -> ServerProcess:
        started.append(ServerProcess(cfg, tmp_path))
        return started[-1]

    yield start
    for s in started:
        s.stop()


# The steps of a class marked `steps` run in order on one job: after a failed step the rest are
# skipped (they would fail for its reason, not theirs).
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> None:
    if call.excinfo is not None and call.when == "call" and item.get_closest_marker("steps") and item.cls:
        item.cls.failed_step = item.name


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("steps") and item.cls and getattr(item.cls, "failed_step", None):
        pytest.skip(f"an earlier step failed: {item.cls.failed_step}")
