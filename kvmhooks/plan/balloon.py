"""The automatic balloon policy: pure, with each guest's state carried from one cycle to the next.

``decide(host, guests, states, now, params)`` returns new targets, new states and one reason per guest;
the caller (``kvmhooks balloond``) reads, logs and sets, and hands the states back next cycle. The
policy never touches the host, so every rule below is tested over recorded sequences without one.

Why it looks like this (issue 9): a memoryless "shrink the idle, grow the starving" rule squeezed an idle
512 MiB guest to 128 MiB on a host with 20 GiB free, then shrank it back the cycle after it grew it, and
the guest's OOM killer panicked it. A dead guest frees nothing useful, so:

- **Host-driven by default** (Proxmox's autoballoon): guests are squeezed only while the host's used
  fraction is above ``host_target``, those with the most spare memory (weighted by ``shares``) first, and
  only down to what they use plus a cushion. When the host is comfortably below its target, squeezed
  guests grow back toward their ``<memory>``.
- **reclaim="idle"** (opt-in): an idle guest returns memory even without host pressure, in small steps,
  keeping a generous cushion.
- **A guest under pressure always grows**, host target or not: too little available, used memory rising
  fast enough to run out within the look-ahead, major page faults or swap-in. It grows fast (to what it
  uses, plus what it will use over the look-ahead, plus a cushion, in one step) and shrinks slowly.
- **No shrink** for a cooldown after any growth, while its used memory is rising, or before the guest
  has reported stats taken after the last change (stale stats would misjudge what it uses).
- Never below ``min``, never above ``<memory>``, never a change inside the deadband (except to lift a
  guest that someone else put below ``min`` back to it).

The cushions are nested so a decision never undoes the previous one: pressure below 10 % available,
host squeeze leaves 20 %, growth leaves 30 %, idle reclaim leaves 40 %.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

MIB = 1024  # KiB

# --- When a guest is under pressure (it grows) ---------------------------------------------------------
# Less than this fraction of its memory available. oVirt MOM's default balloon rule calls a guest short
# below 20 % free *without* counting reclaimable cache; MemAvailable counts it, so 10 % is the same point.
PRESSURE_FREE = 0.10
# ...or less than this much in absolute terms: 10 % of a 128 MiB guest is one tmpfs write from its OOM
# killer (measured: the idle tiny guest uses about 68 MiB of 512 MiB as actual − MemAvailable).
PRESSURE_MIN_KIB = 16 * MIB
# Major page faults per second (the guest re-reads evicted file pages) and swap-in (KiB/s) above which it
# is short even though MemAvailable looks fine. Chosen here: an idle Linux guest shows ~0 of both.
MAJOR_FAULTS_PER_S = 50.0
SWAP_IN_KIB_PER_S = 256.0
# Look ahead this far at the rate the guest's used memory rises (at least LOOKAHEAD_CYCLES cycles): a guest
# that would run out before the next decisions land is grown now (grow before OOM, not after).
LOOKAHEAD_S = 10.0
LOOKAHEAD_CYCLES = 3

# --- Cushions (fraction available after the change, and at least that many PRESSURE_MIN_KIB) -------------
SQUEEZE_FREE, SQUEEZE_MIN = 0.20, 2  # host above target: squeeze down to this
GROW_FREE, GROW_MIN = 0.30, 3  # under pressure: grow up to this (above the squeeze floor: no ping-pong)
RECLAIM_FREE, RECLAIM_MIN = 0.40, 4  # reclaim="idle" without host pressure: generous

# --- Pace ---------------------------------------------------------------------------------------------------
# Idle reclaim moves a quarter of balloon_step per cycle (25 MiB with the default 100 MiB: Proxmox's step
# is meant for a host that needs the memory; one that does not can wait).
RECLAIM_STEP_DIVISOR = 4
# No shrink this long after any growth. The same idea as Kubernetes' HPA scale-down stabilisation window
# (300 s there, for whole pods); a minute covers a burst's pauses at balloond's 10 s default interval.
COOLDOWN_S = 60.0
# Used-memory samples kept for the trend (the rate over the last few fresh stats).
TREND_SAMPLES = 4
# Used memory that rose by more than this over the trend window counts as rising (noise is < 1 MiB idle).
TREND_RISE_KIB = 4 * MIB
# Guest stats taken less than this after the last change may not show it yet (the balloon lands in ~1 s,
# measured; QEMU's last-update has one-second resolution).
SETTLE_S = 1.0
# Proxmox's ±10 MiB: smaller changes cost the guest more in page churn than they give anyone.
DEADBAND_KIB = 10 * MIB
# Squeezed guests grow back only once the host is this far below its target (hysteresis: otherwise giving
# back pushes the host over the target and the next cycle squeezes again).
HOST_HYSTERESIS = 0.05
DEFAULT_SHARES = 1000  # Proxmox's default


@dataclass(frozen=True)
class HostMem:
    total_kib: int
    available_kib: int

    @property
    def used_kib(self) -> int:
        return self.total_kib - self.available_kib

    @property
    def used_fraction(self) -> float:
        return 1.0 - self.available_kib / self.total_kib if self.total_kib else 0.0


@dataclass(frozen=True)
class GuestMem:
    """One guest as read this cycle. Stats are ``None`` when the guest's driver reports none."""

    uuid: str
    actual_kib: int  # current balloon size (memory the guest has)
    max_kib: int  # <memory>
    min_kib: int  # the floor from the annotation
    total_kib: int | None = None  # guest stats; None when the driver reports none
    available_kib: int | None = None  # the guest's MemAvailable
    major_faults: int | None = None  # cumulative counters, where the guest reports them
    swap_in_kib: int | None = None
    stats_time: float | None = None  # when the guest took its stats (QEMU's last-update, epoch seconds)
    reclaim: Literal["none", "idle"] = "none"
    shares: int = DEFAULT_SHARES


