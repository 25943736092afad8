"""A "device" in a Linux network namespace, wired to the root namespace by a veth pair.

Tests and the testbed use it to give each emulated device its own link whose
bandwidth can be capped in both directions and changed while traffic flows.
Shaping goes through ``hostscripts/ares-shape``, the script a person runs on a
real device, so what we test is what we ship:

* device -> server: egress of the device-side veth, matched on the server address;
* server -> device: egress of the root-side veth, matched on the device address.

In each direction small packets (TCP ACKs, SYN, FIN) have an htb class of their own, served
first: without it the ACKs of one direction's transfer queue behind the other direction's data,
and a link saturated both ways carries neither at its full rate.

A half-duplex link (Wi-Fi: up and down share the air time) is emulated with `shape_shared`:
both directions of the device's traffic with the server are redirected, inside its namespace,
through one ifb device whose htb class holds the one rate (small packets first there too). That
is testbed emulation only; a real device's link is half duplex by nature, so no host script
does it.

Index ``i`` gets namespace ``ares-ns<i>``, interfaces ``ares-h<i>`` (root side)
and ``ares-d<i>`` (device side), and the /30 ``10.231.<i>.0``: root side ``.1``,
device side ``.2``. Every name starts with ``ares-`` so leftovers of a crashed
run can be found and removed (``cleanup_leftovers``).

A run names what it makes after itself: with an owner tag ``t`` (``owner_tag()``, this process's)
the names are ``ares-ns<i>-<t>``, ``ares-h<i>-<t>``, ``ares-d<i>-<t>`` and ``ares-i<i>-<t>``. The
tag comes with a lease, an abstract unix socket ``ares-owner-<t>`` that the kernel removes when the
process ends, however it ends (SIGKILL too): ``owner_alive(t)`` asks for it. So a new namespace
refuses an index a running run holds (their addresses would collide), takes over the one a dead
run left, and ``remove_orphans`` removes exactly what dead runs left and nothing else.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from ares.runtime.hostscripts import hostscript

PREFIX = "ares-"
MAX_INDEX = 255
MAX_OWNER = 5  # "ares-h255-" + 5 characters: the 15 an interface name may have
# ares-ns3, ares-h3-1b2c: kind, index, and the owner tag where there is one
_NAME = re.compile(r"^ares-(ns|h|d|i)(\d{1,3})(?:-([0-9a-z]{1,%d}))?$" % MAX_OWNER)


# The largest super-packet a testbed veth hands its shaper (see DeviceNamespace._create).
GSO_MAX_BYTES = 16384
# The TCP payload of a full frame as htb counts it: MSS 1448 (with timestamps) of a 1514-byte
# Ethernet frame. The kernel counts a super-packet's length with one set of headers per segment
# it will become, so a link capped at R carries R x this of payload, as a real link does
# (tests/host measure it).
TCP_PAYLOAD_SHARE = 1448 / 1514
# On a half-duplex (shared-rate) link the ACKs go the other way on the same rate: one 66-byte
# frame per two full ones (delayed ACKs) takes 2% of it.
HALF_DUPLEX_ACK_SHARE = 66 / (2 * 1514 + 66)


class NetnsError(RuntimeError):
    """The machine cannot host network namespaces (not root, no ip/tc) or a command failed."""


@dataclass(frozen=True)
class NetnsPlan:
    """Names and addresses for one emulated device (pure data, no I/O)."""

    index: int
    namespace: str
    host_if: str
    device_if: str
    host_addr: str
    device_addr: str
    prefix_len: int = 30
    shared_if: str = ""  # the ifb of a half-duplex (shared-rate) link, inside the namespace


def plan(index: int, owner: str = "") -> NetnsPlan:
    """Names and addresses for device ``index`` (0..255); names end in ``-<owner>`` when given."""
    if not 0 <= index <= MAX_INDEX:
        raise ValueError(f"index must be in 0..{MAX_INDEX}, got {index}")
    if owner and not re.fullmatch(r"[0-9a-z]{1,%d}" % MAX_OWNER, owner):
        raise ValueError(f"owner tag must be 1..{MAX_OWNER} of 0-9 a-z, got {owner!r}")
    end = f"-{owner}" if owner else ""
    return NetnsPlan(
        index=index,
        namespace=f"{PREFIX}ns{index}{end}",
        host_if=f"{PREFIX}h{index}{end}",
        device_if=f"{PREFIX}d{index}{end}",
        host_addr=f"10.231.{index}.1",
        device_addr=f"10.231.{index}.2",
        shared_if=f"{PREFIX}i{index}{end}",
    )


def parse_name(name: str) -> Optional[tuple[str, int, str]]:
    """(kind, index, owner tag or "") of a name this module gives; None for any other name."""
    m = _NAME.match(name)
    return (m.group(1), int(m.group(2)), m.group(3) or "") if m else None


# ---- the owner tag and its lease ------------------------------------------------------------

_lease: Optional[socket.socket] = None
_tag = ""


def _lease_address(tag: str) -> str:
    return f"\0ares-owner-{tag}"


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if not n:
            return out


def owner_tag() -> str:
    """This process's tag (its pid in base 36), held by a lease for as long as the process lives.
    The lease socket is never inherited by children. Without abstract unix sockets (not Linux)
    the tag has no lease: `owner_alive` then never calls it gone."""
    global _lease, _tag
    if _tag:
        return _tag
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    candidates = [_base36(os.getpid())] + [_base36(int.from_bytes(os.urandom(4), "big"))[-MAX_OWNER:] for _ in range(8)]
    for tag in candidates:
        try:
            sock.bind(_lease_address(tag))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                continue  # held by a live process in another pid namespace, or a random clash
            sock.close()  # no abstract sockets here
            _tag = candidates[0]
            return _tag
        _lease, _tag = sock, tag
        return tag
    sock.close()
    raise NetnsError("could not take an owner lease (abstract unix socket ares-owner-*)")


def owner_alive(tag: str) -> bool:
    """Whether the process that holds ``tag`` still runs (its lease is there)."""
    if tag == _tag:
        return True
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(_lease_address(tag))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True  # anything else: assume alive, never remove a live run's objects
        return True


def require_tools() -> None:
    """Raise ``NetnsError`` saying what is missing: root, ``ip`` or ``tc``."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise NetnsError(f"{' and '.join(missing)} not found: install iproute2")
    if os.geteuid() != 0:
        raise NetnsError("network namespaces need root (run as root or with sudo)")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


