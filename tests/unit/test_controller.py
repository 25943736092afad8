"""The controller loop: telemetry -> policy -> sink, writing only what changed."""

import pytest
from pydantic import ValidationError

from ares.core.messages import DeviceTelemetry, Telemetry
from ares.core.models import activation_numel, weight_bytes
from ares.core.optimiser import parse_policy
from ares.core.profiles import PUBLISHED
from ares.runtime.controller import Controller, FileSplitSink, decide, problem_from_telemetry
from ares.runtime.splitfile import read_split
from tests.support import device_round, round_record

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


def test_controller_offers_codec_and_micro_batches_beside_the_split(tmp_path):
    """With an offer, the policy picks (codec, k) per device; they go beside the split file, before it."""
    from ares.runtime.splitfile import StepOptions, options_path, read_options

    sink = FileSplitSink(tmp_path)
    slow = telemetry(2.5e6)  # 20 Mbit/s: the wire dominates, so a smaller codec and a pipeline pay
    plain = Controller(lambda: slow, parse_policy("straggler"), FileSplitSink(tmp_path / "plain")).run_once()
    assert {(p.codec, p.micro_batches) for p in plain.devices} == {("fp32", 1)}
    assert not options_path(FileSplitSink(tmp_path / "plain").path("a")).exists()  # no offer, no file
    offer = tuple((c, k) for c in ("fp32", "int8") for k in (1, 4))
    ctl = Controller(lambda: slow, parse_policy("straggler"), sink, offer=offer)
    plan = ctl.run_once()
    assert plan.round_s < plain.round_s
    for p in plan.devices:
        if p.split < 6:
            assert (p.codec, p.micro_batches) in offer and (p.codec, p.micro_batches) != ("fp32", 1)
        assert read_options(sink.path(p.name), None) == StepOptions(codec=p.codec, micro_batches=p.micro_batches)
    assert problem_from_telemetry(slow, offer=offer).options[0].label == "fp32"  # the job's own comes first
    options_path(sink.path("a")).unlink()
    ctl.run_once()  # nothing changed: nothing rewritten
    assert not options_path(sink.path("a")).exists()


def test_int8_and_micro_batches_of_the_job_reach_the_model():
    t = telemetry(2.5e6).model_copy(update={"codec": "int8", "micro_batches": 4})
    problem = problem_from_telemetry(t)
    assert [(o.codec, o.micro_batches) for o in problem.options] == [("int8", 4)]
    fp32 = problem_from_telemetry(telemetry(2.5e6))
    assert problem.model.down_bytes[1] * 4 == fp32.model.down_bytes[1]  # 1 byte a value, not 4


def test_measured_latency_and_duplex_reach_the_model_and_change_its_prediction():
    t = telemetry(2.5e6)
    slow = t.model_copy(update={"devices": [d.model_copy(update={"latency_s": 0.05, "duplex": "half"})
                                            if d.name == "a" else d for d in t.devices]})
    fast, lagged = problem_from_telemetry(t), problem_from_telemetry(slow)
    a = next(d for d in lagged.devices if d.name == "a")
    assert (a.latency_s, a.duplex) == (0.05, "half")
    from ares.core.costmodel import evaluate
    splits = {"a": 1, "b": 1}
    # 50 iterations each paying a 50 ms request round trip, and up + down on one shared rate
    assert evaluate(lagged, splits).round_s > evaluate(fast, splits).round_s + 50 * 0.05


def test_absurd_measured_rates_leave_the_device_out_instead_of_failing_the_decision():
    t = telemetry(2.5e6)
    broken = t.model_copy(update={"devices": [d.model_copy(update={"up_bps": 1e-300}) if d.name == "a" else d
                                              for d in t.devices]})
    assert [d.name for d in problem_from_telemetry(broken).devices] == ["b"]


