"""Read the host (sysfs, procfs) into an immutable snapshot the planners work on.

Every path is under ``sysfs_root``/``proc_root`` so tests build fake trees; nothing here writes.
"""

from __future__ import annotations

import re
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


def qemu_pid(proc_root: Path, uuid: str) -> int | None:
    """The QEMU process of the VM with this UUID (libvirt passes ``-uuid UUID`` on its command line)."""
    needle = b"\0-uuid\0" + uuid.encode() + b"\0"
    for p in proc_root.glob("[0-9]*"):
        if not p.name.isdecimal():
            continue
        try:
            cmdline = (p / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in b"\0" + cmdline:
            return int(p.name)
    return None


def _numa_maps(proc_root: Path, uuid: str) -> list[tuple[bool, int, int, int]]:
    """The VM's QEMU process's ``/proc/PID/numa_maps`` (what ``numastat -p`` reads), one row per mapping and
    node: (huge page mapping?, page size KiB, node, pages). Empty when there is no such process."""
    pid = qemu_pid(proc_root, uuid)
    if pid is None:
        return []
    try:
        text = (proc_root / str(pid) / "numa_maps").read_text(errors="replace")
    except OSError:
        return []
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


def qemu_memory(proc_root: Path, uuid: str) -> dict[int, dict[str, int]]:
    """Where the VM's QEMU process has its memory, per host NUMA node: {node: {"huge": KiB, "normal": KiB}}."""
    out: dict[int, dict[str, int]] = {}
    for huge, size, node, pages in _numa_maps(proc_root, uuid):
        per = out.setdefault(node, {"huge": 0, "normal": 0})
        per["huge" if huge else "normal"] += pages * size
    return out


def qemu_hugepages(proc_root: Path, uuid: str) -> dict[tuple[int, int], int]:
    """Huge pages per (node, page size KiB) the VM's QEMU process has faulted in (empty: no process, or none
    faulted in yet)."""
    out: dict[tuple[int, int], int] = {}
    for huge, size, node, pages in _numa_maps(proc_root, uuid):
        if huge:
            out[(node, size)] = out.get((node, size), 0) + pages
    return out
