"""Host isolation on fake trees: IRQs, the default IRQ mask, work queues, governors and host tasks (systemd,
cgroup v2, cgroup v1) are moved off the isolated CPUs and put back exactly, whatever order VMs stop in,
whatever the admin changed meanwhile and wherever the process dies.

The fake kernel (:class:`FakeKernel`) plays cgroupfs (writing a pid to a cgroup's pid file takes it out of
every other cgroup; a cgroup with tasks cannot be removed), an IRQ that refuses with EIO, one that silently
keeps its affinity, and a task that exits while it is moved. A crash is an exception raised before the k-th
host write or the k-th ledger commit; "the ledger on disk" is a deep copy taken at each commit.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmhooks.annotation import HostSpec
from kvmhooks.apply.isolation import SHIELD, SYSTEMD_UNITS, HostSettings, IsolationReport, converge
from kvmhooks.errors import ApplyError, LedgerError
from kvmhooks.plan.isolation import (
    IsolationState,
    IsolationTarget,
    desired,
    format_mask,
    parse_mask,
    target_for,
)

ONLINE = frozenset(range(4))
# irq → original smp_affinity_list
IRQS = {0: "0-3", 24: "0-3", 25: "2-3", 26: "1", 27: "0-3", 28: "0-3"}
EIO_IRQ = 27  # the kernel answers EIO (managed IRQ)
STUCK_IRQ = 28  # the kernel accepts the write and keeps the old affinity
GOVERNED = (0, 1, 3)  # CPUs with cpufreq (cpu2 has none)
# pid → (comm, ppid, flags, tgid)
TASKS = {1: ("init", 0, 0x400100, 1), 2: ("kthreadd", 0, 0x208040, 2), 10: ("kworker/2:1", 2, 0x4208060, 10),
         101: ("my) shell", 1, 0x400000, 101), 102: ("exiting", 1, 0x400100, 102), 200: ("libvirtd", 1, 0x400100, 200),
         300: ("qemu-system-x86", 1, 0x400100, 300), 301: ("CPU 0/KVM", 1, 0x400040, 300),
         500: ("qemu-system-x86", 1, 0x400100, 500)}
IN_MACHINE = {500}
# pid → (executable, real uid): what only root controls, and what decides who is libvirt's (never the name).
# QEMU runs as the owner of libvirt's QEMU state directory (QEMU_UID); kernel threads have no executable.
QEMU_UID = -1
IDENTITY = {1: ("/sbin/init", 0), 2: (None, 0), 10: (None, 0), 101: ("/bin/bash", 1000),
            102: ("/usr/bin/sleep", 1000), 200: ("/usr/sbin/libvirtd", 0),
            300: ("/usr/bin/qemu-system-x86_64", QEMU_UID), 301: ("/usr/bin/qemu-system-x86_64", QEMU_UID),
            500: ("/usr/bin/qemu-system-x86_64", QEMU_UID)}
# Debian's libvirt-qemu: the fake QEMU state directory is given to it when the tests run as root.
LIBVIRT_QEMU_UID = 64055
EXITING = 102  # ESRCH when moved
MOVABLE = {1, 101}

VM_A = ({2}, HostSpec(isolate=True, irqs=True, governor="performance"))
VM_B = ({3}, HostSpec(isolate=True, irqs=True, governor="performance"))
BOTH = target_for([VM_A, VM_B])


class Crash(BaseException):
    """The process dies here (a BaseException, like the kill it stands for: no ``except Exception`` of the
    code under test may swallow it)."""


def systemd_cpu_set(text: str) -> set[int]:
    """What systemd's parse_cpu_set() reads (src/shared/cpu-set-util.c): ranges "N" or "N-M" separated by
    any run of spaces and commas; "" is the empty set (no restriction). Anything else: the command fails."""
    cpus: set[int] = set()
    for word in re.split(r"[\s,]+", text.strip()):
        if not word:
            continue
        m = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", word)
        if m is None or int(m.group(2) or m.group(1)) < int(m.group(1)):
            raise ApplyError(f"Failed to parse CPU set: {text}")
        cpus.update(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    return cpus


def systemd_range_string(cpus: set[int]) -> str:
    """systemd's cpu_set_to_range_string(): ranges "N-M" (single CPUs "N") joined by SPACES, "" when empty."""
    out: list[str] = []
    for cpu in sorted(cpus):
        if out and cpu - 1 in cpus:
            out[-1] = f"{out[-1].partition('-')[0]}-{cpu}"
        else:
            out.append(str(cpu))
    return " ".join(out)


