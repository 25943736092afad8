"""Power sources, energy integration and the shared power file."""

from __future__ import annotations

import json
import threading
import time

import pytest

from ares.runtime.power import (
    Ina3221Source,
    PowerReading,
    PowerSampler,
    read_power_file,
    write_power_file,
)


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class ScriptedSource:
    """Returns the given values in order; an exception instance is raised instead."""

    name = "scripted"

    def __init__(self, values: list) -> None:
        self.values = list(values)

    def read_mw(self) -> float:
        value = self.values.pop(0)
        if isinstance(value, Exception):
            raise value
        return value


@pytest.mark.parametrize(
    ("content", "expected"),
    [("4205\n", 4205.0), ("0", 0.0), ("  7253 ", 7253.0)],
    ids=["newline", "zero", "spaces"],
)
def test_ina3221_reads_integer_milliwatts(tmp_path, content, expected):
    f = tmp_path / "in_power0_input"
    f.write_text(content)
    assert Ina3221Source(f).read_mw() == expected


@pytest.mark.parametrize("content", ["", "abc", "4.2e3", "nan", "-5"], ids=repr)
def test_ina3221_rejects_garbage(tmp_path, content):
    f = tmp_path / "in_power0_input"
    f.write_text(content)
    with pytest.raises(ValueError):
        Ina3221Source(f).read_mw()


def test_ina3221_missing_file_raises_oserror(tmp_path):
    with pytest.raises(OSError):
        Ina3221Source(tmp_path / "absent").read_mw()


def test_sampler_integrates_energy_with_trapezoid_rule():
    clock = FakeClock()
    sampler = PowerSampler(ScriptedSource([1000.0, 3000.0, 3000.0]), clock=clock)
    sampler.sample_once()
    assert sampler.energy_j == 0.0
    clock.t += 2.0
    sampler.sample_once()  # mean 2000 mW over 2 s = 4 J
    assert sampler.energy_j == pytest.approx(4.0)
    clock.t += 0.5
    reading = sampler.sample_once()  # 3000 mW over 0.5 s = 1.5 J
    assert sampler.energy_j == pytest.approx(5.5)
    assert sampler.latest_mw == 3000.0
    assert reading is not None and reading.energy_j == pytest.approx(5.5)
    assert reading.source == "scripted"


def test_sampler_skips_gap_after_failed_read():
    clock = FakeClock()
    sampler = PowerSampler(ScriptedSource([1000.0, OSError("gone"), 1000.0, 1000.0]), clock=clock)
    sampler.sample_once()
    clock.t += 1.0
    assert sampler.sample_once() is None
    clock.t += 10.0
    sampler.sample_once()  # first good sample after the gap: nothing integrated
    assert sampler.energy_j == 0.0
    clock.t += 1.0
    sampler.sample_once()
    assert sampler.energy_j == pytest.approx(1.0)


def test_sampler_thread_samples_and_calls_back(tmp_path):
    f = tmp_path / "power"
    f.write_text("2000")
    seen: list[PowerReading] = []
    got_three = threading.Event()

    def on_sample(reading: PowerReading) -> None:
        seen.append(reading)
        if len(seen) >= 3:
            got_three.set()

    with PowerSampler(Ina3221Source(f), period_s=0.02, on_sample=on_sample) as sampler:
        assert got_three.wait(5.0)
    count = len(seen)
    time.sleep(0.1)
    assert len(seen) == count, "sampling went on after stop()"
    assert sampler.latest_mw == 2000.0
    assert all(r.power_mw == 2000.0 for r in seen)
    assert seen[-1].energy_j > 0


def test_sampler_rejects_bad_period():
    with pytest.raises(ValueError, match="period"):
        PowerSampler(ScriptedSource([]), period_s=0)


def test_power_file_round_trip(tmp_path):
    path = tmp_path / "power.json"
    reading = PowerReading(power_mw=4205.0, energy_j=12.5, time=time.time(), source="ina3221")
    write_power_file(path, reading)
    assert read_power_file(path) == reading
    assert json.loads(path.read_text()) == {
        "power_mw": 4205.0,
        "energy_j": 12.5,
        "time": reading.time,
        "source": "ina3221",
    }
    assert [p.name for p in tmp_path.iterdir()] == ["power.json"], "temp file left behind"


def test_power_file_is_replaced_atomically(tmp_path):
    """A reader racing the writer sees a whole old or whole new reading, never None."""
    path = tmp_path / "power.json"
    write_power_file(path, PowerReading(0.0, 0.0, time.time(), "ina3221"))
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            write_power_file(path, PowerReading(float(i), float(i), time.time(), "ina3221"))

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        misses = sum(read_power_file(path) is None for _ in range(2000))
    finally:
        stop.set()
        thread.join()
    assert misses == 0


@pytest.mark.parametrize(
    "content",
    [
        "",
        "{",
        "[]",
        '"text"',
        '{"power_mw": 1.0, "energy_j": 1.0, "source": "ina3221"}',
        '{"power_mw": "1", "energy_j": 1.0, "time": NOW, "source": "ina3221"}',
        '{"power_mw": NaN, "energy_j": 1.0, "time": NOW, "source": "ina3221"}',
        '{"power_mw": -1.0, "energy_j": 1.0, "time": NOW, "source": "ina3221"}',
        '{"power_mw": 1.0, "energy_j": 1.0, "time": NOW, "source": 7}',
        '{"power_mw": true, "energy_j": 1.0, "time": NOW, "source": "ina3221"}',
    ],
    ids=["empty", "truncated", "list", "string", "no-time", "str-power", "nan", "negative",
         "bad-source", "bool-power"],
)
def test_read_power_file_returns_none_for_malformed(tmp_path, content):
    path = tmp_path / "power.json"
    path.write_text(content.replace("NOW", repr(time.time())))
    assert read_power_file(path) is None


def test_read_power_file_missing_and_stale(tmp_path):
    path = tmp_path / "power.json"
    assert read_power_file(path) is None
    write_power_file(path, PowerReading(1.0, 1.0, time=1000.0, source="ina3221"))
    assert read_power_file(path, max_age_s=10, now=1005.0) is not None
    assert read_power_file(path, max_age_s=10, now=1011.0) is None
