"""Balloon: the QMP adapter against a fake QMP server, target arithmetic, and the automatic policy."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmhooks.apply.balloon import LibvirtBalloon, QMPStatsBalloon, parse_qmp_guest_stats
from kvmhooks.apply.qmp import QMPBalloon, QMPTransportError
from kvmhooks.plan.balloon import fixed_target

MIB = 1024
GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}


class FakeQMP:
    """A QMP server on a Unix socket, in a thread: greeting, capabilities negotiation, scripted replies."""

    def __init__(self, path: Path, handler: Callable[[str, dict[str, Any]], dict[str, Any] | None],
                 greet: bool = True):
        self.path, self.handler, self.greet = path, handler, greet
        self.received: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self.ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        self.server = await asyncio.start_unix_server(self._client, str(self.path))

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.greet:
            await asyncio.sleep(3600)  # a QEMU that never answers
        writer.write(json.dumps(GREETING).encode() + b"\n")
        await writer.drain()
        decoder, buf = json.JSONDecoder(), ""
        while chunk := await reader.read(4096):
            buf += chunk.decode()
            msgs = []
            while buf.strip():  # QMP is a JSON stream: messages need not end with a newline
                try:
                    msg, end = decoder.raw_decode(buf.lstrip())
                except ValueError:
                    break
                buf = buf.lstrip()[end:]
                msgs.append(msg)
            for msg in msgs:
                await self._reply(msg, writer)

    async def _reply(self, msg: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        cmd = msg["execute"]
        self.received.append(cmd)
        reply = {"return": {}} if cmd == "qmp_capabilities" else self.handler(cmd, msg.get("arguments", {}))
        if reply is None:
            return  # never answer this one
        reply["id"] = msg.get("id")
        writer.write(json.dumps(reply).encode() + b"\n")
        await writer.drain()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "vm.qmp"


@pytest.fixture
def qemu(sock: Path) -> Iterator[dict[str, Any]]:
    """A fake QEMU with a balloon that lands at once."""
    state: dict[str, Any] = {"actual": 256 * MIB * 1024, "period": 0}

    def handler(cmd: str, args: dict[str, Any]) -> dict[str, Any] | None:
        if cmd == "query-balloon":
            return {"return": {"actual": state["actual"]}}
        if cmd == "balloon":
            state["actual"] = args["value"]
            return {"return": {}}
        if cmd == "qom-set":
            state["period"] = args["value"]
            return {"return": {}}
        if cmd == "qom-get":
            return {"return": {"stats": {"stat-total-memory": 200 * MIB * 1024, "stat-available-memory":
                                         150 * MIB * 1024}, "last-update": 1700000000}}
        if cmd == "never":
            return None
        return {"error": {"class": "CommandNotFound", "desc": f"The command {cmd} has not been found"}}

    server = FakeQMP(sock, handler)
    yield state
    server.close()


def test_greeting_command_and_balloon(sock: Path, qemu: dict[str, Any]) -> None:
    with QMPBalloon(str(sock)) as b:
        assert b.actual_kib() == 256 * MIB
        b.enable_stats(2)
        assert qemu["period"] == 2
        b.set_target_kib(192 * MIB)
        assert b.wait_actual(192 * MIB, 0, 2) == 192 * MIB
        stats = b.guest_stats()
        assert stats == {"last_update": 1700000000, "total": 200 * MIB, "available": 150 * MIB}


def test_error_reply_is_a_typed_error_with_its_cause(sock: Path, qemu: dict[str, Any]) -> None:
    with QMPBalloon(str(sock)) as b, pytest.raises(QMPTransportError, match="has not been found"):
        b.execute("frobnicate")


def test_a_command_never_answered_times_out(sock: Path, qemu: dict[str, Any]) -> None:
    with QMPBalloon(str(sock), timeout=0.3) as b:
        t0 = time.monotonic()
        with pytest.raises(QMPTransportError, match="no answer within 0.3 s"):
            b.execute("never")
        assert time.monotonic() - t0 < 2


def test_a_server_that_never_greets_times_out(sock: Path) -> None:
    server = FakeQMP(sock, lambda c, a: {"return": {}}, greet=False)
    try:
        t0 = time.monotonic()
        with pytest.raises(QMPTransportError, match="connect .* no answer within 0.3 s"):
            QMPBalloon(str(sock), timeout=0.3).connect()
        assert time.monotonic() - t0 < 2
    finally:
        server.close()


def test_missing_socket_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(QMPTransportError, match=r"QMP connect on .*/nope.qmp"):
        QMPBalloon(str(tmp_path / "nope.qmp")).connect()


def test_a_closed_socket_mid_session_is_an_error_not_a_hang(sock: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    s.listen(1)

    def accept_and_close() -> None:
        conn, _ = s.accept()
        conn.sendall(json.dumps(GREETING).encode() + b"\n")
        conn.recv(4096)  # capabilities
        conn.close()

    t = threading.Thread(target=accept_and_close, daemon=True)
    t.start()
    with pytest.raises(QMPTransportError):
        QMPBalloon(str(sock), timeout=1).connect()
    s.close()


# --- arithmetic -----------------------------------------------------------------------------------------------

def test_fixed_target_clamps() -> None:
    assert fixed_target(192 * MIB, 128 * MIB, 256 * MIB) == 192 * MIB
    assert fixed_target(64 * MIB, 128 * MIB, 256 * MIB) == 128 * MIB
    assert fixed_target(512 * MIB, 128 * MIB, 256 * MIB) == 256 * MIB


# --- guest stats, checked for shape ------------------------------------------------------------------------------

def test_qmp_stats_include_major_faults_and_swap_in() -> None:
    raw = {"stats": {"stat-total-memory": 200 * MIB * 1024, "stat-available-memory": 150 * MIB * 1024,
                     "stat-major-faults": 42, "stat-swap-in": 8192, "stat-free-memory": -1}, "last-update": 7}
    assert parse_qmp_guest_stats(raw) == {"last_update": 7, "total": 200 * MIB, "available": 150 * MIB,
                                          "major_faults": 42, "swap_in": 8}


@pytest.mark.parametrize("raw", [None, [], "x", {"stats": []}, {"stats": None}])
def test_a_wrong_shaped_qmp_reply_is_a_transport_error(raw: object) -> None:
    with pytest.raises(QMPTransportError, match="unexpected reply"):
        parse_qmp_guest_stats(raw)


def test_odd_values_inside_a_right_shaped_reply_are_ignored() -> None:
    raw = {"stats": {"stat-total-memory": "lots", "stat-available-memory": True}, "last-update": "now"}
    assert parse_qmp_guest_stats(raw) == {"last_update": 0}


def test_libvirt_stats_include_major_faults_and_swap_in() -> None:
    class Dom:
        def memoryStats(self) -> dict[str, int]:
            return {"actual": 524288, "available": 500000, "usable": 400000, "unused": 300000, "major_fault": 3,
                    "swap_in": 16, "last_update": 99}

    assert LibvirtBalloon(Dom()).guest_stats() == {"last_update": 99, "total": 500000, "available": 400000,
                                                   "free": 300000, "major_faults": 3, "swap_in": 16}


def test_a_stats_only_qmp_guest_goes_through_the_balloon_adapter(sock: Path, qemu: dict[str, Any]) -> None:
    b = QMPStatsBalloon(str(sock))
    b.connect()
    try:
        assert b.guest_stats() == {"last_update": 1700000000, "total": 200 * MIB, "available": 150 * MIB}
        assert b.actual_kib() == 256 * MIB
    finally:
        b.close()


# --- balloond: state across cycles, and one VM's trouble costs only that VM ------------------------------------

class FakeDom:
    def __init__(self, xml: bytes, active: bool = True, paused: bool = False):
        self.xml, self.active, self.paused = xml, active, paused

    def isActive(self) -> bool:
        return self.active

    def state(self) -> list[int]:  # [state, reason] as libvirt's virDomainGetState: 1 running, 3 paused
        return [3, 1] if self.paused else [1, 1]

    def XMLDesc(self, flags: int) -> str:
        return self.xml.decode()


class FakeConn:
    def __init__(self, doms: dict[str, FakeDom]):
        self.doms = doms

    def lookupByUUIDString(self, uuid: str) -> FakeDom:
        return self.doms[uuid]

    def isAlive(self) -> bool:
        return True


class FakeGuestBalloon:
    """A guest using ``used`` KiB whose balloon lands at once; ``stats`` may be replaced by a bad reply.
    Its stats are stamped ``clock`` in whole seconds, as QEMU's last-update (the test moves the clock)."""

    transport = "fake"

    def __init__(self, actual: int, used: int):
        self.actual, self.used, self.clock = actual, used, 1_000.0
        self.bad: Exception | None = None

    def actual_kib(self) -> int:
        return self.actual

    def set_target_kib(self, kib: int) -> None:
        self.actual = kib

    def enable_stats(self, period: int) -> None:
        pass

    def guest_stats(self) -> dict[str, int]:
        if self.bad is not None:
            raise self.bad
        return {"last_update": int(self.clock), "total": self.actual, "available": self.actual - self.used}

    def close(self) -> None:
        pass


