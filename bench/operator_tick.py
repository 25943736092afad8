"""The operator's reconcile tick at fleet size, on a real control plane, side by side in one run.

For each fleet size (10 devices first: the baseline every other figure is divided by) a job is
created on a real kube-apiserver (tests/cluster/controlplane.py; scripts/build-control-plane),
the operator's own handlers make its children and pods as the create handler does, and a
stand-in kubelet marks every pod running through the status subresource. Then the tick
(`handlers._reconcile` and its status patch, as kopf applies it) runs again and again with
nothing changing, reading the job's pods two ways:

    list    a LIST of the job's pods every tick (what the operator did before its pod index)
    index   the pods from memory, as the kopf index `job_pods` holds them (what it does now)

and once with a new split point for every device (every pod patched: the one tick that must
write to every pod). The server's status is a stand-in with every device training (no server
runs), a round further at every tick, each device's last round a little longer: the job's
status changes and is patched at every tick, as in a job whose rounds are shorter than a tick.
Its HTTP fetch is not in the figures; the status built from it is.

Printed per fleet size: the first tick (it creates every pod), the median steady tick's handler
each way and its ratio to the baseline's, the median status patch (the API server's time: it
checks the whole job, every CEL rule over devices included, at every status write), the
split-change tick, the pure parts (status, pod plan, annotation diff) and the job object's size.

    python bench/operator_tick.py [--devices 10,100,1000] [--ticks 7]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import kopf  # noqa: E402
import kubernetes  # noqa: E402

from ares.core.messages import DeviceStatus, ServerStatus  # noqa: E402
from ares_operator import builders, handlers, metrics, podindex, reconcile  # noqa: E402
from ares_operator import constants as c  # noqa: E402
from ares_operator import status as job_status  # noqa: E402
from ares_operator.builders import JobRef  # noqa: E402
from ares_operator.kube import Kube  # noqa: E402
from ares_operator.settings import from_env  # noqa: E402
from ares_operator.spec import parse_spec  # noqa: E402
from cluster.controlplane import ControlPlane, bin_dir, tool_env  # noqa: E402
from cluster.fixtures import fresh_namespace  # noqa: E402
from tests.support import wait_for  # noqa: E402

NAME = "fleet"
SERVERS: dict[str, Callable[[], ServerStatus]] = {}  # the stand-in server of each fleet, by namespace


def fleet_job(devices: int) -> dict[str, Any]:
    return {"apiVersion": "ares.io/v1alpha1", "kind": "AresTrainingJob", "metadata": {"name": NAME},
            "spec": {"dataset": {"name": "synthetic"}, "split": {"mode": "fixed", "point": 2},
                     "devices": [{"name": f"d{i:04d}", "deviceClass": "cpu", "nodeName": f"node-{i:04d}"}
                                 for i in range(devices)]}}


def median_time(fn: Callable[[], Any], times: int) -> float:
    out = []
    for _ in range(times):
        began = time.perf_counter()
        fn()
        out.append(time.perf_counter() - began)
    return statistics.median(out)


def median_tick(fleet: "Fleet", index: Any, times: int) -> tuple[float, float]:
    """The median handler time and the median time of its status patch (the API server's)."""
    handler, patch = zip(*(fleet.tick(index) for _ in range(times)))
    return statistics.median(handler), statistics.median(patch)


class Fleet:
    """One job of `devices` devices in a namespace of its own, ticked by the operator's handlers."""

    def __init__(self, cp: ControlPlane, namespace: str, devices: int):
        self.cp, self.namespace, self.n = cp, namespace, devices
        self.kube = Kube()
        self.settings = from_env({"ARES_SERVER_URL_TEMPLATE": "https://127.0.0.1:1"})
        job = fleet_job(devices)
        obj = self.kube.custom.create_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, job)
        self.ref = JobRef(NAME, namespace, obj["metadata"]["uid"])
        self.spec = parse_spec(obj["spec"])
        self.state = handlers.JobState()
        self.ctx = handlers.Context(settings=self.settings, kube=self.kube, metrics=metrics.OperatorMetrics())
        self.status: dict[str, Any] = {}
        self.round = 0

    def server(self) -> ServerStatus:
        """A round further each call: every device training, its last round a little longer."""
        self.round += 1
        return ServerStatus(round=self.round, rounds=100_000, phase="training", accuracy=0.5, devices={
            d.name: DeviceStatus(split=2, phase="training", up_bps=2.5e6, down_bps=2.5e6, energy_j=12.5 * self.round,
                                 energy_source="modelled", round_s=10.0 + i / 1000 + self.round / 100)
            for i, d in enumerate(self.spec.devices)})

    def call(self, index: Any = None) -> handlers.Call:
        body = {"apiVersion": c.API_VERSION, "kind": c.KIND,
                "metadata": {"name": NAME, "namespace": self.namespace, "uid": self.ref.uid}}
        return handlers.Call(self.ref, self.status, {"generation": 1}, body, kopf.Patch(),
                             logging.getLogger("bench"), self.ctx, self.state, index)

    def tick(self, index: Any = None) -> tuple[float, float]:
        """One tick as kopf runs it: the handler, then its status patch; the time of each. (kopf
        then has the patched job from its watch: read here, untimed.)"""
        call = self.call(index)
        began = time.perf_counter()
        handlers._reconcile(call, self.spec)
        handled = time.perf_counter()
        patch = dict(call.patch.status)
        if patch:
            self.kube.patch_job_status(self.namespace, NAME, patch)
        patched = time.perf_counter()
        if patch:
            self.status = self.read()["status"]
        return handled - began, patched - handled

    def read(self) -> dict[str, Any]:
        return self.kube.custom.get_namespaced_custom_object(c.GROUP, c.VERSION, self.namespace, c.PLURAL, NAME)

    def create(self) -> float:
        call = self.call()
        assert handlers.ensure_children(call, self.spec), call.patch.status
        return sum(self.tick())

    def mark_running(self) -> None:
        """The stand-in kubelet: every pod running, its containers started."""
        running = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
        with self.cp.http() as http:
            for pod in self.kube.list_pods(self.namespace, NAME, self.ref.uid):
                main = c.CONTAINER_SERVER if pod["metadata"]["labels"][c.LABEL_ROLE] == c.ROLE_SERVER else c.CONTAINER_DEVICE
                status = {"phase": "Running", "containerStatuses": [
                    {"name": main, "image": "img", "imageID": "", "restartCount": 0, "ready": True, "started": True,
                     "state": running}]}
                http.patch(f"/api/v1/namespaces/{self.namespace}/pods/{pod['metadata']['name']}/status",
                           json={"status": status},
                           headers={"Content-Type": "application/merge-patch+json"}).raise_for_status()

    def index(self) -> dict[podindex.Key, list[reconcile.PodView]]:
        """What the kopf index holds for this job, read once (kopf keeps it current from a watch)."""
        return {podindex.key(self.namespace, self.ref.uid):
                [reconcile.PodView.of(p) for p in self.kube.list_pods(self.namespace, NAME, self.ref.uid)]}


