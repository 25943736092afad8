"""hostscripts/ares-shape and ares-unshape on real veth links in network namespaces.

Rates are measured as TCP payload delivered, so they sit a few percent under the
configured wire rate (TCP/IP headers); the issue allows 10%.
"""

from __future__ import annotations

import subprocess

import pytest

from ares.runtime.hostscripts import hostscript
from ares.runtime.netns import DeviceNamespace, NetnsError, plan

SECONDS = 3.0


@pytest.fixture
def upload(measure_mbit):
    """Device -> server rate in Mbit/s (receiver in the root namespace)."""

    def run(ns: DeviceNamespace, seconds: float = SECONDS, host: str | None = None) -> float:
        return measure_mbit(list, ns.exec_args, host or ns.plan.host_addr, 45101, seconds)

    return run


@pytest.fixture
def download(measure_mbit):
    """Server -> device rate in Mbit/s (receiver inside the namespace)."""

    def run(ns: DeviceNamespace, seconds: float = SECONDS) -> float:
        return measure_mbit(ns.exec_args, list, ns.plan.device_addr, 45102, seconds)

    return run


@pytest.mark.host
@pytest.mark.ns_index(210)
def test_upload_cap_follows_rate_changes(device_ns, upload):
    device_ns.shape(up="20mbit")
    assert upload(device_ns) == pytest.approx(20, rel=0.10)
    device_ns.shape(up="8mbit")  # changed while the qdisc is in place
    assert upload(device_ns) == pytest.approx(8, rel=0.10)


@pytest.mark.host
@pytest.mark.ns_index(211)
def test_download_cap_is_independent_of_upload(device_ns, download):
    device_ns.shape(up="20mbit", down="8Mbit")
    assert download(device_ns) == pytest.approx(8, rel=0.10)


@pytest.mark.host
@pytest.mark.ns_index(212)
def test_unshape_lifts_the_cap(device_ns, upload):
    device_ns.shape(up="8mbit")
    device_ns.shape(up=None)
    assert upload(device_ns, seconds=1.0) > 80  # veth runs at Gbit/s; 10x the cap at least
    tc = device_ns.run(["tc", "qdisc", "show", "dev", device_ns.plan.device_if],
                       capture_output=True, text=True, check=True)
    assert "htb" not in tc.stdout


@pytest.mark.host
@pytest.mark.ns_index(213)
def test_only_traffic_to_the_server_is_shaped(device_ns, upload):
    p = device_ns.plan
    other = f"10.232.{p.index}.1"
    subprocess.run(["ip", "addr", "add", f"{other}/32", "dev", p.host_if], check=True)
    device_ns.run(["ip", "route", "add", f"{other}/32", "dev", p.device_if], check=True)
    device_ns.shape(up="8mbit")
    assert upload(device_ns, seconds=1.0, host=other) > 80


@pytest.mark.host
@pytest.mark.ns_index(214)
def test_shape_is_idempotent_and_unshape_repeatable(device_ns):
    p = device_ns.plan
    for _ in range(2):
        device_ns.shape(up="8mbit")
    filters = device_ns.run(["tc", "filter", "show", "dev", p.device_if],
                            capture_output=True, text=True, check=True).stdout
    classes = device_ns.run(["tc", "class", "show", "dev", p.device_if],
                            capture_output=True, text=True, check=True).stdout
    assert filters.count("flowid 1:10") == 1
    assert classes.count("class htb") == 1 and "rate 8Mbit" in classes
    for _ in range(2):
        device_ns.shape(up=None)


@pytest.mark.host
def test_unshape_leaves_foreign_qdisc_alone(device_ns):
    iface = device_ns.plan.device_if
    device_ns.run(["tc", "qdisc", "add", "dev", iface, "root", "handle", "5:", "tbf",
                   "rate", "1mbit", "burst", "32kbit", "latency", "50ms"], check=True)
    out = device_ns.run([str(hostscript("ares-unshape")), iface],
                        capture_output=True, text=True, check=True).stdout
    assert "nothing to do" in out
    qdisc = device_ns.run(["tc", "qdisc", "show", "dev", iface],
                          capture_output=True, text=True, check=True).stdout
    assert "tbf 5:" in qdisc


@pytest.mark.host
def test_context_manager_removes_namespace_and_links(device_ns):
    p = device_ns.plan
    device_ns.__exit__(None, None, None)
    assert p.namespace not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                             text=True).stdout
    assert subprocess.run(["ip", "link", "show", p.host_if], capture_output=True).returncode != 0
    device_ns.teardown()  # again: still fine


