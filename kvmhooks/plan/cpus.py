"""CPU placement: explicit pins and automatic dedicated/shared placement, as a pure function.

The vocabulary is OpenStack Nova's (``hw:cpu_policy``, ``hw:cpu_thread_policy``, ``hw:emulator_threads_policy``)
because admins know it:

- ``dedicated``: each vCPU gets its own host CPU, exclusive among kvmhooks VMs; all on one NUMA node when
  it fits (the node of the VM's huge pages first, else the node with the most free CPUs), spanning nodes only
  when no single node can hold it. Spanning fills the nodes in that same order (huge pages' nodes, then most
  free CPUs first). A guest with NUMA cells (``<cpu><numa><cell>``) keeps each cell whole on one host node
  (a cell bound by ``<numatune><memnode>`` on its node), so the guest's NUMA view stays true; two small cells
  may share a host node, and a cell no host node can hold is refused, never split.
  Threads: ``prefer`` packs vCPUs onto sibling threads core by core; ``isolate`` gives each vCPU a whole
  core (its siblings are reserved too, so no other VM runs there); ``require`` needs an SMT host and places
  vCPUs on thread siblings only.
- ``shared``: vCPUs float over the shared pool (allowed CPUs minus everything dedicated).
- emulator ``share``: the VM's own CPUs; ``isolate``: one extra dedicated CPU; ``pool``: the shared pool.
  The thread policy is about vCPUs: the isolated emulator CPU is one CPU whatever it is, never a whole core
  nor a sibling thread, and its siblings are not reserved for it. It goes on the node of the first vCPU when
  it can, a lone CPU (next to another VM's, a housekeeping CPU or this VM's own) before one that would break
  up a free core; Nova's accounting does the same.

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
    if t is None or not t.cpu_work:
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
            pins, emu_cpu, dedicated = _place_dedicated(dom, topo, cfg, state, auto, want_emulator, hugepage_nodes)
            vcpus.update((v, frozenset({c})) for v, c in pins.items())
            if emulator is None:
                if emu_cpu is not None:
                    emulator = frozenset({emu_cpu})
                elif t.cpu.emulator == "pool":
                    emulator = _nonempty_pool(dom, topo, cfg, state, dedicated)
                    emulator_floats = True
                elif pins:
                    emulator = frozenset(pins.values())
            nodes = frozenset(topo.cpus[c].node for c in dedicated)
        else:
            shared = True
            if want_emulator:
                _, emu_cpu, dedicated = _place_dedicated(dom, topo, cfg, state, [], True, hugepage_nodes)
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
        raise CapacityError(f"the shared CPU pool is empty (allowed "
                            f"{format_cpuset(allowed_cpus(topo, cfg)) or 'none'}, all dedicated to VMs)", vm=dom.name)
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


def _units(topo: HostTopology, cpus: frozenset[int], threads: str) -> list[list[int]]:
    """Every placement unit ``cpus`` offer a vCPU, best first: a unit is [pinned CPU, other reserved CPUs...]."""
    cores = _cores(topo, cpus)
    if threads == "isolate":
        return [sorted(core) for core in cores if core == topo.cpus[min(core)].siblings]
    if threads == "require":
        cores = [core for core in cores if len(core) > 1]
    # prefer/require: fill the fullest cores first, so a VM's vCPUs share cores rather than scatter.
    cores.sort(key=lambda core: (-len(core), min(core)))
    return [[c] for core in cores for c in sorted(core)]


def _pick(topo: HostTopology, cpus: frozenset[int], k: int, threads: str) -> list[list[int]] | None:
    """Choose ``k`` placement units from ``cpus``, or None when there are not that many."""
    units = _units(topo, cpus, threads) if k else []
    return units[:k] if len(units) >= k else None


def _reserved(units: list[list[int]]) -> frozenset[int]:
    return frozenset(c for u in units for c in u)


def _pick_emulator(topo: HostTopology, candidates: frozenset[int], nodes: list[int]) -> int | None:
    """The isolated emulator CPU: one CPU, on the first of ``nodes`` that has one; a lone CPU (its siblings
    another VM's, housekeeping or this VM's) before one that would break up a free core."""
    for nd in nodes:
        here = [c for c in candidates if topo.cpus[c].node == nd]
        if here:
            return min(here, key=lambda c: (len(topo.cpus[c].siblings & candidates), c))
    return None


@dataclass(frozen=True)
class _Group:
    """vCPUs that must share one host node: a guest NUMA cell's (or all of them, without cells: id None)."""

    cell: int | None
    vcpus: tuple[int, ...]
    nodes: frozenset[int] | None = None  # bound by <numatune><memnode>; None: any node


