"""The classic KVM tuning advice as checks. Pure over a snapshot of host facts and domains; reads only.

Each finding says what is wrong, why it matters, and the exact command or XML that fixes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvmhooks.config import Config
from kvmhooks.domain import Domain
from kvmhooks.errors import KvmhooksError
from kvmhooks.ledger import LedgerState
from kvmhooks.operations import preview_pool_writes
from kvmhooks.plan.hugepages import plan_hugepages
from kvmhooks.topology import HostTopology
from kvmhooks.units import format_kib


@dataclass(frozen=True)
class Finding:
    check: str
    subject: str  # "host" or a VM name
    what: str
    why: str
    fix: str
    severity: str = "warning"  # warning | info


@dataclass(frozen=True)
class HostFacts:
    topo: HostTopology
    numa_balancing: int | None
    ksm_run: int | None
    ksm_merge_across_nodes: int | None
    cmdline: str = ""  # the kernel's command line
    thp: str | None = None  # transparent huge pages: always | madvise | never (None: no THP)
    irqbalance: bool = False


@dataclass(frozen=True)
class DomainFacts:
    name: str
    domain: Domain | None
    error: str | None = None  # the annotation or XML did not parse
    active: bool = False
    vfio: bool = False  # a VFIO host device (PCI or mdev): its memory is pinned, pages cannot be handed back
    # Where a running VM's memory is: host node → {"huge": KiB, "normal": KiB} (its QEMU's numa_maps)
    memory: dict[int, dict[str, int]] = field(default_factory=dict)


def domain_facts(name: str, xml: bytes, active: bool = False) -> DomainFacts:
    """Facts about one VM from its XML, including what :class:`Domain` does not carry (VFIO devices)."""
    from kvmhooks.annotate import has_vfio_hostdev
    from kvmhooks.domain import parse_domain
    from kvmhooks.xmlsafe import safe_parse

    try:
        dom = parse_domain(xml)
    except KvmhooksError as e:
        return DomainFacts(name, None, str(e), active)
    return DomainFacts(name, dom, active=active, vfio=has_vfio_hostdev(safe_parse(xml)))


def _int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def read_host_facts(topo: HostTopology, cfg: Config) -> HostFacts:
    from kvmhooks.apply.isolation import irqbalance_running

    thp = _text(cfg.sysfs_root / "kernel/mm/transparent_hugepage/enabled")  # "always [madvise] never"
    chosen = thp[thp.find("[") + 1:thp.find("]")] if "[" in thp and "]" in thp else None
    return HostFacts(topo, _int(cfg.proc_root / "sys/kernel/numa_balancing"),
                     _int(cfg.sysfs_root / "kernel/mm/ksm/run"),
                     _int(cfg.sysfs_root / "kernel/mm/ksm/merge_across_nodes"),
                     _text(cfg.proc_root / "cmdline"), chosen, irqbalance_running(cfg.proc_root))


def _boot_params(cmdline: str) -> dict[str, str]:
    return {k: v for k, _, v in (w.partition("=") for w in cmdline.split())}


def check_isolation(h: HostFacts, domains: list[DomainFacts], isolated: frozenset[int] = frozenset()
                    ) -> list[Finding]:
    """Advice that goes with dedicated and isolated CPUs, 1G pages and huge page backing (issue 11).

    ``isolated``: the CPUs kvmhooks keeps the host off now (the ledger's isolation section)."""
    out: list[Finding] = []
    params = _boot_params(h.cmdline)
    doms = [d.domain for d in domains if d.domain is not None]
    tunings = [t for dom in doms if (t := dom.active_tuning) is not None]
    isolating = [t for t in tunings if t.host is not None]
    dedicated = [t for t in tunings if t.cpu is not None and t.cpu.policy == "dedicated"]
    if (isolating or dedicated) and not ({"isolcpus", "nohz_full"} & params.keys()):
        cpus = ",".join(map(str, sorted(isolated))) if isolated else "<the dedicated CPUs>"
        out.append(Finding(
            "isolcpus", "host", "dedicated CPUs are not isolated at boot",
            "<kvm:host> moves tasks, IRQs and work queues off them at run time, but the scheduler tick, RCU "
            "callbacks and kernel threads bound at boot still run there; a host whose dedicated CPUs never "
            "change does better to isolate them at boot (what Nova and KubeVirt require)",
            f"kernel command line: isolcpus=managed_irq,domain,{cpus} nohz_full={cpus} rcu_nocbs={cpus} "
            "(then reboot)", "info"))
    gig = [t for t in tunings if t.hugepages is not None and t.hugepages.size_kib == 1024 * 1024]
    if gig and "hugetlb_cma" not in params:
        out.append(Finding(
            "hugetlb-cma", "host", "1G huge pages are reserved at run time without hugetlb_cma",
            "a 1G page needs 1 GiB of contiguous free memory; after the host has run a while memory is "
            "fragmented and the reservation fails although enough memory is free",
            "kernel command line: hugetlb_cma=<GiB of 1G pages you need>G (and hugetlb_cma_only on kernels "
            "that have it, so nothing else takes that area), then reboot", "info"))
    backed = [dom for dom in doms if dom.hugepage_backing]
    if backed and h.thp == "always":
        out.append(Finding(
            "thp", "host", "transparent huge pages are 'always' on a host with huge page backed VMs",
            "khugepaged and direct compaction keep reshuffling the host's memory, which competes with run-time "
            "huge page reservations and adds latency; QEMU still asks for THP (madvise) for the VMs that are "
            "not huge page backed",
            "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled (transparent_hugepage=madvise at boot)",
            "info"))
    elif doms and not backed and h.thp == "never":
        out.append(Finding(
            "thp", "host", "transparent huge pages are off and no VM is huge page backed",
            "guest memory then sits on 4K pages: more TLB misses and page walks for every VM",
            "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled (QEMU asks for THP on guest memory)",
            "info"))
    if isolating and h.irqbalance:
        cpus = ",".join(map(str, sorted(isolated))) if isolated else "<the isolated CPUs>"
        out.append(Finding(
            "irqbalance", "host", "irqbalance runs while VMs ask for isolated CPUs",
            "it moves IRQs back onto the isolated CPUs between kvmhooks' changes",
            f"IRQBALANCE_BANNED_CPULIST={cpus} in /etc/default/irqbalance, then restart irqbalance"))
    return out


def check_host(h: HostFacts, domains: list[DomainFacts]) -> list[Finding]:
    out = []
    multi = len(h.topo.nodes) > 1
    tuned = any(d.domain is not None and d.domain.active_tuning is not None for d in domains)
    if multi and h.numa_balancing == 1:
        out.append(Finding(
            "numa-balancing", "host", "automatic NUMA balancing is on",
            "it keeps migrating guest memory between nodes, fighting pinned vCPUs and numatune, and costs "
            "page faults on every scan" + (" (kvmhooks pins VMs here)" if tuned else ""),
            "sysctl -w kernel.numa_balancing=0 && echo kernel.numa_balancing=0 > /etc/sysctl.d/90-kvmhooks.conf"))
    if multi and h.ksm_run == 1 and h.ksm_merge_across_nodes == 1:
        out.append(Finding(
            "ksm-across-nodes", "host", "KSM merges pages across NUMA nodes",
            "a merged page lives on one node, so guests on the other nodes read it remotely; with pinned "
            "NUMA-local guests that undoes the placement",
            "echo 2 > /sys/kernel/mm/ksm/run; echo 0 > /sys/kernel/mm/ksm/merge_across_nodes; "
            "echo 1 > /sys/kernel/mm/ksm/run"))
    return out


def check_memory_locality(h: HostFacts, d: DomainFacts) -> list[Finding]:
    """A running VM whose vCPUs are pinned to some NUMA nodes but whose memory sits mostly on others pays a
    remote access on most of its memory (what ``numastat -p`` shows by hand)."""
    dom = d.domain
    if dom is None or not d.memory or not dom.live_vcpupins or len(h.topo.nodes) < 2:
        return []
    cpu_nodes = {h.topo.cpus[c].node for cs in dom.live_vcpupins.values() for c in cs if c in h.topo.cpus}
    total = sum(v["huge"] + v["normal"] for v in d.memory.values())
    away = sum(v["huge"] + v["normal"] for n, v in d.memory.items() if n not in cpu_nodes)
    if not cpu_nodes or not total or away * 2 <= total:
        return []
    where = ", ".join(f"node {n} {(v['huge'] + v['normal']) / 1024:.0f}M" for n, v in sorted(d.memory.items()))
    return [Finding("numa-locality", d.name, f"{away * 100 // total}% of its memory is on NUMA nodes its vCPUs "
                    f"are not pinned to ({where}; vCPUs on node(s) {', '.join(map(str, sorted(cpu_nodes)))})",
                    "every access to that memory crosses the interconnect",
                    "pin the vCPUs to the memory's node (<kvm:cpu policy='dedicated'/> places them with the huge "
                    "pages), or bind the memory with <numatune><memory mode='strict' nodeset='...'/>")]


def check_domain(h: HostFacts, d: DomainFacts, cfg: Config, running_vcpus: int) -> list[Finding]:
    """Advice for one VM. ``running_vcpus``: vCPUs of all running VMs, to judge how busy the host is."""
    name = d.name
    if d.domain is None:
        return [Finding("annotation", name, d.error or "the domain XML could not be read",
                        "kvmhooks refuses to start the VM until this is fixed", "virsh edit " + name)]
    dom = d.domain
    out: list[Finding] = check_memory_locality(h, d)
    t = dom.active_tuning
    topo = h.topo
    # Huge pages: mounted, and pages available for backed VMs we do not reserve for.
    if t is not None and t.hugepages is not None:
        try:
            hp = plan_hugepages(dom, topo, cfg)
            if hp is not None and not d.active:  # could it start now? (the pools as they are)
                preview_pool_writes(dom, hp, cfg, topo, LedgerState())
        except KvmhooksError as e:
            out.append(Finding("hugepages", name, str(e), "the VM will not start", str(e).split("; ", 1)[-1]))
    elif dom.hugepage_backing:
        size = dom.backing_page_kib[0] if dom.backing_page_kib else topo.default_page_kib
        free = sum(p.free for n in topo.nodes.values() if (p := n.pools.get(size)) is not None)
        if size not in topo.hugetlbfs:
            out.append(Finding("hugetlbfs", name, f"no hugetlbfs is mounted for {format_kib(size)} pages",
                               "libvirt refuses to start a hugepage-backed VM without it",
                               "re-run install.sh, or mount -t hugetlbfs hugetlbfs /dev/hugepages; restart libvirtd"))
        elif not d.active and free * size < dom.memory_kib:
            out.append(Finding("hugepages", name, f"backed by {format_kib(size)} huge pages but only {free} are free",
                               "QEMU will fail to allocate its memory at start",
                               f"let kvmhooks reserve them: kvmhooks annotate {name} --hugepages "
                               f"{format_kib(size)}"))
    # NUMA: VMs larger than a node, or on a multi-node host without any placement.
    if len(topo.nodes) > 1 and dom.numatune_nodes is None and not dom.memnodes:
        smallest = min(n.mem_total_kib for n in topo.nodes.values())
        per_node_cpus = min(len(n.cpus) for n in topo.nodes.values()) or 1
        if dom.memory_kib > smallest or dom.max_vcpus > per_node_cpus:
            out.append(Finding("numatune", name, "the VM spans NUMA nodes without <numatune>",
                               "its memory and vCPUs land on nodes at random, with remote memory accesses",
                               "give it a guest NUMA topology matching the host (<cpu><numa><cell .../>) and "
                               "<numatune><memory mode='strict' nodeset='0-1'/></numatune>, or keep it on one node"))
    # CPU model.
    if dom.domain_type == "kvm":
        if dom.cpu_mode is None:
            out.append(Finding("cpu-mode", name, "no <cpu mode=...>: the guest sees a generic qemu64 CPU",
                               "it misses AVX, AES-NI and other extensions: slower crypto and vector code",
                               "<cpu mode='host-model'/> (migration-safe), or <cpu mode='host-passthrough'/> for the "
                               "last bit of speed when the VM never migrates to a different CPU"))
        elif dom.cpu_mode == "host-passthrough":
            out.append(Finding("cpu-mode", name, "host-passthrough CPU", "fastest, but live migration only works "
                               "to hosts with an identical CPU and microcode", "use host-model if you migrate",
                               "info"))
    # Unpinned vCPUs on an overcommitted host.
    online = len(topo.online) or 1
    pinned = t is not None and (t.cpu is not None or bool(t.vcpupins))
    if running_vcpus > online and not pinned and not dom.live_vcpupins:
        out.append(Finding("pinning", name, f"vCPUs are not pinned on a busy host ({running_vcpus} vCPUs running on "
                           f"{online} host CPUs)", "the scheduler moves vCPUs around and latency-sensitive guests "
                           "suffer", f"kvmhooks annotate {name} --cpu shared (or dedicated)"))
    # Windows without a tablet: the PS/2 mouse drifts under VNC/SPICE.
    if "microsoft.com/win" in dom.os_hint and not dom.has_tablet:
        out.append(Finding("tablet", name, "Windows guest without a USB tablet",
                           "a relative PS/2 mouse drifts away from the pointer in VNC/SPICE consoles",
                           "<input type='tablet' bus='usb'/> under <devices>"))
    out += check_balloon(d)
    out += check_migration(d)
    # memtune limits below the VM's memory.
    if t is not None and t.memtune is not None:
        for attr, kib in (("hard_limit", t.memtune.hard_limit), ("swap_hard_limit", t.memtune.swap_hard_limit)):
            if kib is not None and kib <= dom.memory_kib:
                out.append(Finding("memtune", name, f"memtune {attr} ({format_kib(kib)}) is not above the VM's memory "
                                   f"({format_kib(dom.memory_kib)})",
                                   "QEMU needs its guest's memory plus its own overhead: the OOM killer will end it",
                                   f"raise {attr} to at least {format_kib(dom.memory_kib + 256 * 1024)} or drop it"))
    return out


def check_migration(d: DomainFacts) -> list[Finding]:
    """How a VM can migrate (issue 18): advice, not a fault, so ``validate`` shows it as a note."""
    dom = d.domain
    if dom is None or not dom.hugepage_backing:
        return []
    return [Finding("postcopy", d.name, "post-copy migration does not work with huge pages",
                    "QEMU refuses post-copy unless the destination backs the guest with the same page size and "
                    "its kernel supports userfaultfd on hugetlbfs; VDSM notes post-copy 'may fail immediately' "
                    "when huge pages are used", "migrate it with 'virsh migrate --live' without --postcopy "
                    "(and check the destination first: 'kvmhooks plan --incoming' on it)", "info")]


def check_balloon(d: DomainFacts) -> list[Finding]:
    """The guest's own defences against ballooning (issue 9): deflate-on-oom for an automatic policy, and
    free page reporting where it can work; and what a virtio-mem device needs from the guest. Also meant
    for ``validate``."""
    dom = d.domain
    if dom is None:
        return []
    out = check_virtio_mem(d)
    if not dom.has_memballoon:
        return out
    t = dom.active_tuning
    # With virtio-mem the policy plugs and unplugs instead of inflating: there is nothing to deflate.
    if t is not None and t.balloon is not None and t.balloon.policy == "auto" and not dom.balloon_autodeflate \
            and not dom.virtio_mem:
        out.append(Finding(
            "balloon-autodeflate", d.name, "automatic balloon policy without <memballoon autodeflate='on'>",
            "if the guest runs short between two balloond cycles (or balloond is down), its OOM killer fires "
            "although the host has the memory; with deflate-on-oom the guest takes ballooned pages back itself",
            f"kvmhooks annotate {d.name} --balloon ... writes it, or add autodeflate='on' to <memballoon> "
            "(virsh edit); it takes effect at the next start"))
    if not dom.balloon_free_page_reporting and not dom.hugepage_backing and not d.vfio:
        out.append(Finding(
            "free-page-reporting", d.name, "free page reporting is off",
            "the guest could hand the pages it frees back to the host without any balloon target (libvirt ≥ "
            "6.9, a guest kernel ≥ 5.7); it cannot with huge page backing or a VFIO device, which this VM has not",
            "add freePageReporting='on' to <memballoon> (virsh edit); it takes effect at the next start",
            "info"))
    return out


def check_virtio_mem(d: DomainFacts) -> list[Finding]:
    """virtio-mem only works with the guest's cooperation, which the host cannot see in the XML: say what it
    needs, and, for a running VM, whether it followed the last request (the live XML's <current>)."""
    dom = d.domain
    if dom is None or not dom.virtio_mem:
        return []
    out: list[Finding] = []
    dev = dom.virtio_mem[0]
    t = dom.active_tuning
    driven = t is not None and t.balloon is not None
    followed = d.active and dev.current_kib is not None and dev.requested_kib > 0 \
        and abs(dev.current_kib - dev.requested_kib) < dev.block_kib
    if d.active and dev.current_kib is not None and abs(dev.current_kib - dev.requested_kib) >= dev.block_kib:
        out.append(Finding(
            "virtio-mem-follow", d.name, f"the guest has {format_kib(dev.current_kib)} of its virtio-mem device "
            f"plugged, {format_kib(dev.requested_kib)} requested",
            "a guest that does not plug cannot grow under pressure (it OOMs with the host's memory on offer); one "
            "that does not unplug keeps memory the host asked back",
            "in the guest: lsmod | grep virtio_mem (or CONFIG_VIRTIO_MEM=y), and memhp_default_state=online_movable "
            "on its kernel command line; cat /sys/devices/system/memory/memory*/state shows offline blocks"))
    elif not followed:
        out.append(Finding(
            "virtio-mem-guest", d.name, "virtio-mem device: the guest plugs and unplugs its memory itself",
            "it needs a Linux kernel ≥ 5.8 with virtio_mem, and hot-plugged memory onlined as movable (the "
            "default onlines it as kernel memory, or not at all, and such memory can seldom be unplugged); "
            "without that, requests to grow are not followed" + (" and balloond reports it" if driven else ""),
            "the guest's kernel command line: memhp_default_state=online_movable (or a udev rule: "
            "SUBSYSTEM==\"memory\", ACTION==\"add\", ATTR{state}==\"offline\", ATTR{state}=\"online_movable\"); "
            "its initramfs or modules-load.d: virtio_mem",
            "warning" if driven else "info"))
    if t is not None and t.balloon is not None and t.balloon.min_kib < dom.boot_memory_kib:
        out.append(Finding(
            "virtio-mem-min", d.name, f"<kvm:balloon min> ({format_kib(t.balloon.min_kib)}) is below the boot "
            f"memory ({format_kib(dom.boot_memory_kib)})",
            "with a virtio-mem device the policy unplugs instead of ballooning, so the guest never goes below its "
            "boot memory", f"min=\"{format_kib(dom.boot_memory_kib)}\" says what happens", "info"))
    page = dom.backing_page_kib[0] if dom.backing_page_kib else (2048 if dom.hugepage_backing else 4)
    if dev.block_kib < page:
        out.append(Finding(
            "virtio-mem-block", d.name, f"virtio-mem block {format_kib(dev.block_kib)} is smaller than the backing's "
            f"{format_kib(page)} pages", "QEMU refuses to start it: a block must hold whole pages",
            f"<block unit='KiB'>{page}</block> in the device's <target>"))
    return out
