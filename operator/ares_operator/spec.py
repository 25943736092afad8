"""The AresTrainingJob spec as typed models, with the CRD's defaults and bounds.

The API server fills defaults from the schema and refuses what it bounds, but the operator must
not depend on that (an older CRD, an emulator, a unit test): it reads every spec through
`parse_spec`, so a field missing from the dict gets the same default here as in
`crds/aresjobs.ares.io.yaml`, and a value the schema refuses (a number beyond its maximum, a
negative quantity, a toleration with an unknown operator) is refused here too.
tests/unit/test_crd_schema.py walks both and checks that they agree.

Scheduling fields (tolerations, affinity, resources, imagePullSecrets) stay the plain dicts the pod spec
takes; each is checked against a model of its own (`_CheckedBy`) and passed on unchanged.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Mapping, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from ares.runtime.controller import offer_pairs

# --- Bounds shared with the CRD ----------------------------------------------------------------
SEED_MAX = 2**31 - 1                  # seeds are 0..2^31-1 (every generator takes them)
ROUNDS_MAX = 100_000
SYNTHETIC_MAX = 1_000_000             # every pod generates the whole set in memory, 12 KiB a sample
STEPS_MAX = 1_000_000
NORM_MAX = 1_000_000.0
BETA_MAX = 1000.0
ROUND_DEADLINE_MAX_S = 7 * 86_400     # 7 days
LONG_MAX_S = 365 * 86_400             # ttlSecondsAfterFinished, activeDeadlineSeconds, tolerationSeconds
SPLIT_MAX = 63
BANDWIDTH_MAX_KBIT = 100_000_000      # 100gbit
SHARDS_MAX = 64                       # server shards a job may have (spec.server.shards)
DEVICES_MAX = 1000                    # per job: the size the operator's tick, the job object and
                                      # admission (CEL cost) are measured at (docs/limits.md)

PATH_PATTERN = r"^(/[^/]+)+$"         # absolute, no empty segment, no trailing '/'
_DOT_SEGMENT = re.compile(r"/[.][.]?(/|$)")
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
BANDWIDTH_PATTERN = r"^[0-9]+([.][0-9]+)?(kbit|mbit|gbit)$"
TOLERATION_KEY_PATTERN = (r"^(([a-z0-9]([-a-z0-9]*[a-z0-9])?)(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                          r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$|^$")
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
QUANTITY_PATTERN = (r"^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
                    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
_QUANTITY = re.compile(QUANTITY_PATTERN)
_STANDARD_RESOURCES = frozenset({"cpu", "memory", "ephemeral-storage"})
_HUGEPAGES = re.compile(r"^hugepages-[0-9]+([KMGTPE]i|[kMGTPE])?$")
_EXTENDED_RESOURCE = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?[.])*[a-z0-9]([-a-z0-9]*[a-z0-9])?/"
                                r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


class _Spec(BaseModel):
    # camelCase in YAML, snake_case in Python; unknown fields ignored (the schema prunes them).
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True, extra="ignore")


class _CheckedBy:
    """After-validator: the value must parse as `shape` (a model, or a tuple of one); the value
    itself (a plain dict or tuple of dicts, passed to the pod spec as given) is kept unchanged."""

    def __init__(self, shape: Any) -> None:
        self.shape = shape
        self._adapter = TypeAdapter(shape)

    def __call__(self, value: Any) -> Any:
        try:
            self._adapter.validate_python(value)
        except ValidationError as exc:
            raise ValueError("; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(value)'}: "
                                       f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())) from None
        return value


# --- dataset -------------------------------------------------------------------------------------

def _no_dot_segments(path: str) -> str:
    if _DOT_SEGMENT.search(path):
        raise ValueError("dataset.path must be an absolute path without '.', '..' or empty segments")
    return path


class DatasetSpec(_Spec):
    name: Literal["cifar10", "synthetic", "synthetic-easy", "auto"] = "auto"
    path: Annotated[str, Field(max_length=1024, pattern=PATH_PATTERN),
                    AfterValidator(_no_dot_segments)] = "/var/lib/ares/datasets/CIFAR10"
    partition: Literal["iid", "dirichlet"] = "iid"
    beta: float = Field(0.5, gt=0, le=BETA_MAX)
    synthetic_train: int = Field(5000, ge=10, le=SYNTHETIC_MAX)
    synthetic_test: int = Field(1000, ge=10, le=SYNTHETIC_MAX)
    seed: int = Field(0, ge=0, le=SEED_MAX)


# --- training ------------------------------------------------------------------------------------

Codec = Literal["fp32", "fp16", "int8"]
MicroBatches = Annotated[int, Field(ge=1, le=8)]


class OfferSpec(_Spec):
    """What the adaptive controller may hand each device beside its split (`ares.io/step-options`)."""

    codecs: tuple[Codec, ...] = Field((), max_length=3)
    micro_batches: tuple[MicroBatches, ...] = Field((), max_length=8)


class AggregationSpec(_Spec):
    method: Literal["fedavg", "norm_clip", "median", "trimmed_mean"] = "fedavg"
    max_update_norm: float = Field(1000.0, gt=0, le=NORM_MAX)
    on_large_update: Literal["refuse", "clip"] = "refuse"
    clip_norm: float = Field(10.0, gt=0, le=NORM_MAX)
    trim_fraction: float = Field(0.2, ge=0, lt=0.5)


class TrainingSpec(_Spec):
    rounds: int = Field(100, ge=1, le=ROUNDS_MAX)
    batch_size: int = Field(100, ge=1, le=65_536)
    lr: float = Field(0.01, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    lr_decay_round: Optional[int] = Field(None, ge=1, le=ROUNDS_MAX)
    lr_decay: float = Field(0.1, gt=0, le=1)
    max_steps_per_round: Optional[int] = Field(None, ge=1, le=STEPS_MAX)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    codec: Codec = "fp32"
    micro_batches: int = Field(1, ge=1, le=8)
    offer: OfferSpec = OfferSpec()
    aggregation: AggregationSpec = AggregationSpec()

    def offer_pairs(self) -> tuple[tuple[str, int], ...]:
        """The (codec, micro-batches) pairs offered, the job's own first; () without an offer."""
        return offer_pairs(self.codec, self.micro_batches, self.offer.codecs, self.offer.micro_batches)


