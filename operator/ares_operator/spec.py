"""The AresTrainingJob spec as typed models, with the CRD's defaults.

The API server fills defaults from the schema, but the operator must not depend on that (an
older CRD, an emulator, a unit test): it reads every spec through `parse_spec`, so a field
missing from the dict gets the same default here as in `crds/aresjobs.ares.io.yaml`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from ares.runtime.controller import offer_pairs


class _Spec(BaseModel):
    # camelCase in YAML, snake_case in Python; unknown fields ignored (the schema prunes them).
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True, extra="ignore")


class DatasetSpec(_Spec):
    name: Literal["cifar10", "synthetic", "synthetic-easy", "auto"] = "auto"
    path: str = "/var/lib/ares/datasets/CIFAR10"
    partition: Literal["iid", "dirichlet"] = "iid"
    beta: float = Field(0.5, gt=0)
    synthetic_train: int = Field(5000, ge=10)
    synthetic_test: int = Field(1000, ge=10)
    seed: int = 0


Codec = Literal["fp32", "fp16", "int8"]
MicroBatches = Annotated[int, Field(ge=1, le=8)]


class OfferSpec(_Spec):
    """What the adaptive controller may hand each device beside its split (`ares.io/step-options`)."""

    codecs: tuple[Codec, ...] = Field((), max_length=3)
    micro_batches: tuple[MicroBatches, ...] = Field((), max_length=8)


class TrainingSpec(_Spec):
    rounds: int = Field(100, ge=1, le=100_000)
    batch_size: int = Field(100, ge=1, le=65_536)
    lr: float = Field(0.01, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    lr_decay_round: Optional[int] = Field(None, ge=1)
    lr_decay: float = Field(0.1, gt=0, le=1)
    max_steps_per_round: Optional[int] = Field(None, ge=1)
    seed: int = 0
    codec: Codec = "fp32"
    micro_batches: int = Field(1, ge=1, le=8)
    offer: OfferSpec = OfferSpec()
    aggregation: "AggregationSpec" = Field(default_factory=lambda: AggregationSpec())

    def offer_pairs(self) -> tuple[tuple[str, int], ...]:
        """The (codec, micro-batches) pairs offered, the job's own first; () without an offer."""
        return offer_pairs(self.codec, self.micro_batches, self.offer.codecs, self.offer.micro_batches)


class AggregationSpec(_Spec):
    method: Literal["fedavg", "norm_clip", "median", "trimmed_mean"] = "fedavg"
    max_update_norm: float = Field(1000.0, gt=0)
    on_large_update: Literal["refuse", "clip"] = "refuse"
    clip_norm: float = Field(10.0, gt=0)
    trim_fraction: float = Field(0.2, ge=0, lt=0.5)


class SplitSpec(_Spec):
    mode: Literal["adaptive", "fixed", "none"] = "adaptive"
    policy: Literal["ares", "straggler"] = "straggler"
    alpha: float = Field(0.5, ge=0, le=1)
    point: Optional[int] = Field(None, ge=0)
    reoptimise_interval_seconds: int = Field(30, ge=1, le=86_400)


class _Scheduling(_Spec):
    """Where and how a pod is scheduled: passed to the pod spec as given (core/v1 shapes)."""

    node_name: Optional[str] = None
    node_selector: dict[str, str] = {}
    tolerations: tuple[dict[str, Any], ...] = ()
    affinity: dict[str, Any] = {}
    image_pull_secrets: tuple[dict[str, Any], ...] = ()
    priority_class_name: Optional[str] = None


class ServerSpec(_Scheduling):
    image: Optional[str] = None
    resources: dict[str, Any] = {}
    checkpoint_claim: Optional[str] = None


class DeviceSpec(_Scheduling):
    name: str
    device_class: Literal["jetson-nano", "jetson-orin", "raspberry-pi", "cpu"]
    power_mode: Literal["MAXN", "5W", "custom1", "custom3", ""] = ""
    bandwidth: Optional[str] = None
    split: Optional[int] = Field(None, ge=0)
    image: Optional[str] = None
    resources: dict[str, Any] = {}


class RunPolicySpec(_Spec):
    backoff_limit: int = Field(3, ge=0, le=100)
    server_backoff_limit: int = Field(3, ge=0, le=100)
    round_deadline_seconds: float = Field(600.0, gt=0)
    ttl_seconds_after_finished: Optional[int] = Field(None, ge=0)
    active_deadline_seconds: Optional[int] = Field(None, ge=1)
    clean_pod_policy: Literal["None", "Running", "All"] = "Running"
    suspend: bool = False


class JobSpec(_Spec):
    model: str = "vgg5"
    dataset: DatasetSpec = DatasetSpec()
    training: TrainingSpec = TrainingSpec()
    split: SplitSpec = SplitSpec()
    server: ServerSpec = ServerSpec()
    devices: tuple[DeviceSpec, ...] = Field(..., min_length=1)
    run_policy: RunPolicySpec = RunPolicySpec()

    def device(self, name: str) -> DeviceSpec:
        return next(d for d in self.devices if d.name == name)


def parse_spec(spec: Mapping[str, Any]) -> JobSpec:
    """Raises pydantic.ValidationError on a spec the schema should have refused."""
    return JobSpec.model_validate(dict(spec))
