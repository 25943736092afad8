"""What the operator's handlers decide, as pure functions: refusals, ServerReady, messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from kubernetes.client.rest import ApiException

ROOT = Path(__file__).resolve().parents[2]

from ares.core.messages import ServerStatus
from ares_operator import builders, handlers
from ares_operator import status as job_status
from ares_operator import constants as c
from ares_operator.builders import JobRef
from ares_operator.kube import NotOurs, QuotaShortfall, Refused, controller_uid
from ares_operator.settings import from_env
from ares_operator.spec import parse_spec

JOB = JobRef("demo", "team-a", "uid-1")


def _refused(status: int, message: str, kind: str = "Pod", name: str = "demo-pi") -> Refused:
    exc = ApiException(status=status, reason="Forbidden")
    exc.body = json.dumps({"kind": "Status", "message": message})
    return Refused("create", {"kind": kind, "metadata": {"name": name}}, exc)


@pytest.mark.parametrize("exc, reason, says", [
    (_refused(403, 'pods "demo-pi" is forbidden: violates PodSecurity "baseline:latest": non-default capabilities '
                   '(container "host-control" must not include "NET_ADMIN")'),
     c.REASON_POD_SECURITY, ["NET_ADMIN", "pod-security.kubernetes.io/enforce=privileged", "Nothing was created"]),
    (_refused(403, 'secrets is forbidden: User "system:serviceaccount:ares-system:ares" cannot create resource '
                   '"secrets"', kind="Secret", name="demo-tokens"),
     c.REASON_FORBIDDEN, ["may not create Secret demo-tokens in namespace team-a", "RBAC"]),
    (_refused(403, 'pods "demo-nano" is forbidden: pod rejected: RuntimeClass "nvidia" not found'),
     c.REASON_RUNTIME_CLASS, ['RuntimeClass "nvidia" not found', "NVIDIA container", "deviceClass cpu"]),
    (_refused(403, 'pods "demo-pi" is forbidden: exceeded quota: small, requested: requests.cpu=500m, '
                   'used: requests.cpu=2, limited: requests.cpu=2'),
     c.REASON_QUOTA, ["exceeded quota: small", "larger quota"]),
    (_refused(403, 'pods "demo-pi" is forbidden: maximum cpu usage per Container is 1, but limit is 4'),
     c.REASON_LIMIT_RANGE, ["LimitRange", "per Container"]),
    (_refused(422, 'Pod "demo-pi" is invalid: spec.tolerations[0].operator: Unsupported value: "Bogus"'),
     c.REASON_INVALID_CHILD, ["invalid", "Bogus", "job's spec"]),
    (NotOurs("Pod demo-pi exists and belongs to another owner"), c.REASON_NAME_CONFLICT,
     ["another owner", "rename the job or the device"]),
    (QuotaShortfall(["ResourceQuota q: requests.cpu needs 3 more, 1 of 2 left"]), c.REASON_QUOTA,
     ["requests.cpu needs 3 more", "Nothing was created"]),
], ids=["pod-security", "rbac", "runtime-class", "quota", "limit-range", "invalid", "namesake", "quota-sum"])
def test_every_refusal_says_what_and_why(exc, reason, says):
    got_reason, message = handlers.refusal_message(exc, JOB)
    assert got_reason == reason
    for text in says:
        assert text in message
    if reason != c.REASON_FORBIDDEN:
        assert "RBAC" not in message and "ServiceAccount" not in message  # not a permission problem


def test_server_ready_tells_starting_from_unreachable():
    serving = ServerStatus(round=2, rounds=5, phase="training", accuracy=0.5, devices={})
    assert job_status.server_condition(serving, None, "", 60) == (True, c.REASON_SERVER_SERVING, "server phase training")
    ok, reason, _ = job_status.server_condition(None, None, "", 60)
    assert not ok and reason == c.REASON_SERVER_STARTING
    ok, reason, _ = job_status.server_condition(None, 30.0, "ConnectError: refused", 60)
    assert not ok and reason == c.REASON_SERVER_STARTING  # a server loading torch is not unreachable yet
    ok, reason, message = job_status.server_condition(None, 61.0, "ConnectError: refused", 60)
    assert not ok and reason == c.REASON_SERVER_UNREACHABLE and "61s" in message and "ConnectError" in message


def test_split_message_is_readable_and_stable():
    assert job_status.split_message({"pi": 1, "nano-5w": 2}) == "splits nano-5w=2, pi=1"


def test_children_are_everything_in_creation_order_and_all_owned():
    job = yaml.safe_load((ROOT / "examples" / "job.yaml").read_text())
    spec = parse_spec(job["spec"])
    objs = builders.children(JOB, spec, from_env())
    kinds = [o["kind"] for o in objs]
    assert kinds[:3] == ["Secret", "ConfigMap", "Service"] and kinds[3:] == ["Pod"] * 4
    assert [o["metadata"]["name"] for o in objs[3:]] == ["demo-server", "demo-nano-maxn", "demo-nano-5w", "demo-pi"]
    assert all(controller_uid(o) == "uid-1" for o in objs)


def test_codec_pipelining_and_aggregation_reach_the_server_config():
    job = yaml.safe_load((ROOT / "examples" / "job.yaml").read_text())
    job["spec"]["training"].update(codec="int8", microBatches=4,
                                   aggregation={"method": "trimmed_mean", "maxUpdateNorm": 50, "trimFraction": 0.1})
    job["spec"]["dataset"]["name"] = "synthetic-easy"
    cfg = builders.server_config(parse_spec(job["spec"]))
    assert (cfg.codec, cfg.micro_batches, cfg.data.name) == ("int8", 4, "synthetic-easy")
    assert (cfg.aggregation.method, cfg.aggregation.max_update_norm, cfg.aggregation.trim_fraction) == \
        ("trimmed_mean", 50.0, 0.1)
    # The CRD offers exactly what the server accepts.
    crd = yaml.safe_load((ROOT / "crds" / "aresjobs.ares.io.yaml").read_text())
    training = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["training"]
    assert training["properties"]["codec"]["enum"] == ["fp32", "fp16", "int8"]
    assert training["properties"]["aggregation"]["properties"]["method"]["enum"] == \
        ["fedavg", "norm_clip", "median", "trimmed_mean"]


def test_a_lost_children_created_condition_is_put_back():
    """A tick that read the job before the create handler's status landed rewrites the
    conditions without ChildrenCreated; the next call finds it missing and sets it again."""
    spec = parse_spec(yaml.safe_load((ROOT / "examples" / "job.yaml").read_text())["spec"])
    lost = {"conditions": [{"type": c.COND_SPEC_VALID, "status": "True"}]}
    # Created earlier: nothing is created again (no API client at all).
    call = _call(lost, children_ok=True)
    assert handlers.ensure_children(call, spec)
    created = [cond for cond in call.patch.status["conditions"] if cond["type"] == c.COND_CREATED]
    assert [cond["status"] for cond in created] == ["True"] and created[0]["reason"] == c.REASON_CREATED
    assert {cond["type"] for cond in call.patch.status["conditions"]} == {c.COND_SPEC_VALID, c.COND_CREATED}
    # Present (True, or False with a refusal's reason): left alone, no patch.
    for value in ("True", "False"):
        kept = _call({"conditions": [{"type": c.COND_CREATED, "status": value, "reason": "x"}]}, children_ok=True)
        assert handlers.ensure_children(kept, spec)
        assert not kept.patch


def _call(status=None, kube=None, **state):
    """One handler call on JOB, as kopf would make it, with the operator's default settings."""
    import logging

    import kopf

    from ares_operator import metrics

    ctx = handlers.Context(settings=from_env({}), kube=kube, metrics=metrics.OperatorMetrics())
    return handlers.Call(JOB, status or {}, {"generation": 1}, None, kopf.Patch(), logging.getLogger("test"),
                         ctx, handlers.JobState(**state))