def test_the_servers_figure_for_a_devices_last_upload_is_folded_into_its_uplink():
    """A report is written before the upload that carries it, so the upload's own figure reached the
    controller a round late. The server's figure for it is folded in as the device itself will fold
    it: a link that fell shows a round earlier. A figure the model would not take is left out."""
    from ares.core.messages import LINK_SMOOTHING, MIN_UPLOAD_SAMPLE_BYTES
    from ares.runtime.profiler import Throughput
    from ares.runtime.training import upload_rate

    def with_upload(t: Telemetry, upload_bps) -> Telemetry:
        return t.model_copy(update={"devices": [d.model_copy(update={"upload_bps": upload_bps}) if d.name == "a" else d
                                                for d in t.devices]})

    t = telemetry(2.5e6)
    a, b = problem_from_telemetry(with_upload(t, 0.25e6)).devices  # a's link fell to a tenth
    own = Throughput(LINK_SMOOTHING)  # the device's estimate: before its upload, then after it
    own.update(2_500_000, 1.0)
    own.update(250_000, 1.0)
    assert a.up_bps == pytest.approx(own.value) and a.up_bps < 0.5e6
    assert a.down_bps == 2.5e6 and b.up_bps == 2.5e6  # the downlink and other devices as reported
    # and the plan with it: a trains locally either way, and its round is predicted with the slower upload
    fast, slow = decide(t, parse_policy("straggler")), decide(with_upload(t, 0.25e6), parse_policy("straggler"))
    local = len(activation_numel("vgg5")) - 1
    assert fast.split_of("a") == slow.split_of("a") == local
    later = slow.devices[0].round_s - fast.devices[0].round_s
    assert later == pytest.approx(weight_bytes("vgg5")[local] * (1 / a.up_bps - 1 / 2.5e6), rel=1e-6)
    for absurd in (1e-300, 1e15):  # outside MIN_BPS..MAX_BPS: the report's own figure stands
        assert problem_from_telemetry(with_upload(t, absurd)).devices[0].up_bps == 2.5e6
    with pytest.raises(ValidationError):
        DeviceTelemetry(name="a", upload_bps=float("inf"))
    # the server's figure: bytes over the body's time, and none for a body too small to tell
    assert upload_rate((4 << 20, 2.0)) == (4 << 20) / 2.0
    assert upload_rate((MIN_UPLOAD_SAMPLE_BYTES - 1, 0.5)) is None  # a split-3 body: too small to time here
    assert upload_rate((4 << 20, 0.0)) is None and upload_rate(None) is None


def test_round_overhead_is_the_time_outside_the_longest_session_after_round_0():
    from ares.core.rounds import round_overhead

    def record(r, duration, sessions, close=0.2):
        return round_record(r, duration_s=duration, close_s=close,
                            devices={f"d{i}": device_round(joined_s=j, uploaded_s=u) for i, (j, u) in enumerate(sessions)})

    first = record(0, 30.0, [(0.0, 10.0), (15.0, 29.5)])  # a device started late: start-up, not overhead
    assert first.outside_sessions() == 30.0 - 14.5
    assert round_overhead([]) == 0.0
    assert round_overhead([first]) == 0.2  # only round 0 so far: its merge and evaluation alone
    later = [record(r, 10.0 + r, [(0.1, 9.0 + r), (0.3, 9.5 + r)]) for r in (1, 2, 3, 4)]
    assert round_overhead([first, *later]) == pytest.approx(sum(10.0 + r - 9.2 - r for r in (2, 3, 4)) / 3)
    assert round_record(1, duration_s=3.0).outside_sessions() is None  # nobody uploaded


