"""End to end on a real API server: a job with `server.shards: 2` runs as a root server pod and two
shard pods, each device dialling its shard's Service; it trains to Succeeded with every device
merged, and a shard pod killed mid-run is replaced while only its own devices miss (at most)
the round it held.

The test kubelet runs every pod on this machine and maps the job's Services to loopback ports:
`ShardKubelet` gives the root and each shard a port of its own (the shared one maps every
Service to one port, which holds one server).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ares.core.sharding import assign
from ares.runtime.controller import fetch_status
from ares.runtime.tlsclient import ClientTls
from k8s_kubelet import Kubelet
from tests.support import free_port, wait_for

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

JOB = "sharded"
DEVICES = ("a", "b", "c", "d")
SHARDS = 2
NODES = {"a": "raspberry-pi-1", "b": "jetson-nano-1", "c": "jetson-nano-2", "d": "edge-server"}
ROUNDS = 8


class ShardKubelet(Kubelet):
    """The test kubelet, with a loopback port for the root and one for each shard: a server pod
    listens on its own port, and a URL naming a shard's Service dials that shard's port."""

    def __init__(self, *args, job: str, shard_ports: list[int], **kwargs):
        super().__init__(*args, **kwargs)
        self.job, self.shard_ports, self.root_port = job, shard_ports, self.server_port

    def port_of(self, text: str) -> int:
        for index, port in enumerate(self.shard_ports):
            if f"{self.job}-shard-{index}." in text or text == f"{self.job}-shard-{index}":
                return port
        return self.root_port

    def _map(self, arg, pod, mounts):
        if ".svc" in arg and f".{pod.namespace}.svc" in arg:
            scheme = next((s for s in ("http://", "https://") if arg.startswith(s)), "")
            return f"{scheme}127.0.0.1:{self.port_of(arg)}" if scheme else "127.0.0.1"
        return super()._map(arg, pod, mounts)

    def _launch(self, pod, c):
        self.server_port = self.port_of(pod.name)  # what a server pod is told to listen on
        try:
            return super()._launch(pod, c)
        finally:
            self.server_port = self.root_port


@pytest.fixture
def shard_kubelet(control_plane, namespace: str, server_port: int, tmp_path: Path) -> Iterator[ShardKubelet]:
    with ShardKubelet(control_plane.http(), tmp_path / "node", server_port, namespace, job=JOB,
                      shard_ports=[free_port() for _ in range(SHARDS)]) as k:
        yield k
        for name in sorted({p.name for p in k.pods.values()}):
            print(f"--- {name} ---\n{k.log(name)[-2500:]}")
        print(f"kubelet errors: {k.errors}")


def sharded_job() -> str:
    """Four cpu devices over two shards (a, b on one; c, d on the other), a few tiny rounds. The
    round deadline is longer than a shard pod's replacement, so its devices can rejoin the round
    in progress or the next one. cleanPodPolicy None keeps the ended root's pod, whose checkpoint
    (the round records) the test reads."""
    return yaml.safe_dump({
        "apiVersion": "ares.io/v1alpha1", "kind": "AresTrainingJob", "metadata": {"name": JOB},
        "spec": {
            "dataset": {"name": "synthetic", "syntheticTrain": 200, "syntheticTest": 100},
            "training": {"rounds": ROUNDS, "batchSize": 50, "maxStepsPerRound": 2},
            "split": {"mode": "fixed", "point": 2},
            "server": {"nodeName": "edge-server", "shards": SHARDS},
            "devices": [{"name": d, "deviceClass": "cpu", "nodeName": NODES[d]} for d in DEVICES],
            "runPolicy": {"roundDeadlineSeconds": 120, "backoffLimit": 3, "cleanPodPolicy": "None"},
        }})


class Sharded:
    def __init__(self, kubectl, kubelet: ShardKubelet, port: int, namespace: str):
        self.kubectl, self.kubelet, self.port, self.namespace = kubectl, kubelet, port, namespace
        self._reader: tuple[str, ClientTls] | None = None

    def status(self) -> dict:
        return self.kubectl.json("get", "aresjobs", JOB).get("status") or {}

    def pods(self) -> dict[str, dict]:
        return {p["metadata"]["name"]: p for p in self.kubectl.json("get", "pods", "-l", f"ares.io/job={JOB}")["items"]}

    def secret(self, name: str) -> dict[str, bytes]:
        return {k: base64.b64decode(v) for k, v in self.kubectl.json("get", "secret", name)["data"].items()}

    def root(self):
        """The root's /v1/status, as the operator reads it (the job's CA, the root Service's name)."""
        if self._reader is None:
            self._reader = (self.secret(f"{JOB}-tokens")["controller.token"].decode(),
                            ClientTls(ca_pem=self.secret(f"{JOB}-tls")["ca.crt"],
                                      server_name=f"{JOB}-server.{self.namespace}.svc"))
        token, tls = self._reader
        return fetch_status(f"https://127.0.0.1:{self.port}", token, 30, tls=tls)

    def history(self) -> list[dict]:
        """The root's round records, from its checkpoint (state.json in its checkpoint volume)."""
        folder = self.kubelet.volume_dir(f"{JOB}-server", "checkpoints")
        state = folder / "state.json" if folder else None
        return json.loads(state.read_text())["history"] if state and state.exists() else []


