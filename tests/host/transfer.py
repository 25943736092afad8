"""Timed TCP transfer for the shaping tests: ``recv PORT [WINDOW]`` / ``send HOST PORT SECONDS [CC]``.

Run as a script inside or outside a network namespace. The receiver prints
``ready`` once listening, then one JSON line ``{"bytes": n, "seconds": t, "samples": [...]}``
measured from the first byte to EOF, i.e. the rate the link delivered. ``samples`` are
``[time.monotonic(), bytes so far]`` pairs at most every 50 ms: the clock is the same in every
namespace, so two transfers' bytes can be compared over a window in which both ran. ``WINDOW``
caps the receive buffer (SO_RCVBUF) in bytes, so the sender keeps at most about that much in
flight, as an HTTP/2 stream window or a small socket buffer does. ``CC`` names the sender's
congestion control (e.g. ``cubic``, which fills a queue where ``bbr`` keeps it short).
"""

import json
import socket
import sys
import time

CHUNK = 64 * 1024
SAMPLE_EVERY = 0.05
SO_RCVBUFFORCE = 33  # Linux; as SO_RCVBUF but past net.core.rmem_max (root only)


def receive(port: int, window: int = 0) -> None:
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if window:  # before listen: the accepted socket inherits it, window scale included
            listener.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, window)
        listener.bind(("0.0.0.0", port))
        listener.listen(1)
        print("ready", flush=True)
        conn, _ = listener.accept()
        with conn:
            total, first, samples = 0, None, []
            while True:
                data = conn.recv(CHUNK)
                if not data:
                    break
                now = time.monotonic()
                if first is None:
                    first = now
                total += len(data)
                # the last sample is always the latest count; a new one starts every SAMPLE_EVERY
                if len(samples) >= 2 and now - samples[-2][0] < SAMPLE_EVERY:
                    samples[-1] = [now, total]
                else:
                    samples.append([now, total])
            seconds = time.monotonic() - first if first is not None else 0.0
    print(json.dumps({"bytes": total, "seconds": seconds, "samples": samples}), flush=True)


def send(host: str, port: int, seconds: float, congestion: str = "") -> None:
    payload = b"\0" * CHUNK
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as conn:
        if congestion:  # before connect, so the whole transfer uses it
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())
        conn.settimeout(30)
        conn.connect((host, port))
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)  # wait for the receiver to close: everything was delivered


if __name__ == "__main__":
    if sys.argv[1] == "recv":
        receive(int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    else:
        send(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5] if len(sys.argv) > 5 else "")
