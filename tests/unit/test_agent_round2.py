"""kvmhooksd, hardening round two (issue 17): the metrics endpoints bounded against idle clients (item 7), one
agent per host (item 9), a VM started paused tuned at once (item 10), a stale worker never writing a newer
run's record (item 11d), and the tests the mutation run found missing (the re-pin token check, the agent's
job queue, drift judged only after the start's tuning)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector

from kvmhooks import metrics
from kvmhooks.config import Config
from tests.fakehost import FakeHost

REPO = Path(__file__).resolve().parents[2]
U1 = "11111111-2222-3333-4444-000000000001"
U2 = "11111111-2222-3333-4444-000000000002"


# --- item 7: the metrics endpoints ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def idle_clients(connect: object, n: int) -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            socks.append(connect())  # type: ignore[operator]
        yield socks
    finally:
        for s in socks:
            s.close()


def tcp_client(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def unix_client(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))  # (blocking: a unix socket's full backlog is EAGAIN in any other mode)
    s.settimeout(5)
    return s


@pytest.mark.parametrize("endpoint", ["tcp", "unix"])
def test_idle_clients_neither_pin_threads_nor_block_a_real_scrape(host: FakeHost, endpoint: str) -> None:
    """Many more idle connections than the endpoint keeps waiting: the agent's thread count stays where it
    was (it started one thread per connection and never timed one out), and a real scrape is answered at once."""
    cfg = host.config()
    reg, _ = metrics.registry(cfg)
    before = threading.active_count()
    port = free_port()
    path = host.root / "metrics.sock"
    if endpoint == "tcp":
        server = metrics.serve_http(reg, f"127.0.0.1:{port}")
        connect = lambda: tcp_client(port)  # noqa: E731

        def scrape() -> bytes:
            return bytes(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read())
    else:
        server = metrics.serve_unix(reg, path)
        connect = lambda: unix_client(path)  # noqa: E731

        def scrape() -> bytes:
            body = metrics.fetch_unix(path, timeout=5)
            assert body is not None
            return body
    started = threading.active_count()
    with idle_clients(connect, 300) as idle:
        time.sleep(0.3)  # let the endpoint take them all
        assert threading.active_count() <= started  # nothing per connection
        t0 = time.monotonic()
        body = scrape()
        assert time.monotonic() - t0 < 2.0 and b"kvmhooks_up 1.0" in body
        assert threading.active_count() <= started
        # The newest idle ones are still open (only the longest-waiting were closed to make room).
        idle[-1].setblocking(False)
        with pytest.raises(BlockingIOError):
            idle[-1].recv(1)
    assert started - before <= 1 + metrics.ANSWER_THREADS  # a fixed number of threads per endpoint
    server.close()


def test_an_idle_client_is_dropped_after_the_request_timeout(host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT", 0.5)
    reg, _ = metrics.registry(host.config())
    port = free_port()
    server = metrics.serve_http(reg, f"127.0.0.1:{port}")
    with tcp_client(port) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\n")  # and then nothing: the headers never end
        s.settimeout(3)
        t0 = time.monotonic()
        assert s.recv(1) == b""  # closed by the agent
        assert 0.3 < time.monotonic() - t0 < 2.0
    server.close()


class Blocking(Collector):
    """A collector that holds every scrape until released: the answer threads stay busy."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

    def collect(self):  # type: ignore[no-untyped-def]
        self.entered.release()
        self.release.wait(10)
        return []


