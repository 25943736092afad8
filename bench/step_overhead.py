"""What HTTP/2 costs: measured side by side in one run, printed as ratios.

(a) one VGG5 training step at split 1, batch 100: over HTTP/2 on loopback (a real `ares server`
    process, the devices' real client: httpx over our large-frame transport, h2client.py) vs the
    same step in-process (`InProcessLink`). Goal <= 1.15x.
(b) an 8 MiB round trip (8 MiB up, 8 MiB back) over HTTP/2 (granian with the server's settings,
    the devices' transport) vs a raw TCP socket. Goal <= 3x.
(c) what TLS costs: (a) and (b) again over HTTPS (ALPN h2, a job CA's EC P-256 certificate,
    the client verifying it) against plain h2c, interleaved in the same run.

    python bench/step_overhead.py [--steps 30]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ares.core import pki  # noqa: E402
from ares.core.models import build_model, split_model  # noqa: E402
from ares.core.sgd import MomentumSGD  # noqa: E402
from ares.runtime.allocator import keep_freed_memory  # noqa: E402
from ares.runtime.inprocess import InProcessLink  # noqa: E402
from ares.runtime.link import UNPACED_CHUNK, HttpLink  # noqa: E402
from ares.runtime.tlsclient import ClientTls  # noqa: E402
from ares.runtime.training import TrainingServer, read_tokens  # noqa: E402
from ares.runtime.tlsclient import transport  # noqa: E402
from tests.conftest import ServerProcess, free_port, small_config, token  # noqa: E402

MIB8 = 8 << 20


class Stepper:
    """A device doing VGG5 steps at one split over one link (joined once, round 0)."""

    def __init__(self, link, split: int, batch: int):
        self.link, self.split = link, split
        model = build_model("vgg5", seed=None)
        _, weights, _ = link.join(0, split)
        model.load_state_dict({**model.state_dict(), **weights})
        self.part, _ = split_model(model, split)
        self.opt = MomentumSGD(self.part.parameters(), lr=0.01, momentum=0.9)  # the device's optimiser
        self.x, self.y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def step(self) -> float:
        t0 = time.perf_counter()
        self.opt.zero_grad()
        out = self.part(self.x)
        result = self.link.step(0, self.split, out.detach(), self.y)
        out.backward(result.grad)
        self.opt.step()
        return time.perf_counter() - t0


def make_tls(tmp: Path) -> ClientTls:
    """A job CA and a server certificate for 127.0.0.1, as files; the client's view of them."""
    ca = pki.Authority("bench-ca")
    leaf = ca.issue_server(["localhost"], ["127.0.0.1"])
    for name, data in (("ca.crt", ca.cert_pem), ("tls.crt", leaf.cert_pem), ("tls.key", leaf.key_pem)):
        (tmp / name).write_bytes(data)
    return ClientTls(ca_file=str(tmp / "ca.crt"))


