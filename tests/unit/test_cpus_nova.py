"""The dedicated-CPU planner against pinning cases modeled on Nova's own (nova/tests/unit/virt/test_hardware.py:
``_pack_instance_onto_cores``, ``numa_fit_instance_to_host`` and the emulator-threads cases).

Each case names the Nova test it follows and states the placement it expects; every case that fits is also
checked for the properties that hold whatever the host: one distinct host CPU per vCPU, never another VM's or a
housekeeping CPU, each guest NUMA cell whole on one host node, whole cores under ``threads="isolate"``,
sibling threads only under ``"require"``, and under ``emulator="isolate"`` exactly one extra CPU (never a
whole core nor a sibling thread for it). Deliberate differences from Nova are marked as such.

Host shapes are ``nodes x cores per node x threads per core``, numbered like Linux on x86: the first thread of
every core, then the siblings (1x4x2: CPUs 0-3 and their siblings 4-7; 2x4x2: node 0 is 0-3,8-11).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvmhooks.domain import parse_domain
from kvmhooks.errors import CapacityError, HostError
from kvmhooks.ledger import DomainRecord, LedgerState
from kvmhooks.plan.cpus import CpuPlan, plan_cpus
from kvmhooks.topology import HostTopology, read_topology
from tests.fakehost import FakeHost, domain_xml

U = "11111111-2222-3333-4444-{:012d}"


@dataclass(frozen=True)
class Case:
    name: str
    nova: str  # the Nova test this one follows
    shape: tuple[int, int, int]  # nodes, cores per node, threads per core
    vcpus: int
    cpu: str = ""  # extra <kvm:cpu> attributes besides policy="dedicated"
    cells: tuple[str, ...] = ()  # guest NUMA cells: the vCPU set of each
    memnodes: tuple[tuple[int, int], ...] = ()  # <numatune><memnode cellid nodeset>
    held: tuple[int, ...] = ()  # dedicated to another VM
    housekeeping: frozenset[int] = frozenset()
    hp_nodes: frozenset[int] = frozenset()
    policy: str = "dedicated"
    # expectations (None: not checked beyond the common properties)
    pins: dict[int, int] | None = None  # vCPU → host CPU
    cell_nodes: dict[int, int] | None = None  # guest cell → host node
    nodes: frozenset[int] | None = None  # host nodes of the dedicated CPUs
    dedicated: frozenset[int] | None = None
    emulator: int | None = None
    refuse: str | None = None  # regex of the refusal
    error: type[Exception] = field(default=CapacityError)


CASES = [
    # --- _pack_instance_onto_cores: one host node -------------------------------------------------------
    Case("inst_too_large_cpu", "test_get_pinning_inst_too_large_cpu", (1, 4, 1), 5,
         refuse=r"VM 'vm1': .*needs 5 dedicated vCPU\(s\) but there are not enough free CPUs"),
    Case("inst_not_avail", "test_get_pinning_inst_not_avail", (1, 4, 1), 2, held=(0, 1, 2),
         refuse=r"not enough free CPUs.*other VMs 0-2"),
    Case("no_sibling_fits_empty", "test_get_pinning_no_sibling_fits_empty", (1, 4, 1), 3,
         pins={0: 0, 1: 1, 2: 2}),
    Case("no_sibling_fits_w_usage", "test_get_pinning_no_sibling_fits_w_usage", (1, 4, 1), 3, held=(1,),
         pins={0: 0, 1: 2, 2: 3}),
    Case("host_siblings_fit_single_core", "test_get_pinning_host_siblings_fit_single_core", (1, 2, 4), 4,
         pins={0: 0, 1: 2, 2: 4, 3: 6}),  # one core's four threads
    Case("host_siblings_fit", "test_get_pinning_host_siblings_fit", (1, 4, 2), 4,
         pins={0: 0, 1: 4, 2: 1, 3: 5}),  # two whole cores, thread by thread
    Case("prefer_w_usage", "test_get_pinning_instance_siblings_host_siblings_fits_w_usage", (1, 4, 2), 3,
         held=(0,), pins={0: 1, 1: 5, 2: 2}),  # full cores first; CPU 4 (sibling of another VM's) last
    Case("require_no_siblings", "test_get_pinning_require_policy_no_siblings", (1, 4, 1), 2,
         cpu='threads="require"', refuse="needs a host with SMT", error=HostError),
    Case("require_too_few_siblings", "test_get_pinning_require_policy_too_few_siblings", (1, 4, 2), 3,
         cpu='threads="require"', held=(0, 1, 2), refuse="not enough free sibling threads"),
    Case("require_fits", "test_get_pinning_require_policy_fits", (1, 4, 2), 4, cpu='threads="require"',
         held=(0, 1), pins={0: 2, 1: 6, 2: 3, 3: 7}),
    Case("isolate_too_few_fully_free_cores", "test_get_pinning_isolate_policy_too_few_fully_free_cores",
         (1, 4, 2), 3, cpu='threads="isolate"', held=(1, 2), refuse="not enough whole free cores"),
    Case("isolate_no_fully_free_cores", "test_get_pinning_isolate_policy_no_fully_free_cores", (1, 4, 2), 1,
         cpu='threads="isolate"', held=(0, 1, 2, 3), refuse="not enough whole free cores"),
    Case("isolate_fits_no_smt", "test_get_pinning_isolate_policy_fits", (1, 4, 1), 2, cpu='threads="isolate"',
         pins={0: 0, 1: 1}, dedicated=frozenset({0, 1})),
    Case("isolate_fits_ht_host", "test_get_pinning_isolate_policy_fits_ht_host", (1, 4, 2), 2,
         cpu='threads="isolate"', pins={0: 0, 1: 1}, dedicated=frozenset({0, 4, 1, 5})),
    Case("isolate_fits_w_usage", "test_get_pinning_isolate_policy_fits_w_usage", (1, 4, 2), 2,
         cpu='threads="isolate"', held=(0,), pins={0: 1, 1: 2}, dedicated=frozenset({1, 5, 2, 6})),
    # --- numa_fit_instance_to_host: which host node, guest cells -----------------------------------------
    Case("one_node_most_free", "test_host_numa_fit_instance_to_host_single_cell_w_usage", (2, 4, 1), 2,
         held=(0,), nodes=frozenset({1})),
    Case("one_node_follows_hugepages", "test_host_numa_fit_instance_to_host_single_cell (+ mem pages)", (2, 4, 1),
         2, held=(0,), hp_nodes=frozenset({0}), nodes=frozenset({0})),
    Case("two_cells_two_nodes", "test_host_numa_fit_instance_to_host_fit", (2, 2, 1), 4, cells=("0-1", "2-3"),
         cell_nodes={0: 0, 1: 1}),
    Case("cells_keep_guest_view", "test_host_numa_fit_instance_to_host_fit_w_usage", (2, 4, 1), 6,
         cells=("0-3", "4-5"), held=(0, 1), cell_nodes={0: 1, 1: 0}),  # the 4-vCPU cell on the node with 4 free
    Case("most_free_node_filled_first", "test_host_numa_fit_instance_to_host_fit_w_usage", (3, 4, 1), 6,
         cells=("0-2", "3-5"), held=(0, 1, 2, 4), cell_nodes={0: 2, 1: 1}),
    Case("cells_fit_one_by_one_not_together", "test_host_numa_fit_instance_to_host_fail", (2, 4, 1), 6,
         cells=("0-2", "3-5"), held=(0, 1), refuse=r"VM 'vm1': .*guest NUMA cells.*whole"),
    Case("cell_larger_than_any_node", "test_host_numa_fit_instance_to_host_fail (cell > host cell)", (2, 2, 2), 6,
         cells=("0-4", "5"), refuse=r"VM 'vm1': guest NUMA cell 0 has 5 vCPU\(s\).*no host NUMA node"),
    Case("one_cell_never_spread", "test_host_numa_fit_instance_to_host_single_cell_fail", (2, 4, 1), 6,
         cells=("0-5",), refuse=r"VM 'vm1': guest NUMA cell 0 has 6 vCPU\(s\)"),
    Case("cells_fit_one_node", "numa_fit_instance_to_host with pack (differs: Nova spreads cells)", (2, 4, 1), 4,
         cells=("0-1", "2-3"), held=(4,), nodes=frozenset({0})),  # one node when it fits, as without cells
    Case("more_cells_than_nodes", "test_host_numa_fit_instance_to_host_fail (differs: Nova refuses)", (2, 2, 1), 4,
         cells=("0-1", "2", "3"), cell_nodes={0: 0, 1: 1, 2: 1}),  # two small cells share a host node
    Case("memnode_binds_cells", "numa_fit_instance_to_host with hw:numa_mem (libvirt <memnode>)", (2, 4, 1), 4,
         cells=("0-1", "2-3"), memnodes=((0, 1), (1, 0)), cell_nodes={0: 1, 1: 0}),
    Case("memnode_same_node", "numa_fit_instance_to_host with hw:numa_mem (libvirt <memnode>)", (2, 4, 1), 4,
         cells=("0-1", "2-3"), memnodes=((0, 1), (1, 1)), nodes=frozenset({1})),
    Case("memnode_node_too_small", "numa_fit_instance_to_host_fail (bound cell)", (2, 4, 1), 4,
         cells=("0-1", "2-3"), memnodes=((0, 1),), held=(4, 5, 6),
         refuse=r"VM 'vm1': guest NUMA cell 0 .*bound to host node\(s\) 1 by <numatune><memnode>"),
    Case("isolate_cells_span", "test_host_numa_fit_instance_to_host_fit_multi_cells (isolate)", (2, 4, 2), 8,
         cpu='threads="isolate"', cells=("0-3", "4-7"), cell_nodes={0: 0, 1: 1}, dedicated=frozenset(range(16))),
    Case("spread_without_cells_fills_most_free", "numa_fit_instance_to_host (no guest cells: spread)", (2, 4, 1),
         6, held=(0,), dedicated=frozenset({4, 5, 6, 7, 1, 2})),
    # --- emulator threads ----------------------------------------------------------------------------------
    Case("emulator_isolate", "EmulatorThreadsTestCase.test_single_node_isolate", (1, 4, 1), 2,
         cpu='emulator="isolate"', pins={0: 0, 1: 1}, emulator=2),
    Case("emulator_isolate_exceed", "EmulatorThreadsTestCase.test_single_node_isolate_exceed", (1, 4, 1), 4,
         cpu='emulator="isolate"', refuse=r"4 dedicated vCPU\(s\) \+ 1 emulator CPU"),
    Case("emulator_isolate_full_usage", "EmulatorThreadsTestCase.test_isolate_full_usage", (1, 2, 1), 1,
         cpu='emulator="isolate"', held=(0,), refuse=r"\+ 1 emulator CPU"),
    Case("emulator_with_isolate_threads", "EmulatorThreadsTestCase.test_isolate_w_isolate_thread_alloc",
         (1, 4, 2), 2, cpu='threads="isolate" emulator="isolate"', pins={0: 0, 1: 1},
         dedicated=frozenset({0, 4, 1, 5, 2})),  # one CPU for the emulator, not the whole core 2/6
    Case("emulator_beside_another_vm", "EmulatorThreadsTestCase.test_isolate_w_isolate_thread_alloc_usage",
         (1, 4, 2), 2, cpu='threads="isolate" emulator="isolate"', held=(0,), pins={0: 1, 1: 2}, emulator=4,
         dedicated=frozenset({1, 5, 2, 6, 4})),  # the lone CPU 4 next to the other VM's 0
    Case("emulator_beside_housekeeping", "EmulatorThreadsTestCase.test_isolate_w_isolate_thread_alloc_usage",
         (1, 4, 2), 3, cpu='threads="isolate" emulator="isolate"', housekeeping=frozenset({0}),
         pins={0: 1, 1: 2, 2: 3}, emulator=4),  # three whole cores + the housekeeping CPU's sibling
    Case("emulator_with_require", "EmulatorThreadsTestCase (require)", (1, 4, 2), 2,
         cpu='threads="require" emulator="isolate"', held=(0, 1, 2), pins={0: 3, 1: 7}, emulator=4),
    Case("emulator_multi_node", "EmulatorThreadsTestCase.test_multi_nodes_isolate", (2, 2, 1), 3,
         cpu='emulator="isolate"', cells=("0-1", "2"), cell_nodes={0: 0, 1: 1}, emulator=3),
]


def _domain(case: Case) -> bytes:
    extra = ""
    if case.cells:
        kib = 262144 // len(case.cells)
        extra = ("<cpu><numa>" + "".join(f"<cell id='{i}' cpus='{c}' memory='{kib}' unit='KiB'/>"
                                         for i, c in enumerate(case.cells)) + "</numa></cpu>")
    if case.memnodes:
        extra += ("<numatune>" + "".join(f"<memnode cellid='{c}' mode='strict' nodeset='{n}'/>"
                                         for c, n in case.memnodes) + "</numatune>")
    return domain_xml(uuid=U.format(1), backing="", vcpus=case.vcpus, extra=extra,
                      tuning=f'<kvm:cpu policy="{case.policy}" {case.cpu}/>')


def _run(case: Case, tmp_path: Path) -> tuple[CpuPlan, HostTopology]:
    nodes, cores, threads = case.shape
    host = FakeHost(tmp_path, nodes=nodes, cores_per_node=cores, threads_per_core=threads).build()
    cfg = host.config(cpu_housekeeping=case.housekeeping)
    topo = read_topology(cfg.sysfs_root, cfg.proc_root)
    state = LedgerState({U.format(100): DomainRecord(name="other", cpus=list(case.held))} if case.held else {})
    p = plan_cpus(parse_domain(_domain(case)), topo, cfg, state, case.hp_nodes)
    assert p is not None
    return p, topo


def _check_properties(case: Case, p: CpuPlan, topo: HostTopology) -> None:
    pins = {v: min(cs) for v, cs in p.vcpus.items()}
    assert all(len(cs) == 1 for cs in p.vcpus.values()), "one host CPU per vCPU"
    assert sorted(pins) == list(range(case.vcpus)), "every vCPU pinned"
    assert len(set(pins.values())) == case.vcpus, "no two vCPUs share a CPU"
    assert not set(pins.values()) & (set(case.held) | case.housekeeping), "never another VM's or housekeeping"
    assert not p.dedicated & (set(case.held) | case.housekeeping)
    assert set(pins.values()) <= p.dedicated
    for i, cpus in enumerate(case.cells):
        vs = [v for v in pins if _in(v, cpus)]
        assert len({topo.cpus[pins[v]].node for v in vs}) == 1, f"guest cell {i} split across host nodes"
    vcpu_cores = {topo.cpus[c].siblings for c in pins.values()}
    if 'threads="isolate"' in case.cpu:
        assert len(vcpu_cores) == case.vcpus, "isolate: one vCPU per core"
        assert all(core <= p.dedicated for core in vcpu_cores), "isolate: the vCPUs' siblings are reserved"
    if 'threads="require"' in case.cpu:
        assert all(len(topo.cpus[c].siblings) > 1 for c in pins.values())
    if 'emulator="isolate"' in case.cpu:
        assert p.emulator is not None and len(p.emulator) == 1, "one extra CPU for the emulator"
        emu = min(p.emulator)
        assert emu not in pins.values() and emu in p.dedicated
        assert not any(emu in core for core in vcpu_cores) or 'threads="isolate"' not in case.cpu
        vcpu_reserved = frozenset().union(*vcpu_cores) if 'threads="isolate"' in case.cpu else set(pins.values())
        assert p.dedicated == vcpu_reserved | {emu}, "the emulator CPU's siblings are not reserved for it"
    else:
        assert p.emulator == frozenset(pins.values())


def _in(v: int, cpus: str) -> bool:
    for part in cpus.split(","):
        lo, _, hi = part.partition("-")
        if int(lo) <= v <= int(hi or lo):
            return True
    return False


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_nova_case(case: Case, tmp_path: Path) -> None:
    if case.refuse is not None:
        with pytest.raises(case.error, match=case.refuse) as exc:
            _run(case, tmp_path)
        assert "\n" not in str(exc.value), "refusals are one line"
        return
    p, topo = _run(case, tmp_path)
    _check_properties(case, p, topo)
    pins = {v: min(cs) for v, cs in p.vcpus.items()}
    if case.pins is not None:
        assert pins == case.pins
    if case.cell_nodes is not None:
        got = {i: topo.cpus[pins[min(v for v in pins if _in(v, cpus))]].node for i, cpus in enumerate(case.cells)}
        assert got == case.cell_nodes
    if case.nodes is not None:
        assert p.nodes == case.nodes
    if case.dedicated is not None:
        assert p.dedicated == case.dedicated
    if case.emulator is not None:
        assert p.emulator == {case.emulator}


def test_the_table_is_nova_sized() -> None:
    assert 25 <= len(CASES) <= 45 and len({c.name for c in CASES}) == len(CASES)
