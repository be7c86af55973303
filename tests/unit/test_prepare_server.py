"""Issue 16: kvmhooksd serves hooks/qemu's prepare. The real shell, the real server, the hook's own code; any
failure of the exchange ends in the hook's Python prepare, with the same outcome.

The hook's interpreter is a stand-in that notes each run and then runs the real one, so a test sees both
whether Python ran and what the hook did.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvmhooks.agent import LOCK_NAME, Agent
from kvmhooks.config import Config, load_config
from kvmhooks.ledger import Ledger
from kvmhooks.prepare_server import DIR_NAME, PICKUP_WAIT, REQUESTS, STALE_AGE, PrepareServer
from kvmhooks.xmlsafe import MAX_XML_BYTES
from tests.fakehost import GIB, FakeHost, domain_xml
from tests.unit.test_hook import HOOK, hook_env, hook_with_state, write_config

REPO = Path(__file__).resolve().parents[2]
U1 = "11111111-2222-3333-4444-000000000001"
U2 = "11111111-2222-3333-4444-000000000002"
BIG = 100 * GIB  # KiB: far more than the fake host's 12 GiB free
HARD = '<kvm:hugepages size="2M"/>'
SOFT = '<kvm:hugepages size="2M" required="no"/>'


class Rig:
    """A fake host, its config, hooks/qemu rooted in its state directory, and the interpreter stand-in."""

    def __init__(self, host: FakeHost, **script_edits: str):
        self.host = host
        self.config = write_config(host)
        self.cfg = load_config(self.config)
        self.state = host.root / "run"
        self.state.mkdir(parents=True, exist_ok=True)
        self.script = hook_with_state(self.state)
        text = self.script.read_bytes()
        for old, new in script_edits.items():
            assert old.encode() in text
            text = text.replace(old.encode(), new.encode(), 1)
        self.script.write_bytes(text)
        self.ran = host.root / "python-ran"
        stand_in = host.root / "python"
        stand_in.write_text(f'#!/bin/sh\necho "$3" >> {self.ran}\nexec {sys.executable} "$@"\n')
        stand_in.chmod(0o755)
        self.env = {**hook_env(self.config), "KVMHOOKS_PYTHON": str(stand_in)}

    def start(self, xml: bytes, name: str = "vm1", op: str = "prepare") -> subprocess.Popen[bytes]:
        self.ran.unlink(missing_ok=True)
        sub = "begin" if op == "prepare" else "end"
        p = subprocess.Popen([str(self.script), name, op, sub, "-"], env=self.env, cwd=self.host.root,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdin, p.stdin = p.stdin, None
        assert stdin is not None

        def feed() -> None:
            with contextlib.suppress(BrokenPipeError):  # (the shell reads at most MAX_XML_BYTES + 1 of it)
                stdin.write(xml)
            with contextlib.suppress(BrokenPipeError):
                stdin.close()

        threading.Thread(target=feed, daemon=True).start()
        return p

    def prepare(self, xml: bytes, name: str = "vm1") -> tuple[int, bytes]:
        """(exit code, stderr) of one prepare; stdout stays empty."""
        p = self.start(xml, name)
        out, err = p.communicate(timeout=120)
        assert out == b""
        return p.returncode, err

    def stop(self, xml: bytes, op: str, name: str = "vm1") -> tuple[int, bytes]:
        """(exit code, stderr) of a ``stopped`` or ``release`` call; stdout stays empty."""
        p = self.start(xml, name, op)
        out, err = p.communicate(timeout=120)
        assert out == b""
        return p.returncode, err

    def wait_taken(self, hook: subprocess.Popen[bytes]) -> None:
        """Until the agent has taken ``hook``'s request: its files appear, then are gone (and the hook waits)."""
        deadline = time.monotonic() + 10
        while not self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.002)
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.002)
        assert not self.leftovers() and hook.poll() is None

    def python_ran(self) -> bool:
        return self.ran.exists()

    def record(self, uuid: str) -> object:
        return Ledger(self.cfg.ledger_path).read().domains.get(uuid)

    def leftovers(self) -> list[str]:
        """What the exchange left in the prepare directory besides the agent's request FIFO."""
        d = self.state / DIR_NAME
        return sorted(set(os.listdir(d)) - {REQUESTS}) if d.is_dir() else []


