"""What an eavesdropper on the device's network sees of a training round over TLS: nothing useful.

A real `ares server` listens on the root side of a veth pair; a real `ares device` runs in its own
network namespace and trains one round against it over HTTPS. A raw AF_PACKET socket on the veth
captures every frame; the TCP streams are reassembled and searched for the device's bearer token
(as sent and as HPACK's Huffman code), the wire format's magic and JSON header, and 64-byte
windows of the weights the server really sends at the join (the seeded initial model). A plain
TCP transfer of the same secrets through the same capture is the control: there they are found.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from ares.core import pki, wire
from ares.core.models import build_model
from ares.runtime.link import HttpLink
from ares.runtime.tlsclient import ClientTls
from tests.support import ROOT, free_port, small_config, token

from tests.support import host_skip_reason

pytestmark = [pytest.mark.host, pytest.mark.slow]
NAME = "ares-server.lab.svc"
ETH_P_ALL = 0x0003
SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; the socket module does not name it


class Capture:
    """Every frame on one interface, in a thread, until stopped."""

    def __init__(self, interface: str):
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)  # root: past rmem_max
        self.sock.bind((interface, 0))
        self.sock.settimeout(0.05)
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.frames.append(self.sock.recv(1 << 18))
            except socket.timeout:
                continue

    def stop(self) -> list[bytes]:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        return self.frames


def tcp_streams(frames: list[bytes], port: int) -> dict[tuple, bytes]:
    """Reassemble the payload of every TCP flow to or from `port`, per direction."""
    segments: dict[tuple, dict[int, bytes]] = defaultdict(dict)
    first: dict[tuple, int] = {}
    for f in frames:
        if len(f) < 34 or f[12:14] != b"\x08\x00" or f[23] != 6:  # IPv4, TCP
            continue
        ihl = (f[14] & 0x0F) * 4
        total = struct.unpack("!H", f[16:18])[0]
        tcp = 14 + ihl
        sport, dport, seq = struct.unpack("!HHI", f[tcp:tcp + 8])
        if port not in (sport, dport):
            continue
        payload = f[tcp + (f[tcp + 12] >> 4) * 4:14 + total]
        if not payload:
            continue
        key = (f[26:30], sport, f[30:34], dport)
        first.setdefault(key, seq)
        segments[key][(seq - first[key]) % (1 << 32)] = payload
    streams = {}
    for key, parts in segments.items():
        data = bytearray()
        for offset, payload in sorted(parts.items()):
            if offset > len(data):
                data += b"\0" * (offset - len(data))  # a frame the capture missed
            data += payload[len(data) - offset:]
        streams[key] = bytes(data)
    return streams


def huffman(value: bytes) -> bytes:
    """How HTTP/2 (HPACK) sends a header value; the last byte holds padding, so it is left out."""
    from hpack.huffman import HuffmanEncoder
    from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH

    return HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH).encode(value)[:-1]


def secrets_in(blob: bytes, needles: dict[str, bytes]) -> list[str]:
    return [what for what, needle in needles.items() if needle in blob]


@pytest.fixture
def netns():
    reason = host_skip_reason()
    if reason:
        pytest.skip(reason)
    from ares.runtime.netns import DeviceNamespace

    with DeviceNamespace(211) as ns:
        yield ns


def test_a_training_round_over_tls_shows_no_token_and_no_tensor(netns, tmp_path: Path):
    p = netns.plan
    cfg = small_config(tmp_path, devices=("dev-a",), rounds=1, batch_size=20, max_steps_per_round=2)
    cfg = cfg.model_copy(update={"host": p.host_addr})
    ca = pki.Authority("job-ca")
    leaf = ca.issue_server([NAME])
    for name, data in (("ca.crt", ca.cert_pem), ("tls.crt", leaf.cert_pem), ("tls.key", leaf.key_pem)):
        (tmp_path / name).write_bytes(data)
    (tmp_path / "server.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    (tmp_path / "split").write_text("1")
    secret = token(cfg, "dev-a").encode()
    weights = build_model("vgg5", seed=cfg.training.seed).state_dict()["layers.0.0.weight"].contiguous()
    raw = weights.numpy().tobytes()
    needles = {"token": secret, "token (HPACK Huffman)": huffman(b"Bearer " + secret), "wire magic": b"ARW1",
               "bundle header": b'"dtype"', **{f"weights[{i}:{i + 64}]": raw[i:i + 64] for i in (0, 1024, 2048)}}

    # The control: the same secrets in clear text through the same capture are found.
    port = free_port()
    listener = socket.create_server((p.host_addr, port))
    plain = b"Authorization: Bearer " + secret + huffman(b"Bearer " + secret) + wire.encode({"w": weights})
    (tmp_path / "plain.bin").write_bytes(plain)
    capture = Capture(p.host_if)
    sender = netns.popen([sys.executable, "-c", "import socket,sys; s=socket.create_connection((sys.argv[1], "
                          "int(sys.argv[2]))); s.sendall(open(sys.argv[3],'rb').read()); s.close()",
                          p.host_addr, str(port), str(tmp_path / "plain.bin")])
    conn, _ = listener.accept()
    received = b""
    while chunk := conn.recv(1 << 16):
        received += chunk
    conn.close(), listener.close(), sender.wait(10)
    assert received == plain
    control = b"".join(tcp_streams(capture.stop(), port).values())
    assert secrets_in(control, needles) == list(needles)

    # The real thing: a server over TLS, a device in its namespace, one training round.
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "ares", "server", "--config", str(tmp_path / "server.yaml"),
                               "--tls-cert", str(tmp_path / "tls.crt"), "--tls-key", str(tmp_path / "tls.key")],
                              stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        link = HttpLink(f"https://{p.host_addr}:{cfg.port}", "dev-a", "x",
                        tls=ClientTls(ca_file=str(tmp_path / "ca.crt"), server_name=NAME))
        deadline = time.monotonic() + 90
        while not link.healthy():
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.2)
        link.close()
        capture = Capture(p.host_if)
        device = netns.run([sys.executable, "-m", "ares", "device", "--server", f"https://{p.host_addr}:{cfg.port}",
                            "--ca", str(tmp_path / "ca.crt"), "--tls-server-name", NAME, "--name", "dev-a",
                            "--token-file", str(Path(cfg.tokens_dir) / "dev-a"), "--split-file", str(tmp_path / "split"),
                            "--wait-server", "30"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        frames = capture.stop()
    finally:
        server.terminate()
        server.wait(10)
        log.close()
    assert device.returncode == 0, device.stderr[-3000:]
    assert "round 0 split 1: 2 steps" in device.stderr, device.stderr[-3000:]

    streams = tcp_streams(frames, cfg.port)
    up = b"".join(v for (_, _, _, dport), v in streams.items() if dport == cfg.port)
    down = b"".join(v for (_, sport, _, _), v in streams.items() if sport == cfg.port)
    # two steps of split-1 activations (20 x 32 KiB each) went up, the weights and gradients came down
    assert len(up) > 2 * 20 * 32768 and len(down) > 2 * 20 * 32768
    assert up[:3] == b"\x16\x03\x01" and down[:3] == b"\x16\x03\x03"  # TLS handshake records, first thing
    assert secrets_in(up + down, needles) == []
