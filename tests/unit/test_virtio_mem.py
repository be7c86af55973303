"""virtio-mem (issue 9): the policy's decision mapped to a requested size, the transports against fakes
(libvirt's test driver has no virtio-mem), balloond following a guest that does or does not plug, and
annotate's XML edit (golden in/out) with validate/doctor's advice."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmhooks.annotate import AnnotateRequest, edit_domain_xml, normalize
from kvmhooks.apply.virtio_mem import LibvirtVirtioMem, QMPVirtioMem, open_virtio_mem, with_deadline
from kvmhooks.doctor import DomainFacts, check_balloon, domain_facts
from kvmhooks.domain import parse_domain
from kvmhooks.errors import ApplyError, KvmhooksError
from kvmhooks.plan.balloon import DEADBAND_KIB, GuestMem, HostMem, PolicyParams, decide, size_with
from kvmhooks.plan.virtio_mem import (
    FOLLOW_TIMEOUT_S,
    Pending,
    VirtioMemView,
    follow,
    guest_mem,
    requested_for,
)
from kvmhooks.topology import read_topology
from tests.fakehost import FakeHost, domain_xml

MIB = 1024
UUID = "11111111-2222-3333-4444-555555555555"


def view(requested: int = 256, current: int | None = None, size: int = 512, block: int = 2, base: int = 256) \
        -> VirtioMemView:
    return VirtioMemView(base * MIB, size * MIB, block * MIB, requested * MIB,
                         (requested if current is None else current) * MIB)


# --- the mapping ------------------------------------------------------------------------------------------

def test_a_target_is_rounded_up_to_the_block_and_kept_within_floor_and_size() -> None:
    v = view(requested=100, block=2)
    assert requested_for(v, (256 + 150) * MIB + 1, 256 * MIB, None) == 152 * MIB  # up: never less than asked
    assert requested_for(v, 2000 * MIB, 256 * MIB, None) == 512 * MIB  # never above the device
    assert requested_for(v, 100 * MIB, 256 * MIB, 10 * MIB) == 0  # never below base + 0 …
    assert requested_for(v, 100 * MIB, 300 * MIB, 10 * MIB) == 44 * MIB  # … nor below min (300 − 256)
    big = view(requested=0, block=128, size=1024)
    assert requested_for(big, (256 + 130) * MIB, 256 * MIB, None) == 256 * MIB  # 130 → two 128 MiB blocks


def test_a_shrink_never_goes_below_what_the_guest_uses_plus_the_cushion() -> None:
    v = view(requested=256)
    used = 400 * MIB  # more than the base: the device holds some of it
    keep = size_with(used, 0.20, 2 * 16 * MIB)
    req = requested_for(v, 300 * MIB, 256 * MIB, used)
    assert req is not None and 256 * MIB + req >= keep and req % (2 * MIB) == 0


def test_the_deadband_and_an_unchanged_request_ask_nothing_but_the_floor_is_always_restored() -> None:
    v = view(requested=200)
    assert requested_for(v, (256 + 200) * MIB, 256 * MIB, None) is None  # what is already requested
    assert requested_for(v, (256 + 204) * MIB, 256 * MIB, None) is None  # inside the deadband
    assert requested_for(v, (256 + 200) * MIB + DEADBAND_KIB, 256 * MIB, None) == 210 * MIB
    below = view(requested=40, current=40)
    assert requested_for(below, 256 * MIB, 300 * MIB, 10 * MIB) == 44 * MIB  # lift to min, though 4 MiB


@given(st.integers(0, 4096), st.integers(0, 512), st.integers(0, 512), st.sampled_from([2, 4, 128]),
       st.integers(0, 1024), st.one_of(st.none(), st.integers(0, 1024)))
def test_property_a_request_is_aligned_and_within_bounds(target: int, requested: int, current: int, block: int,
                                                         min_total: int, used: int | None) -> None:
    v = view(requested=requested // block * block, current=current, block=block)
    req = requested_for(v, target * MIB, (256 + min_total) * MIB, None if used is None else used * MIB)
    if req is None:
        return
    assert req % (block * MIB) == 0 and 0 <= req <= 512 * MIB
    assert req >= min(512 * MIB, min_total * MIB)  # the floor (min − base), unless the device is smaller
    if used is not None and req < v.current_kib:
        assert 256 * MIB + req >= min(size_with(used * MIB, 0.20, 32 * MIB), 256 * MIB + 512 * MIB)


def test_guest_mem_is_the_total_between_base_and_base_plus_size() -> None:
    g = guest_mem(view(requested=100, current=90), GuestMem(UUID, 256 * MIB, 768 * MIB, 128 * MIB))
    assert (g.actual_kib, g.max_kib, g.min_kib) == (346 * MIB, 768 * MIB, 256 * MIB)  # min below base: base


def test_the_policy_decides_on_totals_and_the_mapping_plugs_fast_and_unplugs_slowly() -> None:
    """The same pure policy as the balloon: pressure grows in one step, host pressure shrinks by a step."""
    params = PolicyParams(step_kib=100 * MIB, host_target=0.8, interval=1.0)
    v = view(requested=0, current=0)
    base = GuestMem(UUID, 256 * MIB, 768 * MIB, 256 * MIB, total_kib=250 * MIB, available_kib=10 * MIB,
                    stats_time=100.0)
    g = guest_mem(v, base)
    d = decide(HostMem(1000 * MIB, 100 * MIB), [g], {}, 101.0, params)  # host above target: still grows
    req = requested_for(v, d.targets[UUID], 256 * MIB, g.actual_kib - 10 * MIB)
    assert req is not None and req >= 100 * MIB and "pressure" in d.reasons[UUID]
    # Idle with plenty plugged, host above target, after the cooldown: one step down, not all at once.
    v2 = view(requested=400, current=400)
    g2 = guest_mem(v2, GuestMem(UUID, 256 * MIB, 768 * MIB, 256 * MIB, total_kib=650 * MIB,
                                available_kib=550 * MIB, stats_time=500.0))
    d2 = decide(HostMem(1000 * MIB, 100 * MIB), [g2], {}, 501.0, params)
    assert UUID not in d2.targets  # first sight: stats taken before the size was seen at rest do not count
    d2 = decide(HostMem(1000 * MIB, 100 * MIB), [replace(g2, stats_time=502.0)], d2.states, 502.5, params)
    assert requested_for(v2, d2.targets[UUID], 256 * MIB, 100 * MIB) == 300 * MIB


def test_follow_reports_a_guest_that_does_not_plug_once_and_clears_one_that_does() -> None:
    p = Pending(256 * MIB, 100.0, 0)
    assert follow(p, 0, 2 * MIB, 105.0) == (p, None, False)  # still within the timeout
    still, msg, bad = follow(p, 0, 2 * MIB, 100.0 + FOLLOW_TIMEOUT_S)
    assert bad and still is not None and msg is not None and "virtio_mem" in msg and "online_movable" in msg
    assert follow(still, 0, 2 * MIB, 200.0) == (still, None, False)  # said once
    done, msg, bad = follow(p, 255 * MIB, 2 * MIB, 101.0)
    assert done is None and not bad and msg is not None
    unplug = follow(Pending(0, 100.0, 256 * MIB), 200 * MIB, 2 * MIB, 200.0)
    assert unplug[2] and "unmovable" in str(unplug[1])


# --- the transports -----------------------------------------------------------------------------------------

def live_xml(requested: int, current: int, tuning: str | None = None, size: int = 512) -> bytes:
    dev = (f"<memory model='virtio-mem'><target><size unit='KiB'>{size * MIB}</size><node>0</node>"
           f"<block unit='KiB'>2048</block><requested unit='KiB'>{requested}</requested>"
           f"<current unit='KiB'>{current}</current></target><alias name='virtiomem0'/>"
           "<address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/></memory>")
    return domain_xml("vm1", UUID, (256 + size) * MIB, tuning=tuning, backing="",
                      devices="<memballoon model='virtio'/>" + dev,
                      extra="<cpu><numa><cell id='0' cpus='0-1' memory='262144' unit='KiB'/></numa></cpu>")


class FakeVirtioMemDom:
    """A running domain with one virtio-mem device: records updateDeviceFlags calls; the guest plugs what is
    requested at once when ``follows``, else keeps what it has."""

    def __init__(self, requested: int, tuning: str | None = None, follows: bool = True):
        self.requested = self.current = requested
        self.tuning, self.follows = tuning, follows
        self.calls: list[tuple[str, int]] = []
        self.active = True

    def isActive(self) -> bool:
        return self.active

    def state(self) -> list[int]:  # [state, reason] as libvirt's virDomainGetState: running
        return [1, 1]

    def XMLDesc(self, flags: int) -> str:
        return live_xml(self.requested, self.current, self.tuning).decode()

    def updateDeviceFlags(self, xml: str, flags: int) -> int:
        self.calls.append((xml, flags))
        el = parse_domain(live_xml(0, 0).replace(b"<memory model='virtio-mem'>", b"<x/><memory model='virtio-mem'>")
                          .split(b"<x/>")[0] + xml.encode() + b"</devices></domain>")
        self.requested = el.virtio_mem[0].requested_kib
        if self.follows:
            self.current = self.requested
        return 0


def test_libvirt_transport_sends_the_devices_own_xml_with_the_new_requested_size() -> None:
    import libvirt

    dom = FakeVirtioMemDom(256 * MIB)
    r = LibvirtVirtioMem(dom, "virtiomem0")
    assert r.read() == (256 * MIB, 256 * MIB)
    r.set_requested_kib(300 * MIB)
    (xml, flags), = dom.calls
    assert flags == libvirt.VIR_DOMAIN_AFFECT_LIVE
    assert "<alias name=\"virtiomem0\"/>" in xml and f'<requested unit="KiB">{300 * MIB}</requested>' in xml
    assert r.read() == (300 * MIB, 300 * MIB)
    with pytest.raises(ApplyError, match="no virtio-mem device 'other'"):
        LibvirtVirtioMem(dom, "other").read()


def test_a_libvirt_call_that_never_returns_is_abandoned_at_its_deadline() -> None:
    never = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(ApplyError, match="did not answer within 0.2 s"):
        with_deadline("update-memory-device", never.wait, 30, timeout=0.2)
    assert time.monotonic() - t0 < 2
    never.set()
    assert with_deadline("x", lambda: 7) == 7


class FakeQMP:
    def __init__(self) -> None:
        self.props = {"requested-size": 0, "size": 0}
        self.calls: list[tuple[str, dict[str, Any] | None]] = []

    def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        self.calls.append((cmd, args))
        assert args is not None and args["path"] == "/machine/peripheral/virtiomem0"
        if cmd == "qom-set":
            self.props[args["property"]] = args["value"]
            return {}
        return self.props[args["property"]]


def test_qmp_transport_only_when_asked_and_checks_the_reply() -> None:
    tuning = '<kvm:balloon policy="auto" min="256M" transport="{}"/>'
    fake = FakeQMP()
    d = parse_domain(live_xml(0, 0, tuning.format("libvirt")))
    assert open_virtio_mem(d, d.tuning.balloon, object(), fake)[1].transport == "libvirt"  # type: ignore[arg-type,union-attr]
    auto = parse_domain(live_xml(0, 0, tuning.format("auto")))
    assert open_virtio_mem(auto, auto.tuning.balloon, object(), fake)[1].transport == "libvirt"  # type: ignore[arg-type,union-attr]
    q = QMPVirtioMem(fake, "virtiomem0")  # type: ignore[arg-type]
    q.set_requested_kib(128 * MIB)
    assert fake.calls[-1] == ("qom-set", {"path": "/machine/peripheral/virtiomem0", "property": "requested-size",
                                          "value": 128 * MIB * 1024})
    assert q.read() == (128 * MIB, 0)
    fake.props["size"] = "lots"  # type: ignore[assignment]
    with pytest.raises(KvmhooksError, match="expected a byte count"):
        q.read()


def test_domain_reads_the_device_and_the_boot_memory() -> None:
    d = parse_domain(live_xml(100 * MIB, 98 * MIB))
    dev, = d.virtio_mem
    assert (dev.size_kib, dev.block_kib, dev.requested_kib, dev.current_kib, dev.node, dev.alias) == \
        (512 * MIB, 2 * MIB, 100 * MIB, 98 * MIB, 0, "virtiomem0")
    assert d.boot_memory_kib == 256 * MIB and d.memory_kib == 768 * MIB
    odd = parse_domain(live_xml(0, 0).replace(b"virtiomem0", b"x/../../evil"))
    assert odd.virtio_mem[0].alias is None  # never a QOM path from it


# --- balloond --------------------------------------------------------------------------------------------------

class StatsBalloon:
    """The balloon device of a virtio-mem guest: actual = the boot memory; stats see base + plugged."""

    transport = "fake"

    def __init__(self, dom: FakeVirtioMemDom, used: int):
        self.dom, self.used, self.clock = dom, used, 1_000

    def actual_kib(self) -> int:
        return 256 * MIB

    def set_target_kib(self, kib: int) -> None:
        raise AssertionError("a virtio-mem VM is never ballooned")

    def enable_stats(self, period: int) -> None:
        pass

    def guest_stats(self) -> dict[str, int]:
        self.clock += 2
        total = 256 * MIB + self.dom.current
        return {"last_update": self.clock, "total": total, "available": total - self.used}

    def close(self) -> None:
        pass


class Conn:
    def __init__(self, dom: FakeVirtioMemDom):
        self.dom = dom

    def lookupByUUIDString(self, uuid: str) -> FakeVirtioMemDom:
        return self.dom

    def isAlive(self) -> bool:
        return True


def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dom: FakeVirtioMemDom, used: int,
            host_avail_kib: int = 900000) -> tuple[Any, StatsBalloon]:
    from kvmhooks import balloond
    from kvmhooks.ledger import DomainRecord, Ledger

    host = FakeHost(tmp_path).build()
    (host.proc / "meminfo").write_text(f"MemTotal: 1000000 kB\nMemAvailable: {host_avail_kib} kB\n")
    cfg = host.config(balloon_interval=1.0, balloon_step_kib=200 * MIB)
    with Ledger(cfg.ledger_path).transaction() as s:
        s.domains[UUID] = DomainRecord(name="vm1", state="running")
    b = StatsBalloon(dom, used)
    monkeypatch.setattr(balloond, "open_balloon", lambda d, spec, dom, vlog, announce: b)
    return balloond.Service(cfg), b


def test_balloond_unplugs_an_idle_guest_slowly_and_plugs_at_once_under_pressure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dom = FakeVirtioMemDom(256 * MIB, tuning='<kvm:balloon policy="auto" min="256M" reclaim="idle"/>')
    svc, b = service(tmp_path, monkeypatch, dom, used=60 * MIB)
    seen = []
    for t in range(12):
        svc.cycle(Conn(dom), now=1000.0 + 2 * t)
        seen.append(dom.requested // MIB)
    assert seen[0] == 206 and seen[-1] == 0 and seen == sorted(seen, reverse=True)  # 50 MiB a cycle, to min
    assert all(x % 2 == 0 for x in seen)
    b.used = 250 * MIB  # a burst: 6 MiB available of 256
    svc.cycle(Conn(dom), now=1100.0)
    assert 256 * MIB + dom.current >= size_with(250 * MIB, 0.30, 3 * 16 * MIB)  # one step, cushion included
    assert len({c[0] for c in dom.calls}) == len(dom.calls)  # never the same request twice


def test_balloond_reports_a_guest_that_does_not_plug_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    dom = FakeVirtioMemDom(0, tuning='<kvm:balloon policy="auto" min="256M"/>', follows=False)
    svc, _ = service(tmp_path, monkeypatch, dom, used=250 * MIB)
    with caplog.at_level(logging.INFO):
        for t in range(40):
            svc.cycle(Conn(dom), now=1000.0 + t)
    assert dom.current == 0 and len(dom.calls) == 1  # asked once; the guest never plugged
    stalls = [r for r in caplog.records if "plugged 0 of the requested" in r.getMessage()]
    assert len(stalls) == 1 and stalls[0].levelno == logging.WARNING
    assert any("resizing it over libvirt instead of ballooning" in r.getMessage() for r in caplog.records)


# --- annotate, validate, doctor -------------------------------------------------------------------------------

PLAIN = domain_xml(name="web", tuning=None, backing="", devices="").decode()
GOLDEN = """<domain type="qemu">
  <name>web</name>
  <uuid>11111111-2222-3333-4444-555555555555</uuid>
  <metadata>
    <kvm:tuning xmlns:kvm="http://kvmhooks.org/xmlns/domain/1.0">
      <kvm:balloon policy="auto" min="256M"/>
    </kvm:tuning>
  </metadata>
  <maxMemory slots="16" unit="KiB">1310720</maxMemory>
  <memory unit="KiB">1310720</memory>
  <currentMemory unit="KiB">262144</currentMemory>
  <vcpu placement="static">2</vcpu>
  <cpu>
    <numa>
      <cell id="0" cpus="0-1" memory="262144" unit="KiB"/>
    </numa>
  </cpu>
  <os>
    <type arch="x86_64" machine="pc">hvm</type>
  </os>
  <devices>
    <memory model="virtio-mem">
      <target>
        <size unit="KiB">1048576</size>
        <node>0</node>
        <block unit="KiB">2048</block>
        <requested unit="KiB">0</requested>
      </target>
    </memory>
    <memballoon model="virtio" autodeflate="on"/>
  </devices>