@dataclass(frozen=True)
class Sample:
    t: float
    used_kib: int
    major_faults: int | None = None
    swap_in_kib: int | None = None


@dataclass(frozen=True)
class GuestState:
    """What the policy remembers about a guest between cycles (the caller stores it, opaque)."""

    samples: tuple[Sample, ...] = ()  # fresh stats only, oldest first, at most TREND_SAMPLES
    last_growth: float | None = None  # when the policy last grew it
    last_change: float | None = None  # when the policy last changed its target (either way)


@dataclass(frozen=True)
class PolicyParams:
    step_kib: int = 100 * MIB  # config balloon_step
    host_target: float = 0.80  # config balloon_host_target
    interval: float = 10.0  # config balloon_interval (scales the look-ahead)
    cooldown_s: float = COOLDOWN_S

    @property
    def lookahead_s(self) -> float:
        return max(LOOKAHEAD_S, LOOKAHEAD_CYCLES * self.interval)


class Decisions(NamedTuple):
    targets: dict[str, int]  # uuid → new target KiB, only for guests that move
    states: dict[str, GuestState]  # uuid → state for the next cycle, for every guest given
    reasons: dict[str, str]  # uuid → why it moves or holds, for every guest given


def fixed_target(target_kib: int, min_kib: int, max_kib: int) -> int:
    """A fixed target, never below the floor nor above the VM's memory."""
    return min(max(target_kib, min_kib), max_kib)


def size_with(used_kib: int, free: float, min_avail_kib: int) -> int:
    """The memory that leaves ``free`` of it (and at least ``min_avail_kib``) available over ``used_kib``."""
    return max(math.ceil(used_kib / (1.0 - free)), used_kib + min_avail_kib)


def _mib(kib: float) -> str:
    return f"{kib / MIB:.0f} MiB"


@dataclass(frozen=True)
class _Reading:
    used: int
    avail: int
    rate: float  # KiB/s the used memory rose over the trend window (negative: fell)
    rising: bool
    fault_rate: float | None
    swap_rate: float | None
    settled: bool  # these stats were taken after the last change landed


