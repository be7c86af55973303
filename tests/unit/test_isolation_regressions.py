"""Regressions from the adversarial review of host isolation: each test is a reproduction that failed before
its fix, now stating what a correct kvmhooks does."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvmhooks import dryrun, operations
from kvmhooks.annotation import HostSpec
from kvmhooks.apply.pools import SysfsPools
from kvmhooks.domain import parse_domain
from kvmhooks.errors import ApplyError, LedgerError
from kvmhooks.plan.isolation import IsolationTarget, target_for
from kvmhooks.units import format_cpuset
from tests.fakehost import domain_xml
from tests.unit import test_isolation as iso
from tests.unit.test_isolation_ops import HOST, UA, UB, World


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    return World(tmp_path, monkeypatch)


def named_badly(world: World, in_root_tasks: bool) -> None:
    """Any user: printf '\\xff' > /proc/self/comm (a name that is not UTF-8)."""
    d = world.base / "proc/600"
    d.mkdir()
    (d / "comm").write_bytes(b"\xff\n")
    (d / "stat").write_bytes(b"600 (\xff) S 1 600 600 0 -1 4194560 0 0 0 0\n")
    if in_root_tasks:
        tasks = world.base / "cgroup/cpuset/tasks"
        tasks.write_text(tasks.read_text() + "600\n")


@pytest.mark.parametrize("in_root_tasks", [False, True])
def test_a_process_name_that_is_not_utf8_changes_nothing(world: World, in_root_tasks: bool) -> None:
    named_badly(world, in_root_tasks)
    world.original = iso.snapshot(world.base)
    world.prepare(UA, "a")  # the isolating VM starts, and its host is isolated
    (cpu,) = world.cpus(UA)
    assert world.affinity(24) == format_cpuset(set(range(4)) - {cpu})
    assert not operations.ledger_for(world.cfg).read().isolation.get("pending")
    if in_root_tasks:  # the oddly named task is an ordinary task: it moves like the others
        assert "600" in (world.base / "cgroup/cpuset" / iso.SHIELD / "tasks").read_text().split()
    world.prepare(UB, "b", '<kvm:cpu policy="dedicated"/>')  # another VM is not disturbed either
    operations.release(UA, world.cfg)
    operations.release(UB, world.cfg)
    assert world.restored()


def edit_header(world: World, change: Callable[[dict[str, Any]], None]) -> None:
    path = operations.ledger_for(world.cfg).path
    head, _, rest = path.read_text().partition("\n")
    h = json.loads(head)
    change(h)
    path.write_text(json.dumps(h, separators=(",", ":")) + "\n" + rest)


def test_a_corrupt_isolation_section_is_a_ledger_error_that_reconcile_repairs(world: World) -> None:
    world.prepare(UA, "a")
    edit_header(world, lambda h: h["isolation"].__setitem__("skipped_tasks", -1))
    with pytest.raises(LedgerError, match="isolation.skipped_tasks"):
        operations.ledger_for(world.cfg).read()  # at load, where `kvmhooks reconcile` sees it
    out = operations.reconcile(world.cfg, running={}, snapshot={}, now=1e12)
    assert out.set_aside is not None
    operations.ledger_for(world.cfg).read()  # readable again


def test_a_phantom_isolating_uuid_in_the_summary_fails_nothing(world: World) -> None:
    world.prepare(UA, "a", '<kvm:cpu policy="dedicated"/>')
    edit_header(world, lambda h: h["summary"].__setitem__("isolating", ["ffffffff-0000-0000-0000-000000000000"]))
    world.prepare(UB, "b", '<kvm:cpu policy="dedicated"/>')
    assert iso.snapshot(world.base) == world.original


def test_the_plan_never_writes_the_host_even_with_an_interrupted_change(world: World) -> None:
    world.crash_at = 3  # an isolating prepare dies after its intents
    with pytest.raises(iso.Crash):
        world.prepare(UA, "a")
    assert operations.ledger_for(world.cfg).read().isolation.get("pending")
    before = iso.snapshot(world.base)
    dryrun.plan(parse_domain(world.xml(UB, "b", '<kvm:cpu policy="dedicated"/>')), world.cfg,
                persistent_domain=True)
    assert iso.snapshot(world.base) == before


def test_a_release_that_fails_after_its_commit_still_gives_the_host_back(world: World,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The VM's removal is committed, then its pool write fails: the isolation step never ran. The next
    operation on any VM sees the records ask for less than what is applied, and converges."""
    operations.prepare(parse_domain(domain_xml(name="a", uuid=UA, tuning=HOST + '<kvm:hugepages size="2M"/>',
                                               vcpus=1)), world.cfg)
    operations.prepare(parse_domain(domain_xml(name="b", uuid=UB, tuning='<kvm:hugepages size="2M"/>')),
                       world.cfg)
    real = SysfsPools.set
    calls = {"n": 0}

    def failing(self: SysfsPools, node: int, size: int, count: int) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ApplyError("EIO writing nr_hugepages")
        return real(self, node, size, count)

    monkeypatch.setattr(SysfsPools, "set", failing)
    with pytest.raises(ApplyError):
        operations.release(UA, world.cfg)
    operations.release(UB, world.cfg)
    assert world.restored()


