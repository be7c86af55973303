"""The shared ledger: what kvmhooks holds for which VM, by UUID, in one JSON file under /run.

Every hook call is a separate process, so the ledger is the only shared state. It is guarded by an
``fcntl.flock`` on a side lock file, taken with a deadline (libvirt has no timeout on hooks, so a stuck
holder must not hang every VM start forever), and replaced atomically (temp file, fsync, rename, fsync of
the directory) so a crash mid-write leaves the old or the new state, never half of one. It lives in /run:
a reboot empties the pools and the ledger together.

Besides the reservations it holds the **write-ahead intents**: before kvmhooks writes a hugepage pool it
commits an :class:`Intent` naming the pool, and it clears the intent (with the value the kernel really gave)
in the commit after the read-back. The lock is held from the first commit to the last, so an intent that
another lock holder finds belongs to a process that died or gave up mid-way; :mod:`kvmhooks.operations`
rolls it back or completes it before doing anything else.

The file format is versioned and read tolerantly: unknown fields are ignored (a newer kvmhooks may add
some), missing ones take their defaults, and anything else that is wrong (not JSON, wrong shape, a version
newer than ours) raises :class:`~kvmhooks.errors.LedgerError`, which says how to repair it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmhooks import GOVERNORS
from kvmhooks.errors import LedgerError, LockTimeout
from kvmhooks.units import format_cpuset, parse_cpuset

log = logging.getLogger(__name__)

LEDGER_VERSION = 2
# Versions this code reads: 1 had the same records with untyped pins and no intents.
_READABLE = (1, 2)
# Poll interval while waiting for the lock: hooks hold it for milliseconds, so 10 ms keeps the wait short
# without spinning.
_LOCK_POLL = 0.01
# The ledger keeps the last few repairs and inconsistencies it found, for `kvmhooks status`.
MAX_NOTES = 20


def _default(value: object, default: object) -> object:
    """A missing (or null) field takes its default; a present one of the wrong type stays wrong."""
    return default if value is None else value


def _obj(data: object, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise LedgerError(f"{what}: expected an object, got {type(data).__name__}")
    return data


def _int(data: dict[str, Any], key: str, what: str, default: int | None = None) -> int:
    v = data.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise LedgerError(f"{what}.{key}: expected an integer, got {v!r}")
    return v


def _opt_int(data: dict[str, Any], key: str, what: str) -> int | None:
    return None if data.get(key) is None else _int(data, key, what)


def _str(data: dict[str, Any], key: str, what: str, default: str | None = None) -> str:
    v = data.get(key, default)
    if not isinstance(v, str):
        raise LedgerError(f"{what}.{key}: expected a string, got {v!r}")
    return v


def _opt_str(data: dict[str, Any], key: str, what: str) -> str | None:
    return None if data.get(key) is None else _str(data, key, what)


def _cpus(text: object, what: str) -> frozenset[int]:
    if not isinstance(text, str):
        raise LedgerError(f"{what}: expected a CPU list string, got {text!r}")
    if text.isascii() and text.isdecimal() and len(text) < 5:  # one CPU, the common case: no parser needed
        return frozenset({int(text)})
    try:
        return parse_cpuset(text)
    except ValueError as e:
        raise LedgerError(f"{what}: {e}") from None


def _counts(data: object, what: str) -> dict[str, int]:
    d = _obj(data if data is not None else {}, what)
    out = {}
    for k, v in d.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise LedgerError(f"{what}[{k!r}]: expected a page count, got {v!r}")
        out[str(k)] = v
    return out


def _isolation(data: object, what: str) -> dict[str, Any] | None:
    """A record's isolation request: the governor becomes a sysfs write, so only a known name passes."""
    if data is None:
        return None
    d = _obj(data, what)
    governor = d.get("governor")
    if not isinstance(d.get("isolate"), bool) or not isinstance(d.get("irqs"), bool) or (
            governor is not None and governor not in GOVERNORS):
        raise LedgerError(f"{what}: expected isolate and irqs (true/false) and a known governor or null")
    return {"isolate": d["isolate"], "irqs": d["irqs"], "governor": governor}


def _isolation_section(data: object) -> dict[str, Any]:
    """The header's host isolation section, checked here so a corrupt one is a LedgerError at load (which
    `kvmhooks reconcile` repairs) rather than a failure later in some operation. Kept raw."""
    section = _obj(_default(data, {}), "isolation")
    if section:
        from kvmhooks.plan.isolation import IsolationState

        IsolationState.from_json(section, "isolation")
    return section


