"""Balloon transports (dedicated QMP socket, or libvirt) and the fixed-target procedure the worker runs."""

from __future__ import annotations

import time
from typing import Any, Protocol

from kvmhooks.apply.libvirt import call
from kvmhooks.apply.qmp import POLL, QMPBalloon
from kvmhooks.domain import BalloonSpec, Domain
from kvmhooks.log import VMLog
from kvmhooks.plan.balloon import fixed_target

# The balloon moves in 4 KiB pages and the guest may keep a few back; 256 KiB is "landed".
TOLERANCE_KIB = 256
# How long a target may take to land once the driver is up (it takes about a second here).
LAND_TIMEOUT = 30.0


class Balloon(Protocol):
    transport: str

    def actual_kib(self) -> int: ...
    def set_target_kib(self, kib: int) -> None: ...
    def enable_stats(self, period: int) -> None: ...
    def guest_stats(self) -> dict[str, int]: ...
    def wait_actual(self, target_kib: int, tolerance_kib: int, timeout: float) -> int: ...
    def close(self) -> None: ...


class LibvirtBalloon:
    """The same operations through libvirt (``virsh setmem --live`` / ``dommemstat``)."""

    transport = "libvirt"

    def __init__(self, dom: Any):
        self.dom = dom

    def actual_kib(self) -> int:
        # memoryStats asks QEMU (query-balloon); info()[2] lags behind by up to a throttled event.
        return int(call("dommemstat", self.dom.memoryStats)["actual"])

    def set_target_kib(self, kib: int) -> None:
        import libvirt

        call("setmem --live", self.dom.setMemoryFlags, kib, libvirt.VIR_DOMAIN_AFFECT_LIVE)

    def enable_stats(self, period: int) -> None:
        import libvirt

        call("dommemstat --period", self.dom.setMemoryStatsPeriod, period, libvirt.VIR_DOMAIN_AFFECT_LIVE)

    def guest_stats(self) -> dict[str, int]:
        s = call("dommemstat", self.dom.memoryStats)
        out = {"last_update": int(s.get("last_update", 0))}
        # libvirt's names: 'available' is the memory the guest sees, 'usable' its MemAvailable.
        for src, dst in (("available", "total"), ("usable", "available"), ("unused", "free")):
            if src in s:
                out[dst] = int(s[src])
        return out

    def wait_actual(self, target_kib: int, tolerance_kib: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            actual = self.actual_kib()
            if abs(actual - target_kib) <= tolerance_kib or time.monotonic() >= deadline:
                return actual
            time.sleep(POLL)

    def close(self) -> None:
        pass


def open_balloon(d: Domain, spec: BalloonSpec, libvirt_dom: Any, vlog: VMLog, announce: bool = True) -> Balloon:
    """QMP when the VM has kvmhooks' socket (and transport allows), else libvirt (and say so, once)."""
    if spec.transport != "libvirt" and d.qmp_socket is not None:
        return QMPBalloon(d.qmp_socket).connect()
    if spec.transport == "auto" and announce:
        vlog.info("balloon: no kvmhooks QMP socket on this VM; using libvirt (kvmhooks annotate --qmp adds one)")
    return LibvirtBalloon(libvirt_dom)


def wait_driver(b: Balloon, period: int, timeout: float) -> bool:
    """Turn on guest stats and wait until the guest's balloon driver reports them (bounded)."""
    deadline = time.monotonic() + timeout
    b.enable_stats(period or 2)
    while True:
        if b.guest_stats().get("last_update", 0) > 0:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def apply_balloon(d: Domain, spec: BalloonSpec, libvirt_dom: Any, driver_timeout: float,
                  vlog: VMLog) -> dict[str, Any]:
    """The worker's balloon step: wait for the driver, set a fixed target, verify it landed."""
    b = open_balloon(d, spec, libvirt_dom, vlog)
    try:
        t0 = time.monotonic()
        if not wait_driver(b, spec.stats_period, driver_timeout):
            vlog.warning("balloon: the guest shows no balloon driver after %g s; leaving its memory alone",
                         driver_timeout)
            return {"transport": b.transport, "driver": False, "actual": b.actual_kib()}
        ready = time.monotonic()
        out: dict[str, Any] = {"transport": b.transport, "driver": True, "policy": spec.policy,
                               "driver_seconds": round(ready - t0, 3)}
        if spec.policy == "auto" or spec.target_kib is None:
            vlog.info("balloon: guest driver up; the automatic policy (kvmhooks balloond) takes it from here")
            out["actual"] = b.actual_kib()
            return out
        target = fixed_target(spec.target_kib, spec.min_kib, d.memory_kib)
        b.set_target_kib(target)
        actual = b.wait_actual(target, TOLERANCE_KIB, LAND_TIMEOUT)
        out.update(target=target, actual=actual, landed_seconds=round(time.monotonic() - ready, 3))
        if abs(actual - target) <= TOLERANCE_KIB:
            vlog.info("balloon: %d KiB reached over %s in %.2f s after the driver came up", actual, b.transport,
                      out["landed_seconds"])
        else:
            vlog.warning("balloon: target %d KiB, still at %d KiB after %g s (guest memory pressure?)", target,
                         actual, LAND_TIMEOUT)
        return out
    finally:
        b.close()
