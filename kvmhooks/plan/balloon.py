"""The automatic balloon policy: pure, with each guest's state carried from one cycle to the next.

``decide(host, guests, states, now, params)`` returns new targets, new states and one reason per guest;
the caller (``kvmhooks balloond``) reads, logs and sets, and hands the states back next cycle. The
policy never touches the host, so every rule below is tested over simulated guests without one.

Why it looks like this. Issue 9: a memoryless "shrink the idle, grow the starving" rule squeezed an idle
guest and starved it. Issue 17: a 512 MiB guest under a 1 % host target went 421 → 278 → 421 → 197 → 335
→ 131 MiB in 26 s, because a guest's stats and its balloon size are read at different moments: a reading
taken while the balloon moves mixes two sizes (measured: "used" = actual − MemAvailable read −30 MiB right
after a squeeze and 168 MiB right after a growth, when it was 68 throughout), and the policy took that as
used memory rising fast, i.e. pressure. The rule now, in one paragraph each:

- **What the guest uses** is actual − MemAvailable, *only from exact readings*: stats QEMU stamped at least
  ``STATS_LAG_S`` after the cycle that first saw the balloon at its present size (measured on the real
  guest: 68 MiB at every size from 512 to 132 MiB, with and without deflate-on-oom, once it has landed). A
  reading taken while the balloon moved gives only a lower bound (the smallest size the balloon can have
  had then, minus the guest's MemAvailable): it can show a real rise, never a false one. The trend is the
  steepest rise between two readings of the window (rises under ``RISE_NOISE_KIB`` are noise); what the
  guest uses now is the latest figure plus that trend over the time since (late stats, late cycles).
- **Pressure** (the guest grows, in this very cycle, whatever the host wants): less than
  ``max(10 % of its memory, 16 MiB)`` available now, or the trend running it below that within the
  look-ahead, or major faults or swap-in. It grows in one step to what it uses, plus the trend over the
  look-ahead, plus the growth cushion (``max(30 %, 96 MiB)`` available).
- **Squeeze** (host above ``host_target``) and **idle reclaim** (``reclaim="idle"``) shrink by at most one
  step per cycle, never below ``min``, and never below the squeeze cushion: ``max(20 % of the new size,
  80 MiB)`` left available (idle reclaim: ``max(40 %, 80 MiB)``). The cushion is at least twice the pressure
  threshold, so a squeeze can never by itself put a guest under pressure (no limit cycle); 80 MiB is what a
  10 MiB/s writer fills in 8 s, before a late cycle sees it and the balloon lands (stats period 2 s, QEMU's
  one-second stamp, a 1 s cycle run 3 s late, the landing).
- **A shrink needs a fresh exact reading** (less than a stats period + ``STATS_SLACK_S`` old), no rise in
  the trend, and no growth within the cooldown. So after each change the policy waits for the balloon to
  land and for stats taken after that (a shrink every other cycle at best): shrinks are monotone while the
  guest is steady, and a late cycle, late stats or a slow balloon only make it wait longer. A guest seen
  for the first time is not shrunk before that either (at rest since when?).
- When the host is ``HOST_HYSTERESIS`` below its target squeezed guests grow back (hysteresis band: no
  squeeze and no give-back in between). No change inside the 10 MiB deadband (except a lift to ``min``).
"""

from __future__ import annotations

import itertools
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
# Nested: pressure (10 %, 16 MiB) < squeeze (20 %, 80 MiB) < growth (30 %, 96 MiB); idle reclaim keeps 40 %.
SQUEEZE_FREE, SQUEEZE_MIN = 0.20, 5  # host above target: squeeze down to this (2x the pressure threshold)
GROW_FREE, GROW_MIN = 0.30, 6  # under pressure: grow up to this (above the squeeze floor: no ping-pong)
RECLAIM_FREE, RECLAIM_MIN = 0.40, 5  # reclaim="idle" without host pressure: generous

