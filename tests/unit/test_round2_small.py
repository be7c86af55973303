"""Issue "Hardening, round two": the small items and the tests a mutation run showed missing (planner side)."""

from __future__ import annotations

import pytest

from kvmhooks.domain import parse_domain
from kvmhooks.errors import AnnotationError, CapacityError
from tests.fakehost import FakeHost, domain_xml
from tests.unit.test_cpus import holding, pins, plan
from tests.unit.test_hugepages import plan as plan_pages

HUGE = "9" * 5079


@pytest.mark.parametrize("tuning", [f'<kvm:vcpus live="{HUGE}"/>', f'<kvm:hugepages size="2M" count="{HUGE}"/>',
                                    f'<kvm:vcpupin vcpu="{HUGE}" cpuset="1"/>', f'<kvm:balloon target="{HUGE}M"/>'])
def test_a_rejected_number_is_clipped_in_the_one_line_error(tuning: str) -> None:
    """An error once echoed a rejected 5079-digit number whole: one "line" of 5 KB on virsh start's stderr."""
    with pytest.raises(AnnotationError) as e:
        parse_domain(domain_xml(tuning=tuning))
    msg = str(e.value)
    assert len(msg) < 400 and "\n" not in msg, msg
    assert msg.startswith("VM 'vm1': <kvm:") and " characters)" in msg


def test_a_long_vm_name_is_clipped_too() -> None:
    name = "n" * 3000
    with pytest.raises(AnnotationError) as e:
        parse_domain(domain_xml(name=name, tuning='<kvm:vcpus live="x"/>'))
    assert len(str(e.value)) < 400 and "3000 characters" in str(e.value)


def test_hugepages_per_guest_cell_round_each_cell_up_to_whole_pages(numa_host: FakeHost) -> None:
    """65 MiB + 191 MiB cells on 2M pages: each cell needs whole pages of its own node, 33 + 96 (QEMU backs
    each cell's memory object separately; rounding the sum, or down, leaves a cell short)."""
    cells = ("<cpu><numa><cell id='0' cpus='0' memory='65' unit='MiB'/><cell id='1' cpus='1' memory='191' "
             "unit='MiB'/></numa></cpu><numatune><memnode cellid='0' mode='strict' nodeset='1'/>"
             "<memnode cellid='1' mode='strict' nodeset='0'/></numatune>")
    p = plan_pages(numa_host, domain_xml(memory_kib=256 * 1024, extra=cells))
    assert p is not None and p.pages == {1: 33, 0: 96}
    both = cells.replace("nodeset='0'", "nodeset='1'")  # both cells on node 1: still rounded per cell
    p = plan_pages(numa_host, domain_xml(memory_kib=256 * 1024, extra=both))
    assert p is not None and p.pages == {1: 129}


def test_isolate_never_takes_a_cpu_whose_sibling_is_housekeeping(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """threads='isolate' gives each vCPU a whole core. On 2 cores x 2 threads (siblings 0/2 and 1/3) with
    CPU 0 for housekeeping, CPU 2 is free but its core is not: it is no "whole free core"."""
    host = FakeHost(tmp_path, nodes=1, cores_per_node=2, threads_per_core=2).build()
    isolate = '<kvm:cpu policy="dedicated" threads="isolate"/>'
    p = plan(host, isolate, vcpus=1)
    assert pins(p) == {0: "1"} and p.dedicated == {1, 3}
    with pytest.raises(CapacityError, match="whole free cores"):
        plan(host, isolate, vcpus=2)  # three free CPUs, one whole core
    with pytest.raises(CapacityError, match="whole free cores"):
        plan(host, isolate, vcpus=1, state=holding([1]))  # the only core left has housekeeping CPU 0 in it