class DeviceNamespace:
    """Context manager: create the namespace and veth pair, tear them down on exit.

    With an ``owner`` tag (``owner_tag()``) its names carry it; without, the plain names."""

    def __init__(self, index: int, owner: str = "") -> None:
        self.owner = owner
        self.plan = plan(index, owner)

    def __enter__(self) -> "DeviceNamespace":
        self.create()
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def create(self) -> None:
        """Make the namespace and its veth pair; on any failure (or interruption) nothing is left."""
        require_tools()
        self._clear_index()
        try:
            self._create()
        except BaseException:
            self.teardown()
            raise

    def _clear_index(self) -> None:
        """Remove what earlier runs left at this index (our own names: a crashed run with the same
        index; another owner's: only when that run is gone); a running run's index is refused."""
        index = self.plan.index
        for kind, names in (("link", _links()), ("netns", _netns_names())):
            for name in names:
                parsed = parse_name(name)
                if parsed is None or parsed[1] != index or name in (self.plan.namespace, self.plan.host_if):
                    continue
                owner = parsed[2]
                if owner and owner_alive(owner):
                    raise NetnsError(f"index {index} is in use by another running ARES run ({name}); "
                                     "choose another index (ares bench --ns-index)")
                if kind == "link":
                    _ip("link", "del", name, check=False)
                else:
                    _remove_netns(name)
        self.teardown()  # our own names

    def _create(self) -> None:
        p = self.plan
        _ip("netns", "add", p.namespace)
        _ip("link", "add", p.host_if, "type", "veth", "peer", "name", p.device_if)
        _ip("link", "set", p.device_if, "netns", p.namespace)
        _ip("addr", "add", f"{p.host_addr}/{p.prefix_len}", "dev", p.host_if)
        _ip("link", "set", p.host_if, "up")
        _ip("-n", p.namespace, "addr", "add", f"{p.device_addr}/{p.prefix_len}", "dev", p.device_if)
        _ip("-n", p.namespace, "link", "set", p.device_if, "up")
        _ip("-n", p.namespace, "link", "set", "lo", "up")
        # Small super-packets through the shaper: with the default GSO a veth hands htb 64 KB
        # super-packets, each sent whole on the tokens of the moment, so every transfer after an
        # idle moment got ~40 KB through at once (a 100 KB reply crossed a 4 Mbit/s link at 6).
        # One packet per segment (gso_max_segs 1) is faithful but costs ~40x the packets, CPU the
        # emulated devices need; 16 KB bursts keep both link estimates within 30% (tests/host).
        _ip("link", "set", "dev", p.host_if, "gso_max_size", str(GSO_MAX_BYTES))
        _ip("-n", p.namespace, "link", "set", "dev", p.device_if, "gso_max_size", str(GSO_MAX_BYTES))

    def teardown(self) -> None:
        """Remove the veth pair and the namespace, ending any process still inside it (a namespace
        a process holds would outlive its name); fine to call when they are absent."""
        # Deleting either end of a veth pair deletes both.
        _ip("link", "del", self.plan.host_if, check=False)
        _remove_netns(self.plan.namespace)

    def exec_args(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` prefixed so that it runs inside the namespace."""
        return ["ip", "netns", "exec", self.plan.namespace, *cmd]

    def run(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside the namespace (``subprocess.run`` keywords apply)."""
        return subprocess.run(self.exec_args(cmd), **kwargs)

    def popen(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start ``cmd`` inside the namespace without waiting for it."""
        return subprocess.Popen(self.exec_args(cmd), **kwargs)

    def shape(self, up: Optional[str] = None, down: Optional[str] = None) -> None:
        """Cap device->server at ``up`` and server->device at ``down`` (None: no cap).

        Call again at any time to change the rates.
        """
        p = self.plan
        self._unshare()
        self.apply_rate(self.exec_args, p.device_if, p.host_addr, up)
        self.apply_rate(list, p.host_if, p.device_addr, down)

    def shape_shared(self, kbit: int) -> None:
        """Half duplex: device->server and server->device together at most `kbit` kbit/s.
        Replaces any per-direction cap; `shape` replaces this one."""
        if kbit < 1:
            raise ValueError(f"rate must be at least 1 kbit/s, got {kbit}")
        p = self.plan
        self.apply_rate(self.exec_args, p.device_if, p.host_addr, None)
        self.apply_rate(list, p.host_if, p.device_addr, None)
        tc = self._tc_in_ns
        if self.run(["ip", "link", "show", p.shared_if], capture_output=True).returncode != 0:
            _ip("-n", p.namespace, "link", "add", p.shared_if, "type", "ifb")
            # an ifb queues 32 packets (a veth 1,000): with both directions' streams in it, the
            # 32-packet queues under htb's classes overflowed, and TCP's retransmission timeouts
            # stalled single transfers for seconds (a half-duplex upload estimate read 0.3x the rate)
            _ip("-n", p.namespace, "link", "set", p.shared_if, "txqueuelen", "1000")
            _ip("-n", p.namespace, "link", "set", p.shared_if, "up")
            tc("qdisc", "replace", "dev", p.shared_if, "root", "handle", "1:", "htb")
            tc("qdisc", "replace", "dev", p.device_if, "clsact")
            # both directions of the traffic with the server go through the one ifb's queue ...
            for hook, field in (("egress", "dst"), ("ingress", "src")):
                tc("filter", "replace", "dev", p.device_if, hook, "protocol", "ip", "prio", "1", "u32", "match",
                   "ip", field, f"{p.host_addr}/32", "action", "mirred", "egress", "redirect", "dev", p.shared_if)
            # ... where small packets (either way; IPv4 total length under 128 bytes: every pure ACK,
            # SYN, FIN) come first, as in ares-shape, so neither direction's ACKs wait behind data ...
            tc("filter", "replace", "dev", p.shared_if, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
               "match", "u16", "0x0000", "0xff80", "at", "2", "flowid", "1:10")
            # ... and each direction has a class: half the rest guaranteed, all of it when the other is idle
            for classid, field in (("1:11", "dst"), ("1:12", "src")):
                tc("filter", "replace", "dev", p.shared_if, "parent", "1:", "protocol", "ip", "prio", "2",
                   "u32", "match", "ip", field, f"{p.host_addr}/32", "flowid", classid)
        small = max(1, kbit // 10)
        tc("class", "replace", "dev", p.shared_if, "parent", "1:", "classid", "1:1", "htb",
           "rate", f"{kbit}kbit", "ceil", f"{kbit}kbit", "quantum", "60000")
        tc("class", "replace", "dev", p.shared_if, "parent", "1:1", "classid", "1:10", "htb", "prio", "0",
           "rate", f"{small}kbit", "ceil", f"{kbit}kbit", "quantum", "60000")
        for classid in ("1:11", "1:12"):
            tc("class", "replace", "dev", p.shared_if, "parent", "1:1", "classid", classid, "htb",
               "prio", "1", "rate", f"{max(1, (kbit - small) // 2)}kbit", "ceil", f"{kbit}kbit",
               "quantum", "60000")

    def _unshare(self) -> None:
        """Remove a shared-rate link's redirects and ifb; nothing when there are none."""
        p = self.plan
        self.run(["tc", "qdisc", "del", "dev", p.device_if, "clsact"], capture_output=True)
        self.run(["ip", "link", "del", p.shared_if], capture_output=True)

    def _tc_in_ns(self, *args: str) -> None:
        result = self.run(["tc", *args], capture_output=True, text=True)
        if result.returncode != 0:
            raise NetnsError(f"tc {' '.join(args)} failed: {result.stderr.strip()}")

    @staticmethod
    def apply_rate(wrap: Any, iface: str, addr: str, rate: Optional[str]) -> None:
        if rate is None:
            cmd = [str(hostscript("ares-unshape")), iface]
        else:
            cmd = [str(hostscript("ares-shape")), iface, addr, rate]
        result = subprocess.run(wrap(cmd), capture_output=True, text=True)
        if result.returncode != 0:
            raise NetnsError(f"{' '.join(cmd)} failed: {result.stderr.strip()}")


def _links() -> list[str]:
    """The names of the root namespace's links ("7: ares-h0-1b@if6: <...> ..." -> "ares-h0-1b")."""
    out = _ip("-o", "link", "show", check=False).stdout
    return [line.split(":", 2)[1].strip().split("@", 1)[0] for line in out.splitlines() if line.count(":") >= 2]


def _netns_names() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines() if line.split()]


def _remove_netns(name: str) -> None:
    """End what still runs inside namespace ``name`` (SIGKILL), then delete it; quiet when absent."""
    if not os.path.exists(f"/run/netns/{name}"):
        return
    for pid in _ip("netns", "pids", name, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    _ip("netns", "del", name, check=False)


def remove_orphans(alive: Callable[[str], bool] = owner_alive) -> list[str]:
    """Delete every namespace and root-namespace link named by an owner tag whose run has ended
    (``alive(tag)`` false): what a SIGKILLed run left. Names without a tag, and every other
    name on the host, are left alone. Returns what was removed."""
    require_tools()
    removed = []
    gone: dict[str, bool] = {}

    def orphan(name: str) -> bool:
        parsed = parse_name(name)
        if parsed is None or not parsed[2]:
            return False
        if parsed[2] not in gone:
            gone[parsed[2]] = not alive(parsed[2])
        return gone[parsed[2]]

    for name in _links():
        if orphan(name) and _ip("link", "del", name, check=False).returncode == 0:
            removed.append(name)
    for name in _netns_names():
        if orphan(name):
            _remove_netns(name)
            removed.append(name)
    return removed


def cleanup_leftovers(prefix: str = PREFIX) -> list[str]:
    """Delete every namespace and root-namespace link whose name starts with ``prefix``.

    For crashed runs: it does not know who owns them, so call it only when no
    other run on this machine uses the prefix. Returns what was removed.
    """
    if not prefix:
        raise ValueError("refusing an empty prefix: it would match every interface")
    require_tools()
    removed = []
    for line in _ip("-o", "link", "show").stdout.splitlines():
        # "7: ares-h0@if6: <BROADCAST,...> ..." -> "ares-h0"
        name = line.split(":", 2)[1].strip().split("@", 1)[0]
        if name.startswith(prefix) and _ip("link", "del", name, check=False).returncode == 0:
            removed.append(name)
    for line in _ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(prefix) and _ip("netns", "del", name, check=False).returncode == 0:
            removed.append(name)
    return removed
