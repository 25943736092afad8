"""`ares run` end to end: a real server process and three device processes over HTTP/2 learn the
synthetic set in every split mode, and the results folder says what happened."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ares.core.config import DataConfig, TrainingConfig
from ares.roles.runconfig import DeviceSpec, RunConfig
from ares.roles.runner import run
from tests.support import wait_for

pytestmark = pytest.mark.slow


# Four rounds at the full lr (decay after round 5, as in a 10-round run): the easy set is learnt by
# round 2-3 in every mode (0.92, then 0.997), so rounds 4-9 showed nothing more.
ROUNDS = 4


def config(tmp: Path, mode: str, devices, rounds: int = ROUNDS, **kw) -> RunConfig:
    return RunConfig(devices=devices, mode=mode, results_dir=str(tmp / "results"),
                     # the easy set: these tests check that training works in every mode (>= 90%);
                     # the default, harder set would need far more rounds than a test can afford
                     data=DataConfig(name="synthetic-easy", synthetic_train=600, synthetic_test=300, seed=3),
                     training=TrainingConfig(rounds=rounds, batch_size=40, lr=0.02, seed=3, lr_decay_round=5), **kw)


def rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


MODES = [
    ("fixed-split", "fixed:2", 3, {0: 2, 1: 2, 2: 2}),
    ("federated-none", "none", 3, {0: 6, 1: 6, 2: 6}),
    ("adaptive-mixed", "adaptive",
     [DeviceSpec(name="dev-0", initial_split=1), DeviceSpec(name="dev-1", initial_split=3),
      DeviceSpec(name="dev-2", initial_split=5)], None),
]


@pytest.mark.parametrize("mode,devices,splits", [m[1:] for m in MODES], ids=[m[0] for m in MODES])
def test_three_devices_learn_within_ten_rounds(tmp_path, mode, devices, splits):
    summary = run(config(tmp_path, mode, devices), progress=False)
    root = tmp_path / "results"
    rounds = rows(root / "rounds.csv")
    assert len(rounds) == ROUNDS and summary["rounds"] == ROUNDS
    assert max(float(r["accuracy"]) for r in rounds) >= 0.90, rounds
    assert all(r["missed"] == "" and r["devices"] == "3" for r in rounds)
    per_device = rows(root / "devices.csv")
    assert len(per_device) == 3 * ROUNDS
    first = {r["device"]: int(r["split"]) for r in per_device if r["round"] == "0"}
    if splits is not None:
        names = sorted(first)
        assert [first[n] for n in names] == [splits[i] for i in range(3)]
    else:
        assert sorted(first.values()) == [1, 3, 5]  # different splits per device, as written
    assert all(int(r["samples"]) == 200 for r in per_device)
    # rounds.csv keeps four decimals
    assert json.loads((root / "summary.json").read_text())["final_accuracy"] == pytest.approx(
        float(rounds[-1]["accuracy"]), abs=5e-5)
    assert (root / "run.png").stat().st_size > 10_000


def test_ares_run_twice_into_one_folder_trains_again_and_keeps_the_first_run(tmp_path):
    """The server resumes any checkpoint it finds: a second `ares run` into a finished run's folder
    used to train nothing and report the first run's figures as its own."""
    import subprocess
    import sys

    root = tmp_path / "results"
    command = [sys.executable, "-m", "ares", "run", "--devices", "1", "--rounds", "1", "--mode", "fixed:2",
               "--dataset", "synthetic", "--batch-size", "20", "--max-steps-per-round", "2",
               "--results-dir", str(root), "--quiet"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=240, check=True)
    assert "are now in" not in first.stdout
    (root / "marker").write_text("first run")
    second = subprocess.run(command, capture_output=True, text=True, timeout=240, check=True)
    assert f"are now in {root}.1" in second.stdout
    assert (tmp_path / "results.1" / "marker").read_text() == "first run"  # nothing of it lost
    assert not (root / "marker").exists()
    # and the second run trained: its own round, in its own logs
    assert len(rows(root / "rounds.csv")) == 1 and "round 0" in (root / "logs" / "device-0.log").read_text()
    with pytest.raises(ValueError, match="previous run"):  # the library refuses rather than resume it
        run(RunConfig(devices=1, results_dir=str(root)), progress=False)


def test_stopping_a_run_frees_the_port_even_while_a_client_holds_a_connection(tmp_path):
    """granian waits for open connections on SIGTERM; killed after the grace, its worker used to
    live on, serving the port with a stale server. stop() now ends the server's whole group."""
    import os
    import socket

    import httpx

    from ares.roles.runner import Cluster, free_port

    cfg = config(tmp_path, "fixed:2", 1, rounds=1)
    cluster = Cluster(cfg, tmp_path / "results", free_port())
    try:
        cluster.start()
        holder = httpx.Client(http1=False, http2=True)
        assert holder.get(f"{cluster.url}/healthz").status_code == 200  # an open HTTP/2 connection
        server = cluster.procs["server"]
    finally:
        cluster.stop(grace_s=1.0)  # the held connection keeps granian past any grace: no need to wait 10 s
    def group_gone() -> bool:
        try:
            os.killpg(server.pid, 0)  # a killed worker lingers as a zombie until init reaps it
            return False
        except ProcessLookupError:
            return True

    try:
        wait_for(group_gone, 30, "nothing of the server's process group is left")
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", cluster.port))  # and its port is free again
    finally:
        holder.close()
