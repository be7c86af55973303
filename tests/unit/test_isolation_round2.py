"""Host isolation, hardening round two (issue 17, items 5 and 6), on fake trees.

Item 5: systemd prints AllowedCPUs= with spaces ("0-1 3", cpu_set_to_range_string()); every value read back
is compared as a CPU set, so a crash between set-property and its read-back, an admin's non-contiguous value
and a converge that changes nothing all behave. The fake systemctl (:class:`FakeSystemd`) prints what the
real one prints.

Item 6: who is never moved into the shield is decided from what a user cannot forge — the executable, the
real uid, the cgroup — never from the name a process gives itself (/proc/PID/comm, prctl PR_SET_NAME).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvmhooks.annotation import HostSpec
from kvmhooks.apply.isolation import SHIELD, SYSTEMD_UNITS
from kvmhooks.plan.isolation import IsolationTarget, equivalent, parse_list, target_for
from tests.unit.test_isolation import (
    BOTH,
    MOVABLE,
    VM_A,
    VM_B,
    Crash,
    FakeSystemd,
    Ledger,
    _pids,
    add_task,
    build,
    qemu_state_dir,
    run,
    snapshot,
)

# One dedicated CPU in the middle of a 4-CPU host: what the host keeps is not one range ("0-1 3").
MIDDLE = target_for([VM_A])


def systemd_host(base: Path) -> FakeSystemd:
    systemd = build(base, backend="systemd")
    assert systemd is not None
    return systemd


def dropins(base: Path) -> list[str]:
    control = base / "run/systemd/system.control"
    return sorted(str(p.relative_to(control)) for p in control.rglob("*.conf")) if control.exists() else []


class CrashAfterSetProperty(FakeSystemd):
    """systemd applies the k-th set-property, then the process dies before it reads the value back."""

    def __init__(self, run_root: Path, crash_after: int) -> None:
        super().__init__(run_root)
        self.crash_after = crash_after

    def __call__(self, argv: list[str]) -> str:
        out = super().__call__(argv)
        if argv[1] == "set-property" and self.set_calls == self.crash_after:
            self.crash_after = 0
            raise Crash("after set-property, before its read-back")
        return out


def test_the_fake_systemctl_prints_what_systemd_prints(tmp_path: Path) -> None:
    """cpu_set_to_range_string(): ranges joined by spaces; an unset AllowedCPUs is an empty line."""
    systemd = FakeSystemd(tmp_path)
    show = ["systemctl", "show", "-p", "AllowedCPUs", "--value", "user.slice"]
    assert systemd(show) == "\n"
    systemd(["systemctl", "set-property", "--runtime", "user.slice", "AllowedCPUs=3,0-1"])
    assert systemd(show) == "0-1 3\n"
    assert (tmp_path / "systemd/system.control/user.slice.d/50-AllowedCPUs.conf").read_text().endswith(
        "[Slice]\nAllowedCPUs=\nAllowedCPUs=0-1 3\n")


def test_systemd_lists_are_read_as_sets() -> None:
    assert parse_list("0-1 3") == parse_list("0-1,3") == parse_list(" 0-1, 3\n") == frozenset({0, 1, 3})
    assert parse_list("") == parse_list("\n") == frozenset()
    assert equivalent("unit:system.slice", "0-1 3", "0-1,3")
    assert not equivalent("unit:system.slice", "0-1 3", "0-1")
    for bad in ("0-1 x", "3-1"):
        with pytest.raises(ValueError):
            parse_list(bad)


@pytest.mark.parametrize("crash_after", range(1, len(SYSTEMD_UNITS) + 1))
@pytest.mark.parametrize("then", ["same", "empty"])
def test_a_crash_between_set_property_and_its_read_back_leaves_no_unit_restricted(
        tmp_path: Path, crash_after: int, then: str) -> None:
    """The next converge sees kvmhooks' own value (printed with a space) as ours, not as the admin's: after
    the last VM stops every unit is unrestricted again and no drop-in of ours is left."""
    systemd = systemd_host(tmp_path)
    original = snapshot(tmp_path, systemd)
    crashing = CrashAfterSetProperty(tmp_path / "run", crash_after)
    ledger = Ledger()
    assert run(tmp_path, ledger, MIDDLE, crashing) is None
    assert "0-1 3" in crashing.props.values()  # systemd took the value before the process died
    systemd.props = crashing.props
    if then == "same":
        report = run(tmp_path, ledger, MIDDLE, systemd)
        assert report is not None and report.ok and not report.notes  # nothing taken for an admin's change
        assert systemd.props == {unit: "0-1 3" for unit in SYSTEMD_UNITS}
    report = run(tmp_path, ledger, IsolationTarget(), systemd)
    assert systemd.props == {unit: "" for unit in SYSTEMD_UNITS}
    assert dropins(tmp_path) == []
    assert report is not None and report.ok and not report.notes
    assert snapshot(tmp_path, systemd) == original and ledger.disk.empty


@pytest.mark.parametrize(("vm", "kept"), [(VM_B, "0-1"), (VM_A, "0-1 3"),
                                          (({1}, HostSpec(isolate=True, irqs=False, governor=None)), "0 3")])
def test_an_admins_non_contiguous_allowed_cpus_is_isolated_and_restored_exactly(
        tmp_path: Path, vm: tuple[set[int], HostSpec], kept: str) -> None:
    systemd = systemd_host(tmp_path)
    systemd.props["user.slice"] = "0-1 3"  # the admin's AllowedCPUs=0-1,3 in /etc, as systemctl prints it
    original = snapshot(tmp_path, systemd)
    ledger = Ledger()
    report = run(tmp_path, ledger, target_for([vm]), systemd)
    assert report is not None and report.ok
    (cpu,) = vm[0]
    assert parse_list(systemd.props["user.slice"]) == frozenset({0, 1, 3}) - {cpu}
    assert systemd.props["user.slice"] == kept
    assert all(cpu not in parse_list(systemd.props[u]) for u in SYSTEMD_UNITS)
    run(tmp_path, ledger, IsolationTarget(), systemd)
    assert systemd.props["user.slice"] == "0-1 3"
    assert snapshot(tmp_path, systemd) == original and ledger.disk.empty


@pytest.mark.parametrize("admin", ["", "0-1 3"])
def test_converging_twice_without_change_runs_set_property_once(tmp_path: Path, admin: str) -> None:
    systemd = systemd_host(tmp_path)
    systemd.props["system.slice"] = admin
    ledger = Ledger()
    first = run(tmp_path, ledger, MIDDLE, systemd)
    assert first is not None and first.ok
    calls, commits = systemd.set_calls, ledger.commits
    assert calls == len(SYSTEMD_UNITS) - (admin == "0-1 3")  # the admin's already avoids CPU 2
    again = run(tmp_path, ledger, MIDDLE, systemd)
    assert again is not None and again.changed == () and not again.notes
    assert (systemd.set_calls, ledger.commits) == (calls, commits)


# --- item 6: the shield's "never move" ------------------------------------------------------------------

EVIL = "/tmp/evil"
SCOPE = "/machine.slice/machine-qemu\\x2d1\\x2dvm.scope/libvirt/emulator"  # as /proc/PID/cgroup prints it


def forged_and_real(base: Path) -> tuple[set[int], set[int]]:
    """Tasks in the root cgroup: (those a user can make look like libvirt's, which must move; libvirt's own,
    which must not)."""
    qemu_uid = qemu_state_dir(base).stat().st_uid
    user = max(1000, qemu_uid + 1)  # an ordinary user, neither root nor the QEMU user
    assert user not in (0, qemu_uid)
    forged = {
        700: ("qemu-system-x86", EVIL, user, "/"),  # named like QEMU (prctl PR_SET_NAME)
        701: ("libvirtd", EVIL, user, "/"),  # named like libvirtd
        702: ("libvirtd", "/usr/sbin/libvirtd", user, "/"),  # the real binary, run by a user
        703: ("qemu-system-x86", "/usr/bin/qemu-system-x86_64", user, "/"),  # a user's own (session) QEMU
        704: ("qemu-system-x86", EVIL, user,  # libvirt's cgroup names, inside the user's own delegated subtree
              "/user.slice/user-1000.slice/user@1000.service/machine.slice/machine-qemu\\x2d9\\x2dx.scope"),
        705: ("x) S 2 1 1 0 -1 2097152", EVIL, user, "/"),  # a name that spells a kernel thread's stat
        706: ("virtlogd", "/home/u/usr/sbin/virtlogd", user, "/"),  # the right name, the wrong directory
    }
    real = {
        710: ("libvirtd", "/usr/sbin/libvirtd", 0, "/"),
        711: ("virtlogd", "/usr/sbin/virtlogd (deleted)", 0, "/"),  # replaced by an upgrade since it started
        712: ("qemu-system-x86", "/usr/bin/qemu-system-x86_64", qemu_uid, SCOPE),
        713: ("qemu-system-x86", "/usr/bin/qemu-system-x86_64", qemu_uid, "/"),  # libvirt without cgroups
        714: ("virtiofsd", "/usr/libexec/virtiofsd", 0, SCOPE),  # a VM's helper, in the VM's cgroup
        715: ("anything", EVIL, qemu_uid, "/machine/qemu-2-vm.libvirt-qemu/emulator"),  # libvirt's, v1/v2 path
    }
    for pid, (comm, exe, uid, cgroup) in (forged | real).items():
        add_task(base, pid, comm, exe, uid, cgroup)
    return set(forged), set(real)


@pytest.mark.parametrize("backend", ["cgroup1", "cgroup2"])
def test_a_process_that_only_looks_like_libvirts_is_moved_into_the_shield(tmp_path: Path, backend: str) -> None:
    build(tmp_path, backend)
    forged, real = forged_and_real(tmp_path)
    procs = tmp_path / ("cgroup/cpuset/tasks" if backend == "cgroup1" else "cgroup/cgroup.procs")
    procs.write_text("".join(f"{p}\n" for p in sorted({*_pids(procs), *forged, *real})))
    ledger = Ledger()
    report = run(tmp_path, ledger, BOTH)
    assert report is not None and report.ok
    shield = procs.parent / SHIELD / procs.name
    assert set(_pids(shield)) == MOVABLE | forged
    assert real <= set(_pids(procs))
    run(tmp_path, ledger, IsolationTarget())
    assert not shield.parent.exists() and {*forged, *real} <= set(_pids(procs)) and ledger.disk.empty


def test_a_qemu_run_by_hand_is_moved_even_as_root(tmp_path: Path) -> None:
    """Only the QEMU user's QEMU is libvirt's (the owner of /var/lib/libvirt/qemu): one root or another user
    runs by hand, outside a VM's cgroup, is a host task like any other."""
    build(tmp_path)
    add_task(tmp_path, 720, "qemu-system-x86", "/usr/bin/qemu-system-x86_64", 4242)
    add_task(tmp_path, 721, "qemu-system-x86", "/usr/bin/qemu-system-x86_64", 0)
    tasks = tmp_path / "cgroup/cpuset/tasks"
    tasks.write_text(tasks.read_text() + "720\n721\n")
    assert qemu_state_dir(tmp_path).stat().st_uid not in (0, 4242)  # the QEMU user is neither
    report = run(tmp_path, Ledger(), BOTH)
    assert report is not None and report.ok
    assert set(_pids(tmp_path / "cgroup/cpuset" / SHIELD / "tasks")) == MOVABLE | {720, 721}


def test_without_libvirts_qemu_directory_only_a_vm_cgroup_makes_a_qemu_libvirts(tmp_path: Path) -> None:
    """No /var/lib/libvirt/qemu (no QEMU driver there): nothing says a QEMU outside a VM's cgroup is libvirt's."""
    build(tmp_path)
    os.rmdir(qemu_state_dir(tmp_path))
    report = run(tmp_path, Ledger(), BOTH)
    assert report is not None and report.ok
    # (the fake host's QEMU 300 runs as the QEMU user, in the root cgroup)
    assert set(_pids(tmp_path / "cgroup/cpuset" / SHIELD / "tasks")) == MOVABLE | {300, 301}
