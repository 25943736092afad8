"""What a server shard and its root say to each other, and how a shard's running sum travels.

A shard (ares.runtime.shard) calls its root (ares.runtime.root); the root never calls a shard:

    POST /v1/shards/{i}/beat                    JSON ShardBeat -> JSON RootClock, every POLL_S
    GET  /v1/shards/{i}/model                   -> bundle: the global model, meta ModelMeta
    PUT  /v1/shards/{i}/rounds/{r}/records      JSON ShardRecords: what the root records of round r
    POST /v1/shards/{i}/rounds/{r}/partial      bundle: the shard's running mean of round r, meta PartialMeta

Every request carries the job's shard token (`Authorization: Bearer`, from the file
`SHARD_TOKEN_NAME` in the tokens dir). Tensors travel as ARES bundles (ares.core.wire: raw
bytes, a JSON header, validated before use; never pickle). A bundle has no float64, so a
shard's float64 mean travels as two float32 tensors, `mean:KEY` (the mean rounded to float32)
and `residual:KEY` (what that rounding left out): their float64 sum is the mean to about 48
bits, so the root's merge equals one server's to float64 rounding. Integer buffers travel as
their running max, `max:KEY`. The records go apart from the tensors because a bundle's JSON
header holds at most 1 MiB and a thousand devices' reports may hold more.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Mapping, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

from ares.core.config import ServerConfig
from ares.core.fedavg import RunningMean
from ares.core.messages import BytesPerSecond, DeviceReport, DevicePhase, FailureReason, RoundPhase, Seconds

SHARD_TOKEN_NAME = "shard.token"  # in the tokens dir; cannot clash with a device name (DNS labels have no dots)
POLL_S = 0.2                      # a shard's beat period (sooner when it has a round's part to send)
MAX_COUNTERS = 64                 # counter names a beat may carry

# Offsets from a round's start, by a shard's clock (bounded; negative if its clock stepped back)
Offset = Annotated[float, Field(ge=-1e6, le=1e6)]
Name = Annotated[str, Field(max_length=64)]


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class DeviceSeen(_Msg):
    """A device's phase and split at its shard, as the root's status shows them."""

    phase: DevicePhase
    split: Optional[int] = Field(None, ge=0, le=255)


class ShardBeat(_Msg):
    """A shard's word to its root: where it is, and its devices that are not idle."""

    round: int = Field(..., ge=0)       # the round whose model the shard holds
    synced: bool                        # it holds the root's model of that round (false until its first)
    joined: bool                        # a device of it has joined that round (the root's round starts)
    devices: Optional[dict[Name, DeviceSeen]] = None  # None: as in its last beat
    counters: dict[Name, Annotated[int, Field(ge=0, le=1 << 53)]] = Field(default_factory=dict,
                                                                          max_length=MAX_COUNTERS)
    server_scale: float = Field(1.0, ge=1e-3, le=1e3)  # its live compute over its start-up profile


class RootClock(_Msg):
    """The root's answer to a beat: the round, its model and its deadline, and whether the root
    has this shard's part of it."""

    round: int
    rounds: int
    phase: RoundPhase
    opens_in_s: float = Field(..., ge=0)       # until the round takes joins (the gap after a round)
    deadline_in_s: Optional[float] = None      # until the round's deadline (None: no join yet); < 0: past
    closing: bool = False                      # the deadline passed: send what you have now
    reported: bool = False                     # the root has this shard's part of the round
    model_sha256: str
    failure: Optional[str] = None
    failure_reason: Optional[FailureReason] = None


class ModelMeta(_Msg):
    """The meta of the global model's bundle."""

    round: int = Field(..., ge=0)
    model_sha256: str = Field(..., min_length=64, max_length=64)