def _read(g: GuestMem, st: GuestState, now: float) -> tuple[_Reading, GuestState]:
    assert g.available_kib is not None
    avail = max(0, g.available_kib)
    # actual − MemAvailable: what the guest uses, whether or not the balloon counts in its MemTotal (with
    # deflate-on-oom it does, and its pages are not available either). It includes the kernel's reserved
    # memory, which only makes the estimate err on the safe side.
    used = max(0, g.actual_kib - avail)
    t = g.stats_time if g.stats_time is not None else now
    settled = st.last_change is None or g.stats_time is None or g.stats_time >= st.last_change + SETTLE_S
    samples = st.samples
    fresh = not samples or t > samples[-1].t
    if fresh and settled:
        samples = (*samples, Sample(t, used, g.major_faults, g.swap_in_kib))[-TREND_SAMPLES:]
    rate, rising, fault_rate, swap_rate = 0.0, False, None, None
    if len(samples) >= 2:
        first, last = samples[0], samples[-1]
        dt = last.t - first.t
        if dt > 0:
            rate = (last.used_kib - first.used_kib) / dt
        rising = last.used_kib - first.used_kib > TREND_RISE_KIB
        prev = samples[-2]
        dt1 = last.t - prev.t
        if dt1 > 0 and last.major_faults is not None and prev.major_faults is not None:
            fault_rate = max(0, last.major_faults - prev.major_faults) / dt1
        if dt1 > 0 and last.swap_in_kib is not None and prev.swap_in_kib is not None:
            swap_rate = max(0, last.swap_in_kib - prev.swap_in_kib) / dt1
    return _Reading(used, avail, rate, rising, fault_rate, swap_rate, settled), replace(st, samples=samples)


def _pressure(g: GuestMem, r: _Reading, lookahead: float) -> list[str]:
    """Why the guest is short of memory (empty: it is not)."""
    why = []
    threshold = max(PRESSURE_FREE * g.actual_kib, PRESSURE_MIN_KIB)
    if r.avail < threshold:
        why.append(f"only {_mib(r.avail)} of {_mib(g.actual_kib)} available")
    elif r.rate > 0 and r.avail - r.rate * lookahead < threshold:
        why.append(f"used rising {_mib(r.rate)}/s: {_mib(r.avail)} available lasts {r.avail / r.rate:.0f} s")
    if r.fault_rate is not None and r.fault_rate > MAJOR_FAULTS_PER_S:
        why.append(f"{r.fault_rate:.0f} major faults/s")
    if r.swap_rate is not None and r.swap_rate > SWAP_IN_KIB_PER_S:
        why.append(f"swapping in {_mib(r.swap_rate)}/s")
    return why


