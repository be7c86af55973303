"""kvmhooksd on fake trees: the hook's socket handshake and its fallback, the lifecycle gate (tune on the
STARTED event, never while the hook runs), and live re-tuning through the ledger under prepare's rules."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from kvmhooks import agent as agent_mod
from kvmhooks import operations
from kvmhooks.agent import Agent, socket_path, tell
from kvmhooks.domain import parse_domain
from tests.fakehost import FakeHost, domain_xml
from tests.unit.test_hook import hook, prepare_unforked, write_config

libvirt = pytest.importorskip("libvirt")
U1 = "11111111-2222-3333-4444-000000000001"
U2 = "11111111-2222-3333-4444-000000000002"


@pytest.fixture
def agent(host: FakeHost) -> Any:
    a = Agent(host.config())
    a.serve()
    yield a
    a.stop.set()
    time.sleep(0.6)  # the accept loop polls every 0.5 s


def test_tell_without_an_agent_is_false_at_once(host: FakeHost) -> None:
    t0 = time.monotonic()
    assert tell(host.config(), U1) is False
    assert time.monotonic() - t0 < 0.05


def test_the_agent_takes_a_started_vm_and_refuses_anything_else(host: FakeHost, agent: Any) -> None:
    import socket

    assert tell(host.config(), U1) is True and U1 in agent.pending
    assert oct(socket_path(host.config()).stat().st_mode & 0o777) == "0o600"  # root only
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(socket_path(host.config())))
        s.sendall(b"started ../../etc/passwd\n")
        assert s.recv(16) == b"error\n"


class Dom:
    def __init__(self, uuid: str):
        self.uuid = uuid

    def UUIDString(self) -> str:
        return self.uuid


def test_tuning_waits_for_the_started_event(host: FakeHost, agent: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    tuned: list[str] = []
    monkeypatch.setattr(agent, "_tune", tuned.append)
    monkeypatch.setattr(agent, "_spawn", lambda job, uuid: job(uuid))
    agent._lifecycle(None, Dom(U1), libvirt.VIR_DOMAIN_EVENT_STARTED, 0, None)
    assert tuned == []  # not promised by a hook: not ours to tune
    assert tell(host.config(), U1)
    assert tuned == []  # promised, but the hook may still run: wait for the event
    agent._lifecycle(None, Dom(U1), libvirt.VIR_DOMAIN_EVENT_STARTED, 0, None)
    assert tuned == [U1] and U1 not in agent.pending
    assert tell(host.config(), U2)
    agent.pending[U2] -= 10  # an event that never came
    agent._missed_events()
    assert tuned == [U1, U2]


def test_the_started_hook_hands_over_to_a_running_agent(host: FakeHost, agent: Any) -> None:
    cfg = write_config(host, libvirt_uri='"test:///nonexistent"')
    xml = domain_xml(uuid=U1, tuning='<kvm:hugepages size="2M"/><kvm:vcpupin vcpu="0" cpuset="1"/>')
    prepare_unforked(cfg, xml)  # (as kvmhooksd serves it: no worker forked to wait for the start)
    assert hook(cfg, "vm1", "started", xml).returncode == 0
    assert U1 in agent.pending  # the agent has it; no worker (it would have failed on test:///nonexistent)
    time.sleep(0.3)
    assert not (host.root / "run/failures" / U1).exists()
    assert "handed to kvmhooksd" in (host.root / "kvmhooks.log").read_text()


SHARED = '<kvm:cpu policy="shared"/>'
DEDICATED = '<kvm:cpu policy="dedicated"/>'


def test_retune_switches_shared_to_dedicated_under_prepares_rules(tmp_path: Path) -> None:
    host = FakeHost(tmp_path, cores_per_node=4).build()
    cfg = host.config(cpu_housekeeping=frozenset({0}))
    operations.prepare(parse_domain(domain_xml(uuid=U1, tuning=SHARED, backing="")), cfg)
    other = operations.prepare(parse_domain(domain_xml(uuid=U2, tuning=DEDICATED, backing="", vcpus=1)), cfg)
    done = operations.retune(parse_domain(domain_xml(uuid=U1, tuning=DEDICATED, backing="")), cfg)
    assert done is not None and not done.pending_restart
    held = set(done.record.cpus)
    assert len(held) == 2 and not held & set(other.record.cpus) and not done.record.shared
    assert set(operations.ledger_for(cfg).read().domains[U1].cpus) == held
    back = operations.retune(parse_domain(domain_xml(uuid=U1, tuning=SHARED, backing="")), cfg)
    assert back is not None and back.record.cpus == [] and back.record.shared


def test_retune_never_half_applies_huge_pages(host: FakeHost) -> None:
    cfg = host.config()
    operations.prepare(parse_domain(domain_xml(uuid=U1)), cfg)
    done = operations.retune(parse_domain(domain_xml(uuid=U1, memory_kib=512 * 1024)), cfg)
    assert done is not None and "next start" in done.pending_restart[0]
    assert host.pool(0) == 128 and operations.ledger_for(cfg).read().domains[U1].hugepages == {"node0/2048kB": 128}


def test_an_invalid_live_edit_keeps_the_old_tuning_and_says_so(host: FakeHost) -> None:
    cfg = host.config()
    operations.prepare(parse_domain(domain_xml(uuid=U1, backing="", tuning='<kvm:vcpupin vcpu="0" cpuset="1"/>')),
                       cfg)
    bad = domain_xml(uuid=U1, backing="", tuning='<kvm:vcpupin vcpu="0" cpuset="99999"/>').decode()

    class Conn:
        def lookupByUUIDString(self, uuid: str) -> Any:
            class D:
                def name(self) -> str:
                    return "vm1"

                def XMLDesc(self, flags: int) -> str:
                    return bad
            return D()

    a = Agent(cfg)
    a.conn = Conn()
    a._retune(U1)
    rec = operations.ledger_for(cfg).read().domains[U1]
    assert rec.pins is not None and rec.pins.vcpus == {0: frozenset({1})}
    assert "live annotation change not applied" in (host.root / "run/failures" / U1).read_text()


def test_after_a_reconnect_an_unfinished_tuning_is_done(host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = host.config()
    xml = domain_xml(uuid=U1, tuning='<kvm:hugepages size="2M"/><kvm:vcpupin vcpu="0" cpuset="1"/>')
    operations.prepare(parse_domain(xml), cfg)
    operations.mark(U1, cfg, state="starting")  # the hook handed it over; nobody finished it
    operations.prepare(parse_domain(domain_xml(uuid=U2)), cfg)
    operations.mark(U2, cfg, state="running")

    class Conn:
        def lookupByUUIDString(self, uuid: str) -> Any:
            class D:
                def isActive(self) -> bool:
                    return True
            return D()

    a = Agent(cfg)
    a.conn = Conn()
    tuned: list[str] = []
    monkeypatch.setattr(a, "_spawn", lambda job, uuid: tuned.append(uuid) if job == a._tune else None)
    a.catch_up()
    assert tuned == [U1]


@pytest.mark.parametrize("mode", ["report", "restore"])
def test_a_hand_pin_is_reported_or_restored(tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.unit.test_live import FakeConn, FakeDom

    monkeypatch.setattr(agent_mod, "DRIFT_SETTLE", 0.0)
    host = FakeHost(tmp_path, cores_per_node=4).build()
    cfg = host.config(drift=mode)
    xml = domain_xml(uuid=U1, backing="", tuning='<kvm:vcpupin vcpu="0" cpuset="1"/><kvm:vcpupin vcpu="1" cpuset="2"/>')
    operations.prepare(parse_domain(xml), cfg)
    dom = FakeDom(U1, xml, vcpus=2)
    dom.vcpus = {0: frozenset({1}), 1: frozenset({2})}
    a = Agent(cfg)
    a.conn = FakeConn(dom)
    a._check_drift(U1)  # tuning not finished (ledger "prepared"): not judged
    assert not (host.root / "run/failures" / U1).exists()
    operations.mark(U1, cfg, state="running")
    a._check_drift(U1)  # as planned: nothing to say
    assert not (host.root / "run/failures" / U1).exists()
    dom.vcpus[0] = frozenset({3})  # the admin: virsh vcpupin vm1 0 3
    a._check_drift(U1)
    said = (host.root / "run/failures" / U1).read_text()
    assert "changed by hand: vCPU 0 on 3 (planned 1)" in said
    assert dom.vcpus[0] == ({1} if mode == "restore" else {3}) and ("restored" in said) == (mode == "restore")


def test_drift_and_metrics_settings_are_checked(tmp_path: Path) -> None:
    from kvmhooks.config import load_config
    from kvmhooks.errors import ConfigError

    f = tmp_path / "c.toml"
    for bad in ('drift = "fix"', 'metrics_listen = "9765"', 'metrics_listen = "host:port"'):
        f.write_text(bad + "\n")
        with pytest.raises(ConfigError):
            load_config(f)
    f.write_text('drift = "restore"\nmetrics_listen = "127.0.0.1:9765"\n')
    c = load_config(f)
    assert (c.drift, c.metrics_listen) == ("restore", "127.0.0.1:9765")


def test_the_periodic_drift_check_looks_at_every_managed_running_vm(host: FakeHost,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = host.config()
    pinned = '<kvm:hugepages size="2M"/><kvm:vcpupin vcpu="0" cpuset="1"/>'
    operations.prepare(parse_domain(domain_xml(uuid=U1, tuning=pinned)), cfg)
    operations.mark(U1, cfg, state="running")
    operations.prepare(parse_domain(domain_xml(uuid=U2, tuning=pinned)), cfg)  # still starting: not judged
    a = Agent(cfg)
    checked: list[str] = []
    monkeypatch.setattr(a, "_spawn", lambda job, uuid: checked.append(uuid))
    a.check_all_drift()
    assert checked == [U1]


@pytest.mark.parametrize("mode", ["report", "restore"])
def test_a_hand_memtune_is_reported_or_restored(tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`virsh memtune VM --hard-limit ...` by hand: libvirt sends no event for it, the periodic check finds it
    (a VM with memtune but no pins is checked too)."""
    from kvmhooks.apply.live import apply_started
    from kvmhooks.log import VMLog
    from tests.unit.test_live import FakeConn, FakeDom

    monkeypatch.setattr(agent_mod, "DRIFT_SETTLE", 0.0)
    host = FakeHost(tmp_path, cores_per_node=4).build()
    cfg = host.config(drift=mode)
    xml = domain_xml(uuid=U1, backing="", tuning='<kvm:memtune hard_limit="1G" soft_limit="512M"/>')
    d = parse_domain(xml)
    operations.prepare(d, cfg)
    dom = FakeDom(U1, xml, vcpus=2)
    conn = FakeConn(dom)
    applied = apply_started(conn, dom, d, cfg, VMLog("vm1", U1))
    operations.mark(U1, cfg, state="running", applied=applied)
    a = Agent(cfg)
    a.conn = conn
    seen: list[str] = []
    monkeypatch.setattr(a, "_spawn", lambda job, uuid: seen.append(uuid))
    a.check_all_drift()
    assert seen == [U1]  # no pins, but memtune: looked at
    a._check_drift(U1)
    assert not (host.root / "run/failures" / U1).exists()  # as set
    dom.memtune["hard_limit"] = 768 * 1024  # the admin: virsh memtune vm1 --hard-limit 768M --live
    a._check_drift(U1)
    said = (host.root / "run/failures" / U1).read_text()
    assert "changed by hand: memtune hard_limit 786432 KiB (set 1048576 KiB)" in said
    assert dom.memtune["hard_limit"] == (1048576 if mode == "restore" else 786432)
    assert ("restored" in said) == (mode == "restore")
    # Raised by hand: putting the lower planned limit back under a running guest could get QEMU killed, so
    # it is reported, never forced.
    dom.memtune["hard_limit"] = 2 * 1024 * 1024
    a._check_drift(U1)
    said = (host.root / "run/failures" / U1).read_text()
    assert "changed by hand: memtune hard_limit 2097152 KiB (set 1048576 KiB)" in said
    assert dom.memtune["hard_limit"] == 2097152
    assert ("not lowered back: memtune hard_limit" in said) == (mode == "restore")