def measure(cp: ControlPlane, devices: int, ticks: int) -> dict[str, float]:
    with fresh_namespace(cp) as namespace:
        fleet = Fleet(cp, namespace, devices)
        SERVERS[namespace] = fleet.server
        first = fleet.create()
        fleet.mark_running()
        fleet.tick()  # the status after the pods run
        listed, _ = median_tick(fleet, None, ticks)
        index = fleet.index()
        indexed, patch = median_tick(fleet, index, ticks)
        # A new split point for every device: every pod patched in one tick.
        fleet.spec = parse_spec({**fleet.read()["spec"], "split": {"mode": "fixed", "point": 4}})
        change = sum(fleet.tick(index))
        # The pure parts of a tick, at this size.
        pods = index[podindex.key(namespace, fleet.ref.uid)]
        server = fleet.server()
        status_s = median_time(lambda: job_status.bounded(job_status.summary(
            fleet.ref, fleet.spec, pods, server, fleet.status, {}, 0)["devices"]), ticks)
        plan_s = median_time(lambda: reconcile.plan_pods(fleet.ref, fleet.spec, fleet.settings, pods, {}, 0,
                                                         builders.pinned_splits(fleet.spec), {}, True), ticks)
        diff_s = median_time(lambda: reconcile.annotation_patches(fleet.spec, fleet.ref, pods,
                                                                  builders.pinned_splits(fleet.spec)), ticks)
        job = fleet.read()
        job["metadata"].pop("managedFields", None)
        size = len(json.dumps(job, separators=(",", ":")))
        lists = sum(v for k, v in _samples(fleet.ctx.metrics, "ares_operator_pod_lists_total").items())
        return {"first": first, "list": listed, "index": indexed, "patch": patch, "change": change, "status": status_s,
                "plan": plan_s, "diff": diff_s, "size": size, "lists": lists}


