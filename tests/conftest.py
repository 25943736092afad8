"""Shared fixtures: real server processes; the control-plane plugin. Helpers: tests/support.py."""

from __future__ import annotations

import os

# The suite runs three workers and their servers, devices and pods on two cores: torch's OpenMP
# threads must not spin between parallel regions (a spinning process used several times the CPU
# of its work: bench/omp_contention.py). Read when torch loads OpenMP, so before any import of it;
# every process the suite starts inherits it (pods on the real nodes do not: they run as deployed).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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


# Parallel runs (pytest-xdist: the default run has three workers, `-n 0` one). Tests that share host state run in one worker,
# in order, as in a serial run; every other module runs whole in one worker, so its module- and
# class-scoped fixtures are made once. Groups by path (the scheduler sees node ids only):
# - nodes: the real nodes (their teardown checks the host's iptables and sysctls) and the image
#   tests (podman changes both);
# - cluster: the shared control plane's tests (the operator, the chart, and the operator image
#   run against it, so that one worker alone starts that control plane);
# - netns: whatever makes ares-* network namespaces and veths (tc links; the stopping tests
#   check that none is left, and the benches number their namespaces from the same indices).
#   The benches on in-process links make none, and run as any other module.
NETNS_MODULES = {"test_stopping.py"}
CLUSTER_MODULES = {"tests/images/test_operator_image.py"}


def xdist_group(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0]
    folder, _, name = module.rpartition("/")
    if module in CLUSTER_MODULES:
        return "cluster"
    if folder in ("tests/nodes", "tests/images"):
        return "nodes"
    if folder in ("tests/k8s", "tests/chart"):
        return "cluster"
    if folder == "tests/host" or name in NETNS_MODULES:
        return "netns"
    return module


# The longest groups first, so that the short modules fill the workers' ends (a worker takes its
# next group when it has two tests left): the three shared-state groups (longest first), then the
# modules of end-to-end runs (marked `slow`), then the rest, each in collection order. By number of
# tests (xdist's own order) the 3-minute modules of a few tests came last and made the run's tail.
HEAVY_GROUPS = ("cluster", "netns", "nodes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    slow = {xdist_group(item.nodeid) for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> int:
        group = xdist_group(item.nodeid)
        if group in HEAVY_GROUPS:
            return HEAVY_GROUPS.index(group)
        return len(HEAVY_GROUPS) + (0 if group in slow else 1)

    items.sort(key=rank)  # stable: each group's tests keep their order


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def __init__(self, config: pytest.Config, log=None) -> None:
            super().__init__(config, log)
            config.option.loadscopereorder = False  # the groups in collection order (above), not by size

        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid)

    return GroupScheduling(config, log)