def test_requests_beyond_the_queue_are_refused_at_once(tmp_path: Path) -> None:
    reg = CollectorRegistry()
    blocking = Blocking()
    reg.register(blocking)
    port = free_port()
    server = metrics.serve_http(reg, f"127.0.0.1:{port}")
    clients = []
    try:
        for _ in range(metrics.ANSWER_THREADS):
            c = tcp_client(port)
            c.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            clients.append(c)
        for _ in range(metrics.ANSWER_THREADS):
            assert blocking.entered.acquire(timeout=5)  # both answer threads are busy
        for _ in range(metrics.MAX_QUEUED):
            c = tcp_client(port)
            c.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            clients.append(c)
        time.sleep(0.3)
        with tcp_client(port) as extra:
            extra.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            t0 = time.monotonic()
            answer = extra.recv(4096)
            assert answer.startswith(b"HTTP/1.0 503") and time.monotonic() - t0 < 1.0
        blocking.release.set()
        for c in clients:  # every queued one is answered once the threads are free
            c.settimeout(5)
            assert c.recv(4096).startswith(b"HTTP/1.0 200")
    finally:
        blocking.release.set()
        for c in clients:
            c.close()
        server.close()


# --- item 9: one agent per host --------------------------------------------------------------------------------

def agent_cmd(config: Path) -> list[str]:
    return [sys.executable, "-m", "kvmhooks.cli", "agent", "--config", str(config), "--log-stderr"]


def pid_file(cfg: Config) -> Path:
    return cfg.state_dir / "agent.pid"


