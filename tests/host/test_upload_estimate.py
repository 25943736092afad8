"""A device's link estimates hold on a tc-shaped link with pipelined, small int8 steps.

Each micro-batch's body (~100 KB) fits in the kernel's socket buffer, so the time the client
takes to hand it over says nothing of the link: the estimate came out ~10x the shaped rate
(`ares bench paper5`: 215 Mbit/s on 20), and the controller then moved the device to the split
with the largest activations. The upload ends when the server has the body (Server-Timing
`held`, ares/runtime/link.py). The downlink read 1.5x: the veth's GSO let htb send 64 KB at
once after every pause (ares/runtime/netns.py now caps super-packets at 16 KB). On a shared
(half-duplex) link both read about half the rate: a gradient coming down while the next
micro-batch goes up was counted in both directions' time (ares/runtime/device.py). On a loaded
machine the shared link's 32-packet queues overflowed and TCP's timeouts stalled single uploads
for seconds (0.3-0.5x the rate): the link now queues as a veth does (ares/runtime/netns.py)."""

from __future__ import annotations

import re

import httpx
import pytest

from ares.core.config import CONTROLLER_TOKEN_NAME, DataConfig
from tests.support import small_config, token, wait_for
from tests.support import Devices

pytestmark = [pytest.mark.host]
KBIT = 4000  # each way, 500 KB/s: a 0.4 MB int8 batch takes ~0.8 s up and again down


def estimates_after_round_2(tmp_path, cfg, server, device_ns, split: int, extra=()) -> tuple[float, float, float]:
    """Run dev-a in the namespace until round 2, then read its (up, down) estimates from the telemetry,
    and the server's own figure for its last upload."""
    fleet = Devices(tmp_path, cfg, url=f"http://{device_ns.plan.host_addr}:{cfg.port}")
    auth = {"Authorization": f"Bearer {token(cfg, CONTROLLER_TOKEN_NAME)}"}

    def rates():
        dev = httpx.get(f"{server.url}/v1/telemetry", headers=auth, timeout=5).json()["devices"][0]
        return ((dev["up_bps"], dev["down_bps"], dev["upload_bps"])
                if dev["up_bps"] and dev["down_bps"] and dev["round_s"] else None)

    try:
        fleet.start("dev-a", split=split, wrap=device_ns.exec_args, extra=list(extra))
        wait_for(lambda: (httpx.get(f"{server.url}/healthz", timeout=5).json()["round"] >= 2), 180, "round 2")
        return wait_for(rates, 30, "dev-a's link estimates in the telemetry")
    finally:
        fleet.stop()


@pytest.mark.ns_index(243)
@pytest.mark.parametrize("duplex", ["full", "half"])
def test_pipelined_int8_steps_measure_the_shaped_link_both_ways(tmp_path, device_ns, server_process, duplex):
    """Full duplex: each direction's own rate. Half duplex: the one rate both share, which the cost
    model then charges up and down one after the other."""
    cfg = small_config(tmp_path, rounds=4, batch_size=100, max_steps_per_round=3).model_copy(
        update={"host": "0.0.0.0", "round_gap_s": 0.2,
                "data": DataConfig(name="synthetic", synthetic_train=400, synthetic_test=100, seed=1)})
    server = server_process(cfg)
    if duplex == "half":
        device_ns.shape_shared(KBIT)
    else:
        device_ns.shape(up=f"{KBIT}kbit", down=f"{KBIT}kbit")
    up, down, _ = estimates_after_round_2(tmp_path, cfg, server, device_ns, split=3,
                                       extra=["--micro-batches", "4", "--codec", "int8", "--duplex", duplex])
    # TCP and HTTP/2 framing take a few percent of the rate; handing bodies to the socket read 39x
    assert 0.6 * KBIT * 125 < up < 1.3 * KBIT * 125, up
    assert 0.6 * KBIT * 125 < down < 1.3 * KBIT * 125, down
    if duplex == "half":  # the shared link's queue held both directions' streams: no loss, no TCP timeouts
        stats = device_ns.run(["tc", "-s", "qdisc", "show", "dev", device_ns.plan.shared_if],
                              capture_output=True, text=True, check=True).stdout
        assert re.search(r"Sent [1-9]\d* bytes", stats) and re.findall(r"dropped (\d+)", stats) == ["0"], stats


@pytest.mark.ns_index(244)
def test_a_device_training_locally_measures_the_shaped_link_from_its_weights(tmp_path, device_ns, server_process):
    """At the local split a device moves no activations: its weights (the join's download, the
    upload) are all it can measure the link from. Before, it reported no rate at all, and a Nano whose
    link fell to a quarter while it trained locally stayed predicted at the old rate (`ares bench
    bandwidth-drop`)."""
    cfg = small_config(tmp_path, rounds=3, batch_size=20, max_steps_per_round=2).model_copy(
        update={"host": "0.0.0.0", "round_gap_s": 0.2})
    server = server_process(cfg)
    kbit = 8000  # 1 MB/s: VGG5's 2.3 MB of weights take ~2.3 s each way
    device_ns.shape(up=f"{kbit}kbit", down=f"{kbit}kbit")
    # round 1's report: the join's download of round 1, the upload of round 0; and the server's own
    # figure for the upload that carried it (the controller folds it in: a link that fell shows a
    # round earlier)
    up, down, upload = estimates_after_round_2(tmp_path, cfg, server, device_ns, split=6)
    assert 0.6 * kbit * 125 < up < 1.3 * kbit * 125, up
    assert 0.6 * kbit * 125 < down < 1.3 * kbit * 125, down
    assert 0.6 * kbit * 125 < upload < 1.3 * kbit * 125, upload
