"""The local runner's configuration (`ares run --config run.yaml`, or flags)."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ares.core.config import DataConfig, TrainingConfig
from ares.runtime.controller import offer_pairs


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeviceSpec(_Strict):
    name: str
    device_class: str = "cpu"
    power_mode: str = ""
    profile: Optional[str] = Field(None, description="emulate: a profile JSON path or a published key like jetson-nano/MAXN")
    pinned_split: Optional[int] = Field(None, ge=0)
    pinned_mode: Optional[str] = Field(None, description="with power_modes: the only power mode this device may run in")
    initial_split: Optional[int] = Field(None, ge=0)
    up_mbps: Optional[float] = Field(None, gt=0, description="in-process link cap, Mbit/s")
    down_mbps: Optional[float] = Field(None, gt=0)
    duplex: Literal["full", "half"] = Field("full", description="half: up and down share up_mbps (Wi-Fi)")


class LinkChange(_Strict):
    """At the start of `round`, set a device's link cap (None lifts it)."""

    round: int = Field(..., ge=0)
    device: str
    up_mbps: Optional[float] = Field(None, gt=0)
    down_mbps: Optional[float] = Field(None, gt=0)


class RunConfig(_Strict):
    model: str = "vgg5"
    devices: Union[int, list[DeviceSpec]] = 3
    mode: str = Field("adaptive", description="adaptive | fixed:N | none")
    policy: str = Field("straggler", description="ares | straggler (adaptive mode)")
    alpha: Optional[float] = Field(None, ge=0, le=1, description="time weight of the policy")
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig(rounds=10)
    codec: Literal["fp32", "fp16", "int8"] = "fp32"
    micro_batches: int = Field(1, ge=1, le=8, description="pipelined split steps: micro-batches per batch")
    offer_codecs: list[Literal["fp32", "fp16", "int8"]] = Field(
        [], description="adaptive: the policy also chooses each device's codec among these (and `codec`)")
    power_modes: bool = Field(False, description="adaptive: the policy also chooses each emulated Jetson's power mode")
    offer_micro_batches: list[int] = Field(
        [], description="adaptive: the policy also chooses each device's micro-batches among these (and `micro_batches`)")
    results_dir: str = "results/latest"
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port")
    http_server: Literal["granian", "uvicorn"] = "granian"
    round_deadline_s: float = Field(600.0, gt=0)
    schedule: list[LinkChange] = []
    threads_per_device: int = Field(1, ge=1)
    tls: bool = Field(False, description="HTTPS (ALPN h2) with a throwaway CA instead of loopback h2c")

    @field_validator("mode")
    @classmethod
    def _mode(cls, mode: str) -> str:
        if mode in ("adaptive", "none") or (mode.startswith("fixed:") and mode[6:].isdigit()):
            return mode
        raise ValueError(f"mode {mode!r} not understood; accepted: adaptive, fixed:N (e.g. fixed:2), none")

    @field_validator("offer_micro_batches")
    @classmethod
    def _ks(cls, ks: list[int]) -> list[int]:
        if any(not 1 <= k <= 8 for k in ks):
            raise ValueError(f"offer_micro_batches {ks}: each must be within 1..8")
        return ks

    def offer(self) -> tuple[tuple[str, int], ...]:
        """The (codec, micro-batches) pairs the controller may hand devices; () when none is offered."""
        return offer_pairs(self.codec, self.micro_batches, self.offer_codecs, self.offer_micro_batches)

    def device_specs(self) -> list[DeviceSpec]:
        if isinstance(self.devices, int):
            return [DeviceSpec(name=f"device-{i}") for i in range(self.devices)]
        return self.devices