class _Lazy:
    """Decoded on first use: planning reads only a record's counts and CPUs, so a ledger of 1000 VMs need not
    decode 1000 sets of pins and worker results (``lazy`` makes an instance that holds only its raw JSON)."""

    @classmethod
    def lazy(cls, raw: dict[str, Any], what: str) -> Any:
        obj = object.__new__(cls)
        obj.__dict__["_raw"] = (raw, what)
        return obj

    def __getattribute__(self, name: str) -> Any:
        # Every field read goes through here (a field with a default is also a class attribute, so
        # __getattr__ alone would return the default of an undecoded instance).
        pending = "_raw" in object.__getattribute__(self, "__dict__")
        if pending and name in type(self).__dataclass_fields__:  # type: ignore[attr-defined]
            object.__getattribute__(self, "decode")()
        return object.__getattribute__(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # A field set before any was read: decode first, or the raw JSON would win (to_json writes it back as
        # it was read, and the first read would overwrite the new value with the decoded old one).
        if name in type(self).__dataclass_fields__:  # type: ignore[attr-defined]
            self.decode()
        object.__setattr__(self, name, value)

    def decode(self) -> None:
        """Decode now (a no-op once decoded); raises LedgerError for a part that does not decode."""
        d = object.__getattribute__(self, "__dict__")
        if "_raw" in d:
            raw, what = d.pop("_raw")
            d.update(type(self)._decode(raw, what).__dict__)

    @classmethod
    def _decode(cls, raw: dict[str, Any], what: str) -> Any:
        raise NotImplementedError

    def _undecoded(self) -> dict[str, Any] | None:
        pending = self.__dict__.get("_raw")
        return None if pending is None else pending[0]


@dataclass
class Pins(_Lazy):
    """The planned pins of one VM: what the worker applies and a re-pin of the shared pool rewrites."""

    vcpus: dict[int, frozenset[int]] = field(default_factory=dict)
    emulator: frozenset[int] | None = None
    iothreads: dict[int, frozenset[int]] = field(default_factory=dict)
    floating: tuple[int, ...] = ()  # vCPUs on the shared pool
    emulator_floats: bool = False

    def to_json(self) -> dict[str, Any]:
        raw = self._undecoded()
        if raw is not None:
            return raw
        return {"vcpus": {str(v): format_cpuset(c) for v, c in sorted(self.vcpus.items())},
                "emulator": format_cpuset(self.emulator) if self.emulator else None,
                "iothreads": {str(i): format_cpuset(c) for i, c in sorted(self.iothreads.items())},
                "floating": list(self.floating), "emulator_floats": self.emulator_floats}

    @classmethod
    def from_json(cls, data: object, what: str) -> Pins:
        return cls.lazy(_obj(data, what), what)  # type: ignore[no-any-return]

    @classmethod
    def _decode(cls, d: dict[str, Any], what: str) -> Pins:

        def by_number(key: str) -> dict[int, frozenset[int]]:
            m = _obj(d.get(key) or {}, f"{what}.{key}")
            if not all(str(k).isascii() and str(k).isdecimal() and len(str(k)) < 6 for k in m):
                raise LedgerError(f"{what}.{key}: keys must be numbers")
            return {int(k): _cpus(v, f"{what}.{key}[{k}]") for k, v in m.items()}

        floating = d.get("floating") or []
        if not isinstance(floating, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                     for v in floating):
            raise LedgerError(f"{what}.floating: expected a list of vCPU numbers")
        emu = d.get("emulator")
        return cls(by_number("vcpus"), None if emu is None else _cpus(emu, f"{what}.emulator"),
                   by_number("iothreads"), tuple(floating), bool(d.get("emulator_floats", False)))


def _v1_applied(raw: dict[str, Any]) -> bool:
    """Version 1 kept the worker's live pins as {"vcpus": {...}, "emulator": ...} and the worker as one object:
    such a raw copy is re-encoded, not passed on (``kvmhooks status`` would print the dict)."""
    pins = raw.get("pins")
    return "worker" in raw or (isinstance(pins, dict) and "vcpus" in pins)


@dataclass
class Applied(_Lazy):
    """What the worker applied after start, as read back from libvirt (shown by ``kvmhooks status``)."""

    vcpus_live: int | None = None
    pins: dict[str, str] = field(default_factory=dict)  # live vCPU pins as libvirt reports them
    emulator: str | None = None
    memtune: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    balloon: dict[str, str | int | float | bool] = field(default_factory=dict)
    worker_pid: int | None = None
    worker_sid: int | None = None
    worker_seconds: float | None = None
    tuned_by: str | None = None  # "worker" (the detached process) or "agent" (kvmhooksd)

    def to_json(self) -> dict[str, Any]:
        raw = self._undecoded()
        if raw is not None and not _v1_applied(raw):
            return raw
        self.decode()
        return {k: v for k, v in self.__dict__.items() if v not in (None, {}, [])}

    @classmethod
    def from_json(cls, data: object, what: str) -> Applied:
        return cls.lazy(_obj(data if data is not None else {}, what), what)  # type: ignore[no-any-return]

    @classmethod
    def _decode(cls, d: dict[str, Any], what: str) -> Applied:
        a = cls()
        a.vcpus_live = _opt_int(d, "vcpus_live", what)
        pins = d.get("pins") or {}
        if isinstance(pins, dict) and "vcpus" in pins:  # version 1 stored {"vcpus": {...}, "emulator": ...}
            a.emulator = pins.get("emulator") if isinstance(pins.get("emulator"), str) else None
            pins = pins["vcpus"]
        a.pins = {str(k): str(v) for k, v in _obj(pins, f"{what}.pins").items()}
        a.emulator = _opt_str(d, "emulator", what) or a.emulator
        a.memtune = _counts(d.get("memtune"), f"{what}.memtune")
        problems = d.get("problems") or []
        a.problems = [str(p) for p in problems] if isinstance(problems, list) else []
        balloon = _obj(d.get("balloon") or {}, f"{what}.balloon")
        a.balloon = {str(k): v for k, v in balloon.items() if isinstance(v, (str, int, float, bool))}
        worker = d.get("worker")  # version 1
        if isinstance(worker, dict):
            d = {**d, "worker_pid": worker.get("pid"), "worker_sid": worker.get("sid"),
                 "worker_seconds": worker.get("seconds")}
        a.worker_pid = _opt_int(d, "worker_pid", what)
        a.worker_sid = _opt_int(d, "worker_sid", what)
        a.tuned_by = _opt_str(d, "tuned_by", what)
        ws = d.get("worker_seconds")
        a.worker_seconds = float(ws) if isinstance(ws, (int, float)) and not isinstance(ws, bool) else None
        return a


@dataclass
class DomainRecord:
    """One VM's reservation. It stores what was reserved, so release and adoption never re-derive it."""

    name: str
    # preparing (intent in flight) → prepared → starting (worker spawned) → running; "adopted" at reconnect;
    # "claimed" by the migrate/restore filter for a VM coming in (CPUs held, pages counted, no pool written)
    # until its prepare turns the claim into the reservation or ``expires`` passes
    state: str = "prepared"
    # A new token for every reservation: a VM restarted since someone read the ledger has another one, so
    # a decision taken on the old snapshot (reconcile) is not applied to the new reservation.
    token: str = ""
    hugepages: dict[str, int] = field(default_factory=dict)  # pool key → pages kvmhooks added for this VM
    borrowed: dict[str, int] = field(default_factory=dict)  # pool key → pages promised from a left-alone pool
    cpus: list[int] = field(default_factory=list)  # every host CPU held exclusively: vCPUs, siblings, emulator
    threads: str | None = None  # the thread policy the CPUs were reserved under
    emulator_cpu: int | None = None  # the extra dedicated emulator CPU (emulator="isolate")
    shared: bool = False  # floats over the shared pool; re-pinned when dedicated CPUs change
    # <kvm:host>: keep the host off ``cpus`` while the VM runs ({"isolate", "irqs", "governor"}), or None
    isolation: dict[str, Any] | None = None
    pins: Pins | None = None
    applied: Applied = field(default_factory=Applied)
    error: str | None = None
    updated: float = 0.0
    # Adopted from facts that could not say where its huge pages are (page size "2048kB" → pages): counted in
    # no pool, so no pool is written for them; `kvmhooks reconcile` places them once the facts can be read.
    unplaced: dict[str, int] = field(default_factory=dict)
    expires: float = 0.0  # a claim's deadline (time.time()); 0 for every other state

    def holds_host(self) -> bool:
        """Whether releasing the record changes the host (pools, dedicated CPUs, its isolation) or pages another
        start may count on (borrowed), rather than only the ledger: the release of one that does not may wait
        (:attr:`Ledger.stopping_dir`)."""
        return bool(self.hugepages or self.borrowed or self.cpus or self.isolation or self.unplaced)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "token": self.token, "hugepages": self.hugepages,
                "borrowed": self.borrowed, "cpus": self.cpus, "threads": self.threads,
                "emulator_cpu": self.emulator_cpu, "shared": self.shared, "isolation": self.isolation,
                "pins": self.pins.to_json() if self.pins else None, "applied": self.applied.to_json(),
                "error": self.error, "updated": self.updated, **({"unplaced": self.unplaced} if self.unplaced else {}),
                **({"expires": self.expires} if self.expires else {})}

    @classmethod
    def from_json(cls, data: object, what: str) -> DomainRecord:
        d = _obj(data, what)
        cpus = d.get("cpus") or []
        if not isinstance(cpus, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in cpus):
            raise LedgerError(f"{what}.cpus: expected a list of CPU numbers")
        updated = d.get("updated", 0.0)
        expires = d.get("expires", 0.0)
        pins = d.get("pins")
        return cls(name=_str(d, "name", what), state=_str(d, "state", what, "prepared"),
                   token=_str(d, "token", what, ""),
                   hugepages=_counts(d.get("hugepages"), f"{what}.hugepages"),
                   borrowed=_counts(d.get("borrowed"), f"{what}.borrowed"), cpus=sorted(cpus),
                   threads=_opt_str(d, "threads", what), emulator_cpu=_opt_int(d, "emulator_cpu", what),
                   shared=bool(d.get("shared", False)),
                   isolation=_isolation(d.get("isolation"), f"{what}.isolation"),
                   pins=Pins.from_json(pins, f"{what}.pins") if pins else None,
                   applied=Applied.from_json(d.get("applied"), f"{what}.applied"),
                   error=_opt_str(d, "error", what),
                   updated=float(updated) if isinstance(updated, (int, float)) else 0.0,
                   unplaced=_counts(d.get("unplaced"), f"{what}.unplaced"),
                   expires=float(expires) if isinstance(expires, (int, float)) and not isinstance(expires, bool)
                   else 0.0)


