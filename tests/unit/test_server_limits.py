"""The server's limits as figures (ares.runtime.limits) and one upload per device and round
(ares.runtime.training), in-process. Over HTTP/2 against a real server: tests/integration/
test_stalled_bodies.py, test_repeated_upload.py, test_step_shapes_http.py."""

from __future__ import annotations

import pytest
import torch

from ares.core.config import LimitsConfig, ServerConfig, TrainingConfig
from ares.core.messages import DeviceReport
from ares.runtime.limits import BODIES_PER_DEVICE, device_budget, largest_body
from ares.runtime.server import status_of
from ares.runtime.training import ConflictingUpload, TrainingServer, read_tokens, upload_digest
from tests.support import ROOT, small_config

MIB = 1 << 20
HEADER = MIB + 8  # the largest bundle header and the bundle's preamble


@pytest.mark.parametrize("model,batch,want", [
    # VGG5: a batch of layer 0's activations (131072 bytes a sample) and its labels
    ("vgg5", 100, 100 * 131072 + 100 * 8 + HEADER),
    ("vgg5", 20, 20 * 131072 + 20 * 8 + HEADER),
    # ResNet-18: its weights (the upload at the local split) outweigh a batch of activations
    ("resnet18", 100, 44765128 + HEADER),
], ids=["vgg5-100", "vgg5-20", "resnet18-100"])
def test_largest_body_is_the_largest_a_device_sends(model, batch, want):
    assert largest_body(model, batch) == want


def config(**update) -> ServerConfig:
    return ServerConfig(devices=("dev-a",), tokens_dir="tokens", **update)


def test_the_device_budget_is_two_largest_bodies_at_most_the_configured_cap():
    assert BODIES_PER_DEVICE == 2
    assert device_budget(config()) == 2 * largest_body("vgg5", 100) == 28313168  # 27 MiB, as documented
    assert device_budget(config(training=TrainingConfig(batch_size=20))) == 2 * largest_body("vgg5", 20)
    assert device_budget(config(limits=LimitsConfig(buffered_mib_per_device=8))) == 8 * MIB


def test_the_documented_figures_are_the_code_s():
    page = (ROOT / "docs" / "how-it-works" / "server-limits.md").read_text()
    limits, cfg = LimitsConfig(), config()
    rows = {  # the page's table of limits: figure and field on one row
        f"| {limits.requests_per_device} | `limits.requests_per_device` |",
        f"at most {limits.buffered_mib_per_device} MiB | `limits.buffered_mib_per_device` |",
        f"| {cfg.max_body_mib} MiB (and never more than the byte budget) | `max_body_mib` |",
        f"| {limits.body_read_timeout_s:g} s | `limits.body_read_timeout_s` |",
        f"| {limits.join_wait_s:g} s | `limits.join_wait_s` |",
        f"| {largest_body('vgg5', 100)} bytes (13.5 MiB: layer 0's activations) | {device_budget(cfg)} bytes (27 MiB) |",
        f"| {largest_body('resnet18', 100)} bytes (43.7 MiB: the weights) | "
        f"{2 * largest_body('resnet18', 100)} bytes (87.4 MiB) |",
    }
    for row in rows:
        assert row in page, row


# ----- one upload per device and round ---------------------------------------------------------
@pytest.fixture
def trainer(tmp_path):
    cfg = small_config(tmp_path, devices=("dev-a", "dev-b"), rounds=2, batch_size=20)
    tokens, controller = read_tokens(cfg)
    server = TrainingServer(cfg, tokens, controller, profile=False)
    for name in cfg.devices:
        server.join(name, 0, 6)
    return server


def weights(server: TrainingServer, shift: float) -> dict[str, torch.Tensor]:
    return {k: v + shift if v.is_floating_point() else v.clone() for k, v in server.expected_weights(6).items()}


def report(samples: int = 10) -> DeviceReport:
    return DeviceReport(round=0, split=6, samples=samples)


def test_upload_digest_tells_apart_weights_and_reports(trainer):
    w = weights(trainer, 0.01)
    same = upload_digest(report(), {k: v.clone() for k, v in w.items()})
    assert upload_digest(report(), w) == same
    assert upload_digest(report(11), w) != same
    key = next(k for k, v in w.items() if v.is_floating_point())
    changed = dict(w, **{key: w[key].clone()})
    changed[key].view(-1)[0] += 1e-3
    assert upload_digest(report(), changed) != same


def test_the_same_upload_twice_is_taken_once_and_a_different_one_refused(trainer):
    w = weights(trainer, 0.01)
    assert trainer.upload("dev-a", report(), w) is True
    taken = trainer.slots["dev-a"].uploaded
    assert trainer.upload("dev-a", report(), {k: v.clone() for k, v in w.items()}) is False
    with pytest.raises(ConflictingUpload) as refused:
        trainer.upload("dev-a", report(), weights(trainer, 0.02))
    assert status_of(refused.value) == 409 and "already uploaded other weights" in str(refused.value)
    with pytest.raises(ConflictingUpload) as other_report:
        trainer.upload("dev-a", report(samples=20), w)
    assert status_of(other_report.value) == 409
    assert trainer.slots["dev-a"].uploaded is taken and trainer.slots["dev-a"].weight == 10.0
    assert trainer.counters == {"uploads_repeated": 1, "uploads_refused": 2}
    # the round closes: the repeat is still answered as the first was, a different one refused
    assert trainer.upload("dev-b", report(), weights(trainer, 0.03)) is True
    assert trainer.round == 1
    assert trainer.upload("dev-a", report(), w) is False
    with pytest.raises(ConflictingUpload):
        trainer.upload("dev-a", report(), weights(trainer, 0.02))
