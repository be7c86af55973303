"""kvmhooksd, the adversarial review of issue 17's items 7, 9, 10 and 11d: the metrics endpoint outlives a
burst and a bug in one round (review #1), a connection flood from one address evicts only its own connections
(#2), start-agent.sh stops an agent from before the agent lock (#3), a paused VM's balloon is owed by the
ledger, not by memory (#4), a stale or stopped run records no failure (#5), a domain restored paused is tuned
while paused (#6), and a late STARTED event keeps a deferred tuning (#7)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from prometheus_client import CollectorRegistry, Gauge

from kvmhooks import agent as agentmod
from kvmhooks import metrics
from kvmhooks.agent import Agent
from kvmhooks.config import Config
from tests.fakehost import FakeHost
from tests.unit.test_agent_round2 import U1

# --- review #1, #2: the metrics endpoint -----------------------------------------------------------------------


@pytest.fixture
def endpoint() -> Iterator[tuple[metrics.MetricsServer, int]]:
    reg = CollectorRegistry()
    Gauge("x", "x", registry=reg).set(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    srv = metrics.serve_http(reg, f"127.0.0.1:{port}")
    try:
        yield srv, port
    finally:
        srv.close()


def scrape(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return b"x 1.0" in r.read()
    except OSError:
        return False


def client(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A connection from ``source`` (any 127/8 address is this host's loopback: another peer to the server)."""
    return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))


def test_the_endpoint_survives_more_than_max_waiting_clients_that_talk_at_once(
        endpoint: tuple[metrics.MetricsServer, int]) -> None:
    """A new connection evicted a waiting one that had also sent data in the same select() batch: the loop then
    looked the evicted one up (KeyError), and the catch-all closed the listener for good."""
    srv, port = endpoint
    assert scrape(port)
    for _ in range(20):  # each round: MAX_WAITING idle clients, then all send a byte while as many connect
        idle = [client(port) for _ in range(metrics.MAX_WAITING)]
        time.sleep(0.2)  # all accepted and waiting
        new = []
        for s in idle:  # a new client (the listener readable: room is made) and the oldest waiting one readable
            new.append(client(port))
            s.send(b"G")
        time.sleep(0.2)
        for s in idle + new:
            s.close()
        if not srv.threads[0].is_alive():
            break
    assert srv.threads[0].is_alive(), "the selector thread died"
    assert scrape(port), "the endpoint refuses scrapes"


