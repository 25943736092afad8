"""The sidecar process inside a network namespace applies bandwidth annotations with real tc."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import wait_for
from tests.support import payload_mbit

ROOT = Path(__file__).resolve().parents[2]


def write_annotations(path: Path, bandwidth: str) -> None:
    tmp = path.with_name(".tmp")
    tmp.write_text(f"ares.io/bandwidth={json.dumps(bandwidth)}\n")
    os.replace(tmp, path)


@pytest.mark.host
@pytest.mark.ns_index(220)
def test_sidecar_caps_uplink_with_real_tc(device_ns, measure_mbit, tmp_path):
    p = device_ns.plan
    annotations = tmp_path / "annotations"
    write_annotations(annotations, "8mbit")
    env = {k: v for k, v in os.environ.items() if k != "ARES_HOSTSCRIPTS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = device_ns.popen(
        [sys.executable, "-m", "ares.roles.sidecar", "--annotations", str(annotations),
         "--interface", p.device_if, "--server", p.host_addr, "--nvpmodel", "nvpmodel-absent",
         "--power-path", str(tmp_path / "no-power"), "--state-dir", str(tmp_path / "state"),
         "--poll", "0.2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )

    def tc_classes() -> str:
        return device_ns.run(["tc", "class", "show", "dev", p.device_if],
                             capture_output=True, text=True).stdout

    try:
        wait_for(lambda: "rate 8Mbit" in tc_classes(), 5, "8mbit class installed")
        rate = measure_mbit(list, device_ns.exec_args, p.host_addr, 45201, 2.0)
        assert rate == pytest.approx(payload_mbit(8), rel=0.10)

        write_annotations(annotations, "20mbit")
        wait_for(lambda: "rate 20Mbit" in tc_classes(), 10, "rate changed to 20mbit")

        write_annotations(annotations, "unlimited")
        wait_for(lambda: "htb" not in tc_classes(), 10, "cap lifted")

        def history() -> list[dict]:
            return json.loads((tmp_path / "state" / "hostctl.json").read_text())["history"]

        # the sidecar reports a change after making it: its report may trail tc by a moment
        wait_for(lambda: len(history()) == 3, 10, "the lifted cap reported")
        assert [h["value"] for h in history()] == ["8mbit", "20mbit", "unlimited"]
        assert all(h["ok"] for h in history())
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert "applied bandwidth=20mbit" in out
