"""The host-control sidecar: its pure decisions, then the real process on a fake host.

The fake host is a temp folder: a sysfs power file, an ``nvpmodel`` and the
ares-shape/ares-unshape scripts replaced by stand-ins that record their
arguments. Real tc is exercised in tests/host/test_sidecar_tc.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import wait_for

from ares.roles.sidecar import (
    ANN_BANDWIDTH,
    ANN_POWER_MODE,
    Applied,
    HostFacts,
    Plan,
    Refusal,
    SetPowerMode,
    Shape,
    Unshape,
    after,
    go_unquote,
    normalize_bandwidth,
    parse_annotations,
    parse_nvpmodel_conf,
    plan,
)
from ares.runtime.power import read_power_file

ROOT = Path(__file__).resolve().parents[2]
MODES = {"MAXN": 0, "5W": 1, "custom1": 2, "custom3": 3}
JETSON = HostFacts(power_modes=MODES, server_ip="10.43.0.10")
PI = HostFacts(power_modes_problem="nvpmodel not found", server_ip="10.43.0.10")


def test_nvpmodel_conf_defines_the_ares_modes():
    conf = (ROOT / "hostscripts" / "nvpmodel.conf").read_text()
    assert parse_nvpmodel_conf(conf) == MODES
    five_w = conf.split("NAME=5W >", 1)[1].split("<", 1)[0]
    assert "CPU_A57 MAX_FREQ 918000" in five_w and "GPU MAX_FREQ 640000000" in five_w
    for name, cores in (("MAXN", 4), ("5W", 2), ("custom1", 1), ("custom3", 3)):
        block = conf.split(f"NAME={name} >", 1)[1].split("<", 1)[0]
        assert block.count("CPU_ONLINE CORE_") == 4
        assert sum(line.endswith(" 1") for line in block.splitlines()
                   if line.startswith("CPU_ONLINE")) == cores, name


@pytest.mark.parametrize(
    ("quoted", "value"),
    [('"5W"', "5W"), ('""', ""), (r'"a\"b"', 'a"b'), (r'"x\ny"', "x\ny"), (r'"\u00e9"', "é")],
    ids=["plain", "empty", "quote", "newline", "unicode"],
)
def test_go_unquote(quoted, value):
    assert go_unquote(quoted) == value


@pytest.mark.parametrize("bad", ["5W", '"5W', '"a" + "b"', "'5W'", '"a"b"'])
def test_go_unquote_refuses_non_literals(bad):
    with pytest.raises(ValueError):
        go_unquote(bad)


def test_parse_annotations_reads_kubelet_format_and_skips_junk():
    text = (
        'ares.io/bandwidth="20mbit"\n'
        'ares.io/power-mode="5W"\n'
        'kubectl.kubernetes.io/last-applied-configuration="{\\"a\\":1}\\n"\n'
        "garbage line\n"
        'unquoted=5W\n'
    )
    assert parse_annotations(text) == {
        ANN_BANDWIDTH: "20mbit",
        ANN_POWER_MODE: "5W",
        "kubectl.kubernetes.io/last-applied-configuration": '{"a":1}\n',
    }


@pytest.mark.parametrize(
    ("value", "rate"),
    [("20mbit", "20mbit"), ("5Mbit", "5mbit"), (" 512kbit ", "512kbit"), ("1.5gbit", "1.5gbit"),
     ("", None), ("unlimited", None), ("Unlimited", None)],
)
def test_normalize_bandwidth(value, rate):
    assert normalize_bandwidth(value) == rate


@pytest.mark.parametrize("value", ["20mbps", "20", "fast", "-5mbit", "0mbit", "20 mbit"])
def test_normalize_bandwidth_refuses(value):
    with pytest.raises(ValueError):
        normalize_bandwidth(value)


def normalize_error(value: str) -> str:
    try:
        normalize_bandwidth(value)
    except ValueError as exc:
        return str(exc)
    raise AssertionError(f"{value} is valid")


SHAPED = Applied(power_mode="MAXN", bandwidth="20mbit", server_ip="10.43.0.10")

PLANS = {
    "first pass, nothing asked: lift any stale cap": (
        {}, Applied(), JETSON, Plan((Unshape(),))),
    "first pass applies both": (
        {ANN_POWER_MODE: "5W", ANN_BANDWIDTH: "20Mbit"}, Applied(), JETSON,
        Plan((SetPowerMode("5W", 1), Shape("20mbit", "10.43.0.10")))),
    "nothing changed": (
        {ANN_POWER_MODE: "MAXN", ANN_BANDWIDTH: "20mbit"}, SHAPED, JETSON, Plan()),
    "new rate": (
        {ANN_POWER_MODE: "MAXN", ANN_BANDWIDTH: "8mbit"}, SHAPED, JETSON,
        Plan((Shape("8mbit", "10.43.0.10"),))),
    "server moved": (
        {ANN_BANDWIDTH: "20mbit"}, SHAPED, HostFacts(MODES, server_ip="10.43.0.99"),
        Plan((Shape("20mbit", "10.43.0.99"),))),
    "cap removed": ({ANN_BANDWIDTH: "unlimited"}, SHAPED, JETSON, Plan((Unshape(),))),
    "annotation gone": ({}, SHAPED, JETSON, Plan((Unshape(),))),
    "no cap, none asked": ({}, Applied(bandwidth=None), JETSON, Plan()),
    "bad rate keeps cap": (
        {ANN_BANDWIDTH: "20mbps"}, SHAPED, JETSON,
        Plan(refusals=(Refusal(ANN_BANDWIDTH, "20mbps", normalize_error("20mbps")),))),
    "unknown mode": (
        {ANN_POWER_MODE: "turbo", ANN_BANDWIDTH: "20mbit"}, SHAPED, JETSON,
        Plan(refusals=(Refusal(ANN_POWER_MODE, "turbo",
                               "unknown power mode; accepted: MAXN, 5W, custom1, custom3"),))),
    "power modes off Jetson": (
        {ANN_POWER_MODE: "5W"}, Applied(bandwidth=None), PI,
        Plan(refusals=(Refusal(ANN_POWER_MODE, "5W", "nvpmodel not found"),))),
    "shaping without server": (
        {ANN_BANDWIDTH: "20mbit"}, Applied(bandwidth=None), HostFacts(MODES),
        Plan(refusals=(Refusal(ANN_BANDWIDTH, "20mbit",
                               "no server address (--server unset or not resolvable)"),))),
}


@pytest.mark.parametrize(("annotations", "applied", "facts", "expected"), PLANS.values(),
                         ids=PLANS.keys())
def test_plan(annotations, applied, facts, expected):
    assert plan(annotations, applied, facts) == expected


def test_plan_is_settled_after_applying_its_actions():
    annotations = {ANN_POWER_MODE: "custom3", ANN_BANDWIDTH: "5mbit"}
    applied = Applied()
    for action in plan(annotations, applied, JETSON).actions:
        applied = after(applied, action)
    assert applied == Applied("custom3", "5mbit", "10.43.0.10")
    assert plan(annotations, applied, JETSON) == Plan()


# --- the real process on a fake host ------------------------------------------

RECORDER = """#!/bin/sh
echo "$(basename "$0") $*" >> "{log}"
{extra}
"""


@pytest.fixture
def fake_host(tmp_path):
    """Folders and stand-in commands; returns a dict of paths."""
    calls = tmp_path / "calls.log"
    calls.touch()
    bin_dir = tmp_path / "bin"
    scripts = tmp_path / "hostscripts"
    for folder, name, extra in (
        (bin_dir, "nvpmodel", ""),
        (scripts, "ares-shape", ""),
        (scripts, "ares-unshape", ""),
    ):
        folder.mkdir(exist_ok=True)
        exe = folder / name
        exe.write_text(RECORDER.format(log=calls, extra=extra))
        exe.chmod(0o755)
    sysfs = tmp_path / "sys" / "in_power0_input"
    sysfs.parent.mkdir()
    sysfs.write_text("4205\n")
    annotations = tmp_path / "podinfo" / "annotations"
    annotations.parent.mkdir()
    return {"calls": calls, "bin": bin_dir, "scripts": scripts, "sysfs": sysfs,
            "annotations": annotations, "state": tmp_path / "state"}


def set_annotations(path: Path, **values: str) -> None:
    """Replace the file the way kubelet does: write aside, then rename."""
    text = "".join(f'ares.io/{key.replace("_", "-")}={json.dumps(v)}\n' for key, v in values.items())
    tmp = path.with_name(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def calls(host) -> list[str]:
    """What the sidecar ran to change the host (not its `nvpmodel -q` queries of the mode in force)."""
    return [c for c in host["calls"].read_text().splitlines() if not c.endswith(" -q")]


def hostctl(host) -> dict:
    try:
        return json.loads((host["state"] / "hostctl.json").read_text())
    except (OSError, ValueError):
        return {}


@pytest.fixture
def sidecar(fake_host):
    """Start the sidecar process against the fake host; stop it at the end."""
    procs = []

    def start(*extra: str) -> subprocess.Popen:
        env = dict(os.environ, ARES_HOSTSCRIPTS=str(fake_host["scripts"]),
                   PATH=f"{fake_host['bin']}{os.pathsep}{os.environ['PATH']}",
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.Popen(
            [sys.executable, "-m", "ares.roles.sidecar",
             "--annotations", str(fake_host["annotations"]),
             "--interface", "eth9", "--server", "localhost",
             "--nvpmodel-conf", str(ROOT / "hostscripts" / "nvpmodel.conf"),
             "--power-path", str(fake_host["sysfs"]), "--power-period", "0.1",
             "--state-dir", str(fake_host["state"]), "--poll", "0.2", *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


def test_sidecar_applies_changes_refuses_bad_values_and_reports_power(fake_host, sidecar):
    host = fake_host
    set_annotations(host["annotations"], power_mode="5W", bandwidth="20mbit")
    proc = sidecar()
    conf = str(ROOT / "hostscripts" / "nvpmodel.conf")
    wait_for(lambda: len(calls(host)) >= 2, 5, "first settings applied")
    assert calls(host) == [f"nvpmodel -f {conf} -m 1", "ares-shape eth9 127.0.0.1 20mbit"]

    # A change is applied within 2 s.
    set_annotations(host["annotations"], power_mode="custom1", bandwidth="8Mbit")
    changed = time.monotonic()
    wait_for(lambda: len(calls(host)) >= 4, 2.0, "changed annotations applied")
    assert time.monotonic() - changed < 2.0
    assert calls(host)[2:] == [f"nvpmodel -f {conf} -m 2", "ares-shape eth9 127.0.0.1 8mbit"]

    # Bad values: refused, nothing run, last good settings kept and reported.
    set_annotations(host["annotations"], power_mode="turbo", bandwidth="lots")
    report = wait_for(lambda: len(hostctl(host).get("refusals", [])) == 2 and hostctl(host),
                      3, "refusals reported")
    assert {r["annotation"] for r in report["refusals"]} == {ANN_POWER_MODE, ANN_BANDWIDTH}
    assert report["applied"] == {"power_mode": "custom1", "bandwidth": "8mbit",
                                 "server_ip": "127.0.0.1"}
    time.sleep(0.5)  # a few more polls: still nothing run
    assert len(calls(host)) == 4

    # Lifting the cap runs ares-unshape.
    set_annotations(host["annotations"], power_mode="custom1", bandwidth="unlimited")
    wait_for(lambda: len(calls(host)) >= 5, 2.0, "cap lifted")
    assert calls(host)[4] == "ares-unshape eth9"

    # Power readings reach the shared file and follow the sensor.
    reading = wait_for(lambda: read_power_file(host["state"] / "power.json"), 3, "power.json")
    assert reading.power_mw == 4205.0 and reading.source == "ina3221"
    host["sysfs"].write_text("2396\n")
    reading = wait_for(
        lambda: (r := read_power_file(host["state"] / "power.json")) and r.power_mw == 2396.0 and r,
        3, "new power reading")
    assert reading.energy_j > 0

    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "refused ares.io/power-mode='turbo'" in out and "keeping last good value 'custom1'" in out
    assert out.count("refused ares.io/bandwidth='lots'") == 1, "refusal logged once, not per poll"
    assert "applied power_mode=custom1" in out


def test_sidecar_without_nvpmodel_refuses_power_modes(fake_host, sidecar):
    host = fake_host
    (host["bin"] / "nvpmodel").unlink()
    set_annotations(host["annotations"], power_mode="5W", bandwidth="unlimited")
    proc = sidecar("--nvpmodel", "nvpmodel-absent", "--power-path", str(host["sysfs"]) + ".none")
    report = wait_for(lambda: hostctl(host).get("refusals") and hostctl(host), 5, "refusal")
    assert report["refusals"][0]["annotation"] == ANN_POWER_MODE
    assert "power modes work only on a Jetson" in report["refusals"][0]["reason"]
    assert report["power_source"] is None
    assert wait_for(lambda: calls(host), 3, "unshape") == ["ares-unshape eth9"]
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    assert "no power monitor" in out
    assert not (host["state"] / "power.json").exists()


def test_sidecar_retries_a_failed_command_only_after_backoff(fake_host, sidecar):
    host = fake_host
    failing = host["bin"] / "nvpmodel"
    failing.write_text(RECORDER.format(log=host["calls"], extra="echo busy >&2; exit 1"))
    set_annotations(host["annotations"], power_mode="MAXN")
    proc = sidecar()
    report = wait_for(lambda: hostctl(host).get("history") and hostctl(host), 5, "failure")
    assert report["history"][0]["ok"] is False and report["history"][0]["detail"] == "busy"
    assert report["applied"]["power_mode"] is None
    time.sleep(0.8)  # four polls
    assert sum(c.startswith("nvpmodel") for c in calls(host)) == 1
    proc.terminate()
    proc.wait(timeout=10)
