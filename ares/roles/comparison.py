"""What a testbed comparison (`ares bench SCENARIO`) measured, as typed results.

`ares.roles.testbed` runs each variant of a scenario and makes a `VariantResult` of it (one
`RoundResult` per round), written to the variant's `variant.json`; the comparison adds each
variant's ratios to FL (`VersusFL`) and writes the whole `Comparison` to `comparison.json`.
`ares.roles.compare_cmd` prints and plots it. The JSON is the results' fields in order, so the
files read as they always have (`as_json`).

Seconds are per round; "model" figures are the cost model's for the emulated profiles and link
rates; the oracle is the best split vector in that model; "adapted" rounds are those at least
`settle_rounds` after every change (`ares.roles.testbed.adapted_rounds`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

if TYPE_CHECKING:
    from ares.roles.testbed import Scenario

LinkMode = Literal["tc", "inprocess"]


@dataclass(frozen=True)
class RoundResult:
    """One round of one variant: measured, then modelled and predicted for what was used."""

    round: int
    measured_s: float                  # the round by the server's clock (first join to close)
    accuracy: float
    missed: list[str]
    splits: dict[str, int]             # of the devices whose uploads were merged
    energy_j: Optional[float]          # the devices' reported energy, summed (None: none reported)
    oracle_s: Optional[float]          # oracle_model_s + fixed_s
    oracle_any_s: Optional[float]      # the same over every codec and micro-batch count
    model_s: Optional[float]           # the model's round for the splits and options used, + fixed_s
    model_energy_j: Optional[float]
    fixed_s: Optional[float]           # the round outside its longest device session (no choice changes it)
    oracle_model_s: Optional[float]    # the best split vector's round in the model
    options: dict[str, str]            # each device's codec/k, e.g. "int8/k4"
    predicted_s: Optional[float]       # the controller's prediction at the round's start (from round 1)
    device_predicted_s: dict[str, float]
    device_measured_s: dict[str, float]  # each device's session, join to accepted upload
    power_modes: dict[str, str] = field(default_factory=dict)  # each Jetson's power mode in the round


@dataclass(frozen=True)
class VariantResult:
    """One variant's run of a scenario: its rounds and their means (`steady`: from round 1)."""

    scenario: str
    variant: str                       # as written in the scenario: none, fixed:1, straggler+int8+pipe4, ...
    label: str
    mode: str                          # none | fixed:N | adaptive
    policy: Optional[str]              # the adaptive policy; None otherwise
    codec: str
    micro_batches: int
    links: LinkMode
    rounds: list[RoundResult]
    mean_round_s: Optional[float]
    energy_per_round_j: Optional[float]
    model_energy_per_round_j: Optional[float]
    final_accuracy: Optional[float]
    oracle_round_s: Optional[float]
    model_round_s: Optional[float]
    adapted_rounds: list[int]
    adapted_round_s: Optional[float]
    adapted_oracle_s: Optional[float]
    adapted_oracle_any_s: Optional[float]
    vs_oracle: Optional[float]         # adapted rounds: measured over the oracle
    choice_vs_oracle: Optional[float]  # adapted rounds: the model's round for the splits used over the oracle
    overhead_s: Optional[float]        # measured minus modelled, steady rounds
    prediction_error: Optional[float]  # mean |predicted - measured| / measured, rounds without a change
    device_prediction_error: dict[str, float]
    worst_device_prediction_error: Optional[float]
    wall_s: Optional[float] = None
    results_dir: str = ""
    slower_than_profile: list[str] = field(default_factory=list)  # devices this machine could not pad
    # per Jetson, the power modes it ran in over the steady rounds, in order ("MAXN>custom3"); a
    # variant whose policy chooses modes only
    power_modes: dict[str, str] = field(default_factory=dict)
    # per device, where its J/round came from: "measured" (a power sensor), "modelled" (power table x
    # measured times) or "mixed" (both, in different rounds)
    energy_sources: dict[str, str] = field(default_factory=dict)
    # rounds over 1.1x their prediction whose longest session was a device the policy had slowed (a
    # power mode slower than its fastest) that overran its own prediction by over 10%
    slowed_overruns: list[int] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VersusFL:
    """A variant's figures as ratios to FL's (`none`) in the same comparison; None without FL."""

    time_vs_fl: Optional[float]
    energy_vs_fl: Optional[float]
    model_energy_vs_fl: Optional[float]
    accuracy_vs_fl: Optional[float]
    accuracy_points_vs_fl: Optional[float]  # (accuracy - FL's) x 100


@dataclass(frozen=True)
class ComparedVariant:
    """A variant's result beside FL's: in the JSON, one object with the ratios after the result."""

    result: VariantResult
    vs_fl: VersusFL

    def as_json(self) -> dict[str, Any]:
        return {**self.result.as_json(), **asdict(self.vs_fl)}


@dataclass(frozen=True)
class Comparison:
    """Every variant of a scenario, run one after another on the same links."""

    scenario: "Scenario"
    links: LinkMode
    variants: list[ComparedVariant]

    def as_json(self) -> dict[str, Any]:
        return {"scenario": self.scenario.model_dump(mode="json"), "links": self.links,
                "variants": [v.as_json() for v in self.variants]}

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.as_json(), indent=2))
