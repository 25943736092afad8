"""A pipelined device's link estimates, from the spans of its overlapping transfers."""

from __future__ import annotations

import pytest

from ares.runtime.device import busy_seconds

# A shared medium of 1000 B/s: up runs 0..2 s, down 1..3 s; while both move (1..2 s) each gets half.
UP, DOWN = [(0.0, 2.0)], [(1.0, 3.0)]
UP_BYTES = DOWN_BYTES = 1500


def test_a_shared_link_reads_its_medium_rate_in_both_directions():
    up_s, down_s = busy_seconds(UP, DOWN, UP_BYTES, DOWN_BYTES, shared=True)
    assert UP_BYTES / up_s == pytest.approx(1000) and DOWN_BYTES / down_s == pytest.approx(1000)


def test_a_full_duplex_link_keeps_each_directions_own_busy_time():
    """Up and down do not share a full-duplex link: overlapping is not waiting."""
    assert busy_seconds(UP, DOWN, UP_BYTES, DOWN_BYTES, shared=False) == (2.0, 2.0)


@pytest.mark.parametrize("up_bytes, down_bytes", [(2000, 1000), (100, 2900), (2999, 1)])
def test_shared_estimates_charge_the_mediums_busy_time_once(up_bytes, down_bytes):
    """The cost model charges a half-duplex step up_bytes/up + down_bytes/down: with the estimates
    that must be the time the medium was busy (3 s), however the bytes were split."""
    spans_up, spans_down = [(0.0, 1.0), (0.5, 2.0)], [(1.0, 2.5), (2.4, 3.0)]  # streams overlap each other too
    up_s, down_s = busy_seconds(spans_up, spans_down, up_bytes, down_bytes, shared=True)
    assert up_s + down_s == pytest.approx(3.0)  # = up_bytes / up rate + down_bytes / down rate
    assert up_s > 0 and down_s > 0


def test_transfers_that_never_overlap_are_left_as_measured():
    assert busy_seconds([(0.0, 1.0)], [(1.0, 2.5)], 10, 10, shared=True) == (1.0, 1.5)
