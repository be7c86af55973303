"""Read the host (sysfs, procfs) into an immutable snapshot the planners work on.

Every path is under ``sysfs_root``/``proc_root`` so tests build fake trees; nothing here writes.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from kvmhooks.errors import HostError
from kvmhooks.units import parse_cpuset


@dataclass(frozen=True)
class PoolState:
    nr: int  # nr_hugepages (persistent + surplus)
    free: int
    surplus: int

    @property
    def in_use(self) -> int:
        return self.nr - self.free


@dataclass(frozen=True)
class Node:
    id: int
    cpus: frozenset[int]
    mem_total_kib: int
    mem_free_kib: int
    # Page cache and reclaimable slab the kernel can give up when asked (drop_caches, compaction).
    reclaimable_kib: int
    pools: dict[int, PoolState] = field(default_factory=dict)  # page size KiB → state

    @property
    def available_kib(self) -> int:
        return self.mem_free_kib + self.reclaimable_kib


@dataclass(frozen=True)
class Cpu:
    id: int
    node: int
    core: int
    package: int
    siblings: frozenset[int]


@dataclass(frozen=True)
class HostTopology:
    nodes: dict[int, Node]
    cpus: dict[int, Cpu]  # online CPUs only
    page_sizes: frozenset[int]  # supported huge page sizes, KiB
    default_page_kib: int
    hugetlbfs: dict[int, str]  # page size KiB → a mount point
    # page size KiB → pages reserved by mappings but not yet faulted in (host-wide: the kernel counts
    # them as free, yet they are promised)
    resv_pages: dict[int, int] = field(default_factory=dict)

    @property
    def online(self) -> frozenset[int]:
        return frozenset(self.cpus)

    @property
    def smt(self) -> bool:
        return any(len(c.siblings) > 1 for c in self.cpus.values())


def _read(path: Path, default: str | None = None) -> str:
    try:
        return path.read_text()
    except OSError:
        if default is None:
            raise
        return default


def _meminfo(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"(?:Node \d+ )?([\w()]+):\s+(\d+)", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def _int_file(path: Path, default: int = 0) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return default


def read_pool(sysfs_root: Path, node: int, size_kib: int) -> PoolState:
    d = pool_dir(sysfs_root, node, size_kib)
    return PoolState(_int_file(d / "nr_hugepages"), _int_file(d / "free_hugepages"),
                     _int_file(d / "surplus_hugepages"))


def pool_dir(sysfs_root: Path, node: int, size_kib: int) -> Path:
    return sysfs_root / "devices/system/node" / f"node{node}" / "hugepages" / f"hugepages-{size_kib}kB"


def read_topology(sysfs_root: Path = Path("/sys"), proc_root: Path = Path("/proc")) -> HostTopology:
    """Snapshot of NUMA nodes, CPUs, hugepage pools and hugetlbfs mounts."""
    node_root = sysfs_root / "devices/system/node"
    if not node_root.is_dir():
        raise HostError(f"{node_root} is missing: kvmhooks needs a NUMA-aware kernel (CONFIG_NUMA)")
    page_sizes = frozenset(int(m.group(1)) for p in (sysfs_root / "kernel/mm/hugepages").glob("hugepages-*kB")
                           if (m := re.fullmatch(r"hugepages-(\d+)kB", p.name)))
    online_text = _read(sysfs_root / "devices/system/cpu/online", "").strip()
    online = parse_cpuset(online_text) if online_text else frozenset()
    nodes: dict[int, Node] = {}
    cpu_node: dict[int, int] = {}
    for nd in sorted(node_root.glob("node[0-9]*")):
        nid = int(nd.name[4:])
        cpulist = _read(nd / "cpulist", "").strip()
        ncpus = parse_cpuset(cpulist) if cpulist else frozenset()
        for c in ncpus:
            cpu_node[c] = nid
        mi = _meminfo(_read(nd / "meminfo", ""))
        reclaimable = max(0, mi.get("FilePages", 0) - mi.get("Shmem", 0)) + mi.get("SReclaimable", 0)
        pools = {size: read_pool(sysfs_root, nid, size) for size in page_sizes
                 if pool_dir(sysfs_root, nid, size).is_dir()}
        nodes[nid] = Node(nid, ncpus & online if online else ncpus, mi.get("MemTotal", 0), mi.get("MemFree", 0),
                          reclaimable, pools)
    cpus: dict[int, Cpu] = {}
    for c in sorted(online):
        topo = sysfs_root / "devices/system/cpu" / f"cpu{c}" / "topology"
        sib_text = _read(topo / "thread_siblings_list", "").strip()
        siblings = parse_cpuset(sib_text) & online if sib_text else frozenset({c})
        cpus[c] = Cpu(c, cpu_node.get(c, 0), _int_file(topo / "core_id", c), _int_file(topo / "physical_package_id"),
                      siblings or frozenset({c}))
    meminfo = _meminfo(_read(proc_root / "meminfo", ""))
    default_page = meminfo.get("Hugepagesize", 2048)
    resv = {size: _int_file(sysfs_root / "kernel/mm/hugepages" / f"hugepages-{size}kB" / "resv_hugepages")
            for size in page_sizes}
    return HostTopology(nodes, cpus, page_sizes, default_page, _hugetlbfs_mounts(proc_root, default_page), resv)


def _hugetlbfs_mounts(proc_root: Path, default_page_kib: int) -> dict[int, str]:
    """Map page size → mount point from /proc/mounts (pagesize= option, else the default size)."""
    out: dict[int, str] = {}
    for line in _read(proc_root / "mounts", "").splitlines():
        parts = line.split()
        if len(parts) < 4 or parts[2] != "hugetlbfs":
            continue
        size = default_page_kib
        for opt in parts[3].split(","):
            if opt.startswith("pagesize="):
                v = opt[len("pagesize="):].upper()
                mult = {"K": 1, "M": 1024, "G": 1024 * 1024}.get(v[-1:], 0)
                if mult and v[:-1].isdigit():
                    size = int(v[:-1]) * mult
        out.setdefault(size, parts[1])
    return out


# libvirt's QEMU driver (system instance) keeps each running domain's pid file in its state directory,
# RUNSTATEDIR/libvirt/qemu, named NAME.pid (qemuProcessLaunch: virPidFileBuildPath(cfg->stateDir, name)).
QEMU_STATE_DIR = "libvirt/qemu"
# Users libvirt runs QEMU as when qemu.conf names none: its build default (Debian: libvirt-qemu; Fedora: qemu).
DEFAULT_QEMU_USERS = ("libvirt-qemu", "qemu")
# libvirt stops a machine name at 64 characters (virDomainMachineNameAppendValid).
_MACHINE_NAME_MAX = 64
_HOSTNAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
# A domain name longer than this cannot name a pid file (NAME_MAX 255 minus ".pid").
_NAME_MAX = 251


@dataclass(frozen=True)
class QemuProcess:
    """A domain's QEMU as libvirt started it: its pid and the start time that tells it from a later process
    given the same pid."""

    pid: int
    start: str


def qemu_uids(etc_libvirt: Path) -> frozenset[int]:
    """Who may own a domain's QEMU: root, and the user libvirt's qemu.conf names (``user = "name"`` or
    ``"+uid"``), else its build default."""
    import pwd

    names: tuple[str, ...] = DEFAULT_QEMU_USERS
    for line in _read(etc_libvirt / "qemu.conf", "").splitlines():
        m = re.fullmatch(r'\s*user\s*=\s*"([^"]{1,64})"\s*(#.*)?', line)
        if m:
            names = (m.group(1),)
    uids = {0}
    for name in names:
        if name.startswith("+") and name[1:].isascii() and name[1:].isdecimal():
            uids.add(int(name[1:]))
            break
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
            break
        except KeyError:
            continue
    return frozenset(uids)


def valid_domain_name(name: str) -> bool:
    """A name that can only build a path inside libvirt's state directory (the XML is not trusted)."""
    return (0 < len(name.encode()) <= _NAME_MAX and name not in (".", "..") and "/" not in name
            and "\0" not in name)


