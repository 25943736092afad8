"""Faults, with real processes over HTTP/2: a device killed mid-step, the server killed
mid-round, a device that uploads a poisoned model. (A link cut in a network namespace:
tests/host/test_link_cut.py.) Deadlines are short so each test takes well under a minute of
waiting; they are marked slow (device processes profile their model at start-up)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Optional

import httpx
import pytest
import torch

from ares.core.config import ServerConfig
from ares.core.messages import DeviceReport
from ares.core.profiles import PUBLISHED
from ares.runtime.link import HttpLink, LinkError
from tests.support import Devices, fault_config, history, status, token, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def devices(tmp_path):
    made = []

    def make(cfg: ServerConfig, url: Optional[str] = None) -> Devices:
        made.append(Devices(tmp_path, cfg, url))
        return made[-1]

    yield make
    for d in made:
        d.stop()


def slow_profile(tmp: Path) -> Path:
    """The published Raspberry Pi: each step pads device compute to ~0.6 s at batch 20."""
    path = tmp / "pi.json"
    PUBLISHED["raspberry-pi"].save(path)
    return path


def test_device_killed_mid_step_round_closes_at_deadline_and_device_rejoins(tmp_path, server_process, devices):
    cfg = fault_config(tmp_path, ["dev-a", "dev-b"], rounds=12, deadline_s=6)
    server = server_process(cfg)
    fleet = devices(cfg)
    fleet.start("dev-a")
    victim = fleet.start("dev-b", profile=slow_profile(tmp_path))
    # dev-b in a round, in its steps (each ~0.6 s of padded compute + a server step)
    s = wait_for(lambda: (st := status(server.url, cfg)) and st["round"] >= 1 and st["phase"] == "training"
                 and st["devices"]["dev-b"]["phase"] == "training" and st, 120, "dev-b training in round >= 1")
    killed_in = s["round"]
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    closed = wait_for(lambda: next((h for h in history(cfg) if h["round"] == killed_in), None), 60,
                      f"round {killed_in} closed")
    assert closed["closed_by"] == "deadline" and closed["missed"] == ["dev-b"], closed
    assert closed["duration_s"] >= cfg.round_deadline_s - 0.5
    fleet.start("dev-b", profile=slow_profile(tmp_path))  # the pod's restart
    back = wait_for(lambda: next((h for h in history(cfg) if h["round"] > killed_in and "dev-b" in h["devices"]),
                                 None), 150, "dev-b back in a later round")
    assert back["round"] > killed_in and server.proc.poll() is None


def test_server_killed_mid_round_resumes_from_checkpoint_and_devices_reconnect(tmp_path, server_process, devices):
    # A device whose step the kill refused waits for the next round: the resumed round closes at
    # its deadline without it (15 s: a round here takes ~3 s, ~9 s under heavy load).
    cfg = fault_config(tmp_path, ["dev-a", "dev-b"], rounds=5, deadline_s=15)
    server = server_process(cfg)
    fleet = devices(cfg)
    fleet.start("dev-a", profile=slow_profile(tmp_path))
    fleet.start("dev-b", profile=slow_profile(tmp_path))
    s = wait_for(lambda: (st := status(server.url, cfg)) and st["round"] >= 2 and st["phase"] == "training" and st,
                 180, "round >= 2 in training")
    killed_in = s["round"]
    server.kill()  # with its granian worker, which would otherwise keep the port
    assert len(history(cfg)) == killed_in  # the checkpoint holds every round closed before the kill

    again = server_process(cfg)  # same config, same port: the replaced pod
    resumed = status(again.url, cfg)
    assert resumed["round"] == killed_in and resumed["phase"] in ("waiting", "training")
    wait_for(lambda: status(again.url, cfg).get("phase") == "finished", 240, "the job finishes after the restart")
    rounds = history(cfg)
    assert [h["round"] for h in rounds] == list(range(cfg.training.rounds))
    # both devices reconnected on their own and took part after the restart
    after = [h for h in rounds if h["round"] >= killed_in]
    assert any(set(h["devices"]) == {"dev-a", "dev-b"} for h in after), after
    assert all(p.poll() in (None, 0) for p in fleet.procs)


def test_poisoned_upload_is_refused_model_unchanged_and_job_goes_on(tmp_path, server_process, devices):
    # One round shows it all (round 0 goes on without mallory); a second would wait out its
    # 60 s deadline for mallory, who never joins again.
    cfg = fault_config(tmp_path, ["honest", "mallory"], rounds=1, deadline_s=60)
    server = server_process(cfg)
    ctl = {"Authorization": f"Bearer {token(cfg, 'controller.token')}"}
    before = httpx.get(f"{server.url}/v1/status", headers=ctl).json()["model_sha256"]
    mallory = HttpLink(server.url, "mallory", token(cfg, "mallory"))
    try:
        reply, weights, _ = mallory.join(0, 3)
        poisoned = {k: v * 1e6 if v.is_floating_point() else v for k, v in weights.items()}
        with pytest.raises(LinkError) as err:
            mallory.upload(DeviceReport(round=0, split=3, samples=80), poisoned)
        assert err.value.status == 422 and "update norm" in err.value.message
        st = httpx.get(f"{server.url}/v1/status", headers=ctl).json()
        assert st["model_sha256"] == before and st["devices"]["mallory"]["phase"] == "refused"
        assert st["counters"]["uploads_refused"] == 1
        metrics = httpx.get(f"{server.url}/metrics", headers=ctl).text
        assert 'ares_refused_total{kind="uploads_refused"} 1.0' in metrics
    finally:
        mallory.close()
    # the honest device trains on; mallory, refused, counts as done for round 0
    devices(cfg).start("honest")
    wait_for(lambda: status(server.url, cfg).get("phase") == "finished", 180, "the job finishes")
    rounds = history(cfg)
    assert rounds[0]["devices"].keys() == {"honest"} and rounds[0]["closed_by"] == "all devices done"
    from safetensors.torch import load_file

    state = load_file(str(Path(cfg.checkpoint_dir) / "global.safetensors"))
    assert all(bool(torch.isfinite(v).all()) and float(v.abs().max()) < 1e3 for v in state.values()
               if v.is_floating_point())
