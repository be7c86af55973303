"""The operations on shared state: reserve at prepare, release at stop, adopt at reconnect, reconcile.

Every operation runs in a :func:`session`: it takes the ledger lock (with a deadline), first finishes what
an interrupted operation left (:meth:`Session.recover`), applies the drift rule to the pools
(:func:`kvmhooks.plan.pools.observe`), then does its own work. Pool writes always follow one protocol
(:meth:`Session.execute`)::

    commit intents (and the reservation change) → write sysfs → read back → commit result, clear intents

so a process killed or failing at any step leaves intents that the next session rolls back (a prepare) or
completes (a release), and every pool ends at ``admin baseline + pages held by live reservations``. Targets
are absolute and computed from the ledger, so finishing a write twice never frees anything twice.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kvmhooks.apply.pools import SysfsPools, apply_pool_writes
from kvmhooks.config import Config, pool_key
from kvmhooks.errors import Abandoned, CapacityError, HostError, KvmhooksError, LedgerError
from kvmhooks.ledger import (
    CLAIMED,
    NOT_MAPPED_YET,
    RECOUNTED,
    DomainRecord,
    Intent,
    Ledger,
    LedgerState,
    Pins,
    PoolRecord,
    Transaction,
    check_records,
    new_token,
    salvage,
    stamp,
)
from kvmhooks.log import VMLog
from kvmhooks.plan import pools as accounting
from kvmhooks.plan.hugepages import HugepagePlan, plan_hugepages
from kvmhooks.topology import (
    HostTopology,
    QemuProcess,
    numa_maps,
    qemu_hugepages,
    qemu_memory,
    qemu_process,
    qemu_uids,
    read_topology,
)
from kvmhooks.units import format_cpuset

if TYPE_CHECKING:
    from kvmhooks.apply.isolation import HostSettings, IsolationReport
    from kvmhooks.domain import Domain
    from kvmhooks.plan.cpus import CpuPlan
    from kvmhooks.plan.isolation import IsolationTarget

log = logging.getLogger(__name__)

# reconcile leaves alone a VM whose prepare ran this recently and that is not running yet: QEMU may still be
# starting (a large hugepage-backed guest can take a while). A real leftover is older than this.
STARTING_GRACE = 120.0


@dataclass(frozen=True)
class Prepared:
    record: DomainRecord
    hugepages: HugepagePlan | None
    cpus: CpuPlan | None = None
    warnings: tuple[str, ...] = ()


def ledger_for(cfg: Config) -> Ledger:
    return Ledger(cfg.ledger_path, cfg.lock_timeout)


def topology_for(cfg: Config) -> HostTopology:
    return read_topology(cfg.sysfs_root, cfg.proc_root)


def preview_pool_writes(dom: Domain, plan: HugepagePlan, cfg: Config, topo: HostTopology, state: LedgerState,
                        ) -> list[accounting.PoolWrite]:
    """The pool writes prepare would make for ``plan`` now (``kvmhooks plan``); raises as prepare would."""
    view = accounting.after_claims(topo, state, dom.uuid)
    problems = accounting.reservation_problems(state, view, cfg, dom.uuid, plan.pools())
    if problems:
        raise CapacityError("not enough memory for huge pages: " + "; ".join(problems), vm=dom.name)
    return accounting.reservation_writes(state, topo, cfg, dom.uuid, plan.pools())


def check(dom: Domain, cfg: Config, topo: HostTopology | None = None, state: LedgerState | None = None,
          ) -> tuple[HugepagePlan | None, CpuPlan | None]:
    """Everything prepare would refuse for (but pool capacity), without the lock and touching nothing.

    With ``state`` (a ledger snapshot) the plans are what prepare would do now; without, only what
    depends on the VM and the host is checked (against an empty ledger).
    """
    state = state if state is not None else LedgerState()
    topo = accounting.after_claims(topo or topology_for(cfg), state, dom.uuid)
    hp = plan_hugepages(dom, topo, cfg)
    return hp, _plan_cpus(dom, topo, cfg, state, frozenset(hp.pages) if hp else frozenset())


def _plan_cpus(dom: Domain, topo: HostTopology, cfg: Config, state: LedgerState, nodes: frozenset[int]
               ) -> CpuPlan | None:
    if dom.active_tuning is None or not dom.active_tuning.cpu_work:
        return None  # (most hook calls: the CPU planner is not even imported)
    from kvmhooks.plan.cpus import plan_cpus

    return plan_cpus(dom, topo, cfg, state, nodes)


# --- the session: lock, recovery, the write protocol -----------------------------------------------------

class Session:
    """An exclusive hold on the ledger with the pools' invariant restored; see the module docstring."""

    def __init__(self, txn: Transaction, cfg: Config, pools: SysfsPools):
        self.txn = txn
        self.cfg = cfg
        self.pools = pools
        self._topo: HostTopology | None = None
        # What this session repaired before its own work (a ledger set aside, recovery, an admin's resize, an
        # interrupted isolation change): kvmhooks reconcile reports it.
        self.repairs: list[str] = []
        # The VMs whose deferred stop (Ledger.stopping_dir) this session released first: their records.
        self.settled: dict[str, DomainRecord] = {}

    @property
    def state(self) -> LedgerState:
        return self.txn.state

    @property
    def topo(self) -> HostTopology:
        """The host as it is now: read again after every pool write."""
        if self._topo is None:
            self._topo = topology_for(self.cfg)
        return self._topo

    def commit(self) -> None:
        self.txn.commit()

    def refresh(self) -> None:
        self._topo = None

    def execute(self, writes: list[accounting.PoolWrite], op: str, uuid: str | None, vm: str,
                deadline: float | None = None, settle: bool = True) -> dict[str, int]:
        """Write pools through intents (see the module docstring); returns the persistent sizes read back.

        On a failure the intents stay committed and the exception propagates: the caller may call
        :meth:`recover` at once, and if it cannot (killed), the next session does. ``settle=False`` leaves
        the read-back and the cleared intents to the caller's next commit (prepare's, which also makes the
        record "prepared"): a crash before it finds the intents and rolls the prepare back, as it would
        with them settled, so a separate commit would only cost a write and two fsyncs.
        """
        if not writes:
            return {}
        pid = os.getpid()
        mine = [Intent(w.pool, w.before, w.target, pid, op, uuid) for w in writes]
        written = {w.pool for w in writes}
        # An earlier intent on a pool this write settles is superseded by it, in the same commit: there is never
        # a moment when that pool has no intent and is not where the ledger says.
        self.state.intents = [i for i in self.state.intents if i.pool not in written] + mine
        self.commit()
        got = apply_pool_writes(self.pools, writes, deadline if deadline is not None else time.monotonic(), vm)
        for key, n in got.items():
            accounting.record_readback(self.state, key, n, n)
        self.state.intents = [i for i in self.state.intents if not any(i is m for m in mine)]
        self.forget_settled(got)
        if settle:
            self.commit()
        self.refresh()
        return got

    def forget_settled(self, keys: Mapping[str, int] | list[str]) -> None:
        for key in list(keys):
            if accounting.settled(self.state, key):
                del self.state.pools[key]

    def recover(self) -> list[str]:
        """Roll back or complete what an interrupted operation left. Idempotent.

        A reservation still "preparing" belongs to a prepare that never finished (its owner held the lock
        until it was done, and we hold it now): libvirt failed that start, so it is dropped. Every pool an
        intent names then goes to its target, which completes a release and undoes a prepare alike.
        """
        st = self.state
        orphans = sorted(st.preparing())
        if not st.intents and not orphans:
            return []
        self.refresh()
        found = []
        keys = {i.pool for i in st.intents}
        for u in orphans:
            rec = st.domains.pop(u)
            keys |= set(rec.hugepages)
            found.append(f"rolled back the unfinished reservation of VM {rec.name!r} ({u})")
        for key in sorted({i.pool for i in st.intents}):
            its = [i for i in st.intents if i.pool == key]
            found += [f"recovered an interrupted {i.op} write on pool {key} ({i.before} → {i.target} pages, "
                      f"process {i.pid})" for i in its]
            ps = accounting.pool_state(self.topo, key)
            if ps is None:
                continue
            now = accounting.persistent(ps)
            prec = st.pools.get(key)
            if prec is None:  # committed with the first intent, so lost only with a set-aside: the admin's is
                # below both ends of every write (a release's "before" still has the released VM's pages)
                low = min(min(i.before, i.target) for i in its)
                prec = st.pools[key] = PoolRecord(max(0, low - st.reserved(key)), now, inferred=True)
            high = max(max(i.before, i.target) for i in its)
            if now > high:  # above both ends of the interrupted write: the admin raised it meanwhile
                prec.baseline += now - high
                found.append(f"pool {key} was raised by hand to {now} pages while a write was interrupted: the "
                             f"admin's baseline is now {prec.baseline}")
        writes = accounting.writes_for(st, self.topo, self.cfg, keys)
        problems = accounting.capacity_problems(writes, self.topo, self.cfg)
        for key, why in problems.items():
            found.append(f"cannot restore pool {key} to its target now: {why}")
        writes = [w for w in writes if w.pool not in problems]
        for key in keys - {w.pool for w in writes} - set(problems):  # already at their target
            ps = accounting.pool_state(self.topo, key)
            if ps is not None and key in st.pools:
                st.pools[key].expected = accounting.persistent(ps)
        # Intents of pools already at their target are done; those of pools written now are replaced by this
        # recovery's own in execute's first commit; those that cannot be restored now stay for the next session.
        st.intents = [i for i in st.intents if i.pool in problems or i.pool in {w.pool for w in writes}]
        for f in found:
            log.warning("recovery: %s", f)
            st.note(f)
        if writes:
            self.execute(writes, "recover", None, "-", time.monotonic() + self.cfg.retry_timeout)
        self.forget_settled(list(keys))
        self.commit()
        return found


