"""JSON messages between the server, the devices and the controller (operator or local runner).

Tensors never travel in these: they go in binary frames (`ares.core.wire`). These models are what
`GET /v1/config`, `GET /v1/status`, `GET /v1/telemetry` return and what a device reports with its
weights at the end of a round.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ares.core.config import ServerConfig

# What a device may report is bounded, so no product of its figures (telemetry scales profiles)
# can overflow to Infinity and break /v1/status or /v1/telemetry for everyone.
Seconds = Annotated[float, Field(ge=0, le=1e6)]
BytesPerSecond = Annotated[float, Field(gt=0, le=1e12)]
Label = Annotated[str, Field(max_length=64)]

RoundPhase = Literal["waiting", "training", "finished", "failed"]
DevicePhase = Literal["idle", "training", "uploaded", "missed", "refused"]
# Why a run failed, as `ServerStatus.failure_reason` carries it (the operator reads it):
# diverged: every device's loss was non-finite, rounds in a row.
FailureReason = Literal["diverged"]


class _Msg(BaseModel):
    # Non-finite numbers are refused at the boundary of every message: one Infinity in a report
    # would otherwise reach /v1/status, which JSON cannot carry.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class JoinRequest(_Msg):
    round: int = Field(..., ge=0)
    split: int = Field(..., ge=0)


class JoinReply(_Msg):
    """Sent as the JSON meta of the weights bundle the server returns on join."""

    round: int
    split: int
    lr: float
    momentum: float
    batch_size: int
    max_steps: Optional[int] = None
    deadline_unix: float


class StepTimings(_Msg):
    """What a device measured during a round, uploaded with its weights."""

    steps: int = Field(0, ge=0, le=10**9)
    device_fwd_s: Seconds = 0.0   # mean per step, device part
    device_bwd_s: Seconds = 0.0
    up_bps: Optional[BytesPerSecond] = None    # EWMA bytes/s device -> server
    down_bps: Optional[BytesPerSecond] = None  # EWMA bytes/s server -> device
    round_s: Seconds = 0.0
    energy_j: Optional[float] = Field(None, ge=0, le=1e9)
    energy_source: Literal["measured", "modelled", "none"] = "none"
    latency_s: Optional[Seconds] = None  # per-request round trip: the fastest small request (status) seen
    steps_s: Seconds = 0.0  # wall time of all the round's steps together (the rest of its session is fixed cost)


# How many of a setting's last rounds a device reports (`StepSample`s) and the controller averages
# their excess over the model: one noisy round is not taken for the next.
STEP_ROUNDS = 3

# A device's link estimate is a moving mean of seconds per byte with this weight on each new
# transfer (ares.runtime.profiler.Throughput). The controller folds in the server's own figure for
# a device's last upload the same way: the report it carried was written before that upload.
LINK_SMOOTHING = 0.5

# A transfer smaller than this says little about the link: its time is mostly the request's
# round trip, and a small reply's body can arrive with its headers (a body read time near 0
# would claim a link of GB/s).
MIN_SAMPLE_BYTES = 64 << 10
# The server's own figure for an upload needs more: it starts timing when the request's head
# reaches Python, and its event loop, busy with other devices, can add tens of ms to a body's
# end: folded in, its figure for a Nano's 79 KB upload at split 3 on a 50 Mbit/s link had that
# Nano's next round predicted at 3.7 s for 2.6 s (`ares bench bandwidth-drop`). At the local
# split, where the figure matters, VGG5's weights are 2.3 MB.
MIN_UPLOAD_SAMPLE_BYTES = 1 << 20


class StepSample(_Msg):
    """A device's offloaded steps in one round with one split, codec and k: their mean wall time,
    forward to optimiser step, and what they ran under (the link estimates and the compute speed of
    that round), so the controller can hold each against the model of its own round."""

    split: int = Field(..., ge=0, le=255)
    codec: Literal["fp32", "fp16", "int8"]
    micro_batches: int = Field(..., ge=1, le=64)
    step_s: Seconds
    up_bps: Optional[BytesPerSecond] = None    # None: the report's own estimates
    down_bps: Optional[BytesPerSecond] = None
    compute_scale: float = Field(1.0, gt=0, le=1e3)  # its round's compute time over the report's profile


class DeviceReport(_Msg):
    """JSON meta of the weights bundle a device uploads at the end of a round."""

    round: int = Field(..., ge=0)
    split: int = Field(..., ge=0)
    samples: int = Field(..., ge=1)   # at most what the server assigned the device (checked there)
    timings: StepTimings = StepTimings()
    device_class: Label = "cpu"
    power_mode: Label = ""
    # the device's measured compute profile for every split (per batch), from its profiler
    profile_fwd: Optional[list[Seconds]] = Field(None, max_length=256)
    profile_bwd: Optional[list[Seconds]] = Field(None, max_length=256)
    profile_batch: Optional[int] = Field(None, ge=1, le=1 << 20)
    duplex: Literal["full", "half"] = "full"  # half: up and down share one rate (Wi-Fi); a device setting
    measured_steps: list[StepSample] = Field(default_factory=list, max_length=64)  # oldest first
    # the (codec, k) this round ran with: with `split`, the setting a policy keeps it at unless clearly beaten
    codec: Optional[Literal["fp32", "fp16", "int8"]] = None
    micro_batches: Optional[int] = Field(None, ge=1, le=64)
    # power modes: the one this round ran in is `power_mode`; a mode the host could not switch to
    # (with why, in words), and how long its last switch took, as the host-control sidecar reports them
    power_mode_failed: Label = ""
    power_mode_problem: str = Field("", max_length=500)
    switch_s: Optional[Seconds] = None


class DeviceStatus(_Msg):
    split: Optional[int] = None
    phase: DevicePhase = "idle"
    last_round: Optional[int] = None
    up_bps: Optional[float] = None
    down_bps: Optional[float] = None
    energy_j: Optional[float] = None        # last completed round
    energy_source: str = "none"
    round_s: Optional[float] = None


class RoundState(_Msg):
    """Where the rounds stand, and nothing of the fleet: what a waiting device polls (`GET /v1/round`),
    the same size whatever the number of devices."""

    round: int               # index of the round in progress (== rounds when finished)
    rounds: int
    phase: RoundPhase
    accepting: bool = True   # the current round takes joins now (False during the gap after a round)

    def opens_for(self, round_index: int) -> bool:
        """Whether a device waiting for `round_index` stops waiting: the job has ended, or a round
        takes joins that is that one or later, or any round of a server that restarted behind it
        (a resumed server is at its checkpoint's round and waits for joins: the device rejoins it)."""
        if self.phase in ("finished", "failed"):
            return True
        return self.accepting and (self.round >= round_index or self.phase == "waiting")


class ServerStatus(_Msg):
    round: int               # index of the round in progress (== rounds when finished)
    rounds: int
    phase: RoundPhase
    accepting: bool = True   # the current round takes joins now (False during the gap after a round)
    accuracy: Optional[float] = None
    loss: Optional[float] = None
    devices: dict[str, DeviceStatus] = {}
    model_sha256: Optional[str] = None  # of the global model's state dict; changes only when a round closes
    counters: dict[str, int] = {}        # refusals and errors since start (Prometheus: ares_<name>_total)
    failure: Optional[str] = None        # why phase is failed, in words
    failure_reason: Optional[FailureReason] = None  # the kind of failure (`FailureReason`)


class SessionSample(_Msg):
    """One of a device's recent sessions by the server's clock (join to accepted upload), with the
    part its steps took by the device's own account: the rest is the session's fixed cost."""

    round: int = Field(..., ge=0)
    split: int = Field(..., ge=0, le=255)
    session_s: Seconds
    steps_s: Seconds


class DeviceTelemetry(_Msg):
    """Everything the optimiser needs about one device, as measured."""

    name: str
    device_class: str = "cpu"
    power_mode: str = ""
    fwd: Optional[list[float]] = None   # per-batch seconds of the device part, per split
    bwd: Optional[list[float]] = None
    batch_size: int = 100
    up_bps: Optional[float] = None
    down_bps: Optional[float] = None
    iterations: int = 0                 # batches per round
    split: Optional[int] = None
    energy_j: Optional[float] = None
    energy_source: str = "none"
    round_s: Optional[float] = None
    latency_s: Optional[float] = None
    duplex: Literal["full", "half"] = "full"
    measured_steps: list[StepSample] = []  # oldest first
    codec: Optional[str] = None            # what its last round ran with, beside `split`
    micro_batches: Optional[int] = None
    sessions: list[SessionSample] = []     # its last few sessions, oldest first
    # the server's own figure for the link of the device's last upload (bytes over the time from
    # the request's head to its whole body), which its report, written before it, cannot hold
    upload_bps: Optional[float] = None
    power_mode_failed: str = ""            # a mode its host could not switch to (the mode in force: power_mode)
    power_mode_problem: str = ""           # why, in words
    switch_s: Optional[float] = None       # how long its last mode switch took, measured
    shard: int = Field(0, ge=0)            # the server shard it trains at (one server: 0)


class Telemetry(_Msg):
    round: int
    model: str
    batch_size: int
    codec: str
    micro_batches: int = Field(1, ge=1)  # the job's default micro-batches per batch (pipelined steps)
    activation_numel: list[int]        # per sample, after each layer
    weight_bytes: list[int]            # device-side params+buffers per split
    server_fwd: list[float]            # per-batch seconds of the server part, per split
    server_bwd: list[float]
    devices: list[DeviceTelemetry]
    # per-round seconds outside every device's own session (join skew, merge, evaluation),
    # measured over the last rounds: no split or option changes it, predictions add it
    round_overhead_s: float = Field(0.0, ge=0)


class StepColumns(_Msg):
    """Every device's `StepSample`s as columns: sample j is device `device[j]`'s (an index into the
    telemetry's devices), each device's samples together and oldest first."""

    device: list[Annotated[int, Field(ge=0)]] = []
    split: list[Annotated[int, Field(ge=0, le=255)]] = []
    codec: list[Literal["fp32", "fp16", "int8"]] = []
    micro_batches: list[Annotated[int, Field(ge=1, le=64)]] = []
    step_s: list[Seconds] = []
    up_bps: list[Optional[BytesPerSecond]] = []
    down_bps: list[Optional[BytesPerSecond]] = []
    compute_scale: list[Annotated[float, Field(gt=0, le=1e3)]] = []


class SessionColumns(_Msg):
    """Every device's `SessionSample`s as columns, as `StepColumns` holds the step samples."""

    device: list[Annotated[int, Field(ge=0)]] = []
    round: list[Annotated[int, Field(ge=0)]] = []
    split: list[Annotated[int, Field(ge=0, le=255)]] = []
    session_s: list[Seconds] = []
    steps_s: list[Seconds] = []


# `DeviceTelemetry`'s fields but its samples: one column each in `TelemetryColumns`
DEVICE_COLUMNS = tuple(name for name in DeviceTelemetry.model_fields if name not in ("measured_steps", "sessions"))


class TelemetryColumns(_Msg):
    """A `Telemetry` with its devices as columns: entry i of every device column is device i's
    field, and the samples are flat (`StepColumns`, `SessionColumns`). What a controller reads
    (`GET /v1/telemetry?columns=true`): at 10,000 devices the per-device form is 12 MB of JSON and
    half a second to read into objects; a decision reads these lists into arrays as they come."""

    round: int
    model: str
    batch_size: int
    codec: str
    micro_batches: int = Field(1, ge=1)
    activation_numel: list[int]
    weight_bytes: list[int]
    server_fwd: list[float]
    server_bwd: list[float]
    round_overhead_s: float = Field(0.0, ge=0)
    name: list[str] = []
    device_class: list[str] = []
    power_mode: list[str] = []
    fwd: list[Optional[list[float]]] = []
    bwd: list[Optional[list[float]]] = []
    batch_size_of: list[int] = []  # each device's profile batch (`DeviceTelemetry.batch_size`)
    up_bps: list[Optional[float]] = []
    down_bps: list[Optional[float]] = []
    iterations: list[int] = []
    split: list[Optional[int]] = []
    energy_j: list[Optional[float]] = []
    energy_source: list[str] = []
    round_s: list[Optional[float]] = []
    latency_s: list[Optional[float]] = []
    duplex: list[Literal["full", "half"]] = []
    codec_of: list[Optional[str]] = []  # what each device's last round ran with (`DeviceTelemetry.codec`)
    micro_batches_of: list[Optional[int]] = []
    upload_bps: list[Optional[float]] = []
    power_mode_failed: list[str] = []
    power_mode_problem: list[str] = []
    switch_s: list[Optional[float]] = []
    shard: list[Annotated[int, Field(ge=0)]] = []
    steps: StepColumns = StepColumns()
    sessions: SessionColumns = SessionColumns()

    @model_validator(mode="after")
    def _one_entry_per_device(self) -> "TelemetryColumns":
        n = len(self.name)
        for name in DEVICE_COLUMNS:
            if len(self.column(name)) != n:
                raise ValueError(f"column {name!r} has {len(self.column(name))} entries for {n} devices")
        for what, samples in (("steps", self.steps), ("sessions", self.sessions)):
            count = len(samples.device)
            if any(len(v) != count for v in samples.__dict__.values()):
                raise ValueError(f"{what}: its columns differ in length")
            if count and (max(samples.device) >= n or any(a > b for a, b in zip(samples.device, samples.device[1:]))):
                raise ValueError(f"{what}: a sample's device is not one of the {n} devices, or the samples are not "
                                 "grouped by device in order")
        return self

    @property
    def n_devices(self) -> int:
        return len(self.name)

    def column(self, name: str) -> list:
        """The device column of `DeviceTelemetry`'s field `name` (`DEVICE_COLUMNS`)."""
        return getattr(self, _RENAMED.get(name, name))

    @classmethod
    def of(cls, telemetry: Telemetry) -> "TelemetryColumns":
        """`telemetry`'s figures as columns (already checked: not checked again)."""
        devices = telemetry.devices
        columns = {_RENAMED.get(name, name): [getattr(d, name) for d in devices] for name in DEVICE_COLUMNS}
        steps = [(i, s) for i, d in enumerate(devices) for s in d.measured_steps]
        sessions = [(i, s) for i, d in enumerate(devices) for s in d.sessions]
        head = telemetry.model_dump(exclude={"devices"})
        return cls.model_construct(
            **head, **columns,
            steps=StepColumns.model_construct(device=[i for i, _ in steps], **{
                name: [getattr(s, name) for _, s in steps] for name in StepSample.model_fields}),
            sessions=SessionColumns.model_construct(device=[i for i, _ in sessions], **{
                name: [getattr(s, name) for _, s in sessions] for name in SessionSample.model_fields}))

    def rows(self) -> Telemetry:
        """The same figures as a `Telemetry`, one `DeviceTelemetry` per device."""
        steps: list[list[StepSample]] = [[] for _ in self.name]
        for j, i in enumerate(self.steps.device):
            steps[i].append(StepSample(**{name: getattr(self.steps, name)[j] for name in StepSample.model_fields}))
        sessions: list[list[SessionSample]] = [[] for _ in self.name]
        for j, i in enumerate(self.sessions.device):
            sessions[i].append(SessionSample(**{name: getattr(self.sessions, name)[j]
                                                for name in SessionSample.model_fields}))
        head = self.model_dump(include=set(Telemetry.model_fields) - {"devices"})
        return Telemetry(**head, devices=[
            DeviceTelemetry(**{name: self.column(name)[i] for name in DEVICE_COLUMNS}, measured_steps=steps[i],
                            sessions=sessions[i]) for i in range(self.n_devices)])


# the device columns whose names the telemetry's own fields take
_RENAMED = {"batch_size": "batch_size_of", "codec": "codec_of", "micro_batches": "micro_batches_of"}


ConfigReply = ServerConfig  # `GET /v1/config` returns the server's config (tokens_dir is not secret)
