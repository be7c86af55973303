"""virtio-mem under the automatic policy: the balloon policy's decision mapped to a ``requested`` size.

A VM with a ``<memory model='virtio-mem'>`` device gets its memory resized by plugging and unplugging
device blocks instead of inflating a balloon: the guest sees real memory come and go (MemTotal changes),
nothing is pinned inside it, and the memory it gives up returns to the host at once. There is no second
policy: :func:`kvmhooks.plan.balloon.decide` judges the guest exactly as it judges a ballooned one (same
pressure signals, cooldown, trend, host-driven default, ``reclaim="idle"``), on the guest's *total*
memory, and this module turns its target total into a requested size.

Semantics (one meaning of ``min`` for both mechanisms): the guest's total is its memory outside the
device (the boot memory, or less if someone inflated its balloon: ``base``) plus what is plugged, so it
moves between ``base`` and ``base + size``; ``<kvm:balloon min>`` stays the floor of that total, and
libvirt's ``<memory>`` (boot + size) its ceiling. The guest stats still come from the balloon device,
whose target stays where it is.

The mapping is conservative in every direction: sizes are rounded *up* to the device's block (never less
than the policy asked for), never below the floor nor above ``size``, a shrink never goes below what the
guest uses plus the squeeze cushion, and a change within the deadband of what was last requested is not
asked for (except lifting the guest to its floor).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kvmhooks.plan.balloon import (
    DEADBAND_KIB,
    PRESSURE_MIN_KIB,
    SQUEEZE_FREE,
    SQUEEZE_MIN,
    GuestMem,
    size_with,
)

MIB = 1024
# How long a guest may take to reach a requested size before it is reported as not following. Measured
# here (TCG, 2 MiB blocks, movable memory): 256 MiB plugged in 0.9 s, 156 MiB unplugged in 1.3 s; a busy
# guest migrating pages out of a block it gives back takes longer, hence the margin.
FOLLOW_TIMEOUT_S = 30.0


def align_up(kib: int, block_kib: int) -> int:
    return -(-kib // block_kib) * block_kib if block_kib > 0 else kib


def align_down(kib: int, block_kib: int) -> int:
    return kib // block_kib * block_kib if block_kib > 0 else kib


@dataclass(frozen=True)
class VirtioMemView:
    """One virtio-mem device as this cycle reads it, with the guest memory outside it."""

    base_kib: int  # the guest's memory outside the device: the balloon's actual (the boot memory if not inflated)
    size_kib: int
    block_kib: int
    requested_kib: int
    current_kib: int

    @property
    def given_kib(self) -> int:
        return self.base_kib + self.current_kib

    @property
    def max_requested_kib(self) -> int:
        return align_down(self.size_kib, self.block_kib)

    def floor_kib(self, min_total_kib: int) -> int:
        """The least it may be asked to keep plugged: enough to hold the guest at ``min`` (rounded up)."""
        return min(self.max_requested_kib, align_up(max(0, min_total_kib - self.base_kib), self.block_kib))


def guest_mem(view: VirtioMemView, base: GuestMem) -> GuestMem:
    """The guest as the balloon policy sees it: ``base`` carries the stats and the annotation's settings,
    with its memory replaced by the device's view (given = base + plugged, at most base + size, never
    below base: virtio-mem cannot take what the guest booted with)."""
    top = view.base_kib + view.max_requested_kib
    return replace(base, actual_kib=view.given_kib, max_kib=top,
                   min_kib=min(top, max(base.min_kib, view.base_kib)))


def requested_for(view: VirtioMemView, target_total_kib: int, min_total_kib: int,
                  used_kib: int | None) -> int | None:
    """The requested size that gives the guest the policy's target total, or None to ask nothing.

    ``used_kib``: what the guest uses (given − MemAvailable), when its stats say; a shrink never goes below
    it plus the squeeze cushion, whatever the target (the policy already aims above it; this holds even
    if a rounding or a stale figure would not)."""
    lo = view.floor_kib(min_total_kib)
    want = align_up(max(0, target_total_kib - view.base_kib), view.block_kib)
    if want < view.current_kib and used_kib is not None:
        keep = size_with(used_kib, SQUEEZE_FREE, SQUEEZE_MIN * PRESSURE_MIN_KIB) - view.base_kib
        want = max(want, align_up(max(0, keep), view.block_kib))
    want = min(max(want, lo), view.max_requested_kib)
    if want == view.requested_kib:
        return None
    if abs(want - view.requested_kib) < DEADBAND_KIB and lo <= view.requested_kib <= view.max_requested_kib:
        return None
    return want


def fixed_requested(view: VirtioMemView, target_total_kib: int) -> int:
    """For ``policy="fixed"``: the requested size that gives the guest its fixed target total."""
    return min(view.max_requested_kib, align_up(max(0, target_total_kib - view.base_kib), view.block_kib))


@dataclass(frozen=True)
class Pending:
    """A requested size the guest has not reached yet (balloond carries it between cycles)."""

    requested_kib: int
    since: float
    from_kib: int  # plugged when it was asked
    reported: bool = False


def follow(p: Pending, current_kib: int, block_kib: int, now: float,
           timeout: float = FOLLOW_TIMEOUT_S) -> tuple[Pending | None, str | None, bool]:
    """Did the guest follow the request? Returns (what is still pending, a message, whether it is a
    problem). It has followed when plugged is within a block of requested; past ``timeout`` it is reported
    once, with what to check in the guest."""
    waited = now - p.since
    if abs(current_kib - p.requested_kib) < max(block_kib, 1):
        return None, (f"virtio-mem: the guest has {current_kib // MIB} MiB plugged as requested "
                      f"({waited:.0f} s)"), False
    if p.reported or waited < timeout:
        return p, None, False
    if p.requested_kib > p.from_kib:
        msg = (f"virtio-mem: the guest has plugged {current_kib // MIB} of the requested {p.requested_kib // MIB} "
               f"MiB after {waited:.0f} s: does its kernel have virtio_mem loaded, and does it online hot-plugged "
               "memory (memhp_default_state=online_movable on its command line, or a udev rule)?")
    else:
        msg = (f"virtio-mem: the guest still has {current_kib // MIB} MiB plugged, {p.requested_kib // MIB} MiB "
               f"requested, after {waited:.0f} s: the memory it would give back is in use by unmovable pages "
               "(blocks onlined as online_kernel rather than online_movable?); it keeps it")
    return replace(p, reported=True), msg, True