def start_tls_server(cfg, tmp: Path) -> tuple[subprocess.Popen, str]:
    """`ares server --tls-cert/--tls-key` on loopback; returns (process, https URL) once healthy."""
    import yaml

    (tmp / "tls-server.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    proc = subprocess.Popen([sys.executable, "-m", "ares", "server", "--config", str(tmp / "tls-server.yaml"),
                             "--tls-cert", str(tmp / "tls.crt"), "--tls-key", str(tmp / "tls.key")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"https://127.0.0.1:{cfg.port}"
    probe = HttpLink(url, "dev-a", "x", tls=ClientTls(ca_file=str(tmp / "ca.crt")))
    for _ in range(600):
        if probe.healthy():
            break
        time.sleep(0.2)
    probe.close()
    return proc, url


def bench_step(steps: int) -> tuple[float, float, float]:
    """Steps rotate between the three links, so drifting machine load hits all alike.
    Returns medians: in-process, HTTP/2 h2c, HTTPS (h2 over TLS)."""
    tmp = Path(tempfile.mkdtemp())
    cfg = small_config(tmp, rounds=2, batch_size=100).model_copy(update={"round_deadline_s": 86400})
    inproc = TrainingServer(cfg, *read_tokens(cfg), profile=False)
    server = ServerProcess(cfg.model_copy(update={"checkpoint_dir": str(tmp / "ck2")}), tmp)
    tls = make_tls(tmp)
    tls_proc, tls_url = start_tls_server(cfg.model_copy(update={"checkpoint_dir": str(tmp / "ck3"),
                                                                "port": free_port()}), tmp)
    try:
        link = HttpLink(server.url, "dev-a", token(cfg, "dev-a"))
        secure = HttpLink(tls_url, "dev-a", token(cfg, "dev-a"), tls=tls)
        local, remote, https = (Stepper(InProcessLink(inproc, "dev-a"), 1, 100), Stepper(link, 1, 100),
                                Stepper(secure, 1, 100))
        for _ in range(3):  # warm-up
            local.step(), remote.step(), https.step()
        triples = [(local.step(), remote.step(), https.step()) for _ in range(steps)]
        link.close(), secure.close()
    finally:
        server.stop()
        tls_proc.terminate()
        try:
            tls_proc.wait(10)
        except subprocess.TimeoutExpired:
            tls_proc.kill()
    return tuple(statistics.median(t[i] for t in triples) for i in range(3))


ECHO_APP = '''
from fastapi import FastAPI, Request
from fastapi.responses import Response
app = FastAPI()
@app.post("/echo")
async def echo(request: Request):  # one copy of the body, as the raw TCP echo makes
    chunks = [chunk async for chunk in request.stream()]
    return Response(b"".join(chunks), media_type="application/octet-stream")
'''


def bench_transfer(repeats: int) -> tuple[float, float, float]:
    payload = os.urandom(MIB8)
    # raw TCP echo
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def echo_server():
        conn, _ = srv.accept()
        with conn:
            for _ in range(repeats + 1):
                got = bytearray()
                while len(got) < MIB8:
                    got += conn.recv(1 << 20)
                conn.sendall(got)

    threading.Thread(target=echo_server, daemon=True).start()
    tcp_times = []
    with socket.create_connection(("127.0.0.1", port)) as c:
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            c.sendall(payload)
            got = bytearray()
            while len(got) < MIB8:
                got += c.recv(1 << 20)
            if i:
                tcp_times.append(time.perf_counter() - t0)
    srv.close()
    # HTTP/2 echo through granian with the server's settings: h2c and TLS, alternating
    tmp = Path(tempfile.mkdtemp())
    (tmp / "echo_app.py").write_text(ECHO_APP)
    tls = make_tls(tmp)
    procs, clients, urls = [], [], []
    for secure in (False, True):
        hport = free_port()
        ssl_args = f", ssl_cert=Path('{tmp / 'tls.crt'}'), ssl_key=Path('{tmp / 'tls.key'}')" if secure else ""
        script = ("from pathlib import Path\nfrom granian import Granian\nfrom granian.http import HTTP2Settings\n"
                  f"Granian('echo_app:app', address='127.0.0.1', port={hport}, interface='asgi', http='auto'{ssl_args},"
                  "http2_settings=HTTP2Settings(initial_stream_window_size=16<<20, initial_connection_window_size=16<<20,"
                  " max_frame_size=1<<20)).serve()\n")
        procs.append(subprocess.Popen([sys.executable, "-c", script], cwd=tmp, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        clients.append(httpx.Client(transport=transport(tls if secure else None, http1=False, http2=True), timeout=60))
        urls.append(f"{'https' if secure else 'http'}://127.0.0.1:{hport}/echo")
    try:
        for client, url in zip(clients, urls):
            for _ in range(100):
                try:
                    client.get(url)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
        # as a device sends on an uncapped link: 1 MiB chunks, one DATA frame each
        chunks = lambda: (payload[i:i + UNPACED_CHUNK] for i in range(0, MIB8, UNPACED_CHUNK))  # noqa: E731
        times: list[list[float]] = [[], []]
        for i in range(repeats + 1):
            for k, (client, url) in enumerate(zip(clients, urls)):
                t0 = time.perf_counter()
                r = client.post(url, content=chunks(), headers={"Content-Length": str(MIB8)})
                assert len(r.content) == MIB8 and r.http_version == "HTTP/2"
                if i:
                    times[k].append(time.perf_counter() - t0)
        for client in clients:
            client.close()
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
    return statistics.median(tcp_times), statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()  # as `ares device` does at start (the in-process baseline gets it too)
    local, remote, https = bench_step(args.steps)
    print(f"(a) VGG5 step, split 1, batch 100:  in-process {local * 1000:7.1f} ms   HTTP/2 loopback "
          f"{remote * 1000:7.1f} ms   ratio {remote / local:.2f}x  (goal <= 1.15x)")
    tcp, h2, h2_tls = bench_transfer(args.repeats)
    print(f"(b) 8 MiB round trip:               raw TCP    {tcp * 1000:7.1f} ms   HTTP/2          "
          f"{h2 * 1000:7.1f} ms   ratio {h2 / tcp:.2f}x  (goal <= 3x)")
    print(f"(c) TLS vs h2c, VGG5 step:          h2c        {remote * 1000:7.1f} ms   HTTPS (h2)      "
          f"{https * 1000:7.1f} ms   ratio {https / remote:.2f}x")
    print(f"    TLS vs h2c, 8 MiB round trip:   h2c        {h2 * 1000:7.1f} ms   HTTPS (h2)      "
          f"{h2_tls * 1000:7.1f} ms   ratio {h2_tls / h2:.2f}x")


if __name__ == "__main__":
    main()