def test_one_task_the_kernel_refuses_does_not_stop_the_others(tmp_path: Path) -> None:
    """A SCHED_DEADLINE task (EBUSY: its bandwidth does not fit the smaller cpuset) is skipped and counted."""

    class DeadlineTask(iso.FakeKernel):
        def _write_file(self, path: Path, text: str) -> None:
            if path.name == "tasks" and text == "1" and iso.SHIELD in path.parts:
                self._tick()
                raise OSError(errno.EBUSY, "Device or resource busy")
            super()._write_file(path, text)

    iso.build(tmp_path)
    ledger = iso.Ledger()
    report = iso.converge(ledger.state, iso.BOTH, DeadlineTask(tmp_path), ledger.commit)
    assert report.ok and report.tasks_skipped == 2  # pid 1 (EBUSY) and the exiting one (ESRCH)
    assert 101 in iso._pids(tmp_path / "cgroup/cpuset" / iso.SHIELD / "tasks")


def test_no_stale_intent_when_the_admin_puts_a_value_back_by_hand(tmp_path: Path) -> None:
    iso.build(tmp_path)
    ledger = iso.Ledger()
    iso.run(tmp_path, ledger, iso.BOTH)
    for _ in range(2):  # the admin puts IRQ 24 back while isolated; the next operation moves it off again
        (tmp_path / "proc/irq/24/smp_affinity_list").write_text("0-3\n")
        report = iso.run(tmp_path, ledger, iso.BOTH)
        assert report is not None and report.ok and report.changed == ("irq:24",)
        assert not ledger.disk.pending


def test_a_ledger_set_aside_keeps_the_admins_original_host_settings(world: World) -> None:
    world.prepare(UA, "a")
    (cpu,) = world.cpus(UA)
    path = operations.ledger_for(world.cfg).path
    path.write_text(path.read_text() + "garbage\n")  # one bad line: reconcile sets the file aside
    live = domain_xml(name="a", uuid=UA, tuning=HOST, backing="", vcpus=1,
                      extra=f"<cputune><vcpupin vcpu='0' cpuset='{cpu}'/></cputune>")
    out = operations.reconcile(world.cfg, running={UA: live}, snapshot={}, now=1e12)
    assert out.set_aside is not None
    assert operations.ledger_for(world.cfg).read().isolation["saved"]["irq:24"] == "0-3"
    operations.release(UA, world.cfg)
    assert world.restored()


