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

import pytest
from prometheus_client import CollectorRegistry, Gauge

from kvmhooks import metrics
from tests.fakehost import FakeHost

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