def test_balloond_carries_state_catches_per_vm_and_forgets_stopped_vms(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from kvmhooks import balloond
    from kvmhooks.ledger import DomainRecord, Ledger
    from tests.fakehost import FakeHost, domain_xml

    host = FakeHost(tmp_path).build()
    (host.proc / "meminfo").write_text("MemTotal: 1000000 kB\nMemAvailable: 900000 kB\n")
    cfg = host.config(balloon_interval=1.0)
    uuids = ["11111111-0000-0000-0000-00000000000" + str(i) for i in (1, 2)]
    tuning = '<kvm:balloon policy="auto" min="128M" reclaim="idle"/>'
    doms = {u: FakeDom(domain_xml(f"vm{i}", u, 512 * MIB, tuning=tuning, backing=""))
            for i, u in enumerate(uuids)}
    with Ledger(cfg.ledger_path).transaction() as st:
        for i, u in enumerate(uuids):
            st.domains[u] = DomainRecord(name=f"vm{i}", state="running")
    fakes = {u: FakeGuestBalloon(512 * MIB, 40 * MIB) for u in uuids}
    monkeypatch.setattr(balloond, "open_balloon", lambda d, spec, dom, vlog, announce: fakes[d.uuid])
    svc = balloond.Service(cfg)

    def cycle(now: float) -> dict[str, int]:
        for f in fakes.values():
            f.clock = now - 0.5  # the guests' latest stats, half a second before the cycle
        return svc.cycle(FakeConn(doms), now=now)

    fakes[uuids[0]].bad = TypeError("'list' object has no attribute 'get'")  # a wrong-shaped reply, say
    assert cycle(998.0) == {}  # first sight: at rest since when? no shrink on it
    set1 = cycle(1000.0)
    assert uuids[0] not in set1 and set1[uuids[1]] == 487 * MIB  # the other VM still had its cycle
    fakes[uuids[0]].bad = None
    for t in range(1, 40):
        cycle(1000.0 + 2 * t)
    assert all(f.actual == 128 * MIB for f in fakes.values())  # reclaim="idle" reached min for both
    assert set(svc.states) == set(uuids)
    doms[uuids[1]].active = False  # stopped (still in the ledger a moment): forgotten
    svc.cycle(FakeConn(doms), now=2000.0)
    assert set(svc.states) == {uuids[0]}


def test_balloond_leaves_a_paused_guest_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Started paused (OpenStack's way) or paused by the admin: no fresh stats, no balloon movement; it is
    neither read nor squeezed until it runs."""
    from kvmhooks import balloond
    from kvmhooks.ledger import DomainRecord, Ledger
    from tests.fakehost import FakeHost, domain_xml

    host = FakeHost(tmp_path).build()
    (host.proc / "meminfo").write_text("MemTotal: 1000000 kB\nMemAvailable: 10000 kB\n")  # a pressed host
    cfg = host.config(balloon_interval=1.0)
    u = "11111111-0000-0000-0000-000000000001"
    dom = FakeDom(domain_xml("vm1", u, 512 * MIB, tuning='<kvm:balloon policy="auto" min="128M"/>', backing=""),
                  paused=True)
    with Ledger(cfg.ledger_path).transaction() as st:
        st.domains[u] = DomainRecord(name="vm1", state="running")
    opened: list[str] = []
    monkeypatch.setattr(balloond, "open_balloon", lambda d, spec, dom, vlog, announce: opened.append(d.uuid))
    svc = balloond.Service(cfg)
    for t in range(10):
        assert svc.cycle(FakeConn({u: dom}), now=1000.0 + 5 * t) == {}
    assert opened == []