def _groups(dom: Domain, auto: list[int]) -> list[_Group]:
    if not dom.cells:
        return [_Group(None, tuple(auto))] if auto else []
    rest = set(auto) - {v for cell in dom.cells for v in cell.cpus}  # QEMU puts them in the first cell
    out = []
    for i, cell in enumerate(dom.cells):
        vs = tuple(sorted(v for v in auto if v in cell.cpus or (i == 0 and v in rest)))
        if vs:
            out.append(_Group(cell.id, vs, dom.memnodes.get(cell.id)))
    return out


def _place_dedicated(dom: Domain, topo: HostTopology, cfg: Config, state: LedgerState, auto: list[int],
                     want_emulator: bool, hugepage_nodes: frozenset[int],
                     ) -> tuple[dict[int, int], int | None, frozenset[int]]:
    """Pick a CPU for each vCPU in ``auto`` (+1 emulator CPU): returns (vCPU → CPU, emulator CPU, reserved set)."""
    t = dom.active_tuning
    assert t is not None and t.cpu is not None
    threads = t.cpu.threads
    if threads == "require" and not topo.smt:
        raise HostError("<kvm:cpu threads='require'> needs a host with SMT (hyper-threading); "
                        "this host has one thread per core: use threads='prefer'", vm=dom.name)
    allowed = allowed_cpus(topo, cfg)
    taken = state.dedicated_cpus(excluding=dom.uuid)
    free = allowed - taken  # the emulator CPU may be any of these: the thread policy is about vCPUs
    vfree = free
    if threads == "isolate":
        # A core is usable for a vCPU only if none of its threads is dedicated to anybody else.
        vfree = frozenset(c for c in free if not (topo.cpus[c].siblings & taken))
    by_node = {nd: frozenset(c for c in vfree if topo.cpus[c].node == nd) for nd in topo.nodes}
    # Huge pages' node(s) first, then the nodes with the most free CPUs: filled in this order.
    order = sorted(by_node, key=lambda nd: (nd not in hugepage_nodes, -len(by_node[nd]), nd))
    groups = _groups(dom, auto)
    n = len(auto)
    unit = "whole free cores" if threads == "isolate" else ("free sibling threads" if threads == "require"
                                                             else "free CPUs")
    what = f"{n} dedicated vCPU(s)" + (" + 1 emulator CPU" if want_emulator else "")
    head = f"<kvm:cpu policy='dedicated' threads='{threads}'> needs {what} but"

    def finish(placed: list[tuple[_Group, list[list[int]]]], home: list[int]) -> tuple[dict[int, int], int | None,
                                                                                        frozenset[int]] | None:
        pins = {v: u[0] for g, units in placed for v, u in zip(g.vcpus, units, strict=True)}
        reserved = frozenset().union(*(_reserved(units) for _, units in placed))
        if not want_emulator:
            return pins, None, reserved
        emu = _pick_emulator(topo, free - reserved, home)
        return None if emu is None else (pins, emu, reserved | {emu})

    if not groups and want_emulator:  # a shared VM's isolated emulator: a lone CPU anywhere keeps cores whole
        if not free:
            raise CapacityError(f"{head} there are not enough free CPUs: allowed {format_cpuset(allowed) or 'none'}, "
                                f"dedicated to other VMs {format_cpuset(taken) or 'none'}", vm=dom.name)
        emu = min(free, key=lambda c: (len(topo.cpus[c].siblings & free), order.index(topo.cpus[c].node), c))
        return {}, emu, frozenset({emu})
    # One NUMA node for all vCPUs (and the emulator CPU, else the emulator elsewhere) when it fits.
    eligible = [nd for nd in order if all(g.nodes is None or nd in g.nodes for g in groups)]
    for emulator_here in (True, False):
        for nd in eligible:
            units = _pick(topo, by_node[nd], n, threads)
            if units is None:
                continue
            parts, start = [], 0
            for g in groups:
                parts.append((g, units[start:start + len(g.vcpus)]))
                start += len(g.vcpus)
            done = finish(parts, [nd] if emulator_here else [nd, *(o for o in order if o != nd)])
            if done is not None:
                return done
        if not want_emulator:
            break

    def per_node(cpus: dict[int, frozenset[int]]) -> str:
        return ", ".join(f"node {nd}: {len(_units(topo, cpus[nd], threads))}" for nd in sorted(cpus))

    if not dom.cells:  # spread, filling the nodes in order
        units = [u for nd in order for u in _units(topo, by_node[nd], threads)][:n]
        if len(units) == n:
            home = [topo.cpus[units[0][0]].node] if units else []
            done = finish([(g, units) for g in groups], [*home, *(o for o in order if o not in home)])
            if done is not None:
                return done
        raise CapacityError(f"{head} there are not enough {unit}: allowed {format_cpuset(allowed) or 'none'}, "
                            f"dedicated to other VMs {format_cpuset(taken) or 'none'}", vm=dom.name)

    # Spanning nodes with guest NUMA cells: each cell whole on one host node, so the guest's NUMA view holds.
    for g in groups:
        nodes = [nd for nd in order if g.nodes is None or nd in g.nodes]
        if not any(len(_units(topo, by_node[nd], threads)) >= len(g.vcpus) for nd in nodes):
            where = (f"it is bound to host node(s) {format_cpuset(g.nodes) or 'none'} by <numatune><memnode>, "
                     f"which have fewer {unit}" if g.nodes is not None else f"no host NUMA node has that many {unit}")
            raise CapacityError(f"guest NUMA cell {g.cell} has {len(g.vcpus)} vCPU(s) but {where} (a guest "
                                f"cell is never split across host nodes; {unit}: {per_node(by_node)})", vm=dom.name)
    placed = _fit_cells(topo, sorted(groups, key=lambda g: (g.nodes is None, -len(g.vcpus), g.vcpus)),
                        dict(by_node), order, threads)
    if placed is not None:
        placed.sort(key=lambda p: p[0].vcpus)
        home = [topo.cpus[placed[0][1][0][0]].node]
        done = finish(placed, [*home, *(o for o in order if o not in home)])
        if done is None:
            raise CapacityError(f"{head} no free CPU is left for the emulator: allowed "
                                f"{format_cpuset(allowed) or 'none'}, dedicated to other VMs "
                                f"{format_cpuset(taken) or 'none'}", vm=dom.name)
        return done
    sizes = "+".join(str(len(g.vcpus)) for g in groups)
    raise CapacityError(f"{head} its guest NUMA cells ({sizes} vCPUs) do not fit whole on the host nodes together "
                        f"({unit}: {per_node(by_node)}; dedicated to other VMs {format_cpuset(taken) or 'none'})",
                        vm=dom.name)


def _fit_cells(topo: HostTopology, groups: list[_Group], free: dict[int, frozenset[int]], order: list[int],
               threads: str, budget: int = 10_000) -> list[tuple[_Group, list[list[int]]]] | None:
    """Each group whole on one node, trying the nodes in ``order`` (first fit, backtracking; bounded)."""
    placed: list[tuple[_Group, list[list[int]]]] = []
    tries = 0

    def fit(i: int) -> bool:
        nonlocal tries
        if i == len(groups):
            return True
        g = groups[i]
        for nd in order:
            if g.nodes is not None and nd not in g.nodes:
                continue
            units = _pick(topo, free[nd], len(g.vcpus), threads)
            tries += 1
            if units is None or tries > budget:
                continue
            used = _reserved(units)
            free[nd] -= used
            placed.append((g, units))
            if fit(i + 1):
                return True
            placed.pop()
            free[nd] |= used
        return False

    return placed if fit(0) else None
