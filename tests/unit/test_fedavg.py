"""FedAvg and the robust aggregations a job may choose, on tiny literal models."""

from __future__ import annotations

import pytest
import torch

from ares.core.fedavg import aggregate, fedavg, clip_update, coordinate_median, trimmed_mean, update_norm

REF = {"w": torch.zeros(3), "n": torch.tensor(0)}


def state(*w, n=1):
    return {"w": torch.tensor(w, dtype=torch.float32), "n": torch.tensor(n)}


HONEST = [state(1, 1, 1), state(2, 2, 2), state(3, 3, 3), state(2, 1, 3)]
ATTACK = state(1e6, -1e6, 1e6, n=9)


@pytest.mark.parametrize("method,expected", [
    ("median", [2.0, 1.0, 3.0]),          # lower median of 5 values per coordinate
    ("trimmed_mean", [7 / 3, 4 / 3, 8 / 3]),  # 5 values, 20% cut: one each end
])
def test_robust_methods_ignore_one_attacker(method, expected):
    merged = aggregate(method, HONEST + [ATTACK], [1] * 5, REF, trim_fraction=0.2)
    assert merged["w"].tolist() == pytest.approx(expected, rel=1e-6)
    assert int(merged["n"]) == 9  # integer buffers (BatchNorm counters) take the max, as in fedavg


def test_fedavg_is_taken_over_and_norm_clip_bounds_the_damage():
    taken = aggregate("fedavg", HONEST + [ATTACK], [1] * 5, REF)
    clipped = aggregate("norm_clip", HONEST + [ATTACK], [1] * 5, REF, clip_norm=2.0)
    assert float(taken["w"].abs().max()) > 1e5
    assert update_norm(clipped, REF) <= 2.0 + 1e-6


def test_clip_update_keeps_short_updates_and_scales_long_ones():
    short = state(0.1, 0.1, 0.1)
    assert clip_update(short, REF, 1.0)["w"].tolist() == pytest.approx([0.1] * 3)
    long = clip_update(state(3, 4, 0), REF, 1.0)
    assert long["w"].tolist() == pytest.approx([0.6, 0.8, 0.0]) and update_norm(long, REF) == pytest.approx(1.0)


def test_trimmed_mean_without_trimming_is_the_mean_and_the_fraction_is_checked():
    assert trimmed_mean(HONEST, 0.0)["w"].tolist() == pytest.approx([2.0, 1.75, 2.25])
    assert coordinate_median(HONEST[:1])["w"].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        trimmed_mean(HONEST, 0.5)


def test_unknown_method_lists_the_accepted_ones():
    with pytest.raises(ValueError, match="fedavg, norm_clip, median, trimmed_mean"):
        aggregate("krum", HONEST, [1] * 4, REF)


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
