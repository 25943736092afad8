"""The compute seconds a round's energy charges (`charged_seconds`), on the process's real clocks:
a sleep is time without the CPU (as when the host's other emulated devices hold it), a busy loop
is the host's own work."""

from __future__ import annotations

import time

import pytest

from ares.runtime.device import ComputeStart, charged_seconds


def busy(cpu_s: float) -> None:
    start = time.process_time()
    while time.process_time() - start < cpu_s:
        pass


def test_a_real_devices_compute_is_its_wall_time():
    start = ComputeStart.now()
    time.sleep(0.2)
    wall = time.perf_counter() - start.wall
    assert charged_seconds(start, None) == pytest.approx(wall, abs=0.02)


def test_an_emulated_board_is_not_charged_for_waiting_on_the_hosts_cpu():
    start = ComputeStart.now()
    busy(0.02)
    time.sleep(0.3)  # the CPU held elsewhere
    charged = charged_seconds(start, 0.1)
    assert charged == pytest.approx(0.1, abs=0.01)  # the board's profile, not 0.32 s of wall time


def test_an_emulated_board_on_a_slower_host_is_charged_the_hosts_cpu_time():
    start = ComputeStart.now()
    busy(0.25)
    cpu = time.process_time() - start.cpu
    charged = charged_seconds(start, 0.1)
    assert charged >= 0.25 and charged == pytest.approx(min(cpu, time.perf_counter() - start.wall), abs=0.01)


def test_an_emulated_charge_never_exceeds_the_wall_time():
    start = ComputeStart.now()
    charged = charged_seconds(start, 5.0)  # a pad not yet slept: the board cannot have computed for longer
    assert charged <= time.perf_counter() - start.wall < 1.0