# Whether the hook a served call answers still waits (kvmhooks.prepare_server sets it for its thread): asked
# under the ledger lock, before anything of the call is done. A hook that waits cannot have returned, so its
# VM cannot have been stopped or started again meanwhile, and the lock is held from the question to the
# commit; one that stopped waiting has run (or runs) the call in Python, and its VM may be in its next run,
# whose record a late release would delete (or whose stop a late prepare would outlive).
_hook_waits: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar("hook_waits", default=None)


@contextlib.contextmanager
def served(hook_waits: Callable[[], bool]) -> Iterator[None]:
    """The sessions of this block go on only while ``hook_waits()`` (kvmhooksd serving a hook call)."""
    token = _hook_waits.set(hook_waits)
    try:
        yield
    finally:
        _hook_waits.reset(token)


@contextlib.contextmanager
def session(cfg: Config, pools: SysfsPools | None = None, quarantine: bool = False,
            record_isolation: Callable[[str, str], None] | None = None) -> Iterator[Session]:
    """Take the ledger lock, recover, observe; commit what is left when the block ends without error.

    ``record_isolation`` (a dry run): an isolation change to finish is passed to it, not made."""
    led = ledger_for(cfg)
    with led.hold(quarantine=quarantine) as txn:
        waits = _hook_waits.get()
        if waits is not None and not waits():
            raise Abandoned("its hook stopped waiting for kvmhooksd; the hook's own Python does the call")
        s = Session(txn, cfg, pools or SysfsPools(cfg.sysfs_root, cfg.proc_root))
        if led.set_aside is not None:
            log.warning("ledger was unreadable: copied to %s; kept what still reads, rebuilding the rest",
                        led.set_aside)
            s.repairs.append(set_aside_line(led.set_aside, s.state, led.lost))
            s.repairs += [f"could not read {part}: rebuilt from the running VMs and the pools" for part in led.lost]
            for f in accounting.rebuild_lost(s.state, s.topo, cfg):
                s.state.note(f)
                s.repairs.append(f)
        if led.recounted:
            s.repairs.append(RECOUNTED)
        s.repairs += s.recover()
        settle_stops(s)
        s.repairs += expire_claims(s.state, time.time())
        for f in accounting.observe(s.state, s.topo, cfg):
            log.warning("%s", f)
            s.state.note(f)
            s.repairs.append(f)
        s.commit()
        if isolation_due(s.state):  # an isolation change was interrupted, or never made: finish it first
            s.repairs.append("brought the host's isolation in line with the ledger (an operation stopped first)")
            for w in isolate_host(s, VMLog("-", "-"), record_isolation):
                s.state.note(f"recovery: {w}")
                s.repairs.append(f"recovery: {w}")
            s.commit()
        yield s


def _stop_markers(d: Path) -> dict[str, str | None]:
    """The stopping/ markers in ``d``: UUID → the token it carries (None when it cannot be read), in UUID
    order; none when the directory cannot be listed."""
    from kvmhooks.xmlsafe import UUID_RE

    try:
        names = sorted(n for n in os.listdir(d) if UUID_RE.fullmatch(n))
    except OSError:
        return {}
    out: dict[str, str | None] = {}
    for uuid in names:
        try:
            with open(d / uuid, "rb") as f:
                out[uuid] = f.read(64).decode("ascii", "replace").strip()
        except OSError:
            out[uuid] = None
    return out


def pending_stops(cfg: Config, state: LedgerState) -> set[str]:
    """The VMs of ``state`` (a snapshot) whose release hooks/qemu left to the detached worker and that no
    session has done yet (``kvmhooks status`` shows them as such, not as holding their record)."""
    out = set()
    for uuid, token in _stop_markers(ledger_for(cfg).stopping_dir).items():
        rec = state.domains.get(uuid)
        if rec is not None and rec.token and token == rec.token:
            out.add(uuid)
    return out


