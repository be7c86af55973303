"""`kvmhooks balloond`: the automatic balloon service. A thin loop around the pure policy
:func:`kvmhooks.plan.balloon.decide`, carrying each guest's policy state between cycles.

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
from kvmhooks.config import Config
from kvmhooks.domain import parse_domain
from kvmhooks.errors import KvmhooksError
from kvmhooks.ledger import Ledger
from kvmhooks.log import VMLog
from kvmhooks.plan.balloon import GuestMem, GuestState, HostMem, PolicyParams, decide

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
        self.last_reason: dict[str, str] = {}

    def forget(self, keep: set[str]) -> None:
        for d in (self.states, self.last_reason):
            for uuid in set(d) - keep:
                del d[uuid]
        self.announced.intersection_update(keep)

    def cycle(self, conn: Any, now: float | None = None) -> dict[str, int]:
        """One pass over the auto VMs; returns the targets it set (uuid → KiB). Anything one VM raises —
        libvirt, QMP, a reply of the wrong shape, a bug — costs that VM this cycle only."""
        import libvirt

        state = Ledger(self.cfg.ledger_path, self.cfg.lock_timeout).read()
        guests: list[GuestMem] = []
        balloons: dict[str, tuple[Balloon, VMLog]] = {}
        running: set[str] = set()
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
            t = time.time() if now is None else now
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

    def _read_vm(self, conn: Any, uuid: str, vlog: VMLog, balloons: dict[str, tuple[Balloon, VMLog]]) \
            -> GuestMem | None:
        """This VM as the policy sees it, or None when it is not a running auto-policy VM."""
        dom = conn.lookupByUUIDString(uuid)
        if not dom.isActive():
            return None
        d = parse_domain(dom.XMLDesc(0).encode())
        t = d.active_tuning
        if t is None or t.balloon is None or t.balloon.policy != "auto":
            return None
        b = open_balloon(d, t.balloon, dom, vlog, announce=uuid not in self.announced)
        self.announced.add(uuid)
        balloons[uuid] = (b, vlog)
        stats = b.guest_stats()
        actual = b.actual_kib()
        spec = t.balloon
        if stats.get("last_update", 0) <= 0:
            b.enable_stats(spec.stats_period or 2)
            return GuestMem(uuid, actual, d.memory_kib, spec.min_kib, reclaim=spec.reclaim, shares=spec.shares)
        return GuestMem(uuid, actual, d.memory_kib, spec.min_kib, stats.get("total"), stats.get("available"),
                        stats.get("major_faults"), stats.get("swap_in"), float(stats["last_update"]),
                        reclaim=spec.reclaim, shares=spec.shares)


def run(cfg: Config, once: bool = False, stop: threading.Event | None = None) -> int:
    import libvirt

    from kvmhooks.cli import quiet_libvirt

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