@contextlib.contextmanager
def agent_lock(rig: Rig) -> Iterator[None]:
    """What a running kvmhooksd looks like to the shell's probe: its lock held."""
    fd = os.open(rig.state / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def serving(rig: Rig, package_dir: Path | None = None, repin: Callable[[Config], None] | None = None
            ) -> Iterator[PrepareServer]:
    server = PrepareServer(rig.cfg, package_dir, repin=repin)
    server.start()
    try:
        with agent_lock(rig):
            yield server
    finally:
        server.close()


@pytest.fixture
def rig(host: FakeHost) -> Rig:
    return Rig(host)


@pytest.fixture
def twin(tmp_path: Path) -> Rig:
    """The same host again, where the hook's Python alone prepares (no agent): what the served outcome must be."""
    return Rig(FakeHost(tmp_path / "twin").build())


def test_the_agent_prepares_without_python(rig: Rig) -> None:
    with serving(rig):
        assert rig.prepare(domain_xml(uuid=U1)) == (0, b"")
    assert not rig.python_ran()
    assert rig.host.pool(0) == 128 and getattr(rig.record(U1), "hugepages", None) == {"node0/2048kB": 128}
    assert rig.leftovers() == []


@pytest.mark.parametrize(("tuning", "code"), [(HARD, 1), (SOFT, 0)])
def test_a_refusal_and_a_warning_are_the_hooks_own(rig: Rig, twin: Rig, tuning: str, code: int) -> None:
    """A VM that does not fit: its one line and exit 1 (required), or a warning and exit 0 (required="no"),
    exactly as the hook's Python says them; a refused start leaves the host unchanged."""
    xml = domain_xml(uuid=U1, tuning=tuning, memory_kib=BIG)
    with serving(rig):
        served = rig.prepare(xml)
    assert not rig.python_ran()
    expected = twin.prepare(xml)
    assert twin.python_ran()
    assert served == expected and served[0] == code
    assert served[1].count(b"\n") == 1 and b"not enough memory for huge pages" in served[1]
    assert rig.host.pool(0) == 0
    assert (rig.record(U1) is None) == (code == 1)


def test_the_agent_prepares_with_the_config_the_hook_reads_now(rig: Rig) -> None:
    with serving(rig):
        assert rig.prepare(domain_xml(uuid=U1)) == (0, b"")
        # The admin reserves nearly all of the node for the host: the next start is refused at once.
        write_config(rig.host, host_reserve='"12G"')
        code, err = rig.prepare(domain_xml(uuid=U2))
    assert not rig.python_ran()
    assert code == 1 and b"host reserve 12G" in err, err
    assert rig.record(U2) is None and rig.leftovers() == []


def test_a_config_naming_another_state_directory_goes_to_python(rig: Rig, tmp_path: Path) -> None:
    with serving(rig):
        text = rig.config.read_text()
        rig.config.write_text(text.replace(f'state_dir = "{rig.state}"', f'state_dir = "{tmp_path / "elsewhere"}"'))
        assert rig.prepare(domain_xml(uuid=U1)) == (0, b"")
    assert rig.python_ran()
    assert Ledger(tmp_path / "elsewhere/ledger.json").read().domains.keys() == {U1}
    assert rig.leftovers() == []


def test_after_an_upgrade_the_agent_leaves_prepare_to_python(rig: Rig, tmp_path: Path) -> None:
    """The hook would run the new code, the agent runs what it loaded: it refuses until it is restarted."""
    package = tmp_path / "installed"
    shutil.copytree(REPO / "kvmhooks", package, ignore=shutil.ignore_patterns("__pycache__"))
    with serving(rig, package_dir=package):
        assert rig.prepare(domain_xml(uuid=U1)) == (0, b"")
        assert not rig.python_ran()
        os.utime(package / "operations.py", ns=(0, 0))
        assert rig.prepare(domain_xml(uuid=U2)) == (0, b"")
        assert rig.python_ran()
    assert rig.record(U1) is not None and rig.record(U2) is not None and rig.leftovers() == []


def test_without_the_agent_python_prepares(rig: Rig) -> None:
    server = PrepareServer(rig.cfg)
    server.start()
    try:  # its FIFO is there, its lock is not held: no agent
        assert rig.prepare(domain_xml(uuid=U1)) == (0, b"")
        assert rig.python_ran()
    finally:
        server.close()
    with agent_lock(rig):  # the lock held, no FIFO (an agent from before this server)
        assert rig.prepare(domain_xml(uuid=U2)) == (0, b"")
        assert rig.python_ran()
    assert rig.record(U1) is not None and rig.record(U2) is not None and rig.leftovers() == []


@contextlib.contextmanager
def fake_agent(rig: Rig, answer: bytes | None, take: bool = True) -> Iterator[None]:
    """An agent that reads the request FIFO and, if ``take``, takes the request (opens its reply) and writes
    ``answer`` (None: nothing, holding the reply open until the end of the test)."""
    d = rig.state / DIR_NAME
    d.mkdir(mode=0o700, exist_ok=True)
    os.mkfifo(d / REQUESTS, 0o600)
    fifo = os.open(d / REQUESTS, os.O_RDWR)
    held: list[int] = []
    done = threading.Event()

    def serve() -> None:
        line = b""
        while not line.endswith(b"\n"):
            line += os.read(fifo, 64)
        if not take:
            return
        pid = line.decode().strip()
        while not done.is_set():
            try:
                w = os.open(d / f"{pid}.reply", os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                time.sleep(0.002)
        if answer is None:
            held.append(w)
        else:
            os.write(w, answer)
            os.close(w)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with agent_lock(rig):
            yield
    finally:
        done.set()
        for w in held:
            os.close(w)
        os.close(fifo)


def test_a_request_nobody_takes_goes_to_python_after_the_pickup_deadline(rig: Rig) -> None:
    with fake_agent(rig, None, take=False):
        t0 = time.monotonic()
        assert rig.prepare(domain_xml(uuid=U1)) == (0, b"")
        waited = time.monotonic() - t0
    assert rig.python_ran() and rig.record(U1) is not None
    assert PICKUP_WAIT <= waited < PICKUP_WAIT + 5
    assert rig.leftovers() == []


def test_an_answer_that_never_comes_goes_to_python_after_the_answer_deadline(host: FakeHost) -> None:
    rig = Rig(host, **{"ANSWER=60": "ANSWER=2"})
    with fake_agent(rig, None):
        t0 = time.monotonic()
        assert rig.prepare(domain_xml(uuid=U1)) == (0, b"")
        waited = time.monotonic() - t0
    assert rig.python_ran() and rig.record(U1) is not None
    assert PICKUP_WAIT + 2 <= waited < PICKUP_WAIT + 2 + 5
    assert rig.leftovers() == []


@pytest.mark.parametrize("answer", [
    b"",  # taken, then closed unanswered (the agent refused it, or died)
    b"kvmhooks-prepare 0 40\nkvmhooks: a line cut\n",  # cut short
    b"kvmhooks-prepare 0 5\nabcde",  # its last line without a newline
    b"kvmhooks-prepare 2 0\n",  # not an exit code of prepare
    b"kvmhooks-prepare 0 x\n",
    b"kvmhooks-prepare 0\n",
    b"something else 0 0\n",
])
def test_an_answer_that_is_not_whole_goes_to_python(host: FakeHost, answer: bytes) -> None:
    rig = Rig(host, **{"ANSWER=60": "ANSWER=30"})
    with fake_agent(rig, answer):
        t0 = time.monotonic()
        assert rig.prepare(domain_xml(uuid=U1)) == (0, b"")
        assert time.monotonic() - t0 < 20  # at once, not after the answer deadline
    assert rig.python_ran() and rig.record(U1) is not None
    assert rig.leftovers() == []


@pytest.mark.parametrize(("code", "text"), [(1, b"kvmhooks: VM 'x': no.\n\n\n"), (0, b""), (0, b"w\xc3\xa9\n")])
def test_the_shell_relays_a_whole_answer_as_it_is(rig: Rig, code: int, text: bytes) -> None:
    with fake_agent(rig, b"kvmhooks-prepare %d %d\n%s" % (code, len(text), text)):
        assert rig.prepare(domain_xml(uuid=U1)) == (code, text)
    assert not rig.python_ran()


KILLED_AGENT = """
import sys, time
from kvmhooks.agent import take_lock
from kvmhooks.config import load_config
from kvmhooks.prepare_server import PrepareServer
cfg = load_config(sys.argv[1])
take_lock(cfg)
PrepareServer(cfg).start()
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("op", ["prepare", "stopped"])
def test_an_agent_killed_mid_call_leaves_it_to_python(rig: Rig, op: str) -> None:
    """The agent took the request and waits for the ledger lock when it is killed: the shell sees its reply
    end at once and prepares (or releases) in Python, which takes the lock once it is free."""
    if op == "stopped":  # a VM that holds its pages (prepared by the hook's Python: no agent yet)
        assert rig.prepare(domain_xml(uuid=U1)) == (0, b"") and rig.host.pool(0) == 128
    agent = subprocess.Popen([sys.executable, "-c", KILLED_AGENT, str(rig.config)], cwd=REPO, stdout=subprocess.PIPE)
    ledger_lock = os.open(rig.cfg.ledger_path.with_name("ledger.json.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(ledger_lock, fcntl.LOCK_EX)
    try:
        assert agent.stdout is not None and agent.stdout.readline() == b"ready\n"
        hook = rig.start(domain_xml(uuid=U1), op=op)
        rig.wait_taken(hook)  # the agent took the request and waits for the ledger lock
        agent.kill()
        agent.wait(10)
        t0 = time.monotonic()
        while not rig.python_ran() and time.monotonic() - t0 < 10:
            time.sleep(0.005)
        assert rig.python_ran()  # without waiting for the answer deadline
    finally:
        os.close(ledger_lock)
        agent.kill()
        agent.wait(10)
    out, err = hook.communicate(timeout=60)
    assert (hook.returncode, out, err) == (0, b"", b"")
    log = (rig.host.root / "kvmhooks.log").read_text()
    if op == "prepare":
        assert rig.host.pool(0) == 128 and rig.record(U1) is not None
        assert f"({U1}): reserved" in log  # the hook's Python did it
    else:
        assert rig.host.pool(0) == 0 and rig.record(U1) is None and not (rig.state / "held" / U1).exists()
        assert f"({U1}): released" in log
    assert rig.leftovers() == []


def test_two_prepares_at_once_are_both_served(rig: Rig) -> None:
    with serving(rig):
        hooks = [rig.start(domain_xml(uuid=u, name=f"vm{i}"), f"vm{i}") for i, u in enumerate((U1, U2))]
        results = [(*h.communicate(timeout=60), h.returncode) for h in hooks]
    assert results == [(b"", b"", 0)] * 2
    assert not rig.python_ran()
    assert rig.host.pool(0) == 256 and rig.record(U1) is not None and rig.record(U2) is not None
    assert rig.leftovers() == []


DOCTYPE = domain_xml(uuid=U1).replace(b"<domain", b'<!DOCTYPE d [<!ENTITY x "y">]><domain', 1)
OVERSIZE = domain_xml(uuid=U1).replace(b"</devices>", b"<!--" + b"x" * MAX_XML_BYTES + b"--></devices>")
WITH_NUL = domain_xml(uuid=U1).replace(b"<vcpu", b"\0<vcpu", 1)


@pytest.mark.parametrize(("name", "xml", "python"), [
    ("vm1\nkvmhooks-prepare 0 0", domain_xml(uuid=U1, memory_kib=BIG), False),
    ("../../../../x", domain_xml(name="../../../../x", uuid=U1, memory_kib=BIG), False),
    ("$(touch pwned)`touch pwned`", domain_xml(uuid=U1, memory_kib=BIG), False),
    ("'\"\\ \t%s%n", domain_xml(uuid=U1), False),
    ("v" * 70000, domain_xml(uuid=U1), True),  # more than a request's arguments may hold: Python's
    ("vm1", DOCTYPE, False),
    ("vm1", OVERSIZE, False),
    ("vm1", WITH_NUL, False),
])
def test_hostile_names_and_xml_end_as_in_python(rig: Rig, twin: Rig, name: str, xml: bytes, python: bool) -> None:
    with serving(rig):
        served = rig.prepare(xml, name)
    assert rig.python_ran() == python
    assert served == twin.prepare(xml, name)
    assert rig.host.pool(0) == twin.host.pool(0)
    assert (rig.record(U1) is None) == (twin.record(U1) is None)
    assert not (rig.host.root / "pwned").exists() and not (rig.host.root / "x").exists()
    assert rig.leftovers() == []


def test_lines_that_name_no_request_are_ignored(rig: Rig) -> None:
    with serving(rig):
        with open(rig.state / DIR_NAME / REQUESTS, "wb") as f:
            f.write(b"../../ledger.json\n\n" + b"x" * 5000 + b"\n")
        assert rig.prepare(domain_xml(uuid=U1)) == (0, b"")
    assert not rig.python_ran() and rig.record(U1) is not None


def test_the_agent_clears_only_old_leftovers_when_it_starts(rig: Rig) -> None:
    """A shell killed mid-exchange leaves its files; one still at work must keep them."""
    d = rig.state / DIR_NAME
    d.mkdir(mode=0o700)
    for name in ("101.args", "101.xml", "202.xml"):
        (d / name).write_bytes(b"")
    for name in ("101.args", "101.xml"):
        os.utime(d / name, (time.time() - STALE_AGE - 10,) * 2)
    (d / REQUESTS).write_bytes(b"")  # (a regular file: what a shell's 1<> makes when the FIFO is gone)
    with serving(rig):
        assert sorted(os.listdir(d)) == ["202.xml", REQUESTS] and (d / REQUESTS).is_fifo()
        assert d.stat().st_mode & 0o777 == 0o700
    assert sorted(os.listdir(d)) == ["202.xml"]  # its FIFO goes with the agent


def test_the_shell_and_the_server_agree(rig: Rig) -> None:
    text = HOOK.read_text()

    def value(var: str) -> str:
        m = re.search(rf"^{var}=(\S+)", text, re.M)
        assert m is not None, var
        return m.group(1)

    assert int(value("MAX_XML")) == MAX_XML_BYTES
    assert float(value("PICKUP")) == PICKUP_WAIT
    assert value("PREP") == f"$STATE/{DIR_NAME}"


def test_the_agent_serves_prepare_and_stops_serving_at_its_end(rig: Rig) -> None:
    agent = Agent(rig.cfg)
    agent._serve_prepare()
    assert agent.prepare_server is not None and (rig.state / DIR_NAME / REQUESTS).is_fifo()
    with agent_lock(rig):
        assert rig.prepare(domain_xml(uuid=U1)) == (0, b"")
    assert not rig.python_ran()
    agent.prepare_server.close()
    assert not (rig.state / DIR_NAME / REQUESTS).exists()


# --- the stop of a VM that holds something: served the same way -------------------------------------------

def test_the_agent_releases_a_held_vm_without_python_and_the_second_stop_call_costs_nothing(rig: Rig) -> None:
    xml = domain_xml(uuid=U1)
    with serving(rig):
        assert rig.prepare(xml) == (0, b"")
        assert rig.host.pool(0) == 128 and (rig.state / "held" / U1).exists()
        assert rig.stop(xml, "stopped") == (0, b"")
        assert not rig.python_ran()
        assert rig.host.pool(0) == 0 and rig.record(U1) is None and not (rig.state / "held" / U1).exists()
        assert rig.stop(xml, "release") == (0, b"")  # nothing held: the shell ends it, no exchange, no Python
        assert not rig.python_ran()
    assert rig.leftovers() == []


def test_a_stop_the_agent_does_not_serve_is_released_by_python(rig: Rig, tmp_path: Path) -> None:
    """kvmhooks upgraded under a running agent: the hook's Python releases, with the new code."""
    package = tmp_path / "installed"
    shutil.copytree(REPO / "kvmhooks", package, ignore=shutil.ignore_patterns("__pycache__"))
    xml = domain_xml(uuid=U1)
    with serving(rig, package_dir=package):
        assert rig.prepare(xml) == (0, b"")
        os.utime(package / "operations.py", ns=(0, 0))
        assert rig.stop(xml, "stopped") == (0, b"")
        assert rig.python_ran()
    assert rig.host.pool(0) == 0 and rig.record(U1) is None and rig.leftovers() == []


def test_a_served_release_that_frees_dedicated_cpus_repins_through_the_agent(tmp_path: Path) -> None:
    """The shared VMs may float over the CPUs a dedicated VM gave back: the agent does it over its own
    connection (the callback it hands the server), never by forking its threaded process."""
    rig = Rig(FakeHost(tmp_path, cores_per_node=4).build())
    shared = domain_xml(name="shared", uuid=U1, tuning='<kvm:cpu policy="shared"/>', backing="")
    dedicated = domain_xml(name="dedicated", uuid=U2, tuning='<kvm:cpu policy="dedicated"/>', backing="")
    calls: list[int] = []
    with serving(rig, repin=lambda cfg: calls.append(len(getattr(rig.record(U2), "cpus", []) or []))):
        assert rig.prepare(shared, "shared") == (0, b"")
        assert rig.prepare(dedicated, "dedicated") == (0, b"")
        held = getattr(rig.record(U2), "cpus", None)
        assert held
        assert rig.stop(dedicated, "stopped", "dedicated") == (0, b"")
        assert rig.stop(shared, "stopped", "shared") == (0, b"")  # (no dedicated CPUs: no repin)
    assert not rig.python_ran()
    assert calls == [0]  # once, after the dedicated VM's record (and its CPUs) left the ledger
    assert rig.record(U1) is None and rig.record(U2) is None and rig.leftovers() == []


def test_the_agents_repin_moves_the_shared_vms_over_its_own_connection(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """What the agent hands the server as ``repin``: the shared VM leaves the CPUs a dedicated VM holds, through
    the agent's connection; with no connection (libvirt away), a worker of its own (fork and exec) does it."""
    from kvmhooks import operations, prepare_server
    from kvmhooks.domain import parse_domain
    from tests.unit.test_live import FakeConn, FakeDom

    host = FakeHost(tmp_path, cores_per_node=4).build()
    cfg = host.config(cpu_housekeeping=frozenset({0}))
    shared_xml = domain_xml(uuid=U1, tuning='<kvm:cpu policy="shared"/>', backing="")
    operations.prepare(parse_domain(shared_xml), cfg)
    shared = FakeDom(U1, shared_xml)
    for v in (0, 1):
        shared.vcpus[v] = frozenset({1, 2, 3})
    held = set(operations.prepare(parse_domain(domain_xml(uuid=U2, tuning='<kvm:cpu policy="dedicated"/>',
                                                          backing="")), cfg).record.cpus)
    a = Agent(cfg)
    a.conn = FakeConn(shared)
    a._repin(cfg)
    assert all(not shared.vcpus[v] & held for v in (0, 1)) and not shared.emulator & held
    spawned: list[bool] = []
    monkeypatch.setattr(prepare_server, "spawn_repin_worker", lambda: spawned.append(True))
    a.conn = None
    a._repin(cfg)
    assert spawned == [True]


def test_the_agents_repin_plans_with_the_config_the_served_call_read(tmp_path: Path) -> None:
    """The admin moved the housekeeping CPUs after kvmhooksd started: the repin after a served release plans
    the shared pool with the config the hook reads now, not the agent's (review finding: it used the agent's,
    and the ledger then agreed with the wrong pins, so no drift check ever said so)."""
    from kvmhooks import operations
    from kvmhooks.domain import parse_domain
    from tests.unit.test_live import FakeConn, FakeDom

    host = FakeHost(tmp_path, cores_per_node=4).build()
    started_with = host.config(cpu_housekeeping=frozenset({0}))
    now = host.config(cpu_housekeeping=frozenset({0, 1}))
    shared_xml = domain_xml(uuid=U1, tuning='<kvm:cpu policy="shared"/>', backing="")
    operations.prepare(parse_domain(shared_xml), now)
    shared = FakeDom(U1, shared_xml)
    a = Agent(started_with)
    a.conn = FakeConn(shared)
    a._repin(now)
    assert shared.vcpus[0] == frozenset({2, 3}) and shared.emulator == frozenset({2, 3})


# --- a call kvmhooksd answers too late is not done (review finding) ---------------------------------------

@contextlib.contextmanager
def stalled_agent(rig: Rig) -> Iterator[tuple[subprocess.Popen[bytes], Callable[[subprocess.Popen[bytes]], None]]]:
    """A real serving agent, and a way to take the next request, let it wait for the ledger lock and freeze
    the agent (SIGSTOP) there, as a swapped-out or stopped kvmhooksd would."""
    with open(rig.host.root / "agent.log", "wb") as log:  # (its logging: stderr)
        agent = subprocess.Popen([sys.executable, "-c", KILLED_AGENT, str(rig.config)], cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=log)
    lock = os.open(rig.cfg.ledger_path.with_name("ledger.json.lock"), os.O_RDWR | os.O_CREAT, 0o600)

    def freeze_on_next(hook: subprocess.Popen[bytes]) -> None:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            rig.wait_taken(hook)  # the agent waits for the lock
            assert not rig.python_ran(), "premise: the agent took the request"
            time.sleep(0.2)
            os.kill(agent.pid, signal.SIGSTOP)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)

    try:
        assert agent.stdout is not None and agent.stdout.readline() == b"ready\n"
        yield agent, freeze_on_next
    finally:
        os.close(lock)
        os.kill(agent.pid, signal.SIGCONT)
        agent.kill()
        agent.wait(10)


@contextlib.contextmanager
def no_requests_fifo(rig: Rig) -> Iterator[None]:
    """The frozen agent's FIFO out of the shell's sight meanwhile: its calls go to Python at once instead of
    after the (lengthened) pickup deadline."""
    fifo = rig.state / DIR_NAME / REQUESTS
    fifo.rename(fifo.with_name("requests.aside"))
    try:
        yield
    finally:
        fifo.with_name("requests.aside").rename(fifo)


def resume_and_settle(rig: Rig, agent: subprocess.Popen[bytes]) -> str:
    """Let the frozen agent go on, and return its log line about the call it had taken."""
    log = rig.host.root / "agent.log"
    before = log.read_text()
    os.kill(agent.pid, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = log.read_text()[len(before):]
        if "not done by kvmhooksd" in text:
            return text
        time.sleep(0.02)
    raise AssertionError(f"the resumed agent said nothing about the call it had taken:\n{log.read_text()[-2000:]}")


def test_a_release_answered_too_late_leaves_the_vms_next_run_alone(host: FakeHost) -> None:
    """The agent took a stop and froze past the answer deadline; the hook released in Python, the VM started
    again (Python prepare: the frozen agent takes no request). When the agent goes on it must not release the
    new run's pages (it did: record, marker and pool of the running VM gone)."""
    # The answer deadline shortened; the pickup deadline longer (a loaded machine must not send it to Python
    # before the agent took it: the test is about a call the agent took).
    rig = Rig(host, **{"ANSWER=60": "ANSWER=1", "PICKUP=1": "PICKUP=3"})
    xml = domain_xml(uuid=U1)
    assert rig.prepare(xml) == (0, b"")  # run 1 (no agent yet: Python)
    with stalled_agent(rig) as (agent, freeze_on_next):
        hook = rig.start(xml, op="stopped")
        freeze_on_next(hook)
        out, err = hook.communicate(timeout=60)
        assert (hook.returncode, out, err) == (0, b"", b"") and rig.python_ran()
        assert rig.record(U1) is None and rig.host.pool(0) == 0
        with no_requests_fifo(rig):
            assert rig.stop(xml, "release") == (0, b"")
            assert rig.prepare(xml) == (0, b"") and rig.python_ran()  # run 2
        assert rig.host.pool(0) == 128
        said = resume_and_settle(rig, agent)
        assert "stopped" in said
        assert rig.record(U1) is not None and (rig.state / "held" / U1).exists() and rig.host.pool(0) == 128
    assert not (rig.state / "failures" / U1).exists()  # nothing failed: the hook's Python did the stop


def test_a_prepare_answered_too_late_reserves_nothing_for_a_vm_that_stopped(host: FakeHost) -> None:
    # The answer deadline shortened; the pickup deadline longer (a loaded machine must not send it to Python
    # before the agent took it: the test is about a call the agent took).
    rig = Rig(host, **{"ANSWER=60": "ANSWER=1", "PICKUP=1": "PICKUP=3"})
    xml = domain_xml(uuid=U1)
    with stalled_agent(rig) as (agent, freeze_on_next):
        hook = rig.start(xml)
        freeze_on_next(hook)
        out, err = hook.communicate(timeout=60)
        assert (hook.returncode, out, err) == (0, b"", b"") and rig.python_ran()
        assert rig.host.pool(0) == 128
        with no_requests_fifo(rig):
            assert rig.stop(xml, "stopped") == (0, b"")  # (the frozen agent takes nothing: Python releases)
        assert rig.record(U1) is None and rig.host.pool(0) == 0
        resume_and_settle(rig, agent)
        assert rig.record(U1) is None and rig.host.pool(0) == 0 and not (rig.state / "held" / U1).exists()