def test_measured_step_time_beyond_the_model_is_charged_per_setting_it_was_measured_at():
    from ares.core.messages import StepSample
    from ares.core.costmodel import evaluate

    t = telemetry(2.5e6)
    base = problem_from_telemetry(t)
    assert all(d.step_overheads is None for d in base.devices)  # nothing measured: the model alone

    def iteration(problem, split):
        return next(p for p in evaluate(problem, {"a": split, "b": 1}).devices if p.name == "a").iteration_s

    def measured(*samples):
        steps = [StepSample(split=s, codec="fp32", micro_batches=1, step_s=v) for s, v in samples]
        return problem_from_telemetry(t.model_copy(update={"devices": [
            d.model_copy(update={"measured_steps": steps}) if d.name == "a" else d for d in t.devices]}))

    m1, m3 = iteration(base, 1), iteration(base, 3)
    moved = {1: 2 * 100 * 8192 * 4 + 800, 2: 2 * 100 * 16384 * 4 + 800, 3: 2 * 100 * 4096 * 4 + 800}  # bytes per batch
    one = measured((1, m1 + 0.3))
    assert iteration(one, 1) == pytest.approx(m1 + 0.3)
    # not measured there: the excess per byte, times that setting's bytes, at most the excess measured
    assert iteration(one, 3) == pytest.approx(m3 + 0.3 * moved[3] / moved[1])
    assert iteration(one, 2) == pytest.approx(iteration(base, 2) + 0.3)  # twice the bytes: not twice the excess
    both = measured((1, m1 + 0.3), (3, m3 + 1.0))
    assert iteration(both, 1) == pytest.approx(m1 + 0.3)  # each setting keeps its own figure
    assert iteration(both, 3) == pytest.approx(m3 + 1.0)
    assert iteration(both, 2) == pytest.approx(iteration(base, 2) + 1.3 / 2)  # per byte 1.73 s: capped at the mean
    smaller = measured((1, m1 + 0.3), (2, iteration(base, 2) + 1.0))
    assert iteration(smaller, 3) == pytest.approx(m3 + 1.3 * moved[3] / (moved[1] + moved[2]))  # under the cap: per byte
    # on the device alone (split L-1) no request is made: no overhead; b, never measured: none
    local = lambda prob: next(p for p in evaluate(prob, {"a": 6, "b": 1}).devices if p.name == "a").round_s  # noqa: E731
    assert local(both) == pytest.approx(local(base))
    assert next(d for d in both.devices if d.name == "b").step_overheads is None
    # a step faster than the model is no negative overhead
    assert iteration(measured((1, m1 / 2)), 1) == pytest.approx(m1)


def test_a_settings_step_excess_is_averaged_over_its_last_rounds_each_held_against_its_own_round():
    from ares.core.messages import STEP_ROUNDS, StepSample
    from ares.core.costmodel import evaluate

    def with_a(t, **fields):
        return t.model_copy(update={"devices": [d.model_copy(update=fields) if d.name == "a" else d for d in t.devices]})

    def iteration(problem, split=1):
        return next(p for p in evaluate(problem, {"a": split, "b": 1}).devices if p.name == "a").iteration_s

    today = telemetry(2.5e6)
    m1 = iteration(problem_from_telemetry(today))
    fast_link = iteration(problem_from_telemetry(with_a(today, up_bps=10e6, down_bps=10e6)))
    slow_cpu = iteration(problem_from_telemetry(with_a(today, fwd=[v * 40 for v in NANO.fwd], bwd=[v * 40 for v in NANO.bwd])))
    assert fast_link < m1 - 0.5 and slow_cpu > m1 + 0.5  # the rounds below ran under clearly other inputs

    def predicted(*samples):
        return iteration(problem_from_telemetry(with_a(today, measured_steps=[
            StepSample(split=1, codec="fp32", micro_batches=1, **x) for x in samples])))

    # noise that flips sign each round: the mean of the rounds, not the last one
    assert predicted(dict(step_s=m1 + 0.2), dict(step_s=m1 + 0.6)) == pytest.approx(m1 + 0.4)
    # a round that ran on a 4x faster link is held against that round's model: its 0.3 s excess carries
    # over, where held against today's model it would read as negative; so does a round that ran while
    # the device was throttled (40x today's compute time), where it would read as 0.3 s plus the throttle
    assert predicted(dict(step_s=fast_link + 0.3, up_bps=10e6, down_bps=10e6)) == pytest.approx(m1 + 0.3)
    assert predicted(dict(step_s=slow_cpu + 0.3, compute_scale=40.0)) == pytest.approx(m1 + 0.3)
    assert predicted(dict(step_s=fast_link + 0.1, up_bps=10e6, down_bps=10e6),
                     dict(step_s=m1 + 0.5)) == pytest.approx(m1 + 0.3)
    # only the last STEP_ROUNDS rounds count: an old outlier has aged out
    assert predicted(dict(step_s=m1 + 9.0), *[dict(step_s=m1 + 0.3)] * STEP_ROUNDS) == pytest.approx(m1 + 0.3)
    # a rate the model does not take (a hostile or broken report) falls back to today's estimate
    assert predicted(dict(step_s=m1 + 0.3, up_bps=1e-4, down_bps=1e-4)) == pytest.approx(m1 + 0.3)
    # rounds faster than their model on the whole: no negative overhead
    assert predicted(dict(step_s=m1 - 0.5), dict(step_s=m1 + 0.1)) == pytest.approx(m1)
    # what a report may carry is bounded at the boundary: no zero, infinite or absurd figure gets in
    for bad in (dict(compute_scale=0.0), dict(compute_scale=1e4), dict(up_bps=float("inf")), dict(down_bps=0.0)):
        with pytest.raises(ValidationError):
            StepSample(split=1, codec="fp32", micro_batches=1, step_s=m1, **bad)


