"""hostscripts/ares-shape and ares-unshape on real veth links in network namespaces.

Rates are measured as TCP payload delivered, so they sit a few percent under the
configured wire rate (TCP/IP headers); the issue allows 10%.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ares.runtime.hostscripts import hostscript
from ares.runtime.netns import DeviceNamespace, NetnsError, plan
from tests.support import payload_mbit

SECONDS = 3.0
TRANSFER = str(Path(__file__).with_name("transfer.py"))


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
    assert upload(device_ns) == pytest.approx(payload_mbit(20), rel=0.10)
    device_ns.shape(up="8mbit")  # changed while the qdisc is in place
    assert upload(device_ns) == pytest.approx(payload_mbit(8), rel=0.10)


@pytest.mark.host
@pytest.mark.ns_index(211)
def test_download_cap_is_independent_of_upload(device_ns, download):
    device_ns.shape(up="20mbit", down="8Mbit")
    assert download(device_ns) == pytest.approx(payload_mbit(8), rel=0.10)


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
    assert filters.count("flowid 1:11") == 1 and filters.count("flowid 1:12") == 1
    assert classes.count("class htb") == 3 and "rate 8Mbit" in classes
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
def test_both_veth_ends_hand_the_shaper_small_super_packets(device_ns):
    """64 KB super-packets made htb bursty (tests/host/test_upload_estimate.py); check the cap
    the kernel holds on each end, as `ip -d` reports it."""
    from ares.runtime.netns import GSO_MAX_BYTES

    p = device_ns.plan
    ends = (["ip", "-d", "-j", "link", "show", p.host_if],
            ["ip", "-n", p.namespace, "-d", "-j", "link", "show", p.device_if])
    for cmd in ends:
        (link,) = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        assert link["gso_max_size"] == GSO_MAX_BYTES == 16384


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
        ns.apply_rate(list, "lo", "127.0.0.1", "fast")


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
        (["eth0", "10.43.0.10", "0.5kbit"], "under 1kbit"),
    ],
    ids=["none", "two", "iface", "octet", "hostname", "bytes-unit", "no-unit", "zero", "sub-kbit"],
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
    assert upload(device_ns, seconds=2.0) == pytest.approx(payload_mbit(16), rel=0.10)
    assert download(device_ns, seconds=2.0) == pytest.approx(payload_mbit(16), rel=0.10)
    up, down = both()
    # one rate for the two directions (the two transfers start a few 100 ms apart, and each has the
    # link alone for that while: so a margin above 16, still well under full duplex's ~2 x 16)
    assert 16 * 0.85 < up + down < 16 * 1.3
    assert min(up, down) > 3  # and neither is starved
    device_ns.shape(up="16mbit", down="16mbit")
    # full duplex again: no ifb, no redirect, one cap per direction on its own veth end (that two
    # saturating flows then both run at full rate: test_full_duplex_link_carries_both_directions_...)
    p = device_ns.plan
    assert device_ns.run(["ip", "link", "show", p.shared_if], capture_output=True).returncode != 0
    qdiscs = device_ns.run(["tc", "qdisc", "show", "dev", p.device_if], capture_output=True, text=True).stdout
    assert "clsact" not in qdiscs and "htb" in qdiscs
    down_classes = subprocess.run(["tc", "class", "show", "dev", p.host_if], capture_output=True, text=True).stdout
    up_classes = device_ns.run(["tc", "class", "show", "dev", p.device_if], capture_output=True, text=True).stdout
    assert "rate 16Mbit" in up_classes and "rate 16Mbit" in down_classes


# ---- small packets (TCP ACKs) first ------------------------------------------------------------


def tc_json(wrap, *args: str) -> list:
    """``tc -j ARGS`` parsed. A u32 filter repeats its "match" key once per match, so "match" is
    read as a list."""
    def pairs(items: list[tuple]) -> dict:
        out: dict = {}
        for key, value in items:
            if key == "match":
                out.setdefault(key, []).append(value)
            else:
                out[key] = value
        return out

    result = subprocess.run(wrap(["tc", "-j", *args]), capture_output=True, text=True, check=True)
    return json.loads(result.stdout, object_pairs_hook=pairs)


def u32_filters(wrap, iface: str) -> list[tuple[str, int, str, list[tuple[int, int, int]]]]:
    """(protocol, pref, flowid, [(value, mask, offset), ...]) per u32 filter, in evaluation order."""
    rows = []
    for f in tc_json(wrap, "filter", "show", "dev", iface, "parent", "1:"):
        opts = f.get("options", {})
        if "flowid" in opts:
            rows.append((f["protocol"], f["pref"], opts["flowid"],
                         [(int(m["value"], 16), int(m["mask"], 16), m["off"]) for m in opts["match"]]))
    return sorted(rows, key=lambda row: row[1])  # tc lists by pref; within one, u32 order is kept


CLASS_LINE = re.compile(r"class htb (\S+) (?:root|parent (\S+))(?: leaf \S+)?(?: prio (\d+))? "
                        r"rate (\S+) ceil (\S+).*?\n Sent (\d+) bytes (\d+) pkt", re.S)


def htb_classes(wrap, iface: str) -> dict[str, dict]:
    """classid -> parent, prio, rate, ceil, bytes, packets. From text: tc 6.1 prints htb classes as
    text even under -j."""
    out = subprocess.run(wrap(["tc", "-s", "class", "show", "dev", iface]),
                         capture_output=True, text=True, check=True).stdout
    return {m[0]: {"parent": m[1] or "root", "prio": int(m[2]) if m[2] else None, "rate": m[3],
                   "ceil": m[4], "bytes": int(m[5]), "packets": int(m[6])}
            for m in CLASS_LINE.findall(out)}


def layout(classes: dict[str, dict]) -> dict[str, tuple]:
    return {cid: (c["parent"], c["prio"], c["rate"], c["ceil"]) for cid, c in classes.items()}


@pytest.mark.host
@pytest.mark.ns_index(217)
def test_shape_gives_small_packets_a_class_served_first(device_ns):
    """Both ends, IPv4: the cap's class holds a prio-0 class for small packets (a tenth guaranteed)
    and the bulk class; filters send packets to the server under 128 bytes to the first, the rest
    to the second, in that order. Rerunning, and changing the rate, keep that shape."""
    p = device_ns.plan
    device_ns.shape(up="8mbit", down="8mbit")
    device_ns.shape(up="16mbit", down="8Mbit")
    for wrap, iface, addr, rate, small, bulk in (
        (device_ns.exec_args, p.device_if, p.host_addr, "16Mbit", "1600Kbit", "14400Kbit"),
        (list, p.host_if, p.device_addr, "8Mbit", "800Kbit", "7200Kbit"),
    ):
        (qdisc,) = [q for q in tc_json(wrap, "qdisc", "show", "dev", iface) if q.get("root")]
        assert (qdisc["kind"], qdisc["handle"], qdisc["options"]["default"]) == ("htb", "1:", "0")
        assert layout(htb_classes(wrap, iface)) == {
            "1:10": ("root", None, rate, rate),
            "1:11": ("1:10", 0, small, rate),
            "1:12": ("1:10", 1, bulk, rate),
        }
        to_server = (int(ipaddress.IPv4Address(addr)), 0xFFFFFFFF, 16)  # IPv4 destination
        under_128 = (0, 0xFF80, 0)  # total length, the low half of the header's first word
        assert u32_filters(wrap, iface) == [
            ("ip", 1, "1:11", [to_server, under_128]),
            ("ip", 1, "1:12", [to_server]),
        ]


@pytest.mark.host
@pytest.mark.ns_index(219)
def test_small_packet_filters_sort_real_packets_by_size(device_ns):
    """UDP datagrams at the size boundary, IPv4 then IPv6, counted per class: total length 127
    (IPv4) or payload length 63 (IPv6) is small, one byte more is bulk; switching family leaves
    no filter of the other one behind."""
    p = device_ns.plan
    host6, device6 = f"fd00:ace:{p.index}::1", f"fd00:ace:{p.index}::2"
    subprocess.run(["ip", "-6", "addr", "add", f"{host6}/64", "dev", p.host_if, "nodad"], check=True)
    device_ns.run(["ip", "-6", "addr", "add", f"{device6}/64", "dev", p.device_if, "nodad"], check=True)
    shape = str(hostscript("ares-shape"))

    def send(host: str, sizes: list[int]) -> None:
        code = ("import socket, sys\n"
                "family = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET\n"
                "s = socket.socket(family, socket.SOCK_DGRAM)\n"
                "for n in sys.argv[2:]: s.sendto(bytes(int(n)), (sys.argv[1], 9))\n")
        device_ns.run([sys.executable, "-c", code, host, *map(str, sizes)], check=True)

    def packets() -> tuple[int, int]:
        classes = htb_classes(device_ns.exec_args, p.device_if)
        return classes["1:11"]["packets"], classes["1:12"]["packets"]

    for host, header, limit, filters in (
        (p.host_addr, 20 + 8, 128, [("ip", 1, "1:11"), ("ip", 1, "1:12")]),
        (host6, 8, 64, [("ipv6", 2, "1:11"), ("ipv6", 2, "1:12")]),  # IPv6 counts payload only
    ):
        device_ns.run([shape, p.device_if, host, "16mbit"], check=True, capture_output=True)
        assert [row[:3] for row in u32_filters(device_ns.exec_args, p.device_if)] == filters
        before = packets()
        send(host, [limit - 1 - header] * 3 + [limit - header] * 2 + [1000])
        after = packets()
        assert (after[0] - before[0], after[1] - before[1]) == (3, 3)


def _bytes_at(samples: list[list[float]], t: float) -> float:
    """Bytes received by time ``t``, interpolated between a transfer's samples."""
    for (t0, b0), (t1, b1) in zip(samples, samples[1:]):
        if t0 <= t <= t1:
            return b0 + (b1 - b0) * (t - t0) / (t1 - t0) if t1 > t0 else b1
    return samples[-1][1] if t > samples[-1][0] else samples[0][1]