def decide(host: HostMem, guests: list[GuestMem], states: dict[str, GuestState], now: float,
           params: PolicyParams) -> Decisions:
    """One cycle of the policy. ``now`` is wall-clock seconds (comparable with the guests' stats_time)."""
    targets: dict[str, int] = {}
    new_states: dict[str, GuestState] = {}
    reasons: dict[str, str] = {}
    host_pct = f"host {host.used_fraction:.0%} used"
    host_above = host.used_fraction > params.host_target
    host_below = host.used_fraction < params.host_target - HOST_HYSTERESIS
    squeeze: list[tuple[GuestMem, int, int | None]] = []  # guest, spare above its floor, idle-reclaim target
    grow_back: list[GuestMem] = []

    def move(g: GuestMem, target: int, reason: str) -> None:
        st = new_states[g.uuid]
        grew = target > g.actual_kib
        new_states[g.uuid] = replace(st, last_change=now, last_growth=now if grew else st.last_growth)
        targets[g.uuid] = target
        reasons[g.uuid] = f"{_mib(g.actual_kib)} → {_mib(target)}: {reason}"

    for g in guests:
        st = states.get(g.uuid, GuestState())
        new_states[g.uuid] = st
        lo, hi = min(g.min_kib, g.max_kib), g.max_kib
        if g.total_kib is None or g.available_kib is None or g.total_kib <= 0:
            reasons[g.uuid] = "hold: the guest reports no memory stats (no balloon driver yet?): never guess"
            continue
        r, st = _read(g, st, now)
        new_states[g.uuid] = st
        if g.actual_kib < lo:
            move(g, lo, f"below its floor min={_mib(lo)}")
            continue
        why = _pressure(g, r, params.lookahead_s)
        if why:
            ahead = max(0.0, r.rate) * params.lookahead_s
            want = min(hi, max(g.actual_kib + params.step_kib, size_with(int(r.used + ahead), GROW_FREE,
                                                                          GROW_MIN * PRESSURE_MIN_KIB)))
            if want - g.actual_kib >= DEADBAND_KIB:
                move(g, want, "pressure (" + ", ".join(why) + f"; uses {_mib(r.used)}): grow")
            else:
                reasons[g.uuid] = "hold: pressure (" + ", ".join(why) + ") but already at <memory>"
            continue
        protected = ""
        if st.last_growth is not None and now - st.last_growth < params.cooldown_s:
            protected = f"cooldown, grown {now - st.last_growth:.0f} s ago"
        elif r.rising:
            protected = f"used rising ({_mib(r.rate)}/s)"
        elif not r.settled:
            protected = "waiting for guest stats taken after the last change"
        reclaim_to: int | None = None
        if not protected and g.reclaim == "idle":
            floor = min(hi, max(lo, size_with(r.used, RECLAIM_FREE, RECLAIM_MIN * PRESSURE_MIN_KIB)))
            if g.actual_kib - floor >= DEADBAND_KIB:
                reclaim_to = max(floor, g.actual_kib - params.step_kib // RECLAIM_STEP_DIVISOR)
                if reclaim_to - floor < DEADBAND_KIB:
                    reclaim_to = floor  # the last step takes the rest: a remainder inside the deadband would stay
        if not protected and host_above:
            floor = min(hi, max(lo, size_with(r.used, SQUEEZE_FREE, SQUEEZE_MIN * PRESSURE_MIN_KIB)))
            spare = g.actual_kib - floor
            if spare >= DEADBAND_KIB or reclaim_to is not None:
                squeeze.append((g, max(0, spare), reclaim_to))
                continue
        if reclaim_to is not None:
            move(g, reclaim_to, f"idle reclaim ({_mib(r.avail)} available, uses {_mib(r.used)}; {host_pct})")
            continue
        if g.reclaim != "idle" and host_below and g.actual_kib < hi:
            grow_back.append(g)
            continue
        if protected and (host_above or g.reclaim == "idle"):
            reasons[g.uuid] = f"hold: no shrink ({protected})"
        elif host_above:
            reasons[g.uuid] = f"hold: {host_pct} > target {params.host_target:.0%}, but at its floor"
        elif g.reclaim == "idle":
            reasons[g.uuid] = f"hold: idle reclaim keeps {RECLAIM_FREE:.0%} available ({_mib(r.avail)} now)"
        elif g.actual_kib >= hi:
            reasons[g.uuid] = f"hold: at <memory>, {host_pct} (target {params.host_target:.0%})"
        else:
            reasons[g.uuid] = f"hold: {host_pct}, near target {params.host_target:.0%}: no squeeze, no give-back"

    if squeeze:
        # Proxmox-style: free what puts the host back at its target, shared out in proportion to each guest's
        # spare memory divided by its shares (more shares: squeezed less), at most one step each.
        need = max(0.0, host.used_kib - params.host_target * host.total_kib)
        weights = {g.uuid: spare * DEFAULT_SHARES / max(1, g.shares) for g, spare, _ in squeeze}
        total_w = sum(weights.values()) or 1.0
        for g, spare, reclaim_to in sorted(squeeze, key=lambda s: -weights[s[0].uuid]):
            cut = min(spare, params.step_kib, max(DEADBAND_KIB, math.ceil(need * weights[g.uuid] / total_w)))
            if spare - cut < DEADBAND_KIB:
                cut = spare  # as for reclaim: no remainder inside the deadband
            target = g.actual_kib - cut
            reason = f"squeeze ({host_pct} > target {params.host_target:.0%}; spare {_mib(spare)}, shares {g.shares})"
            if reclaim_to is not None and reclaim_to < target:
                target, reason = reclaim_to, f"idle reclaim ({host_pct})"
            if g.actual_kib - target >= DEADBAND_KIB:
                move(g, target, reason)
            else:
                reasons[g.uuid] = f"hold: {host_pct} > target, but at its floor"
    if grow_back:
        # Give back what the host can spare below its target, the most squeezed (per share) first.
        budget = (params.host_target - HOST_HYSTERESIS) * host.total_kib - host.used_kib
        for g in sorted(grow_back, key=lambda g: -(g.max_kib - g.actual_kib) * g.shares):
            give = int(min(params.step_kib, g.max_kib - g.actual_kib, budget))
            if give >= DEADBAND_KIB:
                move(g, g.actual_kib + give, f"give back ({host_pct} < target {params.host_target:.0%})")
                budget -= give
            else:
                reasons[g.uuid] = f"hold: {host_pct}, nothing to spare for growing it back"
    return Decisions(targets, new_states, reasons)
