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

from kvmhooks.apply.qmp import QMPBalloon, QMPTransportError
from kvmhooks.plan.balloon import GUEST_HIGH, GuestMem, HostMem, auto_targets, fixed_target

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


# --- arithmetic and the automatic policy ---------------------------------------------------------------------

def test_fixed_target_clamps() -> None:
    assert fixed_target(192 * MIB, 128 * MIB, 256 * MIB) == 192 * MIB
    assert fixed_target(64 * MIB, 128 * MIB, 256 * MIB) == 128 * MIB
    assert fixed_target(512 * MIB, 128 * MIB, 256 * MIB) == 256 * MIB


IDLE_HOST = HostMem(total_kib=24 * 1024 * MIB, available_kib=20 * 1024 * MIB)
BUSY_HOST = HostMem(total_kib=24 * 1024 * MIB, available_kib=2 * 1024 * MIB)


def guest(actual: int, available: int, total: int | None = None, min_kib: int = 512 * MIB,
          max_kib: int = 4096 * MIB) -> GuestMem:
    return GuestMem("u", actual, max_kib, min_kib, total if total is not None else actual, available)


def run_cycles(host: HostMem, g: GuestMem, used: int, cycles: int) -> list[int]:
    """Replay the policy against a guest whose used memory stays constant (a recorded idle guest)."""
    sizes = []
    for _ in range(cycles):
        t = auto_targets(host, [g], 100 * MIB, 0.80).get("u", g.actual_kib)
        g = guest(t, t - used, min_kib=g.min_kib, max_kib=g.max_kib)
        sizes.append(t)
    return sizes


def test_idle_guest_shrinks_to_the_floor_at_the_step_rate_and_never_below() -> None:
    sizes = run_cycles(IDLE_HOST, guest(2048 * MIB, 1800 * MIB), used=248 * MIB, cycles=25)
    steps = [a - b for a, b in zip([2048 * MIB, *sizes], sizes, strict=False)]
    assert max(steps) <= 100 * MIB  # never faster than the step
    assert sizes[-1] == 512 * MIB and min(sizes) == 512 * MIB  # reaches min, never below


def test_floor_keeps_a_cushion_above_what_the_guest_uses() -> None:
    sizes = run_cycles(IDLE_HOST, guest(2048 * MIB, 1048 * MIB), used=1000 * MIB, cycles=30)
    assert sizes[-1] >= 1000 * MIB / (1 - 0.15) - 1 and min(sizes) >= 512 * MIB


def test_pressure_up_grows_the_guest_until_its_memory() -> None:
    g = guest(1024 * MIB, 50 * MIB)  # 5 % available: under pressure
    assert auto_targets(IDLE_HOST, [g], 100 * MIB, 0.80) == {"u": 1124 * MIB}
    g = guest(4040 * MIB, 50 * MIB)  # one step would pass the maximum: capped at <memory>
    assert auto_targets(IDLE_HOST, [g], 100 * MIB, 0.80) == {"u": 4096 * MIB}


def test_a_short_host_squeezes_comfortable_guests_but_not_starving_ones() -> None:
    comfy = guest(2048 * MIB, int(2048 * MIB * (GUEST_HIGH - 0.05)))  # between low and high: holds on an idle host
    assert auto_targets(IDLE_HOST, [comfy], 100 * MIB, 0.80) == {}
    assert auto_targets(BUSY_HOST, [comfy], 100 * MIB, 0.80) == {"u": 1948 * MIB}
    starving = guest(2048 * MIB, 100 * MIB)
    assert auto_targets(BUSY_HOST, [starving], 100 * MIB, 0.80) == {}


def test_deadband_and_missing_stats() -> None:
    near_floor = guest(512 * MIB + 5 * MIB, 400 * MIB)
    assert auto_targets(IDLE_HOST, [near_floor], 100 * MIB, 0.80) == {}
    assert auto_targets(IDLE_HOST, [GuestMem("u", 1024 * MIB, 4096 * MIB, 512 * MIB)], 100 * MIB, 0.80) == {}