</domain>
"""


def test_annotate_virtio_mem_golden_and_idempotent(host: FakeHost) -> None:
    topo = read_topology(host.sysfs, host.proc)
    edited = edit_domain_xml(PLAIN, AnnotateRequest(virtio_mem="1G"), topo)
    assert normalize(edited.xml) == GOLDEN
    assert any("memhp_default_state=online_movable" in n for n in edited.notes)
    again = edit_domain_xml(edited.xml, AnnotateRequest(virtio_mem="1G"), topo)
    assert normalize(again.xml) == GOLDEN
    resized = parse_domain(edit_domain_xml(edited.xml, AnnotateRequest(virtio_mem="512M"), topo).xml.encode())
    assert resized.memory_kib == 768 * MIB and resized.boot_memory_kib == 256 * MIB
    d = parse_domain(edited.xml.encode())
    assert d.tuning is not None and d.tuning.balloon is not None and d.tuning.balloon.min_kib == 256 * MIB
    removed = edit_domain_xml(edited.xml, AnnotateRequest(remove=True, remove_autodeflate=True), topo)
    assert parse_domain(removed.xml.encode()).virtio_mem  # the device stays: it is the VM's hardware


def test_annotate_virtio_mem_keeps_an_existing_numa_cell_and_balloon_and_refuses_nonsense(host: FakeHost) -> None:
    topo = read_topology(host.sysfs, host.proc)
    numa = domain_xml(name="web", tuning='<kvm:balloon policy="auto" min="300M"/>', backing="",
                      extra="<cpu mode='host-model'><numa><cell id='3' cpus='0-1' memory='262144' unit='KiB'/>"
                            "</numa></cpu>").decode()
    d = parse_domain(edit_domain_xml(numa, AnnotateRequest(virtio_mem="255M"), topo).xml.encode())
    assert len(d.cells) == 1 and d.virtio_mem[0].node == 3 and d.virtio_mem[0].size_kib == 256 * MIB
    assert d.tuning is not None and d.tuning.balloon is not None and d.tuning.balloon.min_kib == 300 * MIB
    for bad in ("lots", "0", "2GB"):
        with pytest.raises(KvmhooksError, match="--virtio-mem"):
            edit_domain_xml(PLAIN, AnnotateRequest(virtio_mem=bad), topo)


def test_validate_and_doctor_explain_the_guest_side(host: FakeHost) -> None:
    topo = read_topology(host.sysfs, host.proc)
    xml = edit_domain_xml(PLAIN, AnnotateRequest(virtio_mem="1G"), topo).xml.encode()
    found = {f.check: f for f in check_balloon(domain_facts("web", xml))}
    assert found["virtio-mem-guest"].severity == "warning" and "online_movable" in found["virtio-mem-guest"].fix
    assert "balloon-autodeflate" not in found  # nothing is inflated: no deflate-on-oom advice
    stuck = {f.check for f in check_balloon(DomainFacts("vm1", parse_domain(live_xml(256 * MIB, 0)), active=True))}
    assert "virtio-mem-follow" in stuck
    ok = {f.check for f in check_balloon(DomainFacts("vm1", parse_domain(live_xml(256 * MIB, 256 * MIB)),
                                                     active=True))}
    assert not ok & {"virtio-mem-follow", "virtio-mem-guest"}
    low = parse_domain(live_xml(0, 0, '<kvm:balloon policy="auto" min="128M"/>'))
    assert "virtio-mem-min" in {f.check for f in check_balloon(DomainFacts("vm1", low))}