def settle_stops(s: Session) -> None:
    """Release the VMs whose stop hooks/qemu left for later (:attr:`Ledger.stopping_dir`): each whose record
    still has the token its marker carries, committed before the marker goes (a session killed in between
    leaves a marker whose record is gone, which the next one only removes). Done first in every session, so
    the VM's next prepare finds its last run released; a marker of another token (an older run's, one that
    could not be removed, or cut short) is only removed. Nothing here fails the session: a marker this one
    cannot read or remove stays for the next, and meets no record of its token."""
    d = s.txn.ledger.stopping_dir
    for uuid, token in _stop_markers(d).items():
        if token is None:
            continue
        rec = s.state.domains.get(uuid)
        if rec is not None and token and rec.token == token:
            _release_locked(s, uuid)
            s.commit()
            s.settled[uuid] = rec
            _log_released(uuid, rec)
            try:
                _after_release(s.cfg, uuid)
            except OSError as e:  # (its QMP socket left behind: no reason to keep any session from its work)
                log.warning("VM %s: released, but: %s", uuid, e)
        with contextlib.suppress(OSError):
            os.unlink(d / uuid)


def expire_claims(st: LedgerState, now: float) -> list[str]:
    """Drop the claims whose deadline passed (a migration that failed after the filter, an offline one, a
    killed process: nothing else ever runs for them on this host); returns a line for each. A claim holds no
    pool pages, so dropping its record is all it takes."""
    out = []
    for uuid in sorted(st.claims()):
        rec = st.domains.get(uuid)  # (a stale name in the header's summary: no record)
        if rec is not None and rec.state == CLAIMED and rec.expires <= now:
            del st.domains[uuid]
            out.append(f"dropped the expired claim of {rec.name} ({uuid}): it was never prepared (a migration or "
                       "restore that failed or went elsewhere)")
            st.note(out[-1])
            log.info("%s", out[-1])
    return out


def set_aside_line(aside: Path | None, kept: LedgerState, lost: list[str]) -> str:
    where = f" to {aside}" if aside is not None else ""
    return (f"set the unreadable ledger aside{where}, keeping what still reads: {len(kept.domains)} VM record(s), "
            f"{len(kept.pools)} pool record(s)" + (", the host isolation section" if kept.isolation else "")
            + (f"; {len(lost)} part(s) could not be read" if lost else ""))


# --- host isolation (<kvm:host>) -------------------------------------------------------------------------

def _isolation_idle(st: LedgerState) -> bool:
    """Nothing isolated and no VM asking: the common case, decided from the header alone."""
    return not st.isolation and not st.domains.summary().isolating


def isolation_target(st: LedgerState) -> IsolationTarget:
    """What the VMs holding dedicated CPUs and asking for <kvm:host> want together (an unfinished
    reservation asks nothing: its start may still fail)."""
    from kvmhooks.annotation import HostSpec
    from kvmhooks.plan.isolation import target_for

    holders = []
    for uuid in sorted(st.domains.summary().isolating):
        rec = st.domains.get(uuid)  # (a stale name in the header's summary: no record, nothing asked)
        if rec is not None and rec.isolation and rec.cpus and rec.state != "preparing":
            holders.append((rec.cpus, HostSpec(bool(rec.isolation["isolate"]), bool(rec.isolation["irqs"]),
                                               rec.isolation.get("governor"))))
    return target_for(holders)


def _fingerprint(target: IsolationTarget) -> str:
    """What the host was last converged for, kept beside the isolation state: a session that finds the
    records asking for something else (an operation died between its ledger commit and its converge) knows
    to converge, without reading the host."""
    return "" if target.empty else (f"tasks={format_cpuset(target.tasks)};irqs={format_cpuset(target.irqs)};"
                                    + ",".join(f"{c}:{g}" for c, g in sorted(target.governors.items())))


def isolation_due(st: LedgerState) -> bool:
    """Whether the host's isolation must be brought in line now: an interrupted change, or records that ask
    for another isolation than the one last applied. Reads the ledger only (nothing where none is asked)."""
    if _isolation_idle(st):
        return False
    return bool(st.isolation.get("pending")) or st.isolation.get("target", "") != _fingerprint(isolation_target(st))


def host_settings(cfg: Config) -> HostSettings:
    from kvmhooks.apply.isolation import HostSettings

    return HostSettings(cfg.proc_root, cfg.sysfs_root, cfg.cgroup_root, cfg.run_root)


def _converge_isolation(st: LedgerState, cfg: Config, commit: Callable[[], None],
                        record: Callable[[str, str], None] | None) -> IsolationReport:
    """One converge of the host on what ``st``'s records ask; ``commit`` makes the ledger durable (its
    isolation section, with the fingerprint of the target, is kept in ``st`` first)."""
    from kvmhooks.apply.isolation import converge
    from kvmhooks.plan.isolation import IsolationState

    state = IsolationState.from_json(st.isolation)
    target = isolation_target(st)
    mark = _fingerprint(target)

    def keep() -> None:
        st.isolation = {} if state.empty else {**state.to_json(), "target": mark}
        commit()

    return converge(state, target, host_settings(cfg), keep, record)


def isolate_host(s: Session, vlog: VMLog, record: Callable[[str, str], None] | None = None) -> list[str]:
    """Bring the host's isolation in line with the ledger's records (crash-safe: see
    :func:`kvmhooks.apply.isolation.converge`); returns what went wrong, as warnings. Never raises for the
    host's refusals: isolation is best effort, a VM starts and stops whatever it says. Costs nothing where
    no VM asks for isolation and nothing is isolated (the hook's common case).

    ``record`` (``kvmhooks plan``): the writes are passed to it instead, the ledger untouched.
    """
    st = s.state
    if _isolation_idle(st):
        return []
    try:
        report = _converge_isolation(st, s.cfg, s.commit, record)
    except Exception as e:  # best effort, whatever the host (or a bug) throws: the VM starts and stops anyway
        vlog.warning("host isolation: %s (retried at the next operation or kvmhooks reconcile)", e)
        return [f"host isolation: {e}"]
    out = [f"host isolation: {key}: {why}" for key, why in sorted(report.failed.items())] + \
        [f"host isolation: {n}" for n in report.notes]
    if report.changed and record is None:
        vlog.info("host isolation: CPUs %s isolated (%s); %d setting(s) changed, %d task(s) moved%s",
                  format_cpuset(report.isolated) or "none", report.backend, len(report.changed),
                  report.tasks_moved, f", {len(report.unmovable)} unmovable IRQ(s) left" if report.unmovable else "")
    for w in out:
        vlog.warning("%s", w)
    return out


def _ensure_pool_records(s: Session, keys: list[str]) -> None:
    """A pool kvmhooks is about to write for the first time: its size now is the admin's baseline."""
    for key in keys:
        ps = accounting.pool_state(s.topo, key)
        if ps is not None and key not in s.state.pools and key not in s.cfg.leave_alone:
            now = accounting.persistent(ps)
            s.state.pools[key] = PoolRecord(max(0, now - s.state.reserved(key)), now)


