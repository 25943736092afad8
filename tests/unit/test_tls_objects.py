"""TLS without a network: the per-job CA and certificates (ares.core.pki), the operator's TLS
Secret and what each pod mounts of it (ares_operator.tls, builders), and a real handshake between
Python's ssl objects in memory (so a name or CA mistake fails here, not in a cluster)."""

from __future__ import annotations

import base64
import datetime
import ssl
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

from ares.core import pki
from ares.runtime.tlsclient import ClientTls, explain, system_trust, transport
from ares_operator import builders, tls
from ares_operator import constants as c
from ares_operator.builders import JobRef
from ares_operator.settings import ImageSettings, OperatorSettings
from ares_operator.spec import parse_spec

JOB = JobRef("demo", "lab", "uid-1")
SETTINGS = OperatorSettings(images=ImageSettings(server="srv:1", device="dev:1", device_jetson="jet:1"))
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)


def spec(**overrides):
    raw = yaml.safe_load((ROOT / "examples" / "job.yaml").read_text())["spec"]
    raw.update(overrides)
    return parse_spec(raw)


def handshake(server: pki.CertKey, client: ClientTls, tmp: Path) -> str:
    """A TLS handshake over in-memory BIOs; returns the negotiated ALPN protocol or raises ssl errors."""
    (tmp / "s.crt").write_bytes(server.cert_pem)
    (tmp / "s.key").write_bytes(server.key_pem)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(tmp / "s.crt", tmp / "s.key")
    sctx.set_alpn_protocols(["h2", "http/1.1"])
    cctx = client.context()
    cctx.set_alpn_protocols(["h2"])
    bios = [ssl.MemoryBIO() for _ in range(4)]
    s = sctx.wrap_bio(bios[0], bios[1], server_side=True)
    cl = cctx.wrap_bio(bios[2], bios[3], server_hostname=client.server_name)
    for _ in range(10):
        for side, out, peer_in in ((cl, bios[3], bios[0]), (s, bios[1], bios[2])):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
            data = out.read()
            if data:
                peer_in.write(data)
        if cl.selected_alpn_protocol() and s.selected_alpn_protocol():
            return cl.selected_alpn_protocol()
    raise AssertionError("handshake did not finish")


def test_server_certificate_names_lifetime_and_usage():
    ca = pki.Authority("ares job lab/demo", pki.lifetime_for(7 * 86400), now=NOW)
    leaf = ca.issue_server(tls.server_names(JOB), ip_addresses=["10.0.0.1"], now=NOW)
    info = pki.inspect(leaf.cert_pem)
    assert info.dns_names == ("demo-server", "demo-server.lab", "demo-server.lab.svc", "demo-server.lab.svc.cluster.local")
    assert info.ip_addresses == ("10.0.0.1",) and not info.is_ca and info.issuer == "ares job lab/demo"
    assert pki.inspect(ca.cert_pem).is_ca
    assert info.not_after - NOW == pki.MIN_LIFETIME  # a short job still gets a year
    assert info.not_before < NOW  # backdated a little for clock skew between nodes
    assert pki.lifetime_for(400 * 86400) == datetime.timedelta(days=800)  # twice a long job
    assert pki.lifetime_for(1e12) == pki.MAX_LIFETIME
    with pytest.raises(ValueError, match="at least one"):
        ca.issue_server([])


