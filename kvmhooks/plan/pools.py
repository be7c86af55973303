"""The one accounting model for hugepage pools. Pure: (ledger state, host topology, config) → decisions.

The invariant kvmhooks keeps for every pool it writes::

    persistent pages (nr_hugepages - surplus) == admin baseline + pages held by live reservations

Every operation — prepare, release, adopt, recovery of an interrupted write, reconcile, and the previews in
``kvmhooks status``/``plan`` — computes pool targets here, and nowhere else. One rule tells an admin's change
from kvmhooks' own: the ledger remembers what kvmhooks last left each pool at (read back from the kernel).
A pool that no kvmhooks write is in flight on (no intent) and that differs from that was resized by someone
with root, and the admin's size is what it is now: a raise joins the baseline; a pool lowered by hand makes
the baseline ``now - held`` (never below 0). Only a pool lowered below what running VMs hold (baseline 0)
is brought back up to their pages, by the next write of that pool (reconcile writes every pool), and noted.
While an intent names a pool its size says nothing about the admin: recovery settles it first (that is how
a failed release once shrank an admin's 40 pages to 8).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from kvmhooks.config import Config, parse_pool_key
from kvmhooks.ledger import LedgerState, PoolRecord
from kvmhooks.topology import HostTopology, PoolState
from kvmhooks.units import format_kib


@dataclass(frozen=True)
class PoolWrite:
    """One sysfs write: set ``node``'s pool of ``size_kib`` pages from ``before`` (persistent) to ``target``."""

    pool: str
    node: int
    size_kib: int
    before: int
    target: int
    nr: int  # nr_hugepages now, surplus included (a raise converts surplus pages before allocating new ones)

    @property
    def new_pages(self) -> int:
        """Pages the kernel must find in free memory for this write."""
        return max(0, self.target - self.nr)


def persistent(ps: PoolState) -> int:
    return ps.nr - ps.surplus


def pool_state(topo: HostTopology, key: str) -> PoolState | None:
    node, size = parse_pool_key(key)
    n = topo.nodes.get(node)
    return None if n is None else n.pools.get(size)


def target(state: LedgerState, key: str, now: int) -> int:
    """baseline + held; a pool with no record yet has the admin's size ``now`` as its baseline."""
    rec = state.pools.get(key)
    return (rec.baseline if rec is not None else now) + state.reserved(key)


def observe(state: LedgerState, topo: HostTopology, cfg: Config) -> list[str]:
    """Apply the drift rule to every recorded pool with no write in flight; returns what it found.

    Updates ``baseline`` (the admin's resize) and ``expected`` (what the pool is now) in ``state``.
    """
    in_flight = {i.pool for i in state.intents}
    found = []
    for key, rec in sorted(state.pools.items()):
        ps = pool_state(topo, key)
        if key in in_flight or key in cfg.leave_alone or ps is None:
            continue
        now = persistent(ps)
        held = state.reserved(key)
        expected = rec.expected if rec.expected >= 0 else rec.baseline + held  # a version 1 ledger
        if now > expected:
            rec.baseline += now - expected
            found.append(f"pool {key} was raised by hand from {expected} to {now} pages: the admin's baseline is "
                         f"now {rec.baseline}")
        elif now < expected and now >= held:
            rec.baseline = now - held
            found.append(f"pool {key} was lowered by hand from {expected} to {now} pages: the admin's baseline is "
                         f"now {rec.baseline}")
        elif now < expected:
            rec.baseline = 0
            found.append(f"pool {key} was lowered by hand from {expected} to {now} pages, below the {held} pages "
                         "running VMs hold: the admin's baseline is now 0; the VMs' pages are put back by the next "
                         "write of this pool (kvmhooks reconcile makes it)")
        rec.expected = now
    return found