# --- Pace ---------------------------------------------------------------------------------------------------
# Idle reclaim moves a quarter of balloon_step per cycle (25 MiB with the default 100 MiB: Proxmox's step
# is meant for a host that needs the memory; one that does not can wait).
RECLAIM_STEP_DIVISOR = 4
# No shrink this long after any growth. The same idea as Kubernetes' HPA scale-down stabilisation window
# (300 s there, for whole pods); a minute covers a burst's pauses at balloond's 10 s default interval.
COOLDOWN_S = 60.0
# Exact readings kept for the trend.
TREND_SAMPLES = 4
# A rise of used memory between two exact readings smaller than this is noise (idle: < 1 MiB, measured).
RISE_NOISE_KIB = 4 * MIB
# The balloon counts as at rest while successive reads of its size differ by less than this (it moves in
# 4 KiB pages and a guest may hold a few back; measured: 411/412 MiB on one size).
REST_TOLERANCE_KIB = 1 * MIB
# Stats count as taken at rest only when QEMU stamped them at least this long after the cycle that first
# saw the balloon at its size: QEMU stamps stats in whole seconds when they arrive, and a busy guest
# answers late, so a stamp a second later is the first that cannot hold a reading from before the landing.
STATS_LAG_S = 1.0
# Stats older than their period plus this are not fresh enough to shrink on: QEMU's last-update has a
# one-second resolution, and the cycle or the guest may be a couple of seconds late on a loaded host.
STATS_SLACK_S = 3.0
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
    """One guest as read this cycle (stats first, then the balloon's size). Stats are ``None`` when the
    guest's driver reports none."""

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
    stats_period: float = 2.0  # the annotation's stats-period (how often fresh stats can be expected)


@dataclass(frozen=True)
class Sample:
    t: float
    used_kib: int
    major_faults: int | None = None
    swap_in_kib: int | None = None


@dataclass(frozen=True)
class GuestState:
    """What the policy remembers about a guest between cycles (the caller stores it, opaque)."""

    samples: tuple[Sample, ...] = ()  # exact readings only, oldest first, at most TREND_SAMPLES
    last_growth: float | None = None  # when the policy last grew it
    last_change: float | None = None  # when the policy last changed its target (either way)
    rest_kib: int | None = None  # the balloon's size as last read ...
    rest_since: float | None = None  # ... and the first cycle that read it (at rest since then)
    low_kib: int | None = None  # the smallest size the balloon can have had since the last exact reading
    counters: Sample | None = None  # the last fresh stats (for the fault and swap-in rates)


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


def pressure_threshold(actual_kib: int) -> float:
    """Available memory below which a guest of this size is under pressure: 10 % of it, at least 16 MiB
    (the absolute bound rules guests under 160 MiB)."""
    return max(PRESSURE_FREE * actual_kib, PRESSURE_MIN_KIB)


def _mib(kib: float) -> str:
    return f"{kib / MIB:.0f} MiB"


@dataclass(frozen=True)
class _Reading:
    used: int  # what the guest uses now (estimated: latest figure + trend since)
    avail: int  # what it has available now (actual − used)
    rate: float  # KiB/s: the steepest rise of used memory in the trend window (0: not rising)
    fault_rate: float | None
    swap_rate: float | None
    exact: bool  # the stats were taken with the balloon at rest at its present size
    fresh: bool  # ... and recently enough to shrink on


def _rate(points: list[tuple[float, int]]) -> float:
    """The steepest rise between any two points of the window (time, used KiB), counting only rises of at
    least the noise: a burst shows at once between neighbours, a slow steady rise across the window."""
    best = 0.0
    for (t0, u0), (t1, u1) in itertools.combinations(points, 2):
        if t1 > t0 and u1 - u0 >= RISE_NOISE_KIB:
            best = max(best, (u1 - u0) / (t1 - t0))
    return best