def test_each_device_is_planned_from_the_setting_its_last_round_ran():
    from ares.core.costmodel import column_of

    t = telemetry(2.5e6)
    offer = [("fp32", 1), ("int8", 4)]

    def current(**fields):
        changed = t.model_copy(update={"devices": [d.model_copy(update=fields) if d.name == "a" else d
                                                   for d in t.devices]})
        problem = problem_from_telemetry(changed, offer=offer)
        return problem, next(d for d in problem.devices if d.name == "a").current

    problem, col = current(split=3, codec="int8", micro_batches=4)
    assert col == column_of(problem, "int8", 4, 3)
    problem, col = current(split=3, codec=None, micro_batches=None)  # an older device: the job's own
    assert col == column_of(problem, t.codec, t.micro_batches, 3)
    problem, col = current(split=6, codec="int8", micro_batches=4)  # on the device alone: the one column there
    assert col == column_of(problem, "fp32", 1, 6)
    assert current(split=3, codec="fp16", micro_batches=1)[1] is None  # a setting the job does not offer
    assert current(split=None)[1] is None


def test_a_sessions_time_beyond_its_steps_and_weights_is_charged_once_per_round_at_every_split():
    from ares.core.messages import SessionSample
    from ares.core.costmodel import evaluate, session_table
    from ares.core.rounds import recent_sessions

    t = telemetry(2.5e6)
    base = problem_from_telemetry(t)
    rest = session_table(base)[0, 0]  # what the model charges a's round beyond its iterations, per split

    def with_sessions(*samples):
        return problem_from_telemetry(t.model_copy(update={"devices": [
            d.model_copy(update={"sessions": list(samples)}) if d.name == "a" else d for d in t.devices]}))

    def round_s(problem, split):
        return next(p for p in evaluate(problem, {"a": split, "b": 1}).devices if p.name == "a").round_s

    # round 0 paid start-up (+5 s); rounds 1-3 took 0.4, 0.9 and 0.5 s beyond their steps and weights
    samples = [SessionSample(round=0, split=1, session_s=20.0 + rest[1] + 5.0, steps_s=20.0),
               SessionSample(round=1, split=1, session_s=20.0 + rest[1] + 0.4, steps_s=20.0),
               SessionSample(round=2, split=3, session_s=18.0 + rest[3] + 0.9, steps_s=18.0),
               SessionSample(round=3, split=1, session_s=20.0 + rest[1] + 0.5, steps_s=20.0)]
    charged = with_sessions(*samples)
    for split in (0, 1, 3, 6):  # once per round, whatever the split (the median, round 0 left out)
        assert round_s(charged, split) == pytest.approx(round_s(base, split) + 0.5)
    assert round_s(with_sessions(samples[0]), 1) == pytest.approx(round_s(base, 1))  # round 0 alone: start-up, none
    faster = SessionSample(round=1, split=1, session_s=1.0, steps_s=20.0)  # the model's weights over-predicted
    assert round_s(with_sessions(faster), 1) == pytest.approx(round_s(base, 1))  # no negative overhead
    assert next(d for d in charged.devices if d.name == "b").session_overhead_s == 0.0  # never measured

    # the server's side: each device's recent sessions from the closed rounds' records, oldest first
    def record(r, split, joined, uploaded, steps_s=1.0):
        return round_record(r, devices={"a": device_round(split=split, joined_s=joined, uploaded_s=uploaded,
                                                          steps_s=steps_s),
                                        "old": device_round(split=1, joined_s=0.0, uploaded_s=2.0)})
    got = recent_sessions([record(r, r % 3, 0.5, 3.0 + r) for r in range(6)])
    assert [(x.round, x.split, x.session_s, x.steps_s) for x in got["a"]] == [
        (r, r % 3, pytest.approx(2.5 + r), 1.0) for r in (2, 3, 4, 5)]
    assert "old" not in got  # a record without its steps' time (an older checkpoint) says nothing


