"""The controller loop: telemetry -> policy -> sink, writing only what changed."""

from ares.core.messages import DeviceTelemetry, Telemetry
from ares.core.models import activation_numel, weight_bytes
from ares.core.optimiser import parse_policy
from ares.core.profiles import PUBLISHED
from ares.runtime.controller import Controller, FileSplitSink, problem_from_telemetry
from ares.runtime.splitfile import read_split

NANO = PUBLISHED["jetson-nano/MAXN"]


def telemetry(up_bps: float, measured=("a", "b")) -> Telemetry:
    devices = []
    for name in ("a", "b", "c"):
        if name in measured:
            devices.append(DeviceTelemetry(name=name, device_class="jetson-nano", power_mode="MAXN",
                                           fwd=list(NANO.fwd), bwd=list(NANO.bwd), batch_size=100,
                                           up_bps=up_bps, down_bps=up_bps, iterations=50))
        else:
            devices.append(DeviceTelemetry(name=name))  # joined, nothing measured yet
    server = [t / 10 for t in NANO.fwd]
    server_tail = [server[-1] - v for v in server]
    return Telemetry(round=1, model="vgg5", batch_size=100, codec="fp32", activation_numel=activation_numel("vgg5"),
                     weight_bytes=weight_bytes("vgg5"), server_fwd=server_tail, server_bwd=server_tail, devices=devices)


def test_unmeasured_devices_are_left_out():
    problem = problem_from_telemetry(telemetry(2.5e6))
    assert [d.name for d in problem.devices] == ["a", "b"]
    assert problem.devices[0].power.compute_w > 7  # the published Nano MAXN figure, in W
    assert problem_from_telemetry(telemetry(2.5e6, measured=())) is None


def test_controller_writes_changed_splits_and_respects_pins(tmp_path):
    current = {"t": telemetry(50e6)}
    sink = FileSplitSink(tmp_path)
    ctl = Controller(lambda: current["t"], parse_policy("ares", 0.9), sink, pinned={"b": 5})
    plan = ctl.run_once()
    assert plan.split_of("b") == 5 and read_split(sink.path("b"), 7, None) == 5
    fast = plan.split_of("a")
    assert read_split(sink.path("a"), 7, None) == fast
    sink.path("a").unlink()
    ctl.run_once()  # nothing changed: nothing rewritten
    assert not sink.path("a").exists()
    current["t"] = telemetry(0.05e6)  # the link collapses: less data per step wins
    slow = ctl.run_once().split_of("a")
    assert slow != fast and activation_numel("vgg5")[slow] < activation_numel("vgg5")[fast]
    assert read_split(sink.path("a"), 7, None) == slow
