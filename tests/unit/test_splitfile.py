"""The split file (and the options beside it) keeps the last good value on bad input."""

import logging

import pytest

from ares.runtime.splitfile import read_split, write_split


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

    from ares.core.messages import STEP_ROUNDS
    from ares.runtime.device import DeviceTrainer, RoundLog

    dev = SimpleNamespace(_steps={}, codec="fp32", micro_batches=1, live=SimpleNamespace(factor=1.0))
    sample = lambda entry, whole=False: DeviceTrainer._measured_steps(dev, entry, whole)  # noqa: E731
    # the first round (its first step took 3 s of start-up) says nothing of its setting
    assert sample(RoundLog(round=0, split=3, steps=4, step_wall_s=4.5, cold=True)) == []
    first = sample(RoundLog(round=1, split=1, steps=4, step_wall_s=2.4, up_bps=2e6, down_bps=3e6))
    assert [(x.split, x.step_s, x.up_bps, x.down_bps, x.compute_scale) for x in first] == [
        (1, pytest.approx(0.6), 2e6, 3e6, 1.0)]
    dev.live.factor = 2.0  # the device slowed down: round 1 ran at half today's compute time
    second = sample(RoundLog(round=2, split=1, steps=4, step_wall_s=2.0, up_bps=1e6, down_bps=3e6))
    assert [(x.step_s, x.up_bps, x.compute_scale) for x in second] == [
        (pytest.approx(0.6), 2e6, 0.5), (pytest.approx(0.5), 1e6, 1.0)]  # oldest first, each with its inputs
    # a local round (nothing offloaded) adds no figure; a setting keeps its last STEP_ROUNDS rounds
    assert [x.split for x in sample(RoundLog(round=3, split=6, steps=4, step_wall_s=2.0), whole=True)] == [1, 1]
    for r in (4, 5, 6):
        kept = sample(RoundLog(round=r, split=1, steps=1, step_wall_s=float(r)))
    assert [x.step_s for x in kept] == [4.0, 5.0, 6.0] and STEP_ROUNDS == 3
    # another setting comes last; the first keeps its rounds
    assert [(x.split, x.step_s) for x in sample(RoundLog(round=7, split=3, steps=1, step_wall_s=7.0))] == [
        (1, 4.0), (1, 5.0), (1, 6.0), (3, 7.0)]
    dev.live.factor = 2e-6  # an absurd swing of the live factor: the ratio is held to the message's bounds
    assert {x.compute_scale for x in sample(RoundLog(round=8, split=6, steps=1, step_wall_s=1.0), whole=True)} == {1e3}


def test_a_small_weights_body_never_sets_a_link_estimate():
    from types import SimpleNamespace

    from ares.runtime.device import MIN_SAMPLE_BYTES, DeviceTrainer
    from ares.runtime.profiler import Throughput

    dev = SimpleNamespace(latency_s=None)
    learn = lambda estimate, nbytes, seconds, **kw: DeviceTrainer._learn(dev, estimate, nbytes, seconds, **kw)  # noqa: E731
    estimate = Throughput(smoothing=0.5)
    learn(estimate, 4096, 1e-5, weights=True)  # split 1's join: a few KB that came with the headers (400 MB/s)
    assert estimate.value is None
    learn(estimate, 4096, 2e-3)  # a step's first transfer counts, small or not: there may be no larger one
    assert estimate.value == pytest.approx(2.048e6)
    learn(estimate, 4096, 1e-5, weights=True)
    learn(estimate, 4096, 1e-5)  # once there is an estimate, small transfers of either kind leave it
    assert estimate.value == pytest.approx(2.048e6)
    learn(estimate, MIN_SAMPLE_BYTES, MIN_SAMPLE_BYTES / 1e6, weights=True)  # a large body counts
    assert estimate.value == pytest.approx(1 / (0.5 / 2.048e6 + 0.5 / 1e6))