class FakeSystemd:
    """systemctl show / set-property --runtime over a dict of unit → AllowedCPUs, printed as the real one
    prints it: ``show -p AllowedCPUs --value`` prints cpu_set_to_range_string() of the set ("0-1 3"; an unset
    AllowedCPUs prints an empty line: -p shows empty properties, --value drops the "AllowedCPUs=" —
    systemctl-show.c and bus-print-properties.c). Like systemd, set-property --runtime also writes its drop-in
    under /run/systemd/system.control (``run`` is that /run) with the text dbus-cgroup.c and unit.c write.
    ``set_calls`` counts the set-property calls."""

    def __init__(self, run: Path | None = None) -> None:
        self.props = {unit: "" for unit in SYSTEMD_UNITS}
        self.run = run
        self.set_calls = 0

    def __call__(self, argv: list[str]) -> str:
        if argv[:5] == ["systemctl", "show", "-p", "AllowedCPUs", "--value"]:
            return self.props.get(argv[5], "") + "\n"
        assert argv[:3] == ["systemctl", "set-property", "--runtime"] and argv[4].startswith("AllowedCPUs=")
        value = systemd_range_string(systemd_cpu_set(argv[4].partition("=")[2]))
        self.set_calls += 1
        self.props[argv[3]] = value
        if self.run is not None:
            d = self.run / f"systemd/system.control/{argv[3]}.d"
            d.mkdir(parents=True, exist_ok=True)
            section = "Scope" if argv[3].endswith(".scope") else "Slice"
            (d / "50-AllowedCPUs.conf").write_text(f"# This is a drop-in unit file extension, created via "
                                                   f"\"systemctl set-property\"\n# or an equivalent operation. Do "
                                                   f"not edit.\n[{section}]\nAllowedCPUs=\nAllowedCPUs={value}\n")
        return ""


class FakeKernel(HostSettings):
    """HostSettings on a fake tree, with the kernel's behaviour behind the adapter's seams."""

    def __init__(self, base: Path, systemd: FakeSystemd | None = None):
        self.ops = 0
        self.crash_at: int | None = None

        def runner(argv: list[str]) -> str:
            assert systemd is not None
            if argv[1] == "set-property":
                self._tick()
            return systemd(argv)

        super().__init__(proc_root=base / "proc", sysfs_root=base / "sys", cgroup_root=base / "cgroup",
                         run_root=base / "run", runner=runner, qemu_state_dir=qemu_state_dir(base))

    def _tick(self) -> None:
        self.ops += 1
        if self.ops == self.crash_at:
            raise Crash(f"before host write {self.ops}")

    def _write_file(self, path: Path, text: str) -> None:
        self._tick()
        # the tasks' own /proc files are never written (snapshot() skips them)
        assert not (path.is_relative_to(self.proc_root) and path.relative_to(self.proc_root).parts[0].isdecimal())
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        if path.name in ("tasks", "cgroup.procs"):
            pid = int(text)
            if pid == EXITING:
                raise OSError(errno.ESRCH, "No such process")
            top = self.cgroup_root
            for other in top.rglob(path.name):
                other.write_text(_pid_text(p for p in _pids(other) if p != pid))
            path.write_text(_pid_text([*_pids(path), pid]))
        elif path.parent.name == str(EIO_IRQ):
            raise OSError(errno.EIO, "Input/output error")
        elif path.parent.name == str(STUCK_IRQ):
            return
        elif path.name == "cgroup.subtree_control":
            order = (self.cgroup_root / "cgroup.controllers").read_text().split()
            words = set(path.read_text().split())
            (words.add if text.startswith("+") else words.discard)(text[1:])
            path.write_text(" ".join(w for w in order if w in words) + "\n")
            for child in path.parent.iterdir():
                for name in ("cpuset.cpus", "cpuset.mems"):
                    if child.is_dir() and text == "+cpuset":
                        (child / name).write_text("\n")
                    elif child.is_dir():
                        (child / name).unlink(missing_ok=True)
        else:
            path.write_text(text)

    def _mkdir(self, path: Path) -> None:
        self._tick()
        path.mkdir()
        if self.backend == "cgroup1":
            files = ["tasks", "cpuset.cpus", "cpuset.mems"]
        else:
            files = ["cgroup.procs"]
            if "cpuset" in (self.cgroup_root / "cgroup.subtree_control").read_text().split():
                files += ["cpuset.cpus", "cpuset.mems"]
        for name in files:
            (path / name).write_text("")

    def _rmdir(self, path: Path) -> None:
        self._tick()
        if any(_pids(f) for f in (path / "tasks", path / "cgroup.procs") if f.exists()):
            raise OSError(errno.EBUSY, "Device or resource busy")
        shutil.rmtree(path)


