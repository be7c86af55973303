"""The automatic balloon policy: a pure function over one snapshot of host and guest memory.

Prior art: oVirt MOM's balloon rules (squeeze guests with free memory when the host is short, give memory
back to guests under pressure) and Proxmox's autoballoon (host target 80 %, at most 100 MiB per VM per
cycle, ±10 MiB deadband). Each cycle moves every ``policy="auto"`` guest at most one step:

- a guest under pressure (less than ``GUEST_LOW`` of its memory available) grows, unless the host itself
  is above its target (then it holds: squeezing a starving guest helps nobody);
- an idle guest (more than ``GUEST_HIGH`` available), or any guest while the host is above its target,
  shrinks — never below its ``min``, nor below what it uses plus a cushion;
- changes smaller than the deadband are not made (balloon churn costs the guest page faults).
"""

from __future__ import annotations

from dataclasses import dataclass

# Guest available-memory fractions: below GUEST_LOW the guest is under pressure; above GUEST_HIGH it is idle.
GUEST_LOW = 0.15
GUEST_HIGH = 0.30
DEADBAND_KIB = 10 * 1024


@dataclass(frozen=True)
class HostMem:
    total_kib: int
    available_kib: int

    @property
    def used_fraction(self) -> float:
        return 1.0 - self.available_kib / self.total_kib if self.total_kib else 0.0


@dataclass(frozen=True)
class GuestMem:
    uuid: str
    actual_kib: int  # current balloon size (memory the guest has)
    max_kib: int  # <memory>
    min_kib: int  # the floor from the annotation
    total_kib: int | None = None  # guest stats; None when the driver reports none
    available_kib: int | None = None


def fixed_target(target_kib: int, min_kib: int, max_kib: int) -> int:
    """A fixed target, never below the floor nor above the VM's memory."""
    return min(max(target_kib, min_kib), max_kib)


def auto_targets(host: HostMem, guests: list[GuestMem], step_kib: int, host_target: float) -> dict[str, int]:
    """New balloon targets for the guests that should move this cycle (uuid → KiB)."""
    host_short = host.used_fraction >= host_target
    out: dict[str, int] = {}
    for g in guests:
        if g.total_kib is None or g.available_kib is None or g.total_kib <= 0:
            continue  # no guest stats: never guess
        free = g.available_kib / g.total_kib
        used = g.total_kib - g.available_kib
        floor = min(g.max_kib, max(g.min_kib, -(-used * 100 // int((1 - GUEST_LOW) * 100))))
        if free < GUEST_LOW:
            desired = g.actual_kib if host_short else g.actual_kib + step_kib
        elif host_short or free > GUEST_HIGH:
            desired = g.actual_kib - step_kib
        else:
            desired = g.actual_kib
        if desired < g.actual_kib:
            desired = max(desired, floor)
        desired = min(max(desired, g.min_kib), g.max_kib)
        if abs(desired - g.actual_kib) >= DEADBAND_KIB:
            out[g.uuid] = desired
    return out
