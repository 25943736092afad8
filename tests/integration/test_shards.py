"""Server shards, with real processes over HTTP/2: a job run by a root and k = 1, 2, 4 shards
trains the same global model as one server on the same data (devices train on their own data
with seeded shuffles, and each device's replica steps on its own, so one server's result does
not depend on the order devices come in; the merge is a float64 sum, equal to rounding in any
order); a shard killed mid-run costs its own devices at most one round while the job goes on,
and its restart takes the root's round. What the root takes from a shard is checked
in-process (ASGI): token, index, round, devices, weights, tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from safetensors.torch import load_file  # the root's own checkpoint: safetensors holds no code

from ares.core import wire
from ares.core.config import DataConfig
from ares.core.fedavg import RunningMean
from ares.core.config import CONTROLLER_TOKEN_NAME
from ares.core.messages import DeviceReport, TelemetryColumns
from ares.core.sharding import assign
from ares.runtime.controller import fetch_columns, fetch_telemetry
from ares.runtime.shardproto import DeviceOutcome, PartialMeta, ShardBeat, ShardRecords, pack_partial
from tests.support import (DeviceThreads, ServerProcess, ShardProcess, history, small_config, start_together, status,
                           token, wait_for, write_shard_token)

DEVICES = ("dev-a", "dev-b", "dev-c", "dev-d")
ROUNDS = 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Device compute on one thread, as the server processes' (OMP_NUM_THREADS=1): every run here
    then adds up the same floats in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def job(tmp: Path, shards: int, rounds: int = ROUNDS, deadline_s: float = 600, **update):
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = small_config(tmp, devices=DEVICES, rounds=rounds, batch_size=20, max_steps_per_round=2)
    pins = {d: i for i, d in enumerate(DEVICES)} if shards == 4 else {}
    cfg = cfg.model_copy(update={"shards": shards, "shard_pins": pins, "round_deadline_s": deadline_s,
                                 "round_gap_s": 0.1, "shard_wait_s": 2.0,
                                 "data": DataConfig(name="synthetic", synthetic_train=40 * len(DEVICES),
                                                    synthetic_test=100, seed=1), **update})
    cfg = type(cfg).model_validate(cfg.model_dump())  # the validators see the sharded config
    if shards > 1:
        write_shard_token(cfg)
    return cfg


class Running:
    """A root and its shards (or one server), stopped at the end."""

    def __init__(self, cfg, tmp: Path):
        self.cfg, self.tmp = cfg, tmp
        self.home = {d: i for i, devices in enumerate(assign(cfg.devices, cfg.shards, cfg.shard_pins)) for d in devices}
        if cfg.shards == 1:
            self.root = ServerProcess(cfg, tmp)
            self.shards = []
        else:
            root_url = f"http://127.0.0.1:{cfg.port}"
            (tmp / "root").mkdir()
            started = start_together(lambda **kw: ServerProcess(cfg, tmp / "root", **kw),
                                     *[lambda i=i, **kw: ShardProcess(cfg, tmp, i, root_url, **kw)
                                       for i in range(cfg.shards)])
            self.root, self.shards = started[0], started[1:]

    def url_of(self, device: str) -> str:
        return self.shards[self.home[device]].url if self.shards else self.root.url

    def stop(self) -> None:
        for s in (*self.shards, self.root):
            s.proc.terminate()  # all at once; each then waited for
        for s in (*self.shards, self.root):
            s.stop()


@pytest.fixture
def running():
    made = []

    def start(cfg, tmp: Path) -> Running:
        made.append(Running(cfg, tmp))
        return made[-1]

    yield start
    for r in made:
        r.stop()


@pytest.fixture
def device_threads():
    made = []

    def make(tmp: Path, cfg) -> DeviceThreads:
        made.append(DeviceThreads(tmp, cfg))
        return made[-1]

    yield make
    for d in made:
        d.stop()


@pytest.fixture(scope="module")
def one_server(tmp_path_factory):
    """The reference: one TrainingServer, devices calling it in-process (no HTTP, no shards)."""
    import threading

    from ares.core.config import DeviceSettings
    from ares.runtime.device import DeviceTrainer
    from ares.runtime.inprocess import InProcessLink
    from ares.runtime.training import TrainingServer, read_tokens

    tmp = tmp_path_factory.mktemp("one-server")
    cfg = job(tmp, shards=1)
    server = TrainingServer(cfg, *read_tokens(cfg), profile=False)
    threads = []
    for name in DEVICES:
        (tmp / f"{name}.split").write_text("3")
        trainer = DeviceTrainer(DeviceSettings(name=name, server_url="in-process", token_file="-",
                                               split_file=str(tmp / f"{name}.split")), InProcessLink(server, name))
        threads.append(threading.Thread(target=trainer.run, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert server.phase == "finished" and len(server.history) == ROUNDS
    return server.global_state(), server.history


def assert_same_model(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rel: float = 1e-5) -> None:
    """Each float tensor within `rel` of its L2 norm; a tensor that training leaves at rounding
    noise (a convolution's bias before BatchNorm has no gradient: ~1e-10) within 1e-3 x `rel`."""
    assert got.keys() == want.keys()
    for k, w in want.items():
        g = got[k]
        if w.is_floating_point():
            diff, norm = float((g.double() - w.double()).norm()), float(w.double().norm())
            assert diff <= rel * max(norm, 1e-3), f"{k}: differs by {diff:.3g} (its norm: {norm:.3g})"
        else:
            assert torch.equal(g, w), k


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_k_shards_train_the_model_one_server_trains(tmp_path, running, device_threads, one_server, shards):
    cfg = job(tmp_path, shards)
    job_ = running(cfg, tmp_path)
    fleet = device_threads(tmp_path, cfg)
    for name in DEVICES:
        fleet.start(name, job_.url_of(name))
    fleet.wait(300)
    assert not fleet.errors, fleet.errors
    wait_for(lambda: status(job_.root.url, cfg).get("phase") == "finished", 30, "the root's last round")
    want, want_history = one_server
    got = load_file(str(Path(cfg.checkpoint_dir) / "global.safetensors"))
    assert_same_model(got, want)
    rounds = history(cfg)
    assert [r["round"] for r in rounds] == list(range(ROUNDS))
    for r, ref in zip(rounds, want_history):
        assert r["closed_by"] == "all devices done" and r["missed"] == []
        assert {n: d["samples"] for n, d in r["devices"].items()} == {n: d.samples for n, d in ref.devices.items()}
        assert all(d["joined_s"] is not None and d["uploaded_s"] >= d["joined_s"] for d in r["devices"].values())
    st = status(job_.root.url, cfg)
    assert set(st["devices"]) == set(DEVICES) and all(d["last_round"] == ROUNDS - 1 for d in st["devices"].values())
    # the controller's telemetry as columns holds what the per-device form does, device for device
    rows = fetch_telemetry(job_.root.url, token(cfg, CONTROLLER_TOKEN_NAME))
    columns = fetch_columns(job_.root.url, token(cfg, CONTROLLER_TOKEN_NAME))
    assert sorted(columns.name) == sorted(DEVICES) and all(columns.fwd) and len(columns.sessions.device) >= len(DEVICES)
    assert columns.rows() == rows and TelemetryColumns.of(rows) == columns
    if shards > 1:
        import httpx

        # a device at another device's shard, or at the root, is an unknown device there
        other = next(s for s in job_.shards if s.index != job_.home["dev-a"])
        for url in (other.url, job_.root.url):
            r = httpx.post(f"{url}/v1/devices/dev-a/join", json={"round": 0, "split": 3},
                           headers={"Authorization": f"Bearer {token(cfg, 'dev-a')}"})
            assert r.status_code == 404 and r.json()["error"].startswith("unknown device 'dev-a'"), r.text


@pytest.mark.slow
def test_a_killed_shard_costs_its_devices_one_round(tmp_path, running, device_threads):
    # The deadline closes the round shard 1 died in, without its devices; restarted (a replaced
    # pod), shard 1 takes the root's round and its devices train again from then on.
    cfg = job(tmp_path, shards=2, rounds=5, deadline_s=25, shard_pins={"dev-a": 0, "dev-b": 0, "dev-c": 1, "dev-d": 1})
    job_ = running(cfg, tmp_path)
    victims = {d for d in DEVICES if job_.home[d] == 1}
    fleet = device_threads(tmp_path, cfg)
    for name in DEVICES:  # shard 1's devices as slow as a Raspberry Pi (~0.6 s a step): a round to kill it in
        fleet.start(name, job_.url_of(name), profile="raspberry-pi" if name in victims else None)
    s = wait_for(lambda: (st := status(job_.root.url, cfg)) and st["round"] >= 1 and st["phase"] == "training"
                 and any(st["devices"][v]["phase"] == "training" for v in victims) and st, 120,
                 "shard 1's devices training in round >= 1")
    shard = job_.shards[1]
    shard.kill()
    # its part of this round died with it (or, had it just been sent, the next round goes without it)
    hit = wait_for(lambda: next((h for h in history(cfg) if victims & set(h["missed"])), None), 90,
                   "a round closed without shard 1's devices")
    assert hit["round"] in (s["round"], s["round"] + 1), (s["round"], hit)
    assert hit["closed_by"] == "deadline" and set(hit["missed"]) == victims
    assert set(hit["devices"]) == set(DEVICES) - victims
    job_.shards[1] = shard.restart(tmp_path)
    wait_for(lambda: status(job_.root.url, cfg).get("phase") == "finished", 240, "the job finishes after the restart",
             interval=0.5)
    fleet.wait(60)
    assert not fleet.errors, fleet.errors
    rounds = history(cfg)
    assert [r["round"] for r in rounds] == list(range(cfg.training.rounds))
    # shard 0's devices never missed a round; shard 1's missed that one only, and trained to the end
    assert [r["round"] for r in rounds if r["missed"]] == [hit["round"]], rounds
    assert all(set(r["devices"]) == set(DEVICES) for r in rounds[hit["round"] + 1:]), rounds


TLS_NAME = "ares-root.lab.svc"


def test_a_shard_reaches_its_root_over_tls_trusting_only_the_jobs_ca(tmp_path):
    """Root over HTTPS (ALPN h2) with a certificate for its Service name only; shard 0 trusts the
    job's CA and checks that name (`--ca`, `--tls-server-name`, as a device does) and follows the
    root; shard 1, given another CA of the same name, never does and says why."""
    from ares.core import pki
    from ares.runtime.link import HttpLink
    from ares.runtime.tlsclient import ClientTls

    cfg = job(tmp_path, shards=2, shard_pins={"dev-a": 0, "dev-b": 1, "dev-c": 1, "dev-d": 1})
    ca = pki.Authority("job-ca")
    leaf = ca.issue_server([TLS_NAME])
    for name, data in (("ca.crt", ca.cert_pem), ("tls.crt", leaf.cert_pem), ("tls.key", leaf.key_pem),
                       ("other-ca.crt", pki.Authority("job-ca").cert_pem)):
        (tmp_path / name).write_bytes(data)
    root_url = f"https://127.0.0.1:{cfg.port}"
    probe = HttpLink(root_url, "dev-a", "x", tls=ClientTls(ca_file=str(tmp_path / "ca.crt"), server_name=TLS_NAME))
    (tmp_path / "root").mkdir()

    def trusting(ca_file: str):
        return ("--ca", str(tmp_path / ca_file), "--tls-server-name", TLS_NAME)

    try:
        root = ServerProcess(cfg, tmp_path / "root", ("--tls-cert", str(tmp_path / "tls.crt"),
                                                      "--tls-key", str(tmp_path / "tls.key")), healthy=probe.healthy)
    finally:
        probe.close()
    try:
        good, bad = start_together(
            lambda **kw: ShardProcess(cfg, tmp_path, 0, root_url, extra=trusting("ca.crt"), **kw),
            lambda **kw: ShardProcess(cfg, tmp_path, 1, root_url, extra=trusting("other-ca.crt"), **kw))
    except BaseException:
        root.stop()
        raise
    try:
        wait_for(lambda: good.round_state("dev-a").get("accepting"), 60, "shard 0 in the root's round 0")
        log = tmp_path / "shard-1-0" / "server.log"
        wait_for(lambda: "certificate verify failed" in log.read_text(), 60, "shard 1 refusing the root's certificate")
        assert bad.round_state("dev-b") == {"round": 0, "rounds": ROUNDS, "phase": "waiting", "accepting": False}
    finally:
        for s in (good, bad, root):
            s.stop()


@pytest.mark.parametrize("args,message", [
    (["--shard", "0"], "--shard and --root go together"),
    (["--root", "http://127.0.0.1:1"], "--shard and --root go together"),
    (["--shard", "2", "--root", "http://127.0.0.1:1"], "this job's shards are 0..1"),
    (["--shard", "0", "--root", "127.0.0.1:1"], "--root must be an http:// or https:// URL"),
    (["--shard", "0", "--root", "http://127.0.0.1:1", "--ca", "ca.crt"], "need an https:// root URL"),
    (["--ca", "ca.crt"], "say how a shard trusts its --root"),
], ids=["shard-alone", "root-alone", "index", "url", "ca-for-h2c", "ca-for-root"])
def test_the_shard_flags_are_checked(tmp_path, capsys, args, message):
    from ares.roles.cli import main

    cfg = job(tmp_path, shards=2)
    path = tmp_path / "server.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["server", "--config", str(path), *args]) == 2
    assert message in capsys.readouterr().err


def test_a_sharded_job_needs_its_shard_token_and_one_server_takes_no_shard_flags(tmp_path, capsys):
    from ares.roles.cli import main

    cfg = job(tmp_path, shards=2)
    (Path(cfg.tokens_dir) / "shard.token").unlink()
    path = tmp_path / "server.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["server", "--config", str(path)]) == 2
    assert "needs the shards' token" in capsys.readouterr().err
    path.write_text(yaml.safe_dump(cfg.model_copy(update={"shards": 1, "shard_pins": {}}).model_dump(mode="json")))
    assert main(["server", "--config", str(path), "--shard", "0", "--root", "http://127.0.0.1:1"]) == 2
    assert "--shard needs a config with shards > 1" in capsys.readouterr().err


# ----- what the root takes from a shard (in-process) ----------------------------------------------

@pytest.fixture
def root(tmp_path):
    from ares.runtime.root import RootServer
    from ares.runtime.server import create_app
    from ares.runtime.shardproto import read_shard_token
    from ares.runtime.training import read_tokens

    cfg = job(tmp_path, shards=2, shard_pins={"dev-a": 0, "dev-b": 0, "dev-c": 1, "dev-d": 1})
    server = RootServer(cfg, *read_tokens(cfg), read_shard_token(cfg), profile=False)
    client = TestClient(create_app(cfg, trainer=server))
    return server, client, {"Authorization": f"Bearer {read_shard_token(cfg)}"}


def beat(client, auth, index: int, **fields):
    body = ShardBeat(**{"round": 0, "synced": True, "joined": True, **fields}).model_dump_json()
    return client.post(f"/v1/shards/{index}/beat", content=body, headers=auth)


def part(server, names: list[str], seed: int, round_index: int = 0):
    """A shard's part of a round: uploads near the global model folded into a running mean."""
    reference = server.global_state()
    mean = RunningMean(reference)
    gen = torch.Generator().manual_seed(seed)
    devices = {}
    for name in names:
        state = {k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v + 1
                 for k, v in reference.items()}
        mean.add(state, 30)
        devices[name] = DeviceOutcome(split=6, weight=30, joined_s=0.5, uploaded_s=2.0,
                                      report=DeviceReport(round=round_index, split=6, samples=30))
    records = ShardRecords(round=round_index, devices=devices, joined=names, started_ago_s=1.0)
    return records, mean


def send(client, auth, index: int, records: ShardRecords, mean: RunningMean, tensors=None, meta=None):
    r = client.put(f"/v1/shards/{index}/rounds/{records.round}/records", content=records.model_dump_json(),
                   headers=auth)
    assert r.status_code == 200, r.text
    meta = meta or PartialMeta(round=records.round, weight=mean.weight, count=mean.count).model_dump()
    body = wire.encode(pack_partial(mean) if tensors is None else tensors, meta)
    return client.post(f"/v1/shards/{index}/rounds/{records.round}/partial", content=body, headers=auth)


def test_the_root_takes_only_what_a_shard_may_send(root):
    server, client, auth = root
    assert beat(client, {"Authorization": "Bearer nope-nope-nope-nope"}, 0).status_code == 401
    assert beat(client, auth, 2).status_code == 404
    assert beat(client, auth, 0, devices={"dev-c": {"phase": "training", "split": 3}}).status_code == 422
    clock = beat(client, auth, 0, devices={"dev-a": {"phase": "training", "split": 3}}).json()
    assert clock["round"] == 0 and clock["phase"] == "training" and clock["reported"] is False
    assert server.status().devices["dev-a"].phase == "training"

    model = wire.decode(bytearray(client.get("/v1/shards/0/model", headers=auth).content))
    from ares.runtime.training import model_digest

    assert model.meta == {"round": 0, "model_sha256": server.model_sha256} == {
        "round": 0, "model_sha256": model_digest(model.tensors)}

    records, mean = part(server, ["dev-a", "dev-b"], 1)
    bad = records.model_copy(update={"devices": {**records.devices, "dev-c": records.devices["dev-a"]}})
    assert client.put("/v1/shards/0/rounds/0/records", content=bad.model_dump_json(), headers=auth).status_code == 422
    heavier = records.devices["dev-a"].model_copy(update={"weight": 31})  # more than its 30 samples
    heavy = records.model_copy(update={"devices": {"dev-a": heavier}})
    assert client.put("/v1/shards/0/rounds/0/records", content=heavy.model_dump_json(), headers=auth).status_code == 422
    early = part(server, ["dev-a"], 1, round_index=1)[0]
    assert client.put("/v1/shards/0/rounds/1/records", content=early.model_dump_json(), headers=auth).status_code == 409
    assert client.put("/v1/shards/0/rounds/0/records", content=early.model_dump_json(), headers=auth).status_code == 422

    tensors = pack_partial(mean)
    key = next(k for k in tensors if k.startswith("mean:"))
    wrong_shape = {**tensors, key: torch.zeros(3)}
    assert send(client, auth, 0, records, mean, wrong_shape).status_code == 422
    not_finite = {**tensors, key: torch.full_like(tensors[key], float("nan"))}
    assert send(client, auth, 0, records, mean, not_finite).status_code == 422
    far = {**tensors, key: tensors[key] + 1e4}
    r = send(client, auth, 0, records, mean, far)
    assert r.status_code == 422 and "beyond the bound" in r.json()["error"], r.text
    lying = PartialMeta(round=0, weight=999, count=2).model_dump()
    assert send(client, auth, 0, records, mean, meta=lying).status_code == 422
    assert server.round == 0 and not server.seats[0].reported

    assert send(client, auth, 0, records, mean).json() == {"ok": True, "round": 0}
    assert send(client, auth, 0, records, mean).json() == {"ok": True, "round": 0, "repeat": True}
    assert beat(client, auth, 0).json()["reported"] is True
    records_1, mean_1 = part(server, ["dev-c", "dev-d"], 2)
    want = RunningMean(server.global_state())
    want.add_sum(mean.sums, mean.maxes, mean.weight, mean.count)
    want.add_sum(mean_1.sums, mean_1.maxes, mean_1.weight, mean_1.count)
    assert send(client, auth, 1, records_1, mean_1).status_code == 200
    assert server.round == 1  # every shard's part is in: the round closed
    assert_same_model(server.global_state(), want.result(), rel=1e-7)
    record = server.history[0]
    assert record.closed_by == "all devices done" and record.missed == [] and set(record.devices) == set(DEVICES)
    # a part for a round that is over is refused as a late upload is
    late = client.put("/v1/shards/1/rounds/0/records", content=records_1.model_dump_json(), headers=auth)
    assert late.status_code == 409 and "round 0 is closed" in late.json()["error"]
    body = wire.encode(pack_partial(mean_1), PartialMeta(round=0, weight=mean_1.weight, count=2).model_dump())
    assert client.post("/v1/shards/1/rounds/0/partial", content=body, headers=auth).status_code == 409
