"""Fixtures for host tests: real network namespaces, real tc, real TCP transfers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import pytest

from ares.runtime.netns import TCP_PAYLOAD_SHARE, DeviceNamespace

TRANSFER = str(Path(__file__).with_name("transfer.py"))


def payload_mbit(wire_mbit: float) -> float:
    """What a transfer can measure on a link capped at `wire_mbit`: every frame's headers count
    against the cap (htb counts a super-packet with the headers of every segment it becomes)."""
    return wire_mbit * TCP_PAYLOAD_SHARE


def pytest_configure(config):
    config.addinivalue_line("markers", "ns_index(i): network namespace index for device_ns")


def host_skip_reason() -> Optional[str]:
    if os.geteuid() != 0:
        return "host tests need root (network namespaces, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"host tests need '{tool}' from iproute2"
    return None


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
