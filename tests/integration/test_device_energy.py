"""A round's energy at a device, through the real path (an `ares server` process, the device
trainer, its HTTP/2 link): from the join's download of the weights to their upload, as the cost
model charges a round. Federated learning (every layer on the device) moves the whole model each
way every round: left out, its measured energy was an eighth below its modelled energy, and every
variant's ratio to it too high."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import pytest
import torch

from ares.core.config import DeviceSettings
from ares.core.energy import energy_j, power_model
from ares.core.models import n_layers
from ares.core.profiles import ComputeProfile
from ares.runtime.device import DeviceTrainer
from ares.runtime.link import HttpLink
from ares.runtime.power import PowerReading, write_power_file
from tests.support import small_config, token

TABLE = power_model("jetson-nano", "MAXN")


@pytest.fixture
def nano(tmp_path: Path, server_process) -> Iterator[tuple[DeviceTrainer, HttpLink]]:
    """A MAXN Nano's trainer and its HTTP/2 link to a real server of two one-step rounds; the power
    file (`tmp_path / "power.json"`) is where the sidecar would write its INA3221 counter."""
    cfg = small_config(tmp_path, rounds=2, batch_size=20, max_steps_per_round=1)
    server = server_process(cfg)
    (tmp_path / "split").write_text("0\n")
    (tmp_path / "token").write_text(token(cfg, "dev-a"))
    settings = DeviceSettings(name="dev-a", server_url=server.url, token_file=str(tmp_path / "token"),
                              split_file=str(tmp_path / "split"), device_class="jetson-nano", power_mode="MAXN",
                              power_file=str(tmp_path / "power.json"))
    link = HttpLink(server.url, "dev-a", token(cfg, "dev-a"))
    try:
        yield DeviceTrainer(settings, link), link
    finally:
        link.close()


def sent_bytes(trainer: DeviceTrainer) -> int:
    return sum(v.numel() * v.element_size() for v in trainer.model.layers.state_dict().values())


def counter(path: Path, joules: float) -> None:
    write_power_file(path, PowerReading(power_mw=5000.0, energy_j=joules, time=time.time(), source="ina3221"))


def test_a_rounds_energy_counts_the_weights_down_and_up(nano):
    trainer, link = nano
    local = n_layers(trainer.model) - 1
    for r in range(2):
        reply, weights, moved = link.join(r, local)
        uplink = trainer.up.value  # the estimate the upload's share is charged at (none before the first)
        entry = trainer.train_round(reply, weights, None, moved.seconds)
        assert entry.uploaded and entry.steps == 1 and entry.energy_source == "modelled"
        assert moved.seconds > 0 and entry.down_s == moved.seconds  # all the radio received: the weights
        if r == 0:
            assert uplink is None and entry.up_s == 0.0
        else:
            assert uplink and entry.up_s == pytest.approx(sent_bytes(trainer) / uplink)
        assert entry.energy_j == pytest.approx(energy_j(TABLE, entry.compute_s, entry.up_s, entry.down_s))
        assert entry.energy_j > TABLE.compute_w * entry.compute_s + (TABLE.tx_w * entry.up_s if r else 0.0)


@pytest.mark.parametrize("after", [42.0, -5.0], ids=["counted", "counter-went-back"])
def test_a_measured_rounds_energy_runs_from_the_counter_before_the_join(nano, tmp_path: Path, after: float):
    """With a power sensor (the sidecar's INA3221 counter in power.json), the round's energy is the
    counter from before the join to the report, plus the upload's share at the table's transmit
    power. A counter that went back (a restarted sidecar) measures nothing: the model's figure."""
    trainer, link = nano
    local = n_layers(trainer.model) - 1
    uplink: Optional[float] = None
    for r in range(2):  # round 1 has an uplink estimate, from round 0's upload
        before = 100.0 * (r + 1)
        counter(tmp_path / "power.json", before)
        start = trainer._energy_counter()
        counter(tmp_path / "power.json", before + after)  # the counter at the report
        reply, weights, moved = link.join(r, local)
        uplink = trainer.up.value
        entry = trainer.train_round(reply, weights, start, moved.seconds)
    assert start == 200.0 and uplink
    if after >= 0:
        assert entry.energy_source == "measured"
        assert entry.energy_j == pytest.approx(after + TABLE.tx_w * sent_bytes(trainer) / uplink)
    else:
        assert entry.energy_source == "modelled"
        assert entry.energy_j == pytest.approx(energy_j(TABLE, entry.compute_s, entry.up_s, entry.down_s))


@contextlib.contextmanager
def cpu_held() -> Iterator[None]:
    """This thread (and torch's compute, on one thread) pinned to CPU 0 beside a busy loop pinned
    there too: half of that CPU is held by someone else, as on a testbed of many emulated devices."""
    threads, cpus = torch.get_num_threads(), os.sched_getaffinity(0)
    hog = subprocess.Popen([sys.executable, "-c", "import os; os.sched_setaffinity(0, {0})\nwhile True: pass"])
    torch.set_num_threads(1)
    os.sched_setaffinity(0, {0})
    try:
        yield
    finally:
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(threads)
        hog.kill()
        hog.wait()


@pytest.mark.parametrize("emulated", [True, False], ids=["emulated-board", "real-device"])
def test_an_emulated_board_is_not_charged_for_the_cpu_that_others_hold(tmp_path: Path, server_process, emulated: bool):
    """A round at the local split with half the CPU held elsewhere. An emulated Nano (a profile far
    faster than this host, so its steps take this host's CPU time) is charged that CPU time, not
    the wall time it waited; a real device is charged its wall time."""
    cfg = small_config(tmp_path, rounds=1, batch_size=100)
    server = server_process(cfg)
    (tmp_path / "split").write_text("0\n")
    settings = DeviceSettings(name="dev-a", server_url=server.url, token_file=str(tmp_path / "token"),
                              split_file=str(tmp_path / "split"), device_class="jetson-nano", power_mode="MAXN")
    (tmp_path / "token").write_text(token(cfg, "dev-a"))
    link = HttpLink(server.url, "dev-a", token(cfg, "dev-a"))
    try:
        trainer = DeviceTrainer(settings, link)
        layers = n_layers(trainer.model)
        if emulated:
            trainer.set_emulation(ComputeProfile(fwd=(1e-4,) * layers, bwd=(1e-4,) * layers, batch_size=100,
                                                 device_class="jetson-nano", power_mode="MAXN"))
        reply, weights, moved = link.join(0, layers - 1)
        with cpu_held():
            entry = trainer.train_round(reply, weights, None, moved.seconds)
    finally:
        link.close()
    assert entry.steps == 2 and entry.energy_source == "modelled"
    assert entry.energy_j == pytest.approx(energy_j(TABLE, entry.compute_s, entry.up_s, entry.down_s))
    if emulated:
        assert entry.compute_s < 0.75 * entry.device_s, (entry.compute_s, entry.device_s)
    else:
        assert entry.compute_s == pytest.approx(entry.device_s, rel=0.02)
