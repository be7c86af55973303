"""Live tuning of a running domain through libvirt-python. Called from the detached worker only.

Each step applies, then reads back what libvirt reports, so the ledger (and ``kvmhooks status``) shows what
is true, not what was asked.
"""

from __future__ import annotations

from typing import Any

from kvmhooks.apply.libvirt import call, cpumap, from_cpumap
from kvmhooks.config import Config
from kvmhooks.domain import Domain
from kvmhooks.errors import ApplyError
from kvmhooks.ledger import Applied, DomainRecord, Ledger, Pins, stamp
from kvmhooks.log import VMLog
from kvmhooks.plan.cpus import shared_pool
from kvmhooks.topology import read_topology
from kvmhooks.units import format_cpuset


def _flags(dom: Any, persist: bool) -> int:
    import libvirt

    flags: int = libvirt.VIR_DOMAIN_AFFECT_LIVE
    if persist and dom.isPersistent():
        flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
    return flags


def apply_started(conn: Any, dom: Any, d: Domain, cfg: Config, vlog: VMLog) -> Applied:
    """Apply the live part of the plan (pins from the ledger, the rest from the live XML ``d``); returns what
    was applied, read back from libvirt (recorded in the ledger)."""
    import libvirt

    ledger = Ledger(cfg.ledger_path, cfg.lock_timeout)
    rec = ledger.read().domains.get(dom.UUIDString())
    t = d.active_tuning
    applied = Applied()
    if t is None:
        return applied
    if t.vcpus_live is not None:
        call("setvcpus --live", dom.setVcpusFlags, t.vcpus_live, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        applied.vcpus_live = int(call("vcpucount", dom.vcpusFlags, libvirt.VIR_DOMAIN_AFFECT_LIVE))
        vlog.info("vCPUs online: %s", applied.vcpus_live)
    if rec is not None and rec.pins is not None:
        applied.pins, applied.emulator = apply_pins(conn, dom, rec.pins, t.persist_cputune, vlog)
    if t.memtune is not None:
        applied.memtune, refused = apply_memtune(dom, t.memtune.items(), vlog)
        applied.problems += refused
    if rec is not None and rec.cpus:
        repin_shared(conn, cfg, vlog)
    return applied


def apply_pins(conn: Any, dom: Any, pins: Pins, persist: bool, vlog: VMLog) -> tuple[dict[str, str], str]:
    """Pin vCPUs, emulator and iothreads, then read the live pins back and compare: a pin libvirt accepted
    but does not report is an error, not a success."""
    import libvirt

    ncpus = conn.getCPUMap(0)[0]
    flags = _flags(dom, persist)
    # Offline vCPUs are pinned live too: libvirt keeps the pin and applies it when the vCPU is plugged
    # (measured on 9.0 with `setvcpus --live`), which avoids the trap of unpinned hot-plugged vCPUs.
    for v, cs in sorted(pins.vcpus.items()):
        call(f"vcpupin {v} {format_cpuset(cs)}", dom.pinVcpuFlags, v, cpumap(cs, ncpus), flags)
    if pins.emulator:
        call(f"emulatorpin {format_cpuset(pins.emulator)}", dom.pinEmulator, cpumap(pins.emulator, ncpus), flags)
    for i, cs in sorted(pins.iothreads.items()):
        call(f"iothreadpin {i} {format_cpuset(cs)}", dom.pinIOThread, i, cpumap(cs, ncpus), flags)
    live_vcpus, live_emulator = read_pins(dom)
    for v, cs in pins.vcpus.items():
        # The binding reports online vCPUs only; offline ones are checked when they come online.
        if str(v) in live_vcpus and live_vcpus[str(v)] != format_cpuset(cs):
            raise ApplyError(f"vCPU {v} pin did not stick: asked {format_cpuset(cs)}, libvirt reports "
                             f"{live_vcpus[str(v)]}")
    if pins.emulator and live_emulator != format_cpuset(pins.emulator):
        raise ApplyError(f"emulator pin did not stick: asked {format_cpuset(pins.emulator)}, libvirt reports "
                         f"{live_emulator}")
    if pins.iothreads:
        live_io = {int(i): frozenset(from_cpumap(bits))
                   for i, bits in call("iothreadinfo", dom.ioThreadInfo, libvirt.VIR_DOMAIN_AFFECT_LIVE)}
        for i, cs in sorted(pins.iothreads.items()):
            if live_io.get(i) != cs:
                raise ApplyError(f"iothread {i} pin did not stick: asked {format_cpuset(cs)}, libvirt reports "
                                 f"{format_cpuset(live_io[i]) if i in live_io else 'no such iothread'}")
    vlog.info("pinned: vcpus %s, emulator %s%s", live_vcpus, live_emulator,
              " (also in the persistent definition)" if flags & libvirt.VIR_DOMAIN_AFFECT_CONFIG else "")
    return live_vcpus, live_emulator


def read_pins(dom: Any) -> tuple[dict[str, str], str]:
    """The live vCPU pins (online vCPUs) and emulator pin, as libvirt reports them."""
    import libvirt

    vcpus = call("vcpupininfo", dom.vcpuPinInfo, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    emulator = call("emulatorpininfo", dom.emulatorPinInfo, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    return ({str(i): format_cpuset(from_cpumap(bits)) for i, bits in enumerate(vcpus)},
            format_cpuset(from_cpumap(emulator)))


def apply_memtune(dom: Any, items: list[tuple[str, int]], vlog: VMLog) -> tuple[dict[str, int], list[str]]:
    """Set each memtune limit on its own, so one the hypervisor refuses does not block the others."""
    import libvirt

    refused: list[str] = []
    # Order matters to the kernel: swap_hard_limit (memory+swap) may not drop below hard_limit and the
    # other way round, so raise the larger one first.
    order = {"swap_hard_limit": 0, "hard_limit": 1, "soft_limit": 2, "min_guarantee": 3}
    for name, kib in sorted(items, key=lambda kv: order[kv[0]]):
        try:
            call(f"memtune {name}", dom.setMemoryParameters, {name: kib}, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except (ApplyError, LookupError) as e:  # the binding raises LookupError for unknown parameters
            refused.append(f"memtune {name} refused by the hypervisor: {getattr(e, 'cause', None) or e}")
            vlog.warning("%s (the other limits are still applied)", refused[-1])
    live = call("memtune", dom.memoryParameters, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    got = {k: int(v) for k, v in live.items() if k in dict(items)}
    refused_names = {r.split()[1] for r in refused}
    for name, kib in items:  # read back and compare: a limit the kernel did not take is reported, not assumed
        # cgroups keep limits in pages: anything within one 4 KiB page of the request is what was asked.
        if name not in refused_names and abs(got.get(name, -1) - kib) >= 4:
            refused.append(f"memtune {name}: asked {kib} KiB, libvirt reports {got.get(name, 'nothing')}")
            vlog.warning("%s", refused[-1])
    vlog.info("memtune now %s", got)
    return got, refused


def repin_shared(conn: Any, cfg: Config, vlog: VMLog) -> list[str]:
    """Move every running shared-policy VM onto the current shared pool (never onto a dedicated CPU)."""
    import libvirt

    ledger = Ledger(cfg.ledger_path, cfg.lock_timeout)
    state = ledger.read()
    done: list[str] = []
    if not state.any_shared():
        return done
    pool = shared_pool(read_topology(cfg.sysfs_root, cfg.proc_root), cfg, state)
    if not pool:
        vlog.warning("shared pool is empty; shared VMs keep their pins")
        return done
    ncpus = conn.getCPUMap(0)[0]
    for uuid, rec in sorted(state.domains.items()):
        if not rec.shared or rec.pins is None:
            continue
        try:
            other = conn.lookupByUUIDString(uuid)
            if not other.isActive():
                continue
            online = other.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE)
            for v in rec.pins.floating:
                if v < online:
                    call(f"vcpupin {v}", other.pinVcpuFlags, v, cpumap(pool, ncpus), libvirt.VIR_DOMAIN_AFFECT_LIVE)
            if rec.pins.emulator_floats:
                call("emulatorpin", other.pinEmulator, cpumap(pool, ncpus), libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except (libvirt.libvirtError, ApplyError) as e:  # it may have stopped meanwhile
            vlog.warning("re-pinning shared VM %s failed: %s", rec.name, e)
            continue
        _update_pins(ledger, uuid, rec, pool)
        done.append(rec.name)
    if done:
        vlog.info("shared pool is now %s; re-pinned %s", format_cpuset(pool), ", ".join(done))
    return done


def _update_pins(ledger: Ledger, uuid: str, old: DomainRecord, pool: frozenset[int]) -> None:
    with ledger.transaction() as st:
        rec = st.domains.get(uuid)
        if rec is None or rec.pins is None or rec.token != old.token:  # gone, or restarted meanwhile
            return
        for v in rec.pins.floating:
            rec.pins.vcpus[v] = pool
        if rec.pins.emulator_floats:
            rec.pins.emulator = pool
        stamp(rec)
