"""Fake sysfs/procfs trees for unit tests: a host of any NUMA/SMT shape with hugepage pools."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field, replace
from pathlib import Path

from kvmhooks.apply.pools import SysfsPools as SysfsPoolsT
from kvmhooks.config import Config
from kvmhooks.units import format_cpuset

GIB = 1024 * 1024


@dataclass
class FakeHost:
    root: Path
    nodes: int = 1
    cores_per_node: int = 2
    threads_per_core: int = 1
    mem_per_node_kib: int = 16 * GIB
    free_per_node_kib: int = 12 * GIB
    page_sizes: tuple[int, ...] = (2048, 1048576)
    mounts: tuple[int, ...] = (2048, 1048576)
    offline: frozenset[int] = field(default_factory=frozenset)

    @property
    def sysfs(self) -> Path:
        return self.root / "sys"

    @property
    def proc(self) -> Path:
        return self.root / "proc"

    def cpu_ids(self, node: int) -> list[int]:
        """CPUs numbered like Linux on x86: first thread of every core, then the siblings."""
        n_cores = self.nodes * self.cores_per_node
        out = []
        for t in range(self.threads_per_core):
            for c in range(self.cores_per_node):
                out.append(t * n_cores + node * self.cores_per_node + c)
        return sorted(out)

    def build(self) -> FakeHost:
        n_cores = self.nodes * self.cores_per_node
        all_cpus = range(n_cores * self.threads_per_core)
        online = [c for c in all_cpus if c not in self.offline]
        cpu_dir = self.sysfs / "devices/system/cpu"
        cpu_dir.mkdir(parents=True, exist_ok=True)
        (cpu_dir / "online").write_text(format_cpuset(online) + "\n")
        for c in all_cpus:
            core = c % n_cores
            siblings = [core + t * n_cores for t in range(self.threads_per_core)]
            topo = cpu_dir / f"cpu{c}" / "topology"
            topo.mkdir(parents=True, exist_ok=True)
            (topo / "thread_siblings_list").write_text(format_cpuset(siblings) + "\n")
            (topo / "core_id").write_text(f"{core % self.cores_per_node}\n")
            (topo / "physical_package_id").write_text(f"{core // self.cores_per_node}\n")
        for size in self.page_sizes:
            (self.sysfs / f"kernel/mm/hugepages/hugepages-{size}kB").mkdir(parents=True, exist_ok=True)
        for n in range(self.nodes):
            nd = self.sysfs / f"devices/system/node/node{n}"
            nd.mkdir(parents=True, exist_ok=True)
            (nd / "cpulist").write_text(format_cpuset(self.cpu_ids(n)) + "\n")
            self.set_free(n, self.free_per_node_kib)
            for size in self.page_sizes:
                pd = nd / f"hugepages/hugepages-{size}kB"
                pd.mkdir(parents=True, exist_ok=True)
                for f in ("nr_hugepages", "free_hugepages", "surplus_hugepages"):
                    (pd / f).write_text("0\n")
        self.proc.joinpath("sys/vm").mkdir(parents=True, exist_ok=True)
        (self.proc / "meminfo").write_text(f"MemTotal: {self.mem_per_node_kib * self.nodes} kB\n"
                                           "Hugepagesize:       2048 kB\n")
        lines = []
        for size in self.mounts:
            opt = "pagesize=2M" if size == 2048 else "pagesize=1024M"
            where = "/dev/hugepages" if size == 2048 else "/dev/hugepages1G"
            lines.append(f"hugetlbfs {where} hugetlbfs rw,relatime,{opt} 0 0")
        (self.proc / "mounts").write_text("\n".join(["proc /proc proc rw 0 0", *lines]) + "\n")
        return self

    def set_free(self, node: int, free_kib: int) -> None:
        nd = self.sysfs / f"devices/system/node/node{node}"
        (nd / "meminfo").write_text(textwrap.dedent(f"""\
            Node {node} MemTotal:       {self.mem_per_node_kib} kB
            Node {node} MemFree:        {free_kib} kB
            Node {node} FilePages:      0 kB
            Node {node} Shmem:          0 kB
            Node {node} SReclaimable:   0 kB
            """))

    def pool(self, node: int, size: int = 2048) -> int:
        return int((self.sysfs / f"devices/system/node/node{node}/hugepages/hugepages-{size}kB/nr_hugepages")
                   .read_text())

    def set_pool(self, node: int, size: int, nr: int, free: int | None = None) -> None:
        pd = self.sysfs / f"devices/system/node/node{node}/hugepages/hugepages-{size}kB"
        (pd / "nr_hugepages").write_text(f"{nr}\n")
        (pd / "free_hugepages").write_text(f"{nr if free is None else free}\n")

    def config(self, **kw: object) -> Config:
        # (cgroup_root and run_root inside the tree too: no unit test may ever touch the host's cgroups)
        base = Config(sysfs_root=self.sysfs, proc_root=self.proc, cgroup_root=self.root / "cgroup",
                      run_root=self.root / "run-root", state_dir=self.root / "run", log="stderr",
                      lock_timeout=10.0, retry_timeout=0.5)
        return replace(base, **kw)  # type: ignore[arg-type]


def domain_xml(name: str = "vm1", uuid: str = "11111111-2222-3333-4444-555555555555", memory_kib: int = 262144,
               tuning: str | None = '<kvm:hugepages size="2M"/>', backing: str = "<hugepages/>", vcpus: int = 2,
               extra: str = "", devices: str = "<memballoon model='virtio'/>", vcpu_attrs: str = "") -> bytes:
    meta = ""
    if tuning is not None:
        meta = (f'<metadata><kvm:tuning xmlns:kvm="http://kvmhooks.org/xmlns/domain/1.0">{tuning}'
                "</kvm:tuning></metadata>")
    mb = f"<memoryBacking>{backing}</memoryBacking>" if backing else ""
    return (f"<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid>{meta}"
            f"<memory unit='KiB'>{memory_kib}</memory><currentMemory unit='KiB'>{memory_kib}</currentMemory>"
            f"{mb}<vcpu placement='static'{vcpu_attrs}>{vcpus}</vcpu>{extra}"
            f"<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>{devices}</devices></domain>").encode()


class FakeKernel:
    """Plays the kernel's side of a fake tree, close to ``set_max_huge_pages()``:

    - raising a pool first turns surplus pages back into persistent ones, then allocates new pages from the
      node's free memory (MemFree goes down, so later capacity checks see it), as many as fit;
    - lowering it frees free pages first; pages in use that cannot be freed become *surplus* (persistent
      drops to the target, nr_hugepages does not) and go away when their user lets them go (:meth:`unuse`);
    - ``fail_free`` plays a kernel that cannot free pages (HVO under memory pressure): a shrink does nothing.

    Usable from any process: all state is in the tree's files (the node's memory before any huge page is
    kept in a file of the tree).
    """

    def __init__(self, host: FakeHost, fail_free: bool = False):
        from kvmhooks.apply.pools import SysfsPools

        self.host = host
        self.fail_free = fail_free
        self.pools = SysfsPools(host.sysfs, host.proc)
        base = host.root / "fake-kernel-free"
        if not base.exists():
            base.write_text(" ".join(str(host.free_per_node_kib) for _ in range(host.nodes)))
        self.base = [int(x) for x in base.read_text().split()]

    def _dir(self, node: int, size: int) -> Path:
        return self.host.sysfs / f"devices/system/node/node{node}/hugepages/hugepages-{size}kB"

    def state(self, node: int, size: int) -> tuple[int, int, int]:
        """(nr, free, surplus)"""
        d = self._dir(node, size)
        return tuple(int((d / f).read_text()) for f in ("nr_hugepages", "free_hugepages",  # type: ignore[return-value]
                                                         "surplus_hugepages"))

    def _store(self, node: int, size: int, nr: int, free: int, surplus: int) -> None:
        d = self._dir(node, size)
        for f, v in (("nr_hugepages", nr), ("free_hugepages", free), ("surplus_hugepages", surplus)):
            (d / f).write_text(f"{v}\n")
        used = sum(self.state(node, s)[0] * s for s in self.host.page_sizes)
        self.host.set_free(node, self.base[node] - used)

    def write(self, node: int, size: int, count: int) -> None:
        nr, free, surplus = self.state(node, size)
        persistent = nr - surplus
        if count > persistent:
            back = min(surplus, count - persistent)
            surplus -= back
            persistent += back
            used = sum(self.state(node, s)[0] * s for s in self.host.page_sizes)
            room = max(0, (self.base[node] - used) // size)
            new = min(count - persistent, room)
            persistent += new
            free += new
        elif count < persistent and not self.fail_free:
            freed = min(free, persistent - count)
            persistent -= freed
            free -= freed
            surplus += persistent - count  # in use: surplus until its user exits
            persistent = count
        self._store(node, size, persistent + surplus, free, surplus)

    def use(self, node: int, size: int, pages: int) -> None:
        """A QEMU faults ``pages`` in."""
        nr, free, surplus = self.state(node, size)
        assert pages <= free, "the fake kernel has no free pages left"
        self._store(node, size, nr, free - pages, surplus)

    def unuse(self, node: int, size: int, pages: int) -> None:
        """A QEMU exits: its pages are free again, and surplus pages are given back to the node."""
        nr, free, surplus = self.state(node, size)
        free += pages
        gone = min(surplus, free)
        self._store(node, size, nr - gone, free - gone, surplus - gone)

    def install(self) -> SysfsPoolsT:
        kernel = self

        class Pools(type(self.pools)):  # type: ignore[misc]
            reclaims = 0

            def set(self, node: int, size_kib: int, count: int) -> int:
                path = kernel._dir(node, size_kib) / "nr_hugepages"
                if not path.exists():
                    raise OSError(2, "No such file", str(path))
                kernel.write(node, size_kib, count)
                return int(super().read(node, size_kib).nr - super().read(node, size_kib).surplus)

            def reclaim(self, node: int) -> None:
                type(self).reclaims += 1

        return Pools(self.host.sysfs, self.host.proc)  # type: ignore[no-any-return]
