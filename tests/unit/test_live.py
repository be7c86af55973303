"""The worker's live tuning against a fake libvirt domain that remembers what it was told (libvirt's test
driver refuses live pins): pins applied exactly and verified by reading back, shared VMs never re-pinned onto
a dedicated CPU, the balloon step never skipped."""

from __future__ import annotations

from typing import Any

import pytest

from kvmhooks import operations
from kvmhooks.apply.libvirt import from_cpumap
from kvmhooks.domain import parse_domain
from kvmhooks.errors import ApplyError
from kvmhooks.ledger import Pins
from kvmhooks.log import VMLog
from tests.fakehost import FakeHost, domain_xml

libvirt = pytest.importorskip("libvirt")
U1 = "11111111-2222-3333-4444-000000000001"
U2 = "11111111-2222-3333-4444-000000000002"
NCPUS = 4


class FakeDom:
    """A running domain: stores pins as libvirt would, or (``sticky=False``) accepts and forgets them."""

    def __init__(self, uuid: str, xml: bytes, vcpus: int = 2, sticky: bool = True, ncpus: int = NCPUS):
        self.uuid, self.xml, self.sticky, self.ncpus = uuid, xml, sticky, ncpus
        self.vcpus = {v: frozenset(range(ncpus)) for v in range(vcpus)}
        self.emulator = frozenset(range(ncpus))
        self.calls: list[str] = []
        self.online = vcpus
        self.memtune: dict[str, int] = {}
        self.iothreads: dict[int, frozenset[int]] = {1: frozenset(range(ncpus))}

    def UUIDString(self) -> str:
        return self.uuid

    def name(self) -> str:
        return "vm"

    def XMLDesc(self, flags: int) -> str:
        return self.xml.decode()

    def state(self) -> tuple[int, int]:
        return libvirt.VIR_DOMAIN_RUNNING, 1

    def isActive(self) -> bool:
        return True

    def isPersistent(self) -> bool:
        return False

    def vcpusFlags(self, flags: int) -> int:
        return self.online

    def pinVcpuFlags(self, v: int, cpumap: tuple[bool, ...], flags: int) -> None:
        self.calls.append(f"vcpupin {v} {sorted(from_cpumap(cpumap))}")
        if self.sticky:
            self.vcpus[v] = from_cpumap(cpumap)

    def pinEmulator(self, cpumap: tuple[bool, ...], flags: int) -> None:
        self.calls.append(f"emulatorpin {sorted(from_cpumap(cpumap))}")
        if self.sticky:
            self.emulator = from_cpumap(cpumap)

    def setVcpusFlags(self, n: int, flags: int) -> None:
        self.calls.append(f"setvcpus {n}")
        self.online = n

    def setMemoryParameters(self, params: dict[str, int], flags: int) -> None:
        self.calls.append(f"memtune {params}")
        self.memtune.update(params)

    def memoryParameters(self, flags: int) -> dict[str, int]:
        return dict(self.memtune)

    def pinIOThread(self, i: int, cpumap: tuple[bool, ...], flags: int) -> None:
        self.calls.append(f"iothreadpin {i} {sorted(from_cpumap(cpumap))}")
        if self.sticky:
            self.iothreads[i] = from_cpumap(cpumap)

    def ioThreadInfo(self, flags: int) -> list[tuple[int, tuple[bool, ...]]]:
        return [(i, tuple(c in cs for c in range(self.ncpus))) for i, cs in sorted(self.iothreads.items())]

    def vcpuPinInfo(self, flags: int) -> list[tuple[bool, ...]]:
        return [tuple(i in cs for i in range(self.ncpus)) for v, cs in sorted(self.vcpus.items()) if v < self.online]

    def emulatorPinInfo(self, flags: int) -> tuple[bool, ...]:
        return tuple(i in self.emulator for i in range(self.ncpus))


class FakeConn:
    def __init__(self, *doms: FakeDom):
        self.doms = {d.uuid: d for d in doms}

    def getCPUMap(self, flags: int) -> tuple[int, list[bool], int]:
        return NCPUS, [True] * NCPUS, NCPUS

    def lookupByUUIDString(self, uuid: str) -> FakeDom:
        return self.doms[uuid]

    def close(self) -> None:
        pass


@pytest.fixture
def four(tmp_path: Any) -> FakeHost:
    return FakeHost(tmp_path, cores_per_node=4).build()


def test_pins_are_applied_exactly_and_read_back(four: FakeHost) -> None:
    from kvmhooks.apply.live import apply_pins

    dom = FakeDom(U1, b"")
    pins = Pins({0: frozenset({2}), 1: frozenset({3})}, frozenset({1}))
    vcpus, emulator = apply_pins(FakeConn(dom), dom, pins, False, VMLog("vm", U1))
    assert dom.calls == ["vcpupin 0 [2]", "vcpupin 1 [3]", "emulatorpin [1]"]
    assert (vcpus, emulator) == ({"0": "2", "1": "3"}, "1")