def rebuild_lost(state: LedgerState, topo: HostTopology, cfg: Config) -> list[str]:
    """Make a record for every pool that kept reservations hold pages in but that has none (it did not survive
    a set-aside); returns what it made. Without one, :func:`target` would take the pool's size now, those
    pages included, for the admin's. The pages are in the pool, so the admin's part is what is beyond them
    (never below 0); the record is inferred: a running VM adopted later takes its pages out of it too. Pools
    an intent names are left to recovery, which settles them from the intent.
    """
    in_flight = {i.pool for i in state.intents}
    found = []
    for key, held in sorted(state.domains.summary().held.items()):
        ps = pool_state(topo, key)
        if key in state.pools or key in in_flight or key in cfg.leave_alone or ps is None or held <= 0:
            continue
        now = persistent(ps)
        state.pools[key] = PoolRecord(max(0, now - held), now, inferred=True)
        found.append(f"pool {key} had lost its record: of its {now} pages, {held} are held by the VM records kept; "
                     f"the admin's baseline is now {state.pools[key].baseline}")
    return found


def spare_unplaced(state: LedgerState, topo: HostTopology, writes: list[PoolWrite],
                   unplaced: set[str]) -> tuple[list[PoolWrite], list[str]]:
    """``writes`` with no pool of a page size in ``unplaced`` (VM pages adopted without a node) shrunk below its
    pages in use plus the admin's, and a line per pool held up. Unplaced pages may be in use in any pool of
    their size, and baseline + held does not count them: a pool written below its pages in use makes them
    surplus, and the kernel gives the admin's free pages back in their place."""
    out, held_up = [], []
    for w in writes:
        ps, rec = pool_state(topo, w.pool), state.pools.get(w.pool)
        floor = min(w.before, (ps.in_use if ps is not None else 0) + (rec.baseline if rec is not None else 0))
        if f"{w.size_kib}kB" in unplaced and w.target < floor:
            held_up.append(f"leave pool {w.pool} at {floor} pages, not {w.target}: VM pages of "
                           f"{format_kib(w.size_kib)} are unplaced, and its {ps.in_use if ps else 0} pages in use "
                           "may be theirs")
            w = replace(w, target=floor)
        if w.target != w.before:
            out.append(w)
    return out, held_up


def writes_for(state: LedgerState, topo: HostTopology, cfg: Config, keys: Iterable[str]) -> list[PoolWrite]:
    """The writes that bring ``keys`` to their targets (left-alone pools and pools already there: none)."""
    out = []
    for key in sorted(set(keys)):
        ps = pool_state(topo, key)
        if key in cfg.leave_alone or ps is None:
            continue
        now = persistent(ps)
        goal = target(state, key, now)
        if goal != now:
            node, size = parse_pool_key(key)
            out.append(PoolWrite(key, node, size, now, goal, ps.nr))
    return out


def after_claims(topo: HostTopology, state: LedgerState, excluding: str | None = None) -> HostTopology:
    """``topo`` with the memory that open claims (VMs coming in, counted but not in their pools yet) will take
    out of each node's free memory already gone: every placement and capacity check of another VM works on
    this view, so a claim is never given away before its prepare grows the pool for it."""
    summary = state.domains.summary()
    if not summary.claimed:
        return topo
    taken: dict[int, int] = {}
    for key in summary.claimed:
        pages = state.claimed(key, excluding=excluding)
        if pages > 0:
            node, size = parse_pool_key(key)
            taken[node] = taken.get(node, 0) + pages * size
    nodes = dict(topo.nodes)
    for node, kib in taken.items():
        n = nodes.get(node)
        if n is not None:
            free = n.mem_free_kib - kib
            nodes[node] = replace(n, mem_free_kib=max(0, free),
                                  reclaimable_kib=max(0, n.reclaimable_kib + min(0, free)))
    return replace(topo, nodes=nodes)


def spare_kib(topo: HostTopology, node: int, cfg: Config) -> int:
    return max(0, topo.nodes[node].available_kib - cfg.host_reserve_kib)