def _samples(m: metrics.OperatorMetrics, name: str) -> dict[str, float]:
    return {str(s.labels): s.value for fam in m.registry.collect() for s in fam.samples if s.name == name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="10,100,1000", help="fleet sizes; the first is the baseline")
    parser.add_argument("--ticks", type=int, default=7, help="steady ticks per way (the median is shown)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.devices.split(",")]
    logging.disable(logging.INFO)  # the handlers log every pod they make
    # In the server's stead: every device training (what the tick builds the status from).
    handlers.server_status = lambda call, pods: SERVERS[call.job.namespace]()  # type: ignore[assignment]
    with tempfile.TemporaryDirectory() as tmp, ControlPlane(Path(tmp), bin=bin_dir()) as cp:
        env = tool_env(cp.bin, cp.admin_kubeconfig)
        subprocess.run(["kubectl", "apply", "-f", str(ROOT / "crds" / "aresjobs.ares.io.yaml")], env=env,
                       check=True, capture_output=True)
        with cp.http() as http:
            wait_for(lambda: any(cond["type"] == "Established" and cond["status"] == "True" for cond in
                                 http.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/aresjobs.ares.io")
                                 .json().get("status", {}).get("conditions") or []), 60, "the CRD established", interval=0.2)
        kubernetes.config.load_kube_config(str(cp.admin_kubeconfig))
        rows = {n: measure(cp, n, args.ticks) for n in sizes}
    base = rows[sizes[0]]
    print(f"operator tick, {args.ticks} steady ticks each way (median), on {Path('/proc/loadavg').read_text().split()[0]} "
          f"load; baseline {sizes[0]} devices")
    print(f"{'devices':>8} {'first':>8} {'list':>8} {'index':>8} {'list/idx':>8} {'idx/base':>8} {'patch':>8} "
          f"{'pat/base':>8} {'change':>8} {'status':>8} {'plan':>8} {'diff':>8} {'object':>8} {'LISTs':>6}")
    for n, r in rows.items():
        print(f"{n:>8} {r['first']:>7.2f}s {r['list']:>7.3f}s {r['index']:>7.3f}s {r['list'] / r['index']:>7.1f}x "
              f"{r['index'] / base['index']:>7.1f}x {r['patch']:>7.3f}s {r['patch'] / base['patch']:>7.1f}x "
              f"{r['change']:>7.2f}s {r['status'] * 1000:>6.1f}ms {r['plan'] * 1000:>6.1f}ms {r['diff'] * 1000:>6.1f}ms "
              f"{r['size'] / 1000:>6.1f}KB {r['lists']:>6.0f}")
    print("first: the tick that creates every pod (with its status patch); list, index: the handler of a steady tick "
          "reading the pods by LIST or from the index; patch: that tick's status patch, the API server's time; change: "
          "the tick that patches every pod's split; status, plan, diff: the pure parts; object: the job, compact JSON, "
          "no managedFields; LISTs: pod LISTs of all its ticks")


if __name__ == "__main__":
    main()