@pytest.mark.timeout(1500)  # about 3 minutes on a quiet 2-core machine; far longer under a loaded one
def test_a_sharded_job_trains_every_device_and_survives_a_killed_shard(server_port, shard_kubelet, operator, kubectl,
                                                                       namespace):
    groups = assign(DEVICES, SHARDS)
    assert all(groups) and groups == [("a", "b"), ("c", "d")]
    shard_of = {d: i for i, g in enumerate(groups) for d in g}
    kubectl.run("apply", "-f", "-", stdin=sharded_job())
    job = Sharded(kubectl, shard_kubelet, server_port, namespace)

    # The objects: a root, a pod and a Service a shard, devices dialling their shard.
    wait_for(lambda: {f"{JOB}-server", f"{JOB}-shard-0", f"{JOB}-shard-1"} <= set(job.pods()), 120, "the server pods")
    services = {s["metadata"]["name"] for s in kubectl.json("get", "services")["items"]}
    assert {f"{JOB}-server", f"{JOB}-shard-0", f"{JOB}-shard-1"} <= services
    pods = wait_for(lambda: (p := job.pods()) and all(f"{JOB}-{d}" in p for d in DEVICES) and p, 120, "device pods")
    for d in DEVICES:
        args = pods[f"{JOB}-{d}"]["spec"]["containers"][0]["args"]
        assert f"{JOB}-shard-{shard_of[d]}." in args[args.index("--server") + 1]
    assert "shard.token" in job.secret(f"{JOB}-tokens")

    # Training: a round with every device merged, devices of both shards.
    full = wait_for(lambda: next((r for r in job.history() if set(r["devices"]) == set(DEVICES)), None),
                    300, "a round that merged every device", interval=0.5)
    shards = wait_for(lambda: (s := job.status().get("shards")) and all(e["ready"] for e in s) and s, 120,
                      "status.shards ready")
    assert [(e["index"], e["pod"], e["devices"]) for e in shards] == [(0, f"{JOB}-shard-0", 2), (1, f"{JOB}-shard-1", 2)]

    # Kill shard 1's pod while its devices train: only its devices may miss a round.
    killed = 1
    old_uid = job.pods()[f"{JOB}-shard-{killed}"]["metadata"]["uid"]
    kill_round = int(wait_for(lambda: (s := job.root()).devices.get("c") and s.devices["c"].phase == "training"
                              and s.round <= ROUNDS - 4 and str(s.round), 300, "c training mid-run", interval=0.05))
    shard_kubelet.kill(f"{JOB}-shard-{killed}")
    wait_for(lambda: (p := job.pods().get(f"{JOB}-shard-{killed}")) and p["metadata"]["uid"] != old_uid
             and p.get("status", {}).get("phase") == "Running", 120, "the shard's replacement", interval=0.2)

    final = wait_for(lambda: (s := job.status()).get("phase") in ("Succeeded", "Failed") and s, 900, "the end",
                     interval=0.5)
    assert final["phase"] == "Succeeded", final.get("conditions")
    assert final["shards"][killed]["restarts"] == 1 and final["shards"][1 - killed]["restarts"] == 0
    assert final["serverRestarts"] == 0

    history = job.history()
    assert [r["round"] for r in history] == list(range(ROUNDS))  # rounds 0..ROUNDS-1, each closed once
    # Rounds every device missed are the machine's, not the shard's: a host stalled past a round's
    # deadline (a loaded test machine) closes it without anyone. They are left out.
    after = [r for r in history if r["round"] >= full["round"] and r["devices"]]
    missed = {d: [r["round"] for r in after if d in r["missed"]] for d in DEVICES}
    for d in DEVICES:
        if shard_of[d] == killed:
            assert len(missed[d]) <= 1 and all(r >= kill_round for r in missed[d]), missed
        else:
            assert missed[d] == [], missed
    merged_late = {d for r in history if r["round"] > kill_round for d in r["devices"]}
    assert merged_late == set(DEVICES), history[-1]  # the killed shard's devices came back


@pytest.mark.parametrize("change, message", [
    ({"training": {"aggregation": {"method": "median"}}},
     "server.shards > 1 needs training.aggregation.method fedavg or norm_clip"),
    ({"training": {"aggregation": {"method": "trimmed_mean"}}},
     "server.shards > 1 needs training.aggregation.method fedavg or norm_clip"),
    ({"devices": [{"name": "shard-0", "deviceClass": "cpu"}]},
     "no device may be named shard-<number>"),
    ({"server": {"shards": 65}}, "spec.server.shards: Invalid value"),
])
def test_the_api_server_refuses_what_shards_cannot_run(kubectl, change, message):
    job = yaml.safe_load(sharded_job())
    job["spec"].update({k: ({**job["spec"][k], **v} if k != "devices" else v) for k, v in change.items()})
    refused = kubectl.run("apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(job), check=False)
    assert refused.returncode != 0 and message in refused.stderr, refused.stderr
    job["spec"]["server"]["shards"] = 1  # one server: any aggregation, any device name
    if "server" not in change:
        kubectl.run("apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(job))
