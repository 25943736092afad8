"""The devices' HTTP/2 transport (ares/runtime/h2client.py) against a real granian server with
the edge server's HTTP/2 settings: bodies larger than a frame and a window, concurrent streams
from several threads on one connection, an early refusal during an upload, a read timeout, and
a server that goes away and comes back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from ares.runtime.h2client import H2Transport
from tests.support import free_port, stop_process

APP = '''
import asyncio
from fastapi import FastAPI, Request
from fastapi.responses import Response
app = FastAPI()

@app.post("/echo")
async def echo(request: Request):
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
    return Response(bytes(body), headers={"x-peer": str(request.client.port)})

@app.post("/refuse")
async def refuse():  # answers without reading the body, as the server does past max_body_mib
    return Response(b"too large", status_code=413)

@app.get("/slow")
async def slow():
    await asyncio.sleep(3)
    return Response(b"late")
'''

SERVER = ("import sys\nfrom granian import Granian\nfrom granian.http import HTTP2Settings\n"
          "Granian('h2app:app', address='127.0.0.1', port=int(sys.argv[1]), interface='asgi', http='auto',"
          " http2_settings=HTTP2Settings(initial_stream_window_size=16<<20, initial_connection_window_size=16<<20,"
          " max_frame_size=1<<20)).serve()\n")


class Granian:
    def __init__(self, tmp: Path, port: int):
        (tmp / "h2app.py").write_text(APP)
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], cwd=tmp,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/docs", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("granian did not start")

    def stop(self) -> None:
        stop_process(self.proc)

    def kill(self) -> None:
        """Gone at once, workers and all. (SIGTERM waits for open connections to close: with a
        client holding one, stop() only ends it by SIGKILL after its 10 s grace.)"""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    srv = Granian(tmp_path_factory.mktemp("h2"), port)
    yield f"http://127.0.0.1:{port}"
    srv.stop()


def chunks(data: bytes, size: int = 256 << 10):
    return (data[i:i + size] for i in range(0, len(data), size))


def test_large_bodies_both_ways(server):
    payload = os.urandom(40 << 20)  # larger than a frame and than both 16 MiB windows
    with httpx.Client(base_url=server, transport=H2Transport(), timeout=60) as client:
        r = client.post("/echo", content=chunks(payload), headers={"Content-Length": str(len(payload))})
        assert r.status_code == 200 and r.http_version == "HTTP/2"
        assert r.content == payload
        r = client.post("/echo", content=b"small")  # a plain bytes body, on the same connection
        assert r.content == b"small"


def test_concurrent_streams_share_one_connection(server):
    payloads = [os.urandom((i + 1) * (700 << 10)) for i in range(8)]
    results: dict[int, tuple[bytes, str]] = {}
    with httpx.Client(base_url=server, transport=H2Transport(), timeout=60) as client:
        client.get("/docs")  # open the connection first, as a device does when it joins

        def post(i: int) -> None:
            r = client.post("/echo", content=chunks(payloads[i]), headers={"Content-Length": str(len(payloads[i]))})
            results[i] = (r.content, r.headers["x-peer"])

        threads = [threading.Thread(target=post, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert sorted(results) == list(range(8))
    assert all(results[i][0] == payloads[i] for i in range(8))  # no stream got another's bytes
    assert len({peer for _, peer in results.values()}) == 1  # one TCP connection for all


def test_early_refusal_during_upload_is_answered(server):
    payload = os.urandom(48 << 20)  # three windows' worth: the server never reads it
    with httpx.Client(base_url=server, transport=H2Transport(), timeout=30) as client:
        r = client.post("/refuse", content=chunks(payload), headers={"Content-Length": str(len(payload))})
        assert r.status_code == 413 and r.content == b"too large"
        assert client.post("/echo", content=b"after").content == b"after"  # the connection lives on


def test_read_timeout_then_the_connection_still_works(server):
    with httpx.Client(base_url=server, transport=H2Transport(), timeout=httpx.Timeout(0.5, connect=5)) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.get("/slow")
        assert client.post("/echo", content=b"again").content == b"again"


def test_server_gone_then_back(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    srv = Granian(tmp_path, port)
    with httpx.Client(base_url=url, transport=H2Transport(), timeout=10) as client:
        try:
            assert client.post("/echo", content=b"one").content == b"one"
        finally:
            srv.kill()
        with pytest.raises(httpx.TransportError):  # LinkError(503) in HttpLink
            client.post("/echo", content=b"two")
        srv = Granian(tmp_path, port)
        try:
            assert client.post("/echo", content=b"three").content == b"three"  # a new connection
        finally:
            srv.kill()


class RawH2Server:
    """A one-connection HTTP/2 server on jh2 that answers every request with the frames a test
    chooses: what granian never sends (a lying Content-Length, padded DATA, tiny frames, and raw
    bytes that `answer` returns, past jh2's own checks)."""

    def __init__(self, answer):
        import socket

        import jh2.config
        import jh2.connection
        import jh2.events

        self.answer, self.errors = answer, []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

        def serve():
            conn, _ = self.sock.accept()
            h2 = jh2.connection.H2Connection(jh2.config.H2Configuration(client_side=False, header_encoding=None))
            h2.initiate_connection()
            conn.sendall(h2.data_to_send())
            with conn:
                while data := conn.recv(1 << 20):
                    for event in h2.receive_data(data):
                        if isinstance(event, jh2.events.DataReceived):
                            h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                        if isinstance(event, jh2.events.StreamEnded):
                            raw = self.answer(h2, event.stream_id)  # bytes past jh2, if any
                            conn.sendall(h2.data_to_send() + (raw or b""))
                    conn.sendall(h2.data_to_send())

        threading.Thread(target=serve, daemon=True).start()


def _respond(h2, stream_id, body: bytes, length: int, frame: int, pad: int = 0) -> None:
    h2.send_headers(stream_id, [(b":status", b"200"), (b"content-length", str(length).encode())])
    for i in range(0, len(body), frame):
        h2.send_data(stream_id, body[i:i + frame], pad_length=pad or None)
    h2.end_stream(stream_id)


def test_padded_and_tiny_data_frames_arrive_whole():
    body = os.urandom(50_000)
    # padded frames go through jh2; 997-byte frames cut across every read the client makes
    for frame, pad in ((16_000, 7), (997, 0)):
        srv = RawH2Server(lambda h2, sid: _respond(h2, sid, body, len(body), frame, pad))
        with httpx.Client(base_url=srv.url, transport=H2Transport(), timeout=10) as client:
            for _ in range(3):
                assert client.get("/").content == body


@pytest.mark.parametrize("declared", [49_999, 50_001])
@pytest.mark.parametrize("pad", [0, 7])
def test_a_body_that_differs_from_its_content_length_is_refused(declared, pad):
    body = os.urandom(50_000)
    srv = RawH2Server(lambda h2, sid: _respond(h2, sid, body, declared, 16_000, pad))
    with httpx.Client(base_url=srv.url, transport=H2Transport(), timeout=10) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            client.get("/").read()


def test_response_payloads_bypass_jh2(server, monkeypatch):
    """jh2 copies every byte it is fed three times: a 20 MiB body must not pass through it."""
    import jh2.connection

    fed = []
    real = jh2.connection.H2Connection.receive_data
    monkeypatch.setattr(jh2.connection.H2Connection, "receive_data",
                        lambda self, data: fed.append(len(data)) or real(self, data))
    payload = os.urandom(20 << 20)
    with httpx.Client(base_url=server, transport=H2Transport(), timeout=60) as client:
        r = client.post("/echo", content=chunks(payload), headers={"Content-Length": str(len(payload))})
    assert r.content == payload
    assert sum(fed) < 64 << 10, f"{sum(fed)} bytes went through jh2"


def test_a_frame_over_the_advertised_size_ends_the_connection_at_once():
    """The transport advertises 1 MiB frames: a 2 MiB DATA frame is a protocol error as soon as
    its header arrives, before any of its payload is buffered."""
    def oversized(h2, stream_id) -> bytes:
        h2.send_headers(stream_id, [(b":status", b"200")])
        return (2 << 20).to_bytes(3, "big") + bytes([0, 0]) + stream_id.to_bytes(4, "big")  # DATA, no flags

    srv = RawH2Server(oversized)
    with httpx.Client(base_url=srv.url, transport=H2Transport(), timeout=10) as client:
        with pytest.raises(httpx.RemoteProtocolError, match="frame of 2097152 bytes"):
            client.get("/").read()
