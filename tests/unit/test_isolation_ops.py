"""Host isolation through the operations the hooks run: prepare isolates, release shrinks or restores,
a crash anywhere is finished by the next operation, reconcile restores a host no isolating VM needs any
more, and `kvmhooks plan` lists the writes without making them.

The host's CPUs and pools are a FakeHost; its IRQs, masks, governors and cgroups are the isolation engine's
fake kernel (tests/unit/test_isolation.py), on a 4-CPU tree of its own.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

from kvmhooks import dryrun, operations
from kvmhooks.config import Config
from kvmhooks.domain import parse_domain
from kvmhooks.units import format_cpuset
from tests.fakehost import FakeHost, domain_xml
from tests.unit import test_isolation as iso

UA = "11111111-2222-3333-4444-00000000000a"
UB = "11111111-2222-3333-4444-00000000000b"
HOST = '<kvm:cpu policy="dedicated"/><kvm:host governor="performance"/>'


class World:
    """A FakeHost for the ledger, pools and CPU planner, and the isolation tree beside it."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch):
        self.host = FakeHost(tmp / "host", cores_per_node=4).build()
        self.cfg: Config = self.host.config(cpu_housekeeping=frozenset({0}))
        self.base = tmp / "iso"
        self.base.mkdir()
        iso.build(self.base)
        self.original = iso.snapshot(self.base)
        self.crash_at: int | None = None
        self.kernels: list[iso.FakeKernel] = []

        def settings(cfg: Config) -> iso.FakeKernel:
            k = iso.FakeKernel(self.base)
            k.crash_at, self.crash_at = self.crash_at, None  # one crash, in the next operation only
            self.kernels.append(k)
            return k

        monkeypatch.setattr(operations, "host_settings", settings)

    def xml(self, uuid: str, name: str, tuning: str = HOST) -> bytes:
        return domain_xml(name=name, uuid=uuid, tuning=tuning, backing="", vcpus=1)

    def prepare(self, uuid: str, name: str, tuning: str = HOST) -> operations.Prepared:
        return operations.prepare(parse_domain(self.xml(uuid, name, tuning)), self.cfg)

    def cpus(self, uuid: str) -> set[int]:
        return set(operations.ledger_for(self.cfg).read().domains[uuid].cpus)

    def affinity(self, irq: int) -> str:
        return iso.read(self.base, f"proc/irq/{irq}/smp_affinity_list")

    def shield(self) -> str | None:
        path = self.base / "cgroup/cpuset" / iso.SHIELD / "cpuset.cpus"
        return path.read_text().strip() if path.exists() else None

    def restored(self) -> bool:
        return iso.snapshot(self.base) == self.original and not operations.ledger_for(self.cfg).read().isolation


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    return World(tmp_path, monkeypatch)


def test_loading_an_isolating_record_imports_no_xml_parser(world: World) -> None:
    """Every ledger load checks a record's governor and the host's isolation section: neither brings lxml or
    the domain parser into every stop (the isolation plan shares the annotation's specs, not its parser)."""
    world.prepare(UA, "a")
    code = ("import sys; from kvmhooks.ledger import Ledger; from pathlib import Path; "
            "assert Ledger(Path(sys.argv[1])).read().domains[sys.argv[2]].isolation['governor'] == 'performance'; "
            "print(sorted(m for m in sys.modules if m.startswith('lxml') or m == 'kvmhooks.domain'))")
    r = subprocess.run([sys.executable, "-c", code, str(operations.ledger_for(world.cfg).path), UA],
                       capture_output=True, text=True, timeout=30, cwd=Path(__file__).resolve().parents[2])
    assert (r.returncode, r.stdout.strip()) == (0, "[]"), r.stderr


def test_two_isolating_vms_share_the_host_and_give_it_back_exactly(world: World) -> None:
    world.prepare(UA, "a")
    a = world.cpus(UA)
    assert len(a) == 1 and world.affinity(24) == format_cpuset(set(range(4)) - a)
    assert world.shield() == format_cpuset(set(range(4)) - a)
    world.prepare(UB, "b")
    b = world.cpus(UB)
    assert not a & b and world.affinity(24) == format_cpuset(set(range(4)) - a - b)
    state = operations.ledger_for(world.cfg).read()
    assert state.domains.summary().isolating == {UA, UB} and state.isolation["isolated"] == sorted(a | b)
    assert world.affinity(iso.EIO_IRQ) == "0-3" and f"irq:{iso.EIO_IRQ}" in state.isolation["unmovable"]
    operations.release(UA, world.cfg)  # a stops first: only its CPU comes back
    assert world.affinity(24) == format_cpuset(set(range(4)) - b) and not world.restored()
    operations.release(UB, world.cfg)
    assert world.restored()


