"""`kvmhooks balloond`: the automatic balloon service. A thin loop around :func:`auto_targets`.

Each cycle reads the ledger (so a VM given back at stop is simply no longer there: nothing to forget),
host memory from /proc/meminfo, and each running ``policy="auto"`` VM's guest stats; computes targets;
sets them. A VM vanishing mid-cycle, a QMP socket closing or libvirtd restarting costs that VM (or that
cycle) only: the loop logs and carries on, reconnecting to libvirt when needed.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from kvmhooks.apply.balloon import Balloon, open_balloon
from kvmhooks.config import Config
from kvmhooks.domain import parse_domain
from kvmhooks.errors import KvmhooksError
from kvmhooks.ledger import Ledger
from kvmhooks.log import VMLog
from kvmhooks.plan.balloon import GuestMem, HostMem, auto_targets

log = logging.getLogger(__name__)


def host_memory(proc_root: Path) -> HostMem:
    values: dict[str, int] = {}
    for line in (proc_root / "meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        if rest.strip():
            values[key] = int(rest.split()[0])
    return HostMem(values.get("MemTotal", 0), values.get("MemAvailable", values.get("MemFree", 0)))


# VMs whose transport was already logged (the fallback to libvirt is said once, not every cycle).
_announced: set[str] = set()


def cycle(conn: Any, cfg: Config) -> dict[str, int]:
    """One pass over the auto VMs; returns the targets it set (uuid → KiB)."""
    import libvirt

    state = Ledger(cfg.ledger_path, cfg.lock_timeout).read()
    _announced.intersection_update(state.domains)  # a VM given back at stop is forgotten here too
    guests: list[GuestMem] = []
    balloons: dict[str, tuple[Balloon, VMLog]] = {}
    try:
        for uuid, rec in sorted(state.domains.items()):
            vlog = VMLog(rec.name, uuid)
            try:
                dom = conn.lookupByUUIDString(uuid)
                if not dom.isActive():
                    continue
                d = parse_domain(dom.XMLDesc(0).encode())
                t = d.active_tuning
                if t is None or t.balloon is None or t.balloon.policy != "auto":
                    continue
                b = open_balloon(d, t.balloon, dom, vlog, announce=uuid not in _announced)
                _announced.add(uuid)
                balloons[uuid] = (b, vlog)
                stats = b.guest_stats()
                if stats.get("last_update", 0) <= 0:
                    b.enable_stats(t.balloon.stats_period or 2)
                    continue  # no driver (yet): never guess
                guests.append(GuestMem(uuid, b.actual_kib(), d.memory_kib, t.balloon.min_kib, stats.get("total"),
                                       stats.get("available")))
            except (libvirt.libvirtError, KvmhooksError) as e:
                vlog.info("balloond: skipped this cycle: %s", e)
        targets = auto_targets(host_memory(cfg.proc_root), guests, cfg.balloon_step_kib, cfg.balloon_host_target)
        for g in guests:
            if g.uuid not in targets:
                continue
            b, vlog = balloons[g.uuid]
            try:
                b.set_target_kib(targets[g.uuid])
                vlog.info("balloond: %d → %d KiB (guest available %s of %s KiB, floor %d)", g.actual_kib,
                          targets[g.uuid], g.available_kib, g.total_kib, g.min_kib)
            except KvmhooksError as e:
                vlog.warning("balloond: could not set the target: %s", e)
                del targets[g.uuid]
        return targets
    finally:
        for b, _ in balloons.values():
            b.close()


def run(cfg: Config, once: bool = False, stop: threading.Event | None = None) -> int:
    import libvirt

    from kvmhooks.cli import quiet_libvirt

    quiet_libvirt()
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    conn = None
    log.info("balloond: started (every %g s, step %d KiB, host target %.0f%%)", cfg.balloon_interval,
             cfg.balloon_step_kib, cfg.balloon_host_target * 100)
    while not stop.is_set():
        try:
            if conn is None or not conn.isAlive():
                conn = libvirt.open(cfg.libvirt_uri)
            cycle(conn, cfg)
        except libvirt.libvirtError as e:
            log.warning("balloond: libvirt unavailable (%s); retrying next cycle", e)
            conn = None
        except KvmhooksError as e:
            log.warning("balloond: %s", e)
        if once:
            break
        stop.wait(cfg.balloon_interval)
    if conn is not None:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()
    log.info("balloond: stopped")
    return 0
