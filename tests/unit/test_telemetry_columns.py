"""The telemetry as columns (`TelemetryColumns`): what a server sends a controller. It holds the
per-device form's figures device for device, a decision over it is the decision over that form, and
a reply that does not hold together is refused at the boundary."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from ares.core.messages import Telemetry, TelemetryColumns
from ares.core.optimiser import parse_policy
from ares.runtime.controller import arrays_from_telemetry, decide
from tests.unit.test_controller import same_arrays, varied_telemetry


@pytest.mark.parametrize("seed", range(3))
def test_columns_hold_the_per_device_figures_and_decide_the_same_plan(seed):
    t = varied_telemetry(seed, 60)
    columns = TelemetryColumns.model_validate_json(TelemetryColumns.of(t).model_dump_json())  # as a controller reads it
    assert columns.rows() == t
    assert len(columns.steps.device) == sum(len(d.measured_steps) for d in t.devices) > 20
    assert len(columns.sessions.device) == sum(len(d.sessions) for d in t.devices) > 20
    kw = dict(pinned={"d4": 2}, offer=[("fp32", 1), ("int8", 4)], power_modes=True, pinned_modes={"d5": "5W"})
    same_arrays(arrays_from_telemetry(columns, **kw), arrays_from_telemetry(t, **kw))
    for text in ("straggler", "ares"):
        assert decide(columns, parse_policy(text), **kw) == decide(t, parse_policy(text), **kw)


def _reply(**change) -> str:
    body = json.loads(TelemetryColumns.of(varied_telemetry(0, 30)).model_dump_json())
    for path, value in change.items():
        *parents, leaf = path.split("__")
        node = body
        for p in parents:
            node = node[p]
        node[leaf] = value(node[leaf]) if callable(value) else value
    return json.dumps(body)


@pytest.mark.parametrize("change,says", [
    ({"up_bps": lambda v: v[:-1]}, "column 'up_bps' has 29 entries for 30 devices"),
    ({"steps__step_s": lambda v: v[:-1]}, "steps: its columns differ in length"),
    ({"steps__device": lambda v: [*v[:-1], 30]}, "not one of the 30 devices"),
    ({"sessions__device": lambda v: list(reversed(v))}, "not grouped by device in order"),
    ({"steps__split": lambda v: [300, *v[1:]]}, "less than or equal to 255"),
    ({"steps__step_s": lambda v: [-1.0, *v[1:]]}, "greater than or equal to 0"),
    ({"steps__codec": lambda v: ["pickle", *v[1:]]}, "'fp32', 'fp16' or 'int8'"),
    ({"duplex": lambda v: ["simplex", *v[1:]]}, "'full' or 'half'"),
    ({"unknown": 1}, "Extra inputs are not permitted"),
])
def test_a_reply_that_does_not_hold_together_is_refused(change, says):
    with pytest.raises(ValidationError, match=says):
        TelemetryColumns.model_validate_json(_reply(**change))


def _first_infinite(profiles: list) -> list:
    i = next(i for i, p in enumerate(profiles) if p)
    return [*profiles[:i], [float("inf"), *profiles[i][1:]], *profiles[i + 1:]]


@pytest.mark.parametrize("column", ["fwd", "up_bps", "steps__up_bps"])
def test_non_finite_figures_are_refused(column):
    change = _first_infinite if column == "fwd" else (lambda v: [float("inf"), *v[1:]])
    with pytest.raises(ValidationError, match="finite"):
        TelemetryColumns.model_validate_json(_reply(**{column: change}))


def test_an_empty_fleet_reads_as_no_decision():
    t = varied_telemetry(0, 5).model_copy(update={"devices": []})
    columns = TelemetryColumns.of(t)
    assert columns.n_devices == 0 and columns.rows() == t and decide(columns, parse_policy("straggler")) is None
    assert Telemetry.model_validate_json(t.model_dump_json()) == t