def machine_names(dom_id: int, name: str) -> set[str]:
    """libvirt's machine name for a system domain (virDomainDriverGenerateMachineName): "qemu-ID-" and the
    name's hostname characters, a dot or dash kept only after a kept character, at most 64 characters, no
    trailing dot or dash. Versions differ on whether a dropped character counts as kept: both are given."""
    out = set()
    for strict in (True, False):
        buf = f"qemu-{dom_id}-"
        skip = True
        for ch in name:
            if len(buf) >= _MACHINE_NAME_MAX:
                break
            if ch in ".-":
                if not skip:
                    buf += ch
                skip = True
                continue
            if not strict:
                skip = False
            if ch in _HOSTNAME_CHARS:
                buf += ch
                skip = False
        out.add(buf.rstrip("-."))
    return out


def _in_domain_cgroup(cgroup_text: str, name: str) -> bool:
    """Whether a /proc/PID/cgroup puts the process in the domain's machine cgroup, which only root can
    create under the top-level machine partition: with systemd
    ``/machine.slice/[machine-PART.slice/]machine-qemu\\x2dID\\x2dNAME.scope/...``, without (libvirt's own
    layout, cgroup v1) ``/machine/[PART.partition/]qemu-ID-NAME.libvirt-qemu/...``."""
    for line in cgroup_text.splitlines():
        path = line.split(":", 2)[-1]
        parts = path.strip("/").split("/")
        if parts[0] == "machine.slice":
            m = next((re.fullmatch(r"machine-qemu\\x2d([0-9]{1,9})\\x2d(.+)\.scope", p) for p in parts[1:]
                      if p.endswith(".scope")), None)
            if m and m.group(0).replace("\\x2d", "-")[len("machine-"):-len(".scope")] in \
                    machine_names(int(m.group(1)), name):
                return True
        elif parts[0] == "machine":
            m = next((re.fullmatch(r"qemu-([0-9]{1,9})-(.+)\.libvirt-qemu", p) for p in parts[1:]
                      if p.endswith(".libvirt-qemu")), None)
            if m and m.group(0)[:-len(".libvirt-qemu")] in machine_names(int(m.group(1)), name):
                return True
    return False


