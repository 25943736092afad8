"""A device's link cut for 30 s (its veth pair down) is the same as a kill: the round
closes at its deadline without it, and once the link is back the device rejoins on its own.
The device runs in its own network namespace; the server in the root namespace."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.support import wait_for
from tests.support import Devices, fault_config, history, status

pytestmark = [pytest.mark.host, pytest.mark.slow]
CUT_S = 30.0


@pytest.mark.ns_index(241)
def test_link_cut_for_30s_round_closes_at_deadline_and_device_rejoins(tmp_path, device_ns, server_process):
    p = device_ns.plan
    cfg = fault_config(tmp_path, ["dev-a"], rounds=6, deadline_s=6).model_copy(update={"host": "0.0.0.0"})
    server = server_process(cfg)
    fleet = Devices(tmp_path, cfg, url=f"http://{p.host_addr}:{cfg.port}")
    try:
        fleet.start("dev-a", wrap=device_ns.exec_args, extra=["--timeout", "8"])
        s = wait_for(lambda: (st := status(server.url, cfg)) and st["round"] >= 1 and st["phase"] == "training"
                     and st, 120, "dev-a training in round >= 1")
        cut_in = s["round"]
        subprocess.run(["ip", "link", "set", p.host_if, "down"], check=True)
        cut_at = time.monotonic()
        try:
            closed = wait_for(lambda: next((h for h in history(cfg) if h["round"] == cut_in), None), CUT_S,
                              f"round {cut_in} closed during the cut")
            assert closed["closed_by"] == "deadline" and closed["missed"] == ["dev-a"], closed
            time.sleep(max(0.0, cut_at + CUT_S - time.monotonic()))
        finally:
            subprocess.run(["ip", "link", "set", p.host_if, "up"], check=True)
        back = wait_for(lambda: next((h for h in history(cfg) if h["round"] > cut_in and "dev-a" in h["devices"]),
                                     None), 150, "dev-a back in a later round")
        assert back["closed_by"] == "all devices done"
        assert fleet.procs[0].poll() is None or fleet.procs[0].returncode == 0  # it survived the cut
    finally:
        fleet.stop()