# --- prepare / release ------------------------------------------------------------------------------------

def prepare(dom: Domain, cfg: Config, pools: SysfsPools | None = None, make_socket_dir: bool = True,
            record_isolation: Callable[[str, str], None] | None = None) -> Prepared:
    """Reserve what the VM needs before QEMU starts; raises (host unchanged) when it cannot.

    ``make_socket_dir=False`` and ``record_isolation`` (the dry run) leave the QMP socket directory alone
    and pass the host isolation writes to ``record_isolation`` instead of making them.
    """
    vlog = VMLog(dom.name, dom.uuid)
    check(dom, cfg)  # validation errors surface before we queue for the lock
    if dom.qmp_socket is not None and make_socket_dir:
        from kvmhooks.apply.sockets import ensure_socket_dir

        ensure_socket_dir(dom.qmp_socket)
    with session(cfg, pools, record_isolation=record_isolation) as s:
        prepared = _prepare_locked(s, dom, vlog, record_isolation)
    clear_failure(cfg, dom.uuid)
    return prepared


def _prepare_locked(s: Session, dom: Domain, vlog: VMLog,
                    record_isolation: Callable[[str, str], None] | None = None) -> Prepared:
    st, cfg = s.state, s.cfg
    s.txn.ledger.begin_run(dom.uuid)
    old = st.domains.pop(dom.uuid, None)
    claim = old if old is not None and old.state == CLAIMED else None
    if claim is not None:
        vlog.info("coming in (migration or restore): its claim becomes the reservation")
    elif old is not None:
        # A previous start never reached release (crash, killed libvirtd): its pages count no more, so one
        # set of writes below gives them back and takes the new ones; a VM never holds two reservations.
        vlog.warning("stale reservation found (state %s); replacing it", old.state)
    # Plan again, fresh and under the lock (earlier holders changed the pools and the CPUs). The pages of a
    # claim were counted, not added: the plan takes them now (the filter rewrote <numatune> to its nodes).
    plan, cpu_plan = check(dom, cfg, s.topo, st)
    if claim is not None and claim.cpus and cpu_plan is not None and claim.pins is not None:
        cpu_plan = _claimed_cpus(claim, cpu_plan)  # exactly the CPUs the XML's <cputune> was rewritten to
    rec = DomainRecord(name=dom.name, state="preparing", token=new_token())
    warnings: list[str] = []
    keys = list(old.hugepages) if old else []
    if plan is not None:
        view = accounting.after_claims(s.topo, st, dom.uuid)
        problems = accounting.reservation_problems(st, view, cfg, dom.uuid, plan.pools())
        if problems:
            refusal = CapacityError("not enough memory for huge pages: " + "; ".join(problems), vm=dom.name)
            if plan.required:
                raise refusal  # nothing written, nothing committed
            warnings.append(f"{refusal} (required='no': starting without reserved pages)")
            vlog.warning("%s", warnings[-1])
            plan = None
        else:
            rec.hugepages = {k: p for k, p in plan.pools().items() if k not in cfg.leave_alone}
            rec.borrowed = {k: p for k, p in plan.pools().items() if k in cfg.leave_alone}
            _ensure_pool_records(s, list(rec.hugepages))
    st.domains[dom.uuid] = rec
    writes = accounting.writes_for(st, s.topo, cfg, [*keys, *rec.hugepages])
    try:
        s.execute(writes, "prepare", dom.uuid, dom.name, time.monotonic() + cfg.retry_timeout, settle=False)
    except CapacityError as e:  # the kernel gave fewer pages than it seemed to have: put everything back
        s.recover()
        if plan is None or plan.required:
            raise
        warnings.append(f"{e} (required='no': starting without reserved pages)")
        vlog.warning("%s", warnings[-1])
        rec.hugepages, rec.borrowed, plan = {}, {}, None
        st.domains[dom.uuid] = rec
    except BaseException:
        with contextlib.suppress(Exception):
            s.recover()  # best effort: if this fails too, the next session does it
        raise
    if plan is not None and writes:
        vlog.info("reserved %s", ", ".join(f"{w.pool} {w.target - w.before:+d} pages (now {w.target})"
                                           for w in writes))
    if rec.borrowed:
        vlog.info("using free pages of left-alone pools: %s", rec.borrowed)
    if cpu_plan is not None:
        _record_cpus(rec, dom, cpu_plan)
        vlog.info("CPUs: dedicated %s, pins %s", rec.cpus or "none", rec.pins.to_json() if rec.pins else None)
    rec.state = "prepared"
    stamp(rec)
    # Whether this run's started hook has work (the shell skips Python without the marker): set before the
    # commit that makes the record "prepared".
    t = dom.active_tuning
    s.txn.ledger.mark_tune(dom.uuid, bool(rec.borrowed) or (t is not None and t.live_work),
                           lambda: (u for u, r in st.domains.items() if r.state in NOT_MAPPED_YET))
    warnings += isolate_host(s, vlog, record_isolation)
    return Prepared(rec, plan, cpu_plan, tuple(warnings))


def _claimed_cpus(claim: DomainRecord, fresh: CpuPlan) -> CpuPlan:
    """The CPU plan a claim recorded: another VM may have freed a CPU the planner would now prefer, but the
    incoming QEMU is launched with the claim's pins (the filter wrote them into its XML)."""
    from kvmhooks.plan.cpus import CpuPlan

    p = claim.pins
    assert p is not None
    return CpuPlan(dict(p.vcpus), p.emulator, dict(p.iothreads), frozenset(claim.cpus), claim.shared, fresh.nodes,
                   frozenset(p.floating), p.emulator_floats)


def claim(dom: Domain, cfg: Config, place: Callable[[HostTopology, LedgerState], Placement],
          pools: SysfsPools | None = None) -> tuple[Placement, DomainRecord]:
    """Record a claim for a VM coming in (the migrate/restore filter): ``place`` plans it on this host's
    topology and ledger under the lock, and the claim holds what it chose — the CPUs in the ledger, the pages
    counted against the nodes' free memory (no pool is written before its prepare) — until its prepare or
    ``cfg.claim_timeout``. Raises (nothing recorded) when it does not fit, or when the VM already holds a
    reservation here: then it runs on this host already, or its record is stale.
    """
    with session(cfg, pools) as s:
        st = s.state
        old = st.domains.get(dom.uuid)
        if old is not None and old.state != CLAIMED:
            raise HostError(f"it already holds a reservation on this host (state {old.state}): it runs here, or "
                            "its record is stale ('kvmhooks reconcile' clears a stale one)", vm=dom.name)
        st.domains.pop(dom.uuid, None)  # an earlier claim (a migration tried again): replaced
        placed = place(s.topo, st)
        rec = DomainRecord(name=dom.name, state=CLAIMED, token=new_token(),
                           expires=round(time.time() + cfg.claim_timeout, 3))
        if placed.hugepages is not None:
            pools_ = placed.hugepages.pools()
            rec.hugepages = {k: p for k, p in pools_.items() if k not in cfg.leave_alone}
            rec.borrowed = {k: p for k, p in pools_.items() if k in cfg.leave_alone}
        if placed.cpus is not None:
            _record_cpus(rec, placed.dom, placed.cpus)
            rec.isolation = None  # the host is isolated at its prepare, not for a VM that may never come
        stamp(rec)
        st.domains[dom.uuid] = rec
    VMLog(dom.name, dom.uuid).info("claimed for an incoming migration or restore: %s; expires in %g s",
                                   ", ".join([*(f"{k} {n} pages" for k, n in sorted(rec.hugepages.items())),
                                              *([f"CPUs {format_cpuset(rec.cpus)}"] if rec.cpus else [])])
                                   or "nothing to hold", cfg.claim_timeout)
    return placed, rec


