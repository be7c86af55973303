"""Hugepage planning and reservation on fake sysfs trees."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kvmhooks import operations
from kvmhooks.apply.pools import SysfsPools
from kvmhooks.domain import parse_domain
from kvmhooks.errors import CapacityError, DomainConfigError, HostError
from kvmhooks.plan.hugepages import plan_hugepages
from kvmhooks.topology import read_topology
from tests.fakehost import GIB, FakeHost, domain_xml

U1 = "11111111-2222-3333-4444-000000000001"
U2 = "11111111-2222-3333-4444-000000000002"


def plan(host: FakeHost, xml: bytes, **cfg: object):  # type: ignore[no-untyped-def]
    c = host.config(**cfg)
    return plan_hugepages(parse_domain(xml), read_topology(c.sysfs_root, c.proc_root), c)


def test_topology_of_a_two_node_smt_host(numa_host: FakeHost) -> None:
    topo = read_topology(numa_host.sysfs, numa_host.proc)
    assert sorted(topo.nodes) == [0, 1]
    assert topo.nodes[0].cpus == {0, 1, 2, 3, 8, 9, 10, 11}
    assert topo.cpus[0].siblings == {0, 8} and topo.smt
    assert topo.page_sizes == {2048, 1048576} and topo.default_page_kib == 2048
    assert topo.hugetlbfs == {2048: "/dev/hugepages", 1048576: "/dev/hugepages1G"}


def test_plain_2m(host: FakeHost) -> None:
    p = plan(host, domain_xml(memory_kib=256 * 1024))
    assert p is not None and p.size_kib == 2048 and p.pages == {0: 128}


def test_auto_size_follows_the_domain_page_then_the_host_default(host: FakeHost) -> None:
    one_g = "<hugepages><page size='1' unit='G'/></hugepages>"
    p = plan(host, domain_xml(memory_kib=2 * GIB, tuning="<kvm:hugepages/>", backing=one_g))
    assert p is not None and p.size_kib == 1048576 and p.pages == {0: 2}
    p = plan(host, domain_xml(memory_kib=2 * GIB, tuning="<kvm:hugepages/>"))
    assert p is not None and p.size_kib == 2048 and p.pages == {0: 1024}


def test_1g_without_page_size_in_domain_says_what_to_add(host: FakeHost) -> None:
    with pytest.raises(DomainConfigError, match="<page size='1048576' unit='KiB'/>"):
        plan(host, domain_xml(memory_kib=2 * GIB, tuning="<kvm:hugepages size='1G'/>"))


def test_rounding_up_and_count(host: FakeHost) -> None:
    p = plan(host, domain_xml(memory_kib=2049, tuning="<kvm:hugepages size='2M'/>"))
    assert p is not None and p.pages == {0: 2}
    p = plan(host, domain_xml(tuning="<kvm:hugepages size='2M' count='7'/>"))
    assert p is not None and p.pages == {0: 7}


def test_nodes_explicit_numatune_cells_and_auto(numa_host: FakeHost) -> None:
    p = plan(numa_host, domain_xml(memory_kib=256 * 1024, tuning="<kvm:hugepages size='2M' nodes='0,1'/>"))
    assert p is not None and p.pages == {0: 64, 1: 64}
    p = plan(numa_host, domain_xml(extra="<numatune><memory mode='strict' nodeset='1'/></numatune>"))
    assert p is not None and p.pages == {1: 128}
    cells = ("<cpu><numa><cell id='0' cpus='0' memory='64' unit='MiB'/><cell id='1' cpus='1' memory='192' "
             "unit='MiB'/></numa></cpu><numatune><memnode cellid='0' mode='strict' nodeset='1'/>"
             "<memnode cellid='1' mode='strict' nodeset='0'/></numatune>")
    p = plan(numa_host, domain_xml(extra=cells))
    assert p is not None and p.pages == {1: 32, 0: 96}
    numa_host.set_free(0, 4 * GIB)
    p = plan(numa_host, domain_xml())  # auto: the node with the most memory to spare
    assert p is not None and p.pages == {1: 128}


def test_host_problems_say_how_to_fix(tmp_path) -> None:  # type: ignore[no-untyped-def]
    host = FakeHost(tmp_path, mounts=(), page_sizes=(2048,)).build()
    with pytest.raises(HostError, match="mount -t hugetlbfs hugetlbfs /dev/hugepages"):
        plan(host, domain_xml())
    with pytest.raises(HostError, match="no 1G huge pages"):
        plan(host, domain_xml(tuning="<kvm:hugepages size='1G'/>",
                              backing="<hugepages><page size='1' unit='G'/></hugepages>"))
    with pytest.raises(HostError, match="node 3 does not exist"):
        plan(FakeHost(tmp_path / "b").build(), domain_xml(tuning="<kvm:hugepages nodes='3'/>"))


def test_missing_backing(host: FakeHost) -> None:
    with pytest.raises(DomainConfigError, match=r"<memoryBacking><hugepages/></memoryBacking>"):
        plan(host, domain_xml(backing=""))


# --- reservation -------------------------------------------------------------------------------------------

def test_reserve_release_keeps_the_admin_baseline(host: FakeHost) -> None:
    host.set_pool(0, 2048, 10)
    cfg = host.config()
    operations.prepare(parse_domain(domain_xml(uuid=U1)), cfg)
    operations.prepare(parse_domain(domain_xml(uuid=U2, memory_kib=64 * 1024)), cfg)
    assert host.pool(0) == 10 + 128 + 32
    state = operations.ledger_for(cfg).read()
    assert state.pools["node0/2048kB"].baseline == 10 and state.reserved("node0/2048kB") == 160
    operations.release(U1, cfg)
    assert host.pool(0) == 10 + 32
    operations.release(U1, cfg)  # twice: no-op
    operations.release("99999999-2222-3333-4444-000000000001", cfg)  # unknown: no-op
    operations.release(U2, cfg)
    assert host.pool(0) == 10
    assert operations.ledger_for(cfg).read().domains == {}


def test_admin_change_while_vms_run_is_adopted_as_new_baseline(host: FakeHost) -> None:
    cfg = host.config()
    operations.prepare(parse_domain(domain_xml(uuid=U1)), cfg)
    host.set_pool(0, 2048, host.pool(0) + 50)  # the admin adds 50 pages by hand
    operations.prepare(parse_domain(domain_xml(uuid=U2, memory_kib=64 * 1024)), cfg)
    assert host.pool(0) == 50 + 128 + 32
    operations.release(U1, cfg)
    operations.release(U2, cfg)
    assert host.pool(0) == 50  # never below what the admin set


def test_prepare_twice_does_not_double_reserve(host: FakeHost) -> None:
    cfg = host.config()
    operations.prepare(parse_domain(domain_xml(uuid=U1)), cfg)
    operations.prepare(parse_domain(domain_xml(uuid=U1)), cfg)
    assert host.pool(0) == 128


def test_capacity_refused_before_any_write(host: FakeHost) -> None:
    host.set_pool(0, 2048, 3)
    cfg = host.config()
    with pytest.raises(CapacityError, match="VM 'vm1'.*node 0: needs 16384 x 2M pages \\(32G\\)"):
        operations.prepare(parse_domain(domain_xml(uuid=U1, memory_kib=32 * GIB)), cfg)
    assert host.pool(0) == 3
    assert operations.ledger_for(cfg).read().domains == {}


def test_host_reserve_is_kept(host: FakeHost) -> None:
    host.set_free(0, 2 * GIB)
    cfg = host.config(host_reserve_kib=GIB)
    operations.prepare(parse_domain(domain_xml(uuid=U1, memory_kib=GIB)), cfg)  # exactly fits
    host.set_free(0, GIB + 1024)
    with pytest.raises(CapacityError, match="host reserve 1G"):
        operations.prepare(parse_domain(domain_xml(uuid=U2, memory_kib=4096)), cfg)


class StingyKernel(SysfsPools):
    """Plays a fragmented kernel: a pool never grows past ``cap`` however often it is asked."""

    def __init__(self, host: FakeHost, caps: dict[tuple[int, int], int]):
        super().__init__(host.sysfs, host.proc)
        self.caps = caps
        self.reclaims = 0

    def set(self, node: int, size_kib: int, count: int) -> int:
        return super().set(node, size_kib, min(count, self.caps.get((node, size_kib), count)))

    def reclaim(self, node: int) -> None:
        self.reclaims += 1


def test_partial_allocation_rolls_back_every_pool(numa_host: FakeHost) -> None:
    numa_host.set_pool(0, 2048, 5)
    numa_host.set_pool(1, 2048, 7)
    cfg = numa_host.config(retry_timeout=0.3)
    kernel = StingyKernel(numa_host, {(1, 2048): 40})  # node 1 cannot reach its target
    xml = domain_xml(uuid=U1, tuning="<kvm:hugepages size='2M' nodes='0,1'/>")
    with pytest.raises(CapacityError, match="node1/2048kB: got 33 of 64 pages"):
        operations.prepare(parse_domain(xml), cfg, pools=kernel)
    assert kernel.reclaims >= 1  # it tried to compact before giving up
    assert (numa_host.pool(0), numa_host.pool(1)) == (5, 7)
    assert operations.ledger_for(cfg).read().domains == {}


def test_required_no_warns_and_goes_on(host: FakeHost) -> None:
    cfg = host.config(retry_timeout=0.1)
    xml = domain_xml(uuid=U1, tuning="<kvm:hugepages size='2M' required='no'/>")
    prepared = operations.prepare(parse_domain(xml), cfg, pools=StingyKernel(host, {(0, 2048): 3}))
    assert prepared.warnings and "required='no'" in prepared.warnings[0]
    assert host.pool(0) == 0
    assert operations.ledger_for(cfg).read().domains[U1].hugepages == {}


def test_leave_alone_pool_is_never_written(host: FakeHost) -> None:
    host.set_pool(0, 2048, 200, free=150)
    cfg = host.config(leave_alone=frozenset({"node0/2048kB"}))
    operations.prepare(parse_domain(domain_xml(uuid=U1)), cfg)
    assert host.pool(0) == 200
    operations.release(U1, cfg)
    assert host.pool(0) == 200
    host.set_pool(0, 2048, 200, free=100)
    with pytest.raises(CapacityError, match="left alone"):
        operations.prepare(parse_domain(domain_xml(uuid=U2)), cfg)


def test_1g_and_2m_pools_on_two_nodes_are_independent(numa_host: FakeHost) -> None:
    cfg = numa_host.config()
    one_g = domain_xml(uuid=U1, memory_kib=2 * GIB, tuning="<kvm:hugepages size='1G' nodes='1'/>",
                       backing="<hugepages><page size='1' unit='G'/></hugepages>")
    operations.prepare(parse_domain(one_g), cfg)
    operations.prepare(parse_domain(domain_xml(uuid=U2, tuning="<kvm:hugepages size='2M' nodes='0'/>")), cfg)
    assert numa_host.pool(1, 1048576) == 2 and numa_host.pool(0, 2048) == 128
    assert numa_host.pool(0, 1048576) == 0 and numa_host.pool(1, 2048) == 0
    operations.release(U1, cfg)
    assert numa_host.pool(1, 1048576) == 0 and numa_host.pool(0, 2048) == 128


def test_adopt_accounts_without_writing(host: FakeHost) -> None:
    host.set_pool(0, 2048, 128 + 10)  # a running VM's pages plus the admin's 10
    cfg = host.config()
    dom = parse_domain(domain_xml(uuid=U1))
    rec = operations.adopt(dom, replace(cfg))
    assert rec.hugepages == {"node0/2048kB": 128} and host.pool(0) == 138
    assert operations.ledger_for(cfg).read().pools["node0/2048kB"].baseline == 10
    operations.adopt(dom, cfg)  # twice: no change
    assert operations.ledger_for(cfg).read().reserved("node0/2048kB") == 128
    operations.release(U1, cfg)
    assert host.pool(0) == 10


def test_a_ledger_write_failure_gives_the_pages_back(host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvmhooks.ledger import Ledger

    def broken(self: Ledger, text: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Ledger, "_write", broken)
    with pytest.raises(OSError):
        operations.prepare(parse_domain(domain_xml(uuid=U1)), host.config())
    assert host.pool(0) == 0