# ---- the decision over arrays: the same problem and plan as over one object per device --------

def varied_telemetry(seed: int, n: int) -> Telemetry:
    """A fleet with every kind of report a decision reads: Jetsons (modes, a failed switch, a measured
    switch) and Pis, another batch size, half duplex, latency, the server's upload figure, step samples
    (some at settings the problem does not offer), sessions, devices not measured or with links the
    model refuses."""
    import numpy as np

    from ares.core.messages import SessionSample, StepSample

    rng = np.random.default_rng(seed)
    pi = PUBLISHED["raspberry-pi"]
    devices = []
    for i in range(n):
        kind = int(rng.integers(0, 10))
        if kind == 0:
            devices.append(DeviceTelemetry(name=f"d{i}"))  # joined, nothing measured yet
            continue
        jetson = kind % 2 == 1
        base, f = (NANO if jetson else pi), float(rng.uniform(0.5, 2.0))
        batch = 50 if kind == 2 else 100  # a profile measured at another batch size: rescaled
        steps = [StepSample(split=int(rng.integers(0, 7)), codec=str(rng.choice(["fp32", "fp16", "int8"])),
                            micro_batches=int(rng.choice([1, 2, 4])), step_s=float(rng.uniform(0, 2)),
                            up_bps=rng.choice([None, float(rng.uniform(1e5, 5e7)), 1e-4]),
                            compute_scale=float(rng.uniform(0.5, 2.0))) for _ in range(int(rng.integers(0, 5)))]
        sessions = [SessionSample(round=r, split=int(rng.integers(0, 7)), session_s=float(rng.uniform(5, 20)),
                                  steps_s=float(rng.uniform(0, 5))) for r in range(int(rng.integers(0, 4)))]
        devices.append(DeviceTelemetry(
            name=f"d{i}", device_class="jetson-nano" if jetson else "raspberry-pi",
            power_mode=str(rng.choice(["MAXN", "5W"])) if jetson else "",
            fwd=[v * f * batch / 100 for v in base.fwd], bwd=[v * f * batch / 100 for v in base.bwd], batch_size=batch,
            up_bps=1e-300 if kind == 9 and i % 3 == 0 else float(rng.uniform(1e5, 5e7)),
            down_bps=float(rng.uniform(1e5, 5e7)), iterations=int(rng.integers(1, 100)),
            latency_s=float(rng.uniform(0, 0.05)) if rng.integers(2) else None,
            duplex=str(rng.choice(["full", "half"])), split=int(rng.integers(0, 7)) if rng.integers(4) else None,
            codec=str(rng.choice(["fp32", "int8"])), micro_batches=int(rng.choice([1, 4])),
            upload_bps=float(rng.uniform(1e5, 5e7)) if rng.integers(2) else None, measured_steps=steps,
            sessions=sessions, power_mode_failed="custom1" if jetson and kind == 3 else "",
            switch_s=float(rng.uniform(0.1, 2)) if jetson and rng.integers(2) else None))
    server = [t / 10 for t in NANO.fwd]
    tail = [server[-1] - v for v in server]
    return Telemetry(round=3, model="vgg5", batch_size=100, codec="fp32", activation_numel=activation_numel("vgg5"),
                     weight_bytes=weight_bytes("vgg5"), server_fwd=tail, server_bwd=tail, devices=devices)


