"""Stopping `ares run` and `ares bench` leaves nothing behind, whenever the signal lands.

Each test starts the real command as a subprocess with a marker of its own in the environment
(every descendant inherits it, and an orphan keeps it after it is reparented to 1), waits for a
named moment by watching what the command writes (never a blind sleep), sends one signal, and
asserts within a few seconds that no process carrying the marker is left and, for the tc testbed,
that no network namespace or link appeared that is still there. The moments:

- start-up: the server is being spawned (its log file exists) and is not healthy yet;
- mid-round: a device logged round 0 done, so round 1 runs (`ares run`: its "round 1/3" line);
- between variants: the bench printed the first variant's result line, so the next variant is
  being set up and started (where a stopped bench used to leave that variant's server and every
  namespace behind).

The bench runs with tc links where it can (root, ip and tc), else with in-process ones; the
SIGKILL case needs tc (`host`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Callable, Optional

import pytest
import yaml

from tests.support import ROOT, wait_for

MARK = "ARES_TEST_STOPPING"
NS_INDEX = 150  # the bench's namespaces: 150.. (the host tests use 200..)
# The command unwinds and exits within this: a few seconds when idle; on a loaded 2-core CI machine
# a bench stopped while its server imports torch took over 10 s (children's grace, SIGKILL, the
# namespaces' `ip` commands, its own exit). What is asserted is that everything goes, not how fast.
EXIT_S = 30.0
GONE_S = 5.0  # then nothing of it is left within this

# one emulated device, two rounds of two steps on a tiny synthetic set, two policies
SCENARIO = {
    "name": "stop",
    "training": {"rounds": 2, "batch_size": 20, "max_steps_per_round": 2, "seed": 1},
    "data": {"name": "synthetic", "synthetic_train": 40, "synthetic_test": 20, "seed": 1},
    "devices": [{"name": "pi", "profile": "raspberry-pi", "up_mbps": 40}],
    "policies": ["none", "fixed:1"],
    "profile_scale": 0.1,
    "settle_rounds": 0,
}
RUN = {
    "devices": 1, "mode": "fixed:2", "data": SCENARIO["data"],
    "training": {"rounds": 3, "batch_size": 20, "max_steps_per_round": 2, "seed": 1},  # 2 more after "round 1/3"
}


def tc_skip_reason() -> Optional[str]:
    from tests.support import host_skip_reason

    return host_skip_reason()


def marked(token: str) -> list[int]:
    """Pids of live processes whose environment carries our marker (zombies read empty)."""
    needle = f"{MARK}={token}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            pass
    return found


def ares_network() -> set[str]:
    """Names of the host's ares-* network namespaces and root-namespace links."""
    if tc_skip_reason():
        return set()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.splitlines()
    names = {line.split(":", 2)[1].strip().split("@", 1)[0] for line in links if line.count(":") >= 2}
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()
    names |= {line.split()[0] for line in netns if line.split()}
    return {n for n in names if n.startswith("ares-")}


