"""An httpx transport speaking HTTP/2 through the public API of `jh2`, with large frames.

Why not httpx's own HTTP/2 (httpcore over `h2`): it advertises 16 KiB frames and a 64 KiB
stream window and offers no setting for either, so a 3 MB gradient arrives as ~200 frames,
each parsed and acknowledged in pure Python, and `h2` formats `repr(frame)` for its trace log
on every frame it receives, whether anyone logs or not: a hex dump of the whole payload, which
cost more client CPU than the framing itself (the 8 MiB round trip on loopback took 74 ms
against 7-10 ms over raw TCP). `jh2` is the maintained fork of `h2` (same API) without that
dump. Here the client advertises 1 MiB frames and 16 MiB windows (the server's own settings,
ares/runtime/server.py) and reads 1 MiB at a time.

One connection per transport (a device talks to one server), opened on first use and again
after the server closed it; h2c with prior knowledge for http://, TLS with ALPN h2 for https://
(the caller's `ssl.SSLContext`; `sni_hostname` in the request's extensions overrides the name
checked, as httpx's own transport honours). Several threads may each run a request at once:
each is one stream; one lock guards the h2 state and the socket, and whichever thread waits
for data reads the socket and files the events of every stream (httpcore's scheme). Failures
are httpx's exceptions (ConnectError, ReadTimeout, RemoteProtocolError ...), so callers map
them exactly as before.

The payload of a response's DATA frames bypasses jh2's buffers, which copy every byte three
times (its frame buffer, a slice, `tobytes`: 1.3-1.8 ms of a 3 MB gradient on this 2-core VM).
Frames are cut here; jh2 still sees every frame, a DATA frame with its payload left out, so
its state machine judges the stream's state and END_STREAM as before. What jh2 therefore no
longer sees we do ourselves: the connection and stream WINDOW_UPDATEs for those bytes and the
response's Content-Length. Padded DATA frames, and DATA for a stream that is not ours or has no
response head yet, go through jh2 whole.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import threading
import time
from collections import deque
from typing import Iterator, Optional

import httpx
import jh2 as h2  # the maintained fork of `h2`, same API; see the module docstring for why
import jh2.config
import jh2.connection
import jh2.errors
import jh2.events
import jh2.exceptions
import jh2.settings

FRAME = 1 << 20      # MAX_FRAME_SIZE we accept (the server sends up to its own 1 MiB)
WINDOW = 16 << 20    # stream and connection receive windows, as the server's
READ = 1 << 20       # bytes per recv
_SKIP = {b"host", b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
_HEAD = struct.Struct(">HBBBL")  # a frame header: length (24 bits as 16 + 8), type, flags, stream id
DATA, WINDOW_UPDATE = 0x0, 0x8
END_STREAM, PADDED = 0x1, 0x8


def _frame_head(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    return _HEAD.pack(length >> 8, length & 0xFF, kind, flags, stream_id & 0x7FFFFFFF)


class _Chunk:
    """A piece of a response body that bypassed jh2 (see the module docstring)."""

    __slots__ = ("data",)

    def __init__(self, data: memoryview) -> None:
        self.data = data


class _Stream:
    def __init__(self) -> None:
        self.events: deque = deque()
        self.ended = False      # the server's side is done and read
        self.uploaded = False   # our side is done (END_STREAM sent)
        self.direct = False     # its response head is filed: DATA payloads may bypass jh2
        self.expected: Optional[int] = None  # the response's Content-Length
        self.received = 0       # body bytes that bypassed jh2


class _Connection:
    """One HTTP/2 connection shared by threads; every h2 and socket call happens under `_io`."""

    def __init__(self, sock: socket.socket, write_s: Optional[float]) -> None:
        self.sock = sock
        self._io = threading.Lock()        # h2 state + socket
        self._cv = threading.Condition()   # one thread reads the socket at a time; the rest wait here
        self._reading = False
        self.streams: dict[int, _Stream] = {}
        self.closed = False
        self.goaway = False                # the server takes no new streams on this connection
        self.write_s = write_s
        self.error: Optional[Exception] = None
        self._pending = bytearray()   # a frame's bytes read so far (header, or a whole frame for jh2)
        self._payload_left = 0        # payload bytes still to come of the DATA frame that bypasses jh2
        self._payload: tuple[int, int, int, Optional[_Stream]] = (0, 0, 0, None)  # its sid, flags, length, stream
        self._owed = bytearray()      # WINDOW_UPDATE frames for bypassed bytes, sent with the next flush
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_inbound_headers=False))
        self.h2.initiate_connection()
        self.h2.update_settings({h2.settings.SettingCodes.MAX_FRAME_SIZE: FRAME,
                                 h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
                                 h2.settings.SettingCodes.ENABLE_PUSH: 0})
        self.h2.increment_flow_control_window(WINDOW - 65535)
        with self._io:
            self._flush()

    # --- socket I/O (callers hold `_io`) -------------------------------------------------

    def _flush(self) -> None:
        out = self.h2.data_to_send()
        if self._owed:
            out, self._owed = out + self._owed, bytearray()
        if out:
            try:
                self.sock.settimeout(self.write_s)
                self.sock.sendall(out)
            except socket.timeout as exc:
                self._fail(httpx.WriteTimeout(f"write timed out: {exc}"))
            except OSError as exc:
                self._fail(httpx.WriteError(f"{exc.__class__.__name__}: {exc}"))

    def _fail(self, exc: Exception):
        """The connection is unusable: every stream on it fails with `exc`."""
        self.closed = True
        self.error = self.error or exc
        try:
            self.sock.close()
        except OSError:
            pass
        raise exc

    def _check(self) -> None:
        if self.error is not None:
            raise type(self.error)(str(self.error))
        if self.closed:
            raise httpx.RemoteProtocolError("connection closed by the server")

    def _recv(self) -> Optional[bytes]:
        """Non-blocking read under `_io`: None when nothing is there yet (a TLS record that
        held no data, e.g. a session ticket), so the lock is never held while waiting."""
        if not ((isinstance(self.sock, ssl.SSLSocket) and self.sock.pending())
                or select.select([self.sock], [], [], 0)[0]):
            return None
        self.sock.settimeout(0.0)
        try:
            data = self.sock.recv(READ)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return None
        except OSError as exc:
            self._fail(httpx.ReadError(f"{exc.__class__.__name__}: {exc}"))
        if not data:
            self._fail(httpx.RemoteProtocolError("server disconnected"))
        try:
            self._cut(memoryview(data))
        except h2.exceptions.ProtocolError as exc:
            self._fail(httpx.RemoteProtocolError(f"HTTP/2 protocol error: {exc}"))
        self._flush()
        return data

    def _cut(self, view: memoryview) -> None:
        """Cut what was read into frames, filing events in the order their frames came."""
        while view.nbytes:
            if self._payload_left:  # inside a DATA frame that bypasses jh2: its bytes go to the stream
                n = min(self._payload_left, view.nbytes)
                stream = self._payload[3]
                if stream is not None:
                    stream.events.append(_Chunk(view[:n]))
                    stream.received += n
                self._payload_left -= n
                view = view[n:]
                if not self._payload_left:
                    self._data_done()
                continue
            need = 9 if len(self._pending) < 9 else 9 + int.from_bytes(self._pending[:3], "big")
            take = min(need - len(self._pending), view.nbytes)
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) < 9:
                return
            high, low, kind, flags, stream_id = _HEAD.unpack(self._pending[:9])
            length, stream_id = (high << 8) | low, stream_id & 0x7FFFFFFF
            if length > FRAME:  # refused now, not after buffering up to 16 MiB of it
                raise h2.exceptions.FrameTooLargeError(f"frame of {length} bytes; we accept {FRAME}")
            stream = self.streams.get(stream_id)
            if (len(self._pending) == 9 and kind == DATA and not flags & PADDED
                    and stream is not None and stream.direct):
                self._pending.clear()
                self._data_start(stream_id, flags, length, stream)
            elif len(self._pending) == 9 + length:
                frame, self._pending = bytes(self._pending), bytearray()
                self._file(self.h2.receive_data(frame))

    def _data_start(self, stream_id: int, flags: int, length: int, stream: _Stream) -> None:
        """jh2 gets the frame without its payload (END_STREAM waits for the payload's end): it
        still refuses DATA on a stream that may not have any. Its DataReceived is dropped."""
        events = self.h2.receive_data(_frame_head(0, DATA, flags & ~END_STREAM, stream_id))
        accepted = any(isinstance(e, h2.events.DataReceived) and e.stream_id == stream_id for e in events)
        self._file([e for e in events if not isinstance(e, h2.events.DataReceived)])
        self._payload_left = length
        self._payload = (stream_id, flags, length, stream if accepted else None)
        if not length:
            self._data_done()

    def _data_done(self) -> None:
        stream_id, flags, length, stream = self._payload
        self._payload = (0, 0, 0, None)
        if length:  # the server may send as much again
            self._owed += _frame_head(4, WINDOW_UPDATE, 0, 0) + length.to_bytes(4, "big")
            if not flags & END_STREAM and stream is not None and self.streams.get(stream_id) is stream:
                self._owed += _frame_head(4, WINDOW_UPDATE, 0, stream_id) + length.to_bytes(4, "big")
        if flags & END_STREAM:
            self._file(self.h2.receive_data(_frame_head(0, DATA, END_STREAM, stream_id)))

    def _receive(self, timeout: Optional[float]) -> None:
        """Read once (waiting up to `timeout`) and file the events under their streams."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._io:
                self._check()
                if self._recv() is not None:
                    return
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise httpx.ReadTimeout("timed out waiting for the server")
            try:
                select.select([self.sock], [], [], left)  # outside the lock: others may send meanwhile
            except (OSError, ValueError):
                pass  # closed by another thread meanwhile: `_check` says why

    def _file(self, events) -> None:
        for event in events:
            stream_id = getattr(event, "stream_id", None)
            if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = True  # GOAWAY: streams above last_stream_id will never be answered
                for sid, stream in self.streams.items():
                    if event.last_stream_id is None or sid > event.last_stream_id or event.error_code:
                        stream.events.append(event)
            elif stream_id and stream_id in self.streams:
                stream = self.streams[stream_id]
                if isinstance(event, h2.events.ResponseReceived) and event.stream_ended is None:
                    self._go_direct(stream, self.h2.streams.get(stream_id), event.headers)
                elif isinstance(event, h2.events.DataReceived) and stream.direct:
                    stream.received += len(event.data)  # a padded frame that jh2 read
                if (isinstance(event, h2.events.StreamEnded) and stream.direct and stream.expected is not None
                        and stream.received != stream.expected):
                    raise h2.exceptions.ProtocolError(f"response body of {stream.received} bytes, "
                                                      f"Content-Length {stream.expected}")
                stream.events.append(event)

    @staticmethod
    def _go_direct(stream: _Stream, state, headers) -> None:
        """From its response head on, the stream's DATA payloads bypass jh2, which must then stop
        counting them against the Content-Length (we count instead: `_data_done`)."""
        for name, value in headers:
            if name == b"content-length":
                try:
                    stream.expected = int(value)
                except ValueError:
                    return  # jh2 refuses the response itself
        if state is None or not hasattr(state, "_expected_content_length"):
            return  # a jh2 without that field: its own path stays, and stays correct
        state._expected_content_length = None  # jh2 5.0.15 (pinned); a rename fails the tests
        stream.direct = True

    def _await(self, ready, timeout: Optional[float]) -> None:
        """Until `ready()`: read the socket, or, while another thread reads it, wait for that
        thread to file what it read (a Condition, so no waiter sleeps past its events)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ready():
            left = None if deadline is None else deadline - time.monotonic()
            with self._cv:
                if self._reading:
                    if not self._cv.wait(left) and not ready():
                        raise httpx.ReadTimeout("timed out waiting for the server")
                    continue
                self._reading = True
            try:
                self._receive(left)
            finally:
                with self._cv:
                    self._reading = False
                    self._cv.notify_all()

    def _next_event(self, stream_id: int, timeout: Optional[float]):
        stream = self.streams[stream_id]
        self._await(lambda: bool(stream.events), timeout)
        return stream.events.popleft()

    # --- one request ---------------------------------------------------------------------

    def usable(self) -> bool:
        """False once closed; an idle connection is polled, so a server restart is noticed."""
        if self.closed or self.goaway:
            return False
        with self._cv:
            if self.streams or self._reading:
                return True
            try:
                with self._io:
                    self._recv()
            except (OSError, h2.exceptions.ProtocolError, httpx.TransportError):
                self.closed = True
        return not (self.closed or self.goaway)

    def request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        read_s, write_s = timeouts.get("read"), timeouts.get("write")
        url = request.url
        authority = url.netloc.decode("ascii")
        headers = [(b":method", request.method.encode()), (b":authority", authority.encode()),
                   (b":scheme", url.scheme.encode()), (b":path", url.raw_path)]
        headers += [(k.lower(), v) for k, v in request.headers.raw if k.lower() not in _SKIP]
        has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
        with self._io:
            self._check()
            self.write_s = write_s
            stream_id = self.h2.get_next_available_stream_id()
            self.streams[stream_id] = _Stream()
            self.streams[stream_id].uploaded = not has_body
            try:
                self.h2.send_headers(stream_id, headers, end_stream=not has_body)
            except h2.exceptions.ProtocolError as exc:
                del self.streams[stream_id]
                raise httpx.LocalProtocolError(str(exc)) from exc
            self._flush()
        try:
            if has_body:
                self._upload(stream_id, request.stream, read_s)
            status, response_headers = self._response_head(stream_id, read_s)
        except BaseException:
            self._abandon(stream_id)
            raise
        return httpx.Response(status, headers=response_headers, stream=_Body(self, stream_id, read_s),
                              extensions={"http_version": b"HTTP/2"})

    def _upload(self, stream_id: int, body, read_s: Optional[float]) -> None:
        stream = self.streams[stream_id]
        for chunk in body:
            view = memoryview(chunk)
            while view.nbytes:
                with self._io:
                    self._check()
                    if self._answered(stream):
                        return  # the server answered early (a refusal): stop sending, read it
                    try:
                        room = min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
                    except h2.exceptions.StreamClosedError:
                        return
                    if room > 0:
                        self.h2.send_data(stream_id, view[:room])  # a view: copied once, into the frame
                        view = view[room:]
                        self._flush()
                        continue
                self._await(lambda: self._room(stream_id) or self._answered(stream), read_s)  # no window yet
        with self._io:
            self._check()
            if not self._answered(stream):
                try:
                    self.h2.end_stream(stream_id)
                except h2.exceptions.StreamClosedError:
                    return
                stream.uploaded = True
                self._flush()

    def _room(self, stream_id: int) -> bool:
        with self._io:
            try:
                return self.closed or self.h2.local_flow_control_window(stream_id) > 0
            except h2.exceptions.StreamClosedError:
                return True

    @staticmethod
    def _answered(stream: _Stream) -> bool:
        return any(isinstance(e, (h2.events.StreamReset, h2.events.StreamEnded, h2.events.ConnectionTerminated))
                   for e in stream.events)

    def _response_head(self, stream_id: int, read_s: Optional[float]) -> tuple[int, list]:
        while True:
            event = self._next_event(stream_id, read_s)
            if isinstance(event, h2.events.ResponseReceived):
                headers = [(k, v) for k, v in event.headers if not k.startswith(b":")]
                status = next(int(v) for k, v in event.headers if k == b":status")
                if event.stream_ended is not None:
                    self.streams[stream_id].events.appendleft(event.stream_ended)
                return status, headers
            self._raise_if_ended(event)

    @staticmethod
    def _raise_if_ended(event) -> None:
        if isinstance(event, h2.events.StreamReset):
            raise httpx.RemoteProtocolError(f"stream reset by the server (error code {event.error_code})")
        if isinstance(event, h2.events.ConnectionTerminated):
            raise httpx.RemoteProtocolError(f"connection closed by the server (GOAWAY {event.error_code})")

    def body(self, stream_id: int, read_s: Optional[float]) -> Iterator[bytes]:
        while True:
            event = self._next_event(stream_id, read_s)
            if isinstance(event, _Chunk):
                yield event.data
            elif isinstance(event, h2.events.DataReceived):
                if event.data:
                    yield event.data
                if event.stream_ended is not None:
                    break
            elif isinstance(event, h2.events.StreamEnded):
                break
            else:
                self._raise_if_ended(event)
        self.streams[stream_id].ended = True

    def _abandon(self, stream_id: int) -> None:
        """Forget a stream; cancel it at the server if it is still open."""
        stream = self.streams.pop(stream_id, None)
        if stream is None or (stream.ended and stream.uploaded) or self.closed:
            return  # (an early answer leaves our side open: it is reset below)
        with self._io:
            try:
                self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
                self._flush()
            except (h2.exceptions.ProtocolError, httpx.TransportError):
                pass

    def close(self) -> None:
        with self._io:
            if self.closed:
                return
            self.closed = True
            try:
                self.h2.close_connection()
                self.sock.sendall(self.h2.data_to_send())
            except (OSError, h2.exceptions.ProtocolError):
                pass
            self.sock.close()


class _Body(httpx.SyncByteStream):
    def __init__(self, conn: _Connection, stream_id: int, read_s: Optional[float]):
        self.conn, self.stream_id, self.read_s = conn, stream_id, read_s

    def __iter__(self) -> Iterator[bytes]:
        yield from self.conn.body(self.stream_id, self.read_s)

    def close(self) -> None:
        self.conn._abandon(self.stream_id)


class H2Transport(httpx.BaseTransport):
    """HTTP/2 only: h2c with prior knowledge for http://, ALPN h2 over `ssl_context` for https://."""

    def __init__(self, ssl_context: Optional[ssl.SSLContext] = None):
        self._ssl = ssl_context
        self._lock = threading.Lock()
        self._conn: Optional[_Connection] = None

    def _connect(self, request: httpx.Request) -> _Connection:
        url = request.url
        timeouts = request.extensions.get("timeout", {})
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            sock = socket.create_connection((url.host, port), timeout=timeouts.get("connect"))
        except socket.timeout as exc:
            raise httpx.ConnectTimeout(f"connecting to {url.host}:{port} timed out") from exc
        except OSError as exc:
            raise httpx.ConnectError(f"{exc.__class__.__name__}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if url.scheme == "https":
            ctx = self._ssl or ssl.create_default_context()
            ctx.set_alpn_protocols(["h2"])
            name = request.extensions.get("sni_hostname") or url.host
            try:
                sock = ctx.wrap_socket(sock, server_hostname=name)
            except (OSError, ssl.SSLError) as exc:
                sock.close()
                if isinstance(exc, socket.timeout):
                    raise httpx.ConnectTimeout(f"TLS handshake with {url.host}:{port} timed out") from exc
                raise httpx.ConnectError(f"{exc.__class__.__name__}: {exc}") from exc
            if sock.selected_alpn_protocol() != "h2":
                sock.close()
                raise httpx.ConnectError(f"{url.host}:{port} did not agree to HTTP/2 (ALPN h2)")
        return _Connection(sock, timeouts.get("write"))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            if self._conn is None or not self._conn.usable():
                if self._conn is not None and not self._conn.streams:
                    self._conn.close()
                self._conn = self._connect(request)
            conn = self._conn
        return conn.request(request)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
