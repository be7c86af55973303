"""Host isolation on the host: read and write each isolation key, and converge the host on a target, crash-safely.

:class:`HostSettings` is the thin adapter: one method to read a key, one to write it and read it back, every
host path under a root given to its constructor, and four seams (``_read_file``, ``_write_file``, ``_mkdir``,
``_rmdir``) plus an injectable command runner, so tests play the kernel and systemd on fake trees. Host tasks
are kept off the isolated CPUs by whatever the host has (:attr:`HostSettings.backend`):

- ``systemd``: runtime ``AllowedCPUs=`` on system.slice, user.slice and init.scope (systemd owns the cgroup
  tree there; moving tasks behind its back would be undone at the next unit start);
- ``cgroup2`` / ``cgroup1``: a cpuset of our own, ``kvmhooks-host``, beside libvirt's ``machine``, holding
  every movable task of the root cpuset (what ``cset shield`` does); removed, tasks back in the root, at the end;
- ``none``: nothing to keep tasks with; IRQs, work queues and governors are still handled.

:func:`converge` is the only algorithm: read every relevant key, settle what a crash or the admin left
(:func:`kvmhooks.plan.isolation.settle`), commit the originals and write-ahead intents, write, commit the
read-backs and forget what is back at its original. Whatever point a process dies at, the next converge from
the last committed state finishes the job; an empty target puts every key back to the admin's value.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import functools
import logging
import os
import re
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kvmhooks.errors import ApplyError, Gone, KvmhooksError, Unmovable
from kvmhooks.plan.isolation import (
    GOVERNOR_PREFIX,
    INCOMPLETE,
    IRQ_DEFAULT,
    SUBTREE,
    TASKS,
    UNIT_PREFIX,
    WORKQUEUE,
    IsolationState,
    IsolationTarget,
    changes,
    equivalent,
    forgettable,
    is_restore,
    key_cpu,
    kind,
    order,
    original_of,
    parse_list,
    same_list,
    settle,
)
from kvmhooks.units import format_cpuset, parse_cpuset

log = logging.getLogger(__name__)

Runner = Callable[[list[str]], str]

# Our cpuset, beside libvirt's "machine" (cset shield calls its own "system").
SHIELD = "kvmhooks-host"
# The systemd units holding every host task (machine.slice, where libvirt puts VMs, is deliberately absent).
SYSTEMD_UNITS = ("system.slice", "user.slice", "init.scope")
# libvirt places VMs relative to its daemons' cgroups, and QEMU is libvirt's to place: none of them move. Who
# is who is decided from what only root controls (the executable, the real uid, the cgroup), never from the
# name (/proc/PID/comm, stat's second field), which any process sets for itself (prctl PR_SET_NAME).
LIBVIRT_DAEMONS = frozenset({"libvirtd", "virtqemud", "virtlogd", "virtlockd"})
# QEMU as distributions install it: qemu-system-ARCH, and RHEL's /usr/libexec/qemu-kvm.
_QEMU_RE = re.compile(r"qemu-system-[a-z0-9_]+|qemu-kvm")
# Where distributions install those binaries: directories only root can write to.
SYSTEM_BIN_DIRS = frozenset({"/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/libexec", "/usr/local/sbin",
                             "/usr/local/bin"})
# What the kernel appends to /proc/PID/exe when the binary was replaced since exec (a package upgrade).
_DELETED = " (deleted)"
# libvirt's QEMU state directory: libvirtd chowns it to qemu.conf's user at start (qemuStateInitialize), so its
# owner is the user QEMU runs as (libvirt-qemu on Debian, qemu on Fedora, or whatever the admin chose).
QEMU_STATE_DIR = Path("/var/lib/libvirt/qemu")
# include/linux/sched.h: the task is a kernel thread (stat field 9).
PF_KTHREAD = 0x00200000
KTHREADD_PID = 2
# What the kernel answers for an IRQ whose affinity it manages itself (EIO: managed or per-CPU IRQs, EPERM:
# chips that cannot set affinity, ENOSPC: no free vector on the new CPUs, x86).
_UNMOVABLE_ERRNOS = frozenset({errno.EIO, errno.EPERM, errno.ENOSPC})
# A pid write that fails because of the cgroup itself (its file is gone, v1 cpuset without cpus or mems):
# the move stops. Any other errno is about that one task (EINVAL: per-CPU kernel threads; ESRCH: it exited;
# EBUSY: a SCHED_DEADLINE task the new cpuset cannot take; EPERM/EACCES: another namespace's): counted and
# skipped, and the other tasks still move.
_CGROUP_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENOSPC})
# The total time systemctl calls may take in one converge: it runs under the ledger lock, whose waiters give
# up after lock_timeout (30 s by default).
COMMAND_BUDGET = 10.0
# systemctl talks to PID 1 over D-Bus: milliseconds normally; a hook must not hang on a stuck manager.
_COMMAND_TIMEOUT = 5.0
# Tasks forked while the shield is emptied land in it; a few rounds catch them before the rmdir.
_UNSHIELD_ROUNDS = 5


def run_command(argv: list[str]) -> str:
    """Run a command and return its standard output (the default runner of :class:`HostSettings`).

    :raise ApplyError: when it cannot be run, fails or outlives its timeout.
    """
    try:
        return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT).stdout
    except subprocess.CalledProcessError as e:
        raise ApplyError(f"{' '.join(argv)} failed ({(e.stderr or '').strip()[:200] or e.returncode})") from e
    except (OSError, subprocess.SubprocessError) as e:
        raise ApplyError(f"cannot run {' '.join(argv)}", e) from e


def irqbalance_running(proc_root: Path = Path("/proc")) -> bool:
    """Whether irqbalance runs: it moves IRQs back onto isolated CPUs unless told to keep off them
    (``IRQBALANCE_BANNED_CPULIST`` in /etc/default/irqbalance), so status and doctor say so.

    Decided from the name, which any process can take: this only adds advice to a report, never changes
    what is moved or written."""
    try:
        entries = list(proc_root.iterdir())
    except OSError:
        return False
    for entry in entries:
        if not entry.name.isdecimal():
            continue
        try:
            if (entry / "comm").read_text(errors="replace").strip() == "irqbalance":
                return True
        except OSError:
            continue
    return False


class HostSettings:
    """Every isolation key of one host: read, write (with read-back) and list the relevant ones.

    ``moved`` and ``skipped`` count the tasks moved between cpusets and the pid writes the kernel refused,
    over the life of the object (:func:`converge` reports the difference).
    """

    def __init__(self, proc_root: Path = Path("/proc"), sysfs_root: Path = Path("/sys"),
                 cgroup_root: Path = Path("/sys/fs/cgroup"), run_root: Path = Path("/run"),
                 runner: Runner = run_command, qemu_state_dir: Path = QEMU_STATE_DIR):
        self.proc_root = proc_root
        self.sysfs_root = sysfs_root
        self.cgroup_root = cgroup_root
        self.run_root = run_root
        self.qemu_state_dir = qemu_state_dir
        self.runner = runner
        self.moved = 0
        self.skipped = 0
        self.command_budget = COMMAND_BUDGET  # seconds left for commands (each has its own timeout too)

    # --- what the host has ------------------------------------------------------------------------------

    @functools.cached_property
    def backend(self) -> str:
        """How host tasks are kept off CPUs here: "systemd", "cgroup2", "cgroup1" or "none".

        systemd when it runs (it owns the cgroup tree), except on a hybrid host whose cpuset controller is on
        cgroup v1: systemd's AllowedCPUs= needs it on v2, and leaves the v1 cpuset hierarchy alone. Detected
        once per object: a host does not change its init system or cgroup layout under a running hook.
        """
        v2 = self._v2_cpuset()
        v1 = (self.cgroup_root / "cpuset" / "cpuset.cpus").is_file()
        if (self.run_root / "systemd" / "system").is_dir() and (v2 or not v1):
            return "systemd"
        if v2:
            return "cgroup2"
        return "cgroup1" if v1 else "none"

    def _v2_cpuset(self) -> bool:
        try:
            return "cpuset" in (self.cgroup_root / "cgroup.controllers").read_text(errors="replace").split()
        except OSError:
            return False

    def online(self) -> frozenset[int]:
        """The online CPUs (the fallback when isolation would leave an affinity empty)."""
        path = self.sysfs_root / "devices/system/cpu/online"
        text = self._read_file(path)
        try:
            return parse_cpuset(text)
        except ValueError as e:
            raise ApplyError(f"cannot read {path}", e) from e

    def keys(self, target: IsolationTarget) -> list[str]:
        """Every key this host has that ``target`` concerns, plus a leftover shield of ours (so an empty
        target still removes one left by a lost ledger)."""
        out: list[str] = []
        backend = self.backend
        if target.tasks:
            if backend == "systemd":
                out += [UNIT_PREFIX + unit for unit in SYSTEMD_UNITS]
            elif backend == "cgroup2":
                out += [SUBTREE, TASKS]
            elif backend == "cgroup1":
                out.append(TASKS)
            if self._path(WORKQUEUE).is_file():
                out.append(WORKQUEUE)
        if target.irqs:
            if self._path(IRQ_DEFAULT).is_file():
                out.append(IRQ_DEFAULT)
            out += [f"irq:{n}" for n in self._irqs()]
        out += [f"{GOVERNOR_PREFIX}{cpu}" for cpu in sorted(target.governors)  # (per policy: effective())
                if self._path(f"{GOVERNOR_PREFIX}{cpu}").is_file()]
        if TASKS not in out and backend in ("cgroup1", "cgroup2") and self._shield().is_dir():
            out.append(TASKS)
        return out

    def effective(self, target: IsolationTarget) -> IsolationTarget:
        """``target`` with its governors as this host can apply them: one per cpufreq policy, named after the
        policy's first CPU, and only where every CPU of the policy asks for the same governor.

        CPUs often share a policy (a cluster, or acpi-cpufreq's shared coordination): writing one CPU's
        governor sets them all, so a policy that also drives a CPU not asking for that governor is left
        alone (a VM never changes the governor of a CPU that is not its own).
        """
        governors: dict[int, str] = {}
        for cpu in sorted(target.governors):
            policy = self._policy(cpu)
            if policy is None:
                continue  # no cpufreq on that CPU
            if all(target.governors.get(c) == target.governors[cpu] for c in policy):
                governors[min(policy)] = target.governors[cpu]
            else:
                log.info("isolation: governor of CPU %d left alone: its cpufreq policy also drives CPU(s) %s",
                         cpu, format_cpuset(policy - set(target.governors)))
        return dataclasses.replace(target, governors=governors)

    def _policy(self, cpu: int) -> frozenset[int] | None:
        """The CPUs sharing ``cpu``'s cpufreq policy (``cpuN/cpufreq`` links to one ``policyM`` directory)."""
        base = self.sysfs_root / "devices/system/cpu"
        link = base / f"cpu{cpu}" / "cpufreq"
        if not (link / "scaling_governor").is_file():
            return None
        real = os.path.realpath(link)
        members = {cpu}
        with contextlib.suppress(ValueError):
            members |= {int(w) for w in self._read_opt(link / "affected_cpus").split()}
        for other in self.online():
            if other != cpu and os.path.realpath(base / f"cpu{other}" / "cpufreq") == real:
                members.add(other)
        return frozenset(members)

    def irq_keys(self) -> list[str]:
        """Every IRQ's key (a restore also looks at IRQs requested while the host was isolated)."""
        return [f"irq:{n}" for n in self._irqs()]

    def _irqs(self) -> list[int]:
        try:
            entries = list((self.proc_root / "irq").iterdir())
        except OSError:
            return []
        return sorted(int(e.name) for e in entries
                      if e.name.isascii() and e.name.isdecimal() and (e / "smp_affinity_list").exists())

    def _path(self, key: str) -> Path:
        """The file behind a file-backed key; a key naming anything else (a corrupt ledger) is refused."""
        if key == IRQ_DEFAULT:
            return self.proc_root / "irq/default_smp_affinity"
        if key == WORKQUEUE:
            return self.sysfs_root / "devices/virtual/workqueue/cpumask"
        n = key_cpu(key)
        if n is not None and kind(key) == "irq":
            return self.proc_root / "irq" / str(n) / "smp_affinity_list"
        if n is not None and kind(key) == "governor":
            return self.sysfs_root / "devices/system/cpu" / f"cpu{n}" / "cpufreq/scaling_governor"
        raise ApplyError(f"unknown isolation setting {key[:64]!r}")

    # --- read and write ---------------------------------------------------------------------------------

    def read(self, key: str) -> str:
        """What ``key`` reads now.

        :raise Gone: the setting does not exist (any more).
        :raise ApplyError: it cannot be read.
        """
        k = kind(key)
        if k == "unit":
            value = self._run(["systemctl", "show", "-p", "AllowedCPUs", "--value", self._unit(key)]).strip()
            return value or self._stale_cpus(key)
        if k == "subtree":
            return "on" if "cpuset" in self._read_file(self.cgroup_root / "cgroup.subtree_control").split() \
                else "off"
        if k == "tasks":
            if self.backend not in ("cgroup1", "cgroup2"):
                raise Gone("no cgroup cpuset on this host")
            shield = self._shield()
            if not shield.is_dir():
                return ""
            return self._read_opt(shield / "cpuset.cpus") or INCOMPLETE
        return self._read_file(self._path(key))

    def write(self, key: str, value: str) -> str:
        """Set ``key`` to ``value`` and return what it reads back.

        ``tasks`` is an operation rather than a file: a CPU list creates or updates our cpuset and moves
        every movable root task into it; "" moves every task back to the root and removes the cpuset. Both
        are idempotent, so a second call finishes what a crash interrupted.

        :raise Unmovable: the kernel refused to move this IRQ.
        :raise Gone: the setting does not exist (any more).
        :raise ApplyError: any other failure.
        """
        k = kind(key)
        if k == "unit":
            self._run(["systemctl", "set-property", "--runtime", self._unit(key), f"AllowedCPUs={value}"])
            if not value.strip() and self._stale_cpus(key):  # systemd will not write it: the kernel's file is ours
                self._write_or_raise(self._unit_cgroup(key) / "cpuset.cpus",
                                     self._read_opt(self.cgroup_root / "cpuset.cpus.effective"))
        elif k == "subtree":
            self._write_or_raise(self.cgroup_root / "cgroup.subtree_control", "+cpuset" if value == "on"
                                 else "-cpuset")
        elif k == "tasks":
            if self.backend not in ("cgroup1", "cgroup2"):
                raise Gone("no cgroup cpuset on this host")
            if value:
                self._build_shield(value)
            else:
                self._remove_shield()
        else:
            path = self._path(key)
            try:
                self._write_file(path, value + "\n")
            except FileNotFoundError as e:
                raise Gone(f"{path} is gone", e) from e
            except OSError as e:
                if k in ("irq", "irqmask") and e.errno in _UNMOVABLE_ERRNOS:
                    raise Unmovable(f"the kernel keeps {path} where it is", e) from e
                raise ApplyError(f"cannot write {value!r} to {path}", e) from e
        return self.read(key)

    def sweep_tasks(self) -> None:
        """Move root tasks that appeared since the shield was built (or that a crash left behind) into it."""
        shield = self._shield()
        if self.backend in ("cgroup1", "cgroup2") and shield.is_dir() and self._read_opt(shield / "cpuset.cpus"):
            self._move_root_tasks()

    # --- systemd ----------------------------------------------------------------------------------------

    def _unit(self, key: str) -> str:
        unit = key[len(UNIT_PREFIX):]
        if unit not in SYSTEMD_UNITS:  # never pass a ledger's word to systemctl unchecked
            raise ApplyError(f"unknown isolation setting {key[:64]!r}")
        return unit

    def _unit_cgroup(self, key: str) -> Path:
        return self.cgroup_root / self._unit(key)  # (the three units sit directly under the root)

    def _stale_cpus(self, key: str) -> str:
        """The CPUs the kernel still confines a unit to while systemd says it has no ``AllowedCPUs=``; "" when
        it confines it to nothing less than every CPU.

        systemd (252, seen in the systemd test guest) does not write a unit's cpuset.cpus when its
        AllowedCPUs= is emptied: while another unit under the root keeps the cpuset controller enabled (an
        admin's AllowedCPUs=, a sibling not restored yet, libvirt's pinned VMs), the kernel keeps confining
        the unit's tasks to the last CPUs written. The restore must then write the kernel's file itself.
        """
        cpus = self._read_opt(self._unit_cgroup(key) / "cpuset.cpus")
        every = self._read_opt(self.cgroup_root / "cpuset.cpus.effective")
        return cpus if cpus and every and not same_list(cpus, every) else ""

    def dropin(self, key: str) -> Path:
        """The runtime drop-in ``systemctl set-property --runtime`` writes for a unit key."""
        return self.run_root / "systemd/system.control" / f"{self._unit(key)}.d" / "50-AllowedCPUs.conf"

    def remove_dropin(self, key: str) -> None:
        """Remove our runtime drop-in (the runtime value is already the original; systemd reads its files at
        the next daemon-reload, when the admin's own configuration applies again, as without kvmhooks)."""
        path = self.dropin(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as e:
            raise ApplyError(f"cannot remove {path}", e) from e
        with contextlib.suppress(OSError):  # the directories only if empty: other drop-ins (the admin's) stay
            path.parent.rmdir()
            path.parent.parent.rmdir()

    def _run(self, argv: list[str]) -> str:
        if self.command_budget <= 0:
            raise ApplyError(f"{' '.join(argv)} not run: systemctl already took {COMMAND_BUDGET:g} s in this "
                             "operation (retried at the next one)")
        t0 = time.monotonic()
        try:
            return self.runner(argv)
        except KvmhooksError:
            raise
        except (OSError, subprocess.SubprocessError) as e:
            raise ApplyError(f"{' '.join(argv)} failed", e) from e
        finally:
            self.command_budget -= time.monotonic() - t0

    # --- our cpuset (cgroup v1 and v2) ------------------------------------------------------------------

    def _cpuset_root(self) -> Path:
        return self.cgroup_root / "cpuset" if self.backend == "cgroup1" else self.cgroup_root

    def _shield(self) -> Path:
        return self._cpuset_root() / SHIELD

    def _procs(self) -> str:
        """v1 lists (and moves) threads in ``tasks``; v2 moves whole processes through ``cgroup.procs``."""
        return "tasks" if self.backend == "cgroup1" else "cgroup.procs"

    def _build_shield(self, value: str) -> None:
        root, shield = self._cpuset_root(), self._shield()
        if not shield.is_dir():
            try:
                self._mkdir(shield)
            except OSError as e:
                raise ApplyError(f"cannot create {shield}", e) from e
        # v1 refuses tasks in a cpuset without memory nodes; v2 reads empty mems as "the parent's".
        mems = self._read_opt(root / ("cpuset.mems" if self.backend == "cgroup1" else "cpuset.mems.effective"))
        if mems and not same_list(self._read_opt(shield / "cpuset.mems"), mems):
            self._write_or_raise(shield / "cpuset.mems", mems)
        if not same_list(self._read_opt(shield / "cpuset.cpus"), value):  # mems first: cpus means done
            self._write_or_raise(shield / "cpuset.cpus", value)
        self._move_root_tasks()

    def _remove_shield(self) -> None:
        root, shield = self._cpuset_root(), self._shield()
        if not shield.is_dir():
            return
        for _ in range(_UNSHIELD_ROUNDS):
            pids = self._pids(shield / self._procs())
            if not pids:
                break
            for pid in pids:
                self._move(pid, root / self._procs())
        try:
            self._rmdir(shield)
        except OSError as e:
            raise ApplyError(f"cannot remove {shield} (tasks still in it?)", e) from e

    def _move_root_tasks(self) -> None:
        root, shield = self._cpuset_root(), self._shield()
        for pid in self._pids(root / self._procs()):
            if self._movable(pid):
                self._move(pid, shield / self._procs())

    def _move(self, pid: int, procs: Path) -> None:
        """Move one task; the kernel refusing that task alone is counted, not an error."""
        try:
            self._write_file(procs, str(pid))
        except OSError as e:
            if e.errno in _CGROUP_ERRNOS:
                raise ApplyError(f"cannot move task {pid} to {procs}", e) from e
            self.skipped += 1
            log.debug("task %d not moved to %s: %s", pid, procs, e)
            return
        self.moved += 1

    def _pids(self, path: Path) -> list[int]:
        return [int(w) for w in self._read_opt(path).split() if w.isascii() and w.isdecimal()]

    def _movable(self, pid: int) -> bool:
        """A user-space task that is not libvirt's: kernel threads stay where the kernel put them, and
        libvirt places QEMU relative to its own daemons (:meth:`libvirts`)."""
        stat = self._read_opt(self.proc_root / str(pid) / "stat")
        fields = stat.rpartition(")")[2].split()  # (the name may hold ")" and spaces: the last ")" ends it)
        if len(fields) < 7 or not fields[1].isdecimal() or not fields[6].isdecimal():
            return False  # exited, or unreadable: leave it
        # PF_KTHREAD is the kernel's own flag, and only kernel threads are kthreadd's children
        if pid == KTHREADD_PID or int(fields[1]) == KTHREADD_PID or int(fields[6]) & PF_KTHREAD:
            return False
        return not self.libvirts(pid)

    def libvirts(self, pid: int) -> bool:
        """Whether task ``pid`` (a process, or a thread's id) is libvirt's, from what no user can forge:

        - it is in a cgroup libvirt made for a VM, in any hierarchy (only root can write a task there);
        - or its executable is one of libvirt's daemons in a system directory and it runs as root;
        - or its executable is QEMU in a system directory and it runs as the QEMU user (the owner of libvirt's
          QEMU state directory: root too, if qemu.conf says so). A QEMU someone runs by hand, as root or
          not, is not libvirt's and moves like any host task.

        The name (comm) is never looked at. The owner check is what stops a user who runs the real binary
        (a session libvirtd or QEMU) or shows a binary of their own at that path from a mount namespace.
        """
        if any(_libvirt_vm_cgroup(path) for path in self._cgroups(pid)):
            return True
        exe, uid = self._exe(pid), self._uid(pid)
        if exe is None or uid is None:
            return False
        directory, _, name = exe.rpartition("/")
        if directory not in SYSTEM_BIN_DIRS:
            return False
        if name in LIBVIRT_DAEMONS:
            return uid == 0
        return _QEMU_RE.fullmatch(name) is not None and uid == self._qemu_uid

    def _exe(self, pid: int) -> str | None:
        """The task's executable as the kernel names it (None for a kernel thread, or a task that exited)."""
        try:
            exe = os.readlink(self.proc_root / str(pid) / "exe")
        except OSError:
            return None
        return exe.removesuffix(_DELETED)  # still the binary libvirt started, before an upgrade replaced it

    def _uid(self, pid: int) -> int | None:
        """The task's real uid (/proc/PID/status "Uid:" real, effective, saved, fs)."""
        for line in self._read_opt(self.proc_root / str(pid) / "status").splitlines():
            name, _, value = line.partition(":")
            if name == "Uid":
                real = value.split()[:1]
                return int(real[0]) if real and real[0].isascii() and real[0].isdecimal() else None
        return None

    def _cgroups(self, pid: int) -> list[str]:
        """The task's cgroup in every hierarchy (/proc/PID/cgroup lines "ID:controllers:/path")."""
        return [line.split(":", 2)[2] for line in self._read_opt(self.proc_root / str(pid) / "cgroup").splitlines()
                if line.count(":") >= 2]

    @functools.cached_property
    def _qemu_uid(self) -> int | None:
        try:
            return self.qemu_state_dir.stat().st_uid
        except OSError:
            return None  # no libvirt QEMU driver here: only a VM cgroup says a QEMU is libvirt's

    # --- the seams: every host access passes here ---------------------------------------------------------

    def _read_file(self, path: Path) -> str:
        try:
            # Any process may name itself with bytes that are not UTF-8 (/proc/PID/comm): never a reason to fail.
            return path.read_text(errors="surrogateescape").strip()
        except FileNotFoundError as e:
            raise Gone(f"{path} does not exist", e) from e
        except OSError as e:
            raise ApplyError(f"cannot read {path}", e) from e

    def _read_opt(self, path: Path) -> str:
        """A file's text, or "" when it cannot be read (a task that exited, a control file not there yet)."""
        try:
            return self._read_file(path)
        except ApplyError:
            return ""

    def _write_or_raise(self, path: Path, text: str) -> None:
        try:
            self._write_file(path, text)
        except OSError as e:
            raise ApplyError(f"cannot write {text!r} to {path}", e) from e

    def _write_file(self, path: Path, text: str) -> None:
        """One write() of the whole text to an existing file, as kernel interfaces need (never creates one:
        a wrong path must fail, not leave a stray file in /proc)."""
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            data = text.encode()
            if os.write(fd, data) != len(data):
                raise OSError(errno.EIO, f"short write to {path}")
        finally:
            os.close(fd)

    def _mkdir(self, path: Path) -> None:
        """cgroupfs fills a new directory with its control files."""
        path.mkdir()

    def _rmdir(self, path: Path) -> None:
        """cgroupfs removes a directory with its control files, once no task is left in it."""
        path.rmdir()


@dataclass(frozen=True)
class IsolationReport:
    """What one :func:`converge` did, for the log, ``kvmhooks status`` and ``kvmhooks plan``."""

    isolated: frozenset[int]
    backend: str
    changed: tuple[str, ...] = ()  # keys written (or, in a dry run, that would be)
    unmovable: tuple[str, ...] = ()  # keys the kernel refused, left as they were
    failed: Mapping[str, str] = field(default_factory=dict, hash=False)  # key → error; retried next time
    tasks_moved: int = 0
    tasks_skipped: int = 0
    irqbalance: bool = False
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.failed


def _no_commit() -> None:
    """A dry run commits nothing."""


def _gone(state: IsolationState, key: str) -> None:
    """The setting vanished (an IRQ freed, a CPU unplugged): forget it; an IRQ requested again later is a new
    one, which got the default mask of that moment."""
    state.forget(key)
    n = key_cpu(key)
    if kind(key) == "irq" and n in state.irqs_before:
        state.irqs_before.remove(n)


def _unmovable(state: IsolationState, key: str, why: str) -> None:
    """The kernel kept the key as it was: nothing of ours there, unless an earlier write of ours landed."""
    log.info("isolation: %s is not movable (%s); left as it is", key, why)
    state.pending.pop(key, None)
    if key not in state.wrote:
        state.saved.pop(key, None)
    if key not in state.unmovable:
        state.unmovable.append(key)


def converge(state: IsolationState, target: IsolationTarget, host: HostSettings, commit: Callable[[], None],
             record: Callable[[str, str], None] | None = None) -> IsolationReport:
    """Bring the host to ``target`` and ``state`` (part of the ledger) in line with the host, crash-safely.

    The caller holds the ledger lock; ``commit()`` writes the ledger, ``state`` included, durably. The
    originals and intents of every key about to change are committed before the first write and the
    read-backs after the last, so a process dying anywhere leaves either intents the next call resolves by
    reading the host, or a state that already says it all. A key that fails is reported in
    :attr:`IsolationReport.failed`, kept in the state and retried next time; the others go on (a restore
    must do as much as it can). With ``record``, nothing is written or committed: every write is passed to
    it instead (``kvmhooks plan``), and ``state`` is left untouched.
    """
    if record is not None:
        state = copy.deepcopy(state)
        commit = _no_commit
    before = state.to_json()
    target = host.effective(target)
    online = host.online()
    backend = host.backend
    failed: dict[str, str] = {}
    notes: list[str] = []

    # 1. read every key we hold and every key the target concerns
    committed = before  # what the ledger holds now (the final commit compares with this)

    def commit_now() -> None:
        nonlocal committed
        commit()
        committed = state.to_json()

    keys = set(state.saved) | set(state.pending) | set(state.wrote) | set(host.keys(target))
    if IRQ_DEFAULT in state.wrote:  # IRQs requested meanwhile got our default mask: they go back with it
        keys |= set(host.irq_keys())
    current: dict[str, str] = {}
    for key in sorted(keys, key=order):
        try:
            current[key] = host.read(key)
        except Gone as e:
            log.info("isolation: %s is gone (%s); nothing to restore there", key, e)
            _gone(state, key)
        except KvmhooksError as e:
            failed[key] = str(e)

    # 2. settle what a crash or the admin left
    for key, value in current.items():
        note = settle(state, key, value)
        if note is not None:
            log.warning("isolation: %s", note)
            notes.append(note)

    # 3. originals and intents, committed before any write
    todo = changes(state, current, target, online)
    if IRQ_DEFAULT in todo and IRQ_DEFAULT not in state.saved:  # the default mask becomes ours now
        state.irqs_before = sorted(n for k in current if kind(k) == "irq" and (n := key_cpu(k)) is not None)
    for key, value in todo.items():
        if kind(key) == "unit" and key not in state.saved and key not in state.dropins \
                and not host.dropin(key).exists():
            state.dropins.append(key)  # set-property is about to create it: ours to remove at the end
        state.saved.setdefault(key, original_of(key, current[key], state))
        state.pending[key] = value
    if todo:
        commit_now()

    # 4. write: changes in order, then restores in reverse order
    moved, skipped = host.moved, host.skipped
    forward = sorted((k for k in todo if not is_restore(state, k, todo[k])), key=order)
    backward = sorted((k for k in todo if is_restore(state, k, todo[k])), key=order, reverse=True)
    changed: list[str] = []
    for key in forward + backward:
        value = todo[key]
        if record is not None:
            record(key, value)
            got = value
        else:
            log.info("isolation: %s %r → %r", key, current[key], value)
            try:
                got = host.write(key, value)
            except Unmovable as e:
                _unmovable(state, key, str(e))
                continue
            except Gone as e:
                log.info("isolation: %s is gone (%s)", key, e)
                _gone(state, key)
                current.pop(key)
                continue
            except KvmhooksError as e:
                failed[key] = str(e)
                log.warning("isolation: %s", e)
                try:  # did it land? settle it now; if even that fails, the intent stays for next time
                    current[key] = host.read(key)
                    settle(state, key, current[key])
                except KvmhooksError:
                    current.pop(key)
                continue
            if kind(key) in ("irq", "irqmask") and not equivalent(key, got, value) \
                    and equivalent(key, got, current[key]):
                _unmovable(state, key, f"read back {got!r} after writing {value!r}")
                continue
        state.pending.pop(key, None)
        state.wrote[key] = got
        current[key] = got
        changed.append(key)

    # tasks that appeared in the root since the shield was built (or a crash left there) join it
    shielded = bool(target.tasks) and TASKS in current and current[TASKS] != INCOMPLETE \
        and bool(_cpus_or_empty(current[TASKS]))
    if record is None and shielded and TASKS not in todo:
        try:
            host.sweep_tasks()
        except KvmhooksError as e:
            failed[TASKS] = str(e)
    if record is None and (TASKS in changed or (shielded and TASKS not in todo)):
        state.skipped_tasks = host.skipped - skipped

    # 5. forget what is back at its original for good (a drop-in of ours goes with it)
    for key in forgettable(state, current, target, online):
        if key in state.dropins and record is None:
            try:
                host.remove_dropin(key)
            except KvmhooksError as e:
                failed[key] = str(e)
                continue  # kept: tried again next time
        if key in state.dropins:
            state.dropins.remove(key)
        state.forget(key)
    for key in [k for k in state.dropins if k not in state.saved]:  # (a crash after the drop-in went)
        if record is None:
            with contextlib.suppress(KvmhooksError):
                host.remove_dropin(key)
        state.dropins.remove(key)
    if target.empty:
        state.unmovable.clear()  # refused for this isolation; the next one tries again
    if IRQ_DEFAULT not in state.saved:
        state.irqs_before = []
    if not target.tasks:
        state.skipped_tasks = 0
    state.isolated = sorted(target.cpus)
    if state.to_json() != committed:
        commit_now()

    if target.tasks and backend == "none":
        notes.append("no cpuset controller; host tasks not moved")
    running = bool(target.irqs) and irqbalance_running(host.proc_root)
    if running:
        notes.append(f"irqbalance runs and may move IRQs back: add IRQBALANCE_BANNED_CPULIST="
                     f"{format_cpuset(target.irqs)} to /etc/default/irqbalance and restart it")
    return IsolationReport(target.cpus, backend, tuple(changed), tuple(state.unmovable), failed,
                           host.moved - moved, host.skipped - skipped, running, tuple(notes))


def _libvirt_vm_cgroup(path: str) -> bool:
    """A cgroup libvirt made for a QEMU VM, from the root of the hierarchy: /machine.slice/machine-qemu\\x2d….scope
    (with systemd) or /machine/qemu-….libvirt-qemu (without). Only root can create or fill those; the same names
    deeper down (in a user's delegated subtree) prove nothing."""
    parts = path.split("/")
    if len(parts) < 3 or parts[0]:
        return False
    top, vm = parts[1], parts[2]
    return (top == "machine.slice" and vm.startswith("machine-qemu") and vm.endswith(".scope")) or \
        (top == "machine" and vm.endswith(".libvirt-qemu"))


def _cpus_or_empty(text: str) -> frozenset[int]:
    try:
        return parse_list(text)
    except ValueError:
        return frozenset()
