"""A round's energy at a device, through the real path (an `ares server` process, the device
trainer, its HTTP/2 link): from the join's download of the weights to their upload, as the cost
model charges a round. Federated learning (every layer on the device) moves the whole model each
way every round: left out, its measured energy was an eighth below its modelled energy, and every
variant's ratio to it too high."""

from __future__ import annotations

from pathlib import Path

import pytest

from ares.core.config import DeviceSettings
from ares.core.energy import energy_j, power_model
from ares.core.models import n_layers
from ares.runtime.device import DeviceTrainer
from ares.runtime.link import HttpLink
from tests.support import small_config, token


def test_a_rounds_energy_counts_the_weights_down_and_up(tmp_path: Path, server_process):
    cfg = small_config(tmp_path, rounds=2, batch_size=20, max_steps_per_round=1)
    server = server_process(cfg)
    (tmp_path / "split").write_text("0\n")
    (tmp_path / "token").write_text(token(cfg, "dev-a"))
    settings = DeviceSettings(name="dev-a", server_url=server.url, token_file=str(tmp_path / "token"),
                              split_file=str(tmp_path / "split"), device_class="jetson-nano", power_mode="MAXN")
    link = HttpLink(server.url, "dev-a", token(cfg, "dev-a"))
    table = power_model("jetson-nano", "MAXN")
    try:
        trainer = DeviceTrainer(settings, link)
        local = n_layers(trainer.model) - 1
        for r in range(2):
            reply, weights, moved = link.join(r, local)
            uplink = trainer.up.value  # the estimate the upload's share is charged at (none before the first)
            entry = trainer.train_round(reply, weights, None, moved.seconds)
            assert entry.uploaded and entry.steps == 1 and entry.energy_source == "modelled"
            assert moved.seconds > 0 and entry.down_s == moved.seconds  # all the radio received: the weights
            sent = sum(v.numel() * v.element_size() for v in trainer.model.layers.state_dict().values())
            if r == 0:
                assert uplink is None and entry.up_s == 0.0
            else:
                assert uplink and entry.up_s == pytest.approx(sent / uplink)
            assert entry.energy_j == pytest.approx(energy_j(table, entry.device_s, entry.up_s, entry.down_s))
            assert entry.energy_j > table.compute_w * entry.device_s + (table.tx_w * entry.up_s if r else 0.0)
    finally:
        link.close()


def test_a_measured_rounds_energy_runs_from_the_counter_before_the_join(tmp_path: Path, server_process, monkeypatch):
    """With a power sensor (the sidecar's INA3221 counter), the round's energy is the counter from
    before the join to the report, plus the upload's share at the table's transmit power."""
    cfg = small_config(tmp_path, rounds=2, batch_size=20, max_steps_per_round=1)
    server = server_process(cfg)
    (tmp_path / "split").write_text("0\n")
    (tmp_path / "token").write_text(token(cfg, "dev-a"))
    settings = DeviceSettings(name="dev-a", server_url=server.url, token_file=str(tmp_path / "token"),
                              split_file=str(tmp_path / "split"), device_class="jetson-nano", power_mode="MAXN")
    link = HttpLink(server.url, "dev-a", token(cfg, "dev-a"))
    table = power_model("jetson-nano", "MAXN")
    try:
        trainer = DeviceTrainer(settings, link)
        local = n_layers(trainer.model) - 1
        for r in range(2):  # round 1 has an uplink estimate, from round 0's upload
            before = 100.0 * r
            monkeypatch.setattr(trainer, "_energy_counter", lambda: before + 42.0)  # the counter at the report
            reply, weights, moved = link.join(r, local)
            uplink = trainer.up.value
            entry = trainer.train_round(reply, weights, before, moved.seconds)
        sent = sum(v.numel() * v.element_size() for v in trainer.model.layers.state_dict().values())
        assert entry.energy_source == "measured" and uplink
        assert entry.energy_j == pytest.approx(42.0 + table.tx_w * sent / uplink)
    finally:
        link.close()
