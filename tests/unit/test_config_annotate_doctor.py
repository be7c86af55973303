"""Host config parsing, `annotate`'s XML editing, and the doctor's checks on fake trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmhooks.annotate import AnnotateRequest, edit_domain_xml, normalize
from kvmhooks.config import Config, load_config
from kvmhooks.doctor import DomainFacts, check_balloon, check_domain, check_host, domain_facts, read_host_facts
from kvmhooks.domain import parse_domain
from kvmhooks.errors import ConfigError, KvmhooksError
from kvmhooks.topology import read_topology
from tests.fakehost import GIB, FakeHost, domain_xml


def test_config_defaults_and_values(tmp_path: Path) -> None:
    assert load_config(tmp_path / "missing.toml") == Config()
    f = tmp_path / "c.toml"
    f.write_text('lock_timeout = 5\nhost_reserve = "2G"\nleave_alone = ["node0/1G", "node1/2048kB"]\n'
                 'balloon_step = "50M"\n[cpu]\nallowed = "2-7"\nhousekeeping = ""\n')
    c = load_config(f)
    assert c.lock_timeout == 5 and c.host_reserve_kib == 2 * GIB and c.balloon_step_kib == 50 * 1024
    assert c.leave_alone == {"node0/1048576kB", "node1/2048kB"}
    assert c.cpu_allowed == frozenset(range(2, 8)) and c.cpu_housekeeping == frozenset()


@pytest.mark.parametrize("text", ['lock_timout = 5', 'lock_timeout = "soon"', 'host_reserve = "lots"',
                                  'leave_alone = "node0/2M"', 'leave_alone = ["nodeX/2M"]', '[cpu]\nallowed = "x"',
                                  '[cpu]\npinned = "1"', "lock_timeout = [", "lock_timeout = true"])
def test_config_errors_name_the_setting(tmp_path: Path, text: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text + "\n")
    with pytest.raises(ConfigError, match=str(f)):
        load_config(f)


# --- annotate -------------------------------------------------------------------------------------------

PLAIN = domain_xml(name="web", tuning=None, backing="").decode()


def test_annotate_adds_and_remove_takes_exactly_that_away(host: FakeHost) -> None:
    topo = read_topology(host.sysfs, host.proc)
    req = AnnotateRequest(hugepages="2M", cpu="dedicated", balloon="75%", qmp=True)
    edited = edit_domain_xml(PLAIN, req, topo)
    dom = parse_domain(edited.xml.encode())
    assert dom.tuning is not None and dom.tuning.cpu is not None and dom.hugepage_backing and edited.added_backing
    assert dom.qmp_socket is not None and dom.tuning.balloon is not None
    again = edit_domain_xml(edited.xml, req, topo)  # idempotent: one of each
    assert normalize(again.xml) == normalize(edited.xml)
    assert dom.balloon_autodeflate and edited.added_autodeflate and not again.added_autodeflate
    removed = edit_domain_xml(edited.xml, AnnotateRequest(remove=True, remove_backing=True,
                                                          remove_autodeflate=True), topo)
    assert normalize(removed.xml) == normalize(PLAIN)


def test_annotate_balloon_turns_on_deflate_on_oom_and_offers_free_page_reporting(host: FakeHost) -> None:
    topo = read_topology(host.sysfs, host.proc)
    edited = edit_domain_xml(PLAIN, AnnotateRequest(balloon="75%"), topo)
    dom = parse_domain(edited.xml.encode())
    assert dom.balloon_autodeflate and not dom.balloon_free_page_reporting
    assert any("freePageReporting='on'" in n for n in edited.notes)
    asked = edit_domain_xml(PLAIN, AnnotateRequest(balloon="75%", free_page_reporting=True), topo)
    assert parse_domain(asked.xml.encode()).balloon_free_page_reporting and not asked.notes
    # No balloon device in the XML: the virtio one libvirt would add, with the defence.
    bare = domain_xml(name="bare", tuning=None, backing="", devices="").decode()
    assert parse_domain(edit_domain_xml(bare, AnnotateRequest(balloon="50%"), topo).xml.encode()).balloon_autodeflate
    # Not offered, and refused, where it cannot work: huge page backing, a VFIO device.
    backed = edit_domain_xml(PLAIN, AnnotateRequest(hugepages="2M", balloon="75%"), topo)
    assert parse_domain(backed.xml.encode()).balloon_autodeflate and not backed.notes
    vfio = domain_xml(name="gpu", tuning=None, backing="", devices="<memballoon model='virtio'/><hostdev "
                      "mode='subsystem' type='pci' managed='yes'><source><address domain='0' bus='1' slot='0' "
                      "function='0'/></source></hostdev>").decode()
    assert not edit_domain_xml(vfio, AnnotateRequest(balloon="75%"), topo).notes
    for xml, req in ((PLAIN, AnnotateRequest(hugepages="2M", free_page_reporting=True)),
                     (vfio, AnnotateRequest(free_page_reporting=True))):
        with pytest.raises(KvmhooksError, match="free page reporting cannot work"):
            edit_domain_xml(xml, req, topo)


def test_annotate_keeps_an_admins_own_backing_and_metadata(host: FakeHost) -> None:
    topo = read_topology(host.sysfs, host.proc)
    own = domain_xml(name="db", tuning=None).decode().replace(
        "<memory", "<metadata><app xmlns='http://example.org/app'/></metadata><memory", 1)
    edited = edit_domain_xml(own, AnnotateRequest(hugepages="2M"), topo)
    assert not edited.added_backing
    removed = edit_domain_xml(edited.xml, AnnotateRequest(remove=True, remove_backing=False), topo)
    assert normalize(removed.xml) == normalize(own)


def test_annotate_1g_adds_the_page_size(host: FakeHost) -> None:
    topo = read_topology(host.sysfs, host.proc)
    xml = domain_xml(name="big", tuning=None, backing="", memory_kib=2 * GIB).decode()
    edited = edit_domain_xml(xml, AnnotateRequest(hugepages="auto"), topo)
    assert parse_domain(edited.xml.encode()).backing_page_kib == (1048576,)  # whole GiB and 1G mounted


# --- doctor ---------------------------------------------------------------------------------------------

def facts(host: FakeHost) -> tuple[object, Config]:
    cfg = host.config()
    return read_host_facts(read_topology(host.sysfs, host.proc), cfg), cfg


def checks(host: FakeHost, xml: bytes, running_vcpus: int = 0, active: bool = False) -> set[str]:
    f, cfg = facts(host)
    return {x.check for x in check_domain(f, DomainFacts("vm", parse_domain(xml), active=active), cfg,  # type: ignore[arg-type]
                                           running_vcpus)}


def test_doctor_host_checks_only_matter_on_numa_hosts(tmp_path: Path) -> None:
    host = FakeHost(tmp_path / "one").build()
    numa_host = FakeHost(tmp_path / "two", nodes=2).build()
    for h in (host, numa_host):
        (h.proc / "sys/kernel").mkdir(parents=True, exist_ok=True)
        (h.proc / "sys/kernel/numa_balancing").write_text("1\n")
    f1, _ = facts(host)
    f2, _ = facts(numa_host)
    assert check_host(f1, []) == []  # type: ignore[arg-type]
    assert [x.check for x in check_host(f2, [])] == ["numa-balancing"]  # type: ignore[arg-type]


def test_doctor_domain_checks(numa_host: FakeHost) -> None:
    kvm = domain_xml(tuning=None, backing="").replace(b"type='qemu'", b"type='kvm'")
    assert "cpu-mode" in checks(numa_host, kvm)
    good_cpu = kvm.replace(b"<os>", b"<cpu mode='host-model'/><os>")
    assert "cpu-mode" not in checks(numa_host, good_cpu)
    wide = domain_xml(tuning=None, backing="", vcpus=12)
    assert "numatune" in checks(numa_host, wide)
    assert "numatune" not in checks(numa_host, wide.replace(
        b"<os>", b"<numatune><memory mode='strict' nodeset='0'/></numatune><os>"))
    assert "pinning" in checks(numa_host, domain_xml(tuning=None, backing=""), running_vcpus=40)
    assert "pinning" not in checks(numa_host, domain_xml(tuning="<kvm:cpu policy='shared'/>", backing=""),
                                   running_vcpus=40)
    assert "memtune" in checks(numa_host, domain_xml(tuning="<kvm:memtune hard_limit='256M'/>", backing=""))
    assert "hugepages" in checks(numa_host, domain_xml(tuning=None))  # backed, no pages free, not kvmhooks'
    assert "hugepages" in checks(numa_host, domain_xml(memory_kib=64 * GIB))  # ours, but cannot fit


def test_doctor_balloon_defences(numa_host: FakeHost) -> None:
    auto = domain_xml(tuning='<kvm:balloon policy="auto" min="128M"/>', backing="")
    assert "balloon-autodeflate" in checks(numa_host, auto)
    defended = auto.replace(b"<memballoon model='virtio'/>", b"<memballoon model='virtio' autodeflate='on'/>")
    assert "balloon-autodeflate" not in checks(numa_host, defended)
    fixed = domain_xml(tuning='<kvm:balloon target="75%"/>', backing="")
    assert "balloon-autodeflate" not in checks(numa_host, fixed)  # a fixed target cannot starve a guest by surprise
    # Free page reporting: advised (info) for a plain VM, not for huge pages, a VFIO device, or when it is on.
    found = {f.check: f for f in check_balloon(domain_facts("vm", auto))}
    assert found["free-page-reporting"].severity == "info"
    assert "free-page-reporting" not in checks(numa_host, domain_xml(tuning=None))  # hugepage-backed
    vfio = domain_xml(tuning=None, backing="", devices="<memballoon model='virtio'/><hostdev mode='subsystem' "
                      "type='pci' managed='yes'><source><address domain='0' bus='1' slot='0' function='0'/>"
                      "</source></hostdev>")
    assert domain_facts("gpu", vfio).vfio and not check_balloon(domain_facts("gpu", vfio))
    on = domain_xml(tuning=None, backing="", devices="<memballoon model='virtio' freePageReporting='on'/>")
    assert not check_balloon(domain_facts("vm", on))
    assert domain_facts("bad", b"<domain>").domain is None


def test_remove_undoes_the_cputune_that_persist_yes_wrote(host: FakeHost) -> None:
    """persist="yes" makes the worker write the pins into the persistent <cputune>; --remove takes them back
    and leaves the admin's own <cputune> settings."""
    topo = read_topology(host.sysfs, host.proc)
    persisted = domain_xml(name="web", backing="", tuning='<kvm:cpu policy="dedicated"/><kvm:cputune persist="yes"/>',
                           extra="<cputune><shares>2048</shares><vcpupin vcpu='0' cpuset='1'/>"
                                 "<vcpupin vcpu='1' cpuset='2'/><emulatorpin cpuset='1'/></cputune>").decode()
    removed = edit_domain_xml(persisted, AnnotateRequest(remove=True), topo).xml
    assert "<cputune><shares>2048</shares></cputune>" in removed and "vcpupin" not in removed
    only_pins = persisted.replace("<shares>2048</shares>", "")
    assert "cputune" not in edit_domain_xml(only_pins, AnnotateRequest(remove=True), topo).xml
    not_ours = persisted.replace(' persist="yes"', ' persist="no"')  # pins the admin wrote: left alone
    assert "<vcpupin vcpu=\"0\" cpuset=\"1\"/>" in edit_domain_xml(not_ours, AnnotateRequest(remove=True), topo).xml