def same_arrays(a, b) -> None:
    """Two `ProblemArrays` hold the same figures, to the bit (their labels compared by what they name)."""
    import numpy as np

    for name in ("fwd", "bwd", "server_s", "up_bytes", "down_bytes", "micro", "weight_bytes", "up_bps", "down_bps",
                 "iterations", "power", "latency", "session", "step_overhead", "half"):
        assert np.array_equal(getattr(a.x, name), getattr(b.x, name)), name
    assert (a.x.switch is None) == (b.x.switch is None) and (a.x.switch is None or np.array_equal(a.x.switch, b.x.switch))
    assert a.x.names == b.x.names and a.options == b.options
    for name in ("mode_counts", "valid", "pinned_split", "pinned_mode", "current"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert np.array_equal(a.alpha, b.alpha, equal_nan=True)
    assert [[a.labels[i] for i in row] for row in a.mode_labels.tolist()] == [
        [b.labels[i] for i in row] for row in b.mode_labels.tolist()]


@pytest.mark.parametrize("power_modes", [False, True], ids=["one mode", "power modes"])
@pytest.mark.parametrize("seed", range(3))
def test_the_arrays_read_from_telemetry_are_the_problems_and_decide_the_same_plan(seed, power_modes):
    """`decide` reads the telemetry into arrays without an object per device; `problem_from_telemetry`
    builds a `DeviceInput` per device. The arrays must be the ones the dataclasses give, to the bit,
    and so must every policy's plan over them."""
    from ares.runtime.controller import arrays_from_telemetry

    t = varied_telemetry(seed, 90)
    kw = dict(pinned={"d4": 2, "d7": 6, "nobody": 1}, offer=[("fp32", 1), ("int8", 4), ("fp16", 2)],
              power_modes=power_modes, pinned_modes={"d5": "custom3", "d11": "MAXN", "d6": "5W"})
    problem, arrays = problem_from_telemetry(t, **kw), arrays_from_telemetry(t, **kw)
    same_arrays(arrays, problem.arrays())
    assert len(problem.devices) > 60 and (problem.n_modes == 4) == power_modes
    assert sum(d.step_overheads is not None for d in problem.devices) > 10
    assert sum(d.session_overhead_s > 0 for d in problem.devices) > 10 and sum(d.current is not None for d in problem.devices) > 30
    for text in ("straggler", "ares", "none", "fixed:2"):
        policy = parse_policy(text)
        assert decide(t, policy, **kw) == policy.decide(problem), text
    shared = parse_policy("straggler", share_server=True)
    assert decide(t, shared, **kw) == shared.decide(problem)


def test_the_arrays_refuse_what_the_dataclasses_refuse():
    from ares.runtime.controller import arrays_from_telemetry

    t = varied_telemetry(5, 20)
    one = problem_from_telemetry(t).devices[0].name
    ok = next(d for d in t.devices if d.name == one)
    bad = [t.model_copy(update={"devices": [ok.model_copy(update={"fwd": [-1.0] * 7})]}),
           t.model_copy(update={"devices": [ok.model_copy(update={"bwd": [1.0] * 6})]}),
           t.model_copy(update={"devices": [ok.model_copy(update={"iterations": -3})]}),
           t.model_copy(update={"devices": [ok, ok]}),  # one name twice
           t.model_copy(update={"server_fwd": t.server_fwd[:-1]})]
    for case in bad:
        with pytest.raises(ValueError):
            problem_from_telemetry(case)
        with pytest.raises(ValueError):
            arrays_from_telemetry(case)
    with pytest.raises(ValueError, match="pinned split 9"):
        arrays_from_telemetry(t, pinned={one: 9})
    assert arrays_from_telemetry(t.model_copy(update={"devices": [DeviceTelemetry(name="new")]})) is None


# ---- the garbage collector, paused by decisions in several threads at once --------------------

def test_decisions_in_two_threads_leave_the_collector_running_as_it_was(monkeypatch):
    """The collector is one switch for the process. Decision A pauses it; B starts while A runs and
    ends after it. Each saving and restoring the switch on its own, B read "off" (A's pause) and
    turned it off again after A had turned it back on: off for good. Paused while either runs, on
    again after the last one."""
    import threading

    from ares.runtime import controller

    class Collector:  # `gc`'s switch, which tells when B reads it
        def __init__(self) -> None:
            self.on, self.during = True, []

        def isenabled(self) -> bool:
            seen = self.on
            if threading.current_thread().name == "b":
                b_started.set()  # B has read the switch: let A finish before B goes on
                a_done.wait(5)
            return seen

        def enable(self) -> None:
            self.on = True

        def disable(self) -> None:
            self.on = False

    collector, b_started, a_done = Collector(), threading.Event(), threading.Event()
    monkeypatch.setattr(controller, "gc", collector)

    def a() -> None:
        with controller._collector_paused():
            b_started.wait(5)
        collector.during.append(collector.on)  # A is done, B still deciding
        a_done.set()

    def b() -> None:
        with controller._collector_paused():
            b_started.set()
            a_done.wait(5)

    first = threading.Thread(target=a, name="a")
    first.start()
    while not controller._collector_pausers:  # A is inside
        threading.Event().wait(0.001)
    second = threading.Thread(target=b, name="b")
    second.start()
    first.join(10)
    second.join(10)
    assert collector.on  # running again after both
    assert collector.during == [False]  # and paused while B still ran


def test_session_overheads_over_arrays_equal_the_one_device_at_a_time_computation():
    """`_session_excess` reads every row's sessions at once, as arrays. The computation it replaced,
    kept here: the same floats, row by row."""
    import random
    import statistics

    import numpy as np

    from ares.core.messages import SessionSample
    from ares.runtime.controller import _session_excess

    def one_at_a_time(n_splits, samples, rest):
        out = []
        for i, taken in enumerate(samples):
            later = [x for x in taken if x.round > 0 and x.split < n_splits]
            excess = [max(0.0, x.session_s - x.steps_s - float(rest[i, 0, x.split])) for x in later[-3:]]
            out.append(statistics.median(excess) if excess else None)
        return out

    rng = random.Random(1)
    for trial in range(60):
        samples = [[SessionSample(round=rng.randint(0, 4), split=rng.randint(0, 8), session_s=rng.uniform(0, 5),
                                  steps_s=rng.uniform(0, 5)) for _ in range(rng.randint(0, 6))]
                   for _ in range(rng.randint(0, 30))]
        rest = np.random.default_rng(trial).uniform(0, 2, (len(samples), 2, 7))
        assert _session_excess(7, samples, rest) == one_at_a_time(7, samples, rest)


def test_the_round_noise_is_read_from_consecutive_step_samples_at_one_setting():
    """500 devices whose step time at one setting moves by a lognormal sigma of 0.1 each round: the
    estimate finds it (within 10%), a change of setting between two samples is not read as noise,
    and too few pairs give none."""
    import numpy as np

    from ares.core.messages import StepSample
    from ares.runtime.controller import round_noise

    rng = np.random.default_rng(7)

    def sample(split, step_s):
        return StepSample(split=split, codec="fp32", micro_batches=1, step_s=float(step_s), up_bps=1e6, down_bps=1e6)

    fleet = [[sample(1, base * np.exp(rng.normal(0, 0.1))) for _ in range(3)] for base in rng.uniform(0.1, 2.0, 500)]
    assert round_noise(fleet) == pytest.approx(0.1, rel=0.1)
    # a device that moved from split 1 (0.1 s) to split 3 (2 s): two settings, no pair between them
    moved = [[sample(1, 0.1), sample(1, 0.1), sample(3, 2.0), sample(3, 2.0)] for _ in range(20)]
    assert round_noise(moved) == 0.0
    assert round_noise(fleet[:3]) == 0.0  # 6 pairs: fewer than NOISE_PAIRS