class DeviceOutcome(_Msg):
    """One device merged at a shard: what the root's history, status and telemetry need of it."""

    split: int = Field(..., ge=0, le=255)
    weight: float = Field(..., gt=0)            # its weight in the shard's running sum
    joined_s: Optional[Offset] = None           # from the shard's first join of the round
    uploaded_s: Optional[Offset] = None
    upload_bps: Optional[BytesPerSecond] = None  # the shard's figure for its upload's link
    report: DeviceReport


class ShardRecords(_Msg):
    """A shard's devices' part of a round, apart from its running sum (PartialMeta, tensors)."""

    round: int = Field(..., ge=0)
    started_ago_s: Optional[Seconds] = None    # the shard's first join of the round, this long before sending
    devices: dict[Name, DeviceOutcome] = {}    # merged into its running sum
    refused: list[Name] = []                   # uploads refused: they sit the round out
    joined: list[Name] = []                    # every device that joined the round here
    nonfinite: list[Name] = []                 # devices whose loss turned non-finite (divergence)


class PartialMeta(_Msg):
    """The meta of a shard's running-sum bundle."""

    round: int = Field(..., ge=0)
    weight: float = Field(..., ge=0)
    count: int = Field(..., ge=0)


def pack_partial(mean: RunningMean) -> dict[str, torch.Tensor]:
    """A running mean as bundle tensors: each float tensor's mean as a float32 pair, each integer
    buffer's max; none when nothing was folded in."""
    if not mean.count:
        return {}
    out: dict[str, torch.Tensor] = {}
    for key, value in mean.mean().items():
        high = value.to(torch.float32)
        out[f"mean:{key}"] = high
        out[f"residual:{key}"] = (value - high.to(torch.float64)).to(torch.float32)
    out.update({f"max:{key}": v for key, v in mean.maxes.items()})
    return out


def expected_partial(like: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The names, dtypes and shapes of a non-empty partial bundle for a model like `like`."""
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for key, value in like.items():
        if value.is_floating_point():
            out[f"mean:{key}"] = out[f"residual:{key}"] = (torch.float32, tuple(value.shape))
        else:
            out[f"max:{key}"] = (value.dtype, tuple(value.shape))
    return out


def unpack_partial(tensors: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Bundle tensors -> (float64 means, integer maxes), after checking that they are exactly those
    of a partial for a model like `like` (names, dtypes, shapes; ValueError says which is not)."""
    want = expected_partial(like)
    if tensors.keys() != want.keys():
        missing, extra = sorted(want.keys() - tensors.keys())[:3], sorted(tensors.keys() - want.keys())[:3]
        raise ValueError(f"a partial sum must hold the model's tensors: missing {missing}, unexpected {extra}")
    for name, (dtype, shape) in want.items():
        t = tensors[name]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"{name} is {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, expected "
                             f"{str(dtype).removeprefix('torch.')} {list(shape)}")
    means = {k: tensors[f"mean:{k}"].to(torch.float64) + tensors[f"residual:{k}"].to(torch.float64)
             for k, v in like.items() if v.is_floating_point()}
    maxes = {k: tensors[f"max:{k}"].clone() for k, v in like.items() if not v.is_floating_point()}
    return means, maxes


def partial_bytes(like: Mapping[str, torch.Tensor]) -> int:
    """Bytes of a partial bundle's tensors for a model like `like` (two float32 per float value)."""
    return sum(v.numel() * (8 if v.is_floating_point() else v.element_size()) for v in like.values())


def read_shard_token(cfg: ServerConfig) -> str:
    """The job's shard token: the file `shard.token` in the tokens dir, at least 16 characters.
    The root and every shard read the same file (one Secret key on Kubernetes)."""
    path = Path(cfg.tokens_dir) / SHARD_TOKEN_NAME
    if not path.is_file():
        raise ValueError(f"a job with shards > 1 needs the shards' token in {path}")
    token = path.read_text().strip()
    if len(token) < 16:
        raise ValueError(f"the shard token in {path} is shorter than 16 characters")
    return token