# --- step options (training.offer): the controller's (codec, k) per device, through annotations ---

def _offered(**offer):
    raw = yaml.safe_load((ROOT / "examples" / "job.yaml").read_text())["spec"]
    if offer:
        raw["training"]["offer"] = offer
    return parse_spec(raw)


def test_the_offer_is_the_local_runners():
    """One rule for `ares run` and the operator: the job's own pair first, each list with the job's own."""
    from ares.roles.runconfig import RunConfig

    spec = _offered(codecs=["int8"], microBatches=[4, 2])
    run = RunConfig(codec="fp32", micro_batches=1, offer_codecs=["int8"], offer_micro_batches=[4, 2])
    assert spec.training.offer_pairs() == run.offer() == (
        ("fp32", 1), ("fp32", 4), ("fp32", 2), ("int8", 1), ("int8", 4), ("int8", 2))
    assert _offered().training.offer_pairs() == () == RunConfig().offer()
    with pytest.raises(ValueError):
        _offered(microBatches=[9])
    with pytest.raises(ValueError):
        _offered(codecs=["bf16"])
    from ares_operator import validation  # what the schema refuses, the operator refuses too (older CRD)

    raw = yaml.safe_load((ROOT / "examples" / "job.yaml").read_text())["spec"]
    raw["training"]["offer"] = {"codecs": ["int8", "int8"], "microBatches": [2]}
    assert validation.validate("demo", raw)[1] == ["spec.training.offer.codecs: duplicate values ['int8']"]


