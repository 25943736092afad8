"""Which scheduled link changes the local runner applies when it sees a round (`due_changes`)."""

from __future__ import annotations

from ares.roles.runconfig import LinkChange
from ares.roles.runner import due_changes

SCHEDULE = [LinkChange(round=4, device="pi", up_mbps=5), LinkChange(round=2, device="nano", up_mbps=10),
            LinkChange(round=3, device="nano", up_mbps=2)]


def test_each_round_applies_its_own_change_once():
    seen = [[c.round for c in due_changes(SCHEDULE, r - 1, r)] for r in range(6)]
    assert seen == [[], [], [2], [3], [4], []]


def test_a_round_the_runner_missed_still_has_its_change_applied_in_order():
    changes = due_changes(SCHEDULE, 1, 3)  # round 2 passed unseen
    assert [(c.round, c.device, c.up_mbps) for c in changes] == [(2, "nano", 10), (3, "nano", 2)]
    assert due_changes(SCHEDULE, 3, 3) == []
