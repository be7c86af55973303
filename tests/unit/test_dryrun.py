"""`kvmhooks plan` is a dry run of the real code: on one host state, the plan's sysfs writes and libvirt calls
are exactly those a real prepare + started then makes (recorded by the same recorders around the real
adapters), and the plan itself changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmhooks import dryrun, operations
from kvmhooks.apply.live import apply_started
from kvmhooks.domain import parse_domain
from kvmhooks.log import VMLog
from tests.fakehost import FakeHost, FakeKernel, domain_xml
from tests.unit.test_live import FakeDom

pytest.importorskip("libvirt")
U1 = "11111111-2222-3333-4444-000000000001"
U2 = "11111111-2222-3333-4444-000000000002"
TUNING = ('<kvm:hugepages size="2M"/><kvm:cpu policy="dedicated" emulator="isolate"/>'
          '<kvm:memtune hard_limit="1G" soft_limit="512M"/><kvm:vcpus live="1"/>')


def calls(actions: list[dryrun.Action]) -> list[tuple[str, str]]:
    return [(a.phase, a.action) for a in actions if a.action.startswith(("write ", "libvirt "))]


def test_the_plan_is_what_a_real_start_does(tmp_path: Path) -> None:
    host = FakeHost(tmp_path, cores_per_node=6).build()
    host.set_pool(0, 2048, 10)
    kernel = FakeKernel(host)
    cfg = host.config(cpu_housekeeping=frozenset({0}))
    shared = domain_xml(name="floater", uuid=U2, tuning='<kvm:cpu policy="shared"/>', backing="")
    operations.prepare(parse_domain(shared), cfg, kernel.install())
    dom = parse_domain(domain_xml(uuid=U1, tuning=TUNING, vcpus=2, vcpu_attrs=""))
    ledger_before = cfg.ledger_path.read_bytes()

    planned = dryrun.plan(dom, cfg, persistent_domain=False)
    assert host.pool(0) == 10 and cfg.ledger_path.read_bytes() == ledger_before  # the plan changed nothing

    real: list[dryrun.Action] = []
    pools = dryrun.RecordingPools(cfg.sysfs_root, cfg.proc_root, real, inner=kernel.install())
    operations.prepare(dom, cfg, pools)
    me = dryrun.RecordingDomain(U1, real, False, 2, 6, inner=FakeDom(U1, b"", vcpus=2, ncpus=6))
    conn = dryrun.RecordingConn(6, {U1: me}, lambda u: dryrun.RecordingDomain(
        u, real, False, 2, 6, "floater", inner=FakeDom(u, b"", vcpus=2, ncpus=6)))
    apply_started(conn, me, dom, cfg, VMLog(dom.name, U1))

    assert calls(planned) == calls(real)
    texts = [a for _, a in calls(planned)]
    assert any(t.startswith("write ") and "nr_hugepages = 138 (now 10; +128 pages)" in t for t in texts)
    assert "libvirt setVcpusFlags(1, AFFECT_LIVE)" in texts
    assert "libvirt setMemoryParameters({'hard_limit': 1048576}, AFFECT_LIVE)" in texts
    assert any(t.startswith("libvirt pinVcpuFlags(0, ") and t.endswith("of floater") for t in texts)  # re-pinned
    assert host.pool(0) == 138


def test_a_transient_domain_is_never_pinned_with_affect_config(tmp_path: Path) -> None:
    """The old description said AFFECT_CONFIG for persist="yes" even where libvirt would refuse it."""
    host = FakeHost(tmp_path, cores_per_node=4).build()
    cfg = host.config(cpu_housekeeping=frozenset())
    dom = parse_domain(domain_xml(uuid=U1, backing="", tuning='<kvm:vcpupin vcpu="0" cpuset="2"/>'
                                                              '<kvm:cputune persist="yes"/>'))
    transient = [a for _, a in calls(dryrun.plan(dom, cfg, persistent_domain=False))]
    persistent = [a for _, a in calls(dryrun.plan(dom, cfg, persistent_domain=True))]
    assert "libvirt pinVcpuFlags(0, 2, AFFECT_LIVE)" in transient
    assert "libvirt pinVcpuFlags(0, 2, AFFECT_LIVE|AFFECT_CONFIG)" in persistent


def test_an_iothread_pin_is_planned_and_verified(tmp_path: Path) -> None:
    host = FakeHost(tmp_path, cores_per_node=4).build()
    dom = parse_domain(domain_xml(uuid=U1, backing="", extra="<iothreads>1</iothreads>",
                                  tuning='<kvm:iothreadpin iothread="1" cpuset="3"/>'))
    texts = [a for _, a in calls(dryrun.plan(dom, host.config(), persistent_domain=True))]
    assert texts == ["libvirt pinIOThread(1, 3, AFFECT_LIVE)"]


def test_the_planned_balloon_step_is_what_the_real_step_asks_libvirt(tmp_path: Path) -> None:
    """The plan runs apply_balloon itself (through a recording transport); the real step over libvirt makes
    the same calls in the same order on a guest whose driver is up and that gives memory back at once."""
    import libvirt

    from kvmhooks.apply.balloon import LibvirtBalloon, apply_balloon

    host = FakeHost(tmp_path, cores_per_node=2).build()
    dom = parse_domain(domain_xml(uuid=U1, backing="", tuning='<kvm:balloon target="192M" transport="libvirt"/>'))
    planned = [a for _, a in calls(dryrun.plan(dom, host.config(), persistent_domain=False))
               if not a.startswith("libvirt wait") and not a.startswith("libvirt verify")]

    made: list[str] = []

    class Guest:  # the libvirt calls LibvirtBalloon makes, answered like a guest with its driver up
        actual = dom.memory_kib

        def setMemoryStatsPeriod(self, period: int, flags: int) -> int:
            made.append(f"libvirt setMemoryStatsPeriod({period}, {dryrun.flag_names(flags)})")
            return 0

        def memoryStats(self) -> dict[str, int]:
            return {"actual": self.actual, "last_update": 1}

        def setMemoryFlags(self, kib: int, flags: int) -> int:
            made.append(f"libvirt setMemoryFlags({kib}, {dryrun.flag_names(flags)})")
            self.actual = kib
            return 0

    assert libvirt.VIR_DOMAIN_AFFECT_LIVE == 1
    assert dom.tuning is not None and dom.tuning.balloon is not None
    out = apply_balloon(dom, dom.tuning.balloon, Guest(), 1.0, VMLog(dom.name, U1),
                        opener=lambda d, s, ld, v: LibvirtBalloon(ld))
    assert out["actual"] == 192 * 1024
    assert planned == made == ["libvirt setMemoryStatsPeriod(2, AFFECT_LIVE)",
                               "libvirt setMemoryFlags(196608, AFFECT_LIVE)"]