def test_a_vm_without_host_isolation_changes_nothing_on_the_host(world: World) -> None:
    world.prepare(UA, "a", '<kvm:cpu policy="dedicated"/>')
    assert iso.snapshot(world.base) == world.original and not world.kernels  # not even read
    operations.release(UA, world.cfg)
    assert not world.kernels


def host_writes(world: World, op: str) -> int:
    """How many host writes one clean run of ``op`` makes (prepare of a, or the release of the last VM)."""
    world.prepare(UA, "a")
    if op == "prepare":
        n = world.kernels[-1].ops
        operations.release(UA, world.cfg)
    else:
        operations.release(UA, world.cfg)
        n = world.kernels[-1].ops
    assert world.restored()
    return n


@pytest.mark.parametrize("op", ["prepare", "release"])
def test_a_crash_at_every_host_write_is_finished_by_the_next_operation(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       op: str) -> None:
    n = host_writes(World(tmp_path / "count", monkeypatch), op)
    assert n > 5
    for k in range(1, n + 1):
        world = World(tmp_path / f"{op}-{k}", monkeypatch)
        if op == "release":
            world.prepare(UA, "a")
        world.crash_at = k
        with pytest.raises(iso.Crash):
            world.prepare(UA, "a") if op == "prepare" else operations.release(UA, world.cfg)
        with operations.session(world.cfg):  # what the next hook call (any VM) or `kvmhooks reconcile` does
            pass
        state = operations.ledger_for(world.cfg).read()
        assert not state.isolation.get("pending"), (op, k)
        if UA in state.domains:  # the prepare got as far as its record: isolated now, released below
            cpus = world.cpus(UA)
            assert world.affinity(24) == format_cpuset(set(range(4)) - cpus), (op, k)
            operations.release(UA, world.cfg)
        assert world.restored(), (op, k)


def test_reconcile_restores_the_host_when_the_isolating_vm_is_gone(world: World) -> None:
    world.prepare(UA, "a")
    token = operations.ledger_for(world.cfg).read().domains[UA].token
    plan = operations.reconcile(world.cfg, running={}, snapshot={UA: token}, dry_run=True, now=1e12)
    assert any(a.startswith("host isolation: set irq:24 to '0-3'") for a in plan.actions)
    assert not world.restored()  # the dry run wrote nothing
    out = operations.reconcile(world.cfg, running={}, snapshot={UA: token}, now=1e12)
    assert "host isolation brought in line with the running VMs" in out.actions
    assert world.restored()


def test_the_plan_lists_the_isolation_writes_and_makes_none(world: World) -> None:
    actions = [a.action for a in dryrun.plan(parse_domain(world.xml(UA, "a")), world.cfg, persistent_domain=True)]
    assert "host isolation: set irq:24 to '0-2'" in actions or "host isolation: set irq:24 to '0,2-3'" in actions
    assert any(a.startswith("host isolation: set tasks to ") for a in actions)
    assert iso.snapshot(world.base) == world.original and not operations.ledger_for(world.cfg).path.exists()


def ledger_writes(world: World, op: str) -> int:
    from kvmhooks.ledger import Ledger

    count = {"n": 0}
    real = Ledger._write

    def counting(self: Ledger, text: str) -> None:
        count["n"] += 1
        real(self, text)

    world.prepare(UA, "a") if op == "release" else None
    Ledger._write = counting  # type: ignore[method-assign]
    try:
        world.prepare(UA, "a") if op == "prepare" else operations.release(UA, world.cfg)
    finally:
        Ledger._write = real  # type: ignore[method-assign]
    if op == "prepare":
        operations.release(UA, world.cfg)
    assert world.restored()
    return count["n"]