DUPLEX_MBIT = 4
DUPLEX_SECONDS = 8.0
SMALL_WINDOW = 64 * 1024  # HTTP/2's default stream window


@pytest.mark.host
@pytest.mark.ns_index(218)
@pytest.mark.parametrize("windowed", ["up", "down"])
def test_full_duplex_link_carries_both_directions_at_full_rate(device_ns, windowed):
    """Two saturating TCP flows, one each way, at once: each gets its direction's full rate.

    One flow keeps at most SMALL_WINDOW in flight (an HTTP/2 stream at the default window), the
    other as much as TCP likes, sent with cubic (Linux's default, which fills its queue). Without
    a class for ACKs, the ACKs of one flow wait behind the other's queued data, and the slower
    flow ran at 44-74% of its rate (18 runs); with it, both at 96%. Both flows are counted over
    the same seconds (one clock in every namespace), after a warm-up, so a late start of either
    is not counted."""
    p = device_ns.plan
    device_ns.shape(up=f"{DUPLEX_MBIT}mbit", down=f"{DUPLEX_MBIT}mbit")
    window = {"up": "0", "down": "0", windowed: str(SMALL_WINDOW)}
    receivers = {
        "up": subprocess.Popen([sys.executable, TRANSFER, "recv", "45111", window["up"]],
                               stdout=subprocess.PIPE, text=True),
        "down": device_ns.popen([sys.executable, TRANSFER, "recv", "45112", window["down"]],
                                stdout=subprocess.PIPE, text=True),
    }
    try:
        assert all(r.stdout.readline().strip() == "ready" for r in receivers.values())
        senders = [
            device_ns.popen([sys.executable, TRANSFER, "send", p.host_addr, "45111",
                             str(DUPLEX_SECONDS), "cubic"]),
            subprocess.Popen([sys.executable, TRANSFER, "send", p.device_addr, "45112",
                              str(DUPLEX_SECONDS), "cubic"]),
        ]
        assert [s.wait(timeout=DUPLEX_SECONDS + 30) for s in senders] == [0, 0]
        samples = {name: json.loads(r.communicate(timeout=30)[0])["samples"]
                   for name, r in receivers.items()}
    finally:
        for r in receivers.values():
            if r.poll() is None:
                r.kill()
                r.wait()
    start = max(s[0][0] for s in samples.values()) + 2.0  # both flowing, past slow start
    end = min(s[-1][0] for s in samples.values()) - 0.5
    assert end - start > 3.0, "the two transfers hardly overlapped"
    mbit = {name: (_bytes_at(s, end) - _bytes_at(s, start)) * 8 / (end - start) / 1e6
            for name, s in samples.items()}
    assert min(mbit.values()) >= 0.85 * DUPLEX_MBIT, f"{mbit} Mbit/s over {end - start:.1f} s"
    # and the ACKs did take the small packets' class, both ways
    for wrap, iface in ((device_ns.exec_args, p.device_if), (list, p.host_if)):
        classes = htb_classes(wrap, iface)
        assert classes["1:11"]["packets"] > 20, classes  # GRO makes one ACK of many
        assert classes["1:11"]["bytes"] < 128 * classes["1:11"]["packets"]
        assert classes["1:12"]["bytes"] > 0.8 * DUPLEX_MBIT * 1e6 / 8 * DUPLEX_SECONDS * 0.5


@pytest.mark.host
@pytest.mark.ns_index(222)
def test_shared_rate_link_serves_small_packets_first(device_ns):
    """Half duplex: in the one ifb, small packets of either direction have a prio-0 class ahead of
    the two directions' classes, and its filter comes first."""
    p = device_ns.plan
    device_ns.shape_shared(16000)
    device_ns.shape_shared(8000)  # a rate change keeps the shape
    assert layout(htb_classes(device_ns.exec_args, p.shared_if)) == {
        "1:1": ("root", None, "8Mbit", "8Mbit"),
        "1:10": ("1:1", 0, "800Kbit", "8Mbit"),
        "1:11": ("1:1", 1, "3600Kbit", "8Mbit"),
        "1:12": ("1:1", 1, "3600Kbit", "8Mbit"),
    }
    host = int(ipaddress.IPv4Address(p.host_addr))
    assert u32_filters(device_ns.exec_args, p.shared_if) == [
        ("ip", 1, "1:10", [(0, 0xFF80, 0)]),
        ("ip", 2, "1:11", [(host, 0xFFFFFFFF, 16)]),
        ("ip", 2, "1:12", [(host, 0xFFFFFFFF, 12)]),
    ]
