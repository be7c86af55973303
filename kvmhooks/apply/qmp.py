"""The balloon over a VM's dedicated QMP socket, on qemu.qmp's QMPClient.

libvirt owns the domain's own monitor, so kvmhooks talks to a second ``-qmp`` socket that ``kvmhooks
annotate --qmp`` adds. Every connect and command has a deadline (a QEMU that never answers must not hang
the worker or the balloon service); qemu.qmp's errors become :class:`QMPTransportError` with the cause.
The adapter is synchronous on a private event loop, because its callers (worker, balloond) are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from qemu.qmp import QMPClient, QMPError

from kvmhooks.errors import ApplyError

log = logging.getLogger(__name__)
T = TypeVar("T")

# libvirt names the balloon device balloon0 (measured); its QOM path carries the guest-stats properties.
BALLOON_QOM = "/machine/peripheral/balloon0"
# QMP answers in milliseconds; 5 s means the monitor is stuck (QEMU paused in a long operation, or dead).
DEFAULT_TIMEOUT = 5.0
# Between query-balloon polls while a target lands (events alone lag: QEMU sends at most one a second).
POLL = 0.02


class QMPTransportError(ApplyError):
    """The QMP socket could not be reached, did not answer in time, or refused a command."""


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

    # --- the balloon -------------------------------------------------------------------------------------

    def actual_kib(self) -> int:
        return int(self.execute("query-balloon")["actual"]) // 1024

    def set_target_kib(self, kib: int) -> None:
        self.execute("balloon", {"value": kib * 1024})

    def enable_stats(self, period: int) -> None:
        self.execute("qom-set", {"path": BALLOON_QOM, "property": "guest-stats-polling-interval", "value": period})

    def guest_stats(self) -> dict[str, int]:
        """Guest memory in KiB (total, available, free) and last_update; last_update 0 = no driver yet."""
        raw = self.execute("qom-get", {"path": BALLOON_QOM, "property": "guest-stats"})
        stats = raw.get("stats", {})
        out = {"last_update": int(raw.get("last-update", 0))}
        for key, name in (("stat-total-memory", "total"), ("stat-available-memory", "available"),
                          ("stat-free-memory", "free")):
            v = stats.get(key, -1)
            if isinstance(v, int) and v >= 0:
                out[name] = v // 1024
        return out

    def wait_actual(self, target_kib: int, tolerance_kib: int, timeout: float) -> int:
        """Wait for actual ≈ target: BALLOON_CHANGE events, plus polling (QEMU throttles the events to one a
        second, so the last one may lag the moment the balloon lands)."""
        async def waiter() -> int:
            deadline = time.monotonic() + timeout
            with self._client.listener("BALLOON_CHANGE") as listener:
                while True:
                    actual = int((await self._client.execute("query-balloon"))["actual"]) // 1024  # type: ignore[index]
                    if abs(actual - target_kib) <= tolerance_kib or time.monotonic() >= deadline:
                        return actual
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(listener.get(), min(POLL, max(0.001, deadline - time.monotonic())))

        return self._run("wait for BALLOON_CHANGE", waiter(), timeout + self.timeout)
