"""The hook's operations on shared state: reserve at prepare, release at stop, adopt at reconnect.

Each holds the ledger lock for its whole read-plan-write cycle, so concurrent VM starts see each other's
reservations; the planning itself is pure (:mod:`kvmhooks.plan`), the writes go through adapters.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from kvmhooks.apply.pools import SysfsPools, apply_pool_writes, restore, shrink_pools
from kvmhooks.config import Config, pool_key
from kvmhooks.domain import Domain
from kvmhooks.errors import CapacityError
from kvmhooks.ledger import DomainRecord, Ledger, LedgerState, PoolRecord, stamp
from kvmhooks.log import VMLog
from kvmhooks.plan.cpus import CpuPlan, plan_cpus
from kvmhooks.plan.hugepages import HugepagePlan, PoolWrite, plan_hugepages, pool_writes, release_writes
from kvmhooks.topology import HostTopology, read_topology
from kvmhooks.units import format_cpuset

log = logging.getLogger(__name__)


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


def check(dom: Domain, cfg: Config, topo: HostTopology | None = None, state: LedgerState | None = None,
          ) -> tuple[HugepagePlan | None, CpuPlan | None]:
    """Everything prepare would refuse for, without the lock and without touching anything.

    With ``state`` (a ledger snapshot) the plans are what prepare would do now; without, only what
    depends on the VM and the host is checked (capacity against an empty ledger).
    """
    topo = topo or topology_for(cfg)
    state = state if state is not None else LedgerState()
    hp = plan_hugepages(dom, topo, cfg)
    cpus = plan_cpus(dom, topo, cfg, state, frozenset(hp.pages) if hp else frozenset())
    return hp, cpus


def prepare(dom: Domain, cfg: Config, pools: SysfsPools | None = None) -> Prepared:
    """Reserve what the VM needs before QEMU starts; raises (host unchanged) when it cannot."""
    vlog = VMLog(dom.name, dom.uuid)
    pools = pools or SysfsPools(cfg.sysfs_root, cfg.proc_root)
    check(dom, cfg)  # validation errors surface before we queue for the lock
    if dom.qmp_socket is not None:
        from kvmhooks.apply.sockets import ensure_socket_dir

        ensure_socket_dir(dom.qmp_socket)
    warnings: list[str] = []
    raised: list[PoolWrite] = []
    try:
        return _prepare_locked(dom, cfg, pools, vlog, warnings, raised)
    except BaseException:
        restore(pools, raised)  # the ledger was not written: take back the pages we added
        raise


def _prepare_locked(dom: Domain, cfg: Config, pools: SysfsPools, vlog: VMLog, warnings: list[str],
                    raised: list[PoolWrite]) -> Prepared:
    with ledger_for(cfg).transaction() as state:
        if dom.uuid in state.domains:
            # A previous start of this VM never reached release (crash, killed libvirtd): give that back
            # first, so a VM never holds two reservations.
            vlog.warning("stale reservation found; releasing it before reserving again")
            _release_locked(dom.uuid, state, cfg, pools)
        # Plan again, fresh and under the lock (earlier holders changed the pools). CPUs are planned before
        # any pool write: a refusal there must leave the pools untouched.
        topo = topology_for(cfg)
        plan, cpu_plan = check(dom, cfg, topo, state)
        record = DomainRecord(name=dom.name)
        if plan is not None:
            try:
                writes = pool_writes(dom.uuid, plan, topo, state, cfg, dom.name)
                apply_pool_writes(pools, writes, time.monotonic() + cfg.retry_timeout, dom.name)
                raised.extend(writes)
            except CapacityError as e:
                if plan.required:
                    raise
                warnings.append(f"{e} (required='no': starting without reserved pages)")
                vlog.warning("%s", warnings[-1])
                plan = None
            else:
                for w in writes:
                    state.pools[w.pool] = PoolRecord(w.baseline)
                record.hugepages = plan.pools()
                vlog.info("reserved %s", ", ".join(f"{w.pool} {w.target - w.before:+d} pages (now {w.target})"
                                                    for w in writes) or "no new pages (pools left alone)")
        if cpu_plan is not None:
            record.cpus = sorted(cpu_plan.dedicated)
            record.shared = cpu_plan.shared
            record.pins = cpu_plan.to_record()
            vlog.info("CPUs: dedicated %s, pins %s", record.cpus or "none", record.pins)
        stamp(record)
        state.domains[dom.uuid] = record
        return Prepared(record, plan, cpu_plan, tuple(warnings))


def _release_locked(uuid: str, state: LedgerState, cfg: Config, pools: SysfsPools) -> DomainRecord | None:
    rec = state.domains.get(uuid)
    if rec is None:
        return None
    if rec.hugepages:
        writes = release_writes(uuid, state, topology_for(cfg), cfg)
        shrink_pools(pools, writes, rec.name)
    del state.domains[uuid]
    for key in [k for k in state.pools if state.reserved(k) == 0]:
        del state.pools[key]  # no reservation left: the next one records the admin's value afresh
    return rec


def release(uuid: str, cfg: Config, pools: SysfsPools | None = None) -> DomainRecord | None:
    """Give back everything the VM holds. Idempotent: an unknown VM is a no-op."""
    pools = pools or SysfsPools(cfg.sysfs_root, cfg.proc_root)
    with ledger_for(cfg).transaction() as state:
        rec = _release_locked(uuid, state, cfg, pools)
    from kvmhooks.apply.sockets import remove_socket
    from kvmhooks.domain import qmp_socket_path

    remove_socket(qmp_socket_path(uuid))  # QEMU leaves its -qmp socket behind
    if rec is not None:
        VMLog(rec.name, uuid).info("released %s", ", ".join(f"{k} {v} pages" for k, v in rec.hugepages.items())
                                   or "its entry (it held no pages)")
    return rec


def adopt(dom: Domain, cfg: Config) -> DomainRecord:
    """A running VM after a libvirtd restart: account what it holds without reserving anything again."""
    vlog = VMLog(dom.name, dom.uuid)
    with ledger_for(cfg).transaction() as state:
        rec = state.domains.get(dom.uuid)
        if rec is not None:
            rec.state = "running"
            stamp(rec)
            vlog.info("reconnect: already in the ledger")
            return rec
        rec = DomainRecord(name=dom.name, state="adopted")
        topo = topology_for(cfg)
        try:
            plan = plan_hugepages(dom, topo, cfg)
        except Exception as e:  # the VM runs already: record what we can, never fail
            vlog.warning("reconnect: cannot work out its huge pages (%s); adopting without them", e)
            plan = None
        if plan is not None:
            for node, pages in plan.pages.items():
                key = pool_key(node, plan.size_kib)
                pool_state = topo.nodes[node].pools[plan.size_kib]
                if pages and key not in state.pools:
                    # Its pages are already inside the pool: the admin's part is what is left.
                    state.pools[key] = PoolRecord(max(0, pool_state.nr - pool_state.surplus
                                                      - state.reserved(key) - pages))
            rec.hugepages = plan.pools()
        _adopt_cpus(dom, rec)
        stamp(rec)
        state.domains[dom.uuid] = rec
        vlog.info("reconnect: adopted (pages %s, dedicated CPUs %s)", rec.hugepages or "none", rec.cpus or "none")
        return rec


def _adopt_cpus(dom: Domain, rec: DomainRecord) -> None:
    """Take the running VM's dedicated CPUs from its live <cputune>: what is pinned now is what it holds."""
    t = dom.active_tuning
    if t is None or t.cpu is None:
        return
    explicit = {p.target for p in t.vcpupins}
    emu = dom.live_emulatorpin
    auto_emulator = t.emulatorpin is None and t.cpu.emulator != "isolate"
    if t.cpu.policy == "shared":
        # Its vCPUs float over the shared pool: record which, so the next re-pin moves them too.
        rec.shared = True
        floating = [v for v in range(dom.max_vcpus) if v not in explicit]
        emulator_floats = auto_emulator
    else:
        cpus = {c for v, cs in dom.live_vcpupins.items() if v not in explicit and len(cs) == 1 for c in cs}
        if t.cpu.emulator == "isolate" and t.emulatorpin is None and emu is not None and len(emu) == 1:
            cpus |= emu
        rec.cpus = sorted(cpus)
        floating, emulator_floats = [], t.cpu.emulator == "pool" and t.emulatorpin is None
    rec.pins = {"vcpus": {str(v): format_cpuset(c) for v, c in sorted(dom.live_vcpupins.items())},
                "emulator": format_cpuset(emu) if emu else None, "iothreads": {},
                "floating": floating, "emulator_floats": emulator_floats}


def mark(uuid: str, cfg: Config, **changes: object) -> None:
    """Update a VM's ledger record (state, applied, error) if it has one."""
    with ledger_for(cfg).transaction() as state:
        rec = state.domains.get(uuid)
        if rec is None:
            return
        for k, v in changes.items():
            if k == "applied":
                assert isinstance(v, dict)
                rec.applied.update(v)
            else:
                setattr(rec, k, v)
        stamp(rec)


def has_running_shared(cfg: Config) -> bool:
    return any(r.shared for r in ledger_for(cfg).read().domains.values())
