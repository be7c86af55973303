"""The balloon over a VM's dedicated QMP socket, on qemu.qmp's QMPClient.

libvirt owns the domain's own monitor, so kvmhooks talks to a second ``-qmp`` socket that ``kvmhooks
annotate --qmp`` adds. Every connect and command has a deadline (a QEMU that never answers must not hang
the worker or the balloon service); qemu.qmp's errors become :class:`QMPTransportError` with the cause.
The adapter is synchronous on a private event loop, because its callers (worker, balloond) are.

Whatever answers on the socket is only trusted to speak JSON: every reply the balloon code reads is checked
for shape (a dict where one is expected, non-negative integers where numbers are), and anything else is a
QMPTransportError naming the command, so a wrong peer is one clear line, never a TypeError in the worker or
the balloon service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from qemu.qmp import QMPClient, QMPError

from kvmhooks.errors import QMPTransportError as QMPTransportError  # where its users import it from

log = logging.getLogger(__name__)
T = TypeVar("T")

# libvirt names the balloon device balloon0 (measured); its QOM path carries the guest-stats properties.
BALLOON_QOM = "/machine/peripheral/balloon0"
# QMP answers in milliseconds; 5 s means the monitor is stuck (QEMU paused in a long operation, or dead).
DEFAULT_TIMEOUT = 5.0
# Between query-balloon polls while a target lands (events alone lag: QEMU sends at most one a second).
POLL = 0.02
# QEMU keeps balloon sizes and guest stats in uint64; anything above is not QEMU talking.
U64_MAX = 2**64 - 1
# A guest stat the guest does not report is -1; QEMU stores that in a uint64, so it can also read 2^64-1.
_NOT_REPORTED = (-1, U64_MAX)


def _uint(value: object) -> int | None:
    """value if it is a JSON integer QEMU could send for a uint64 (bool is an int in Python), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= U64_MAX:
        return value
    return None


def _shown(raw: object) -> str:
    text = repr(raw)
    return text if len(text) <= 120 else text[:120] + "…"


class QMPBalloon:
    transport = "qmp"

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT, name: str = "kvmhooks"):
        self.path = path
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(name)
        self._connected = False

    def _run(self, what: str, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, timeout or self.timeout))
        except TimeoutError:
            raise QMPTransportError(f"QMP {what} on {self.path}: no answer within {timeout or self.timeout:g} s") \
                from None
        except (QMPError, OSError) as e:
            raise QMPTransportError(f"QMP {what} on {self.path}", e) from e

    def connect(self) -> QMPBalloon:
        self._run("connect", self._client.connect(self.path))
        self._connected = True
        return self

    def close(self) -> None:
        try:
            if self._connected:
                self._loop.run_until_complete(asyncio.wait_for(self._client.disconnect(), self.timeout))
        except (TimeoutError, QMPError, OSError) as e:
            log.debug("QMP disconnect from %s: %s", self.path, e)
        finally:
            self._connected = False
            self._loop.close()

    def __enter__(self) -> QMPBalloon:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def execute(self, cmd: str, args: dict[str, object] | None = None) -> Any:
        return self._run(cmd, self._client.execute(cmd, args))

    def _unexpected(self, what: str, raw: object, detail: str) -> QMPTransportError:
        return QMPTransportError(f"QMP {what} on {self.path}: unexpected reply ({detail}): {_shown(raw)}")

    def _actual_bytes(self, raw: object) -> int:
        """query-balloon's ``{"actual": bytes}``, checked."""
        if not isinstance(raw, dict):
            raise self._unexpected("query-balloon", raw, "expected an object")
        actual = _uint(raw.get("actual"))
        if actual is None:
            raise self._unexpected("query-balloon", raw, "'actual' must be a non-negative integer")
        return actual

    # --- the balloon -------------------------------------------------------------------------------------

    def actual_kib(self) -> int:
        return self._actual_bytes(self.execute("query-balloon")) // 1024

    def set_target_kib(self, kib: int) -> None:
        self.execute("balloon", {"value": kib * 1024})

    def enable_stats(self, period: int) -> None:
        self.execute("qom-set", {"path": BALLOON_QOM, "property": "guest-stats-polling-interval", "value": period})

    def guest_stats(self) -> dict[str, int]:
        """Guest memory in KiB (total, available, free) and last_update; last_update 0 = no driver yet."""
        raw = self.execute("qom-get", {"path": BALLOON_QOM, "property": "guest-stats"})
        what = "qom-get guest-stats"
        if not isinstance(raw, dict):
            raise self._unexpected(what, raw, "expected an object")
        stats = raw.get("stats")
        last_update = _uint(raw.get("last-update"))
        if not isinstance(stats, dict) or last_update is None:
            # QEMU always sends both (0 and all -1 before the guest driver reports).
            raise self._unexpected(what, raw, "expected 'stats' (an object) and 'last-update' (a non-negative "
                                   "integer)")
        out = {"last_update": last_update}
        for key, name in (("stat-total-memory", "total"), ("stat-available-memory", "available"),
                          ("stat-free-memory", "free")):
            v = stats.get(key, -1)
            if isinstance(v, int) and not isinstance(v, bool) and v in _NOT_REPORTED:
                continue
            n = _uint(v)
            if n is None:
                raise self._unexpected(what, raw, f"{key!r} must be a non-negative integer or -1")
            out[name] = n // 1024
        return out

    def wait_actual(self, target_kib: int, tolerance_kib: int, timeout: float) -> int:
        """Wait for actual ≈ target: BALLOON_CHANGE events, plus polling (QEMU throttles the events to one a
        second, so the last one may lag the moment the balloon lands)."""
        async def waiter() -> int:
            deadline = time.monotonic() + timeout
            with self._client.listener("BALLOON_CHANGE") as listener:
                while True:
                    actual = self._actual_bytes(await self._client.execute("query-balloon")) // 1024
                    if abs(actual - target_kib) <= tolerance_kib or time.monotonic() >= deadline:
                        return actual
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(listener.get(), min(POLL, max(0.001, deadline - time.monotonic())))

        return self._run("wait for BALLOON_CHANGE", waiter(), timeout + self.timeout)
