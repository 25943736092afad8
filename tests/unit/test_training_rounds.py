"""Round lifecycle in the server core: deadlines leave devices out, checkpoints resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ares.core.messages import DeviceReport, StepTimings
from ares.runtime.server import status_of
from ares.runtime.training import RoundClosed, RoundNotOpen, TrainingOver, TrainingServer, read_tokens
from tests.support import small_config


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def one_device_round(server: TrainingServer, name: str, round_index: int, split: int = 3) -> None:
    _, weights = server.join(name, round_index, split)
    x = torch.randn(5, *server.shapes[split])
    server.step(name, round_index, split, x, torch.randint(0, 10, (5,)))
    server.upload(name, DeviceReport(round=round_index, split=split, samples=5), weights)


def test_deadline_closes_round_without_the_missing_device(tmp_path):
    cfg = small_config(tmp_path, devices=("dev-a", "dev-b"), rounds=3)
    clock = Clock()
    server = TrainingServer(cfg, *read_tokens(cfg), profile=False, clock=clock)
    one_device_round(server, "dev-a", 0)
    assert server.round == 0 and server.phase == "training"  # dev-b not done: the round waits
    clock.now += cfg.round_deadline_s - 1
    server.tick()
    assert server.round == 0
    clock.now += 2
    server.tick()
    assert server.round == 1
    record = server.history[-1]
    assert record.missed == ["dev-b"] and list(record.devices) == ["dev-a"]
    assert record.closed_by == "deadline"
    with pytest.raises(RoundClosed) as err:  # dev-b wakes up late
        server.join("dev-b", 0, 3)
    assert status_of(err.value) == 409 and "closed" in str(err.value)
    assert server.status().devices["dev-b"].phase == "idle"


def test_all_devices_done_closes_at_once_and_late_steps_are_refused(tmp_path):
    cfg = small_config(tmp_path, devices=("dev-a", "dev-b"), rounds=2)
    clock = Clock()
    server = TrainingServer(cfg, *read_tokens(cfg), profile=False, clock=clock)
    one_device_round(server, "dev-a", 0, split=3)
    one_device_round(server, "dev-b", 0, split=5)
    assert server.round == 1 and server.history[0].closed_by == "all devices done"
    # the gap: round 1 exists but takes no joins until the controller has had its chance
    assert not server.status().accepting
    with pytest.raises(RoundNotOpen, match="opens in"):
        server.join("dev-a", 1, 3)
    clock.now += cfg.round_gap_s
    assert server.status().accepting
    with pytest.raises(RoundClosed, match="closed"):
        server.step("dev-a", 0, 3, torch.randn(2, 64, 8, 8), torch.zeros(2, dtype=torch.long))
    one_device_round(server, "dev-a", 1)
    one_device_round(server, "dev-b", 1)
    assert server.phase == "finished"
    with pytest.raises(TrainingOver) as err:
        server.join("dev-a", 2, 3)
    assert status_of(err.value) == 410


def test_restarted_server_resumes_from_its_checkpoint(tmp_path):
    cfg = small_config(tmp_path, devices=("dev-a",), rounds=3)
    first = TrainingServer(cfg, *read_tokens(cfg), profile=False)
    one_device_round(first, "dev-a", 0)
    trained = first.global_state()
    second = TrainingServer(cfg, *read_tokens(cfg), profile=False)
    assert second.round == 1 and len(second.history) == 1
    assert second.history == first.history
    # the checkpoint's history is the JSON records have always been: these keys, in this order
    stored = json.loads((Path(cfg.checkpoint_dir) / "state.json").read_text())["history"][0]
    assert list(stored) == ["round", "accuracy", "loss", "closed_by", "duration_s", "close_s", "devices", "missed"]
    assert list(stored["devices"]["dev-a"]) == ["split", "samples", "joined_s", "uploaded_s", *StepTimings.model_fields]
    for key, value in trained.items():
        assert torch.equal(second.global_state()[key], value), key
    fresh = TrainingServer(cfg.model_copy(update={"checkpoint_dir": str(tmp_path / "other")}), *read_tokens(cfg), profile=False)
    assert fresh.round == 0


def test_checkpoint_of_another_model_is_refused(tmp_path):
    cfg = small_config(tmp_path, devices=("dev-a",))
    one_device_round(TrainingServer(cfg, *read_tokens(cfg), profile=False), "dev-a", 0)
    with pytest.raises(ValueError, match="vgg5"):
        TrainingServer(cfg.model_copy(update={"model": "resnet18"}), *read_tokens(cfg), profile=False)


def test_missing_token_file_is_a_clear_error(tmp_path):
    cfg = small_config(tmp_path, devices=("dev-a",))
    (tmp_path / "tokens" / "dev-a").unlink()
    with pytest.raises(ValueError, match="no token file for device 'dev-a'"):
        read_tokens(cfg)