def wait_for(pred, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def named_in_pid_file(cfg: Config, pid: int) -> bool:
    try:
        return int(pid_file(cfg).read_text()) == pid
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def agent_process(host: FakeHost, config: Path, cfg: Config) -> Iterator[subprocess.Popen[bytes]]:
    with open(host.root / "agent.out", "ab") as out:
        p = subprocess.Popen(agent_cmd(config), stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_for(lambda: named_in_pid_file(cfg, p.pid) or p.poll() is not None, 20, "the agent to come up")
        assert p.poll() is None, (host.root / "agent.out").read_text()
        yield p
    finally:
        p.terminate()
        p.wait(20)


def agent_config(host: FakeHost) -> tuple[Path, Config]:
    from kvmhooks.config import load_config
    from tests.unit.test_hook import write_config

    config = write_config(host, libvirt_uri='"test:///default"')
    return config, load_config(config)


def test_a_second_agent_refuses_and_the_first_keeps_its_socket(host: FakeHost) -> None:
    """`kvmhooks agent` typed while kvmhooksd runs: it refused nothing, took the socket over and removed the
    socket and pid file when it exited (the hook then reached neither, status said "not running")."""
    from kvmhooks.agent import metrics_socket_path, running, socket_path, tell

    config, cfg = agent_config(host)
    with agent_process(host, config, cfg) as first:
        second = subprocess.run(agent_cmd(config), capture_output=True, cwd=REPO, timeout=30)
        lines = second.stderr.decode().splitlines()
        assert second.returncode == 1 and len(lines) == 1, lines
        assert "already runs" in lines[0] and f"pid {first.pid}" in lines[0]
        assert named_in_pid_file(cfg, first.pid) and running(cfg) and tell(cfg, U1)  # the hook still reaches it
        assert metrics.fetch_unix(metrics_socket_path(cfg)) is not None
    # The holder, and only it, cleans up when it stops; then the lock is free for the next agent.
    for path in (socket_path(cfg), metrics_socket_path(cfg), pid_file(cfg)):
        assert not path.exists()
    assert (cfg.state_dir / "agent.lock").exists()
    with agent_process(host, config, cfg) as third:
        assert named_in_pid_file(cfg, third.pid) and running(cfg)


def test_start_agent_restarts_the_running_agent_and_never_runs_two(host: FakeHost) -> None:
    """scripts/start-agent.sh (demo.sh, upgrades without systemd): the old agent stops, its lock frees, the
    new one serves; at no point do two run."""
    config, cfg = agent_config(host)
    shim = host.root / "kvmhooks"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m kvmhooks.cli "$@"\n')
    shim.chmod(0o755)
    env = dict(os.environ, KVMHOOKS_STATE_DIR=str(cfg.state_dir), KVMHOOKS_AGENT_LOG=str(host.root / "agent.log"),
               KVMHOOKS_BIN=str(shim), KVMHOOKS_CONFIG=str(config), PYTHONPATH=str(REPO))

    def start() -> int:
        r = subprocess.run(["bash", str(REPO / "scripts/start-agent.sh")], env=env, capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr.decode() + (host.root / "agent.log").read_text()
        return int(pid_file(cfg).read_text())

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
        except OSError:
            return False

    from kvmhooks.agent import running

    pids = [start()]
    try:
        pids.append(start())
        assert pids[1] != pids[0] and alive(pids[1]) and not alive(pids[0])
        assert running(cfg)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 15)
        wait_for(lambda: not pid_file(cfg).exists(), 20, "the agent to stop")


# --- item 10: a VM started paused ------------------------------------------------------------------------------

BALLOON = '<kvm:balloon target="200M" transport="libvirt"/>'


def paused_vm(tmp_path: Path, reason: str = "VIR_DOMAIN_PAUSED_USER") -> tuple[Config, Any, list[str]]:
    """A pinned VM with a fixed balloon target, prepared and handed over by its started hook, its domain
    paused (``virsh start --paused``: reason "user"; an incoming migration: "migration"). The balloon step
    records the domain's state when it is called."""
    import libvirt

    from kvmhooks import operations
    from kvmhooks.domain import parse_domain
    from tests.fakehost import domain_xml
    from tests.unit.test_live import FakeDom

    host = FakeHost(tmp_path, cores_per_node=4).build()
    cfg = host.config(worker_timeout=0.5)
    xml = domain_xml(uuid=U1, backing="", tuning=f'<kvm:vcpupin vcpu="0" cpuset="1"/>{BALLOON}', vcpus=1)
    operations.prepare(parse_domain(xml), cfg)
    operations.mark(U1, cfg, state="starting")

    class Paused(FakeDom):
        now = (libvirt.VIR_DOMAIN_PAUSED, getattr(libvirt, reason))
        # Paused for "migration": a migration's destination until it ends (False: a restore that finished,
        # which libvirt leaves paused for "migration" too).
        incoming = reason == "VIR_DOMAIN_PAUSED_MIGRATION"

        def state(self) -> tuple[int, int]:
            return self.now

        def isActive(self) -> bool:
            return bool(self.now[0] != libvirt.VIR_DOMAIN_SHUTOFF)

        def jobInfo(self) -> list[int]:
            """As libvirt's: refused on a migration's destination while it runs (qemuDomainGetJobStatsInternal),
            else the job's type and eleven figures (no job: VIR_DOMAIN_JOB_NONE and zeros)."""
            if self.incoming and self.now[0] == libvirt.VIR_DOMAIN_PAUSED:
                raise libvirt.libvirtError("Operation not supported: migration statistics are available only "
                                           "on the source host")
            return [libvirt.VIR_DOMAIN_JOB_NONE] + [0] * 11

        def resume(self) -> None:
            self.now = (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_UNPAUSED)

    return cfg, Paused(U1, xml, vcpus=1), []


def record_balloon(monkeypatch: pytest.MonkeyPatch, dom: Any, calls: list[str]) -> None:
    import libvirt

    from kvmhooks import worker

    def step(d: Any, libvirt_dom: Any, cfg: Config, vlog: Any) -> bool:
        calls.append("running" if libvirt_dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING else "paused")
        return True

    monkeypatch.setattr(worker, "balloon_step", step)


def test_the_agent_pins_a_vm_started_paused_at_once_and_balloons_it_when_it_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The start's tuning waited for RUNNING, gave up after worker_timeout, and the RESUMED event no longer
    triggered it: a VM started paused was never pinned."""
    import libvirt

    from kvmhooks import operations
    from kvmhooks.agent import Agent
    from tests.unit.test_live import FakeConn

    cfg, dom, balloons = paused_vm(tmp_path)
    record_balloon(monkeypatch, dom, balloons)
    a = Agent(cfg)
    a.conn = FakeConn(dom)
    monkeypatch.setattr(a, "_spawn", lambda job, uuid: job(uuid))
    a.pending[U1] = time.monotonic()  # the started hook's "started UUID"
    a._lifecycle(None, dom, libvirt.VIR_DOMAIN_EVENT_STARTED, 0, None)
    rec = operations.ledger_for(cfg).read().domains[U1]
    assert dom.vcpus[0] == {1} and rec.state == "running" and rec.error is None  # pinned while paused
    assert balloons == []  # a paused guest cannot move its balloon: it waits
    a._lifecycle(None, dom, libvirt.VIR_DOMAIN_EVENT_SUSPENDED, 0, None)  # (what libvirt sends next)
    dom.resume()
    a._lifecycle(None, dom, libvirt.VIR_DOMAIN_EVENT_RESUMED, 0, None)  # virsh resume
    assert balloons == ["running"] and dom.vcpus[0] == {1}
    a._lifecycle(None, dom, libvirt.VIR_DOMAIN_EVENT_SUSPENDED, 0, None)
    a._lifecycle(None, dom, libvirt.VIR_DOMAIN_EVENT_RESUMED, 0, None)  # a later pause and resume: nothing more
    assert balloons == ["running"] and not a.at_resume


def test_the_agent_tunes_a_vm_migrating_in_when_the_migration_ends(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """On a migration's destination the started hook runs while the migration still holds the domain (every
    tuning call would wait for it): tuned at the RESUMED event that ends it, not failed before."""
    import libvirt

    from kvmhooks import operations
    from kvmhooks.agent import Agent
    from tests.unit.test_live import FakeConn

    cfg, dom, balloons = paused_vm(tmp_path, "VIR_DOMAIN_PAUSED_MIGRATION")
    record_balloon(monkeypatch, dom, balloons)
    a = Agent(cfg)
    a.conn = FakeConn(dom)
    monkeypatch.setattr(a, "_spawn", lambda job, uuid: job(uuid))
    a.pending[U1] = time.monotonic()
    a._lifecycle(None, dom, libvirt.VIR_DOMAIN_EVENT_STARTED, 0, None)
    time.sleep(0.6)  # longer than worker_timeout: nothing waits, nothing fails
    rec = operations.ledger_for(cfg).read().domains[U1]
    assert dom.calls == [] and rec.state == "starting" and rec.error is None
    dom.resume()
    a._lifecycle(None, dom, libvirt.VIR_DOMAIN_EVENT_RESUMED, 0, None)
    assert dom.vcpus[0] == {1} and balloons == ["running"]
    assert operations.ledger_for(cfg).read().domains[U1].state == "running"


def test_the_worker_pins_a_vm_started_paused_at_once_and_waits_only_with_the_balloon(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvmhooks import operations, worker
    from tests.unit.test_live import FakeConn

    cfg, dom, balloons = paused_vm(tmp_path)
    cfg = cfg.__class__(**{**cfg.__dict__, "worker_timeout": 10.0})
    record_balloon(monkeypatch, dom, balloons)
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(worker.tune(FakeConn(dom), U1, cfg, "worker")))
    t.start()
    try:
        wait_for(lambda: operations.ledger_for(cfg).read().domains[U1].state == "running", 5, "the tuning")
        assert dom.vcpus[0] == {1} and balloons == []  # pinned while still paused; the balloon waits
    finally:
        dom.resume()  # virsh resume
        t.join(10)
    assert result == [0] and balloons == ["running"]


def test_the_worker_gives_up_on_the_balloon_of_a_vm_never_resumed(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from kvmhooks import operations, worker
    from tests.unit.test_live import FakeConn

    cfg, dom, balloons = paused_vm(tmp_path)
    record_balloon(monkeypatch, dom, balloons)
    assert worker.tune(FakeConn(dom), U1, cfg, "worker") == 1
    rec = operations.ledger_for(cfg).read().domains[U1]
    assert rec.state == "running" and dom.vcpus[0] == {1} and balloons == []
    failure = (cfg.state_dir / "failures" / U1).read_text()
    assert "balloon: not set: the domain was not running after 0.5 s" in failure


# --- item 11d and the re-pin: a decision taken for one run of a VM never lands on the next -------------------

def restarted_meanwhile(cfg: Config, xml: bytes) -> dict[str, object]:
    """The VM stopped and started again (release, then a new prepare: a new token); its new record, as left."""
    from kvmhooks import operations
    from kvmhooks.domain import parse_domain

    old = operations.ledger_for(cfg).read().domains[U1].token
    operations.release(U1, cfg)
    operations.prepare(parse_domain(xml), cfg)
    rec = operations.ledger_for(cfg).read().domains[U1]
    assert rec.token != old
    time.sleep(0.01)  # (a record touched later would carry a later stamp)
    return rec.to_json()


@pytest.mark.parametrize("fails", [False, True])
def test_a_stale_workers_mark_never_writes_the_newer_runs_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 fails: bool) -> None:
    """A worker tuning one run of the VM while it is stopped and started again: neither its "running" (with
    that run's pins) nor its error lands on the newer run's record (which would then look tuned, or failed)."""
    from kvmhooks import operations, worker
    from kvmhooks.apply import live
    from kvmhooks.domain import parse_domain
    from kvmhooks.errors import ApplyError
    from tests.fakehost import domain_xml
    from tests.unit.test_live import FakeConn, FakeDom

    host = FakeHost(tmp_path, cores_per_node=4).build()
    cfg = host.config()
    xml = domain_xml(uuid=U1, backing="", tuning='<kvm:vcpupin vcpu="0" cpuset="1"/>', vcpus=1)
    operations.prepare(parse_domain(xml), cfg)
    operations.mark(U1, cfg, state="starting")
    real = live.apply_started
    newer: dict[str, object] = {}

    def apply_then_restart(*args: Any) -> Any:
        applied = real(*args)
        newer.update(restarted_meanwhile(cfg, xml))
        if fails:
            raise ApplyError("vcpupin 0 1: the domain went away")
        return applied

    monkeypatch.setattr(live, "apply_started", apply_then_restart)
    assert worker.tune_live(FakeConn(FakeDom(U1, xml, vcpus=1)), U1, cfg, "worker") is None
    assert operations.ledger_for(cfg).read().domains[U1].to_json() == newer  # untouched
    # Nor its failure file, where `kvmhooks status` looks (review of item 11d: it showed "worker: vcpupin ..."
    # on the newer run, whose prepare had cleared it).
    assert U1 not in operations.read_failures(cfg), operations.read_failures(cfg)
    assert operations.mark(U1, cfg, token="0" * 16, state="running") is False  # the check itself
    assert operations.mark(U1, cfg, token=str(newer["token"]), state="running") is True
    if fails:  # the same failure in the run's own lifetime is recorded: the guard is the token, not silence
        monkeypatch.setattr(live, "apply_started", lambda *args: (_ for _ in ()).throw(ApplyError("refused")))
        assert worker.tune_live(FakeConn(FakeDom(U1, xml, vcpus=1)), U1, cfg, "worker") is None
        assert "refused" in operations.read_failures(cfg)[U1]


def test_a_repin_carrying_an_old_token_leaves_the_newer_runs_pins_alone(tmp_path: Path) -> None:
    """repin_shared read the ledger, then the shared VM was restarted before its new pins were recorded: the
    re-pin's record update (for the old run) must not land on the new one."""
    from kvmhooks import operations
    from kvmhooks.apply.live import repin_shared
    from kvmhooks.domain import parse_domain
    from kvmhooks.log import VMLog
    from tests.fakehost import domain_xml
    from tests.unit.test_live import FakeConn, FakeDom

    host = FakeHost(tmp_path, cores_per_node=4).build()
    cfg = host.config(cpu_housekeeping=frozenset({0}))
    shared = domain_xml(uuid=U1, tuning='<kvm:cpu policy="shared"/>', backing="")
    operations.prepare(parse_domain(shared), cfg)
    operations.prepare(parse_domain(domain_xml(uuid=U2, tuning='<kvm:cpu policy="dedicated"/>', backing="")), cfg)
    newer: dict[str, object] = {}

    class Restarting(FakeDom):
        def pinVcpuFlags(self, v: int, cpumap: tuple[bool, ...], flags: int) -> None:
            super().pinVcpuFlags(v, cpumap, flags)
            if not newer:  # the VM is stopped and started again while the re-pin runs
                newer.update(restarted_meanwhile(cfg, shared))

    dom = Restarting(U1, shared)
    repin_shared(FakeConn(dom), cfg, VMLog("-", "-"))
    assert newer and dom.calls  # the re-pin ran against the old run
    assert operations.ledger_for(cfg).read().domains[U1].to_json() == newer


# --- the agent's job queue, and drift judged only after the start's tuning -----------------------------------

def queue_agent(tmp_path: Path) -> Any:
    from kvmhooks.agent import Agent

    return Agent(FakeHost(tmp_path).build().config())


def test_jobs_of_two_kinds_queued_while_one_runs_all_run_in_order(tmp_path: Path) -> None:
    a = queue_agent(tmp_path)
    ran: list[str] = []
    running = threading.Event()
    go = threading.Event()

    def tune() -> None:
        running.set()
        go.wait(5)
        ran.append("tune")

    t = threading.Thread(target=a._serial, args=(U1, "tuning", "tune", tune))
    t.start()
    assert running.wait(5)
    for name in ("retune", "drift"):  # asked for (by their events, on other threads) while the tune runs
        other = threading.Thread(target=a._serial, args=(U1, "tuning", name, lambda n=name: ran.append(n)))
        other.start()
        other.join(5)
        assert not other.is_alive()  # queued, not waited for
    a._serial(U1, "balloon", "balloon", lambda: ran.append("balloon"))  # another kind: not held up
    assert ran == ["balloon"]
    go.set()
    t.join(5)
    assert ran == ["balloon", "tune", "retune", "drift"] and not a.queued.get((U1, "tuning"))


def test_an_edit_queued_right_after_the_last_empty_check_is_not_lost(tmp_path: Path) -> None:
    """The running thread found the queue empty and is about to let the VM's lock go when the next edit is
    queued (its own thread could not take the lock, so it left the job to this one): it still runs."""
    a = queue_agent(tmp_path)
    ran: list[str] = []
    key = (U1, "tuning")

    class Queue(dict):  # type: ignore[type-arg]
        injected = False

        def pop(self, k: object, default: object = None) -> object:
            got = super().pop(k, default)
            if k == key and not got and not self.injected:  # the last empty check: the edit lands right after
                self.injected = True
                self[key] = {"retune": lambda: ran.append("retune")}
            return got

    a.queued = Queue()
    a._serial(U1, "tuning", "tune", lambda: ran.append("tune"))
    assert ran == ["tune", "retune"]


def test_drift_is_judged_only_after_the_starts_tuning_has_finished(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the start's tuning is done the live pins are not the plan's yet: that is no hand change (with
    drift = "restore" it would be "restored" under the tuning). A TUNABLE event of the tuning's own pins
    queues its check behind the tuning, which then finds the plan in place."""
    from kvmhooks import agent as agent_mod
    from kvmhooks import operations
    from kvmhooks.agent import Agent
    from kvmhooks.domain import parse_domain
    from tests.fakehost import domain_xml
    from tests.unit.test_live import FakeConn, FakeDom

    monkeypatch.setattr(agent_mod, "DRIFT_SETTLE", 0.0)
    host = FakeHost(tmp_path, cores_per_node=4).build()
    cfg = host.config(drift="restore")
    xml = domain_xml(uuid=U1, backing="", tuning='<kvm:vcpupin vcpu="0" cpuset="1"/>', vcpus=1)
    operations.prepare(parse_domain(xml), cfg)
    operations.mark(U1, cfg, state="starting")
    a = Agent(cfg)
    judged: list[str] = []
    real_drift = a._drift_once

    def drift_once(uuid: str) -> None:  # the real check, noting the record's state when it runs
        judged.append(operations.ledger_for(cfg).read().domains[uuid].state)
        real_drift(uuid)

    monkeypatch.setattr(a, "_drift_once", drift_once)

    class Dom(FakeDom):
        def pinVcpuFlags(self, v: int, cpumap: tuple[bool, ...], flags: int) -> None:
            t = threading.Thread(target=a._check_drift, args=(U1,))  # libvirt's TUNABLE event of this pin
            t.start()
            t.join(5)
            super().pinVcpuFlags(v, cpumap, flags)

    dom = Dom(U1, xml, vcpus=1)
    a.conn = FakeConn(dom)
    a._check_drift(U1)  # not tuned yet: the pins are libvirt's defaults, not the plan's — not judged
    assert dom.vcpus[0] == {0, 1, 2, 3} and not (cfg.state_dir / "failures" / U1).exists()
    monkeypatch.setattr(a, "_spawn", lambda job, uuid: job(uuid))
    a._tune(U1)
    assert judged[-1] == "running" and dom.vcpus[0] == {1}
    assert not (cfg.state_dir / "failures" / U1).exists()  # the tuning's own pin is no hand change
    dom.vcpus[0] = frozenset({3})  # now a hand change is one
    a._check_drift(U1)
    assert "changed by hand: vCPU 0 on 3 (planned 1); restored" in (cfg.state_dir / "failures" / U1).read_text()


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads: line")


def test_the_running_agent_keeps_its_threads_and_its_hook_socket_under_idle_and_busy_scrapers(
        host: FakeHost) -> None:
    """kvmhooksd itself, with metrics_listen: 300 idle clients on each endpoint leave its thread count as it
    was and a real scrape answered at once; scrapers hammering both endpoints never keep the started hook
    from its answer (the agent's own work, which has a 50 ms deadline)."""
    from kvmhooks.agent import metrics_socket_path, tell
    from kvmhooks.config import load_config
    from tests.unit.test_hook import write_config

    port = free_port()
    config = write_config(host, libvirt_uri='"test:///default"', metrics_listen=f'"127.0.0.1:{port}"')
    cfg = load_config(config)
    with agent_process(host, config, cfg) as agent:
        time.sleep(0.5)  # (its event loop and balloon cycle under way)
        before = threads_of(agent.pid)
        with idle_clients(lambda: tcp_client(port), 300), \
                idle_clients(lambda: unix_client(metrics_socket_path(cfg)), 300):
            time.sleep(0.5)
            assert threads_of(agent.pid) <= before
            t0 = time.monotonic()
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
            assert b"kvmhooks_up 1.0" in body and time.monotonic() - t0 < 2.0
        stop = threading.Event()
        scrapes = [0]

        def hammer() -> None:
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
                    scrapes[0] += 1

        hammers = [threading.Thread(target=hammer) for _ in range(8)]
        for t in hammers:
            t.start()
        try:
            answered = []
            for _ in range(20):
                time.sleep(0.05)
                answered.append(tell(cfg, U1))
        finally:
            stop.set()
            for t in hammers:
                t.join(10)
        assert all(answered) and scrapes[0] > 20
        assert threads_of(agent.pid) <= before


def test_a_live_edit_of_a_paused_vm_is_pinned_at_once_and_its_balloon_waits(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import libvirt

    from kvmhooks import operations
    from kvmhooks.agent import Agent
    from tests.fakehost import domain_xml
    from tests.unit.test_live import FakeConn

    cfg, dom, balloons = paused_vm(tmp_path)
    operations.mark(U1, cfg, state="running")
    record_balloon(monkeypatch, dom, balloons)
    dom.xml = domain_xml(uuid=U1, backing="", tuning='<kvm:vcpupin vcpu="0" cpuset="2"/>'
                         '<kvm:balloon target="150M" transport="libvirt"/>', vcpus=1)
    a = Agent(cfg)
    a.conn = FakeConn(dom)
    monkeypatch.setattr(a, "_spawn", lambda job, uuid: job(uuid))
    a._retune(U1)  # virsh metadata --live on the paused VM
    assert dom.vcpus[0] == {2} and balloons == []
    dom.resume()
    a._lifecycle(None, dom, libvirt.VIR_DOMAIN_EVENT_RESUMED, 0, None)
    assert balloons == ["running"]
