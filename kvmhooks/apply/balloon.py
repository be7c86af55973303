"""Balloon transports (dedicated QMP socket, or libvirt) and the fixed-target procedure the worker runs.

A VM with a virtio-mem device reaches a fixed target by plugging or unplugging (requested = target − the
memory outside the device, block-aligned) rather than ballooning; its balloon only reports guest stats.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from kvmhooks.annotation import BalloonSpec
from kvmhooks.apply.libvirt import call
from kvmhooks.apply.qmp import BALLOON_QOM, POLL, QMPBalloon, QMPTransportError
from kvmhooks.domain import Domain
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
        # libvirt's names: 'available' is the memory the guest sees, 'usable' its MemAvailable; swap_in is in
        # KiB and major_fault a count, both cumulative (the policy takes their rates as pressure signals).
        for src, dst in (("available", "total"), ("usable", "available"), ("unused", "free"),
                         ("major_fault", "major_faults"), ("swap_in", "swap_in")):
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


# QEMU's guest-stats keys (docs/interop/virtio-balloon-stats): memory in bytes, faults a count; -1 = not
# reported by this guest. Ours: KiB (faults stay a count).
_QMP_STATS = (("stat-total-memory", "total", 1024), ("stat-available-memory", "available", 1024),
              ("stat-free-memory", "free", 1024), ("stat-major-faults", "major_faults", 1),
              ("stat-swap-in", "swap_in", 1024))


def parse_qmp_guest_stats(raw: object) -> dict[str, int]:
    """The ``guest-stats`` property read over QMP, checked for shape: a QEMU (or anything on the socket)
    answering something else is an :class:`QMPTransportError` for that VM, not a crash of the service."""
    if not isinstance(raw, dict) or not isinstance(raw.get("stats", {}), dict):
        raise QMPTransportError(f"QMP qom-get guest-stats: unexpected reply {str(raw)[:200]!r}")
    last = raw.get("last-update", 0)
    out = {"last_update": last if isinstance(last, int) and not isinstance(last, bool) else 0}
    stats = raw.get("stats", {})
    for key, name, scale in _QMP_STATS:
        v = stats.get(key, -1)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            out[name] = v // scale
    return out


class QMPStatsBalloon(QMPBalloon):
    """The QMP balloon, reading every guest stat the policy uses (major faults and swap-in too) in one
    ``qom-get``, checking the shape of what it reads."""

    def guest_stats(self) -> dict[str, int]:
        return parse_qmp_guest_stats(self.execute("qom-get", {"path": BALLOON_QOM, "property": "guest-stats"}))


def open_balloon(d: Domain, spec: BalloonSpec, libvirt_dom: Any, vlog: VMLog, announce: bool = True) -> Balloon:
    """QMP when the VM has kvmhooks' socket (and transport allows), else libvirt (and say so, once)."""
    if spec.transport != "libvirt" and d.qmp_socket is not None:
        b = QMPStatsBalloon(d.qmp_socket)
        try:
            b.connect()
        except BaseException:
            b.close()  # its private event loop, or balloond leaks one per failed cycle
            raise
        return b
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


def _fixed_virtio_mem(d: Domain, spec: BalloonSpec, b: Balloon, libvirt_dom: Any, target: int,
                      vlog: VMLog) -> dict[str, Any]:
    """A fixed target for a virtio-mem VM: one requested size, then wait for the guest to plug it."""
    from kvmhooks.apply.qmp import QMPBalloon
    from kvmhooks.apply.virtio_mem import open_virtio_mem, wait_plugged
    from kvmhooks.plan.virtio_mem import VirtioMemView, fixed_requested

    dev, r = open_virtio_mem(d, spec, libvirt_dom, b if isinstance(b, QMPBalloon) else None)
    requested, current = r.read()
    view = VirtioMemView(b.actual_kib(), dev.size_kib, dev.block_kib, requested, current)
    req = fixed_requested(view, target)
    if req != requested:
        r.set_requested_kib(req)
    plugged = wait_plugged(r, req, dev.block_kib - 1, LAND_TIMEOUT)
    out = {"virtio_mem_transport": r.transport, "target": target, "requested": req, "plugged": plugged,
           "actual": view.base_kib + plugged}
    if abs(plugged - req) < dev.block_kib:
        vlog.info("virtio-mem: %d MiB plugged (guest total %d MiB) over %s", plugged // 1024,
                  (view.base_kib + plugged) // 1024, r.transport)
    else:
        vlog.warning("virtio-mem: requested %d MiB, the guest has %d MiB plugged after %g s (virtio_mem not "
                     "loaded in the guest, or memory not onlined as movable?)", req // 1024, plugged // 1024,
                     LAND_TIMEOUT)
    return out


def apply_balloon(d: Domain, spec: BalloonSpec, libvirt_dom: Any, driver_timeout: float,
                  vlog: VMLog, opener: Callable[[Domain, BalloonSpec, Any, VMLog], Balloon] | None = None
                  ) -> dict[str, Any]:
    """The worker's balloon step: wait for the driver, set a fixed target, verify it landed.

    ``opener`` picks the transport (default :func:`open_balloon`); ``kvmhooks plan`` passes one that
    records the calls instead of making them.
    """
    b = (opener or open_balloon)(d, spec, libvirt_dom, vlog)
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
        if d.virtio_mem:
            out.update(_fixed_virtio_mem(d, spec, b, libvirt_dom, target, vlog))
            out["landed_seconds"] = round(time.monotonic() - ready, 3)
            return out
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