@dataclass(frozen=True)
class Placement:
    """Where an incoming VM goes on this host: ``dom`` is the VM as planned (its <numatune> dropped when the
    source's did not fit here), with its huge pages and CPUs."""

    dom: Domain
    hugepages: HugepagePlan | None
    cpus: CpuPlan | None
    relaxed: bool = False  # the source's <numatune> was not kept


def _isolation_of(dom: Domain) -> dict[str, object] | None:
    """The record's copy of <kvm:host> (only a VM with dedicated CPUs may carry one: the contract)."""
    h = dom.active_tuning.host if dom.active_tuning is not None else None
    return None if h is None else {"isolate": h.isolate, "irqs": h.irqs, "governor": h.governor}


def _record_cpus(rec: DomainRecord, dom: Domain, plan: CpuPlan) -> None:
    t = dom.active_tuning
    rec.cpus = sorted(plan.dedicated)
    rec.shared = plan.shared
    rec.isolation = _isolation_of(dom) if rec.cpus else None
    rec.pins = plan.to_pins()
    if t is not None and t.cpu is not None:
        rec.threads = t.cpu.threads
        if t.cpu.emulator == "isolate" and t.emulatorpin is None and plan.emulator and len(plan.emulator) == 1:
            rec.emulator_cpu = min(plan.emulator)


def release(uuid: str, cfg: Config, pools: SysfsPools | None = None) -> DomainRecord | None:
    """Give back everything the VM holds. Idempotent: an unknown VM is a no-op.

    The VM's removal is committed (with the intents) before any pool shrinks: a release that fails or dies
    after that point is completed by the next session, and one that fails before it changed nothing.
    """
    with session(cfg, pools) as s:
        rec = _release_locked(s, uuid)
        settled = s.settled.get(uuid)
    if settled is not None:  # its stop was left for later, and the session released it first (and logged it)
        return settled
    _after_release(cfg, uuid)
    if rec is not None:
        _log_released(uuid, rec)
    return rec


def _after_release(cfg: Config, uuid: str) -> None:
    from kvmhooks.apply.sockets import qmp_socket_path, remove_socket

    clear_failure(cfg, uuid)  # the run that failed is over (its failures stay in the log)
    remove_socket(qmp_socket_path(uuid))  # QEMU leaves its -qmp socket behind


def _log_released(uuid: str, rec: DomainRecord) -> None:
    VMLog(rec.name, uuid).info("released %s", ", ".join(f"{k} {v} pages" for k, v in rec.hugepages.items())
                               or "its entry (it held no pages)")


def _release_locked(s: Session, uuid: str) -> DomainRecord | None:
    rec = s.state.domains.pop(uuid, None)
    if rec is None:
        return None
    writes = accounting.writes_for(s.state, s.topo, s.cfg, rec.hugepages)
    s.execute(writes, "release", uuid, rec.name)
    s.forget_settled(list(rec.hugepages))
    if rec.isolation:
        isolate_host(s, VMLog(rec.name, uuid))  # its CPUs go back to the host (all of it, if it was the last)
    return rec


# --- retune (a running VM's annotation changed) ---------------------------------------------------------

@dataclass(frozen=True)
class Retuned:
    record: DomainRecord
    pending_restart: tuple[str, ...] = ()  # what only a restart can change (huge pages), never half-applied
    warnings: tuple[str, ...] = ()  # what the host refused (isolation), the VM's tuning applied anyway


def retune(dom: Domain, cfg: Config) -> Retuned | None:
    """Re-plan a running VM's CPUs from its edited live annotation, under the same rules as prepare
    (dedicated CPUs exclusive, shared VMs off them); the caller applies the new pins. None: not ours.

    Raises (the ledger unchanged) when the new plan cannot be had: the previous tuning then stays.
    """
    from kvmhooks.config import parse_pool_key

    with session(cfg) as s:
        rec = s.state.domains.get(dom.uuid)
        if rec is None or dom.active_tuning is None:
            return None
        pending = []
        hp = None
        try:
            hp = plan_hugepages(dom, s.topo, cfg)
        except KvmhooksError as e:
            pending.append(f"huge pages: {e}")
        wanted = hp.pools() if hp is not None else {}
        if wanted != {**rec.hugepages, **rec.borrowed}:
            pending.append(f"huge pages {wanted or 'none'} (holds {({**rec.hugepages, **rec.borrowed}) or 'none'}):"
                           " takes effect at the next start")
        nodes = frozenset(parse_pool_key(k)[0] for k in {**rec.hugepages, **rec.borrowed})
        rec.cpus = []  # its own CPUs are free for its new plan (not committed if the plan is refused)
        cpu_plan = _plan_cpus(dom, s.topo, cfg, s.state, nodes)
        if cpu_plan is None:
            rec.cpus, rec.pins, rec.shared, rec.threads, rec.emulator_cpu = [], None, False, None, None
            rec.isolation = None
        else:
            rec.emulator_cpu = None
            _record_cpus(rec, dom, cpu_plan)
        stamp(rec)
        warnings = isolate_host(s, VMLog(dom.name, dom.uuid))  # its CPUs or its <kvm:host> may have changed
        return Retuned(rec, tuple(pending), tuple(warnings))


# --- adopt (reconnect) ----------------------------------------------------------------------------------

def adopt(dom: Domain, cfg: Config, pools: SysfsPools | None = None) -> DomainRecord | None:
    """A running VM after a libvirtd restart: account what it holds without reserving anything again.

    A VM already in the ledger keeps its record (its reservation is a fact; a live ``enabled="no"`` does
    not free CPUs it is still pinned to). One missing from it is adopted from facts: the pages its QEMU
    process has on each node, its live ``<cputune>``.
    """
    with session(cfg, pools) as s:
        return _adopt_locked(s, dom)