def test_device_pods_project_step_options_only_with_an_offer(tmp_path):
    """The pod carries its options from the start (the plan's, else the job's own) and projects
    them beside the split file, where the device's own reader (`read_options`) finds them."""
    from ares.runtime.splitfile import StepOptions, options_path, read_options

    assert options_path(f"{c.PODINFO_DIR}/{c.PODINFO_SPLIT}").name == c.PODINFO_OPTIONS
    spec = _offered(codecs=["int8"], microBatches=[4])
    dev = spec.device("pi")
    for chosen, want in ((None, StepOptions(codec="fp32", micro_batches=1)),
                         (("int8", 4), StepOptions(codec="int8", micro_batches=4))):
        pod = builders.device_pod(JOB, spec, dev, from_env(), split=2, options=chosen)
        items = {i["path"]: i["fieldRef"]["fieldPath"] for i in
                 next(v for v in pod["spec"]["volumes"] if v["name"] == "podinfo")["downwardAPI"]["items"]}
        assert items[c.PODINFO_OPTIONS] == "metadata.annotations['ares.io/step-options']"
        split_file = tmp_path / c.PODINFO_SPLIT  # what the kubelet writes for those two items
        split_file.write_text(pod["metadata"]["annotations"][c.ANNOTATION_SPLIT])
        options_path(split_file).write_text(pod["metadata"]["annotations"][c.ANNOTATION_STEP_OPTIONS])
        assert read_options(split_file, None) == want
    plain = builders.device_pod(JOB, _offered(), dev, from_env(), split=2, options=("int8", 4))
    assert c.ANNOTATION_STEP_OPTIONS not in plain["metadata"]["annotations"]
    assert c.PODINFO_OPTIONS not in str(plain["spec"]["volumes"])


def _pod(name, **annotations):
    from ares_operator.reconcile import PodView

    return PodView(name=name, role="device", device=name.removeprefix("demo-"), phase="Running", attempt=0,
                   terminating=False, annotations=annotations)


