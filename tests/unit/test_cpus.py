"""CPU placement planner on fake topologies, for every policy combination."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kvmhooks import operations
from kvmhooks.domain import parse_domain
from kvmhooks.errors import AnnotationError, CapacityError, HostError
from kvmhooks.ledger import DomainRecord, LedgerState
from kvmhooks.plan.cpus import CpuPlan, allowed_cpus, plan_cpus
from kvmhooks.topology import read_topology
from kvmhooks.units import format_cpuset
from tests.fakehost import FakeHost, domain_xml

U = "11111111-2222-3333-4444-{:012d}"


def plan(host: FakeHost, tuning: str, vcpus: int = 2, state: LedgerState | None = None, uuid: int = 1,
         hp_nodes: frozenset[int] = frozenset(), extra: str = "", **cfg: object) -> CpuPlan:
    c = host.config(**cfg)
    dom = parse_domain(domain_xml(uuid=U.format(uuid), tuning=tuning, vcpus=vcpus, extra=extra))
    p = plan_cpus(dom, read_topology(c.sysfs_root, c.proc_root), c, state or LedgerState(), hp_nodes)
    assert p is not None
    return p


def holding(*cpus_by_vm: list[int], shared: bool = False) -> LedgerState:
    return LedgerState({U.format(100 + i): DomainRecord(name=f"o{i}", cpus=list(c)) for i, c in enumerate(cpus_by_vm)})


def pins(p: CpuPlan) -> dict[int, str]:
    return {v: format_cpuset(c) for v, c in p.vcpus.items()}


# Host shapes: this machine (1 node, 2 CPUs, no SMT); 2 nodes x 4 cores x 2 threads (CPUs 0-3,8-11 on node 0,
# 4-7,12-15 on node 1; siblings n and n+8); and one with offline CPUs.

@pytest.fixture
def small(tmp_path) -> FakeHost:  # type: ignore[no-untyped-def]
    return FakeHost(tmp_path, nodes=1, cores_per_node=2).build()


def test_allowed_set_defaults_and_config(numa_host: FakeHost) -> None:
    topo = read_topology(numa_host.sysfs, numa_host.proc)
    assert allowed_cpus(topo, numa_host.config()) == frozenset(range(1, 16))
    cfg = numa_host.config(cpu_housekeeping=frozenset({0, 8}), cpu_allowed=frozenset({0, 1, 2, 99}))
    assert allowed_cpus(topo, cfg) == {1, 2}


def test_explicit_pins_only(small: FakeHost) -> None:
    p = plan(small, '<kvm:vcpupin vcpu="0" cpuset="1"/><kvm:emulatorpin cpuset="0"/>')
    assert pins(p) == {0: "1"} and p.emulator == {0} and not p.dedicated and not p.shared


def test_explicit_pin_outside_host_names_vm_element_value(small: FakeHost) -> None:
    with pytest.raises(AnnotationError, match=r"VM 'vm1': <kvm:vcpupin cpuset=...> value '5': CPU\(s\) 5 are not"):
        plan(small, '<kvm:vcpupin vcpu="0" cpuset="5"/>')


def test_explicit_pins_may_use_housekeeping_cpus(small: FakeHost) -> None:
    p = plan(small, '<kvm:vcpupin vcpu="0" cpuset="0"/>')  # housekeeping is CPU 0 by default
    assert pins(p) == {0: "0"}


def test_dedicated_on_the_small_host(small: FakeHost) -> None:
    p = plan(small, '<kvm:cpu policy="dedicated"/>', vcpus=1, cpu_housekeeping=frozenset())
    assert pins(p) == {0: "0"} and p.dedicated == {0} and p.emulator == {0}
    p2 = plan(small, '<kvm:cpu policy="dedicated"/>', vcpus=1, state=holding([0]), uuid=2,
              cpu_housekeeping=frozenset())
    assert pins(p2) == {0: "1"}
    with pytest.raises(CapacityError, match=r"needs 1 dedicated vCPU\(s\).*other VMs 0-1"):
        plan(small, '<kvm:cpu policy="dedicated"/>', vcpus=1, state=holding([0], [1]), uuid=3,
             cpu_housekeeping=frozenset())


def test_require_needs_smt(small: FakeHost) -> None:
    with pytest.raises(HostError, match="needs a host with SMT"):
        plan(small, '<kvm:cpu policy="dedicated" threads="require"/>', vcpus=1, cpu_housekeeping=frozenset())


def test_prefer_packs_sibling_threads_on_one_node(numa_host: FakeHost) -> None:
    p = plan(numa_host, '<kvm:cpu policy="dedicated"/>', vcpus=4)
    # Without huge pages the node with the most free CPUs wins (node 0 lost CPU 0 to housekeeping).
    assert pins(p) == {0: "4", 1: "12", 2: "5", 3: "13"} and p.nodes == {1}
    p = plan(numa_host, '<kvm:cpu policy="dedicated"/>', vcpus=4, hp_nodes=frozenset({0}))
    # On node 0, core 0 has one free thread (8): the full cores 1 and 2 come first.
    assert pins(p) == {0: "1", 1: "9", 2: "2", 3: "10"} and p.nodes == {0}


def test_isolate_takes_whole_cores(numa_host: FakeHost) -> None:
    node0 = frozenset({0})
    p = plan(numa_host, '<kvm:cpu policy="dedicated" threads="isolate"/>', vcpus=2, hp_nodes=node0)
    assert pins(p) == {0: "1", 1: "2"} and p.dedicated == {1, 9, 2, 10}
    # A core whose sibling is dedicated to another VM is not usable for isolate (nor is core 0: CPU 0 is
    # housekeeping, so that core is not whole).
    p = plan(numa_host, '<kvm:cpu policy="dedicated" threads="isolate"/>', vcpus=2, state=holding([9]),
             hp_nodes=node0)
    assert pins(p) == {0: "2", 1: "3"}


def test_require_uses_sibling_threads_only(numa_host: FakeHost) -> None:
    p = plan(numa_host, '<kvm:cpu policy="dedicated" threads="require"/>', vcpus=2,
             cpu_housekeeping=frozenset())
    assert pins(p) == {0: "0", 1: "8"}


def test_follows_the_hugepage_node(numa_host: FakeHost) -> None:
    p = plan(numa_host, '<kvm:cpu policy="dedicated"/>', vcpus=2, hp_nodes=frozenset({1}))
    assert p.nodes == {1} and pins(p) == {0: "4", 1: "12"}


def test_spans_nodes_only_when_no_node_fits(numa_host: FakeHost) -> None:
    p = plan(numa_host, '<kvm:cpu policy="dedicated"/>', vcpus=10)
    assert p.nodes == {0, 1} and len(p.dedicated) == 10


def test_emulator_policies(numa_host: FakeHost) -> None:
    share = plan(numa_host, '<kvm:cpu policy="dedicated"/>', vcpus=2)
    assert share.emulator == share.dedicated
    iso = plan(numa_host, '<kvm:cpu policy="dedicated" emulator="isolate"/>', vcpus=2)
    assert len(iso.dedicated) == 3 and iso.emulator is not None and len(iso.emulator) == 1
    assert not iso.emulator & frozenset(c for cs in iso.vcpus.values() for c in cs)
    pool = plan(numa_host, '<kvm:cpu policy="dedicated" emulator="pool"/>', vcpus=2)
    assert pool.emulator == frozenset(range(1, 16)) - pool.dedicated and pool.emulator_floats


def test_shared_floats_over_the_pool(numa_host: FakeHost) -> None:
    p = plan(numa_host, '<kvm:cpu policy="shared"/>', vcpus=2, state=holding([1, 2, 3]))
    pool = frozenset(range(4, 16)) | {8, 9, 10, 11}
    assert all(c == pool for c in p.vcpus.values()) and p.emulator == pool
    assert p.shared and p.floating == {0, 1} and not p.dedicated


def test_shared_with_an_explicit_pin_keeps_it(numa_host: FakeHost) -> None:
    p = plan(numa_host, '<kvm:cpu policy="shared"/><kvm:vcpupin vcpu="1" cpuset="0"/>', vcpus=2)
    assert pins(p)[1] == "0" and p.floating == {0}


def test_offline_cpus_are_never_handed_out(tmp_path) -> None:  # type: ignore[no-untyped-def]
    host = FakeHost(tmp_path, nodes=1, cores_per_node=4, offline=frozenset({2, 3})).build()
    p = plan(host, '<kvm:cpu policy="dedicated"/>', vcpus=1)
    assert pins(p) == {0: "1"}
    with pytest.raises(CapacityError):
        plan(host, '<kvm:cpu policy="dedicated"/>', vcpus=2)
    with pytest.raises(AnnotationError, match="not online"):
        plan(host, '<kvm:vcpupin vcpu="0" cpuset="3"/>')


def test_fragmentation_isolate_fails_where_prefer_fits(numa_host: FakeHost) -> None:
    # Other VMs hold one thread of every core on node 0 and node 1 but core 7: isolate finds one core.
    state = holding([1, 2, 3, 8, 4, 5, 6])
    with pytest.raises(CapacityError, match="whole free cores"):
        plan(numa_host, '<kvm:cpu policy="dedicated" threads="isolate"/>', vcpus=2, state=state)
    p = plan(numa_host, '<kvm:cpu policy="dedicated"/>', vcpus=2, state=state)
    assert len(p.dedicated) == 2


def test_every_vcpu_up_to_the_maximum_is_pinned(numa_host: FakeHost) -> None:
    c = numa_host.config()
    dom = parse_domain(domain_xml(tuning='<kvm:cpu policy="dedicated"/><kvm:vcpus live="2"/>', vcpus=4,
                                  vcpu_attrs=" current='1'"))
    p = plan_cpus(dom, read_topology(c.sysfs_root, c.proc_root), c, LedgerState())
    assert p is not None and sorted(p.vcpus) == [0, 1, 2, 3]


def test_prepare_reserves_and_release_frees_cpus(small: FakeHost) -> None:
    cfg = small.config(cpu_housekeeping=frozenset())
    a = parse_domain(domain_xml(name="a", uuid=U.format(1), tuning='<kvm:cpu policy="dedicated"/>', vcpus=1,
                                backing=""))
    b = replace(a, name="b", uuid=U.format(2))
    c = replace(a, name="c", uuid=U.format(3))
    assert operations.prepare(a, cfg).record.cpus == [0]
    assert operations.prepare(b, cfg).record.cpus == [1]
    with pytest.raises(CapacityError, match="VM 'c'"):
        operations.prepare(c, cfg)
    assert U.format(3) not in operations.ledger_for(cfg).read().domains
    operations.release(U.format(1), cfg)
    assert operations.prepare(c, cfg).record.cpus == [0]


def test_cpu_refusal_leaves_pools_untouched(small: FakeHost) -> None:
    cfg = small.config(cpu_housekeeping=frozenset())
    state_cpus = parse_domain(domain_xml(uuid=U.format(1), tuning='<kvm:cpu policy="dedicated"/>', vcpus=2,
                                         backing=""))
    operations.prepare(state_cpus, cfg)
    both = parse_domain(domain_xml(uuid=U.format(2), tuning='<kvm:hugepages/><kvm:cpu policy="dedicated"/>',
                                   vcpus=1))
    with pytest.raises(CapacityError):
        operations.prepare(both, cfg)
    assert small.pool(0) == 0


def test_adopt_takes_dedicated_cpus_from_the_live_cputune(small: FakeHost) -> None:
    cfg = small.config(cpu_housekeeping=frozenset())
    xml = domain_xml(uuid=U.format(1), tuning='<kvm:cpu policy="dedicated"/>', vcpus=1, backing="",
                     extra="<cputune><vcpupin vcpu='0' cpuset='1'/><emulatorpin cpuset='1'/></cputune>")
    rec = operations.adopt(parse_domain(xml), cfg)
    assert rec.cpus == [1]
    b = parse_domain(domain_xml(uuid=U.format(2), tuning='<kvm:cpu policy="dedicated"/>', vcpus=1, backing=""))
    assert operations.prepare(b, cfg).record.cpus == [0]


def test_adopted_shared_vm_keeps_floating_so_it_is_re_pinned_later(small: FakeHost) -> None:
    """After a libvirtd restart a shared VM must still move when dedicated CPUs come and go."""
    cfg = small.config(cpu_housekeeping=frozenset())
    xml = domain_xml(uuid=U.format(1), tuning='<kvm:cpu policy="shared"/><kvm:vcpupin vcpu="1" cpuset="0"/>',
                     vcpus=3, backing="",
                     extra="<cputune><vcpupin vcpu='0' cpuset='0-1'/><vcpupin vcpu='1' cpuset='0'/>"
                           "<vcpupin vcpu='2' cpuset='0-1'/><emulatorpin cpuset='0-1'/></cputune>")
    rec = operations.adopt(parse_domain(xml), cfg)
    prepared = operations.prepare(parse_domain(xml.replace(U.format(1).encode(), U.format(2).encode())), cfg)
    assert rec is not None and rec.pins is not None and prepared.record.pins is not None
    assert rec.shared and rec.pins.floating == prepared.record.pins.floating == (0, 2)
    assert rec.pins.emulator_floats is prepared.record.pins.emulator_floats is True


def test_isolated_emulator_is_one_cpu_under_thread_isolate(numa_host: FakeHost) -> None:
    """The thread policy is about vCPUs: the isolated emulator takes one CPU, not a whole core, and a lone CPU
    (here 8, the sibling of housekeeping CPU 0) first; another VM can still use what it leaves."""
    node0 = frozenset({0})
    p = plan(numa_host, '<kvm:cpu policy="dedicated" threads="isolate" emulator="isolate"/>', vcpus=2,
             hp_nodes=node0)
    assert pins(p) == {0: "1", 1: "2"} and p.emulator == {8} and p.dedicated == {1, 9, 2, 10, 8}
    # Node 0 keeps its whole core 3: the emulator took CPU 8, whose core was never whole.
    other = plan(numa_host, '<kvm:cpu policy="dedicated" threads="isolate"/>', vcpus=1, uuid=2,
                 state=holding(sorted(p.dedicated)), hp_nodes=node0)
    assert pins(other) == {0: "3"}


def test_shared_vm_isolated_emulator_takes_a_lone_cpu(numa_host: FakeHost) -> None:
    p = plan(numa_host, '<kvm:cpu policy="shared" emulator="isolate"/>', vcpus=2)
    assert p.emulator == {8} and p.dedicated == {8} and 8 not in p.vcpus[0]


def test_guest_cell_refusal_is_one_line_naming_the_vm(numa_host: FakeHost) -> None:
    cells = "<cpu><numa><cell id='0' cpus='0-8' memory='131072'/><cell id='1' cpus='9' memory='131072'/></numa></cpu>"
    with pytest.raises(CapacityError) as exc:
        plan(numa_host, '<kvm:cpu policy="dedicated"/>', vcpus=10, extra=cells)
    assert str(exc.value).startswith("VM 'vm1': guest NUMA cell 0 has 9 vCPU(s)") and "\n" not in str(exc.value)
    # The same vCPUs without guest cells span the nodes, the node with the most free CPUs filled first.
    p = plan(numa_host, '<kvm:cpu policy="dedicated"/>', vcpus=10)
    assert p.dedicated >= frozenset({4, 5, 6, 7, 12, 13, 14, 15})
