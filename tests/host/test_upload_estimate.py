"""A device's uplink estimate holds on a tc-shaped link with pipelined, small int8 steps.

Each micro-batch's body (~100 KB) fits in the kernel's socket buffer, so the time the client
takes to hand it over says nothing of the link: the estimate came out ~10x the shaped rate
(`ares bench paper5`: 215 Mbit/s on 20), and the controller then moved the device to the split
with the largest activations. The upload ends when the server has the body (Server-Timing
`held`, ares/runtime/link.py)."""

from __future__ import annotations

import httpx
import pytest

from ares.core.config import CONTROLLER_TOKEN_NAME, DataConfig
from tests.conftest import small_config, token, wait_for
from tests.integration.test_faults import Devices

pytestmark = [pytest.mark.host]
UP_KBIT = 4000  # 500 KB/s: a 0.4 MB int8 batch takes ~0.8 s up


@pytest.mark.ns_index(243)
def test_pipelined_int8_steps_measure_the_shaped_uplink(tmp_path, device_ns, server_process):
    p = device_ns.plan
    cfg = small_config(tmp_path, rounds=4, batch_size=100, max_steps_per_round=3).model_copy(
        update={"host": "0.0.0.0", "round_gap_s": 0.2,
                "data": DataConfig(name="synthetic", synthetic_train=400, synthetic_test=100, seed=1)})
    server = server_process(cfg)
    device_ns.shape(up=f"{UP_KBIT}kbit")
    fleet = Devices(tmp_path, cfg, url=f"http://{p.host_addr}:{cfg.port}")
    auth = {"Authorization": f"Bearer {token(cfg, CONTROLLER_TOKEN_NAME)}"}

    def up_bps():
        devices = httpx.get(f"{server.url}/v1/telemetry", headers=auth, timeout=5).json()["devices"]
        return devices[0]["up_bps"] if devices[0]["iterations"] and devices[0]["round_s"] else None

    try:
        fleet.start("dev-a", split=3, wrap=device_ns.exec_args, extra=["--micro-batches", "4", "--codec", "int8"])
        wait_for(lambda: (httpx.get(f"{server.url}/healthz", timeout=5).json()["round"] >= 2), 180, "round 2")
        measured = wait_for(up_bps, 30, "dev-a's uplink estimate in the telemetry")
    finally:
        fleet.stop()
    # TCP and HTTP/2 framing take a few percent of the rate; handing bodies to the socket read 10x
    assert 0.6 * UP_KBIT * 125 < measured < 1.3 * UP_KBIT * 125, measured