def _start_time(proc_root: Path, pid: int) -> str:
    text = _read(proc_root / str(pid) / "stat")
    fields = text.rpartition(")")[2].split()  # after the command name, which may hold spaces
    if len(fields) < 20:
        raise OSError(f"{proc_root / str(pid) / 'stat'}: unexpected format")
    return fields[19]  # field 22, starttime


def qemu_process(proc_root: Path, run_root: Path, uids: frozenset[int], name: str, uuid: str) -> QemuProcess:
    """The QEMU libvirt runs for this domain, identified by what only libvirt controls: the pid file in its
    root-owned state directory, a process owned by root or the QEMU user, in the domain's machine cgroup
    (and started with ``-uuid UUID``, as a last check). A process's command line alone proves nothing: any
    user can start one that names the UUID. Raises HostError saying which fact is missing."""
    if not valid_domain_name(name):
        raise HostError(f"domain name {name[:40]!r} cannot name a libvirt pid file")
    pidfile = run_root / QEMU_STATE_DIR / f"{name}.pid"
    try:
        fd = os.open(pidfile, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise HostError(f"{pidfile} is not a regular file")
            text = os.read(fd, 32).decode("ascii", errors="replace").strip()
        finally:
            os.close(fd)
    except OSError as e:
        raise HostError(f"no libvirt pid file for it ({pidfile}: {e.strerror})") from None
    if not (text.isascii() and text.isdecimal() and 0 < len(text) <= 10):
        raise HostError(f"{pidfile} does not hold a pid")
    pid = int(text)
    where = proc_root / str(pid)
    try:
        start = _start_time(proc_root, pid)
        owner = re.search(r"^Uid:\s+([0-9]+)\s+([0-9]+)", _read(where / "status"), re.M)
        cgroup = _read(where / "cgroup")
        cmdline = (where / "cmdline").read_bytes()
    except OSError as e:
        raise HostError(f"its QEMU process {pid} (from {pidfile}) cannot be read: {e}") from None
    if owner is None or not {int(owner.group(1)), int(owner.group(2))} <= uids:
        raise HostError(f"process {pid} (from {pidfile}) is not owned by root or the QEMU user")
    if not _in_domain_cgroup(cgroup, name):
        raise HostError(f"process {pid} (from {pidfile}) is not in the domain's machine cgroup")
    if b"\0-uuid\0" + uuid.encode() + b"\0" not in b"\0" + cmdline:
        raise HostError(f"process {pid} (from {pidfile}) is not the QEMU of {uuid}")
    return QemuProcess(pid, start)


def numa_maps(proc_root: Path, qemu: QemuProcess) -> list[tuple[bool, int, int, int]]:
    """The QEMU process's ``/proc/PID/numa_maps`` (what ``numastat -p`` reads), one row per mapping and node:
    (huge page mapping?, page size KiB, node, pages). Raises HostError when it cannot be read, or when the
    process is no longer the one identified."""
    where = proc_root / str(qemu.pid)
    try:
        text = (where / "numa_maps").read_text(errors="replace")
        same = _start_time(proc_root, qemu.pid) == qemu.start
    except OSError as e:
        raise HostError(f"{where / 'numa_maps'} cannot be read: {e.strerror or e}") from None
    if not same:
        raise HostError(f"process {qemu.pid} exited while its numa_maps was read")
    rows = []
    for line in text.splitlines():
        fields = line.split()
        size = next((f.partition("=")[2] for f in fields if f.startswith("kernelpagesize_kB=")), "4")
        if not (size.isascii() and size.isdecimal()):
            continue
        for f in fields:
            m = re.fullmatch(r"N([0-9]{1,4})=([0-9]{1,12})", f)
            if m:
                rows.append(("huge" in fields, int(size), int(m.group(1)), int(m.group(2))))
    return rows


def qemu_memory(rows: list[tuple[bool, int, int, int]]) -> dict[int, dict[str, int]]:
    """Where a QEMU process has its memory (:func:`numa_maps` rows), per host NUMA node:
    {node: {"huge": KiB, "normal": KiB}}."""
    out: dict[int, dict[str, int]] = {}
    for huge, size, node, pages in rows:
        per = out.setdefault(node, {"huge": 0, "normal": 0})
        per["huge" if huge else "normal"] += pages * size
    return out


def qemu_hugepages(rows: list[tuple[bool, int, int, int]]) -> dict[tuple[int, int], int]:
    """Huge pages per (node, page size KiB) a QEMU process has faulted in (:func:`numa_maps` rows)."""
    out: dict[tuple[int, int], int] = {}
    for huge, size, node, pages in rows:
        if huge:
            out[(node, size)] = out.get((node, size), 0) + pages
    return out