@dataclass
class PoolRecord:
    """A pool kvmhooks writes: the admin's own size, and the size kvmhooks last left it at (read back).

    ``expected`` tells an admin's hand resize (the pool is no longer what kvmhooks left) from a shrink
    the kernel could not finish (the pool is what kvmhooks read back, above its target: retry later).
    """

    baseline: int
    expected: int = -1  # -1: unknown (a version 1 ledger): the first observation records it
    # Made from facts (a lost record, an adoption): the baseline may still hold the pages of running VMs not
    # adopted yet, and each one adopted takes its own out of it.
    inferred: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "expected": self.expected, **({"inferred": True} if self.inferred else {})}

    @classmethod
    def from_json(cls, data: object, what: str) -> PoolRecord:
        d = _obj(data, what)
        baseline = _int(d, "baseline", what)
        if baseline < 0:
            raise LedgerError(f"{what}.baseline: negative")
        return cls(baseline, _int(d, "expected", what, -1), d.get("inferred") is True)


@dataclass
class Intent:
    """A pool write in flight: committed before the sysfs write, cleared in the commit after the read-back."""

    pool: str
    before: int  # persistent pages before the write
    target: int
    pid: int
    op: str  # prepare, release, recover, reconcile, adopt
    uuid: str | None = None  # the VM the write is for (prepare: its reservation is rolled back)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: object, what: str) -> Intent:
        d = _obj(data, what)
        return cls(_str(d, "pool", what), _int(d, "before", what), _int(d, "target", what), _int(d, "pid", what),
                   _str(d, "op", what), _opt_str(d, "uuid", what))


# Records in these states have reserved, but QEMU has not mapped its memory yet: pages promised from a
# left-alone pool still count as free in the kernel.
NOT_MAPPED_YET = ("preparing", "prepared")
# A VM coming in (migrate/restore filter): its CPUs are held and its pages counted against the nodes' free
# memory, but no pool is grown for it until its prepare.
CLAIMED = "claimed"


def _merge(mine: Counter[Any], theirs: Counter[Any], sign: int) -> None:
    for k, v in theirs.items():
        mine[k] += sign * v
        if not mine[k]:
            del mine[k]


