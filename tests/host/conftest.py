"""Fixtures for host tests: real network namespaces, real tc, real TCP transfers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

import pytest

from ares.runtime.netns import DeviceNamespace
from tests.support import host_skip_reason

TRANSFER = str(Path(__file__).with_name("transfer.py"))


def pytest_configure(config):
    config.addinivalue_line("markers", "ns_index(i): network namespace index for device_ns")


@pytest.fixture
def device_ns(request) -> DeviceNamespace:
    """A fresh namespace; the index comes from the test's ``ns_index`` marker or 200."""
    reason = host_skip_reason()
    if reason:
        pytest.skip(reason)
    marker = request.node.get_closest_marker("ns_index")
    with DeviceNamespace(marker.args[0] if marker else 200) as ns:
        yield ns


Wrap = Callable[[Sequence[str]], list]


@pytest.fixture
def measure_mbit() -> Callable[..., float]:
    """``measure_mbit(receiver_wrap, sender_wrap, host, port, seconds)`` -> Mbit/s."""
    return _measure_mbit


def _measure_mbit(
    receiver_wrap: Wrap, sender_wrap: Wrap, host: str, port: int, seconds: float
) -> float:
    """Send for ``seconds`` and return the rate the receiver saw, in Mbit/s."""
    recv = subprocess.Popen(
        receiver_wrap([sys.executable, TRANSFER, "recv", str(port)]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert recv.stdout.readline().strip() == "ready"
        subprocess.run(
            sender_wrap([sys.executable, TRANSFER, "send", host, str(port), str(seconds)]),
            check=True,
            timeout=seconds + 30,
        )
        out, _ = recv.communicate(timeout=30)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    result = json.loads(out)
    return result["bytes"] * 8 / result["seconds"] / 1e6
