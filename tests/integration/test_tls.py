"""TLS between devices and a real `ares server` process (granian, HTTPS with ALPN h2).

One server for the module, with a certificate from a job CA for `ares-server.lab.svc` only; the
clients dial 127.0.0.1 and check that name (`--tls-server-name`), as a pod dials its Service.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from ares.core import pki
from ares.core.models import build_model
from ares.runtime.controller import fetch_status
from ares.runtime.link import HttpLink
from ares.runtime.tlsclient import ClientTls, TlsError
from tests.support import ROOT, ServerProcess, small_config, token

NAME = "ares-server.lab.svc"


class TlsServer(ServerProcess):
    """`ares server --tls-cert/--tls-key` with a CA of its own (and a second CA of the same name)."""

    def __init__(self, tmp: Path):
        cfg = small_config(tmp, devices=("dev-a", "dev-b"), rounds=2)
        ca = pki.Authority("job-ca")
        leaf = ca.issue_server([NAME])
        for name, data in (("ca.crt", ca.cert_pem), ("tls.crt", leaf.cert_pem), ("tls.key", leaf.key_pem),
                           ("other-ca.crt", pki.Authority("job-ca").cert_pem)):  # same name, another key
            (tmp / name).write_bytes(data)
        self.url = f"https://127.0.0.1:{cfg.port}"
        self.plain_url = f"http://127.0.0.1:{cfg.port}"
        self.tls = ClientTls(ca_file=str(tmp / "ca.crt"), server_name=NAME)
        link = HttpLink(self.url, "dev-a", "x", tls=self.tls)
        try:
            super().__init__(cfg, tmp, ("--tls-cert", str(tmp / "tls.crt"), "--tls-key", str(tmp / "tls.key")),
                             healthy=link.healthy)
        finally:
            link.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = TlsServer(tmp_path_factory.mktemp("tls"))
    yield s
    s.stop()


def test_device_trains_over_https_with_alpn_h2(server):
    link = HttpLink(server.url, "dev-a", token(server.cfg, "dev-a"), tls=server.tls)
    reply, weights, _ = link.join(0, 1)
    model = build_model("vgg5", seed=server.cfg.training.seed)
    assert torch.equal(weights["layers.0.0.weight"], model.state_dict()["layers.0.0.weight"])  # the real weights, intact
    x = torch.randn(4, 32, 16, 16)
    result = link.step(0, 1, x, torch.randint(0, 10, (4,)))
    assert result.grad.shape == x.shape and result.up_bytes > x.numel() * 4
    assert link.client.get("/healthz").http_version == "HTTP/2"  # negotiated by ALPN, not prior knowledge
    link.close()
    # the controller's view, over the same TLS
    assert fetch_status(server.url, token(server.cfg, "controller.token"), 5, tls=server.tls).devices["dev-a"].split == 1


def test_plain_h2c_and_http1_are_refused(server):
    for http2 in (True, False):
        with httpx.Client(http1=not http2, http2=http2, timeout=5) as plain:
            with pytest.raises(httpx.HTTPError):  # the TLS listener never answers cleartext HTTP
                plain.get(f"{server.plain_url}/healthz")
    # and the refusal says what happened, not "server down"
    link = HttpLink(server.url.replace("https", "http"), "dev-a", "x", http2=True)
    assert link.healthy() is False
    link.close()


REFUSALS = {
    "wrong CA": (["--ca", "other-ca.crt", "--tls-server-name", NAME],
                 "certificate verify failed: unable to get local issuer certificate"),
    "certificate for another name": (["--ca", "ca.crt", "--tls-server-name", "other-server.lab.svc"],
                                     "certificate verify failed: Hostname mismatch, certificate is not valid for "
                                     "'other-server.lab.svc'"),
}


@pytest.mark.slow
def test_device_refuses_an_unauthenticated_server_at_once(server):
    """Real `ares device` processes (started together): exit code 4 and one clear line, at once,
    instead of waiting --wait-server seconds for a server that is "not up yet"."""
    tmp = server.tmp
    (tmp / "split").write_text("1")
    procs = {}
    for problem, (flags, _) in REFUSALS.items():
        args = [a if not a.endswith(".crt") else str(tmp / a) for a in flags]
        procs[problem] = subprocess.Popen(
            [sys.executable, "-m", "ares", "device", "--server", server.url, *args, "--name", "dev-b",
             "--token-file", str(Path(server.cfg.tokens_dir) / "dev-b"), "--split-file", str(tmp / "split"),
             "--wait-server", "120"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
    for problem, proc in procs.items():
        _, err = proc.communicate(timeout=90)
        assert proc.returncode == 4, (problem, err)
        assert f"TLS: refusing the server at {server.url}: {REFUSALS[problem][1]}" in err, (problem, err)
        assert token(server.cfg, "dev-b") not in err


def test_link_raises_a_tls_error_not_a_retry(server, tmp_path):
    link = HttpLink(server.url, "dev-a", "x", tls=ClientTls(ca_file=str(server.tmp / "other-ca.crt"), server_name=NAME))
    with pytest.raises(TlsError, match="unable to get local issuer certificate"):
        link.healthy()
    link.close()
