"""The controller with power modes: each Jetson's modes in the plan, written beside its split."""

from ares.core.messages import DeviceTelemetry, Telemetry
from ares.core.models import activation_numel, weight_bytes
from ares.core.optimiser import parse_policy
from ares.core.profiles import DEFAULT_SWITCH_S, PUBLISHED
from ares.runtime.controller import Controller, FileSplitSink, decide, problem_from_telemetry
from ares.runtime.splitfile import mode_path, read_mode, write_mode

NANO, PI = PUBLISHED["jetson-nano/MAXN"], PUBLISHED["raspberry-pi"]


def telemetry(**nano) -> Telemetry:
    server = [t / 10 for t in NANO.fwd]
    tail = [server[-1] - v for v in server]
    devices = [DeviceTelemetry(name="nano", device_class="jetson-nano", power_mode="MAXN", fwd=list(NANO.fwd),
                               bwd=list(NANO.bwd), up_bps=2.5e6, down_bps=2.5e6, iterations=50, **nano),
               DeviceTelemetry(name="pi", device_class="raspberry-pi", fwd=list(PI.fwd), bwd=list(PI.bwd),
                               up_bps=2.5e6, down_bps=2.5e6, iterations=50)]
    return Telemetry(round=1, model="vgg5", batch_size=100, codec="fp32", activation_numel=activation_numel("vgg5"),
                     weight_bytes=weight_bytes("vgg5"), server_fwd=tail, server_bwd=tail, devices=devices)


def test_a_jetson_gets_its_other_modes_derived_from_the_one_it_measured():
    problem = problem_from_telemetry(telemetry(), power_modes=True)
    nano, pi = problem.devices
    assert nano.mode_names == ("MAXN", "5W", "custom1", "custom3") and pi.modes == ()
    assert {m.compute.source for m in nano.modes} == {"derived"} and nano.compute.source == "measured"
    assert nano.switch_s == DEFAULT_SWITCH_S
    assert problem_from_telemetry(telemetry(switch_s=0.3), power_modes=True).devices[0].switch_s == 0.3
    assert problem_from_telemetry(telemetry()).devices[0].modes == ()  # not asked: the mode in force only


def test_the_nano_with_slack_is_slowed_and_a_pinned_or_failed_mode_holds():
    plan = decide(telemetry(), parse_policy("straggler"), power_modes=True)
    assert plan.power_modes["nano"] != "MAXN" and plan.power_modes["pi"] == ""
    pinned = decide(telemetry(), parse_policy("straggler"), power_modes=True, pinned_modes={"nano": "5W"})
    assert pinned.power_modes["nano"] == "5W"
    # the host could not switch: the plan is for the mode in force, whatever was pinned or best
    failed = decide(telemetry(power_mode_failed="custom3", power_mode_problem="nvpmodel: exit 1"),
                    parse_policy("straggler"), power_modes=True, pinned_modes={"nano": "5W"})
    assert failed.power_modes["nano"] == "MAXN"


def test_the_controller_writes_changed_modes_beside_the_split(tmp_path):
    sink = FileSplitSink(tmp_path)
    ctl = Controller(lambda: telemetry(), parse_policy("straggler"), sink, power_modes=True)
    plan = ctl.run_once()
    assert read_mode(sink.path("nano")) == plan.power_modes["nano"] != "MAXN"
    assert not mode_path(sink.path("pi")).exists()  # a class without modes gets no file
    mode_path(sink.path("nano")).unlink()
    ctl.run_once()  # nothing changed: nothing rewritten
    assert not mode_path(sink.path("nano")).exists()


def test_a_mode_file_holds_a_mode_name_or_is_ignored(tmp_path):
    split = tmp_path / "d.split"
    write_mode(split, "custom3")
    assert read_mode(split) == "custom3"
    mode_path(split).write_text("../../etc\n")
    assert read_mode(split) is None
    assert read_mode(tmp_path / "none.split") is None
