"""What the server refuses is a type; its HTTP status is chosen in one table at the edge
(ares.runtime.server.STATUS), and the in-process link answers with the same statuses."""

from __future__ import annotations

import time

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from ares.core import wire
from ares.runtime import limits, training
from ares.runtime.server import STATUS, headers_of, status_of

EXPECTED = [
    (wire.WireError, 400), (wire.FrameTooLarge, 413), (wire.Unacceptable, 422), (wire.NonFinite, 422),
    (limits.BodyTimeout, 408), (limits.DeviceBusy, 429),
    (training.Unauthorized, 401), (training.UnknownDevice, 404), (training.TurnTimeout, 408),
    (training.RoundClosed, 409), (training.RoundNotOpen, 409), (training.NotJoined, 409),
    (training.AlreadyFinished, 409), (training.ConflictingUpload, 409), (training.OutOfTurn, 409),
    (training.TrainingOver, 410), (training.TrainingFailed, 410),
    (training.WrongSplit, 422), (training.BadMicroBatch, 422), (training.BadTensor, 422), (training.UnsafeUpdate, 422),
]
# and a JSON message its schema refuses, or a query parameter missing or of the wrong type: 422


def kinds(base: type) -> set[type]:
    out = set()
    for sub in base.__subclasses__():
        out |= {sub, *kinds(sub)}
    return out


def make(kind: type) -> Exception:
    if kind is training.TrainingFailed:
        return kind(training.RunFailure("diverged", "training diverged"))
    return kind("why")


@pytest.mark.parametrize("kind, status", EXPECTED, ids=[k.__name__ for k, _ in EXPECTED])
def test_each_refusal_has_its_status(kind, status):
    assert status_of(make(kind)) == status


def test_every_kind_of_refusal_is_answered():
    """A new kind of refusal is never a 500: it has an entry in the table, or its base has."""
    named = {k for k, _ in EXPECTED}
    assert kinds(training.Refusal) | kinds(wire.WireError) <= named
    assert set(STATUS) - named == {ValidationError, RequestValidationError}  # malformed JSON messages and queries
    with pytest.raises(TypeError, match="not a refusal"):
        status_of(RuntimeError("a bug"))


def test_only_a_busy_device_is_told_when_to_come_back():
    assert headers_of(limits.DeviceBusy("busy")) == {"Retry-After": str(limits.RETRY_AFTER_S)}
    assert all(headers_of(make(k)) is None for k, _ in EXPECTED if k is not limits.DeviceBusy)


def test_the_in_process_link_answers_with_the_servers_statuses(tmp_path):
    from ares.runtime.inprocess import InProcessLink
    from ares.runtime.link import LinkError
    from ares.runtime.training import TrainingServer, read_tokens
    from tests.support import small_config

    cfg = small_config(tmp_path, devices=("dev-a",), rounds=1)
    cfg = cfg.model_copy(update={"limits": cfg.limits.model_copy(update={"join_wait_s": 0.5})})
    link = InProcessLink(TrainingServer(cfg, *read_tokens(cfg), profile=False), "dev-a")
    with pytest.raises(LinkError) as err:
        link.join(0, 99)
    assert err.value.status == 422 and "split" in err.value.message
    started = time.monotonic()
    with pytest.raises(LinkError) as err:
        link.join(3, 3)  # waits the server's join_wait_s for the round, as over HTTP
    assert err.value.status == 409 and "not open yet" in err.value.message
    assert 0.5 <= time.monotonic() - started < 20
