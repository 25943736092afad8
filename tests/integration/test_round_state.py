"""`GET /v1/round`: what a waiting device asks. It says what `/v1/status` says of the round, costs
the same at any fleet size, asks for a token, and answers while a closing round holds the lock;
with `round` and `wait` it is a long poll, answered when that round takes joins."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient

from ares.core.config import DeviceSettings
from ares.runtime.device import DeviceTrainer
from ares.runtime.link import HttpLink
from ares.runtime.server import create_app
from ares.runtime.training import TrainingServer, read_tokens
from tests.support import joined_app, small_config, token


def test_the_round_as_the_status_says_it(tmp_path):
    server, client, auth, _, _ = joined_app(tmp_path)
    state, status = client.get("/v1/round", headers=auth).json(), client.get("/v1/status", headers=auth).json()
    assert state == {k: status[k] for k in ("round", "rounds", "phase", "accepting")}
    assert state["round"] == 0 and state["phase"] == "training"


def test_it_asks_for_a_token_of_the_job(tmp_path):
    _, client, _, _, _ = joined_app(tmp_path)
    assert client.get("/v1/round").status_code == 401
    assert client.get("/v1/round", headers={"Authorization": "Bearer not-a-token"}).status_code == 401


@pytest.mark.parametrize("fleet", [2, 400])
def test_its_size_does_not_grow_with_the_fleet(tmp_path, fleet):
    cfg = small_config(tmp_path, devices=tuple(f"dev-{i}" for i in range(fleet)))
    tokens, controller = read_tokens(cfg)
    client = TestClient(create_app(cfg, trainer=TrainingServer(cfg, tokens, controller, profile=False)))
    auth = {"Authorization": f"Bearer {tokens['dev-0']}"}
    body = client.get("/v1/round", headers=auth).content
    assert len(body) < 120, body
    if fleet == 400:  # the status names every device: the poll it replaces grew with the fleet
        assert len(client.get("/v1/status", headers=auth).content) > 100 * len(body)


def test_it_answers_while_a_closing_round_holds_the_lock(tmp_path):
    server, client, auth, _, _ = joined_app(tmp_path)
    with server.lock:  # as while a round closes and evaluates
        answered = {}
        reader = threading.Thread(target=lambda: answered.update(r=client.get("/v1/round", headers=auth)))
        reader.start()
        reader.join(10)
        assert not reader.is_alive(), "GET /v1/round waited for the round lock"
    assert answered["r"].status_code == 200


class CountingLink(HttpLink):
    """The real HTTP/2 link, counting which of the two questions the device asks."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.asked = {"status": 0, "round_state": 0}

    def status(self):
        self.asked["status"] += 1
        return super().status()

    def round_state(self, round_index=None, wait_s=0.0):
        self.asked["round_state"] += 1
        return super().round_state(round_index, wait_s)


@pytest.mark.slow
def test_a_waiting_device_polls_the_round_not_the_fleets_status(tmp_path, server_process):
    """A real server and the device's own loop over HTTP/2, two rounds with a gap between them."""
    cfg = small_config(tmp_path, rounds=2, batch_size=20, max_steps_per_round=2).model_copy(update={"round_gap_s": 1.0})
    server = server_process(cfg)
    (tmp_path / "split").write_text("3\n")
    (tmp_path / "token").write_text(token(cfg, "dev-a"))
    settings = DeviceSettings(name="dev-a", server_url=server.url, token_file=str(tmp_path / "token"),
                              split_file=str(tmp_path / "split"))
    link = CountingLink(server.url, "dev-a", token(cfg, "dev-a"))
    try:
        logs = DeviceTrainer(settings, link).run()
    finally:
        link.close()
    assert [entry.round for entry in logs] == [0, 1]
    assert link.asked["status"] == 0
    # at start, once before each round, and one long poll through the 1 s gap (never 10 a second)
    assert 3 <= link.asked["round_state"] <= 6, link.asked


