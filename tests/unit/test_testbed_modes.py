"""The testbed's reading of variants whose policy chooses power modes."""

import pytest

from ares.roles.comparison import RoundResult
from ares.roles.testbed import _slowed_overrun, in_modes, load_scenario, modes_used, timeline, variant_of


def test_modes_go_last_after_an_adaptive_policy():
    v = variant_of("straggler+auto+modes")
    assert v.power_modes and v.auto and v.policy == "straggler" and v.label == "straggler + auto (codec, k) + modes"
    assert variant_of("ares+int8+modes").codec == "int8" and variant_of("ares+int8+modes").power_modes
    assert not variant_of("straggler+auto").power_modes
    for bad in ("none+modes", "fixed:1+modes", "straggler+modes+auto"):
        with pytest.raises(ValueError):
            variant_of(bad)


def test_a_round_is_modelled_in_the_modes_it_ran_in():
    decisions = [{"round": "1", "device": "nano-maxn", "power_mode": "custom3"},
                 {"round": "3", "device": "nano-maxn", "power_mode": "MAXN"},
                 {"round": "1", "device": "pi4", "power_mode": ""}]
    assert modes_used(decisions, 0) == {} and modes_used(decisions, 2) == {"nano-maxn": "custom3"}
    assert modes_used(decisions, 3) == {"nano-maxn": "MAXN"}
    states = timeline(load_scenario("paper5"))[1]
    moved = in_modes(states, {"nano-maxn": "custom3"})
    assert moved["nano-maxn"].profile.power_mode == "custom3" and moved["nano-maxn"].profile.source == "derived"
    assert moved["nano-maxn"].profile.total(6) == pytest.approx(states["nano-maxn"].profile.total(6) * 1.5)
    assert moved["pi4"] == states["pi4"]


def round_result(measured: float, predicted: float, sessions: dict, predicted_sessions: dict, modes: dict):
    return RoundResult(round=2, measured_s=measured, accuracy=0.3, missed=[], splits={}, energy_j=None, oracle_s=None,
                       oracle_any_s=None, model_s=None, model_energy_j=None, fixed_s=None, oracle_model_s=None,
                       options={}, predicted_s=predicted, device_predicted_s=predicted_sessions,
                       device_measured_s=sessions, power_modes=modes)


def test_an_overrun_counts_against_the_modes_only_when_a_slowed_device_caused_it():
    slowed = round_result(12.0, 10.0, {"pi": 9.0, "nano": 11.5}, {"pi": 9.0, "nano": 9.5}, {"nano": "custom3"})
    assert _slowed_overrun(slowed)
    fastest = round_result(12.0, 10.0, {"pi": 9.0, "nano": 11.5}, {"pi": 9.0, "nano": 9.5}, {"nano": "MAXN"})
    pi_late = round_result(12.0, 10.0, {"pi": 11.8, "nano": 9.0}, {"pi": 9.0, "nano": 8.0}, {"nano": "custom3"})
    on_time = round_result(10.5, 10.0, {"pi": 9.0, "nano": 10.4}, {"pi": 9.0, "nano": 8.0}, {"nano": "custom3"})
    assert not any(map(_slowed_overrun, (fastest, pi_late, on_time)))