def test_handshake_checks_the_ca_and_the_name(tmp_path):
    ca = pki.Authority("job-ca")
    leaf = ca.issue_server(["demo-server.lab.svc"])
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    good = ClientTls(ca_file=str(tmp_path / "ca.crt"), server_name="demo-server.lab.svc")
    assert handshake(leaf, good, tmp_path) == "h2"
    assert handshake(leaf, ClientTls(ca_pem=ca.cert_pem, server_name="demo-server.lab.svc"), tmp_path) == "h2"

    with pytest.raises(ssl.SSLCertVerificationError) as wrong_ca:
        handshake(leaf, ClientTls(ca_pem=pki.Authority("another-ca").cert_pem, server_name="demo-server.lab.svc"),
                  tmp_path)
    assert explain(wrong_ca.value) == "certificate verify failed: unable to get local issuer certificate"
    with pytest.raises(ssl.SSLCertVerificationError) as wrong_name:
        handshake(leaf, ClientTls(ca_pem=ca.cert_pem, server_name="other-server.lab.svc"), tmp_path)
    assert "Hostname mismatch" in explain(wrong_name.value) and "other-server.lab.svc" in explain(wrong_name.value)
    expired = pki.Authority("old-ca", now=NOW - datetime.timedelta(days=800))
    with pytest.raises(ssl.SSLCertVerificationError) as too_old:
        handshake(expired.issue_server(["demo-server.lab.svc"], now=NOW - datetime.timedelta(days=800)),
                  ClientTls(ca_pem=expired.cert_pem, server_name="demo-server.lab.svc"), tmp_path)
    assert "certificate has expired" in explain(too_old.value)


def test_secret_holds_ca_and_server_pair_but_not_the_ca_key():
    secret = tls.secret(JOB, spec(), now=NOW)
    assert secret["metadata"]["name"] == "demo-tls" and secret["type"] == "kubernetes.io/tls"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    assert set(data) == {"ca.crt", "tls.crt", "tls.key"}
    assert tls.ca_pem(secret) == data["ca.crt"]
    assert pki.inspect(data["tls.crt"]).dns_names[2] == JOB.server_host()
    assert b"PRIVATE KEY" in data["tls.key"] and b"PRIVATE KEY" not in data["ca.crt"] + data["tls.crt"]
    # one job's certificate outlives that job's longest possible run (rounds x round deadline)
    long_job = spec(training={"rounds": 1000}, runPolicy={"roundDeadlineSeconds": 86400})
    info = pki.inspect(base64.b64decode(tls.secret(JOB, long_job, now=NOW)["data"]["tls.crt"]))
    assert info.not_after - NOW > datetime.timedelta(seconds=1000 * 86400)
    with pytest.raises(ValueError, match="ca.crt"):
        tls.ca_pem({"metadata": {"name": "demo-tls"}, "data": {}})