def test_a_pin_libvirt_accepts_but_does_not_keep_is_an_error(four: FakeHost) -> None:
    from kvmhooks.apply.live import apply_pins

    dom = FakeDom(U1, b"", sticky=False)
    with pytest.raises(ApplyError, match="vCPU 0 pin did not stick: asked 2, libvirt reports 0-3"):
        apply_pins(FakeConn(dom), dom, Pins({0: frozenset({2})}), False, VMLog("vm", U1))
    dom = FakeDom(U1, b"")
    dom.pinEmulator = lambda cpumap, flags: None  # type: ignore[method-assign]
    with pytest.raises(ApplyError, match="emulator pin did not stick"):
        apply_pins(FakeConn(dom), dom, Pins({0: frozenset({2})}, frozenset({1})), False, VMLog("vm", U1))


def test_a_shared_vm_is_never_re_pinned_onto_a_dedicated_cpu(four: FakeHost) -> None:
    from kvmhooks.apply.live import repin_shared

    cfg = four.config(cpu_housekeeping=frozenset({0}))
    shared_xml = domain_xml(uuid=U1, tuning='<kvm:cpu policy="shared"/>', backing="")
    dedicated_xml = domain_xml(uuid=U2, tuning='<kvm:cpu policy="dedicated"/>', backing="")
    operations.prepare(parse_domain(shared_xml), cfg)
    shared = FakeDom(U1, shared_xml)
    for v in (0, 1):
        shared.vcpus[v] = frozenset({1, 2, 3})
    rec = operations.prepare(parse_domain(dedicated_xml), cfg).record
    held = set(rec.cpus)
    assert len(held) == 2
    repin_shared(FakeConn(shared), cfg, VMLog("-", "-"))
    for v in (0, 1):
        assert shared.vcpus[v] == frozenset({1, 2, 3}) - held and not shared.vcpus[v] & held
    assert not shared.emulator & held
    st = operations.ledger_for(cfg).read().domains[U1]
    assert st.pins is not None and all(not cs & held for cs in st.pins.vcpus.values())


def test_the_worker_runs_the_balloon_step(four: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvmhooks import worker
    from kvmhooks.apply import balloon

    cfg = four.config()
    xml = domain_xml(uuid=U1, tuning='<kvm:vcpupin vcpu="0" cpuset="2"/><kvm:balloon target="75%"/>', backing="")
    operations.prepare(parse_domain(xml), cfg)
    dom = FakeDom(U1, xml)
    monkeypatch.setattr(libvirt, "open", lambda uri: FakeConn(dom))
    seen: list[int | None] = []

    def fake_balloon(d: Any, spec: Any, libvirt_dom: Any, timeout: float, vlog: Any) -> dict[str, Any]:
        seen.append(spec.target_kib)
        return {"transport": "libvirt", "driver": True, "target": spec.target_kib, "actual": spec.target_kib}

    monkeypatch.setattr(balloon, "apply_balloon", fake_balloon)
    assert worker.run_started(U1, cfg) == 0
    assert seen == [262144 * 75 // 100] and dom.vcpus[0] == {2}
    rec = operations.ledger_for(cfg).read().domains[U1]
    assert rec.state == "running" and rec.applied.pins["0"] == "2" and rec.applied.balloon["target"] == seen[0]


def test_iothread_pins_and_memtune_are_read_back_and_compared(four: FakeHost) -> None:
    from kvmhooks.apply.live import apply_memtune, apply_pins

    dom = FakeDom(U1, b"")
    apply_pins(FakeConn(dom), dom, Pins({0: frozenset({2})}, iothreads={1: frozenset({3})}), False, VMLog("vm", U1))
    assert dom.iothreads[1] == {3}
    dom = FakeDom(U1, b"")
    dom.pinIOThread = lambda i, cpumap, flags: None  # type: ignore[method-assign]
    with pytest.raises(ApplyError, match="iothread 1 pin did not stick: asked 3, libvirt reports 0-3"):
        apply_pins(FakeConn(dom), dom, Pins({0: frozenset({2})}, iothreads={1: frozenset({3})}), False,
                   VMLog("vm", U1))
    dom = FakeDom(U1, b"")
    got, problems = apply_memtune(dom, [("hard_limit", 1048576), ("soft_limit", 524288)], VMLog("vm", U1))
    assert got == {"hard_limit": 1048576, "soft_limit": 524288} and problems == []
    dom.setMemoryParameters = lambda params, flags: dom.memtune.update(  # type: ignore[method-assign]
        {k: v // 2 for k, v in params.items()})
    _, problems = apply_memtune(dom, [("hard_limit", 1048576)], VMLog("vm", U1))
    assert problems == ["memtune hard_limit: asked 1048576 KiB, libvirt reports 524288"]