def _adopt_locked(s: Session, dom: Domain) -> DomainRecord | None:
    vlog = VMLog(dom.name, dom.uuid)
    st = s.state
    rec = st.domains.get(dom.uuid)
    if rec is not None:
        rec.state = "running" if rec.state in ("prepared", "starting", "running") else rec.state
        if rec.unplaced:
            place_unplaced(st, s.topo, s.cfg, dom, rec, vlog)
        stamp(rec)
        vlog.info("reconnect: already in the ledger")
        return rec
    if dom.active_tuning is None:
        return None
    rec = _adopt_into(st, s.topo, s.cfg, dom, vlog)
    vlog.info("reconnect: adopted (pages %s, dedicated CPUs %s)", rec.hugepages or "none", rec.cpus or "none")
    isolate_host(s, vlog)
    return rec


def _adopt_into(st: LedgerState, topo: HostTopology, cfg: Config, dom: Domain, vlog: VMLog) -> DomainRecord:
    """Record a running VM from facts. Its pages are already inside the pools, so it can hold no more of a
    pool than what is there beyond the admin's baseline and the other reservations: adoption never raises
    a pool, and lowers only a baseline made from facts (inferred: a lost record rebuilt, or made by an earlier
    adoption), which holds the pages of the VMs not adopted yet. Pages whose node the facts do not give are
    recorded as unplaced and touch no pool."""
    rec = DomainRecord(name=dom.name, state="adopted", token=new_token())
    found = AdoptedPages({}, {})
    try:
        found = adopted_pages(dom, topo, cfg)
    except KvmhooksError as e:  # the VM runs already: record what we can, never fail
        vlog.warning("reconnect: cannot work out its huge pages (%s); adopting without them", e)
    _count_adopted(st, topo, cfg, rec, found, vlog)
    _adopt_cpus(dom, rec, topo)
    taken = rec.cpus and set(rec.cpus) & st.dedicated_cpus(excluding=dom.uuid)
    if taken:
        vlog.warning("reconnect: it is pinned to CPU(s) %s that the ledger gives to other VMs; not counting them "
                     "as its own (kvmhooks status shows the overlap)", format_cpuset(taken))
        st.note(f"VM {dom.name!r} ({dom.uuid}) runs on CPU(s) {format_cpuset(taken)} dedicated to other VMs")
        rec.cpus = sorted(set(rec.cpus) - taken)
        rec.isolation = rec.isolation if rec.cpus else None
    stamp(rec)
    st.domains[dom.uuid] = rec
    return rec


def _count_adopted(st: LedgerState, topo: HostTopology, cfg: Config, rec: DomainRecord, found: AdoptedPages,
                   vlog: VMLog) -> None:
    rec.unplaced = dict(found.unplaced)
    if found.unplaced:
        what = ", ".join(f"{n} x {k}" for k, n in sorted(found.unplaced.items()))
        vlog.warning("reconnect: where its huge pages are is not known (%s); %s recorded as unplaced, no pool "
                     "changed (kvmhooks reconcile places them once its QEMU can be read)", found.why, what)
        st.note(f"VM {rec.name!r}: huge pages {what} not placed ({found.why}); pools left alone")
    rec.borrowed = {k: p for k, p in found.pages.items() if k in cfg.leave_alone}
    for key, want in found.pages.items():
        ps = accounting.pool_state(topo, key)
        if key in cfg.leave_alone or ps is None:
            continue
        now = accounting.persistent(ps)
        others = st.reserved(key)
        prec = st.pools.get(key)
        if prec is None:  # its pages are in the pool: all of it beyond the other VMs' may be theirs
            prec = st.pools[key] = PoolRecord(max(0, now - others), now, inferred=True)
        # An inferred baseline holds the pages of the VMs not adopted yet: each one takes its own out of it.
        take = min(want, prec.baseline if prec.inferred else max(0, now - others - prec.baseline))
        if take < want:
            vlog.warning("reconnect: pool %s has only %d pages beyond the admin's and other VMs'; counting %d of "
                         "its %d pages as kvmhooks'", key, take, take, want)
        if take:
            rec.hugepages[key] = take
        if prec.inferred:
            prec.baseline -= take
        prec.expected = now


def place_unplaced(st: LedgerState, topo: HostTopology, cfg: Config, dom: Domain, rec: DomainRecord,
                   vlog: VMLog) -> str | None:
    """Count an adopted VM's unplaced pages where its QEMU now shows them; returns what it did (None: still
    unknown, the record unchanged)."""
    try:
        found = adopted_pages(dom, topo, cfg)
    except KvmhooksError:
        return None
    if found.unplaced:
        return None
    _count_adopted(st, topo, cfg, rec, found, vlog)
    stamp(rec)
    return (f"placed the huge pages of {rec.name} ({dom.uuid}): "
            + (", ".join(f"{k} {n}" for k, n in sorted(rec.hugepages.items())) or "none beyond the admin's"))


@dataclass(frozen=True)
class AdoptedPages:
    pages: dict[str, int]  # pool → pages, where the facts put them
    unplaced: dict[str, int]  # page size ("2048kB") → pages whose node the facts do not give
    why: str = ""  # why they are unplaced


def qemu_of(cfg: Config, name: str, uuid: str) -> QemuProcess:
    """The domain's QEMU process, as only libvirt could have made it (see topology.qemu_process); the
    pid file is under ``run_root``, qemu.conf beside ``hooks_dir``. Raises HostError."""
    return qemu_process(cfg.proc_root, cfg.run_root, qemu_uids(cfg.hooks_dir.parent), name, uuid)


def vm_memory(cfg: Config, name: str, uuid: str) -> dict[int, dict[str, int]]:
    """Where a running VM's memory is per host node (numastat -p's data); empty when its QEMU cannot be
    identified or read (status and the metrics show nothing rather than another process's memory)."""
    try:
        return qemu_memory(numa_maps(cfg.proc_root, qemu_of(cfg, name, uuid)))
    except HostError as e:
        log.debug("VM %r (%s): memory per node unknown: %s", name, uuid, e)
        return {}