def test_plan_names_and_addresses():
    assert plan(7) == plan(7)
    p = plan(7)
    assert (p.namespace, p.host_if, p.device_if) == ("ares-ns7", "ares-h7", "ares-d7")
    assert (p.host_addr, p.device_addr, p.prefix_len) == ("10.231.7.1", "10.231.7.2", 30)
    assert all(len(name) <= 15 for name in (plan(255).host_if, plan(255).device_if))
    with pytest.raises(ValueError, match="0..255"):
        plan(256)


def test_shape_errors_carry_the_script_message():
    """A failing script becomes NetnsError with its stderr, not a silent no-op."""
    ns = DeviceNamespace(215)
    with pytest.raises(NetnsError, match="bad rate"):
        ns._apply(list, "lo", "127.0.0.1", "fast")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "expected 3 arguments"),
        (["eth0", "10.43.0.10"], "expected 3 arguments"),
        (["eth0; rm", "10.43.0.10", "20mbit"], "bad interface name"),
        (["eth0", "10.43.0.256", "20mbit"], "bad server address"),
        (["eth0", "server.local", "20mbit"], "bad server address"),
        (["eth0", "10.43.0.10", "20mbps"], "bad rate"),
        (["eth0", "10.43.0.10", "20"], "bad rate"),
        (["eth0", "10.43.0.10", "0mbit"], "above zero"),
    ],
    ids=["none", "two", "iface", "octet", "hostname", "bytes-unit", "no-unit", "zero"],
)
def test_shape_validates_arguments(args, message):
    result = subprocess.run([str(hostscript("ares-shape")), *args], capture_output=True, text=True)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.parametrize("script", ["ares-shape", "ares-unshape", "ares-power"])
def test_scripts_print_usage(script):
    result = subprocess.run([str(hostscript(script)), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout.startswith(f"Usage: {script}")


def test_unshape_validates_arguments():
    result = subprocess.run([str(hostscript("ares-unshape"))], capture_output=True, text=True)
    assert result.returncode == 2 and "expected 1 argument" in result.stderr


@pytest.mark.parametrize(
    ("content", "rc", "stdout"),
    [("4205\n", 0, "4205\n"), ("4205", 0, "4205\n"), ("abc\n", 2, ""), ("", 2, "")],
    ids=["reading", "no-newline", "garbage", "empty"],
)
def test_power_script_prints_milliwatts(tmp_path, content, rc, stdout):
    sysfs = tmp_path / "in_power0_input"
    sysfs.write_text(content)
    for args in (["--path", str(sysfs)], [f"--path={sysfs}"]):
        result = subprocess.run([str(hostscript("ares-power")), *args], capture_output=True, text=True)
        assert (result.returncode, result.stdout) == (rc, stdout)


def test_power_script_explains_a_missing_monitor(tmp_path):
    result = subprocess.run([str(hostscript("ares-power")), "--path", str(tmp_path / "none")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "cannot read" in result.stderr


@pytest.mark.host
@pytest.mark.ns_index(216)
def test_shared_rate_link_splits_one_rate_between_directions(device_ns, upload, download):
    """Half duplex (testbed emulation): each direction alone gets the rate, both at once share it;
    `shape` afterwards makes the link full duplex again."""
    from concurrent.futures import ThreadPoolExecutor

    def both() -> tuple[float, float]:
        with ThreadPoolExecutor(2) as pool:
            up, down = pool.submit(upload, device_ns), pool.submit(download, device_ns)
            return up.result(), down.result()

    device_ns.shape_shared(16000)
    device_ns.shape_shared(16000)  # idempotent
    assert upload(device_ns, seconds=2.0) == pytest.approx(16, rel=0.10)
    assert download(device_ns, seconds=2.0) == pytest.approx(16, rel=0.10)
    up, down = both()
    # one rate for the two directions (the two transfers start a few 100 ms apart, and each has the
    # link alone for that while: so a margin above 16, still well under full duplex's ~2 x 16)
    assert 16 * 0.85 < up + down < 16 * 1.3
    assert min(up, down) > 3  # and neither is starved
    device_ns.shape(up="16mbit", down="16mbit")
    # full duplex again: no ifb, no redirect, one cap per direction on its own veth end (how fast
    # two saturating flows then go depends on their ACKs queueing behind each other's data, which
    # is no property of the shaping: not asserted)
    p = device_ns.plan
    assert device_ns.run(["ip", "link", "show", p.shared_if], capture_output=True).returncode != 0
    qdiscs = device_ns.run(["tc", "qdisc", "show", "dev", p.device_if], capture_output=True, text=True).stdout
    assert "clsact" not in qdiscs and "htb" in qdiscs
    down_classes = subprocess.run(["tc", "class", "show", "dev", p.host_if], capture_output=True, text=True).stdout
    up_classes = device_ns.run(["tc", "class", "show", "dev", p.device_if], capture_output=True, text=True).stdout
    assert "rate 16Mbit" in up_classes and "rate 16Mbit" in down_classes