# --- split ---------------------------------------------------------------------------------------

class SplitSpec(_Spec):
    mode: Literal["adaptive", "fixed", "none"] = "adaptive"
    policy: Literal["ares", "straggler"] = "straggler"
    alpha: float = Field(0.5, ge=0, le=1)
    point: Optional[int] = Field(None, ge=0, le=SPLIT_MAX)
    reoptimise_interval_seconds: int = Field(30, ge=1, le=86_400)
    # adaptive only: the policy also chooses each Jetson's power mode (a device's powerMode pins it)
    choose_power_modes: bool = False
    # adaptive straggler only: each shard's server shared by its offloaders, in the policy's model
    share_server: bool = False

    @model_validator(mode="after")
    def _adaptive_only(self) -> "SplitSpec":
        if self.choose_power_modes and self.mode != "adaptive":
            raise ValueError("split.choosePowerModes is only for mode adaptive")
        if self.share_server and (self.mode != "adaptive" or self.policy != "straggler"):
            raise ValueError("split.shareServer is only for mode adaptive with policy straggler")
        return self


# --- scheduling (server and devices) -------------------------------------------------------------

class TolerationSpec(_Spec):
    """A core/v1 toleration, with the rules the API server applies to a pod's."""

    key: Optional[str] = Field(None, max_length=316, pattern=TOLERATION_KEY_PATTERN)
    operator: Optional[Literal["Exists", "Equal"]] = None
    value: Optional[str] = Field(None, max_length=63, pattern=LABEL_VALUE_PATTERN)
    effect: Optional[Literal["NoSchedule", "PreferNoSchedule", "NoExecute", ""]] = None
    toleration_seconds: Optional[int] = Field(None, ge=0, le=LONG_MAX_S)

    @model_validator(mode="after")
    def _consistent(self) -> "TolerationSpec":
        if not self.key and self.operator != "Exists":
            raise ValueError("a toleration without a key must have operator Exists")
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator Exists takes no value")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds is only for effect NoExecute")
        return self


LabelValue = Annotated[str, Field(max_length=63)]
QualifiedName = Annotated[str, Field(max_length=316)]


class NodeSelectorRequirementSpec(_Spec):
    key: QualifiedName
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    values: tuple[LabelValue, ...] = Field((), max_length=64)


