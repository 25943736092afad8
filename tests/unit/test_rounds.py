"""ares.core.rounds: a closed round's record reads and writes the JSON records have always had,
older records included, and the figures read off it."""

from __future__ import annotations

import json
import math

import pytest

from ares.core.messages import StepTimings
from ares.core.rounds import DeviceRound, RoundRecord, load_history, parse_history
from tests.support import device_round, round_record


# What the server writes for a round today (every field), and for one written before sessions,
# latency, the steps' time and the close time were kept: key for key, in this order.
CURRENT = {"round": 2, "accuracy": 0.41, "loss": 1.7, "closed_by": "deadline", "duration_s": 12.5, "close_s": 0.3,
           "devices": {"nano": {"split": 3, "samples": 100, "joined_s": 0.1, "uploaded_s": 11.9,
                                **StepTimings(steps=5, device_fwd_s=0.1, device_bwd_s=0.2, up_bps=2.5e6, down_bps=2.4e6,
                                              round_s=11.2, energy_j=40.0, energy_source="modelled", latency_s=0.004,
                                              steps_s=10.5).model_dump()}},
           "missed": ["pi"]}
OLDER = {"round": 0, "accuracy": 0.1, "loss": 2.3, "closed_by": "all devices done", "duration_s": 30.0,
         "devices": {"pi": {"split": 6, "samples": 500, "steps": 5, "device_fwd_s": 1.8, "device_bwd_s": 2.0,
                            "up_bps": None, "down_bps": None, "round_s": 20.0, "energy_j": None,
                            "energy_source": "none"}},
         "missed": []}


@pytest.mark.parametrize("stored", [CURRENT, OLDER], ids=["current", "older"])
def test_a_stored_record_reads_and_writes_back_as_it_was(stored):
    record = RoundRecord.model_validate(stored)
    assert json.dumps(record.as_json()) == json.dumps(stored)


def test_the_device_fields_are_the_reported_timings_after_split_samples_and_session():
    timings = list(StepTimings.model_fields)
    assert list(DeviceRound.model_fields) == ["split", "samples", "joined_s", "uploaded_s", *timings]


def test_an_older_record_reads_as_none_where_it_has_nothing():
    record = RoundRecord.model_validate(OLDER)
    assert record.close_s is None and record.devices["pi"].steps_s is None and record.devices["pi"].latency_s is None
    assert record.sessions() == {} and record.outside_sessions() is None


def test_nan_accuracy_and_unknown_fields_survive_the_round_trip(tmp_path):
    stored = {**CURRENT, "accuracy": float("nan"), "from_elsewhere": {"k": 1}}
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"round": 3, "model": "vgg5", "history": [stored]}))
    [record] = load_history(state)
    assert math.isnan(record.accuracy)
    assert json.dumps(record.as_json()) == json.dumps(stored)  # NaN as the server has always written it


def test_a_record_is_fixed_once_made():
    with pytest.raises(ValueError):
        round_record(0).round = 1


def test_closed_by_is_one_of_the_two_reasons():
    with pytest.raises(ValueError):
        parse_history([{**CURRENT, "closed_by": "tired"}])


def test_sessions_are_join_to_upload_and_the_rest_of_the_round_is_outside_them():
    record = round_record(1, duration_s=12.0, devices={
        "a": device_round(joined_s=0.5, uploaded_s=10.5), "b": device_round(joined_s=1.0, uploaded_s=6.0),
        "c": device_round()})  # no session: a record from before sessions were kept
    assert record.sessions() == {"a": 10.0, "b": 5.0}
    assert record.outside_sessions() == 2.0
    assert record.devices["a"].session_s == 10.0 and record.devices["c"].session_s is None
