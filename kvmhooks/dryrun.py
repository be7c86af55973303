"""`kvmhooks plan`: run the real prepare and started code against recorders instead of the host.

In the manner of tuned's ``sim`` flag, the apply code is not re-described here: :func:`plan` runs
:func:`kvmhooks.operations.prepare` with :class:`RecordingPools` (sysfs writes recorded, the kernel played as
giving what is asked) on a copy of the ledger, then :func:`kvmhooks.apply.live.apply_started` with a
:class:`RecordingDomain` (libvirt calls recorded, read back as set). The same recorders wrap the real
adapters when given an ``inner`` one, so a test can check that a real start makes exactly the planned calls.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kvmhooks.apply.pools import SysfsPools
from kvmhooks.config import Config
from kvmhooks.domain import Domain
from kvmhooks.plan.pools import persistent
from kvmhooks.topology import PoolState, pool_dir
from kvmhooks.units import format_cpuset, format_kib

# libvirt's virDomainModificationImpact bits, named as in its API (values are part of libvirt's ABI).
_AFFECT = {1: "AFFECT_LIVE", 2: "AFFECT_CONFIG"}


@dataclass(frozen=True)
class Action:
    phase: str  # prepare | started
    action: str


def flag_names(flags: int) -> str:
    return "|".join(name for bit, name in _AFFECT.items() if flags & bit) or "AFFECT_CURRENT"


def _cpus(cpumap: tuple[bool, ...] | list[bool]) -> frozenset[int]:
    return frozenset(i for i, b in enumerate(cpumap) if b)


class RecordingPools(SysfsPools):
    """Records every pool write; with ``inner`` also makes it, else plays a kernel that gives what is asked."""

    def __init__(self, sysfs_root: Path, proc_root: Path, actions: list[Action], inner: SysfsPools | None = None):
        super().__init__(sysfs_root, proc_root)
        self.actions, self.inner = actions, inner
        self.written: dict[tuple[int, int], int] = {}

    def read(self, node: int, size_kib: int) -> PoolState:
        real = self.inner.read(node, size_kib) if self.inner else super().read(node, size_kib)
        want = self.written.get((node, size_kib))
        if want is None or self.inner is not None:
            return real
        grown = want - persistent(real)
        return PoolState(real.nr + grown, max(0, real.free + grown), real.surplus)

    def set(self, node: int, size_kib: int, count: int) -> int:
        before = persistent(self.read(node, size_kib))
        self.actions.append(Action("prepare", f"write {pool_dir(self.sysfs_root, node, size_kib)}/nr_hugepages = "
                                              f"{count} (now {before}; {count - before:+d} pages)"))
        if self.inner is not None:
            return self.inner.set(node, size_kib, count)
        self.written[(node, size_kib)] = count
        return count

    def reclaim(self, node: int) -> None:
        if self.inner is not None:
            self.inner.reclaim(node)


class RecordingDomain:
    """A libvirt domain for the worker's apply code: records every call that changes something; with
    ``inner`` it also makes it (and reads back from it), else it reads back what was set."""

    def __init__(self, uuid: str, actions: list[Action], persistent: bool, vcpus: int, ncpus: int,
                 name: str = "", inner: Any = None):
        self.uuid, self.actions, self.persistent, self.inner = uuid, actions, persistent, inner
        self.label = f" of {name}" if name else ""
        self.ncpus = ncpus
        self.live_vcpus = vcpus
        self.vcpus = {v: frozenset(range(ncpus)) for v in range(vcpus)}
        self.emulator = frozenset(range(ncpus))
        self.memtune: dict[str, int] = {}
        self.iothreads: dict[int, frozenset[int]] = {}

    def _record(self, text: str) -> None:
        self.actions.append(Action("started", f"libvirt {text}{self.label}"))

    def _inner(self, method: str, *args: Any) -> Any:
        return getattr(self.inner, method)(*args) if self.inner is not None else None

    def UUIDString(self) -> str:
        return self.uuid

    def isPersistent(self) -> bool:
        return bool(self._inner("isPersistent")) if self.inner is not None else self.persistent

    def isActive(self) -> bool:
        return True

    def setVcpusFlags(self, n: int, flags: int) -> None:
        self._record(f"setVcpusFlags({n}, {flag_names(flags)})")
        self._inner("setVcpusFlags", n, flags)
        self.live_vcpus = n

    def vcpusFlags(self, flags: int) -> int:
        return int(self._inner("vcpusFlags", flags)) if self.inner is not None else self.live_vcpus

    def pinVcpuFlags(self, v: int, cpumap: tuple[bool, ...], flags: int) -> None:
        self._record(f"pinVcpuFlags({v}, {format_cpuset(_cpus(cpumap))}, {flag_names(flags)})")
        self._inner("pinVcpuFlags", v, cpumap, flags)
        self.vcpus[v] = _cpus(cpumap)

    def pinEmulator(self, cpumap: tuple[bool, ...], flags: int) -> None:
        self._record(f"pinEmulator({format_cpuset(_cpus(cpumap))}, {flag_names(flags)})")
        self._inner("pinEmulator", cpumap, flags)
        self.emulator = _cpus(cpumap)

    def pinIOThread(self, i: int, cpumap: tuple[bool, ...], flags: int) -> None:
        self._record(f"pinIOThread({i}, {format_cpuset(_cpus(cpumap))}, {flag_names(flags)})")
        self._inner("pinIOThread", i, cpumap, flags)
        self.iothreads[i] = _cpus(cpumap)

    def ioThreadInfo(self, flags: int) -> list[tuple[int, tuple[bool, ...]]]:
        if self.inner is not None:
            return list(self.inner.ioThreadInfo(flags))
        return [(i, tuple(c in cs for c in range(self.ncpus))) for i, cs in sorted(self.iothreads.items())]

    def vcpuPinInfo(self, flags: int) -> list[tuple[bool, ...]]:
        if self.inner is not None:
            return list(self.inner.vcpuPinInfo(flags))
        return [tuple(i in self.vcpus[v] for i in range(self.ncpus)) for v in range(min(self.live_vcpus,
                                                                                         len(self.vcpus)))]

    def emulatorPinInfo(self, flags: int) -> tuple[bool, ...]:
        if self.inner is not None:
            return tuple(self.inner.emulatorPinInfo(flags))
        return tuple(i in self.emulator for i in range(self.ncpus))

    def setMemoryParameters(self, params: dict[str, int], flags: int) -> None:
        self._record(f"setMemoryParameters({params!r}, {flag_names(flags)})")
        self._inner("setMemoryParameters", params, flags)
        self.memtune.update(params)

    def memoryParameters(self, flags: int) -> dict[str, int]:
        return dict(self._inner("memoryParameters", flags)) if self.inner is not None else dict(self.memtune)


class RecordingConn:
    """The connection the worker's apply code uses: host CPU count, and recording domains by UUID."""

    def __init__(self, ncpus: int, domains: dict[str, RecordingDomain], make: Any = None):
        self.ncpus, self.domains, self.make = ncpus, domains, make

    def getCPUMap(self, flags: int) -> tuple[int, list[bool], int]:
        return self.ncpus, [True] * self.ncpus, self.ncpus

    def lookupByUUIDString(self, uuid: str) -> RecordingDomain:
        if uuid not in self.domains and self.make is not None:
            self.domains[uuid] = self.make(uuid)
        return self.domains[uuid]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The operations log what they do; a dry run did nothing, so it says nothing (its output is the list)."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)


