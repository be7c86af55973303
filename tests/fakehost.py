"""Fake sysfs/procfs trees for unit tests: a host of any NUMA/SMT shape with hugepage pools."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field, replace
from pathlib import Path

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
        base = Config(sysfs_root=self.sysfs, proc_root=self.proc, state_dir=self.root / "run", log="stderr",
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
    """Plays the kernel's side of a fake tree: raising a pool takes its memory out of the node's MemFree,
    as the real kernel does, so capacity checks in later (or concurrent) reservations see it.

    Usable from any process: the node's memory before any huge page is kept in a file of the tree.
    """

    def __init__(self, host: FakeHost):
        from kvmhooks.apply.pools import SysfsPools

        self.host = host
        self.pools = SysfsPools(host.sysfs, host.proc)
        base = host.root / "fake-kernel-free"
        if not base.exists():
            base.write_text(" ".join(str(host.free_per_node_kib) for _ in range(host.nodes)))
        self.base = [int(x) for x in base.read_text().split()]

    def install(self) -> object:
        kernel = self

        class Pools(type(self.pools)):  # type: ignore[misc]
            def set(self, node: int, size_kib: int, count: int) -> int:
                got = super().set(node, size_kib, count)
                kernel.host.set_pool(node, size_kib, got)
                used = sum(kernel.host.pool(node, s) * s for s in kernel.host.page_sizes)
                kernel.host.set_free(node, kernel.base[node] - used)
                return got

        return Pools(self.host.sysfs, self.host.proc)