@dataclass
class Summary:
    """What every planning decision sums over all VMs, kept in the file's header.

    Maintained exactly: each transaction subtracts what the records it decoded contributed when read and adds
    what they contribute now, so a hook that touches one VM never decodes the other thousand. ``kvmhooks
    reconcile`` recomputes it from every record and repairs it if it ever disagrees.
    """

    held: Counter[str] = field(default_factory=Counter)  # pool → pages kvmhooks added for live reservations
    promised: Counter[str] = field(default_factory=Counter)  # pool → left-alone pages promised, not yet mapped
    cpus: Counter[int] = field(default_factory=Counter)  # CPU → how many VMs hold it (1, or a bug)
    shared: int = 0  # VMs floating over the shared pool
    preparing: set[str] = field(default_factory=set)  # VMs whose reservation is not finished
    isolating: set[str] = field(default_factory=set)  # VMs that ask to keep the host off their CPUs
    claimed: Counter[str] = field(default_factory=Counter)  # pool → pages claimed for VMs coming in (not in it)
    claims: set[str] = field(default_factory=set)  # VMs with an open claim (found without decoding every record)

    @classmethod
    def of(cls, uuid: str, r: DomainRecord) -> Summary:
        claim = r.state == CLAIMED
        return cls(Counter() if claim else Counter(r.hugepages),
                   Counter(r.borrowed if claim or r.state in NOT_MAPPED_YET else {}), Counter(r.cpus),
                   int(r.shared), {uuid} if r.state == "preparing" else set(),
                   {uuid} if r.isolation and r.cpus and not claim else set(),
                   Counter(r.hugepages) if claim else Counter(), {uuid} if claim else set())

    def add(self, other: Summary, sign: int = 1) -> None:
        _merge(self.held, other.held, sign)
        _merge(self.promised, other.promised, sign)
        _merge(self.cpus, other.cpus, sign)
        _merge(self.claimed, other.claimed, sign)
        self.shared += sign * other.shared
        self.preparing = self.preparing | other.preparing if sign > 0 else self.preparing - other.preparing
        self.isolating = self.isolating | other.isolating if sign > 0 else self.isolating - other.isolating
        self.claims = self.claims | other.claims if sign > 0 else self.claims - other.claims

    def copy(self) -> Summary:
        return Summary(Counter(self.held), Counter(self.promised), Counter(self.cpus), self.shared,
                       set(self.preparing), set(self.isolating), Counter(self.claimed), set(self.claims))

    def to_json(self) -> dict[str, Any]:
        return {"held": dict(sorted(self.held.items())), "promised": dict(sorted(self.promised.items())),
                "cpus": {str(c): n for c, n in sorted(self.cpus.items())}, "shared": self.shared,
                "preparing": sorted(self.preparing), "isolating": sorted(self.isolating),
                **({"claimed": dict(sorted(self.claimed.items()))} if self.claimed else {}),
                **({"claims": sorted(self.claims)} if self.claims else {})}

    @classmethod
    def from_json(cls, data: object) -> Summary:
        d = _obj(data, "summary")
        cpus = _counts(d.get("cpus"), "summary.cpus")
        if not all(k.isascii() and k.isdecimal() and len(k) < 6 for k in cpus):
            raise LedgerError("summary.cpus: keys must be CPU numbers")
        preparing, isolating, claims = d.get("preparing") or [], d.get("isolating") or [], d.get("claims") or []
        for name, uuids in (("preparing", preparing), ("isolating", isolating), ("claims", claims)):
            if not isinstance(uuids, list) or not all(isinstance(u, str) for u in uuids):
                raise LedgerError(f"summary.{name}: expected a list of UUIDs")
        return cls(Counter(_counts(d.get("held"), "summary.held")), Counter(_counts(d.get("promised"),
                                                                                    "summary.promised")),
                   Counter({int(k): v for k, v in cpus.items()}), _int(d, "shared", "summary", 0), set(preparing),
                   set(isolating), Counter(_counts(d.get("claimed"), "summary.claimed")), set(claims))


class Records(MutableMapping[str, DomainRecord]):
    """The VMs' records, decoded on first access.

    The file keeps one record per line, so a transaction that touches one VM (most hook calls) decodes and
    re-encodes that line only; the others are written back as they were read, and the sums planning needs
    come from the header's :class:`Summary`. A line that does not decode raises LedgerError with the repair.
    """

    def __init__(self, raw: dict[str, str] | None = None, where: str = "ledger", base: Summary | None = None):
        self._raw = raw or {}  # uuid → its line, not decoded yet
        self._rec: dict[str, DomainRecord] = {}
        self._where = where
        self._orig: dict[str, Summary] = {}  # what each decoded (or removed) record contributed when read
        self._base = base if base is not None else Summary()
        self.bad_summary = False  # the file's summary did not decode (recounted here): the repair path says so
        if base is None and self._raw:  # no summary in the file (or a bad one): count everything once
            self._base = self.recount()

    def __getitem__(self, uuid: str) -> DomainRecord:
        rec = self._rec.get(uuid)
        if rec is None:
            line = self._raw[uuid]
            try:
                rec = DomainRecord.from_json(json.loads(line), f"domains[{uuid}]")
            except (ValueError, RecursionError, LedgerError) as e:
                raise LedgerError(f"{self._where} is unreadable ({e}); run 'kvmhooks reconcile' to set it aside "
                                  "(what still reads is kept, the rest rebuilt from the running VMs)") from None
            del self._raw[uuid]
            self._rec[uuid] = rec
            self._orig[uuid] = Summary.of(uuid, rec)
        return rec

    def __setitem__(self, uuid: str, rec: DomainRecord) -> None:
        if uuid in self._raw:
            self[uuid]  # decoded first, so what it contributed is taken away
        self._rec[uuid] = rec

    def __delitem__(self, uuid: str) -> None:
        self[uuid]
        del self._rec[uuid]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._raw.keys() | self._rec.keys()))  # a list: callers may change the mapping

    def __len__(self) -> int:
        return len(self._raw) + len(self._rec)

    def __contains__(self, uuid: object) -> bool:
        return uuid in self._rec or uuid in self._raw

    def light(self) -> dict[str, str]:
        """The tokens of the records decoded so far that hold nothing of the host's
        (:meth:`DomainRecord.holds_host`); the others are as they were read, or hold something."""
        return {uuid: rec.token for uuid, rec in self._rec.items() if not rec.holds_host()}

    def decoded(self) -> set[str]:
        return set(self._rec)

    def summary(self) -> Summary:
        """The sums as they are now: the file's, minus what decoded records brought, plus what they bring."""
        out = self._base.copy()
        for orig in self._orig.values():
            out.add(orig, -1)
        for uuid, rec in self._rec.items():
            out.add(Summary.of(uuid, rec))
        return out

    def recount(self) -> Summary:
        """The sums from every record (decodes them all)."""
        out = Summary()
        for uuid in self:
            out.add(Summary.of(uuid, self[uuid]))
        return out

    def rebase(self, exact: Summary) -> None:
        """Make :meth:`summary` equal ``exact`` (a recount) from now on."""
        base = exact.copy()
        for orig in self._orig.values():
            base.add(orig)
        for uuid, rec in self._rec.items():
            base.add(Summary.of(uuid, rec), -1)
        self._base = base

    def lines(self) -> Iterator[str]:
        for uuid in self:
            raw = self._raw.get(uuid)
            yield raw if raw is not None else json.dumps({"uuid": uuid, **self._rec[uuid].to_json()},
                                                         separators=(",", ":"))