def test_server_mounts_its_pair_and_devices_only_the_ca():
    s = spec()
    server = builders.server_pod(JOB, s, SETTINGS)
    container = server["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--tls-cert") + 1] == "/var/run/ares/tls/tls.crt"
    assert args[args.index("--tls-key") + 1] == "/var/run/ares/tls/tls.key"
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    volumes = {v["name"]: v for v in server["spec"]["volumes"]}
    assert volumes["tls"]["secret"] == {"secretName": "demo-tls", "defaultMode": 0o440, "items": [
        {"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}]}
    assert {"name": "tls", "mountPath": c.TLS_DIR, "readOnly": True} in container["volumeMounts"]

    for device in s.devices:
        pod = builders.device_pod(JOB, s, device, SETTINGS, split=2)
        trainer = next(ct for ct in pod["spec"]["containers"] if ct["name"] == c.CONTAINER_DEVICE)
        args = trainer["args"]
        assert args[args.index("--server") + 1] == "https://demo-server.lab.svc:43000"
        assert args[args.index("--ca") + 1] == "/var/run/ares/ca/ca.crt"
        tls_volumes = [v for v in pod["spec"]["volumes"] if (v.get("secret") or {}).get("secretName") == "demo-tls"]
        assert tls_volumes == [{"name": "ca", "secret": {"secretName": "demo-tls", "defaultMode": 0o440,
                                                         "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]
        mounted = [m["name"] for ct in pod["spec"]["containers"] + pod["spec"].get("initContainers", [])
                   for m in ct.get("volumeMounts", []) if m["name"] == "ca"]
        assert mounted == ["ca"]  # the trainer only; the sidecar never sees it


def test_client_context_trusts_only_the_given_ca():
    ca = pki.Authority("job-ca")
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "ca.crt").write_bytes(ca.cert_pem)
        ctx = ClientTls(ca_file=str(Path(d) / "ca.crt")).context()
    assert [x["subject"] for x in ctx.get_ca_certs()] == [((("organizationName", "ARES"),), (("commonName", "job-ca"),))]
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2 and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


def test_plain_transports_load_the_system_store_once_per_process(monkeypatch):
    """httpx loads the system's CA store for every transport made without one (~25 ms of CPU): a
    controller polling the server over plain HTTP paid it at every request."""
    import httpx

    loads = []
    load = ssl.SSLContext.load_verify_locations
    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations",
                        lambda self, *a, **kw: loads.append(a or kw) or load(self, *a, **kw))
    system_trust.cache_clear()
    for _ in range(5):
        with httpx.Client(transport=transport(None)):
            pass
    assert len(loads) == 1
    with httpx.Client(transport=transport(ClientTls(ca_pem=pki.Authority("job").cert_pem))):
        pass  # a job's CA is its own context, never the shared one
    assert len(loads) == 2 and system_trust().verify_mode == ssl.CERT_REQUIRED


def test_ares_run_tls_makes_a_throwaway_ca_and_points_everyone_at_it(tmp_path):
    from ares.roles.runconfig import RunConfig
    from ares.roles.runner import Cluster

    cluster = Cluster(RunConfig(tls=True, devices=1), tmp_path, 43999, server_host={"device-0": "10.231.3.1"})
    assert cluster.url == "https://127.0.0.1:43999"
    args = cluster.server_tls_args()
    assert args == ["--tls-cert", str(tmp_path / "tls" / "tls.crt"), "--tls-key", str(tmp_path / "tls" / "tls.key")]
    info = pki.inspect((tmp_path / "tls" / "tls.crt").read_bytes())
    assert info.ip_addresses == ("10.231.3.1", "127.0.0.1") and info.issuer == "ares run"
    assert (tmp_path / "tls" / "tls.key").stat().st_mode & 0o077 == 0
    assert b"PRIVATE" not in (tmp_path / "tls" / "ca.crt").read_bytes()
    assert cluster.client_tls == ClientTls(ca_file=str(tmp_path / "tls" / "ca.crt"))
    assert Cluster(RunConfig(devices=1), tmp_path / "plain", 43998).server_tls_args() == []


def test_a_device_refusing_the_server_is_reported_on_the_job():
    """The trainer's termination message (what `ares device` writes to /dev/termination-log on a
    TLS refusal) reaches the operator's note for the replacement, which it posts as an event."""
    from ares_operator import reconcile

    message = ("TLS: refusing the server at https://demo-server.lab.svc:43000: certificate verify failed: "
               "unable to get local issuer certificate")
    failed = reconcile.PodView.of({
        "metadata": {"name": "demo-pi", "labels": {c.LABEL_ROLE: "device", c.LABEL_DEVICE: "pi"}},
        "status": {"phase": "Failed", "containerStatuses": [
            {"name": c.CONTAINER_SIDECAR, "state": {"terminated": {"exitCode": 0, "message": "not this one"}}},
            {"name": c.CONTAINER_DEVICE, "state": {"terminated": {"exitCode": 4, "message": message + "\n"}}}]}})
    assert failed.exit_code == 4 and failed.exit_message == message
    healthy = [reconcile.PodView.of({"metadata": {"name": n, "labels": {c.LABEL_ROLE: r, c.LABEL_DEVICE: d}},
                                     "status": {"phase": "Running"}})
               for n, r, d in (("demo-server", "server", ""), ("demo-nano-maxn", "device", "nano-maxn"),
                               ("demo-nano-5w", "device", "nano-5w"))]
    actions = reconcile.plan_pods(JOB, spec(), SETTINGS, healthy + [failed], {}, 0, {})
    assert actions.notes == (f"device pi: trainer exited with code 4 ({message}); replaced (restart 1 of 3)",)