def test_step_options_are_patched_when_they_change_with_the_split_never_after():
    from ares_operator import reconcile

    spec = _offered(codecs=["int8"], microBatches=[4])
    own = builders.step_options_annotation("fp32", 1)
    pods = [_pod(f"demo-{name}", **builders.host_control_annotations(spec.device(name)),
                 **{c.ANNOTATION_SPLIT: split, c.ANNOTATION_STEP_OPTIONS: own})
            for name, split in (("nano-maxn", "3"), ("nano-5w", "3"), ("pi", "1"))]
    planned = {"nano-maxn": ("int8", 4), "nano-5w": ("fp32", 1), "pi": ("int8", 1), "gone": ("int8", 4)}
    options = reconcile.desired_options(spec, planned)
    assert options == {"nano-maxn": ("int8", 4), "nano-5w": ("fp32", 1), "pi": ("int8", 1)}
    patches = reconcile.annotation_patches(spec, JOB, pods, {"nano-maxn": 5, "nano-5w": 3, "pi": 1}, options)
    assert patches == {
        "demo-nano-maxn": {c.ANNOTATION_STEP_OPTIONS: '{"codec":"int8","micro_batches":4}', c.ANNOTATION_SPLIT: "5"},
        "demo-pi": {c.ANNOTATION_STEP_OPTIONS: '{"codec":"int8","micro_batches":1}'},  # options alone; split kept
    }  # nano-5w: nothing changed, nothing patched
    assert list(patches["demo-nano-maxn"]) == [c.ANNOTATION_STEP_OPTIONS, c.ANNOTATION_SPLIT]  # one patch, options first
    # Applied: nothing more to patch. Without an offer: never an options annotation, whatever the memo holds.
    applied = [_pod(p.name, **{**p.annotations, **patches.get(p.name, {})}) for p in pods]
    assert reconcile.annotation_patches(spec, JOB, applied, {"nano-maxn": 5, "nano-5w": 3, "pi": 1}, options) == {}
    assert reconcile.desired_options(_offered(), planned) == {}
    bare = [_pod(p.name, **{k: v for k, v in p.annotations.items() if k != c.ANNOTATION_STEP_OPTIONS}) for p in applied]
    assert reconcile.annotation_patches(_offered(), JOB, bare, {"nano-maxn": 5, "nano-5w": 3, "pi": 1},
                                        reconcile.desired_options(_offered(), planned)) == {}


def test_a_replaced_device_pod_starts_with_its_planned_step_options():
    from ares_operator.reconcile import PodView, plan_pods

    spec = _offered(codecs=["int8"], microBatches=[4])
    pods = [PodView(name=n, role=r, device=d, phase="Running", attempt=0, terminating=False, annotations={})
            for n, r, d in (("demo-server", "server", ""), ("demo-nano-maxn", "device", "nano-maxn"),
                            ("demo-nano-5w", "device", "nano-5w"))]
    pods.append(PodView(name="demo-pi", role="device", device="pi", phase="Failed", attempt=0, terminating=False,
                        annotations={}))
    actions = plan_pods(JOB, spec, from_env(), pods, {}, 0, {"pi": 2}, {"pi": ("int8", 4)})
    (new,) = actions.create
    assert new["metadata"]["annotations"][c.ANNOTATION_STEP_OPTIONS] == '{"codec":"int8","micro_batches":4}'
    assert new["metadata"]["annotations"][c.ANNOTATION_SPLIT] == "2"


def nano_fleet(names, bps: float, server: float, shards: int = 1):
    """The telemetry of MAXN Nanos on links of `bps` each way, the server's profile `server` times a
    Nano's (the time after each split), the devices at `shards` shards in turn."""
    from ares.core.messages import DeviceTelemetry, Telemetry
    from ares.core.profiles import PUBLISHED

    nano = PUBLISHED["jetson-nano/MAXN"]
    tail = [(nano.fwd[-1] - t) * server for t in nano.fwd]
    return Telemetry(round=1, model="vgg5", batch_size=100, codec="fp32",
                     activation_numel=[16384, 16384, 4096, 4096, 1024, 128, 10],
                     weight_bytes=[1792, 148_000, 295_000, 590_000, 8_400_000, 5_200, 5_200],
                     server_fwd=tail, server_bwd=tail,
                     devices=[DeviceTelemetry(name=n, device_class="jetson-nano", power_mode="MAXN", fwd=list(nano.fwd),
                                              bwd=list(nano.bwd), batch_size=100, up_bps=bps, down_bps=bps,
                                              iterations=50, shard=i % shards) for i, n in enumerate(names)])


