"""Typed configuration shared by the server, the devices, the local runner and the operator.

One model per concern. The server's config is the single source of truth for training: devices
fetch it from the server at start-up (`GET /v1/config`), so a device pod needs only its name,
token, split file and data directory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ares.core.yamlfile import safe_load

DEFAULT_PORT = 43000  # the published prototype's port
CONTROLLER_TOKEN_NAME = "controller.token"  # cannot clash with a device name (DNS labels have no dots)
MAX_MICRO_BATCHES = 8  # concurrent step streams per device; the server's per-device request limit must exceed it
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainingConfig(_Strict):
    """Hyper-parameters; defaults are the published ARES ones."""

    rounds: int = Field(100, ge=1, le=100_000)
    batch_size: int = Field(100, ge=1, le=65_536)
    lr: float = Field(0.01, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    lr_decay_round: Optional[int] = Field(None, ge=1, description="round after which lr is x lr_decay; default rounds//2")
    lr_decay: float = Field(0.1, gt=0, le=1)
    max_steps_per_round: Optional[int] = Field(None, ge=1, description="cap local iterations per round (benchmarks)")
    seed: int = 0

    def lr_for_round(self, round_index: int) -> float:
        """Round indices start at 0; lr drops once half the rounds are done (published schedule)."""
        decay_at = self.lr_decay_round if self.lr_decay_round is not None else max(1, self.rounds // 2)
        return self.lr * (self.lr_decay if round_index >= decay_at else 1.0)


class DataConfig(_Strict):
    """Which data set, where it lives, and how it is cut into disjoint device shards."""

    name: Literal["cifar10", "synthetic", "synthetic-easy", "auto"] = Field(
        "auto", description="synthetic: the harder offline set (the default fallback); synthetic-easy: the "
        "saturating one (tests that only check that training works)")
    path: str = "datasets/CIFAR10"
    download: bool = False
    partition: Literal["iid", "dirichlet"] = "iid"
    beta: float = Field(0.5, gt=0, description="Dirichlet concentration for non-IID shards")
    synthetic_train: int = Field(5000, ge=10, description="synthetic training samples (all shards together)")
    synthetic_test: int = Field(1000, ge=10)
    seed: int = 0


class AggregationConfig(_Strict):
    """How uploads are bounded and merged. Costs in time and accuracy: README "Robustness"."""

    method: Literal["fedavg", "norm_clip", "median", "trimmed_mean"] = Field(
        "fedavg", description="fedavg: weighted by samples; norm_clip: every update scaled to at most clip_norm, "
        "then fedavg; median: coordinate-wise median; trimmed_mean: coordinate-wise mean without the "
        "trim_fraction highest and lowest values")
    max_update_norm: float = Field(1000.0, gt=0, description="an upload (device part + its server-side replica) "
                                   "farther than this L2 distance from the global model is refused or clipped "
                                   "(honest VGG5 rounds measured 0.1-12: 25 steps of 100 at lr 0.01)")
    on_large_update: Literal["refuse", "clip"] = "refuse"
    clip_norm: float = Field(10.0, gt=0, description="norm_clip: the largest update norm merged unscaled")
    trim_fraction: float = Field(0.2, ge=0, lt=0.5, description="trimmed_mean: share cut from each end")


class LimitsConfig(_Strict):
    """What one device may hold of the server at once (ares.runtime.limits)."""

    requests_per_device: int = Field(16, ge=1, description="concurrent requests per device (pipelined micro-batch "
                                     "steps are concurrent too); more get 429")
    buffered_mib_per_device: int = Field(512, ge=1, description="body bytes one device may have in flight")
    body_read_timeout_s: float = Field(30.0, gt=0, description="longest wait for the next piece of a body")
    join_wait_s: float = Field(20.0, ge=0, description="a join for a round not yet open waits this long "
                               "(on the event loop, holding no worker thread)")
    round_wait_s: float = Field(20.0, ge=0, description="the longest a `GET /v1/round?round=&wait=` long poll "
                                "is held before it is answered with the state as it is")


class ServerConfig(_Strict):
    """Everything the edge server needs. Written by `ares run` or by the operator (a ConfigMap)."""

    model: str = "vgg5"
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    devices: tuple[str, ...] = Field(..., min_length=1, description="device names, DNS labels")
    tokens_dir: str = Field(..., description="one file per device, named after it, holding its bearer token")
    codec: Literal["fp32", "fp16", "int8"] = Field("fp32", description="activations and gradients on the wire "
                                                   "(ares.core.codec); a device may override it")
    micro_batches: int = Field(1, ge=1, le=MAX_MICRO_BATCHES, description="pipelined split steps: each batch "
                               "goes as this many micro-batches on concurrent HTTP/2 streams; 1 = one request per batch")
    round_deadline_s: float = Field(600.0, gt=0, description="devices not done by then are left out of the round")
    checkpoint_dir: str = "checkpoints"
    host: str = "0.0.0.0"
    port: int = Field(DEFAULT_PORT, ge=1, le=65535)
    http_server: Literal["granian", "uvicorn"] = "granian"
    max_body_mib: int = Field(256, ge=1, le=4096)
    eval_batch_size: int = Field(500, ge=1)
    aggregation: AggregationConfig = AggregationConfig()
    limits: LimitsConfig = LimitsConfig()
    round_gap_s: float = Field(0.5, ge=0, le=600, description="joins for the next round wait this long after a "
                               "round closes, so the controller's new splits are in place before devices read them")
    shards: int = Field(1, ge=1, le=1024, description="server shards: 1 = one process holds every device's "
                        "session; k > 1 = a root (`ares server`) and k shard processes (`ares server --shard I "
                        "--root URL`), each holding the devices ares.core.sharding assigns it")
    shard_pins: dict[str, int] = Field(default_factory=dict, description="device name -> shard index, in place of "
                                       "the hashing (ares.core.sharding)")
    shard_wait_s: float = Field(10.0, gt=0, le=600, description="at a round's deadline the root waits up to this "
                                "long for the partial sums of the shards it heard from within this time; a shard "
                                "silent for longer counts as down and its devices miss the round")

    @field_validator("devices")
    @classmethod
    def _names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        bad = [n for n in names if not _DNS_LABEL.match(n)]
        if bad:
            raise ValueError(f"device names must be DNS labels (a-z, 0-9, '-'): {bad}")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate device names: {sorted(n for n in set(names) if names.count(n) > 1)}")
        return names

    @model_validator(mode="after")
    def _sharding(self) -> "ServerConfig":
        unknown = sorted(set(self.shard_pins) - set(self.devices))
        if unknown:
            raise ValueError(f"shard_pins names devices the job does not have: {unknown[:5]}")
        bad = sorted(d for d, i in self.shard_pins.items() if not 0 <= i < self.shards)
        if bad:
            raise ValueError(f"shard_pins put {bad[:5]} outside shards 0..{self.shards - 1}")
        if self.shards > 1 and self.aggregation.method not in ("fedavg", "norm_clip"):
            raise ValueError(f"aggregation.method {self.aggregation.method!r} needs every upload at once, so it "
                             "cannot be split over server shards; with shards > 1 use fedavg or norm_clip "
                             "(weighted means, merged from each shard's running sum)")
        return self

    def shard_of(self, device: str) -> int:
        return self.devices.index(device)


class DeviceSettings(_Strict):
    """What one device process needs to know locally; the rest comes from the server."""

    name: str
    server_url: str
    token_file: str
    split_file: str
    data_dir: Optional[str] = None  # overrides the server's data.path on this device
    power_file: Optional[str] = None  # written by the host-control sidecar (measured power)
    hostctl_file: Optional[str] = None  # the sidecar's report: the power mode in force (ares.runtime.hostmode)
    trainer_file: Optional[str] = None  # where the trainer says whether it is inside a round (for the sidecar)
    device_class: str = "cpu"
    power_mode: str = ""
    profile_file: Optional[str] = None  # emulate a device class: pad compute to this profile
    rate_limit_file: Optional[str] = None  # in-process link cap (bytes/s, JSON), re-read every step
    request_timeout_s: float = Field(120.0, gt=0)
    initial_split: Optional[int] = None
    micro_batches: Optional[int] = Field(None, ge=1, le=MAX_MICRO_BATCHES, description="overrides the server's")
    codec: Optional[Literal["fp32", "fp16", "int8"]] = None  # overrides the server's; its gradients come back in it
    duplex: Literal["full", "half"] = "full"  # half: the link's up and down share one rate (Wi-Fi)

    @model_validator(mode="after")
    def _label(self) -> "DeviceSettings":
        if not _DNS_LABEL.match(self.name):
            raise ValueError(f"device name {self.name!r} must be a DNS label (a-z, 0-9, '-')")
        return self


def load_yaml_model(model: type[BaseModel], path: str | Path) -> BaseModel:
    """Load a YAML/JSON file into a model; errors name the file."""
    text = Path(path).read_text()
    try:
        data = safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML/JSON: {exc}") from exc
    return model.model_validate(data)
