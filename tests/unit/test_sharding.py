"""The device -> server shard rule (ares.core.sharding): stable across processes and versions,
balanced, pins obeyed, and only the devices that must move move when the shard count changes;
the config refuses what cannot be sharded."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
from pydantic import ValidationError

from ares.core.config import AggregationConfig, ServerConfig
from ares.core.sharding import assign, score, shard_for

FLEET = [f"dev-{i}" for i in range(1000)]


def test_the_score_is_sha256_of_name_and_index():
    want = int.from_bytes(hashlib.sha256(b"jetson-3/2").digest()[:8], "big")
    assert score("jetson-3", 2) == want


# Fixed answers: a change of rule would move every job's devices between shards on an upgrade.
@pytest.mark.parametrize("device,shards,index", [
    ("dev-a", 3, 2), ("pi-7", 16, 4), ("dev-a", 1, 0), ("dev-b", 2, 1), ("dev-a", 2, 0),
])
def test_known_assignments_do_not_change(device, shards, index):
    assert shard_for(device, shards) == index


def test_another_interpreter_assigns_the_same():
    """No per-process salt (Python's hash() of a str is): a fresh process, another PYTHONHASHSEED."""
    code = "from ares.core.sharding import assign; print(assign([f'dev-{i}' for i in range(200)], 5))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": ""}).stdout
    assert out.strip() == str(assign([f"dev-{i}" for i in range(200)], 5))


@pytest.mark.parametrize("shards", [2, 3, 4, 8, 16])
def test_devices_spread_evenly(shards):
    sizes = [len(d) for d in assign(FLEET, shards)]
    assert sum(sizes) == len(FLEET)
    mean = len(FLEET) / shards
    # a multinomial's spread: within 5 standard deviations of the mean, and no shard empty
    sd = (mean * (1 - 1 / shards)) ** 0.5
    assert all(abs(size - mean) <= 5 * sd for size in sizes), sizes
    assert min(sizes) > 0


def test_each_shard_keeps_the_config_order():
    for devices in assign(FLEET, 4):
        assert list(devices) == sorted(devices, key=FLEET.index)


@pytest.mark.parametrize("shards", [1, 2, 3, 4, 7])
def test_one_more_shard_moves_only_devices_to_the_new_shard(shards):
    before = {d: shard_for(d, shards) for d in FLEET}
    after = {d: shard_for(d, shards + 1) for d in FLEET}
    moved = [d for d in FLEET if before[d] != after[d]]
    assert all(after[d] == shards for d in moved)  # none moves between the old shards
    share = len(moved) / len(FLEET)
    assert abs(share - 1 / (shards + 1)) < 0.06, share  # about 1/(k+1) move
    # and one shard fewer moves back exactly those devices
    assert {d: shard_for(d, shards) for d in FLEET} == before


def test_pins_win_and_are_checked():
    pins = {"dev-1": 2, "dev-2": 0}
    assert shard_for("dev-1", 3, pins) == 2 and shard_for("dev-2", 3, pins) == 0
    assert shard_for("dev-3", 3, pins) == shard_for("dev-3", 3)
    assert "dev-1" in assign(["dev-1", "dev-3"], 3, pins)[2]
    with pytest.raises(ValueError, match="pinned to shard 5"):
        shard_for("dev-1", 3, {"dev-1": 5})
    with pytest.raises(ValueError, match="at least one shard"):
        shard_for("dev-1", 0)


def config(**fields) -> ServerConfig:
    return ServerConfig(devices=("dev-a", "dev-b", "dev-c"), tokens_dir="tokens", **fields)


def test_one_shard_is_the_default():
    assert config().shards == 1 and config().shard_pins == {}


@pytest.mark.parametrize("method", ["median", "trimmed_mean"])
def test_methods_that_need_every_upload_cannot_be_sharded(method):
    assert config(aggregation=AggregationConfig(method=method)).shards == 1  # one server buffers them
    with pytest.raises(ValidationError, match=f"aggregation.method '{method}' needs every upload at once"):
        config(shards=2, aggregation=AggregationConfig(method=method))


@pytest.mark.parametrize("method", ["fedavg", "norm_clip"])
def test_weighted_means_can_be_sharded(method):
    assert config(shards=4, aggregation=AggregationConfig(method=method)).shards == 4


@pytest.mark.parametrize("pins,message", [
    ({"dev-z": 0}, "names devices the job does not have"),
    ({"dev-a": 2}, "outside shards 0..1"),
    ({"dev-a": -1}, "outside shards 0..1"),
])
def test_bad_pins_are_refused(pins, message):
    with pytest.raises(ValidationError, match=message):
        config(shards=2, shard_pins=pins)