@dataclass
class LedgerState:
    domains: Records = field(default_factory=Records)
    pools: dict[str, PoolRecord] = field(default_factory=dict)
    intents: list[Intent] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # recent repairs and inconsistencies, newest last
    # Host isolation (kvmhooks.plan.isolation.IsolationState as JSON): the admin's originals, intents, what
    # kvmhooks wrote. Kept raw here: only the operations that isolate decode it, the hook's others never.
    isolation: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.domains, Records):  # built from a plain mapping (tests, tools)
            records = Records()
            for uuid, rec in dict(self.domains).items():
                records[uuid] = rec
            self.domains = records

    def as_dict(self) -> dict[str, Any]:
        """Everything decoded, as plain data (``kvmhooks status --json``, tests, tools)."""
        return {"version": LEDGER_VERSION, "domains": {u: r.to_json() for u, r in self.domains.items()},
                "pools": {k: p.to_json() for k, p in sorted(self.pools.items())},
                "intents": [i.to_json() for i in self.intents], "notes": self.notes,
                "summary": self.domains.summary().to_json(), "isolation": self.isolation}

    def _mine(self, uuid: str | None) -> Summary:
        return Summary.of(uuid, self.domains[uuid]) if uuid is not None and uuid in self.domains else Summary()

    def reserved(self, pool: str, excluding: str | None = None) -> int:
        """Pages kvmhooks added to a pool for live reservations, optionally not counting one VM."""
        return self.domains.summary().held[pool] - self._mine(excluding).held[pool]

    def promised(self, pool: str, excluding: str | None = None) -> int:
        """Pages of a left-alone pool promised to VMs whose QEMU has not mapped them yet."""
        return self.domains.summary().promised[pool] - self._mine(excluding).promised[pool]

    def claimed(self, pool: str, excluding: str | None = None) -> int:
        """Pages of a pool claimed for VMs coming in (migrate/restore filter), not yet in the pool."""
        return self.domains.summary().claimed[pool] - self._mine(excluding).claimed[pool]

    def dedicated_cpus(self, excluding: str | None = None) -> frozenset[int]:
        held = self.domains.summary().cpus
        held.subtract(self._mine(excluding).cpus)
        return frozenset(c for c, n in held.items() if n > 0)

    def any_shared(self) -> bool:
        return self.domains.summary().shared > 0

    def preparing(self) -> set[str]:
        return self.domains.summary().preparing

    def claims(self) -> set[str]:
        return self.domains.summary().claims

    def note(self, text: str) -> None:
        self.notes.append(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}")
        del self.notes[:-MAX_NOTES]

    def to_json(self) -> str:
        """The file: a header line (version, pools, intents, notes), then one line per VM, by UUID.

        Compact, so json's C accelerator encodes it (indent= falls back to pure Python: 136 ms for 1000 VMs
        under the global lock), and line-based, so an untouched record is copied, not re-encoded.
        """
        head: dict[str, Any] = {"version": LEDGER_VERSION,
                                "pools": {k: p.to_json() for k, p in sorted(self.pools.items())},
                                "intents": [i.to_json() for i in self.intents], "notes": self.notes,
                                "summary": self.domains.summary().to_json()}
        if self.isolation:
            head["isolation"] = self.isolation
        header = json.dumps(head, separators=(",", ":"))
        return "\n".join([header, *self.domains.lines()]) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "ledger") -> LedgerState:
        if not text.strip():
            return cls()
        first, _, rest = text.partition("\n")
        try:
            head = json.loads(first)
        except (ValueError, RecursionError):
            head = None
        if isinstance(head, dict) and "domains" not in head and head.get("version") == LEDGER_VERSION:
            raw = {}
            for n, line in enumerate(rest.splitlines(), 2):
                if not line.strip():
                    continue
                # The UUID leads every line: find it without decoding the rest.
                if not line.startswith('{"uuid":"') or line[45:47] != '",':
                    raise LedgerError(f"line {n}: not a VM record")
                raw[line[9:45]] = line
            data = head
            bad_summary = False
            try:
                base = Summary.from_json(head["summary"]) if "summary" in head else None
            except LedgerError:
                base, bad_summary = None, True  # recounted from the records
            domains = Records(raw, where, base)
            domains.bad_summary = bad_summary
        else:  # version 1 (one indented document), or something that is not a ledger
            try:
                data = _obj(json.loads(text), "ledger")
            except (ValueError, RecursionError) as e:
                raise LedgerError(f"not JSON ({e})") from None
            version = data.get("version")
            if version not in _READABLE:
                raise LedgerError(f"version {version!r} is not one this kvmhooks reads "
                                  f"({', '.join(map(str, _READABLE))})")
            domains = Records()
            for u, r in _obj(_default(data.get("domains"), {}), "domains").items():
                domains[str(u)] = DomainRecord.from_json(r, f"domains[{u}]")
            domains = Records({u: json.dumps({"uuid": u, **r.to_json()}, separators=(",", ":"))
                               for u, r in domains.items()}, where)
        pools = _obj(_default(data.get("pools"), {}), "pools")
        intents = _default(data.get("intents"), [])
        if not isinstance(intents, list):
            raise LedgerError("intents: expected a list")
        notes = data.get("notes") or []
        return cls(domains, {str(k): PoolRecord.from_json(p, f"pools[{k}]") for k, p in pools.items()},
                   [Intent.from_json(i, f"intents[{n}]") for n, i in enumerate(intents)],
                   [str(n) for n in notes] if isinstance(notes, list) else [],
                   _isolation_section(data.get("isolation")))


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _decoded_record(uuid: str, data: object) -> DomainRecord:
    """A record decoded entirely (its pins and the worker's results too), or LedgerError."""
    if not _MARKER_RE.fullmatch(uuid):
        raise LedgerError(f"{uuid[:40]!r}: not a UUID")
    rec = DomainRecord.from_json(data, f"domains[{uuid}]")
    if rec.pins is not None:
        rec.pins.decode()
    rec.applied.decode()
    return rec