def test_a_live_edit_of_a_fixed_balloon_target_is_applied(host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """`virsh metadata --live` moving <kvm:balloon target> re-runs the start's balloon step with the new target
    (over the libvirt transport here: the fake guest's driver is up and gives back what is asked)."""
    from tests.unit.test_live import FakeConn, FakeDom

    cfg = host.config()
    old = domain_xml(uuid=U1, backing="", tuning='<kvm:balloon target="200M" transport="libvirt"/>')
    operations.prepare(parse_domain(old), cfg)
    operations.mark(U1, cfg, state="running")
    new = domain_xml(uuid=U1, backing="", tuning='<kvm:balloon target="150M" transport="libvirt"/>')
    dom = FakeDom(U1, new, vcpus=2)
    asked: list[int] = []
    monkeypatch.setattr(dom, "setMemoryStatsPeriod", lambda period, flags: 0, raising=False)
    monkeypatch.setattr(dom, "memoryStats", lambda: {"actual": asked[-1] if asked else 262144, "last_update": 1},
                        raising=False)
    monkeypatch.setattr(dom, "setMemoryFlags", lambda kib, flags: asked.append(kib) or 0, raising=False)
    a = Agent(cfg)
    a.conn = FakeConn(dom)
    monkeypatch.setattr(a, "_spawn", lambda job, uuid: job(uuid))  # the balloon thread, here at once
    a._retune(U1)
    assert asked == [150 * 1024]
    rec = operations.ledger_for(cfg).read().domains[U1]
    assert rec.applied.balloon["target"] == rec.applied.balloon["actual"] == 150 * 1024


def test_a_saved_definition_with_another_annotation_shows_as_pending_restart(host: FakeHost) -> None:
    """`virsh edit` on a running VM changes only its saved definition: the DEFINED event makes the agent say
    so in status (pending restart), say when the saved one is invalid, and drop the line once they agree."""
    from tests.unit.test_live import FakeConn, FakeDom

    cfg = host.config()
    live = domain_xml(uuid=U1, backing="", tuning='<kvm:vcpupin vcpu="0" cpuset="1"/>')
    operations.prepare(parse_domain(live), cfg)
    operations.mark(U1, cfg, state="running")
    saved = {"xml": domain_xml(uuid=U1, backing="", tuning='<kvm:vcpupin vcpu="0" cpuset="2"/>')}

    class Dom(FakeDom):
        def XMLDesc(self, flags: int) -> str:
            return (saved["xml"] if flags else live).decode()  # VIR_DOMAIN_XML_INACTIVE: the saved one

        def isActive(self) -> bool:
            return True

    a = Agent(cfg)
    a.conn = FakeConn(Dom(U1, live, vcpus=2))

    def problems() -> list[str]:
        return operations.ledger_for(cfg).read().domains[U1].applied.problems

    a._defined(U1)
    assert problems() == [f"{agent_mod.SAVED_DIFFERS}: it applies at the next start, or now with "
                          "'kvmhooks annotate --live'"]
    saved["xml"] = domain_xml(uuid=U1, backing="", tuning='<kvm:vcpupin vcpu="0" cpuset="x"/>')
    a._defined(U1)
    (only,) = problems()
    assert "is invalid (the next start will be refused)" in only and "<kvm:vcpupin cpuset=...>" in only
    saved["xml"] = live
    a._defined(U1)
    assert problems() == []
