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