def check_records(state: LedgerState) -> None:
    """Decode every record entirely (the repair path): raises LedgerError at the first that does not."""
    for uuid in state.domains:
        rec = state.domains[uuid]
        if rec.pins is not None:
            rec.pins.decode()
        rec.applied.decode()


def salvage(raw: bytes) -> tuple[LedgerState, list[str]]:
    """Every part of an unreadable ledger that still decodes on its own, and one line per part that does not.

    The ledger is one header and one line per VM, so a broken VM line, pool or intent costs only itself: the
    other VMs' reservations and the admin's baselines (without them adoption would take whatever the pools
    hold now for the admin's value) are kept, and only the broken part is rebuilt from facts by
    ``kvmhooks reconcile``. The VM lines are read whatever became of the header (a first line that is a VM
    record is one). A version 1 file is one document: if it is not JSON, nothing of it can be read.
    """
    text = raw.decode("utf-8", errors="replace")
    first, _, rest = text.partition("\n")
    head = _json_object(first)
    if head is None or "domains" in head:  # version 1 is one document (indented: its first line is "{")
        head = _json_object(text) or head
    records: list[tuple[str, object]] = []
    lost: list[str] = []
    if head is not None and "domains" in head:  # version 1
        domains = head.get("domains")
        if isinstance(domains, dict):
            records = [(str(u), r) for u, r in domains.items()]
        elif domains is not None:
            lost.append("the VM records (not an object)")
    else:  # version 2: a header line, then a line per VM
        first_is_record = head is not None and "uuid" in head  # the header line is gone
        headless = head is None or first_is_record  # (or it does not decode)
        for n, line in enumerate((text if first_is_record else rest).splitlines(), 1 if first_is_record else 2):
            if not line.strip():
                continue
            data = _json_object(line)
            uuid = data.get("uuid") if data is not None else None
            if not isinstance(uuid, str):
                lost.append(f"line {n} (not a VM record)")
                continue
            records.append((uuid, data))
        if headless and not records:
            return LedgerState(), ["everything (neither a header line nor a document that is JSON)"]
        if head is None or headless:
            lost.insert(0, "the header (the pools' baselines, interrupted writes, the host isolation section)")
            head = {}
    state = LedgerState()
    for uuid, item in records:
        try:
            state.domains[uuid] = _decoded_record(uuid, item)
        except LedgerError as e:
            name = item.get("name") if isinstance(item, dict) else None
            lost.append(f"the record of VM {name!r} ({uuid[:40]}): {e}" if isinstance(name, str)
                        else f"the record of {uuid[:40]}: {e}")
    pools = head.get("pools")
    for key, p in (pools.items() if isinstance(pools, dict) else ()):
        try:
            state.pools[str(key)] = PoolRecord.from_json(p, f"pools[{key}]")
        except LedgerError as e:
            lost.append(f"the record of pool {str(key)[:40]} ({e})")
    intents = head.get("intents")
    for n, i in enumerate(intents if isinstance(intents, list) else ()):
        try:
            state.intents.append(Intent.from_json(i, f"intents[{n}]"))
        except LedgerError as e:
            lost.append(f"an interrupted pool write ({e})")
    notes = head.get("notes")
    state.notes = [str(n) for n in notes][-MAX_NOTES:] if isinstance(notes, list) else []
    try:
        state.isolation = _isolation_section(head.get("isolation"))
    except LedgerError as e:
        lost.append(f"the host isolation section ({e})")
    return state, lost


HELD_DIR = "held"
TUNE_DIR = "tune"
UP_DIR = "up"
STOPPING_DIR = "stopping"
RECOUNTED = "the ledger's summary did not decode or disagreed with its records; recounted"
_MARKER_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TOKEN_RE = re.compile(r"[0-9a-f]{1,64}")  # (new_token: 16 hex digits; what the shell copies, checked there too)


