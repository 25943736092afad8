"""The suite's polling helper on a clock of its own: polls that start a process are spaced out,
every other poll keeps its interval."""

from __future__ import annotations

import pytest

from tests import support


class Clock:
    """Stands in for the `time` module inside tests.support: a poll takes `poll_s` of it and
    starts a process (as kubectl does) when `spawns`."""

    def __init__(self, poll_s: float, spawns: bool) -> None:
        self.now, self.poll_s, self.spawns, self.pauses = 0.0, poll_s, spawns, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds

    def poll(self, ready_at: float):
        def predicate():
            self.now += self.poll_s
            if self.spawns:
                support.process_started()
            return self.now >= ready_at and "ready"
        return predicate


@pytest.fixture
def clock(monkeypatch, request) -> Clock:
    c = Clock(*request.param)
    monkeypatch.setattr(support, "time", c)
    return c


@pytest.mark.parametrize("clock", [(0.001, False), (0.3, False)], indirect=True, ids=["a file", "a slow request"])
def test_a_poll_that_starts_no_process_keeps_its_interval(clock):
    assert support.wait_for(clock.poll(ready_at=3.0), 10, "it", interval=0.05) == "ready"
    assert set(clock.pauses) == {0.05}


@pytest.mark.parametrize("clock", [(0.1, True)], indirect=True)  # kubectl
def test_a_poll_that_starts_a_process_is_spaced_out_up_to_the_slow_pause(clock):
    assert support.wait_for(clock.poll(ready_at=60.0), 120, "it", interval=0.2) == "ready"
    assert clock.pauses[:3] == pytest.approx([0.3, 0.45, support.SLOW_POLL_S])
    assert max(clock.pauses) == support.SLOW_POLL_S
    assert len(clock.pauses) <= 101  # half of the 200 polls a fixed 0.2 s pause would make in the minute


@pytest.mark.parametrize("clock", [(0.1, True)], indirect=True)
def test_a_longer_interval_than_the_slow_pause_is_kept(clock):
    support.wait_for(clock.poll(ready_at=10.0), 20, "it", interval=2.0)
    assert set(clock.pauses) == {2.0}


@pytest.mark.parametrize("clock", [(0.1, True)], indirect=True)
def test_the_last_poll_is_at_the_deadline_and_the_error_names_what_and_the_last_value(clock):
    with pytest.raises(AssertionError, match=r"timed out after 5s waiting for the thing; last: False"):
        support.wait_for(clock.poll(ready_at=1e9), 5, "the thing", interval=0.2)
    assert clock.now == pytest.approx(5.0 + clock.poll_s)  # the final poll began at the deadline
