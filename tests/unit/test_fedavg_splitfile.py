"""FedAvg weights by samples; the split file keeps the last good value on bad input."""

import logging

import pytest
import torch

from ares.core.fedavg import fedavg
from ares.runtime.splitfile import read_split, write_split


def test_fedavg_is_sample_weighted_and_maxes_counters():
    a = {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 0.0]), "n": torch.tensor(5)}
    out = fedavg([a, b], [1, 3])
    torch.testing.assert_close(out["w"], torch.tensor([3.0, 1.0]))
    assert out["n"].item() == 5


def test_fedavg_refuses_mismatched_states():
    with pytest.raises(ValueError, match="different keys"):
        fedavg([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}], [1, 1])
    with pytest.raises(ValueError):
        fedavg([], [])


def test_split_file_round_trip_and_fallbacks(tmp_path, caplog):
    path = tmp_path / "split"
    assert read_split(path, 7, None) is None
    write_split(path, 4)
    assert read_split(path, 7, None) == 4
    caplog.set_level(logging.WARNING)
    for bad in ("seven", "9", "-1", ""):
        path.write_text(bad)
        assert read_split(path, 7, 4) == 4
    assert "keeping split 4" in caplog.text
    path.unlink()
    assert read_split(path, 7, 2) == 2