def adopted_pages(dom: Domain, topo: HostTopology, cfg: Config) -> AdoptedPages:
    """Pages per pool of a running VM: its size from the domain, where they are from facts.

    The count is the domain's (``<memory>`` or the annotation's count). Where they sit comes from its QEMU
    process's ``numa_maps`` (faulted pages; pages not faulted in yet go with the bulk). Without that, only
    what decides placement is a fact: a one-node host, the domain's strict ``<numatune>``/cells, the
    annotation's nodes. Anything else would be a guess (a wrong node leaks pages on one node and lowers the
    admin's pool on another), so the pages are returned unplaced instead.
    """
    plan = plan_hugepages(dom, topo, cfg)
    if plan is None:
        return AdoptedPages({}, {})
    why = ""
    observed: dict[int, int] = {}
    try:
        rows = numa_maps(cfg.proc_root, qemu_of(cfg, dom.name, dom.uuid))
        observed = {node: n for (node, size), n in qemu_hugepages(rows).items() if size == plan.size_kib and n > 0}
        why = "its QEMU process has no huge pages faulted in yet"
    except HostError as e:
        why = str(e)
    if observed:
        pages = dict(observed)
        rest = plan.total - sum(observed.values())
        bulk = max(sorted(pages), key=lambda n: pages[n])
        pages[bulk] += max(0, rest)  # faulted pages are facts; the rest is not placed yet
    else:
        placed_by_domain = (dom.numatune_nodes and dom.numatune_mode != "preferred") or dom.memnodes or (
            dom.tuning and dom.tuning.hugepages and dom.tuning.hugepages.nodes)
        if len(topo.nodes) > 1 and not placed_by_domain:
            return AdoptedPages({}, {f"{plan.size_kib}kB": plan.total}, why)
        pages = dict(plan.pages)
    return AdoptedPages({pool_key(n, plan.size_kib): p for n, p in sorted(pages.items()) if p}, {})


def _adopt_cpus(dom: Domain, rec: DomainRecord, topo: HostTopology) -> None:
    """Take the running VM's CPUs from its live <cputune>: what is pinned now is what it holds, with the
    sibling threads a ``threads="isolate"`` VM keeps empty and its isolated emulator CPU."""
    t = dom.active_tuning
    if t is None or t.cpu is None:
        return
    explicit = {p.target for p in t.vcpupins}
    emu = dom.live_emulatorpin
    auto_emulator = t.emulatorpin is None and t.cpu.emulator != "isolate"
    rec.threads = t.cpu.threads
    floating: list[int] = []
    emulator_floats = False
    cpus: set[int] = set()
    if t.cpu.policy == "shared":
        # Its vCPUs float over the shared pool: record which, so the next re-pin moves them too.
        rec.shared = True
        floating = [v for v in range(dom.max_vcpus) if v not in explicit]
        emulator_floats = auto_emulator
    else:
        cpus = {c for v, cs in dom.live_vcpupins.items() if v not in explicit and len(cs) == 1 for c in cs}
        emulator_floats = t.cpu.emulator == "pool" and t.emulatorpin is None
    if t.cpu.threads == "isolate":  # whole cores for the vCPUs; the isolated emulator is one CPU (the planner's)
        cpus |= {s for c in cpus if c in topo.cpus for s in topo.cpus[c].siblings}
    if t.cpu.emulator == "isolate" and t.emulatorpin is None and emu is not None and len(emu) == 1:
        rec.emulator_cpu = min(emu)
        cpus |= emu
    rec.cpus = sorted(cpus)
    rec.isolation = _isolation_of(dom) if rec.cpus else None
    rec.pins = Pins(vcpus=dict(dom.live_vcpupins), emulator=emu, floating=tuple(floating),
                    emulator_floats=emulator_floats)


# --- reconcile ------------------------------------------------------------------------------------------

@dataclass
class ReconcileResult:
    actions: list[str] = field(default_factory=list)  # every repair and change, in the order made
    released: list[tuple[str, DomainRecord]] = field(default_factory=list)
    set_aside: Path | None = None
    lost: list[str] = field(default_factory=list)  # parts of an unreadable ledger that could not be kept


def reconcile(cfg: Config, running: Mapping[str, bytes], snapshot: Mapping[str, str], dry_run: bool = False,
              pools: SysfsPools | None = None, now: float | None = None) -> ReconcileResult:
    """Repair the ledger and the pools against the running VMs (uuid → live XML).

    ``snapshot`` maps uuid → reservation token as read *before* libvirt was asked what runs: a reservation
    that changed since (the VM restarted) is left alone. Every decision is taken again under the lock, and
    pools go through the same capacity check and writer as prepare. An unreadable ledger is set aside; what
    of it still decodes is kept and the rest rebuilt from the running VMs (not in a dry run). Every repair is
    in ``actions``, those the session made before reconcile's own work (recovery, an admin's resize) first.
    """
    out = ReconcileResult()
    now = time.time() if now is None else now
    if dry_run:
        _reconcile_preview(cfg, running, snapshot, now, out)
        return out
    with session(cfg, pools, quarantine=True) as s:
        out.set_aside, out.lost = s.txn.ledger.set_aside, list(s.txn.ledger.lost)
        out.actions += s.repairs
        out.actions += [f"released VM {rec.name!r} ({uuid}), whose stop was left for the detached worker"
                        for uuid, rec in s.settled.items()]
        released = _reconcile_decide(s.state, cfg, s.topo, running, snapshot, now, out)
        writes = _reconcile_writes(s.state, s.topo, cfg, released, out)
        s.execute(writes, "reconcile", None, "-", time.monotonic() + cfg.retry_timeout)
        s.forget_settled(list(released))
        before = dict(s.state.isolation)
        problems = isolate_host(s, VMLog("-", "-"))  # restores the host when no isolating VM runs any more
        if s.state.isolation != before:
            out.actions.append("host isolation brought in line with the running VMs")
        out.actions += problems
    for a in out.actions:
        log.info("reconcile: %s", a)
    for uuid, rec in out.released:
        _log_released(uuid, rec)
    return out


def _reconcile_preview(cfg: Config, running: Mapping[str, bytes], snapshot: Mapping[str, str], now: float,
                       out: ReconcileResult) -> None:
    """The dry run: what reconcile would repair and change, on a snapshot (nothing written, nothing held)."""
    led, topo = ledger_for(cfg), topology_for(cfg)
    try:
        st = led.read()
        check_records(st)
    except LedgerError:
        try:
            raw = cfg.ledger_path.read_bytes()
        except OSError:
            raw = b""
        st, out.lost = salvage(raw)
        out.actions.append(set_aside_line(None, st, out.lost))
        out.actions += [f"could not read {part}: rebuild it from the running VMs and the pools" for part in out.lost]
        out.actions += accounting.rebuild_lost(st, topo, cfg)
    out.actions += [f"roll back the unfinished reservation of VM {st.domains[u].name!r} ({u})"
                    for u in sorted(st.preparing())]
    out.actions += [f"recover an interrupted {i.op} write on pool {i.pool} ({i.before} → {i.target} pages, process "
                    f"{i.pid})" for i in st.intents]
    out.actions += accounting.observe(st, topo, cfg)
    released = _reconcile_decide(st, cfg, topo, running, snapshot, now, out)
    _reconcile_writes(st, topo, cfg, released, out)
    _reconcile_isolation(st, cfg, out)


def _reconcile_isolation(st: LedgerState, cfg: Config, out: ReconcileResult) -> None:
    """The dry run's view of the isolation converge (nothing written, nothing committed)."""
    if _isolation_idle(st):
        return
    try:
        _converge_isolation(st, cfg, lambda: None,
                            lambda key, value: out.actions.append(f"host isolation: set {key} to {value!r}"))
    except Exception as e:  # (as isolate_host: whatever the host throws is a line, not a failure)
        out.actions.append(f"host isolation: {e}")


