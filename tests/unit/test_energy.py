"""The power table and the published energy formula."""

from __future__ import annotations

import pytest

from ares.core.energy import POWER_TABLE, PowerModel, energy_j, power_model


@pytest.mark.parametrize("cls, mode, watts", [
    ("jetson-nano", "MAXN", (7.253, 2.320, 2.260)),
    ("jetson-nano", "5W", (4.205, 1.917, 1.912)),
    ("jetson-nano", "custom1", (2.396, 1.755, 1.754)),
    ("jetson-nano", "custom3", (2.396, 1.755, 1.754)),
    ("jetson-nano", "maxn", (7.253, 2.320, 2.260)),  # mode names match case-insensitively
    ("raspberry-pi", "", (6.4, 3.8, 3.1)),
])
def test_power_table_holds_the_published_nano_figures_and_the_pi_estimate(cls, mode, watts):
    model = power_model(cls, mode)
    assert (model.compute_w, model.tx_w, model.rx_w) == pytest.approx(watts)
    assert model.source == "modelled"


def test_unknown_device_lists_what_is_known():
    with pytest.raises(ValueError) as err:
        power_model("jetson-orin", "MAXN")
    for cls, mode in POWER_TABLE:
        assert cls in str(err.value)
    assert "jetson-nano/5W" in str(err.value) and "compute_w" in str(err.value)


def test_energy_is_power_times_time_per_state():
    maxn = power_model("jetson-nano", "MAXN")
    # 2 s computing, 0.5 s sending, 0.25 s receiving: 7.253*2 + 2.32*0.5 + 2.26*0.25
    assert energy_j(maxn, 2.0, 0.5, 0.25) == pytest.approx(16.231)
    assert energy_j(maxn, 0.0, 0.0, 0.0) == 0.0
    # Slower modes draw less power: the 5W mode at 1.6x the time still uses less energy than MAXN here.
    assert energy_j(power_model("jetson-nano", "5W"), 3.2, 0.5, 0.25) < energy_j(maxn, 2.0, 0.5, 0.25)


@pytest.mark.parametrize("kw", [{"compute_w": -1.0}, {"tx_w": float("nan")}, {"source": "guessed"}],
                         ids=["negative", "nan", "source"])
def test_power_model_validation(kw):
    with pytest.raises(ValueError):
        PowerModel(**{"compute_w": 1.0, "tx_w": 1.0, "rx_w": 1.0, **kw})


def test_measured_power_keeps_its_source():
    assert PowerModel(5.0, 2.0, 2.0, source="measured").source == "measured"
