"""CPU placement: explicit pins and automatic dedicated/shared placement, as a pure function.

The vocabulary is OpenStack Nova's (``hw:cpu_policy``, ``hw:cpu_thread_policy``, ``hw:emulator_threads_policy``)
because admins know it:

- ``dedicated``: each vCPU gets its own host CPU, exclusive among kvmhooks VMs; all on one NUMA node when
  it fits (the node of the VM's huge pages first), spanning nodes only when no single node can hold it.
  Threads: ``prefer`` packs vCPUs onto sibling threads core by core; ``isolate`` gives each vCPU a whole
  core (its siblings are reserved too, so no other VM runs there); ``require`` needs an SMT host and places
  vCPUs on thread siblings only.
- ``shared``: vCPUs float over the shared pool (allowed CPUs minus everything dedicated).
- emulator ``share``: the VM's own CPUs; ``isolate``: one extra dedicated CPU; ``pool``: the shared pool.

Every vCPU up to the maximum gets a pin, online or not, so vCPUs brought online later are pinned too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmhooks.config import Config
from kvmhooks.domain import Domain
from kvmhooks.errors import AnnotationError, CapacityError, HostError
from kvmhooks.ledger import LedgerState, Pins
from kvmhooks.topology import HostTopology
from kvmhooks.units import format_cpuset


@dataclass(frozen=True)
class CpuPlan:
    vcpus: dict[int, frozenset[int]] = field(default_factory=dict)  # vCPU → host CPUs
    emulator: frozenset[int] | None = None
    iothreads: dict[int, frozenset[int]] = field(default_factory=dict)
    dedicated: frozenset[int] = frozenset()  # reserved exclusively in the ledger
    shared: bool = False
    nodes: frozenset[int] = frozenset()  # NUMA nodes of the dedicated CPUs
    floating: frozenset[int] = frozenset()  # vCPUs on the shared pool (re-pinned when it changes)
    emulator_floats: bool = False

    def to_pins(self) -> Pins:
        """The pins as the ledger stores them."""
        return Pins(dict(self.vcpus), self.emulator, dict(self.iothreads), tuple(sorted(self.floating)),
                    self.emulator_floats)

    @property
    def empty(self) -> bool:
        return not (self.vcpus or self.emulator or self.iothreads)


def allowed_cpus(topo: HostTopology, cfg: Config) -> frozenset[int]:
    """CPUs automatic placement may hand out: the configured set (or all online) minus housekeeping."""
    base = cfg.cpu_allowed if cfg.cpu_allowed is not None else topo.online
    return (base & topo.online) - cfg.cpu_housekeeping


def shared_pool(topo: HostTopology, cfg: Config, state: LedgerState, extra_dedicated: frozenset[int] = frozenset(),
                ) -> frozenset[int]:
    return allowed_cpus(topo, cfg) - state.dedicated_cpus() - extra_dedicated


def _check_explicit(dom: Domain, topo: HostTopology, element: str, attr: str, cpus: frozenset[int]) -> None:
    bad = cpus - topo.online
    if bad:
        raise AnnotationError(dom.name, element, attr, format_cpuset(cpus),
                              f"CPU(s) {format_cpuset(bad)} are not online host CPUs "
                              f"(online: {format_cpuset(topo.online)})")


def plan_cpus(dom: Domain, topo: HostTopology, cfg: Config, state: LedgerState,
              hugepage_nodes: frozenset[int] = frozenset()) -> CpuPlan | None:
    """The pins and reservations for one VM, or None when it asks for no CPU tuning."""
    t = dom.active_tuning
    if t is None or (t.cpu is None and not t.vcpupins and t.emulatorpin is None and not t.iothreadpins):
        return None
    for p in t.vcpupins:
        _check_explicit(dom, topo, "vcpupin", "cpuset", p.cpus)
    if t.emulatorpin is not None:
        _check_explicit(dom, topo, "emulatorpin", "cpuset", t.emulatorpin)
    for p in t.iothreadpins:
        _check_explicit(dom, topo, "iothreadpin", "cpuset", p.cpus)

    vcpus: dict[int, frozenset[int]] = {p.target: p.cpus for p in t.vcpupins}
    iothreads = {p.target: p.cpus for p in t.iothreadpins}
    emulator = t.emulatorpin
    dedicated: frozenset[int] = frozenset()
    nodes: frozenset[int] = frozenset()
    shared = False
    floating: frozenset[int] = frozenset()
    emulator_floats = False
    if t.cpu is not None:
        auto = [v for v in range(dom.max_vcpus) if v not in vcpus]
        want_emulator = t.cpu.emulator == "isolate" and emulator is None
        if t.cpu.policy == "dedicated":
            pins, emu_cpu, dedicated = _place_dedicated(dom, topo, cfg, state, len(auto), want_emulator,
                                                        hugepage_nodes)
            vcpus.update(zip(auto, (frozenset({c}) for c in pins), strict=True))
            if emulator is None:
                if emu_cpu is not None:
                    emulator = frozenset({emu_cpu})
                elif t.cpu.emulator == "pool":
                    emulator = _nonempty_pool(dom, topo, cfg, state, dedicated)
                    emulator_floats = True
                elif pins:
                    emulator = frozenset(pins)
            nodes = frozenset(topo.cpus[c].node for c in dedicated)
        else:
            shared = True
            if want_emulator:
                _, emu_cpu, dedicated = _place_dedicated(dom, topo, cfg, state, 0, True, hugepage_nodes)
                assert emu_cpu is not None
                emulator = frozenset({emu_cpu})
            pool = _nonempty_pool(dom, topo, cfg, state, dedicated)
            vcpus.update((v, pool) for v in auto)
            floating = frozenset(auto)
            if emulator is None:
                emulator = pool
                emulator_floats = True
    return CpuPlan(vcpus, emulator, iothreads, dedicated, shared, nodes, floating, emulator_floats)


def _nonempty_pool(dom: Domain, topo: HostTopology, cfg: Config, state: LedgerState,
                   mine: frozenset[int]) -> frozenset[int]:
    pool = shared_pool(topo, cfg, state, mine)
    if not pool:
        raise CapacityError(f"VM {dom.name!r}: the shared CPU pool is empty (allowed "
                            f"{format_cpuset(allowed_cpus(topo, cfg)) or 'none'}, all dedicated to VMs)")
    return pool


def _cores(topo: HostTopology, cpus: frozenset[int]) -> list[frozenset[int]]:
    """Sibling groups (cores) among ``cpus``, each restricted to ``cpus``, in CPU order."""
    seen: set[frozenset[int]] = set()
    out = []
    for c in sorted(cpus):
        core = topo.cpus[c].siblings & cpus
        if core not in seen:
            seen.add(core)
            out.append(core)
    return out


def _place_dedicated(dom: Domain, topo: HostTopology, cfg: Config, state: LedgerState, n: int,
                     want_emulator: bool, hugepage_nodes: frozenset[int],
                     ) -> tuple[list[int], int | None, frozenset[int]]:
    """Pick ``n`` vCPU CPUs (+1 emulator CPU): returns (pins in vCPU order, emulator CPU, reserved set)."""
    t = dom.active_tuning
    assert t is not None and t.cpu is not None
    threads = t.cpu.threads
    if threads == "require" and not topo.smt:
        raise HostError(f"VM {dom.name!r}: <kvm:cpu threads='require'> needs a host with SMT (hyper-threading); "
                        "this host has one thread per core: use threads='prefer'")
    allowed = allowed_cpus(topo, cfg)
    taken = state.dedicated_cpus(excluding=dom.uuid)
    free = allowed - taken
    if threads == "isolate":
        # A core is usable only if none of its threads is dedicated to anybody else.
        free = frozenset(c for c in free if not (topo.cpus[c].siblings & taken))
    need = n + (1 if want_emulator else 0)
    by_node: dict[int, frozenset[int]] = {}
    for c in free:
        by_node.setdefault(topo.cpus[c].node, frozenset())
        by_node[topo.cpus[c].node] |= {c}
    order = sorted(by_node, key=lambda nd: (nd not in hugepage_nodes, -len(by_node[nd]), nd))
    for nd in order:  # one NUMA node when it fits
        picked = _pick(topo, by_node[nd], need, threads)
        if picked is not None:
            return _finish(picked, n, want_emulator)
    picked = _pick(topo, free, need, threads)  # else spread over nodes
    if picked is None:
        what = f"{n} dedicated vCPU(s)" + (" + 1 emulator CPU" if want_emulator else "")
        unit = "whole free cores" if threads == "isolate" else ("free sibling threads" if threads == "require"
                                                                 else "free CPUs")
        raise CapacityError(f"VM {dom.name!r}: <kvm:cpu policy='dedicated' threads='{threads}'> needs {what} but "
                            f"there are not enough {unit}: allowed {format_cpuset(allowed) or 'none'}, dedicated to "
                            f"other VMs {format_cpuset(taken) or 'none'}")
    return _finish(picked, n, want_emulator)


def _pick(topo: HostTopology, cpus: frozenset[int], k: int, threads: str) -> list[list[int]] | None:
    """Choose ``k`` placement units from ``cpus``: a unit is [pinned CPU, other reserved CPUs...]."""
    if k == 0:
        return []
    cores = _cores(topo, cpus)
    if threads == "isolate":
        whole = [core for core in cores if core == topo.cpus[min(core)].siblings]
        if len(whole) < k:
            return None
        return [sorted(core) for core in whole[:k]]
    if threads == "require":
        cores = [core for core in cores if len(core) > 1]
    # prefer/require: fill the fullest cores first, so a VM's vCPUs share cores rather than scatter.
    cores.sort(key=lambda core: (-len(core), min(core)))
    flat = [[c] for core in cores for c in sorted(core)]
    return flat[:k] if len(flat) >= k else None


def _finish(units: list[list[int]], n: int, want_emulator: bool) -> tuple[list[int], int | None, frozenset[int]]:
    pins = [u[0] for u in units[:n]]
    emulator = units[n][0] if want_emulator else None
    reserved = frozenset(c for u in units for c in u)
    return pins, emulator, reserved