class NodeSelectorTermSpec(_Spec):
    match_expressions: tuple[NodeSelectorRequirementSpec, ...] = Field((), max_length=16)
    match_fields: tuple[NodeSelectorRequirementSpec, ...] = Field((), max_length=16)


class NodeSelectorSpec(_Spec):
    node_selector_terms: tuple[NodeSelectorTermSpec, ...] = Field(..., min_length=1, max_length=16)


class PreferredSchedulingTermSpec(_Spec):
    weight: int = Field(..., ge=1, le=100)
    preference: NodeSelectorTermSpec


class NodeAffinitySpec(_Spec):
    required_during_scheduling_ignored_during_execution: Optional[NodeSelectorSpec] = None
    preferred_during_scheduling_ignored_during_execution: tuple[PreferredSchedulingTermSpec, ...] = \
        Field((), max_length=16)


class LabelSelectorRequirementSpec(_Spec):
    key: QualifiedName
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: tuple[LabelValue, ...] = Field((), max_length=64)


class LabelSelectorSpec(_Spec):
    match_labels: dict[str, LabelValue] = Field({}, max_length=64)
    match_expressions: tuple[LabelSelectorRequirementSpec, ...] = Field((), max_length=16)


class PodAffinityTermSpec(_Spec):
    label_selector: Optional[LabelSelectorSpec] = None
    namespace_selector: Optional[LabelSelectorSpec] = None
    namespaces: tuple[LabelValue, ...] = Field((), max_length=64)
    topology_key: QualifiedName
    match_label_keys: tuple[QualifiedName, ...] = Field((), max_length=16)
    mismatch_label_keys: tuple[QualifiedName, ...] = Field((), max_length=16)


class WeightedPodAffinityTermSpec(_Spec):
    weight: int = Field(..., ge=1, le=100)
    pod_affinity_term: PodAffinityTermSpec


class PodAffinitySpec(_Spec):
    required_during_scheduling_ignored_during_execution: tuple[PodAffinityTermSpec, ...] = Field((), max_length=16)
    preferred_during_scheduling_ignored_during_execution: tuple[WeightedPodAffinityTermSpec, ...] = \
        Field((), max_length=16)


class AffinitySpec(_Spec):
    """core/v1 Affinity, as the CRD types it."""

    node_affinity: Optional[NodeAffinitySpec] = None
    pod_affinity: Optional[PodAffinitySpec] = None
    pod_anti_affinity: Optional[PodAffinitySpec] = None


class SecretRefSpec(_Spec):
    name: str = Field(..., max_length=253)


def _resource_name(name: str) -> str:
    if (name in _STANDARD_RESOURCES or _HUGEPAGES.match(name)
            or (_EXTENDED_RESOURCE.match(name) and "kubernetes.io/" not in name and not name.startswith("requests."))):
        return name
    raise ValueError(f"resource name {name!r}: resource names are cpu, memory, ephemeral-storage, "
                     "hugepages-<size> or an extended resource with a domain, such as nvidia.com/gpu")


def _quantity(value: Any) -> Union[int, str]:
    """A non-negative YAML integer (cpu: 2) or a string such as 500m or 2Gi, never '-1'."""
    if isinstance(value, int) and not isinstance(value, bool):
        negative = value < 0
    elif isinstance(value, str):
        negative = value.startswith("-")
        if not negative and not _QUANTITY.match(value):
            raise ValueError(f"{value!r} is not a resource quantity (e.g. 500m, 2Gi or 2)")
    else:
        raise ValueError(f"{value!r} is not a resource quantity (e.g. 500m, 2Gi or 2)")
    if negative:
        raise ValueError("a resource quantity must not be negative (e.g. 500m, 2Gi or 2)")
    return value


ResourceName = Annotated[str, AfterValidator(_resource_name)]
Quantity = Annotated[Any, AfterValidator(_quantity)]


class ResourcesSpec(_Spec):
    requests: dict[ResourceName, Quantity] = Field({}, max_length=16)
    limits: dict[ResourceName, Quantity] = Field({}, max_length=16)


Tolerations = Annotated[tuple[dict[str, Any], ...], Field(max_length=64),
                        AfterValidator(_CheckedBy(tuple[TolerationSpec, ...]))]
