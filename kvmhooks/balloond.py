"""`kvmhooks balloond`: the automatic balloon service. A thin loop around the pure policy
:func:`kvmhooks.plan.balloon.decide`, carrying each guest's policy state between cycles.

A VM with a virtio-mem device is resized by plugging and unplugging instead (the same decision, mapped to
a requested size by :mod:`kvmhooks.plan.virtio_mem`; its balloon device only supplies the guest stats),
and each request is followed until the guest's plugged size reaches it: a guest that does not plug or
unplug is reported once, with what to check inside it.

Each cycle reads the ledger (a VM given back at stop is no longer there, and its state is forgotten),
host memory from /proc/meminfo, and each running ``policy="auto"`` VM's balloon and guest stats; decides;
sets the targets and logs every decision's reason (holds only when the reason changes). A VM vanishing
mid-cycle, a QMP socket closing, a wrong-shaped reply or libvirtd restarting costs that VM (or that
cycle) only: the loop logs and carries on, reconnecting to libvirt when needed.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

from kvmhooks.apply.balloon import Balloon, open_balloon
from kvmhooks.apply.qmp import QMPBalloon
from kvmhooks.apply.virtio_mem import VirtioMemResizer, open_virtio_mem
from kvmhooks.config import Config
from kvmhooks.domain import parse_domain
from kvmhooks.errors import KvmhooksError
from kvmhooks.ledger import Ledger
from kvmhooks.log import VMLog
from kvmhooks.plan.balloon import GuestMem, GuestState, HostMem, PolicyParams, decide
from kvmhooks.plan.virtio_mem import Pending, VirtioMemView, follow, guest_mem, requested_for

log = logging.getLogger(__name__)


def host_memory(proc_root: Path) -> HostMem:
    values: dict[str, int] = {}
    for line in (proc_root / "meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        if rest.strip():
            values[key] = int(rest.split()[0])
    return HostMem(values.get("MemTotal", 0), values.get("MemAvailable", values.get("MemFree", 0)))


class Service:
    """What balloond carries from one cycle to the next: each guest's policy state, which VMs it already
    announced its transport for, and the last hold reason it logged (a hold is logged when it changes, not
    every cycle). A VM that stops is forgotten: its entry leaves the ledger at release."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.params = PolicyParams(step_kib=cfg.balloon_step_kib, host_target=cfg.balloon_host_target,
                                   interval=cfg.balloon_interval)
        self.states: dict[str, GuestState] = {}
        self.announced: set[str] = set()
        self.announced_vmem: set[str] = set()
        self.last_reason: dict[str, str] = {}
        self.pending: dict[str, Pending] = {}  # virtio-mem requests the guest has not reached yet
        # This cycle's virtio-mem VMs: the device as read, its transport, the annotation's floor (total KiB).
        self._vmem: dict[str, tuple[VirtioMemView, VirtioMemResizer, int]] = {}
        self._now = 0.0  # this cycle's clock, for the requests followed while reading

    def forget(self, keep: set[str]) -> None:
        for d in (self.states, self.last_reason, self.pending):
            for uuid in set(d) - keep:
                del d[uuid]
        self.announced.intersection_update(keep)
        self.announced_vmem.intersection_update(keep)

    def cycle(self, conn: Any, now: float | None = None) -> dict[str, int]:
        """One pass over the auto VMs; returns the targets it set (uuid → KiB). Anything one VM raises —
        libvirt, QMP, a reply of the wrong shape, a bug — costs that VM this cycle only."""
        import libvirt

        state = Ledger(self.cfg.ledger_path, self.cfg.lock_timeout).read()
        guests: list[GuestMem] = []
        balloons: dict[str, tuple[Balloon, VMLog]] = {}
        running: set[str] = set()
        self._vmem = {}
        t = time.time() if now is None else now
        self._now = t
        try:
            for uuid, rec in sorted(state.domains.items()):
                vlog = VMLog(rec.name, uuid)
                try:
                    g = self._read_vm(conn, uuid, vlog, balloons)
                    if g is not None:
                        running.add(uuid)
                        guests.append(g)
                except Exception as e:  # per VM: the others still get their cycle
                    if isinstance(e, libvirt.libvirtError) and not conn.isAlive():
                        raise  # libvirtd itself went away: the loop reconnects
                    running.add(uuid)  # keep its state: it may answer next cycle
                    vlog.warning("balloond: skipped this cycle: %s", e, exc_info=not isinstance(e, KvmhooksError))
            self.forget(running)
            decided = decide(host_memory(self.cfg.proc_root), guests, self.states, t, self.params)
            self.states.update(decided.states)
            for g in guests:
                b, vlog = balloons[g.uuid]
                reason = decided.reasons.get(g.uuid, "")
                if g.uuid not in decided.targets:
                    kind = re.sub(r"[0-9.]+", "#", reason)  # the same hold with other numbers: said already
                    if kind != self.last_reason.get(g.uuid):
                        vlog.info("balloond: %s", reason)
                        self.last_reason[g.uuid] = kind
                    continue
                self.last_reason.pop(g.uuid, None)
                if g.uuid in self._vmem:
                    self._resize(g, decided.targets, reason, vlog, t)
                    continue
                try:
                    b.set_target_kib(decided.targets[g.uuid])
                    vlog.info("balloond: %s", reason)
                except Exception as e:
                    vlog.warning("balloond: could not set the target (%s): %s", reason, e)
                    del decided.targets[g.uuid]
            return decided.targets
        finally:
            for b, _ in balloons.values():
                with contextlib.suppress(Exception):
                    b.close()

    def _resize(self, g: GuestMem, targets: dict[str, int], reason: str, vlog: VMLog, now: float) -> None:
        """The policy's target total for a virtio-mem VM, as a requested size (or nothing to ask)."""
        view, r, min_total = self._vmem[g.uuid]
        used = g.actual_kib - g.available_kib if g.available_kib is not None else None
        req = requested_for(view, targets[g.uuid], min_total, used)
        if req is None:
            del targets[g.uuid]
            hold = (f"virtio-mem: hold at {view.requested_kib // 1024} MiB requested ({view.current_kib // 1024} "
                    f"plugged): the target rounds to it or inside the deadband ({reason})")
            kind = re.sub(r"[0-9.]+", "#", hold)
            if kind != self.last_reason.get(g.uuid):
                vlog.info("balloond: %s", hold)
                self.last_reason[g.uuid] = kind
            return
        try:
            r.set_requested_kib(req)
        except Exception as e:
            vlog.warning("balloond: virtio-mem: could not request %d MiB (%s): %s", req // 1024, reason, e)
            del targets[g.uuid]
            return
        targets[g.uuid] = view.base_kib + req
        self.pending[g.uuid] = Pending(req, now, view.current_kib)
        vlog.info("balloond: virtio-mem requested %d → %d MiB over %s (plugged %d MiB): %s",
                  view.requested_kib // 1024, req // 1024, r.transport, view.current_kib // 1024, reason)

    def _read_vm(self, conn: Any, uuid: str, vlog: VMLog, balloons: dict[str, tuple[Balloon, VMLog]]) \
            -> GuestMem | None:
        """This VM as the policy sees it, or None when it is not a running auto-policy VM."""
        dom = conn.lookupByUUIDString(uuid)
        # A paused guest (started paused, or stopped by the admin) reads no fresh stats and cannot move its
        # balloon: it is left alone until it runs. (1: VIR_DOMAIN_RUNNING; libvirt is not imported here.)
        if not dom.isActive() or dom.state()[0] != 1:
            return None
        d = parse_domain(dom.XMLDesc(0).encode())
        t = d.active_tuning
        if t is None or t.balloon is None or t.balloon.policy != "auto":
            return None
        b = open_balloon(d, t.balloon, dom, vlog, announce=uuid not in self.announced)
        self.announced.add(uuid)
        balloons[uuid] = (b, vlog)
        # Stats first, then the size: the policy trusts only stats taken after it last saw that size at rest.
        stats = b.guest_stats()
        actual = b.actual_kib()
        spec = t.balloon
        period = spec.stats_period or 2
        if stats.get("last_update", 0) <= 0:
            b.enable_stats(period)
            g = GuestMem(uuid, actual, d.memory_kib, spec.min_kib, reclaim=spec.reclaim, shares=spec.shares,
                         stats_period=period)
        else:
            g = GuestMem(uuid, actual, d.memory_kib, spec.min_kib, stats.get("total"), stats.get("available"),
                         stats.get("major_faults"), stats.get("swap_in"), float(stats["last_update"]),
                         reclaim=spec.reclaim, shares=spec.shares, stats_period=period)
        if not d.virtio_mem:
            return g
        # virtio-mem: the balloon device gives the stats, the device the memory (base = the balloon's actual).
        dev, r = open_virtio_mem(d, spec, dom, b if isinstance(b, QMPBalloon) else None)
        if r.transport == "libvirt" and dev.current_kib is not None:
            requested, current = dev.requested_kib, dev.current_kib  # the live XML just read
        else:
            requested, current = r.read()
        if uuid not in self.announced_vmem:
            vlog.info("balloond: virtio-mem device of %d MiB (%d MiB blocks): resizing it over %s instead of "
                      "ballooning", dev.size_kib // 1024, dev.block_kib // 1024, r.transport)
            self.announced_vmem.add(uuid)
        view = VirtioMemView(actual, dev.size_kib, dev.block_kib, requested, current)
        self._vmem[uuid] = (view, r, spec.min_kib)
        p = self.pending.get(uuid)
        if p is not None:
            still, msg, bad = follow(p, current, dev.block_kib, self._now)
            if still is None:
                del self.pending[uuid]
            else:
                self.pending[uuid] = still
            if msg is not None:
                (vlog.warning if bad else vlog.info)("balloond: %s", msg)
        return guest_mem(view, g)


def run(cfg: Config, once: bool = False, stop: threading.Event | None = None) -> int:
    import libvirt

    from kvmhooks.apply.libvirt import quiet_libvirt

    quiet_libvirt()
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    conn = None
    service = Service(cfg)
    log.info("balloond: started (every %g s, step %d KiB, host target %.0f%%)", cfg.balloon_interval,
             cfg.balloon_step_kib, cfg.balloon_host_target * 100)
    while not stop.is_set():
        try:
            if conn is None or not conn.isAlive():
                conn = libvirt.open(cfg.libvirt_uri)
            service.cycle(conn)
        except libvirt.libvirtError as e:
            log.warning("balloond: libvirt unavailable (%s); retrying next cycle", e)
            conn = None
        except KvmhooksError as e:
            log.warning("balloond: %s", e)
        except Exception:  # a bug must not end the service that keeps guests alive: log it, go on
            log.exception("balloond: cycle failed; retrying next cycle")
        if once:
            break
        stop.wait(cfg.balloon_interval)
    if conn is not None:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()
    log.info("balloond: stopped")
    return 0
