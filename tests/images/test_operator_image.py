"""The operator image against the test run's real control plane: its own entrypoint, with the args
the chart passes, as uid 10001 with the chart's ServiceAccount token; a job applied with kubectl
gets its children and a status, its /metrics show the job, SIGTERM ends it cleanly.

In the control plane's group of the parallel run (tests/conftest.py): the real nodes' group runs the
other image tests, and would otherwise start a second control plane for this one test.
"""

from __future__ import annotations

import json

import httpx
import pytest

from cluster.fixtures import OPERATOR_NS, OPERATOR_SA
from images.podman_cli import UID, process_ids
from tests.support import ROOT, free_port, wait_for

pytestmark = [pytest.mark.images, pytest.mark.timeout(3600)]


@pytest.mark.k8s
def test_operator_image_runs_the_operator_against_the_control_plane(control_plane, namespace, kubectl, podman,
                                                                     tmp_path):
    """The image's own entrypoint, with the args the chart passes, as the chart's ServiceAccount."""
    kube = tmp_path / "kube"
    kube.mkdir(mode=0o755)
    token = control_plane.token_for(OPERATOR_NS, OPERATOR_SA)  # so RBAC is exactly the chart's
    (kube / "config").write_text(json.dumps(control_plane.kubeconfig({"token": token}, namespace)))
    (kube / "config").chmod(0o644)
    kube.chmod(0o755)
    liveness, metrics, no_server = free_port(), free_port(), free_port()
    operator = podman.start(
        "operator", f"--namespace={namespace}", f"--liveness=http://127.0.0.1:{liveness}/healthz", "--verbose",
        opts=("--network", "host", "--user", f"{UID}:{UID}", "-v", f"{kube}:/kube:ro",
              "--env", "KUBECONFIG=/kube/config", "--env", "ARES_TICK_SECONDS=1",
              "--env", "ARES_METRICS_ADDRESS=127.0.0.1", "--env", f"ARES_METRICS_PORT={metrics}",
              # nothing listens there: the server's status is refused at once (no DNS lookups)
              "--env", f"ARES_SERVER_URL_TEMPLATE=https://127.0.0.1:{no_server}"))

    def logs() -> str:  # without the timer's once-a-second lines
        lines = [line for line in podman.logs(operator).splitlines()
                 if "Timer 'tick'" not in line and "labelSelector=ares.io" not in line]
        return "--- operator\n" + "\n".join(lines)[-8000:]

    def get(port: int, path: str):
        try:
            reply = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2)
        except httpx.HTTPError:
            return None
        return reply if reply.status_code == 200 else None

    wait_for(lambda: get(liveness, "/healthz"), 30, "the operator's liveness endpoint", interval=0.25, details=logs)
    assert process_ids(podman, operator) == (UID, UID)

    kubectl.run("apply", "-f", str(ROOT / "examples" / "job.yaml"))
    uid = kubectl.json("get", "aresjobs", "vgg5-demo")["metadata"]["uid"]

    def owned(kind: str) -> dict[str, dict]:
        items = kubectl.json("get", kind)["items"]
        return {o["metadata"]["name"]: o for o in items
                if any(r["uid"] == uid and r.get("controller") for r in o["metadata"].get("ownerReferences", []))}

    pods = wait_for(lambda: len(p := owned("pods")) == 4 and p,
                    30, "the server pod and three device pods", interval=0.25, details=logs)
    assert set(pods) == {"vgg5-demo-server", "vgg5-demo-nano-maxn", "vgg5-demo-nano-5w", "vgg5-demo-pi"}
    assert set(owned("secrets")) == {"vgg5-demo-tokens", "vgg5-demo-tls"}
    assert set(owned("configmaps")) == {"vgg5-demo-config"}
    assert set(owned("services")) == {"vgg5-demo-server"}

    def status() -> dict | None:
        st = kubectl.json("get", "aresjobs", "vgg5-demo").get("status") or {}
        created = [c for c in st.get("conditions", []) if c["type"] == "ChildrenCreated" and c["status"] == "True"]
        return st if st.get("phase") and created else None

    st = wait_for(status,
                  30, "the job's status", interval=0.25,
                  details=lambda: f"{kubectl.run('get', 'aresjobs', 'vgg5-demo', '-o', 'yaml').stdout}\n{logs()}")
    assert st["phase"] == "Pending", st  # no kubelet: the pods never run, the server never answers
    assert {c["type"] for c in st["conditions"]} >= {"SpecValid", "ChildrenCreated", "ServerReady"}, st
    # The operator's own /metrics, served from the container on the host network.
    wanted = f'ares_operator_job_phase{{job="vgg5-demo",namespace="{namespace}",phase="Pending"}} 1.0'
    wait_for(lambda: (r := get(metrics, "/metrics")) and wanted in r.text,
             15, "the job's phase in /metrics", interval=0.25,
             details=lambda: f"{(r := get(metrics, '/metrics')) and r.text}\n{logs()}")
    log = podman.logs(operator)
    assert "forbidden" not in log.lower(), logs()  # the chart's RBAC suffices

    # SIGTERM (what the kubelet sends) stops it cleanly and promptly.
    podman("stop", "-t", "20", operator, timeout=60)
    state = json.loads(podman("inspect", operator).stdout)[0]["State"]
    assert state["ExitCode"] == 0, logs()