def _read(g: GuestMem, st: GuestState, now: float) -> tuple[_Reading, GuestState]:
    assert g.available_kib is not None
    avail_s = max(0, g.available_kib)
    s = g.stats_time if g.stats_time is not None else now
    # The balloon is at rest at this size since the first cycle that read it; a changed size starts anew.
    if st.rest_kib is None or st.rest_since is None or abs(g.actual_kib - st.rest_kib) > REST_TOLERANCE_KIB:
        st = replace(st, rest_kib=g.actual_kib, rest_since=now)
    assert st.rest_since is not None
    exact = s >= st.rest_since + STATS_LAG_S
    low = g.actual_kib if st.low_kib is None else min(st.low_kib, g.actual_kib)
    # Exact: actual − MemAvailable. Otherwise a lower bound at the moment the stats were taken: the balloon
    # then was at least the smallest size it has had since the last exact reading.
    used_s = max(0, (g.actual_kib if exact else low) - avail_s)
    samples = st.samples
    newer = not samples or s > samples[-1].t
    if exact and newer:
        samples = (*samples, Sample(s, used_s))[-TREND_SAMPLES:]
        low = g.actual_kib
    points = [(x.t, x.used_kib) for x in samples]
    if not exact and newer:
        points.append((s, used_s))  # a lower bound: a rise it shows is real
    rate = _rate(points)
    used = used_s + rate * max(0.0, now - s)
    if samples and not exact:
        used = max(used, samples[-1].used_kib + rate * max(0.0, now - samples[-1].t))
    # Fault and swap-in counters do not depend on the balloon: their rates come from any two fresh stats.
    fault_rate = swap_rate = None
    prev, counters = st.counters, st.counters
    if prev is None or s > prev.t:
        counters = Sample(s, used_s, g.major_faults, g.swap_in_kib)
    if prev is not None and counters is not None and counters.t > prev.t:
        dt = counters.t - prev.t
        if counters.major_faults is not None and prev.major_faults is not None:
            fault_rate = max(0, counters.major_faults - prev.major_faults) / dt
        if counters.swap_in_kib is not None and prev.swap_in_kib is not None:
            swap_rate = max(0, counters.swap_in_kib - prev.swap_in_kib) / dt
    fresh = exact and now - s <= g.stats_period + STATS_SLACK_S
    used_i = math.ceil(used)
    reading = _Reading(used_i, g.actual_kib - used_i, rate, fault_rate, swap_rate, exact, fresh)
    return reading, replace(st, samples=samples, low_kib=low, counters=counters)


def _pressure(g: GuestMem, r: _Reading, lookahead: float) -> list[str]:
    """Why the guest is short of memory (empty: it is not)."""
    why = []
    threshold = pressure_threshold(g.actual_kib)
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
        low = target if st.low_kib is None else min(st.low_kib, target)
        new_states[g.uuid] = replace(st, last_change=now, last_growth=now if grew else st.last_growth,
                                     low_kib=low)
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
            ahead = r.rate * params.lookahead_s
            want = min(hi, max(g.actual_kib + params.step_kib, size_with(math.ceil(r.used + ahead), GROW_FREE,
                                                                          GROW_MIN * PRESSURE_MIN_KIB)))
            if want - g.actual_kib >= DEADBAND_KIB:
                move(g, want, "pressure (" + ", ".join(why) + f"; uses {_mib(r.used)}): grow")
            else:
                reasons[g.uuid] = "hold: pressure (" + ", ".join(why) + ") but already at <memory>"
            continue
        protected = ""
        if st.last_growth is not None and now - st.last_growth < params.cooldown_s:
            protected = f"cooldown, grown {now - st.last_growth:.0f} s ago"
        elif r.rate > 0:
            protected = f"used rising ({_mib(r.rate)}/s)"
        elif not r.exact:
            protected = "waiting for guest stats taken with the balloon at rest"
        elif not r.fresh:
            protected = f"stats {now - (g.stats_time or now):.0f} s old"
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