def capacity_problems(writes: Iterable[PoolWrite], topo: HostTopology, cfg: Config) -> dict[str, str]:
    """Pools whose raise the node cannot spare (free + reclaimable minus the host reserve), with why.

    Checked before any write: a prototype that raised pools blindly took nearly all free memory for seconds.
    """
    need: dict[int, int] = {}
    by_node: dict[int, list[PoolWrite]] = {}
    for w in writes:
        if w.new_pages:
            need[w.node] = need.get(w.node, 0) + w.new_pages * w.size_kib
            by_node.setdefault(w.node, []).append(w)
    problems = {}
    for node, kib in sorted(need.items()):
        spare = spare_kib(topo, node, cfg)
        if kib > spare:
            for w in by_node[node]:
                problems[w.pool] = (f"node {node}: needs {w.new_pages} x {format_kib(w.size_kib)} pages "
                                    f"({format_kib(w.new_pages * w.size_kib)}) but only {format_kib(spare)} can be "
                                    f"spared (free+reclaimable {format_kib(topo.nodes[node].available_kib)} minus "
                                    f"host reserve {format_kib(cfg.host_reserve_kib)})")
    return problems


def borrow_problems(state: LedgerState, topo: HostTopology, uuid: str, wants: dict[str, int]) -> list[str]:
    """Pages from left-alone pools: free, not reserved by a mapping (resv), not promised to another VM."""
    problems = []
    for key, pages in sorted(wants.items()):
        ps = pool_state(topo, key)
        node, size = parse_pool_key(key)
        promised = state.promised(key, excluding=uuid)
        usable = 0 if ps is None else max(0, ps.free - topo.resv_pages.get(size, 0) - promised)
        if usable < pages:
            problems.append(f"node {node}: pool {key} is left alone by config and has {usable} usable free "
                            f"{format_kib(size)} pages ({promised} promised to VMs still starting), {pages} needed")
    return problems


def settled(state: LedgerState, key: str) -> bool:
    """A pool kvmhooks no longer holds anything in and left at the admin's size: forget its record, so the
    next reservation records the admin's value afresh."""
    rec = state.pools.get(key)
    return rec is not None and state.reserved(key) == 0 and rec.expected == rec.baseline


def record_readback(state: LedgerState, key: str, baseline_if_new: int, got: int) -> None:
    rec = state.pools.setdefault(key, PoolRecord(baseline_if_new))
    rec.expected = got


def reservation_writes(state: LedgerState, topo: HostTopology, cfg: Config, uuid: str,
                       wants: dict[str, int]) -> list[PoolWrite]:
    """The writes that adding ``wants`` (pool → pages) to VM ``uuid``'s reservation takes, on top of what
    everybody else holds (``uuid``'s current reservation, if any, is replaced); ``state`` is not changed."""
    out = []
    for key, pages in sorted(wants.items()):
        ps = pool_state(topo, key)
        if key in cfg.leave_alone or ps is None or not pages:
            continue
        now = persistent(ps)
        others = state.reserved(key, excluding=uuid)
        rec = state.pools.get(key)
        goal = (rec.baseline if rec is not None else max(0, now - others)) + others + pages
        node, size = parse_pool_key(key)
        out.append(PoolWrite(key, node, size, now, goal, ps.nr))
    return out


def reservation_problems(state: LedgerState, topo: HostTopology, cfg: Config, uuid: str,
                         wants: dict[str, int]) -> list[str]:
    """Why the host cannot give VM ``uuid`` these pages now (empty: it can); the same check prepare makes."""
    borrowed = {k: p for k, p in wants.items() if k in cfg.leave_alone}
    capacity = capacity_problems(reservation_writes(state, topo, cfg, uuid, wants), topo, cfg)
    return borrow_problems(state, topo, uuid, borrowed) + [capacity[k] for k in sorted(capacity)]