def test_an_irq_requested_again_while_isolated_goes_back_with_the_default(tmp_path: Path) -> None:
    iso.build(tmp_path)
    ledger = iso.Ledger()
    iso.run(tmp_path, ledger, iso.BOTH)
    irq = tmp_path / "proc/irq/24"
    shutil.rmtree(irq)  # ip link set eth0 down: the vector is freed
    iso.run(tmp_path, ledger, iso.BOTH)
    irq.mkdir()  # link up: requested again, with the (isolated) default mask
    (irq / "smp_affinity_list").write_text("0-1\n")
    iso.run(tmp_path, ledger, IsolationTarget())
    assert iso.read(tmp_path, "proc/irq/24/smp_affinity_list") == "0-3"  # the admin's default mask (f)


def test_an_irq_that_was_there_keeps_its_value_even_if_it_equals_the_isolated_default(tmp_path: Path) -> None:
    iso.build(tmp_path)
    (tmp_path / "proc/irq/26/smp_affinity_list").write_text("0-1\n")  # the admin's, off CPUs 2-3 already
    ledger = iso.Ledger()
    iso.run(tmp_path, ledger, iso.BOTH)  # the default mask becomes 0-1 (= irq 26's own value)
    iso.run(tmp_path, ledger, IsolationTarget())
    assert iso.read(tmp_path, "proc/irq/26/smp_affinity_list") == "0-1"  # not "restored" to the default


def shared_policy(base: Path) -> None:
    """CPUs 2 and 3 share one cpufreq policy (cpuN/cpufreq links to policy2), as on per-cluster ARM."""
    iso.build(base)
    cpu = base / "sys/devices/system/cpu"
    (cpu / "cpufreq/policy2").mkdir(parents=True)
    (cpu / "cpufreq/policy2/scaling_governor").write_text("schedutil\n")
    for c in (2, 3):
        if (cpu / f"cpu{c}/cpufreq").exists():
            shutil.rmtree(cpu / f"cpu{c}/cpufreq")
        (cpu / f"cpu{c}").mkdir(exist_ok=True)
        os.symlink("../cpufreq/policy2", cpu / f"cpu{c}/cpufreq")


def test_a_shared_cpufreq_policy_is_set_only_when_all_its_cpus_ask(tmp_path: Path) -> None:
    shared_policy(tmp_path)
    gov = tmp_path / "sys/devices/system/cpu/cpufreq/policy2/scaling_governor"
    a = ({2}, HostSpec(isolate=False, irqs=False, governor="performance"))
    b = ({3}, HostSpec(isolate=False, irqs=False, governor="powersave"))
    b_perf = ({3}, HostSpec(isolate=False, irqs=False, governor="performance"))
    ledger = iso.Ledger()
    iso.run(tmp_path, ledger, target_for([a]))
    assert gov.read_text().strip() == "schedutil"  # CPU 3 shares the policy and asks nothing
    iso.run(tmp_path, ledger, target_for([a, b]))
    assert gov.read_text().strip() == "schedutil"  # they disagree
    iso.run(tmp_path, ledger, target_for([a, b_perf]))
    assert gov.read_text().strip() == "performance"  # both ask the same
    iso.run(tmp_path, ledger, target_for([a]))
    assert gov.read_text().strip() == "schedutil"  # CPU 3 is not a VM's any more: back to the admin's
    iso.run(tmp_path, ledger, IsolationTarget())
    assert gov.read_text().strip() == "schedutil" and ledger.disk.empty


def test_systemctl_calls_have_a_deadline_under_the_lock(tmp_path: Path) -> None:
    """A stuck systemd: every call takes its whole timeout. One converge stops calling once its budget is
    spent (the keys left are retried next time), well within the ledger lock's 30 s."""
    from kvmhooks.apply import isolation as apply_iso

    systemd = iso.build(tmp_path, "systemd")
    assert systemd is not None
    slow = {"calls": 0}
    host = iso.FakeKernel(tmp_path, systemd)

    def runner(argv: list[str]) -> str:
        slow["calls"] += 1
        host.command_budget -= 4.0  # as if each call had taken 4 s
        return systemd(argv)

    host.runner = runner
    ledger = iso.Ledger()
    report = apply_iso.converge(ledger.state, iso.BOTH, host, ledger.commit)
    assert slow["calls"] <= 3 + 1 and report.failed  # (10 s of budget: three calls, and the one under way)
