"""The closed loop: a device's link is throttled mid-run (the in-process rate limit on its
transport) and the controller moves its split within two rounds; the results folder shows it."""

from __future__ import annotations

import csv

import pytest

from ares.core.config import DataConfig, TrainingConfig
from ares.core.models import activation_numel
from ares.core.profiles import PUBLISHED
from ares.roles.runconfig import DeviceSpec, LinkChange, RunConfig
from ares.roles.runner import run

pytestmark = pytest.mark.slow
THROTTLE_ROUND = 2


def test_throttled_device_moves_its_split(tmp_path):
    # dev-0 emulates a device 3x slower than the published Raspberry Pi: on any link faster than
    # ~5 MB/s (loopback, even on a loaded machine) it offloads almost everything
    slow = tmp_path / "slow-pi.json"
    PUBLISHED["raspberry-pi"].scaled(3.0).save(slow)
    cfg = RunConfig(
        devices=[DeviceSpec(name="dev-0", initial_split=3, profile=str(slow)),
                 DeviceSpec(name="dev-1", initial_split=3)],
        mode="adaptive", policy="straggler", results_dir=str(tmp_path / "results"),
        data=DataConfig(name="synthetic", synthetic_train=400, synthetic_test=100, seed=2),
        training=TrainingConfig(rounds=THROTTLE_ROUND + 3, batch_size=10, max_steps_per_round=2, seed=2),  # the last round read
        schedule=[LinkChange(round=THROTTLE_ROUND, device="dev-0", up_mbps=4, down_mbps=4)])
    run(cfg, progress=False)
    with open(tmp_path / "results" / "devices.csv") as f:
        splits = {(int(r["round"]), r["device"]): int(r["split"]) for r in csv.DictReader(f)}
    with open(tmp_path / "results" / "splits.csv") as f:
        decisions = list(csv.DictReader(f))
    before = splits[(THROTTLE_ROUND, "dev-0")]  # the round that first felt the throttle
    assert before <= 1, f"on the fast link the Pi should offload (split 0 or 1): {splits}"
    after = [splits[(r, "dev-0")] for r in (THROTTLE_ROUND + 1, THROTTLE_ROUND + 2)]
    numel = activation_numel("vgg5")
    moved = [s for s in after if s != before]
    assert moved, f"split stayed at {before}: {splits}"
    # it moved to a split that sends fewer bytes per step over the slow link
    assert numel[moved[0]] < numel[before] or moved[0] == len(numel) - 1
    assert any(d["device"] == "dev-0" and int(d["split"]) == moved[0] for d in decisions)
