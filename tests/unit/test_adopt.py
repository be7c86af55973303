"""Adoption reads facts instead of guessing (defect 8): where a running VM's huge pages really are (its QEMU
process's numa_maps), every CPU it holds (isolate siblings, the isolated emulator CPU), and a VM already in
the ledger keeps its record at reconnect even if its live annotation now says enabled="no"."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmhooks import operations
from kvmhooks.domain import parse_domain
from kvmhooks.errors import HostError
from kvmhooks.topology import numa_maps, qemu_hugepages
from tests.fakehost import FakeHost, domain_xml

U1 = "11111111-2222-3333-4444-000000000001"
U2 = "11111111-2222-3333-4444-000000000002"


def fake_qemu(host: FakeHost, pid: int, uuid: str, numa_maps: str | None, name: str = "vm1", uid: int = 0,
              cgroup: str | None = None, pidfile: bool = True, dom_id: int = 1) -> None:
    """A QEMU as libvirt 9.0 starts it on a cgroup v1 host without systemd (this machine's layout): its pid
    file /run/libvirt/qemu/NAME.pid, the process owned by the QEMU user (or root), in the domain's machine
    cgroup, started with -uuid. ``numa_maps`` None: not readable."""
    d = host.proc / str(pid)
    d.mkdir(parents=True)
    (d / "cmdline").write_bytes(b"\0".join([b"/usr/bin/qemu-system-x86_64", b"-name", f"guest={name}".encode(),
                                            b"-uuid", uuid.encode(), b"-m", b"256"]) + b"\0")
    (d / "stat").write_text(f"{pid} (qemu-system-x86) S 1 {pid} {pid} 0 -1 4194624 9311 0 0 0 37 21 0 0 20 0 4 0 "
                            "8723 1234567 3456 18446744073709551615 1 1 0 0 0 0 0 4096 17003 0 0 0 17 1 0 0 0 0 0 "
                            "0 0 0 0 0 0 0\n")
    (d / "status").write_text(f"Name:\tqemu-system-x86\nState:\tS (sleeping)\nTgid:\t{pid}\nPid:\t{pid}\n"
                              f"PPid:\t1\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t107\t107\t107\t107\n")
    grp = f"/machine/qemu-{dom_id}-{name}.libvirt-qemu"
    (d / "cgroup").write_text(cgroup if cgroup is not None else
                              f"12:cpuset:{grp}/emulator\n11:memory:{grp}\n4:cpu,cpuacct:{grp}/emulator\n"
                              f"1:name=systemd:/\n")
    if numa_maps is not None:
        (d / "numa_maps").write_text(numa_maps)
    if pidfile:
        run = host.root / "run-root/libvirt/qemu"
        run.mkdir(parents=True, exist_ok=True)
        (run / f"{name}.pid").write_text(str(pid))


def hugepages_of(host: FakeHost, name: str, uuid: str) -> dict[tuple[int, int], int]:
    return qemu_hugepages(numa_maps(host.proc, operations.qemu_of(host.config(), name, uuid)))


MAPS = """7f0000000000 default
7f1000000000 bind:1 file=/dev/hugepages/libvirt/qemu/1-vm1/qemu_back_mem._objects_ram-node0.abc huge dirty=100 \
N1=100 kernelpagesize_kB=2048
7f2000000000 default file=/usr/bin/qemu-system-x86_64 mapped=10 N0=10 kernelpagesize_kB=4
"""


def test_numa_maps_are_read_for_the_right_process(numa_host: FakeHost) -> None:
    fake_qemu(numa_host, 4242, U1, MAPS)
    fake_qemu(numa_host, 4343, U2, "", name="vm2", dom_id=2)
    assert hugepages_of(numa_host, "vm1", U1) == {(1, 2048): 100}
    assert hugepages_of(numa_host, "vm2", U2) == {}
    with pytest.raises(HostError, match="not the QEMU of"):
        hugepages_of(numa_host, "vm1", "99999999-2222-3333-4444-000000000001")


def test_an_auto_node_vm_is_adopted_where_its_pages_are(numa_host: FakeHost) -> None:
    """Re-planning "auto" against today's free memory would pick node 0 (more free): the wrong node shrunk at
    its stop, the right one leaked."""
    numa_host.set_free(0, 12 * 1024 * 1024)
    numa_host.set_free(1, 4 * 1024 * 1024)
    numa_host.set_pool(1, 2048, 128 + 6)  # its pages, and the admin's 6
    fake_qemu(numa_host, 4242, U1, MAPS)  # 100 faulted in on node 1, the rest not yet touched
    cfg = numa_host.config()
    rec = operations.adopt(parse_domain(domain_xml(uuid=U1)), cfg)
    assert rec is not None and rec.hugepages == {"node1/2048kB": 128}
    assert operations.ledger_for(cfg).read().pools["node1/2048kB"].baseline == 6
    operations.release(U1, cfg)
    assert (numa_host.pool(0), numa_host.pool(1)) == (0, 6)


def test_isolate_siblings_and_the_isolated_emulator_cpu_are_adopted(numa_host: FakeHost) -> None:
    """Dropping them let the next VM take a sibling of a vCPU that asked for a whole core."""
    cfg = numa_host.config(cpu_housekeeping=frozenset())
    xml = domain_xml(uuid=U1, backing="", tuning='<kvm:cpu policy="dedicated" threads="isolate" emulator="isolate"/>',
                     extra="<cputune><vcpupin vcpu='0' cpuset='1'/><vcpupin vcpu='1' cpuset='2'/>"
                           "<emulatorpin cpuset='3'/></cputune>")
    rec = operations.adopt(parse_domain(xml), cfg)
    # 1 and 2 with their siblings 9 and 10 (2 nodes x 4 cores x 2 threads), and the emulator's 3 alone
    assert rec is not None and rec.cpus == [1, 2, 3, 9, 10] and rec.emulator_cpu == 3
    other = domain_xml(uuid=U2, backing="", tuning='<kvm:cpu policy="dedicated"/>', vcpus=2)
    got = operations.prepare(parse_domain(other), cfg).record
    assert not set(got.cpus) & {1, 2, 3, 9, 10}


def test_reconnect_of_a_vm_disabled_live_keeps_its_cpus(host: FakeHost, tmp_path: Path) -> None:
    """A live enabled="no" seen at reconnect released the running VM's dedicated CPUs while it stayed pinned."""
    cfg = host.config(cpu_housekeeping=frozenset())
    on = domain_xml(uuid=U1, backing="", tuning='<kvm:cpu policy="dedicated"/>', vcpus=1)
    rec = operations.prepare(parse_domain(on), cfg).record
    off = on.replace(b'<kvm:tuning xmlns:kvm="http://kvmhooks.org/xmlns/domain/1.0">',
                     b'<kvm:tuning xmlns:kvm="http://kvmhooks.org/xmlns/domain/1.0" enabled="no">')
    operations.adopt(parse_domain(off), cfg)
    assert operations.ledger_for(cfg).read().domains[U1].cpus == rec.cpus


def test_memory_per_node_doctor_and_metrics(numa_host: FakeHost) -> None:
    """Where a running VM's memory is (numastat -p's data): status, the metrics and doctor read it."""
    from prometheus_client.parser import text_string_to_metric_families

    from kvmhooks.doctor import DomainFacts, check_memory_locality, read_host_facts
    from kvmhooks.metrics import render, state_registry
    from kvmhooks.topology import read_topology

    fake_qemu(numa_host, 4242, U1, MAPS + "7f3000000000 default anon=5000 dirty=5000 N1=3000 N0=2000 "
                                          "kernelpagesize_kB=4\n")
    mem = operations.vm_memory(numa_host.config(), "vm1", U1)
    assert mem == {1: {"huge": 100 * 2048, "normal": 3000 * 4}, 0: {"huge": 0, "normal": 10 * 4 + 2000 * 4}}
    cfg = numa_host.config(cpu_housekeeping=frozenset())
    # vCPUs pinned to node 0 (CPUs 0-3, 8-11), memory mostly on node 1: a finding
    xml = domain_xml(uuid=U1, extra="<cputune><vcpupin vcpu='0' cpuset='0'/><vcpupin vcpu='1' cpuset='1'/></cputune>")
    facts = DomainFacts("vm1", parse_domain(xml), active=True, memory=mem)
    (finding,) = check_memory_locality(read_host_facts(read_topology(numa_host.sysfs, numa_host.proc), cfg), facts)
    assert finding.check == "numa-locality" and "node 1 212M" in finding.what
    operations.prepare(parse_domain(domain_xml(uuid=U1)), cfg)
    families = {f.name: f for f in text_string_to_metric_families(render(state_registry(cfg)).decode())}
    got = {(s.labels["node"], s.labels["kind"]): s.value for s in families["kvmhooks_vm_memory_bytes"].samples}
    assert got[("1", "huge")] == 100 * 2048 * 1024 and got[("0", "normal")] == 2010 * 4 * 1024
