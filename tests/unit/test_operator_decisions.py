"""What the operator's handlers decide, as pure functions: refusals, ServerReady, messages."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from kubernetes.client.rest import ApiException

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "operator"))

from ares.core.messages import ServerStatus  # noqa: E402
from ares_operator import builders, handlers  # noqa: E402
from ares_operator import constants as c  # noqa: E402
from ares_operator.builders import JobRef  # noqa: E402
from ares_operator.kube import NotOurs, Refused, controller_uid  # noqa: E402
from ares_operator.settings import from_env  # noqa: E402
from ares_operator.spec import parse_spec  # noqa: E402

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
    (_refused(422, 'Pod "demo-pi" is invalid: spec.runtimeClassName: RuntimeClass "nvidia" not found'),
     c.REASON_REFUSED, ['RuntimeClass "nvidia" not found']),
    (NotOurs("Pod demo-pi exists and belongs to another owner"), c.REASON_NAME_CONFLICT, ["another owner"]),
], ids=["pod-security", "rbac", "invalid", "namesake"])
def test_every_refusal_says_what_and_why(exc, reason, says):
    got_reason, message = handlers.refusal_message(exc, JOB)
    assert got_reason == reason
    for text in says:
        assert text in message


def test_server_ready_tells_starting_from_unreachable():
    serving = ServerStatus(round=2, rounds=5, phase="training", accuracy=0.5, devices={})
    assert handlers.server_condition(serving, None, "", 60) == (True, c.REASON_SERVER_SERVING, "server phase training")
    ok, reason, _ = handlers.server_condition(None, None, "", 60)
    assert not ok and reason == c.REASON_SERVER_STARTING
    ok, reason, _ = handlers.server_condition(None, 30.0, "ConnectError: refused", 60)
    assert not ok and reason == c.REASON_SERVER_STARTING  # a server loading torch is not unreachable yet
    ok, reason, message = handlers.server_condition(None, 61.0, "ConnectError: refused", 60)
    assert not ok and reason == c.REASON_SERVER_UNREACHABLE and "61s" in message and "ConnectError" in message


def test_split_message_is_readable_and_stable():
    assert handlers.split_message({"pi": 1, "nano-5w": 2}) == "splits nano-5w=2, pi=1"


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
    import logging

    import kopf

    spec = parse_spec(yaml.safe_load((ROOT / "examples" / "job.yaml").read_text())["spec"])
    memo = kopf.Memo(children_ok=True)  # created earlier: nothing is created again (no `memo.kube`)
    args = dict(meta={"generation": 1}, body=None, memo=memo, logger=logging.getLogger("test"))
    lost = {"conditions": [{"type": c.COND_SPEC_VALID, "status": "True"}]}
    patch = kopf.Patch()
    assert handlers._ensure_children(JOB, spec, lost, patch=patch, **args)
    created = [cond for cond in patch.status["conditions"] if cond["type"] == c.COND_CREATED]
    assert [cond["status"] for cond in created] == ["True"] and created[0]["reason"] == c.REASON_CREATED
    assert {cond["type"] for cond in patch.status["conditions"]} == {c.COND_SPEC_VALID, c.COND_CREATED}
    # Present (True, or False with a refusal's reason): left alone, no patch.
    for value in ("True", "False"):
        kept = {"conditions": [{"type": c.COND_CREATED, "status": value, "reason": "x"}]}
        patch = kopf.Patch()
        assert handlers._ensure_children(JOB, spec, kept, patch=patch, **args)
        assert not patch
