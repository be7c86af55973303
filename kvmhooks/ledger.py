"""The shared ledger: what kvmhooks holds for which VM, by UUID, in one JSON file under /run.

Every hook call is a separate process, so the ledger is the only shared state. It is guarded by an
``fcntl.flock`` on a side lock file, taken with a deadline (libvirt has no timeout on hooks, so a stuck
holder must not hang every VM start forever), and replaced atomically (temp file, fsync, rename, fsync of
the directory) so a crash mid-write leaves the old or the new state, never half of one. It lives in /run:
a reboot empties the pools and the ledger together.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvmhooks.errors import LockTimeout

LEDGER_VERSION = 1
# Poll interval while waiting for the lock: hooks hold it for milliseconds, so 10 ms keeps the wait short
# without spinning.
_LOCK_POLL = 0.01


@dataclass
class DomainRecord:
    name: str
    state: str = "prepared"  # prepared → running → (gone); "adopted" after a reconnect
    hugepages: dict[str, int] = field(default_factory=dict)  # pool key → pages
    cpus: list[int] = field(default_factory=list)  # dedicated host CPUs (exclusive among kvmhooks VMs)
    shared: bool = False  # floats over the shared pool; re-pinned when dedicated CPUs change
    pins: dict[str, Any] = field(default_factory=dict)  # planned pins (CpuPlan.to_record)
    applied: dict[str, Any] = field(default_factory=dict)  # what the worker applied, for status
    error: str | None = None
    updated: float = 0.0


@dataclass
class PoolRecord:
    baseline: int  # the admin's nr_hugepages before kvmhooks reserved anything in this pool


@dataclass
class LedgerState:
    domains: dict[str, DomainRecord] = field(default_factory=dict)
    pools: dict[str, PoolRecord] = field(default_factory=dict)

    def reserved(self, pool: str, excluding: str | None = None) -> int:
        """Pages kvmhooks holds in a pool, optionally not counting one VM."""
        return sum(r.hugepages.get(pool, 0) for u, r in self.domains.items() if u != excluding)

    def dedicated_cpus(self, excluding: str | None = None) -> frozenset[int]:
        return frozenset(c for u, r in self.domains.items() if u != excluding for c in r.cpus)

    def to_json(self) -> str:
        return json.dumps({"version": LEDGER_VERSION,
                           "domains": {u: asdict(r) for u, r in sorted(self.domains.items())},
                           "pools": {k: asdict(p) for k, p in sorted(self.pools.items())}}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> LedgerState:
        if not text.strip():
            return cls()
        data = json.loads(text)
        if data.get("version") != LEDGER_VERSION:
            raise ValueError(f"ledger version {data.get('version')!r} is not {LEDGER_VERSION}")
        return cls({u: DomainRecord(**r) for u, r in data.get("domains", {}).items()},
                   {k: PoolRecord(**p) for k, p in data.get("pools", {}).items()})


class Ledger:
    def __init__(self, path: Path, timeout: float = 30.0):
        self.path = path
        self.timeout = timeout

    @contextlib.contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            deadline = time.monotonic() + self.timeout
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                    if time.monotonic() >= deadline:
                        raise LockTimeout(f"ledger {self.path} stayed locked for {self.timeout:g} s; "
                                          "is another kvmhooks process stuck?") from None
                    time.sleep(_LOCK_POLL)
            yield
        finally:
            os.close(fd)  # closing drops the flock

    def _load(self) -> LedgerState:
        try:
            return LedgerState.from_json(self.path.read_text())
        except FileNotFoundError:
            return LedgerState()

    def read(self) -> LedgerState:
        """A consistent snapshot (shared lock) for readers such as ``kvmhooks status``."""
        with self._locked(fcntl.LOCK_SH):
            return self._load()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[LedgerState]:
        """Exclusive read-modify-write; the new state is written only if the block ends without error."""
        with self._locked(fcntl.LOCK_EX):
            state = self._load()
            before = state.to_json()
            yield state
            after = state.to_json()
            if after != before:
                self._write(after)

    def _write(self, text: str) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def stamp(record: DomainRecord) -> None:
    record.updated = round(time.time(), 3)