def plan(dom: Domain, cfg: Config, persistent_domain: bool) -> list[Action]:
    """Every sysfs write and libvirt call prepare and started would make for ``dom`` now.

    Raises what prepare would raise (a refusal). The balloon step runs too, against
    :class:`RecordingBalloon`, which plays the guest's driver (up at once, giving back what is asked); only
    a virtio-mem VM's plug is described (it needs the running device's block size).
    """
    from kvmhooks import operations
    from kvmhooks.apply.live import apply_started
    from kvmhooks.log import VMLog

    actions: list[Action] = []
    with tempfile.TemporaryDirectory(prefix="kvmhooks-plan-") as tmp, _quiet():
        copy = replace(cfg, state_dir=Path(tmp))
        if cfg.ledger_path.exists():  # replaced atomically by its writers: a copy is one whole state
            shutil.copyfile(cfg.ledger_path, copy.ledger_path)
        pools = RecordingPools(cfg.sysfs_root, cfg.proc_root, actions)
        if dom.qmp_socket is not None:
            actions.append(Action("prepare", f"create {Path(dom.qmp_socket).parent} for the QMP socket (owned like "
                                             "its parent, the QEMU user's directory)"))
        prepared = operations.prepare(dom, copy, pools, make_socket_dir=False, record_isolation=lambda key, value:
                                      actions.append(Action("prepare", f"host isolation: set {key} to {value!r}")))
        actions += [Action("prepare", f"warning: {w}") for w in prepared.warnings]
        if prepared.record.cpus:
            actions.append(Action("prepare", f"reserve dedicated CPUs {format_cpuset(prepared.record.cpus)} in the "
                                             "ledger"))
        actions.append(Action("prepare", f"record {dom.uuid} in {cfg.ledger_path}"))
        t = dom.active_tuning
        if t is not None and t.live_work:
            topo = operations.topology_for(cfg)
            ncpus = max(topo.online, default=0) + 1
            state = operations.ledger_for(copy).read()

            def other(uuid: str) -> RecordingDomain:
                rec = state.domains[uuid]
                vcpus = max(rec.pins.vcpus, default=0) + 1 if rec.pins else 1
                return RecordingDomain(uuid, actions, False, vcpus, ncpus, rec.name)

            me = RecordingDomain(dom.uuid, actions, persistent_domain, dom.max_vcpus, ncpus)
            me.live_vcpus = dom.current_vcpus
            conn = RecordingConn(ncpus, {dom.uuid: me}, other)
            apply_started(conn, me, dom, copy, VMLog(dom.name, dom.uuid))
            if t.balloon is not None:
                actions += _balloon(dom, me, VMLog(dom.name, dom.uuid))
    return actions


