"""What HTTP/2 costs: measured side by side in one run, printed as ratios.

(a) one VGG5 training step at split 1, batch 100: over HTTP/2 on loopback (a real `ares server`
    process, the real httpx client) vs the same step in-process (`InProcessLink`). Goal <= 1.3x.
(b) an 8 MiB round trip (8 MiB up, 8 MiB back) over HTTP/2 (granian, our window settings) vs a
    raw TCP socket.

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

from ares.core.models import build_model, split_model  # noqa: E402
from ares.runtime.link import HttpLink, InProcessLink  # noqa: E402
from ares.runtime.training import TrainingServer, read_tokens  # noqa: E402
from tests.conftest import ServerProcess, small_config, token  # noqa: E402

MIB8 = 8 << 20


class Stepper:
    """A device doing VGG5 steps at one split over one link (joined once, round 0)."""

    def __init__(self, link, split: int, batch: int):
        self.link, self.split = link, split
        model = build_model("vgg5", seed=None)
        _, weights = link.join(0, split)
        model.load_state_dict({**model.state_dict(), **weights})
        self.part, _ = split_model(model, split)
        self.opt = torch.optim.SGD(self.part.parameters(), lr=0.01, momentum=0.9)
        self.x, self.y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def step(self) -> float:
        t0 = time.perf_counter()
        self.opt.zero_grad()
        out = self.part(self.x)
        result = self.link.step(0, self.split, out.detach(), self.y)
        out.backward(result.grad)
        self.opt.step()
        return time.perf_counter() - t0


def bench_step(steps: int) -> tuple[float, float]:
    """Steps alternate between the two links, so drifting machine load hits both alike."""
    tmp = Path(tempfile.mkdtemp())
    cfg = small_config(tmp, rounds=2, batch_size=100)
    inproc = TrainingServer(cfg, *read_tokens(cfg), profile=False)
    server = ServerProcess(cfg.model_copy(update={"checkpoint_dir": str(tmp / "ck2")}), tmp)
    try:
        link = HttpLink(server.url, "dev-a", token(cfg, "dev-a"))
        local, remote = Stepper(InProcessLink(inproc, "dev-a"), 1, 100), Stepper(link, 1, 100)
        for _ in range(3):  # warm-up
            local.step(), remote.step()
        pairs = [(local.step(), remote.step()) for _ in range(steps)]
        link.close()
    finally:
        server.stop()
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


ECHO_APP = '''
from fastapi import FastAPI, Request
from fastapi.responses import Response
app = FastAPI()
@app.post("/echo")
async def echo(request: Request):
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
    return Response(bytes(body), media_type="application/octet-stream")
'''


def bench_transfer(repeats: int) -> tuple[float, float]:
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
    # HTTP/2 echo through granian with the server's settings
    tmp = Path(tempfile.mkdtemp())
    (tmp / "echo_app.py").write_text(ECHO_APP)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        hport = s.getsockname()[1]
    script = ("from granian import Granian\nfrom granian.http import HTTP2Settings\n"
              f"Granian('echo_app:app', address='127.0.0.1', port={hport}, interface='asgi', http='auto',"
              "http2_settings=HTTP2Settings(initial_stream_window_size=16<<20, initial_connection_window_size=16<<20,"
              " max_frame_size=1<<20)).serve()\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = httpx.Client(http1=False, http2=True, timeout=60)
        url = f"http://127.0.0.1:{hport}/echo"
        for _ in range(100):
            try:
                client.get(url)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        chunks = lambda: (payload[i:i + (256 << 10)] for i in range(0, MIB8, 256 << 10))  # noqa: E731
        h2_times = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            r = client.post(url, content=chunks(), headers={"Content-Length": str(MIB8)})
            assert len(r.content) == MIB8 and r.http_version == "HTTP/2"
            if i:
                h2_times.append(time.perf_counter() - t0)
        client.close()
    finally:
        proc.terminate()
        proc.wait()
    return statistics.median(tcp_times), statistics.median(h2_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    local, remote = bench_step(args.steps)
    print(f"(a) VGG5 step, split 1, batch 100:  in-process {local * 1000:7.1f} ms   HTTP/2 loopback "
          f"{remote * 1000:7.1f} ms   ratio {remote / local:.2f}x  (goal <= 1.30x)")
    tcp, h2 = bench_transfer(args.repeats)
    print(f"(b) 8 MiB round trip:               raw TCP    {tcp * 1000:7.1f} ms   HTTP/2          "
          f"{h2 * 1000:7.1f} ms   ratio {h2 / tcp:.2f}x")


if __name__ == "__main__":
    main()