class _OlderServer(BaseHTTPRequestHandler):
    """A server of an older release: `/v1/status`, no `/v1/round`."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path == "/v1/status":
            body, code = json.dumps({"round": 1, "rounds": 3, "phase": "waiting", "accepting": False}).encode(), 200
        else:
            body, code = b'{"detail": "Not Found"}', 404
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_the_link_asks_for_the_status_where_a_server_has_no_round_route():
    older = ThreadingHTTPServer(("127.0.0.1", 0), _OlderServer)
    threading.Thread(target=older.serve_forever, daemon=True).start()
    link = HttpLink(f"http://127.0.0.1:{older.server_address[1]}", "dev-a", "t", http2=False)
    try:
        state = link.round_state()
    finally:
        link.close()
        older.shutdown()
        older.server_close()
    assert (state.round, state.rounds, state.phase, state.accepting) == (1, 3, "waiting", False)


def test_an_unreachable_server_is_a_503_the_device_waits_out():
    from ares.runtime.link import LinkError
    from tests.support import free_port

    link = HttpLink(f"http://127.0.0.1:{free_port()}", "dev-a", "t")
    try:
        with pytest.raises(LinkError) as err:
            link.round_state()
    finally:
        link.close()
    assert err.value.status == 503


def _in_the_gap(tmp_path, round_wait_s: float = 20.0):
    """The real app (its lifespan running) over a server whose clock the test moves: round 0 closed
    at its deadline, round 1 in the gap before it takes joins. (server, client, auth, clock)."""
    from ares.core.config import LimitsConfig

    now = [1000.0]
    cfg = small_config(tmp_path, devices=("dev-a", "dev-b"), rounds=3, batch_size=20).model_copy(
        update={"round_gap_s": 30.0, "limits": LimitsConfig(round_wait_s=round_wait_s)})
    tokens, controller = read_tokens(cfg)
    server = TrainingServer(cfg, tokens, controller, profile=False, clock=lambda: now[0])
    client = TestClient(create_app(cfg, trainer=server))
    auth = {"Authorization": f"Bearer {tokens['dev-a']}"}
    client.__enter__()
    assert client.post("/v1/devices/dev-a/join", json={"round": 0, "split": 2}, headers=auth).status_code == 200
    now[0] += cfg.round_deadline_s + 1
    server.tick()  # round 0 closes at its deadline; round 1 opens 30 s later by this clock
    assert client.get("/v1/round", headers=auth).json() == {"round": 1, "rounds": 3, "phase": "waiting",
                                                           "accepting": False}
    return server, client, auth, now


def _long_poll(client, auth, wait: float) -> tuple[threading.Thread, dict]:
    """`GET /v1/round?round=1&wait=` asked in a thread: (the thread, where its answer lands as "r")."""
    answered: dict = {}
    poll = threading.Thread(target=lambda: answered.update(
        r=client.get("/v1/round", params={"round": 1, "wait": wait}, headers=auth)))
    poll.start()
    return poll, answered


def test_a_long_poll_is_answered_when_its_round_opens(tmp_path):
    server, client, auth, now = _in_the_gap(tmp_path)
    try:
        poll, answered = _long_poll(client, auth, 20)
        poll.join(1.0)
        assert poll.is_alive(), f"answered while round 1 was closed: {answered}"
        now[0] = server.opens_at  # the gap ends by the server's clock
        poll.join(15)
        assert not poll.is_alive(), "the long poll was not answered when its round opened"
        assert answered["r"].json() == {"round": 1, "rounds": 3, "phase": "waiting", "accepting": True}
    finally:
        client.__exit__(None, None, None)


def test_a_long_poll_ends_with_the_state_as_it_is_after_its_wait(tmp_path):
    """The wait asked for is capped by `limits.round_wait_s`: a device cannot hold a request open
    for longer (here 0.5 s against an ask of an hour)."""
    server, client, auth, now = _in_the_gap(tmp_path, round_wait_s=0.5)
    try:
        poll, answered = _long_poll(client, auth, 3600)
        poll.join(30)
        assert not poll.is_alive(), "a wait of an hour was held past the server's cap"
        assert answered["r"].json()["accepting"] is False
        # a round already open (or a later one) is answered at once, whatever the wait
        assert client.get("/v1/round", params={"round": 0, "wait": 3600}, headers=auth).json()["round"] == 1
    finally:
        client.__exit__(None, None, None)


def test_a_long_poll_asks_for_a_token_before_it_waits(tmp_path):
    server, client, auth, now = _in_the_gap(tmp_path)
    try:
        for headers in ({}, {"Authorization": "Bearer " + "x" * 32}):
            assert client.get("/v1/round", params={"round": 1, "wait": 20}, headers=headers).status_code == 401
        assert client.get("/v1/round", params={"round": "one", "wait": 20}, headers=auth).status_code == 422
    finally:
        client.__exit__(None, None, None)