def test_the_operator_asks_the_controller_for_step_options_and_annotates_them(monkeypatch):
    """`optimise` runs the local runner's `decide` with the job's offer; the sink then writes what it chose."""
    from ares.core.messages import TelemetryColumns
    from ares.core.optimiser import parse_policy
    from ares.runtime import controller
    from ares_operator import reconcile

    slow = nano_fleet(("nano-maxn", "nano-5w", "pi"), bps=2.5e6, server=0.1)
    monkeypatch.setattr(controller, "fetch_columns", lambda *a, **k: TelemetryColumns.of(slow))
    spec = _offered(codecs=["fp16", "int8"], microBatches=[2, 4])
    call = _call(tokens={"controller.token": "t"})
    handlers.optimise(call, spec)
    memo = call.state
    want = controller.decide(slow, parse_policy(spec.split.policy, spec.split.alpha), builders.pinned_splits(spec),
                             spec.training.offer_pairs())
    assert memo.planned_options == controller.plan_options(want) and memo.planned == dict(want.splits)
    assert set(memo.planned_options.values()) <= set(spec.training.offer_pairs())
    assert set(memo.planned_options.values()) != {("fp32", 1)}  # 20 Mbit/s: the offer pays
    assert "; step options " in job_status.split_message(memo.planned, memo.planned_options)

    class Recorder:
        def __init__(self):
            self.calls = []

        def annotate_pod(self, namespace, name, values):
            self.calls.append((name, dict(values)))

    kube = Recorder()
    call.ctx.kube = kube
    pods = [reconcile.PodView.of(builders.device_pod(JOB, spec, d, from_env(), split=3)) for d in spec.devices]
    handlers.annotate(call, spec, pods)
    got = {name: values.get(c.ANNOTATION_STEP_OPTIONS) for name, values in kube.calls}
    assert got == {f"demo-{d}": builders.step_options_annotation(*pair) for d, pair in memo.planned_options.items()
                   if pair != ("fp32", 1)}  # the job's own is on the pods already
    # No offer: the same telemetry, no options planned, none written.
    plain = _call(tokens={"controller.token": "t"})
    handlers.optimise(plain, _offered())
    assert plain.state.planned and plain.state.planned_options == {}


def test_split_message_shows_step_options():
    assert job_status.split_message({"pi": 1, "a": 2}, {"pi": ("int8", 4), "a": ("fp32", 1)}) == \
        "splits a=2, pi=1; step options a=fp32:1, pi=int8:4"


def test_with_share_server_the_operator_plans_each_shards_server_shared_by_its_offloaders(monkeypatch):
    """split.shareServer: the operator's policy models each shard's server as shared by that shard's
    offloaders (the telemetry says which shard each device trains at)."""
    from ares.core.messages import TelemetryColumns
    from ares.core.optimiser import StragglerPolicy
    from ares.runtime import controller

    fleet = nano_fleet("abcd", bps=5e7, server=0.3, shards=2)  # a server three times a Nano's tenth
    tail = fleet.server_fwd
    monkeypatch.setattr(controller, "fetch_columns", lambda *a, **k: TelemetryColumns.of(fleet))
    made = []
    decide = controller.decide
    monkeypatch.setattr(controller, "decide", lambda *a, **k: made.append((a[1], decide(*a, **k))) or made[-1][1])
    raw = yaml.safe_load((ROOT / "examples" / "job.yaml").read_text())["spec"]
    raw["split"] = {**raw.get("split", {}), "policy": "straggler", "shareServer": True}
    handlers.optimise(_call(tokens={"controller.token": "t"}), parse_spec(raw))
    (policy, plan), = made
    assert policy == StragglerPolicy(0.5, share_server=True) and plan.server_shared
    offloading = [d for d in plan.devices if d.split < 6]
    assert len(offloading) == 4  # two at each shard: each one's server step twice the server's own
    assert all(d.server_s == pytest.approx(2 * (tail[d.split] + tail[d.split])) for d in offloading)
    raw["split"]["policy"] = "ares"
    with pytest.raises(ValueError, match="split.shareServer is only for mode adaptive with policy straggler"):
        parse_spec(raw)