class Command:
    """An `ares` subcommand as a real process, its output collected line by line."""

    def __init__(self, args: list[str], tmp: Path):
        self.token = uuid.uuid4().hex
        self.network_before = ares_network()
        self.lines: list[str] = []
        env = {**os.environ, MARK: self.token, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        # SIGINT as a terminal's Ctrl-C finds it: not ignored, whatever this process inherited (a
        # background job of a non-interactive shell, as a CI runner may start the suite, ignores
        # SIGINT, and a command keeps a signal ignored at its start ignored).
        self.proc = subprocess.Popen([sys.executable, "-m", "ares", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, cwd=tmp, env=env,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_until(self, moment: Callable[[], bool], what: str, timeout: float = 120) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"ended (code {self.proc.returncode}) before {what}:\n{self.output()}")
            return moment()

        wait_for(ready, timeout, what, details=self.output)

    def printed(self, text: str) -> Callable[[], bool]:
        return lambda: any(text in line for line in self.lines)

    def stop(self, signum: int) -> int:
        """Send `signum`; the command's exit code (it must end within a few seconds)."""
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout=EXIT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {EXIT_S:g} s after {signal.Signals(signum).name}:\n{self.output()}")

    def left_behind(self) -> tuple[list[int], set[str]]:
        return marked(self.token), ares_network() - self.network_before

    def assert_stopped_cleanly(self, signum: int) -> None:
        """`signum` ends the command within a few seconds, and nothing of it is left a moment later;
        it says so in its exit code (128 + the signal, 130 for SIGINT)."""
        code = self.stop(signum)
        wait_for(lambda: self.left_behind() == ([], set()), GONE_S, "nothing of the stopped command left",
                 details=lambda: f"left (pids, network): {self.left_behind()}\n{self.output()}")
        assert code == 128 + signum, self.output()

    def clean_up(self) -> None:
        """Whatever a failed test left: SIGKILL the marked processes, remove the new namespaces and links."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in marked(self.token):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for name in sorted(ares_network() - self.network_before, key=lambda n: not n.startswith("ares-h")):
            subprocess.run(["ip", "link", "del", name], capture_output=True)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def command(tmp_path):
    started: list[Command] = []

    def start(args: list[str]) -> Command:
        started.append(Command(args, tmp_path))
        return started[-1]

    yield start
    for c in started:
        c.clean_up()


def bench_args(tmp: Path, links: str) -> list[str]:
    (tmp / "stop.yaml").write_text(yaml.safe_dump(SCENARIO))
    return ["bench", str(tmp / "stop.yaml"), "--links", links, "--out", str(tmp / "out"), "--ns-index", str(NS_INDEX)]


def server_spawned(tmp: Path, folder: str) -> Callable[[], bool]:
    return lambda: (tmp / folder / "logs" / "server.log").exists()


def round_done(tmp: Path, folder: str, device: str) -> Callable[[], bool]:
    log = tmp / folder / "logs" / f"{device}.log"
    return lambda: log.exists() and " round 0 split " in log.read_text()


FIRST_VARIANT_DONE = "  FL (none): mean round"  # compare_cmd's line after each variant
BENCH_MOMENTS = {
    "start-up": lambda c, tmp: server_spawned(tmp, "out/none"),
    "mid-round": lambda c, tmp: round_done(tmp, "out/none", "pi"),
    "between-variants": lambda c, tmp: c.printed(FIRST_VARIANT_DONE),
}
TERM, INT = signal.SIGTERM, signal.SIGINT


@pytest.mark.slow
@pytest.mark.parametrize("moment, signum", [("start-up", INT), ("mid-round", TERM), ("between-variants", TERM)],
                         ids=lambda x: getattr(x, "name", x))
def test_a_stopped_bench_leaves_no_process_namespace_or_veth(command, tmp_path, moment, signum):
    """With tc links as root (namespaces and veths to leave behind), else with in-process links."""
    links = "inprocess" if tc_skip_reason() else "tc"
    bench = command(bench_args(tmp_path, links))
    bench.wait_until(BENCH_MOMENTS[moment](bench, tmp_path), moment)
    assert marked(bench.token)  # there is something to clean up
    assert links == "inprocess" or ares_network() - bench.network_before
    bench.assert_stopped_cleanly(signum)


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["start-up", "mid-round"])
def test_a_stopped_run_leaves_no_process(command, tmp_path, moment):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**RUN, "results_dir": str(tmp_path / "results")}))
    run = command(["run", "--config", str(tmp_path / "run.yaml")])
    if moment == "start-up":
        run.wait_until(server_spawned(tmp_path, "results"), moment)
    else:
        run.wait_until(run.printed("round 1/3"), moment)
    assert marked(run.token)
    run.assert_stopped_cleanly(TERM)


@pytest.mark.slow
@pytest.mark.host
def test_after_a_sigkill_the_processes_end_and_cleanup_removes_the_namespaces(command, tmp_path):
    """SIGKILL leaves no chance to unwind: the children end anyway (the kernel signals them when
    the bench dies), and `ares bench --cleanup` removes the namespaces and veths it left."""
    if tc_skip_reason():
        pytest.skip(tc_skip_reason())
    bench = command(bench_args(tmp_path, "tc"))
    device_log = tmp_path / "out" / "none" / "logs" / "pi.log"
    bench.wait_until(device_log.exists, "the server and the device started")
    bench.proc.kill()
    bench.proc.wait()
    wait_for(lambda: not marked(bench.token), EXIT_S, "the killed bench's children ended")
    left = ares_network() - bench.network_before
    assert left, "a SIGKILLed bench cannot remove its namespaces"
    tag = sorted(left)[0].rsplit("-", 1)[1]
    assert all(name.endswith(f"-{tag}") for name in left)  # named after the bench that made them
    done = subprocess.run([sys.executable, "-m", "ares", "bench", "--cleanup"], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ares_network() - bench.network_before == set()
    assert all(f"removed {name}" in done.stdout for name in left)


# ---- the parts, in this process ---------------------------------------------------------------

def test_a_stop_signal_inside_a_shielded_block_waits_for_its_end():
    """A child is started and recorded in one shielded step: the signal is raised after it, not
    between the two."""
    from ares.roles import runner

    before = signal.getsignal(TERM)
    done = []
    with pytest.raises(runner.Stopped) as stopped:
        with runner.stop_on_signals():
            with runner.shielded():
                os.kill(os.getpid(), TERM)
                for _ in range(1000):  # the handler runs between these bytecodes, and must not raise
                    pass
                done.append("recorded")
            done.append("not reached")
    assert done == ["recorded"] and stopped.value.exit_code == 143
    assert signal.getsignal(TERM) is before  # handlers restored


def test_the_owner_tag_is_a_lease_that_ends_with_its_process():
    from ares.runtime.netns import owner_alive, owner_tag

    assert owner_alive(owner_tag())
    child = subprocess.Popen([sys.executable, "-c", "from ares.runtime.netns import owner_tag; "
                              "print(owner_tag(), flush=True); input()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        tag = child.stdout.readline().strip()
        assert tag != owner_tag() and owner_alive(tag)
    finally:
        child.kill()  # SIGKILL: no chance to release anything
        child.wait()
    assert not owner_alive(tag)


def test_a_runs_names_carry_its_tag_and_fit_an_interface_name():
    from ares.runtime.netns import parse_name, plan

    p = plan(255, "2hqv4")
    assert (p.namespace, p.host_if, p.device_if, p.shared_if) == (
        "ares-ns255-2hqv4", "ares-h255-2hqv4", "ares-d255-2hqv4", "ares-i255-2hqv4")
    assert all(len(n) <= 15 for n in (p.host_if, p.device_if, p.shared_if))
    assert parse_name(p.host_if) == ("h", 255, "2hqv4") and parse_name("ares-ns7") == ("ns", 7, "")
    assert parse_name("eth0") is None and parse_name("ares-h7-UPPER") is None
    with pytest.raises(ValueError, match="owner tag"):
        plan(1, "toolong")


@pytest.mark.host
def test_an_index_a_running_run_holds_is_refused_and_an_ended_runs_is_taken_over():
    if tc_skip_reason():
        pytest.skip(tc_skip_reason())
    from ares.runtime.netns import DeviceNamespace, NetnsError, owner_tag

    other = subprocess.Popen([sys.executable, "-c", "from ares.runtime.netns import owner_tag; "
                              "print(owner_tag(), flush=True); input()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    theirs = DeviceNamespace(NS_INDEX + 7, owner=other.stdout.readline().strip())
    ours = DeviceNamespace(NS_INDEX + 7, owner=owner_tag())
    try:
        theirs.create()  # as that run would have made it
        with pytest.raises(NetnsError, match="in use by another running ARES run"):
            ours.create()
        assert theirs.plan.namespace in ares_network()  # and left as it was
        other.kill()
        other.wait()
        ours.create()  # that run has ended: what it left is removed first
        assert {theirs.plan.namespace, theirs.plan.host_if}.isdisjoint(ares_network())
        assert {ours.plan.namespace, ours.plan.host_if} <= ares_network()
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()
        theirs.teardown()
        ours.teardown()