def _make_marker_dir(d: Path, names: set[str]) -> None:
    """``d`` with an empty marker per name, appearing whole (filled aside, then renamed); left absent on
    failure (the shell then hands every call to Python)."""
    import shutil

    tmp = d.with_name(f".{d.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(mode=0o755)
        for name in names:
            _set_marker(tmp / name)
        os.rename(tmp, d)
    except OSError as e:
        log.warning("ledger: cannot make %s (%s); the shell hands those calls to Python", d, e)
        shutil.rmtree(tmp, ignore_errors=True)


def _set_marker(p: Path, content: bytes = b"") -> None:
    """Make the marker ``p`` with ``content`` (written whole, in one call). Never through a link planted
    there."""
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        if content:
            os.pwrite(fd, content, 0)
        os.ftruncate(fd, len(content))
    finally:
        os.close(fd)


def _retire(d: Path, error: OSError) -> None:
    """A marker directory that cannot take a marker goes out of use (the shell then hands every VM's call
    to Python, which is always right) rather than lie by a missing marker; the next commit that can makes it
    again. Only if even the rename fails does the caller fail (its commit then waits for a writable /run)."""
    aside = d.with_name(f"{d.name}.broken-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(d, aside)
    log.warning("ledger: cannot mark VMs in %s (%s); moved it to %s, the shell hands those calls to Python "
                "until a commit marks them again", d, error, aside)
    import shutil

    shutil.rmtree(aside, ignore_errors=True)


class Transaction:
    """An exclusive hold on the ledger: ``state`` to change, ``commit()`` to make a step durable."""

    def __init__(self, ledger: Ledger, state: LedgerState, text: str):
        self.ledger = ledger
        self.state = state
        self._written = text  # what the file holds now: an untouched state encodes to the same text

    def commit(self) -> None:
        """Write the state now (the lock stays held); a no-op when nothing changed."""
        text = self.state.to_json()
        if text != self._written:
            held = set(self.state.domains)
            light = self.state.domains.light()
            self.ledger._mark_held(held, light, self.state.domains.decoded())
            self.ledger._write(text)
            self.ledger._mark_light(light)
            self.ledger._unmark_released(held)
            self._written = text


class Ledger:
    def __init__(self, path: Path, timeout: float = 30.0):
        self.path = path
        self.timeout = timeout
        self.set_aside: Path | None = None  # where hold(quarantine=True) moved an unreadable ledger
        self.lost: list[str] = []  # the parts of it that did not decode (the rest was kept)
        self.recounted = False  # hold(quarantine=True) found the header's sums wrong and recounted them

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

    def _load(self) -> tuple[LedgerState, str]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            empty = LedgerState()
            return empty, empty.to_json()  # nothing to write until something changes
        except OSError as e:
            raise LedgerError(f"ledger {self.path} cannot be read: {e}") from None
        try:
            text = raw.decode("utf-8")
            return LedgerState.from_json(text, f"ledger {self.path}"), text
        except (LedgerError, UnicodeDecodeError) as e:
            raise LedgerError(f"ledger {self.path} is unreadable ({e}); run 'kvmhooks reconcile' to set it aside "
                              "(what still reads is kept, the rest rebuilt from the running VMs)") from None

    def read(self) -> LedgerState:
        """A consistent snapshot (shared lock) for readers such as ``kvmhooks status``."""
        with self._locked(fcntl.LOCK_SH):
            state, _ = self._load()  # records decode later, from the lines read here under the lock
            return state

    @contextlib.contextmanager
    def transaction(self) -> Iterator[LedgerState]:
        """Exclusive read-modify-write; the new state is written only if the block ends without error."""
        with self.hold() as txn:
            yield txn.state

    @contextlib.contextmanager
    def hold(self, quarantine: bool = False) -> Iterator[Transaction]:
        """Exclusive hold with explicit commits; what is left uncommitted is written when the block ends
        without error. ``quarantine`` (the repair path, ``kvmhooks reconcile``): every record is decoded
        entirely and the sums recounted; an unreadable ledger is moved aside (kept, timestamped) and what of it
        still decodes (:func:`salvage`) begins the new one; ``lost`` lists the rest, for the caller to rebuild."""
        with self._locked(fcntl.LOCK_EX):
            try:
                state, text = self._load()
                if quarantine:  # the repair path finds a bad record here, not half-way, and checks the sums
                    check_records(state)
                    exact = state.domains.recount()
                    if state.domains.bad_summary or exact.to_json() != state.domains.summary().to_json():
                        state.note(RECOUNTED)
                        state.domains.rebase(exact)
                        self.recounted = True
            except LedgerError as e:
                if not quarantine:
                    raise
                state, text = self._set_aside(e)
            txn = Transaction(self, state, text)
            yield txn
            txn.commit()

    def _set_aside(self, error: LedgerError) -> tuple[LedgerState, str]:
        """Keep the unreadable file aside as it is, and begin again from what of it still decodes.

        Aside as a second link, not a rename: the unreadable file stays the ledger until the first commit
        replaces it atomically, so a repair killed in between leaves it to the next one, not an empty ledger."""
        try:
            raw = self.path.read_bytes()
        except OSError:
            raw = b""
        aside = self.path.with_name(f"{self.path.name}.broken-{time.strftime('%Y%m%dT%H%M%S')}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(aside)  # (the same file, linked by a repair killed within this second)
        with contextlib.suppress(FileNotFoundError):
            os.link(self.path, aside)
        state, self.lost = salvage(raw)
        self.set_aside = aside
        why = str(error).partition(" (")[2].rpartition("); run")[0] or str(error)
        state.note(f"the unreadable ledger ({why}) was copied to {aside}; kept {len(state.domains)} VM record(s), "
                   f"{len(state.pools)} pool record(s)" + (" and the host isolation section" if state.isolation
                                                            else ""))
        for part in self.lost:
            state.note(f"could not read {part}: rebuilt from the running VMs and the pools")
        return state, ""

    @property
    def held_dir(self) -> Path:
        """One file per VM with a record (``held/UUID``), beside the ledger. Empty, or the record's token (a
        line) when the record holds nothing of the host's (:meth:`DomainRecord.holds_host`): only then may its
        release wait (:meth:`stopping_dir`).

        The shell dispatcher answers "does this unannotated VM hold anything?" at every stop with one
        ``[ -e ]`` here instead of a grep of the ledger (a fork per stop of every VM on the host). A marker is
        created before the record is committed and removed after, so a record never lacks one; a stale marker
        only costs one Python start at that VM's stop. The token is written after the commit that makes the
        record light and cleared before the one that makes it hold something, so the marker errs on the side
        of a release at once: an empty marker (made by an older version, made anew, or not yet filled) is one.
        """
        return self.path.with_name(HELD_DIR)

    @property
    def stopping_dir(self) -> Path:
        """One file per VM whose stop hooks/qemu left for later (``stopping/UUID``, holding the token its
        ``held/`` marker had): a record that holds nothing of the host's and no kvmhooksd to serve the stop.
        Removing such a record changes nothing a user can see on the host, so the shell does not make ``virsh
        destroy`` wait for an interpreter: it leaves this marker and starts the detached worker (``kvmhooks.worker
        stopped``), and every session first releases each marked VM whose record still has that token
        (:func:`kvmhooks.operations.settle_stops`): libvirt runs a VM's next prepare only after its stop hooks
        returned, so that prepare settles it first, and a marker that outlived its settle (it could not be
        removed) never meets a newer run's record: another token."""
        return self.path.with_name(STOPPING_DIR)

    @property
    def tune_dir(self) -> Path:
        """One empty file per VM whose ``started`` hook has work this run (``tune/UUID``): live tuning, or
        pages of a left-alone pool to be counted as mapped. The shell dispatcher ends a ``started`` without
        Python when the marker is absent (and ``tune/`` is a directory). Prepare sets or clears it before the
        commit that makes the record "prepared"; release drops it with the record. A stale marker only costs
        one Python start at that VM's ``started``."""
        return self.path.with_name(TUNE_DIR)

    @property
    def up_dir(self) -> Path:
        """One empty file per VM whose ``started`` hook ran this run (``up/UUID``), left by hooks/qemu itself
        (no Python): a record still "prepared" with it belongs to a VM that did start, so reconcile needs no
        starting grace for it. Prepare clears it (a new run), release drops it with the record."""
        return self.path.with_name(UP_DIR)

    def begin_run(self, uuid: str) -> None:
        """A new run of the VM (prepare, with the lock held): its ``up/`` marker is the last run's, and so is
        its ``tune/`` marker, which goes too (:meth:`mark_tune` makes a new one if this run has work): a
        worker still waiting for the last run (:func:`kvmhooks.worker.run_waiting`) holds the old file, and
        sees by it that its run is over."""
        if _MARKER_RE.fullmatch(uuid):
            with contextlib.suppress(OSError):
                os.unlink(self.up_dir / uuid)
            with contextlib.suppress(OSError):
                os.unlink(self.tune_dir / uuid)
            with contextlib.suppress(OSError):
                self.up_dir.mkdir(mode=0o755)

    def mark_tune(self, uuid: str, on: bool, starting: Callable[[], Iterable[str]]) -> None:
        """Set or clear the VM's ``tune/`` marker (with the lock held, before the record's commit).

        ``starting``: the VMs whose started hook may still be to come (prepared, not yet running). When
        ``tune/`` has to be made anew (first use, or after it went out of use) each of them gets a marker too
        (it may have had one: a marker too many costs one Python start where one too few skips a tuning), and
        the directory appears with its markers in it (made aside, then renamed): a started hook never sees
        it without them."""
        if not _MARKER_RE.fullmatch(uuid):
            return  # never a path from elsewhere: keys are canonical by construction
        d = self.tune_dir
        if not d.is_dir():
            if not os.path.lexists(d):
                names = {u for u in starting() if _MARKER_RE.fullmatch(u)} | {uuid}
                _make_marker_dir(d, names if on else names - {uuid})
            return  # (not a directory: the shell hands every started to Python)
        if not on:
            with contextlib.suppress(OSError):  # a stale marker only costs a Python start
                os.unlink(d / uuid)
            return
        try:
            os.close(os.open(d / uuid, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
        except OSError as e:
            _retire(d, e)

    def mark_up(self, uuid: str) -> None:
        """What hooks/qemu does at started, for a started hook it handed to Python: the ``up/`` marker."""
        if _MARKER_RE.fullmatch(uuid) and self.up_dir.is_dir():
            with contextlib.suppress(OSError):
                _set_marker(self.up_dir / uuid)

    def tuning_taken(self, uuid: str) -> bool:
        """Whether a worker the VM's prepare forked holds its ``tune/`` marker (it tunes the VM once started:
        :func:`kvmhooks.worker.fork_waiting`). A shared probe, as the shell's: probes never conflict."""
        try:
            fd = os.open(self.tune_dir / uuid, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except OSError as e:
            return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
        finally:
            os.close(fd)

    def sync_markers(self) -> None:
        """Markers for every record (install.sh, upgrading from a version without them while VMs run)."""
        if self.path.exists():
            with self._locked(fcntl.LOCK_EX):
                state, _ = self._load()
                held = set(state.domains)
                light = {u: state.domains[u].token for u in held if not state.domains[u].holds_host()}
                self._mark_held(held, light, held)
                self._mark_light(light)
                self._unmark_released(held)

    def _mark_held(self, held: set[str], light: Mapping[str, str], decoded: set[str]) -> None:
        """Before the ledger is written: a ``held/`` marker per record (empty when new), and the token cleared
        from those of the ``decoded`` records that now hold something of the host's (not in ``light``)."""
        d = self.held_dir
        if not self.stopping_dir.is_dir():  # (absent: the shell releases every stop at once)
            with contextlib.suppress(OSError):
                self.stopping_dir.mkdir(mode=0o755)
        if not d.is_dir():  # (not a directory: the shell hands every stop to Python, markers or not)
            if not os.path.lexists(d):  # made whole: a stop never sees held/ without its VM's marker
                _make_marker_dir(d, {u for u in held if _MARKER_RE.fullmatch(u)})
            return
        try:
            present = set(os.listdir(d))
            for uuid in held:
                if not _MARKER_RE.fullmatch(uuid):  # keys are canonical by construction; never a path from elsewhere
                    continue
                if uuid not in present:
                    _set_marker(d / uuid)
                elif uuid in decoded and uuid not in light and os.lstat(d / uuid).st_size:
                    _set_marker(d / uuid)  # it holds something now: released at once from here on
        except OSError as e:
            # A record without its marker would let the shell skip that VM's release: take held/ out of use
            # instead (every stop then goes to Python) and commit; the next commit that can makes it again.
            _retire(d, e)

    def _mark_light(self, light: Mapping[str, str]) -> None:
        """After the ledger is written: the token in the ``held/`` marker of each record (decoded by this
        commit) that holds nothing of the host's; a marker that cannot take it stays empty (released at once)."""
        d = self.held_dir
        for uuid, token in light.items():
            if not (_MARKER_RE.fullmatch(uuid) and _TOKEN_RE.fullmatch(token)):
                continue
            want = f"{token}\n".encode()
            with contextlib.suppress(OSError):
                with open(d / uuid, "rb") as f:
                    if f.read(64) == want:
                        continue
                _set_marker(d / uuid, want)

    def _unmark_released(self, held: set[str]) -> None:
        for d in (self.held_dir, self.tune_dir, self.up_dir):
            with contextlib.suppress(OSError):
                for name in set(os.listdir(d)) - held:
                    with contextlib.suppress(OSError):
                        os.unlink(d / name)

    def _write(self, text: str) -> None:
        """Replace the file atomically: temp file, fsync, rename, fsync of the directory. Called with the
        exclusive lock held, so no other process is writing: any other temp file of this ledger was left by a
        writer that died between its open and its rename, and goes now. (Judged by the lock, not by its PID:
        after a reboot or a wrap-around that PID may be another live process, and the file is stale anyway.)"""
        self._remove_stale_temps()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _remove_stale_temps(self) -> None:
        prefix = f".{self.path.name}."
        with contextlib.suppress(OSError):
            for name in os.listdir(self.path.parent):
                if name.startswith(prefix) and name.endswith(".tmp") and name[len(prefix):-4].isdecimal():
                    with contextlib.suppress(OSError):
                        os.unlink(self.path.parent / name)


def stamp(record: DomainRecord) -> None:
    record.updated = round(time.time(), 3)


def new_token() -> str:
    # os.urandom rather than secrets: the token only tells reservations apart, and secrets' import (hmac,
    # hashlib) is a cost every hook call would pay.
    return os.urandom(8).hex()