def test_a_bug_in_one_round_never_closes_the_endpoint(endpoint: tuple[metrics.MetricsServer, int],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    srv, port = endpoint
    real = srv._dispatch
    calls = []

    def dispatch_failing_once(*args: object) -> None:
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(srv, "_dispatch", dispatch_failing_once)
    assert not scrape(port)  # that one request is lost with its round
    assert scrape(port), "the endpoint stopped after one failed round"
    assert srv.threads[0].is_alive()


def test_a_flood_from_one_address_never_evicts_another_addresses_connection(
        endpoint: tuple[metrics.MetricsServer, int]) -> None:
    """The scraper connects, then one address opens more idle connections than may wait in all; the scraper's
    request, sent after, is still answered (the flood evicted only its own connections)."""
    _, port = endpoint
    scraper = client(port)
    time.sleep(0.2)  # accepted: waiting for its request
    flood = [client(port, "127.0.0.2") for _ in range(metrics.MAX_WAITING + metrics.MAX_WAITING_PER_PEER)]
    try:
        time.sleep(0.3)  # all accepted
        scraper.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := scraper.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.0 200") and b"x 1.0" in answer, answer[:200]
        # The flood's newest connections wait (up to the cap); its oldest were closed to make room.
        flood[-1].sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        assert flood[-1].recv(65536).startswith(b"HTTP/1.0 200")
        assert flood[0].recv(1) == b""
    finally:
        scraper.close()
        for s in flood:
            s.close()


def test_many_addresses_share_max_waiting_and_the_biggest_holder_gives_way(
        endpoint: tuple[metrics.MetricsServer, int]) -> None:
    """Past MAX_WAITING from many addresses, each under its own cap: the one holding the most loses its oldest,
    an address with a single waiting connection keeps it."""
    _, port = endpoint
    scraper = client(port)
    time.sleep(0.2)
    per = metrics.MAX_WAITING_PER_PEER
    flood = [client(port, f"127.0.0.{2 + i // per}") for i in range(metrics.MAX_WAITING + 2 * per)]
    try:
        time.sleep(0.3)
        scraper.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        assert scraper.recv(65536).startswith(b"HTTP/1.0 200")
    finally:
        scraper.close()
        for s in flood:
            s.close()


# --- review #3: an upgrade without systemd from an agent that holds no lock --------------------------------------

# An agent from before agent.lock (17ae1ff^): today's code with its lock taken away. Like that one, it removes
# the socket and the pid file when it exits. Named kvmhooks so its command line reads "... kvmhooks agent ...".
PRE_LOCK_AGENT = """\
import os, sys
from kvmhooks import agent
agent.take_lock = lambda cfg: os.open(os.devnull, os.O_RDONLY)
from kvmhooks.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_start_agent_stops_an_agent_from_before_the_lock(host: FakeHost) -> None:
    """start-agent.sh stopped only an agent holding agent.lock: one from before the lock ran on beside the new
    one, and when it exited it removed the new one's socket (the hook then found no agent)."""
    from kvmhooks.agent import running
    from tests.unit.test_agent_round2 import REPO, agent_config, named_in_pid_file, pid_file, wait_for

    config, cfg = agent_config(host)
    (host.root / "old").mkdir()
    old_bin = host.root / "old" / "kvmhooks"
    old_bin.write_text(PRE_LOCK_AGENT)
    shim = host.root / "kvmhooks"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m kvmhooks.cli "$@"\n')
    shim.chmod(0o755)
    env = dict(os.environ, KVMHOOKS_STATE_DIR=str(cfg.state_dir), KVMHOOKS_AGENT_LOG=str(host.root / "agent.log"),
               KVMHOOKS_BIN=str(shim), KVMHOOKS_CONFIG=str(config), PYTHONPATH=str(REPO))
    with open(host.root / "old.out", "ab") as out:
        old = subprocess.Popen([sys.executable, str(old_bin), "agent", "--config", str(config), "--log-stderr"],
                               stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    new = None
    try:
        wait_for(lambda: named_in_pid_file(cfg, old.pid) or old.poll() is not None, 20, "the old agent")
        assert old.poll() is None and running(cfg), (host.root / "old.out").read_text()
        r = subprocess.run(["bash", str(REPO / "scripts/start-agent.sh")], env=env, capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr.decode() + (host.root / "agent.log").read_text()
        new = int(pid_file(cfg).read_text())
        assert new != old.pid
        assert old.poll() is not None, "two agents run"
        time.sleep(0.3)  # (had the old one been exiting still, this is when it removed the socket)
        assert running(cfg) and named_in_pid_file(cfg, new)
    finally:
        old.terminate()
        old.wait(20)
        for pid in agents_of(config):  # whichever the script started (the old script could leave two)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 15)
        wait_for(lambda: not agents_of(config), 20, "the agents to stop")


def agents_of(config: Path) -> list[int]:
    """The live processes whose command line or environment names ``config`` (this test's agents, whoever
    started them; zombies have neither)."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and any(str(config).encode() in (entry / f).read_bytes()
                                            for f in ("cmdline", "environ")):
                found.append(int(entry.name))
    return found


# --- review #4, #5, #6, #7: paused starts and stale runs -----------------------------------------------------------

def paused_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reason: str = "VIR_DOMAIN_PAUSED_USER"
                 ) -> tuple[Config, Any, list[str], Agent]:
    """test_agent_round2's paused VM (pinned, a fixed balloon target, handed over) and an agent connected to it
    whose jobs run at once; ``balloons`` lists the domain's state at each balloon step."""
    from tests.unit.test_agent_round2 import paused_vm, record_balloon
    from tests.unit.test_live import FakeConn

    cfg, dom, balloons = paused_vm(tmp_path, reason)
    record_balloon(monkeypatch, dom, balloons)
    a = Agent(cfg)
    a.conn = FakeConn(dom)
    monkeypatch.setattr(a, "_spawn", lambda job, uuid: job(uuid))
    return cfg, dom, balloons, a


def test_a_tuning_deferred_by_the_missed_event_watchdog_survives_the_late_started_event(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The STARTED event comes after EVENT_GRACE while an incoming migration still holds the domain: the watchdog
    ran _tune, which deferred it to the RESUMED event; the late STARTED event threw that away ("left from its
    previous run") and the RESUMED event found nothing to do: never pinned."""
    _, dom, balloons, a = paused_agent(tmp_path, monkeypatch, "VIR_DOMAIN_PAUSED_MIGRATION")
    a.pending[U1] = time.monotonic() - agentmod.EVENT_GRACE - 0.1  # told, no STARTED event yet
    a._missed_events()  # the watchdog: _tune -> busy -> deferred to RESUMED
    assert a.at_resume.get(U1) == {"tune"} and dom.calls == []
    a._lifecycle(None, dom, libvirt.VIR_DOMAIN_EVENT_STARTED, 0, None)  # the late STARTED event
    dom.resume()
    a._lifecycle(None, dom, libvirt.VIR_DOMAIN_EVENT_RESUMED, 0, None)  # the migration ends
    assert dom.vcpus[0] == {1} and balloons == ["running"], "never pinned"


def test_a_deferral_of_a_run_that_stopped_unseen_is_dropped_at_the_reconnect(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(The STARTED event no longer drops at_resume: a STOPPED event lost while disconnected is made up for at
    the reconnect, so the next run's RESUMED event does not run the old run's jobs.)"""
    _, dom, _, a = paused_agent(tmp_path, monkeypatch)
    a.at_resume[U1] = {"balloon"}  # from a run whose STOPPED event was lost
    dom.now = (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED)
    a.catch_up()
    assert U1 not in a.at_resume


def test_a_balloon_deferred_to_resumed_is_set_after_a_reconnect_that_missed_the_event(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`virsh start --paused`: pinned at once, the balloon waits for RESUMED. libvirtd restarts and the guest is
    resumed while the agent is disconnected: the event is lost, and catch_up() only looked at "starting"."""
    _, dom, balloons, a = paused_agent(tmp_path, monkeypatch)
    a.pending[U1] = time.monotonic()
    a._lifecycle(None, dom, libvirt.VIR_DOMAIN_EVENT_STARTED, 0, None)
    assert dom.vcpus[0] == {1} and balloons == [] and a.at_resume == {U1: {"balloon"}}
    dom.resume()  # while the agent's connection is down: no event
    a.catch_up()  # what _run does after reconnecting
    assert balloons == ["running"], f"balloon never set; at_resume still {a.at_resume}"
    a.catch_up()
    a.check_owed_balloons()
    assert balloons == ["running"]  # once per run


def test_a_balloon_owed_from_before_an_agent_restart_is_set_by_the_periodic_look(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent that pinned a paused VM restarted (its at_resume gone with it); the VM is resumed under the new
    one, whose RESUMED event has nothing in memory: the ledger says the balloon is still owed."""
    cfg, dom, balloons, first = paused_agent(tmp_path, monkeypatch)
    first.pending[U1] = time.monotonic()
    first._lifecycle(None, dom, libvirt.VIR_DOMAIN_EVENT_STARTED, 0, None)
    second = Agent(cfg)
    second.conn = first.conn
    monkeypatch.setattr(second, "_spawn", lambda job, uuid: job(uuid))
    second.check_owed_balloons()
    assert balloons == []  # still paused: it waits
    dom.resume()
    second._lifecycle(None, dom, libvirt.VIR_DOMAIN_EVENT_RESUMED, 0, None)
    second.check_owed_balloons()
    assert balloons == ["running"]
    second.check_owed_balloons()
    assert balloons == ["running"]


@pytest.mark.parametrize("end", ["destroyed", "restarted", "never resumed"])
def test_the_workers_balloon_wait_fails_only_for_its_own_running_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, end: str) -> None:
    """The worker pinned a VM started paused and waits for RUNNING to set its balloon. Destroyed meanwhile (its
    release clears the failures) or restarted (a newer run), it recorded "balloon: not set: the domain
    stopped ..." for a VM simply off, or on the newer run; only a run still paused at the deadline fails."""
    import threading

    from kvmhooks import operations, worker
    from tests.unit.test_agent_round2 import paused_vm, record_balloon, restarted_meanwhile
    from tests.unit.test_live import FakeConn

    cfg, dom, balloons = paused_vm(tmp_path)
    cfg = cfg.__class__(**{**cfg.__dict__, "worker_timeout": 1.0 if end == "never resumed" else 10.0})
    record_balloon(monkeypatch, dom, balloons)
    t = threading.Thread(target=worker.tune, args=(FakeConn(dom), U1, cfg, "worker"))
    t.start()
    deadline = time.monotonic() + 5
    while operations.ledger_for(cfg).read().domains[U1].state != "running" and time.monotonic() < deadline:
        time.sleep(0.02)
    if end == "destroyed":
        dom.now = (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED)  # virsh destroy
        operations.release(U1, cfg)  # its stopped/release hook
    elif end == "restarted":
        restarted_meanwhile(cfg, dom.XMLDesc(0).encode())
        dom.now = (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_STARTING_UP)  # the newer run starting
    t.join(15)
    assert not t.is_alive() and balloons == []
    failures = operations.read_failures(cfg)
    if end == "never resumed":
        assert "balloon: not set" in failures[U1]
    else:
        assert U1 not in failures, failures


def test_a_domain_restored_paused_is_tuned_while_paused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`virsh restore --paused` leaves the domain paused for "migration" (libvirt's reason for any start with an
    incoming stream), which was taken for a migration still running: never tuned until resumed. Now: "busy" only
    while a job holds it; the SUSPENDED event that ends the restore runs a tuning deferred meanwhile."""
    from kvmhooks import operations

    _, dom, balloons, a = paused_agent(tmp_path, monkeypatch, "VIR_DOMAIN_PAUSED_MIGRATION")
    a.pending[U1] = time.monotonic()
    a._lifecycle(None, dom, libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_RESTORED, None)
    assert dom.calls == [] and a.at_resume == {U1: {"tune"}}  # its restore still holds it: deferred
    dom.incoming = False  # the restore is over; the domain stays paused ("migration")
    a._lifecycle(None, dom, libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_RESTORED, None)
    rec = operations.ledger_for(a.cfg).read().domains[U1]
    assert dom.vcpus[0] == {1} and rec.state == "running" and balloons == []  # pinned while paused
    assert a.at_resume == {U1: {"balloon"}}
    dom.resume()
    a._lifecycle(None, dom, libvirt.VIR_DOMAIN_EVENT_RESUMED, 0, None)
    assert balloons == ["running"]


def test_the_worker_tunes_a_domain_restored_paused_at_once(tmp_path: Path) -> None:
    from kvmhooks import operations, worker
    from tests.unit.test_agent_round2 import paused_vm
    from tests.unit.test_live import FakeConn

    cfg, dom, _ = paused_vm(tmp_path, "VIR_DOMAIN_PAUSED_MIGRATION")
    dom.incoming = False  # restored: no job holds it
    assert worker.phase(dom) == "paused"
    assert worker.tune_live(FakeConn(dom), U1, cfg, "worker") is not None
    assert dom.vcpus[0] == {1} and operations.ledger_for(cfg).read().domains[U1].state == "running"
    dom.incoming = True  # a migration's destination: busy until it ends
    assert worker.phase(dom) == "busy"


def test_the_agent_puts_back_a_socket_and_pid_file_another_agent_removed(host: FakeHost) -> None:
    """What an agent from before the lock does when it exits beside this one (its exit path removes both sockets
    and the pid file, whoever made them): the hook, `kvmhooks metrics` and start-agent.sh must still find it."""
    from kvmhooks.agent import metrics_socket_path, running, socket_path, tell
    from tests.unit.test_agent_round2 import agent_config, agent_process, named_in_pid_file, pid_file, wait_for

    config, cfg = agent_config(host)
    with agent_process(host, config, cfg) as p:
        for path in (socket_path(cfg), metrics_socket_path(cfg), pid_file(cfg)):
            path.unlink()
        wait_for(lambda: running(cfg) and named_in_pid_file(cfg, p.pid), 5, "the socket and pid file back")
        assert tell(cfg, U1)
        wait_for(lambda: metrics.fetch_unix(metrics_socket_path(cfg)) is not None, 5, "the metrics socket back")