def _pids(path: Path) -> list[int]:
    return [int(w) for w in path.read_text().split()]


def _pid_text(pids: Iterable[int]) -> str:
    return "".join(f"{p}\n" for p in sorted(set(pids)))


def qemu_state_dir(base: Path) -> Path:
    return base / "var/lib/libvirt/qemu"


def add_task(base: Path, pid: int, comm: str, exe: str | None, uid: int, cgroup: str = "/", *, ppid: int = 1,
             flags: int = 0x400100, tgid: int | None = None) -> None:
    """A task in the fake /proc as the kernel shows it: stat, comm, status (tab-separated, "Uid:" real,
    effective, saved, fs), cgroup (v1 lines and the v2 one) and the exe link (none for a kernel thread)."""
    d = base / "proc" / str(pid)
    d.mkdir(parents=True)
    (d / "stat").write_text(f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 {flags} 0 0 0 0\n")
    (d / "comm").write_text(comm + "\n")
    (d / "status").write_text(f"Name:\t{comm}\nTgid:\t{tgid or pid}\nPid:\t{pid}\nPPid:\t{ppid}\n"
                              f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    (d / "cgroup").write_text(f"9:name=systemd:/\n3:cpuset:{cgroup}\n1:cpu:{cgroup}\n0::{cgroup}\n")
    if exe is not None:
        (d / "exe").symlink_to(exe)


def build(base: Path, backend: str = "cgroup1") -> FakeSystemd | None:
    """A 4-CPU host: six IRQs, masks, governors, a dozen tasks, and the cgroup layout of ``backend``."""
    proc, sys = base / "proc", base / "sys"
    for irq, cpus in IRQS.items():
        (proc / "irq" / str(irq)).mkdir(parents=True)
        (proc / "irq" / str(irq) / "smp_affinity_list").write_text(cpus + "\n")
    (proc / "irq/default_smp_affinity").write_text("f\n")
    qemu_dir = qemu_state_dir(base)
    qemu_dir.mkdir(parents=True)
    if os.geteuid() == 0:
        os.chown(qemu_dir, LIBVIRT_QEMU_UID, -1)
    for pid, (comm, ppid, flags, tgid) in TASKS.items():
        exe, uid = IDENTITY[pid]
        cgroup = "/machine/qemu-1-b.libvirt-qemu/emulator" if pid in IN_MACHINE else "/"
        add_task(base, pid, comm, exe, qemu_dir.stat().st_uid if uid == QEMU_UID else uid, cgroup, ppid=ppid,
                 flags=flags, tgid=tgid)
    (sys / "devices/virtual/workqueue").mkdir(parents=True)
    (sys / "devices/virtual/workqueue/cpumask").write_text("f\n")
    (sys / "devices/system/cpu").mkdir(parents=True)
    (sys / "devices/system/cpu/online").write_text("0-3\n")
    for cpu in GOVERNED:
        (sys / f"devices/system/cpu/cpu{cpu}/cpufreq").mkdir(parents=True)
        (sys / f"devices/system/cpu/cpu{cpu}/cpufreq/scaling_governor").write_text("schedutil\n")
    (base / "run").mkdir()
    root = [p for p in TASKS if p not in IN_MACHINE]
    cg = base / "cgroup"
    if backend == "cgroup1":
        (cg / "cpuset/machine").mkdir(parents=True)
        for d, pids in ((cg / "cpuset", root), (cg / "cpuset/machine", sorted(IN_MACHINE))):
            (d / "tasks").write_text(_pid_text(pids))
            (d / "cpuset.cpus").write_text("0-3\n")
            (d / "cpuset.mems").write_text("0\n")
    elif backend in ("cgroup2", "systemd"):
        (cg / "machine").mkdir(parents=True)
        (cg / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
        (cg / "cgroup.subtree_control").write_text("cpu memory pids\n")
        (cg / "cgroup.procs").write_text(_pid_text(p for p in root if p == TASKS[p][3]))
        (cg / "cpuset.cpus.effective").write_text("0-3\n")
        (cg / "cpuset.mems.effective").write_text("0\n")
        (cg / "machine/cgroup.procs").write_text(_pid_text(IN_MACHINE))
    if backend == "systemd":
        (base / "run/systemd/system").mkdir(parents=True)
        return FakeSystemd(base / "run")
    return None


def snapshot(base: Path, systemd: FakeSystemd | None = None) -> dict[str, str]:
    """Every file and directory of the fake host (and systemd's properties): the host, as a value."""
    out: dict[str, str] = {}
    for top, dirs, files in os.walk(base):
        rel = os.path.relpath(top, base)
        if rel == "proc":  # the tasks' files are read-only (FakeKernel refuses to write there)
            dirs[:] = [d for d in dirs if not d.isdecimal()]
        out.update({os.path.join(rel, d): "<dir>" for d in dirs})
        for name in files:
            with open(os.path.join(top, name)) as f:
                out[os.path.join(rel, name)] = f.read()
    if systemd is not None:
        out.update({f"systemd:{u}": v for u, v in systemd.props.items()})
    return out


class Ledger:
    """The state in memory and "on disk" (the deep copy taken at each commit), with a crash at commit k."""

    def __init__(self, state: IsolationState | None = None):
        self.state = state or IsolationState()
        self.disk = copy.deepcopy(self.state)
        self.commits = 0
        self.crash_at: int | None = None

    def commit(self) -> None:
        self.commits += 1
        if self.commits == self.crash_at:
            raise Crash(f"before commit {self.commits}")
        json.dumps(self.state.to_json())  # it must be JSON
        self.disk = copy.deepcopy(self.state)

    def reload(self) -> IsolationState:
        """After a crash: what the next process reads (through JSON, as the ledger would)."""
        self.state = IsolationState.from_json(json.loads(json.dumps(self.disk.to_json())))
        return self.state


def run(base: Path, ledger: Ledger, target: IsolationTarget, systemd: FakeSystemd | None = None, *,
        crash_write: int | None = None, crash_commit: int | None = None) -> IsolationReport | None:
    """One converge in a fresh "process"; None when it crashed (the ledger is then reloaded from disk)."""
    host = FakeKernel(base, systemd)
    host.crash_at = crash_write
    ledger.crash_at = None if crash_commit is None else ledger.commits + crash_commit
    try:
        return converge(ledger.state, target, host, ledger.commit)
    except Crash:
        ledger.reload()
        return None
    finally:
        ledger.crash_at = None


def read(base: Path, rel: str) -> str:
    return (base / rel).read_text().strip()


# --- the pure part ------------------------------------------------------------------------------------------

def test_masks_keep_the_kernels_shape() -> None:
    assert parse_mask("ff,ffffffff") == frozenset(range(40))
    assert parse_mask("3\n") == {0, 1} and parse_mask("0") == frozenset()
    assert format_mask({0, 1}, "f") == "3"
    assert format_mask(range(32), "ff,ffffffff") == "00,ffffffff"
    assert format_mask({33}, "f") == "2,00000000"
    for bad in ("", "xyz", "123456789", "f,,f"):
        with pytest.raises(ValueError):
            parse_mask(bad)


def test_desired_values() -> None:
    t = IsolationTarget(tasks=frozenset({2, 3}), irqs=frozenset({2, 3}), governors={3: "performance"})
    assert desired("irq:5", "0-3", t, ONLINE) == "0-1"
    assert desired("irq:5", "2-3", t, ONLINE) == "0-1"  # nothing left: online minus isolated
    assert desired("irq:5", "1", t, ONLINE) == "1"
    assert desired("irq:default", "f", t, ONLINE) == "3"
    assert desired("workqueue", "f", IsolationTarget(irqs=frozenset({2})), ONLINE) == "f"  # tasks not isolated
    assert desired("unit:system.slice", "", t, ONLINE) == "0-1"
    assert desired("tasks", "", t, ONLINE) == "0-1"
    assert desired("tasks", "", IsolationTarget(tasks=ONLINE), ONLINE) == ""  # never an empty cpuset
    assert desired("governor:3", "schedutil", t, ONLINE) == "performance"
    assert desired("governor:2", "schedutil", t, ONLINE) == "schedutil"
    assert desired("irq:5", "garbage", t, ONLINE) == "garbage"  # not understood: left alone
    for key, original in (("irq:5", "0-3"), ("workqueue", "f"), ("governor:3", "x"), ("unit:user.slice", "")):
        assert desired(key, original, IsolationTarget(), ONLINE) == original


def test_target_is_the_union_and_deterministic() -> None:
    a = ({2}, HostSpec(isolate=True, irqs=False, governor="performance"))
    b = ({3}, HostSpec(isolate=False, irqs=True, governor=None))
    c = ({3}, HostSpec(isolate=False, irqs=False, governor="powersave"))  # a corrupt overlap
    t = target_for([a, b])
    assert (t.tasks, t.irqs, dict(t.governors)) == (frozenset({2}), frozenset({3}), {2: "performance"})
    assert target_for([a, b, c]) == target_for([c, b, a])
    assert target_for([]).empty and not t.empty


def test_state_json_round_trip_and_refusals() -> None:
    s = IsolationState({"irq:24": "0-3"}, {"tasks": "0-1"}, {"irq:24": "0-1"}, ["irq:27"], 1, [2, 3], [24, 27])
    data = json.loads(json.dumps(s.to_json()))
    assert data == {"saved": {"irq:24": "0-3"}, "pending": {"tasks": "0-1"}, "wrote": {"irq:24": "0-1"},
                    "unmovable": ["irq:27"], "skipped_tasks": 1, "isolated": [2, 3], "irqs_before": [24, 27],
                    "dropins": []}
    assert IsolationState.from_json(data) == s
    assert IsolationState.from_json(None).empty and IsolationState.from_json({"future": 1}).empty
    bad: object
    for bad in ([], {"saved": []}, {"saved": {"k": 1}}, {"unmovable": [3]}, {"skipped_tasks": -1},
                {"isolated": ["2"]}, {"isolated": [True]}, {"irqs_before": [-1]},
                {"dropins": ["irq:3"]}):
        with pytest.raises(LedgerError):
            IsolationState.from_json(bad, "isolation")


# --- one VM, then none --------------------------------------------------------------------------------------

def test_one_vm_isolates_and_everything_comes_back(tmp_path: Path) -> None:
    build(tmp_path)
    original = snapshot(tmp_path)
    ledger = Ledger()
    report = run(tmp_path, ledger, target_for([({2, 3}, HostSpec(governor="performance"))]))
    assert report is not None and report.ok and report.backend == "cgroup1"
    assert [read(tmp_path, f"proc/irq/{n}/smp_affinity_list") for n in IRQS] == ["0-1", "0-1", "0-1", "1",
                                                                                  "0-3", "0-3"]
    assert set(report.unmovable) == {f"irq:{EIO_IRQ}", f"irq:{STUCK_IRQ}"}
    assert read(tmp_path, "proc/irq/default_smp_affinity") == "3"
    assert read(tmp_path, "sys/devices/virtual/workqueue/cpumask") == "3"
    governors = [read(tmp_path, f"sys/devices/system/cpu/cpu{c}/cpufreq/scaling_governor") for c in GOVERNED]
    assert governors == ["schedutil", "schedutil", "performance"]
    shield = tmp_path / "cgroup/cpuset" / SHIELD
    assert read(tmp_path, f"cgroup/cpuset/{SHIELD}/cpuset.cpus") == "0-1"
    assert read(tmp_path, f"cgroup/cpuset/{SHIELD}/cpuset.mems") == "0"
    assert set(_pids(shield / "tasks")) == MOVABLE
    assert set(_pids(tmp_path / "cgroup/cpuset/tasks")) == {2, 10, EXITING, 200, 300, 301}
    assert _pids(tmp_path / "cgroup/cpuset/machine/tasks") == [500]
    assert (report.tasks_moved, report.tasks_skipped) == (2, 1)
    assert ledger.disk.isolated == [2, 3] and ledger.disk.skipped_tasks == 1
    assert set(ledger.disk.unmovable) == set(report.unmovable) and not ledger.disk.pending

    again = run(tmp_path, ledger, target_for([({2, 3}, HostSpec(governor="performance"))]))
    assert again is not None and again.changed == () and ledger.commits == 2  # idempotent, nothing new to commit

    back = run(tmp_path, ledger, IsolationTarget())
    assert back is not None and back.ok
    assert snapshot(tmp_path) == original
    assert ledger.disk.empty and ledger.state.empty


def test_irqbalance_and_missing_cpuset_are_reported(tmp_path: Path) -> None:
    build(tmp_path, backend="none")
    (tmp_path / "proc/400").mkdir()
    (tmp_path / "proc/400/comm").write_text("irqbalance\n")
    original = snapshot(tmp_path)
    ledger = Ledger()
    report = run(tmp_path, ledger, BOTH)
    assert report is not None and report.backend == "none" and report.irqbalance
    assert any("IRQBALANCE_BANNED_CPULIST=2-3" in n for n in report.notes)
    assert "no cpuset controller; host tasks not moved" in report.notes
    assert read(tmp_path, "proc/irq/24/smp_affinity_list") == "0-1"
    run(tmp_path, ledger, IsolationTarget())
    assert snapshot(tmp_path) == original and ledger.disk.empty


def test_a_shield_left_by_a_lost_ledger_is_removed(tmp_path: Path) -> None:
    build(tmp_path)
    original = snapshot(tmp_path)
    run(tmp_path, Ledger(), BOTH)
    ledger = Ledger()  # the ledger was lost; the cgroup was not
    run(tmp_path, ledger, IsolationTarget())
    assert not (tmp_path / "cgroup/cpuset" / SHIELD).exists()
    assert snapshot(tmp_path)["cgroup/cpuset/tasks"] == original["cgroup/cpuset/tasks"]


# --- several VMs --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("first", ["A", "B"])
def test_overlapping_vms_stop_in_either_order(tmp_path: Path, first: str) -> None:
    build(tmp_path)
    original = snapshot(tmp_path)
    ledger = Ledger()
    run(tmp_path, ledger, target_for([VM_A]))
    assert read(tmp_path, "proc/irq/24/smp_affinity_list") == "0-1,3"
    run(tmp_path, ledger, BOTH)
    assert read(tmp_path, "proc/irq/24/smp_affinity_list") == "0-1"
    assert read(tmp_path, "proc/irq/default_smp_affinity") == "3"
    assert read(tmp_path, f"cgroup/cpuset/{SHIELD}/cpuset.cpus") == "0-1"
    still, stopped = (VM_B, 2) if first == "A" else (VM_A, 3)
    run(tmp_path, ledger, target_for([still]))  # only the stopped VM's CPU comes back
    cpus = {0, 1, stopped}
    host_list = "0-2" if stopped == 2 else "0-1,3"
    assert read(tmp_path, "proc/irq/24/smp_affinity_list") == host_list
    assert read(tmp_path, f"cgroup/cpuset/{SHIELD}/cpuset.cpus") == host_list
    assert parse_mask(read(tmp_path, "sys/devices/virtual/workqueue/cpumask")) == cpus
    assert read(tmp_path, "sys/devices/system/cpu/cpu3/cpufreq/scaling_governor") == (
        "performance" if stopped == 2 else "schedutil")
    assert ledger.disk.isolated == sorted({0, 1, 2, 3} - cpus)
    run(tmp_path, ledger, IsolationTarget())
    assert snapshot(tmp_path) == original and ledger.disk.empty


# --- the admin --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seen_before_restore", [True, False])
def test_an_admin_change_while_isolated_survives_the_restore(tmp_path: Path, seen_before_restore: bool) -> None:
    build(tmp_path)
    original = snapshot(tmp_path)
    ledger = Ledger()
    run(tmp_path, ledger, BOTH)
    (tmp_path / "proc/irq/24/smp_affinity_list").write_text("1\n")
    (tmp_path / "sys/devices/virtual/workqueue/cpumask").write_text("1\n")
    (tmp_path / "sys/devices/system/cpu/cpu3/cpufreq/scaling_governor").write_text("powersave\n")
    if seen_before_restore:  # another VM starts meanwhile
        report = run(tmp_path, ledger, BOTH)
        assert report is not None and len(report.notes) == 3
        assert read(tmp_path, "proc/irq/24/smp_affinity_list") == "1"  # already off the isolated CPUs
        assert read(tmp_path, "sys/devices/system/cpu/cpu3/cpufreq/scaling_governor") == "performance"
    run(tmp_path, ledger, IsolationTarget())
    expected = dict(original)
    expected["proc/irq/24/smp_affinity_list"] = "1\n"
    expected["sys/devices/virtual/workqueue/cpumask"] = "1\n"
    expected["sys/devices/system/cpu/cpu3/cpufreq/scaling_governor"] = "powersave\n"
    assert snapshot(tmp_path) == expected and ledger.disk.empty


# --- dry run --------------------------------------------------------------------------------------------

def test_dry_run_lists_the_writes_and_changes_nothing(tmp_path: Path) -> None:
    build(tmp_path)
    original = snapshot(tmp_path)
    ledger = Ledger()
    writes: list[tuple[str, str]] = []

    def fail() -> None:
        raise AssertionError("a dry run committed")

    report = converge(ledger.state, BOTH, FakeKernel(tmp_path), fail, record=lambda k, v: writes.append((k, v)))
    assert snapshot(tmp_path) == original and ledger.state.empty
    assert dict(writes) == {"tasks": "0-1", "workqueue": "3", "irq:default": "3", "irq:0": "0-1",
                            "irq:24": "0-1", "irq:25": "0-1", f"irq:{EIO_IRQ}": "0-1", f"irq:{STUCK_IRQ}": "0-1",
                            "governor:3": "performance"}
    assert report.changed == tuple(k for k, _ in writes)
    # while isolated, a dry run of the restore lists the restores
    run(tmp_path, ledger, BOTH)
    state_before = ledger.state.to_json()
    writes.clear()
    converge(ledger.state, IsolationTarget(), FakeKernel(tmp_path), fail, record=lambda k, v: writes.append((k, v)))
    assert dict(writes)["irq:24"] == "0-3" and dict(writes)["tasks"] == "" and ledger.state.to_json() == state_before


# --- other backends ----------------------------------------------------------------------------------------

def test_systemd_backend(tmp_path: Path) -> None:
    systemd = build(tmp_path, backend="systemd")
    original = snapshot(tmp_path, systemd)
    ledger = Ledger()
    report = run(tmp_path, ledger, BOTH, systemd)
    assert report is not None and report.backend == "systemd" and report.ok
    assert systemd is not None and systemd.props == {unit: "0-1" for unit in SYSTEMD_UNITS}
    assert not (tmp_path / "cgroup" / SHIELD).exists() and report.tasks_moved == 0
    run(tmp_path, ledger, target_for([VM_B]), systemd)
    assert systemd.props == {unit: "0-2" for unit in SYSTEMD_UNITS}
    run(tmp_path, ledger, IsolationTarget(), systemd)
    # The runtime drop-ins set-property wrote are gone too: an AllowedCPUs= the admin puts in /etc later is
    # not masked by ours (system.control in /run wins over /etc/systemd/system).
    assert snapshot(tmp_path, systemd) == original and ledger.disk.empty


def test_systemd_keeps_a_runtime_drop_in_the_admin_had(tmp_path: Path) -> None:
    systemd = build(tmp_path, backend="systemd")
    assert systemd is not None
    systemd(["systemctl", "set-property", "--runtime", "user.slice", "AllowedCPUs=0-3"])  # the admin's own
    original = snapshot(tmp_path, systemd)
    ledger = Ledger()
    run(tmp_path, ledger, BOTH, systemd)
    assert ledger.disk.dropins == ["unit:init.scope", "unit:system.slice"]  # only the ones kvmhooks made
    run(tmp_path, ledger, IsolationTarget(), systemd)
    assert snapshot(tmp_path, systemd) == original and ledger.disk.empty


def test_cgroup2_backend(tmp_path: Path) -> None:
    build(tmp_path, backend="cgroup2")
    original = snapshot(tmp_path)
    ledger = Ledger()
    report = run(tmp_path, ledger, BOTH)
    assert report is not None and report.backend == "cgroup2" and report.ok
    assert read(tmp_path, "cgroup/cgroup.subtree_control") == "cpuset cpu memory pids"
    assert read(tmp_path, f"cgroup/{SHIELD}/cpuset.cpus") == "0-1"
    assert set(_pids(tmp_path / "cgroup" / SHIELD / "cgroup.procs")) == MOVABLE
    assert _pids(tmp_path / "cgroup/machine/cgroup.procs") == [500]
    run(tmp_path, ledger, IsolationTarget())
    assert snapshot(tmp_path) == original and ledger.disk.empty


# --- crashes -------------------------------------------------------------------------------------------

def _steps(base: Path, backend: str, target: IsolationTarget) -> dict[str, tuple[int, int]]:
    """How many host writes and commits converging to ``target`` from scratch makes, and then back."""
    systemd = build(base, backend)
    out = {}
    ledger = Ledger()
    for phase, t in (("isolate", target), ("restore", IsolationTarget())):
        host = FakeKernel(base, systemd)
        commits = ledger.commits
        converge(ledger.state, t, host, ledger.commit)
        out[phase] = (host.ops, ledger.commits - commits)
    return out


@pytest.mark.parametrize("backend", ["cgroup1", "cgroup2", "systemd"])
def test_crash_at_every_step(tmp_path: Path, backend: str) -> None:
    steps = _steps(tmp_path / "count", backend, BOTH)
    assert steps["isolate"][0] > 10 and steps["isolate"][1] == 2 and steps["restore"][1] == 2
    ref = tmp_path / "ref"
    systemd = build(ref, backend)
    original = snapshot(ref, systemd)
    run(ref, Ledger(), BOTH, systemd)
    isolated = snapshot(ref, systemd)

    # Every case ends with the host back at its original (asserted), so they all share one tree.
    base = tmp_path / "host"
    systemd = build(base, backend)
    for phase, (n_writes, n_commits) in steps.items():
        points = [("write", k) for k in range(1, n_writes + 1)] + [("commit", k) for k in range(1, n_commits + 1)]
        for what, k in points:
            # crash, then the same target again, then none; on cgroup v1 also: crash, then none at once
            for then in ("same", "empty") if phase == "isolate" and backend == "cgroup1" else ("same",):
                ledger = Ledger()
                if phase == "restore":
                    run(base, ledger, BOTH, systemd)
                crashed_target = BOTH if phase == "isolate" else IsolationTarget()
                assert run(base, ledger, crashed_target, systemd, crash_write=k if what == "write" else None,
                           crash_commit=k if what == "commit" else None) is None, (phase, what, k)
                if then == "same":
                    run(base, ledger, crashed_target, systemd)
                    assert snapshot(base, systemd) == (isolated if phase == "isolate" else original), \
                        (phase, what, k)
                    assert not ledger.disk.pending
                run(base, ledger, IsolationTarget(), systemd)
                assert snapshot(base, systemd) == original, (phase, what, k, then)
                assert ledger.disk.empty, (phase, what, k, then, ledger.disk)


# --- random sequences with crashes ----------------------------------------------------------------------

VMS = {"A": ({1}, HostSpec(isolate=True, irqs=True, governor="performance")),
       "B": ({2}, HostSpec(isolate=True, irqs=False, governor=None)),
       "C": ({3}, HostSpec(isolate=False, irqs=True, governor="powersave"))}
# A step toggles one VM; it may crash before one of its host writes (about 20 at most) or commits (2).
step = st.tuples(st.sampled_from(sorted(VMS)),
                 st.one_of(st.none(), st.tuples(st.just("write"), st.integers(1, 20)),
                           st.tuples(st.just("commit"), st.integers(1, 2))))


Host = Callable[[str], tuple[Path, dict[str, str]]]
Reference = Callable[[str, frozenset[str]], dict[str, str]]


@pytest.fixture(scope="module")
def shared_host(tmp_path_factory: pytest.TempPathFactory) -> Host:
    """One host tree per backend for all examples: each ends with the host back at its original (asserted);
    after a failed one, the next example starts from a fresh tree."""
    hosts: dict[str, tuple[Path, dict[str, str]]] = {}

    def get(backend: str) -> tuple[Path, dict[str, str]]:
        if backend not in hosts or snapshot(hosts[backend][0]) != hosts[backend][1]:
            base = tmp_path_factory.mktemp(f"host-{backend}")
            build(base, backend)
            hosts[backend] = base, snapshot(base)
        return hosts[backend]
    return get


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """The host each set of running VMs should leave, from scratch (snapshots are relative paths)."""
    cache: dict[tuple[str, frozenset[str]], dict[str, str]] = {}

    def get(backend: str, running: frozenset[str]) -> dict[str, str]:
        if (backend, running) not in cache:
            base = tmp_path_factory.mktemp("reference")
            build(base, backend)
            run(base, Ledger(), target_for(VMS[v] for v in sorted(running)))
            cache[backend, running] = snapshot(base)
        return cache[backend, running]
    return get


@settings(max_examples=15, deadline=None)
@given(steps=st.lists(step, min_size=1, max_size=8), backend=st.sampled_from(["cgroup1", "cgroup2"]))
def test_random_vm_sequences_with_crashes(shared_host: Host, reference: Reference,
                                          steps: list[tuple[str, tuple[str, int] | None]], backend: str) -> None:
    base, original = shared_host(backend)
    ledger = Ledger()
    running: set[str] = set()
    for vm, crash in steps:
        running ^= {vm}
        target = target_for(VMS[v] for v in sorted(running))
        write = crash[1] if crash is not None and crash[0] == "write" else None
        commit = crash[1] if crash is not None and crash[0] == "commit" else None
        if run(base, ledger, target, crash_write=write, crash_commit=commit) is not None:
            assert snapshot(base) == reference(backend, frozenset(running))
    run(base, ledger, IsolationTarget())
    assert snapshot(base) == original and ledger.disk.empty