def _reconcile_writes(st: LedgerState, topo: HostTopology, cfg: Config, released: set[str],
                      out: ReconcileResult) -> list[accounting.PoolWrite]:
    """The pool repairs reconcile makes (the same for its dry run): every recorded pool and those released
    VMs held, to baseline + held, dropping raises the node cannot spare."""
    writes = accounting.writes_for(st, topo, cfg, set(st.pools) | released)
    writes, held_up = accounting.spare_unplaced(st, topo, writes, {k for r in st.domains.values() for k in r.unplaced})
    out.actions += held_up
    problems = accounting.capacity_problems(writes, topo, cfg)
    out.actions += [f"cannot restore pool {key}: {why}" for key, why in problems.items()]
    writes = [w for w in writes if w.pool not in problems]
    out.actions += [f"set pool {w.pool} from {w.before} to {w.target} pages" for w in writes]
    return writes


def _reconcile_decide(st: LedgerState, cfg: Config, topo: HostTopology, running: Mapping[str, bytes],
                      snapshot: Mapping[str, str], now: float, out: ReconcileResult) -> set[str]:
    """Release leftovers and adopt strays in ``st``; returns the pools that released VMs held."""
    from kvmhooks.domain import parse_domain

    released: set[str] = set()
    up_dir = ledger_for(cfg).up_dir  # up/UUID: that VM's started hook ran, so it is not starting
    for uuid, rec in sorted(st.domains.items()):
        if uuid in running:
            continue
        if snapshot.get(uuid) != rec.token:
            out.actions.append(f"leave {rec.name} ({uuid}) alone: its reservation changed while reconcile looked")
            continue
        if rec.state == CLAIMED:  # a VM coming in: its prepare follows the filter, or the claim expires
            if rec.expires > now:
                out.actions.append(f"leave {rec.name} ({uuid}) alone: claimed for an incoming migration or restore "
                                   f"(expires in {rec.expires - now:.0f} s)")
            else:
                del st.domains[uuid]
                out.actions.append(f"drop the expired claim of {rec.name} ({uuid}): it was never prepared")
            continue
        if rec.state in NOT_MAPPED_YET and now - rec.updated < STARTING_GRACE and not (up_dir / uuid).exists():
            out.actions.append(f"leave {rec.name} ({uuid}) alone: it is starting (prepared {now - rec.updated:.0f} "
                               "s ago)")
            continue
        out.actions.append(f"release {rec.name} ({uuid}): not running; frees "
                           + (", ".join(f"{k} {n} pages" for k, n in rec.hugepages.items()) or "no pages")
                           + (f", CPUs {format_cpuset(rec.cpus)}" if rec.cpus else ""))
        del st.domains[uuid]
        released |= set(rec.hugepages)
        out.released.append((uuid, rec))
    for uuid, xml in sorted(running.items()):
        mine = st.domains.get(uuid)
        if mine is not None and mine.unplaced:  # adopted without knowing where its pages are: try the facts again
            with contextlib.suppress(KvmhooksError):
                done = place_unplaced(st, topo, cfg, parse_domain(xml), mine, VMLog(mine.name, uuid))
                out.actions.append(done or f"the huge pages of {mine.name} ({uuid}) are still unplaced: where they "
                                           "are is not known (no pool changed for them)")
        if mine is not None:
            continue
        if uuid in snapshot:  # it had a reservation when reconcile looked, and has none now: it stopped
            out.actions.append(f"leave {uuid} alone: its reservation changed while reconcile looked")
            continue
        try:
            dom = parse_domain(xml)
        except KvmhooksError as e:
            out.actions.append(f"skip running VM {uuid}: {e}")
            continue
        if dom.active_tuning is None:
            continue
        adopted = _adopt_into(st, topo, cfg, dom, VMLog(dom.name, dom.uuid))
        out.actions.append(f"adopt {dom.name} ({uuid}): running and annotated but missing from the ledger; holds "
                           + (", ".join(f"{k} {n} pages" for k, n in sorted(adopted.hugepages.items())) or "no pages")
                           + (f", CPUs {format_cpuset(adopted.cpus)}" if adopted.cpus else "")
                           + ("; huge pages " + ", ".join(f"{n} x {k}" for k, n in sorted(adopted.unplaced.items()))
                              + " unplaced: where they are is not known, no pool changed for them"
                              if adopted.unplaced else ""))
    return released


# --- small updates --------------------------------------------------------------------------------------

def update(uuid: str, cfg: Config, change: Callable[[DomainRecord], None]) -> None:
    """Read-modify-write one VM's record under the ledger lock (if it has one): for a change to one part of
    it (a problem line, the balloon's result) that must not put back an older copy of the rest."""
    with ledger_for(cfg).transaction() as state:
        rec = state.domains.get(uuid)
        if rec is not None:
            change(rec)
            stamp(rec)


def mark(uuid: str, cfg: Config, token: str | None = None, **changes: object) -> bool:
    """Update a VM's ledger record (state, error, applied parts) if it has one; never touches pools.

    ``token``: only if the record is still that reservation (a worker that read the record of an earlier run
    must not write "running" and that run's pins over a newer run of the same VM). Returns whether it wrote.
    """
    with ledger_for(cfg).transaction() as state:
        rec = state.domains.get(uuid)
        if rec is None or (token is not None and rec.token != token):
            return False
        for k, v in changes.items():
            setattr(rec, k, v)
        stamp(rec)
        return True


def has_running_shared(cfg: Config) -> bool:
    return ledger_for(cfg).read().any_shared()


# --- failures that could not reach the ledger -----------------------------------------------------------

def _failure_path(cfg: Config, uuid: str) -> Path:
    return cfg.state_dir / "failures" / uuid


def record_failure(cfg: Config, uuid: str, op: str, message: str) -> None:
    """Keep the last failure of a lifecycle hook where ``kvmhooks status`` shows it.

    A file of its own, written without the ledger lock: the failure may be that lock (stuck) or the ledger
    itself (unreadable). Best effort: a hook that never fails must not fail here either.
    """
    path = _failure_path(cfg, uuid)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        tmp = path.with_name(f".{uuid}.{os.getpid()}.tmp")
        tmp.write_text(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {op}: {message}\n")
        os.replace(tmp, path)
    except OSError as e:
        log.error("cannot record the failure of %s for %s: %s", op, uuid, e)


def clear_failure(cfg: Config, uuid: str) -> None:
    with contextlib.suppress(OSError):
        _failure_path(cfg, uuid).unlink()


def read_failures(cfg: Config) -> dict[str, str]:
    out = {}
    d = cfg.state_dir / "failures"
    with contextlib.suppress(OSError):
        for p in d.iterdir():
            if not p.name.startswith("."):
                with contextlib.suppress(OSError):
                    out[p.name] = p.read_text(errors="replace").strip()
    return out
