"""Compute profiles: published numbers, files, rescaling and derived power modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ares.core.profiles import PUBLISHED, ComputeProfile, ServerProfile, derive_power_mode

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "profiles"


def test_published_profiles_hold_the_papers_numbers():
    nano, pi = PUBLISHED["jetson-nano/MAXN"], PUBLISHED["raspberry-pi"]
    assert nano.n_splits == pi.n_splits == 7
    assert nano.total(0) == pytest.approx(0.00935 + 0.01922)
    assert pi.total(6) == pytest.approx(1.852 + 2.092)
    assert (nano.device_class, nano.power_mode, nano.source) == ("jetson-nano", "MAXN", "published")


def test_save_and_load_round_trip(tmp_path):
    path = tmp_path / "p.json"
    PUBLISHED["raspberry-pi"].save(path)
    assert ComputeProfile.load(path) == PUBLISHED["raspberry-pi"]
    server = ServerProfile((0.3, 0.1, 0.0), (0.2, 0.1, 0.0), batch_size=50, note="x")
    server.save(tmp_path / "s.json")
    assert ServerProfile.load(tmp_path / "s.json") == server


@pytest.mark.parametrize("data, error", [
    ({"fwd": [1, 2], "bwd": [1]}, "must match"),
    ({"fwd": [1, -2], "bwd": [1, 1]}, ">= 0"),
    ({"fwd": [], "bwd": []}, "one entry per split"),
    ({"fwd": [1], "bwd": [1], "batch_size": 0}, "batch_size"),
    ({"fwd": [1], "bwd": [1], "source": "guess"}, "source"),
    ({"fwd": [1], "bwd": [1], "speed": 3}, "unknown keys"),
], ids=["lengths", "negative", "empty", "batch", "source", "unknown-key"])
def test_bad_profiles_are_refused_with_a_reason(data, error):
    with pytest.raises(ValueError, match=error):
        ComputeProfile.from_dict(data)


def test_rescaled_is_linear_in_the_batch():
    half = PUBLISHED["raspberry-pi"].rescaled(50)
    assert half.batch_size == 50
    assert half.fwd[2] == pytest.approx(1.447 / 2) and half.bwd[6] == pytest.approx(2.092 / 2)


@pytest.mark.parametrize("mode, factor", [("5W", 1.6), ("custom3", 1.5), ("custom1", 2.2)])
def test_derived_power_modes_scale_maxn(mode, factor):
    derived = derive_power_mode(PUBLISHED["jetson-nano/MAXN"], mode)
    assert derived.fwd[6] == pytest.approx(0.12375 * factor)
    assert (derived.power_mode, derived.source) == (mode, "derived")
    assert derive_power_mode(derived, "MAXN").fwd == pytest.approx(PUBLISHED["jetson-nano/MAXN"].fwd)


def test_unknown_power_mode_lists_the_known_ones():
    with pytest.raises(ValueError, match="MAXN, 5W, custom3, custom1"):
        derive_power_mode(PUBLISHED["jetson-nano/MAXN"], "10W")
    with pytest.raises(ValueError, match="derive"):
        derive_power_mode(PUBLISHED["raspberry-pi"], "5W")


def test_server_profile_from_cumulative_times():
    cumulative = ComputeProfile(fwd=(1.0, 3.0, 6.0), bwd=(0.5, 0.4, 2.0), device_class="server")
    server = ServerProfile.from_cumulative(cumulative)
    assert server.fwd == pytest.approx((5.0, 3.0, 0.0))
    assert server.bwd == pytest.approx((1.5, 1.6, 0.0))
    with pytest.raises(ValueError, match="last entry"):
        ServerProfile(fwd=(1.0, 3.0, 6.0), bwd=(0.5, 0.4, 2.0))


@pytest.mark.parametrize("name, expected", [
    ("nano-maxn", PUBLISHED["jetson-nano/MAXN"]),
    ("pi4", PUBLISHED["raspberry-pi"]),
    ("nano-5w", derive_power_mode(PUBLISHED["jetson-nano/MAXN"], "5W")),
    ("nano-custom1", derive_power_mode(PUBLISHED["jetson-nano/MAXN"], "custom1")),
    ("nano-custom3", derive_power_mode(PUBLISHED["jetson-nano/MAXN"], "custom3")),
])
def test_example_profiles_match_the_published_and_derived_numbers(name, expected):
    profile = ComputeProfile.load(EXAMPLES / f"{name}.json")
    assert profile.fwd == pytest.approx(expected.fwd, abs=1e-6)
    assert profile.bwd == pytest.approx(expected.bwd, abs=1e-6)
    assert (profile.device_class, profile.power_mode, profile.source) == \
        (expected.device_class, expected.power_mode, expected.source)


def test_example_server_profile_loads():
    server = ServerProfile.load(EXAMPLES / "server-example.json")
    assert server.n_splits == 7 and server.source == "measured"
    assert json.loads((EXAMPLES / "server-example.json").read_text())["note"]
