"""A run whose losses are only non-finite ends: phase failed, failure_reason diverged."""

from __future__ import annotations

import pytest
import torch

from ares.runtime.server import status_of
from ares.runtime.training import DIVERGED_ROUNDS, RunFailure, TrainingFailed, TrainingServer, UnsafeUpdate, read_tokens
from tests.support import small_config


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def blown_up_round(server: TrainingServer, clock: Clock, devices, round_index: int, split: int = 3) -> None:
    """Every device joins and sends activations so large that the server's loss is not finite."""
    clock.now += server.cfg.round_gap_s
    for name in devices:
        server.join(name, round_index, split)
        x = torch.full((5, *server.shapes[split]), 3e38)
        with pytest.raises(UnsafeUpdate):
            server.step(name, round_index, split, x, torch.randint(0, 10, (5,)))
    clock.now += server.cfg.round_deadline_s + 1
    server.tick()


@pytest.mark.parametrize("healthy_device", [False, True], ids=["all-diverged", "one-device-fine"])
def test_rounds_of_only_non_finite_losses_end_the_run(tmp_path, healthy_device):
    cfg = small_config(tmp_path, devices=("dev-a", "dev-b"), rounds=10)
    clock = Clock()
    server = TrainingServer(cfg, *read_tokens(cfg), profile=False, clock=clock)
    blowing = ("dev-a",) if healthy_device else ("dev-a", "dev-b")
    for r in range(DIVERGED_ROUNDS):
        if healthy_device:  # dev-b joins and steps fine: the run is not diverged
            clock.now += cfg.round_gap_s
            server.join("dev-b", r, 3)
            server.step("dev-b", r, 3, torch.randn(5, *server.shapes[3]), torch.randint(0, 10, (5,)))
            clock.now -= cfg.round_gap_s
        blown_up_round(server, clock, blowing, r)
    status = server.status()
    if healthy_device:
        assert status.phase != "failed" and status.failure_reason is None
        return
    assert status.phase == "failed" and status.failure_reason == "diverged"
    assert "diverged" in status.failure and f"rounds 0..{DIVERGED_ROUNDS - 1}" in status.failure
    assert server.failure == RunFailure("diverged", status.failure)  # the kind of failure is a type's field
    with pytest.raises(TrainingFailed) as err:  # no more rounds: devices are told to stop (410)
        server.join("dev-a", server.round, 3)
    assert err.value.failure.reason == "diverged" and status_of(err.value) == 410


def test_non_finite_activations_count_as_divergence(tmp_path):
    cfg = small_config(tmp_path, devices=("dev-a",), rounds=10)
    clock = Clock()
    server = TrainingServer(cfg, *read_tokens(cfg), profile=False, clock=clock)
    for r in range(DIVERGED_ROUNDS):
        clock.now += cfg.round_gap_s
        server.join("dev-a", r, 3)
        server.note_nonfinite("dev-a")  # what the step route does when the wire refuses NaN/Inf
        server.note_nonfinite("nobody")  # unknown names are ignored
        clock.now += cfg.round_deadline_s + 1
        server.tick()
    assert server.status().failure_reason == "diverged"
