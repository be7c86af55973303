"""How many huge pages of which size a VM needs on which NUMA node, and the pool targets that gives.

Pure: works on a :class:`~kvmhooks.topology.HostTopology` snapshot. What that means for each pool's
size (targets, capacity, the admin's baseline) is :mod:`kvmhooks.plan.pools`' business.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvmhooks.config import Config, pool_key
from kvmhooks.errors import DomainConfigError, HostError
from kvmhooks.plan.pools import spare_kib
from kvmhooks.topology import HostTopology
from kvmhooks.units import format_kib

if TYPE_CHECKING:
    from kvmhooks.annotation import HugepagesSpec
    from kvmhooks.domain import Domain


@dataclass(frozen=True)
class HugepagePlan:
    size_kib: int
    pages: dict[int, int]  # node → pages
    required: bool
    # guest NUMA cell → the host node its pages are on (the migrate filter writes it into <numatune><memnode>)
    cells: dict[int, int] = field(default_factory=dict)

    def pools(self) -> dict[str, int]:
        return {pool_key(n, self.size_kib): p for n, p in sorted(self.pages.items()) if p}

    @property
    def total(self) -> int:
        return sum(self.pages.values())


def _mib(kib: int) -> str:
    return format_kib(kib) if kib % 1024 == 0 else f"{kib / 1024:.0f}M"


def choose_size(dom: Domain, spec: HugepagesSpec, topo: HostTopology) -> int:
    """The page size: the annotation's, else the domain's <page size>, else the host default.

    Without an explicit ``<page>`` libvirt backs the guest with the host's *default* huge page size, so
    reserving any other size would leave the guest's pages unaccounted (and our reservation unused).
    """
    if spec.size_kib is not None:
        size = spec.size_kib
        if not dom.backing_page_kib and size != topo.default_page_kib:
            raise DomainConfigError(
                f"<kvm:hugepages size=...> asks for {_mib(size)} pages but the domain's "
                f"<memoryBacking><hugepages/> names no page size, so QEMU would use the host default "
                f"({_mib(topo.default_page_kib)}); add <page size='{size}' unit='KiB'/> inside it", vm=dom.name)
    elif dom.backing_page_kib:
        size = dom.backing_page_kib[0]
    else:
        size = topo.default_page_kib
    return size


def plan_hugepages(dom: Domain, topo: HostTopology, cfg: Config) -> HugepagePlan | None:
    """Pages per node for the VM; None when it asks for none. Raises when it cannot work at all."""
    tuning = dom.active_tuning
    if tuning is None or tuning.hugepages is None:
        return None
    spec = tuning.hugepages
    if not dom.hugepage_backing:
        raise DomainConfigError(
            "<kvm:hugepages> needs hugepage backing in the domain; add "
            "<memoryBacking><hugepages/></memoryBacking> (virsh edit, or 'kvmhooks annotate')", vm=dom.name)
    size = choose_size(dom, spec, topo)
    if size not in topo.page_sizes:
        raise HostError(f"this host has no {_mib(size)} huge pages "
                        f"(no /sys/kernel/mm/hugepages/hugepages-{size}kB); supported: "
                        + ", ".join(_mib(s) for s in sorted(topo.page_sizes)), vm=dom.name)
    if size not in topo.hugetlbfs:
        opt = f"-o pagesize={_mib(size)} " if size != topo.default_page_kib else ""
        where = "/dev/hugepages" if size == topo.default_page_kib else f"/dev/hugepages{_mib(size)}"
        raise HostError(f"no hugetlbfs is mounted for {_mib(size)} pages; run "
                        f"'mkdir -p {where} && mount -t hugetlbfs {opt}hugetlbfs {where}' (or re-run "
                        "install.sh), then restart libvirtd", vm=dom.name)
    for n in (spec.nodes or frozenset()) | (dom.numatune_nodes or frozenset()):
        if n not in topo.nodes:
            raise HostError(f"NUMA node {n} does not exist on this host "
                            f"(nodes: {', '.join(map(str, sorted(topo.nodes)))})", vm=dom.name)
    pages, cells = _distribute(dom, spec, topo, size, cfg)
    return HugepagePlan(size, pages, spec.required, cells)


def _split(total: int, nodes: list[int]) -> dict[int, int]:
    """Split pages evenly over nodes, the remainder going to the first ones."""
    q, r = divmod(total, len(nodes))
    return {n: q + (1 if i < r else 0) for i, n in enumerate(nodes)}


def _spare(topo: HostTopology, node: int, cfg: Config) -> int:
    return spare_kib(topo, node, cfg)


def _distribute(dom: Domain, spec: HugepagesSpec, topo: HostTopology, size: int, cfg: Config,
                ) -> tuple[dict[int, int], dict[int, int]]:
    explicit = sorted(spec.nodes) if spec.nodes else None
    numatune = sorted(dom.numatune_nodes) if dom.numatune_nodes and dom.numatune_mode != "preferred" else None
    chosen = explicit or numatune
    if dom.cells and spec.count is None:
        out: dict[int, int] = {}
        cells: dict[int, int] = {}
        spare = {n: _spare(topo, n, cfg) for n in topo.nodes}
        for i, cell in enumerate(dom.cells):
            need = -(-cell.memory_kib // size)
            if cell.id in dom.memnodes and not explicit:
                node = min(dom.memnodes[cell.id])
            elif chosen:
                node = chosen[i % len(chosen)]
            else:  # auto: the node with the most memory to spare, counting what earlier cells took
                node = max(sorted(spare), key=lambda n: spare[n])
            spare[node] -= need * size
            out[node] = out.get(node, 0) + need
            cells[cell.id] = node
        return out, cells
    total = spec.count if spec.count is not None else -(-dom.memory_kib // size)
    if chosen:
        return _split(total, chosen), {}
    # auto without cells: one node, the one with the most to spare (QEMU's memory then stays local).
    best = max(sorted(topo.nodes), key=lambda n: _spare(topo, n, cfg))
    return {best: total}, {}
