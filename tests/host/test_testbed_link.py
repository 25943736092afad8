"""The testbed's emulated link holds its rate: timed TCP transfers through its namespace pair.

Goes through the testbed's own API (`testbed.namespaces`, `testbed.shape`, the Mbit/s values a
scenario holds), not through the shaping script directly (tests/host/test_shaping.py does that).
Rates are TCP payload, a few percent under the wire rate; the issue allows 10%.
"""

from __future__ import annotations

import pytest

from ares.roles import testbed
from tests.support import payload_mbit

SECONDS = 2.0


@pytest.fixture
def link():
    if testbed.link_mode("auto") != "tc":
        pytest.skip("the tc testbed needs root, ip and tc")
    with testbed.namespaces(["dev-a"], first_index=230) as ns:
        yield ns["dev-a"]


@pytest.mark.host
def test_shaped_link_holds_each_direction_and_follows_a_schedule_change(link, measure_mbit):
    p = link.plan
    up = lambda: measure_mbit(list, link.exec_args, p.host_addr, 45131, SECONDS)
    down = lambda: measure_mbit(link.exec_args, list, p.device_addr, 45132, SECONDS)

    testbed.shape(link, up_mbps=12.5, down_mbps=6)  # fractional Mbit/s as a scenario may give it
    assert up() == pytest.approx(payload_mbit(12.5), rel=0.10)
    assert down() == pytest.approx(payload_mbit(6), rel=0.10)

    testbed.shape(link, up_mbps=4, down_mbps=None)  # a scheduled drop; None lifts the downlink cap
    assert up() == pytest.approx(payload_mbit(4), rel=0.10)
    assert down() > 60  # uncapped veth: an order of magnitude above any cap used here


@pytest.mark.parametrize("mbps, expected", [(20, "20000kbit"), (12.5, "12500kbit"), (0.0001, "1kbit"), (None, None)])
def test_rate_is_valid_for_the_shaping_script(mbps, expected):
    assert testbed.rate(mbps) == expected
