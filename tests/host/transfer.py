"""Timed TCP transfer for the shaping tests: ``recv PORT`` / ``send HOST PORT SECONDS``.

Run as a script inside or outside a network namespace. The receiver prints
``ready`` once listening, then one JSON line ``{"bytes": n, "seconds": t}``
measured from the first byte to EOF, i.e. the rate the link delivered.
"""

import json
import socket
import sys
import time

CHUNK = 64 * 1024


def receive(port: int) -> None:
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", port))
        listener.listen(1)
        print("ready", flush=True)
        conn, _ = listener.accept()
        with conn:
            total, first = 0, None
            while True:
                data = conn.recv(CHUNK)
                if not data:
                    break
                if first is None:
                    first = time.monotonic()
                total += len(data)
            seconds = time.monotonic() - first if first is not None else 0.0
    print(json.dumps({"bytes": total, "seconds": seconds}), flush=True)


def send(host: str, port: int, seconds: float) -> None:
    payload = b"\0" * CHUNK
    with socket.create_connection((host, port), timeout=30) as conn:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)  # wait for the receiver to close: everything was delivered


if __name__ == "__main__":
    if sys.argv[1] == "recv":
        receive(int(sys.argv[2]))
    else:
        send(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