class RecordingBalloon:
    """The balloon transport :func:`kvmhooks.apply.balloon.apply_balloon` would open, recording its calls;
    it plays a guest whose driver is up and that gives back what is asked at once."""

    def __init__(self, dom: Domain, qmp: bool, actions: list[Action]):
        self.transport = "qmp" if qmp else "libvirt"
        self.actions, self.actual = actions, dom.memory_kib
        self.via = f"QMP {dom.qmp_socket}:" if qmp else "libvirt"

    def _say(self, what: str) -> None:
        self.actions.append(Action("started", f"{self.via} {what}"))

    def actual_kib(self) -> int:
        return self.actual

    def set_target_kib(self, kib: int) -> None:
        self._say(f"balloon(value={kib * 1024})" if self.transport == "qmp"
                  else f"setMemoryFlags({kib}, AFFECT_LIVE)")
        self.actual = kib

    def enable_stats(self, period: int) -> None:
        from kvmhooks.apply.qmp import BALLOON_QOM

        self._say(f"qom-set({BALLOON_QOM}, guest-stats-polling-interval, {period})" if self.transport == "qmp"
                  else f"setMemoryStatsPeriod({period}, AFFECT_LIVE)")

    def guest_stats(self) -> dict[str, int]:
        self._say("wait until the guest's balloon driver reports stats (bounded)")
        return {"last_update": 1}

    def wait_actual(self, target_kib: int, tolerance_kib: int, timeout: float) -> int:
        self._say(f"verify the balloon lands at {format_kib(target_kib)} (bounded)")
        return self.actual

    def close(self) -> None:
        pass


def _balloon(dom: Domain, me: RecordingDomain, vlog: Any) -> list[Action]:
    """The worker's balloon step, run against :class:`RecordingBalloon` (same transport choice as a start)."""
    from kvmhooks.apply.balloon import apply_balloon

    t = dom.active_tuning
    assert t is not None and t.balloon is not None
    spec = t.balloon
    out: list[Action] = []
    if dom.virtio_mem and spec.policy == "fixed" and spec.target_kib is not None:
        # Plugging needs the device's live block size and plugged memory, which only a running VM has.
        out.append(Action("started", f"virtio-mem: set requested-size for a {format_kib(spec.target_kib)} guest "
                                     "and wait until the guest plugs it (bounded)"))
        return out
    qmp = dom.qmp_socket is not None and spec.transport != "libvirt"
    apply_balloon(dom, spec, me, 0.0, vlog, opener=lambda d, s, ld, v: RecordingBalloon(d, qmp, out))
    if spec.policy == "auto" or spec.target_kib is None:
        out.append(Action("started", f"automatic balloon between {format_kib(spec.min_kib)} and "
                                     f"{format_kib(dom.memory_kib)} by kvmhooksd"))
    return out