Resources = Annotated[dict[str, Any], AfterValidator(_CheckedBy(ResourcesSpec))]
Affinity = Annotated[dict[str, Any], AfterValidator(_CheckedBy(AffinitySpec))]
PullSecrets = Annotated[tuple[dict[str, Any], ...], Field(max_length=16),
                        AfterValidator(_CheckedBy(tuple[SecretRefSpec, ...]))]
NodeSelector = Annotated[dict[str, LabelValue], Field(max_length=64)]
Image = Annotated[str, Field(min_length=1, max_length=512)]


class _Scheduling(_Spec):
    """Where and how a pod is scheduled: passed to the pod spec as given (core/v1 shapes)."""

    node_name: Optional[str] = Field(None, max_length=253)
    node_selector: NodeSelector = {}
    tolerations: Tolerations = ()
    affinity: Affinity = {}
    image_pull_secrets: PullSecrets = ()
    priority_class_name: Optional[str] = Field(None, max_length=253)


class ServerSpec(_Scheduling):
    image: Optional[Image] = None
    resources: Resources = {}
    checkpoint_claim: Optional[str] = Field(None, max_length=253)
    # k > 1: a root server pod plus k shard pods, each holding the sessions of the devices
    # ares.core.sharding assigns it (docs/how-it-works/shards.md); 1: one server pod.
    shards: int = Field(1, ge=1, le=SHARDS_MAX)


def _bandwidth_in_range(rate: Optional[str]) -> Optional[str]:
    if rate is not None:
        kbit = float(rate[:-4]) * {"kbit": 1, "mbit": 1000, "gbit": 1_000_000}[rate[-4:]]
        if not 0 < kbit <= BANDWIDTH_MAX_KBIT:
            raise ValueError("bandwidth must be above 0 and at most 100gbit")
    return rate


class DeviceSpec(_Scheduling):
    name: str = Field(..., max_length=40, pattern=NAME_PATTERN)
    device_class: Literal["jetson-nano", "jetson-orin", "raspberry-pi", "cpu"]
    power_mode: Literal["MAXN", "5W", "custom1", "custom3", ""] = ""
    bandwidth: Annotated[Optional[str], Field(max_length=24, pattern=BANDWIDTH_PATTERN),
                         AfterValidator(_bandwidth_in_range)] = None
    split: Optional[int] = Field(None, ge=0, le=SPLIT_MAX)
    # the shard that holds its session (a job with server.shards > 1), in place of the hashing
    shard: Optional[int] = Field(None, ge=0, le=SHARDS_MAX - 1)
    image: Optional[Image] = None
    resources: Resources = {}


# --- run policy ----------------------------------------------------------------------------------

class RunPolicySpec(_Spec):
    backoff_limit: int = Field(3, ge=0, le=100)
    server_backoff_limit: int = Field(3, ge=0, le=100)
    round_deadline_seconds: float = Field(600.0, gt=0, le=ROUND_DEADLINE_MAX_S)
    ttl_seconds_after_finished: Optional[int] = Field(None, ge=0, le=LONG_MAX_S)
    active_deadline_seconds: Optional[int] = Field(None, ge=1, le=LONG_MAX_S)
    clean_pod_policy: Literal["None", "Running", "All"] = "Running"
    suspend: bool = False


class JobSpec(_Spec):
    # Known models are checked by validation.py against constants.MODEL_LAYERS (the CRD's enum),
    # with a message that lists them.
    model: str = "vgg5"
    dataset: DatasetSpec = DatasetSpec()
    training: TrainingSpec = TrainingSpec()
    split: SplitSpec = SplitSpec()
    server: ServerSpec = ServerSpec()
    devices: tuple[DeviceSpec, ...] = Field(..., min_length=1, max_length=DEVICES_MAX)
    run_policy: RunPolicySpec = RunPolicySpec()

    def device(self, name: str) -> DeviceSpec:
        return next(d for d in self.devices if d.name == name)

    def shard_pins(self) -> dict[str, int]:
        """The devices pinned to a shard (`devices[].shard`), by name."""
        return {d.name: d.shard for d in self.devices if d.shard is not None}


def parse_spec(spec: Mapping[str, Any]) -> JobSpec:
    """Raises pydantic.ValidationError on a spec the schema should have refused."""
    return JobSpec.model_validate(dict(spec))