@pytest.mark.parametrize("op", ["prepare", "release"])
def test_a_failing_ledger_write_at_every_commit_is_finished_by_the_next_operation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, op: str) -> None:
    """ENOSPC on /run at the k-th durable commit of an isolating prepare or release: the operation fails, or
    goes on without isolation when only an isolation commit failed (best effort), and what it changed on the
    host is brought in line by the next operation; in the end the host is exactly as the admin left it."""
    import errno

    from kvmhooks.errors import KvmhooksError
    from kvmhooks.ledger import Ledger

    n = ledger_writes(World(tmp_path / "count", monkeypatch), op)
    assert n >= 2
    for k in range(1, n + 1):
        world = World(tmp_path / f"{op}-{k}", monkeypatch)
        if op == "release":
            world.prepare(UA, "a")
        real = Ledger._write

        def failing(self: Ledger, text: str, at: list[int] = [k], real: object = real) -> None:  # noqa: B006
            at[0] -= 1
            if at[0] == 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            real(self, text)  # type: ignore[operator]

        monkeypatch.setattr(Ledger, "_write", failing)
        with contextlib.suppress(OSError, KvmhooksError):
            world.prepare(UA, "a") if op == "prepare" else operations.release(UA, world.cfg)
        monkeypatch.setattr(Ledger, "_write", real)
        with operations.session(world.cfg):
            pass
        if UA in operations.ledger_for(world.cfg).read().domains:
            operations.release(UA, world.cfg)
        assert world.restored(), (op, k)


def test_status_and_host_show_the_isolated_cpus_and_who_holds_them(world: World) -> None:
    from kvmhooks.cli.render import cpu_map, isolation_lines, isolation_view

    world.prepare(UA, "a")
    world.prepare(UB, "b", '<kvm:cpu policy="dedicated"/>')  # dedicated, host not kept off
    state = operations.ledger_for(world.cfg).read()
    (a,), (b,) = state.domains[UA].cpus, state.domains[UB].cpus
    view = isolation_view(world.cfg, state)
    assert view["isolated"] == str(a) and list(view["holders"]) == ["a"] and view["holders"]["a"]["governor"] \
        == "performance"
    line, unmovable, skipped = isolation_lines(view)
    assert line.startswith(f"host isolation: CPUs {a} isolated for a ({a}); tasks via cgroup1")
    assert unmovable == f"  left where the kernel keeps them: irq:{iso.EIO_IRQ}, irq:{iso.STUCK_IRQ}"
    assert skipped == "  1 task(s) could not be moved (per-CPU or exiting)"  # the one exiting meanwhile
    picture = cpu_map(operations.topology_for(world.cfg), world.cfg, state)
    assert picture.splitlines()[0] == "node0: " + " ".join(
        f"[{c}{'H' if c == 0 else 'A' if c == a else 'b' if c == b else '.'}]" for c in range(4))
    assert f"  a = a ({a})" in picture and f"  b = b ({b})" in picture
    operations.release(UA, world.cfg)
    operations.release(UB, world.cfg)
    assert isolation_lines(isolation_view(world.cfg, operations.ledger_for(world.cfg).read())) == []


def test_doctor_gives_the_isolation_advice() -> None:
    from kvmhooks.doctor import HostFacts, check_isolation, domain_facts
    from kvmhooks.topology import HostTopology

    topo = HostTopology({}, {}, frozenset(), 2048, {})
    iso_vm = domain_facts("rt", domain_xml(name="rt", tuning=HOST, backing=""))
    gig = domain_facts("big", domain_xml(name="big", tuning='<kvm:hugepages size="1G"/>',
                                         backing="<hugepages><page size='1' unit='G'/></hugepages>"))
    plain = domain_facts("plain", domain_xml(name="plain", tuning=None, backing=""))

    def checks(cmdline: str, thp: str, irqbalance: bool, *doms: object) -> set[str]:
        facts = HostFacts(topo, 0, 0, 0, cmdline, thp, irqbalance)
        return {f.check for f in check_isolation(facts, list(doms), frozenset({3}))}  # type: ignore[arg-type]

    assert checks("ro quiet", "always", True, iso_vm, gig) == {"isolcpus", "hugetlb-cma", "thp", "irqbalance"}
    assert checks("isolcpus=3 hugetlb_cma=4G", "madvise", False, iso_vm, gig) == set()
    assert checks("ro", "never", False, plain) == {"thp"}  # no huge page backing: THP would help
    assert checks("ro", "madvise", True, plain) == set()  # irqbalance matters only with isolation
