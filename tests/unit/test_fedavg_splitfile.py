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


def test_options_beside_the_split_file_are_optional_and_validated(tmp_path, caplog):
    from ares.runtime.splitfile import StepOptions, options_path, read_options, write_options

    split = tmp_path / "dev.split"
    write_split(split, 2)
    assert read_options(split, None) is None  # an old-style job: no options file, the device's own settings
    assert read_split(split, 7, None) == 2
    write_options(split, "int8", 4)
    assert options_path(split).name == "dev.split.options"
    assert read_split(split, 7, None) == 2  # the split file itself is still one integer (old devices read it)
    good = read_options(split, None)
    assert good == StepOptions(codec="int8", micro_batches=4)
    options_path(split).write_text('{"codec": "int8", "micro_batches": 4, "future": true}')
    assert read_options(split, None) == good  # a newer controller may say more
    for bad in ('{"codec": "int4"}', '{"micro_batches": 0}', "not json", "x" * 5000):
        options_path(split).write_text(bad)
        with caplog.at_level(logging.WARNING):
            assert read_options(split, good) == good
        assert "malformed" in caplog.text
    options_path(split).write_text('{"codec": "fp16"}')
    assert read_options(split, good) == StepOptions(codec="fp16")  # k left to the device


def test_a_device_takes_the_controllers_options_over_its_own_and_the_servers():
    from types import SimpleNamespace

    from ares.runtime.device import DeviceTrainer
    from ares.runtime.splitfile import StepOptions

    server = SimpleNamespace(codec="fp32", micro_batches=1)
    own = SimpleNamespace(codec="fp16", micro_batches=None)
    dev = SimpleNamespace(cfg=server, settings=own, chosen=None)
    codec, k = (lambda d: DeviceTrainer.codec.fget(d)), (lambda d: DeviceTrainer.micro_batches.fget(d))
    assert (codec(dev), k(dev)) == ("fp16", 1)  # no options file: its own flag, else the server's
    dev.chosen = StepOptions(codec="int8", micro_batches=4)
    assert (codec(dev), k(dev)) == ("int8", 4)
    dev.chosen = StepOptions(micro_batches=2)  # a field left out keeps the device's own
    assert (codec(dev), k(dev)) == ("fp16", 2)


def test_a_devices_step_samples_leave_out_the_processs_first_round():
    from types import SimpleNamespace

    from ares.runtime.device import DeviceTrainer, RoundLog

    dev = SimpleNamespace(_steps={}, codec="fp32", micro_batches=1)
    sample = lambda entry, whole=False: DeviceTrainer._measured_steps(dev, entry, whole)  # noqa: E731
    # the first round (its first step took 3 s of start-up) says nothing of its setting
    assert sample(RoundLog(round=0, split=3, steps=4, step_wall_s=4.5, cold=True)) == []
    first = sample(RoundLog(round=1, split=1, steps=4, step_wall_s=2.4))
    assert [(x.split, x.step_s) for x in first] == [(1, pytest.approx(0.6))]
    assert sample(RoundLog(round=2, split=1, steps=4, step_wall_s=2.0))[-1].step_s == pytest.approx(0.5)  # latest
    # a local round (nothing offloaded) adds no figure
    assert [x.split for x in sample(RoundLog(round=3, split=6, steps=4, step_wall_s=2.0), whole=True)] == [1]
