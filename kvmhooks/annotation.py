"""The annotation contract, version 1: ``<kvm:tuning>`` in a domain's ``<metadata>`` → frozen dataclasses.

The contract is the table :data:`ELEMENTS` (every element and its attributes, what the README documents)
plus one reader per element; parsing runs in two passes (check each element against the table, then read
them in a fixed order and apply the cross-element rules) so the order of elements never matters. Every
failure is one :class:`~kvmhooks.errors.AnnotationError` naming the VM, the element, the attribute and the
value; nothing read here builds a path or a command.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from kvmhooks import GOVERNORS, NAMESPACE
from kvmhooks.errors import AnnotationError, DomainConfigError
from kvmhooks.units import (
    parse_cpuset,
    parse_node_list,
    parse_percent,
    parse_size_kib,
    parse_uint,
)

if TYPE_CHECKING:
    from lxml import etree

    from kvmhooks.domain import Domain

_K = f"{{{NAMESPACE}}}"

PageSizeKiB = int
ThreadPolicy = Literal["prefer", "isolate", "require"]
EmulatorPolicy = Literal["share", "isolate", "pool"]


@dataclass(frozen=True)
class HugepagesSpec:
    size_kib: PageSizeKiB | None  # None: auto
    nodes: frozenset[int] | None  # None: auto
    count: int | None  # None: derived from the memory
    required: bool = True


@dataclass(frozen=True)
class CpuSpec:
    policy: Literal["dedicated", "shared"]
    threads: ThreadPolicy = "prefer"
    emulator: EmulatorPolicy = "share"


@dataclass(frozen=True)
class Pin:
    target: int  # vCPU number or iothread id
    cpus: frozenset[int]


@dataclass(frozen=True)
class MemtuneSpec:
    hard_limit: int | None = None  # all KiB
    soft_limit: int | None = None
    swap_hard_limit: int | None = None
    min_guarantee: int | None = None

    def items(self) -> list[tuple[str, int]]:
        return [(k, v) for k, v in (("hard_limit", self.hard_limit), ("soft_limit", self.soft_limit),
                                    ("swap_hard_limit", self.swap_hard_limit),
                                    ("min_guarantee", self.min_guarantee)) if v is not None]


@dataclass(frozen=True)
class HostSpec:
    """``<kvm:host>``: keep the host off the VM's dedicated CPUs while it runs (undone at its stop)."""

    isolate: bool = True  # host tasks and unbound kernel work queues off the CPUs
    irqs: bool = True  # movable IRQs off the CPUs
    governor: str | None = None  # cpufreq governor for the CPUs; None: untouched

    @property
    def any(self) -> bool:
        return self.isolate or self.irqs or self.governor is not None


BalloonReclaim = Literal["none", "idle"]
# Proxmox-style weight range for <kvm:balloon shares>: relative, so only the ratio between VMs matters.
MIN_SHARES, MAX_SHARES, DEFAULT_SHARES = 1, 100000, 1000


@dataclass(frozen=True)
class BalloonSpec:
    target_kib: int | None  # resolved against <memory>; None: no fixed target
    min_kib: int
    stats_period: int = 2
    policy: Literal["fixed", "auto"] = "fixed"
    transport: Literal["auto", "qmp", "libvirt"] = "auto"
    # "idle": return idle guest memory even without host pressure (opt-in; "none" squeezes only under it).
    reclaim: BalloonReclaim = "none"
    # Weight for who gets squeezed first under host pressure (Proxmox's "shares"): more shares, squeezed less.
    shares: int = DEFAULT_SHARES


@dataclass(frozen=True)
class Tuning:
    enabled: bool = True
    hugepages: HugepagesSpec | None = None
    cpu: CpuSpec | None = None
    vcpupins: tuple[Pin, ...] = ()
    emulatorpin: frozenset[int] | None = None
    iothreadpins: tuple[Pin, ...] = ()
    persist_cputune: bool = False
    vcpus_live: int | None = None
    memtune: MemtuneSpec | None = None
    balloon: BalloonSpec | None = None
    host: HostSpec | None = None

    @property
    def cpu_work(self) -> bool:
        """CPU placement or pins to plan (the CPU planner is imported only then: the hook pays for it)."""
        return bool(self.cpu or self.vcpupins or self.emulatorpin is not None or self.iothreadpins)

    @property
    def live_work(self) -> bool:
        """Anything to apply after start (needs the libvirt API, so the detached worker)?"""
        return bool(self.cpu or self.vcpupins or self.emulatorpin is not None or self.iothreadpins
                    or self.vcpus_live is not None or self.memtune or self.balloon)


ELEMENTS: dict[str, tuple[str, ...]] = {
    "hugepages": ("size", "nodes", "count", "required"),
    "cpu": ("policy", "threads", "emulator"),
    "vcpupin": ("vcpu", "cpuset"),
    "emulatorpin": ("cpuset",),
    "iothreadpin": ("iothread", "cpuset"),
    "cputune": ("persist",),
    "vcpus": ("live",),
    "memtune": ("hard_limit", "soft_limit", "swap_hard_limit", "min_guarantee"),
    "balloon": ("target", "min", "stats-period", "policy", "transport", "reclaim", "shares"),
    "host": ("isolate", "irqs", "governor"),
}
_REPEATABLE = {"vcpupin", "iothreadpin"}
PAGE_SIZES_KIB = {"2M": 2048, "1G": 1024 * 1024}


class _Reader:
    """Reads one annotation element; every failure names VM, element, attribute and value."""

    def __init__(self, vm: str, element: str, el: etree._Element):
        self.vm, self.element, self.el = vm, element, el

    def fail(self, attr: str | None, value: str | None, reason: str) -> AnnotationError:
        return AnnotationError(self.vm, self.element, attr, value, reason)

    def get(self, attr: str) -> str | None:
        return self.el.get(attr)

    def choice(self, attr: str, choices: tuple[str, ...], default: str) -> str:
        v = self.el.get(attr)
        if v is None:
            return default
        if v not in choices:
            raise self.fail(attr, v, "expected one of " + ", ".join(choices))
        return v

    def yesno(self, attr: str, default: bool) -> bool:
        return self.choice(attr, ("yes", "no"), "yes" if default else "no") == "yes"

    def integer(self, attr: str, lo: int, hi: int) -> int | None:
        v = self.el.get(attr)
        if v is None:
            return None
        try:
            n = parse_uint(v, len(str(hi)))  # exact ASCII digits: no sign, no spaces, no '²' or '٣'
        except ValueError:
            n = None
        if n is None or not lo <= n <= hi:
            raise self.fail(attr, v, f"expected a whole number from {lo} to {hi}")
        return n

    def size(self, attr: str) -> int | None:
        v = self.el.get(attr)
        if v is None:
            return None
        try:
            kib = parse_size_kib(v)
        except ValueError as e:
            raise self.fail(attr, v, str(e)) from None
        if kib == 0:
            raise self.fail(attr, v, "must be more than zero")
        return kib

    def size_or_percent(self, attr: str, whole_kib: int) -> int | None:
        """A size, or a percentage of ``whole_kib``; never more than the whole."""
        v = self.el.get(attr)
        if v is None:
            return None
        try:
            pct = parse_percent(v)
        except ValueError as e:
            raise self.fail(attr, v, str(e)) from None
        kib = whole_kib * pct // 100 if pct is not None else self.size(attr)
        assert kib is not None
        if kib > whole_kib:
            raise self.fail(attr, v, f"exceeds the VM's memory ({whole_kib} KiB)")
        return kib

    def cpuset(self, attr: str, required: bool = True) -> frozenset[int] | None:
        v = self.el.get(attr)
        if v is None:
            if required:
                raise self.fail(attr, None, "is required")
            return None
        try:
            return parse_cpuset(v)
        except ValueError as e:
            raise self.fail(attr, v, str(e)) from None


def parse_tuning(el: etree._Element, dom: Domain) -> Tuning:
    """Validate and read ``<kvm:tuning>`` in two passes, so the order of its elements never matters.

    Pass 1 checks each element on its own (our namespace, a known tag, given once unless repeatable, known
    attributes) and collects them. Pass 2 reads them in a fixed dependency order (memtune before balloon,
    whose floor defaults to memtune/min_guarantee) and applies the rules that span elements.
    """
    from lxml import etree  # (here: the ledger's loads import the specs above, via plan.isolation, not a parser)

    vm = dom.name
    top = _Reader(vm, "tuning", el)
    for attr in map(str, el.keys()):
        if attr != "enabled":
            raise top.fail(attr, el.get(attr), "unknown attribute (known: enabled)")
    enabled = top.yesno("enabled", True)

    found: dict[str, list[_Reader]] = {}
    for child in el:
        if not isinstance(child.tag, str):
            continue  # comments
        qn = etree.QName(child)
        if qn.namespace != NAMESPACE:
            raise AnnotationError(vm, "tuning", None, None, f"unexpected element <{qn.localname}> outside "
                                  f"the kvmhooks namespace {NAMESPACE}")
        tag = qn.localname
        if tag not in ELEMENTS:
            raise AnnotationError(vm, tag, None, None, "unknown element (known: " + ", ".join(ELEMENTS) + ")")
        if tag in found and tag not in _REPEATABLE:
            raise AnnotationError(vm, tag, None, None, "given more than once")
        r = _Reader(vm, tag, child)
        for attr in map(str, child.keys()):
            if attr not in ELEMENTS[tag]:
                raise r.fail(attr, child.get(attr), "unknown attribute (known: " + ", ".join(ELEMENTS[tag]) + ")")
        found.setdefault(tag, []).append(r)

    def one(tag: str) -> _Reader | None:
        return found[tag][0] if tag in found else None

    # Pass 2, in dependency order.
    hp = one("hugepages")
    cpu = one("cpu")
    ep = one("emulatorpin")
    ct = one("cputune")
    vc = one("vcpus")
    mt = one("memtune")
    memtune = _parse_memtune(mt) if mt is not None else None
    bl = one("balloon")
    cpu_spec = _parse_cpu(cpu) if cpu is not None else None
    hs = one("host")
    return Tuning(
        enabled=enabled,
        hugepages=_parse_hugepages(hp, dom) if hp is not None else None,
        cpu=cpu_spec,
        vcpupins=_parse_pins(found.get("vcpupin", []), "vcpu", 0, 4095,
                             lambda n: None if n < dom.max_vcpus else
                             f"the VM has {dom.max_vcpus} vCPU(s), numbered 0 to {dom.max_vcpus - 1}"),
        emulatorpin=ep.cpuset("cpuset") if ep is not None else None,
        iothreadpins=_parse_pins(found.get("iothreadpin", []), "iothread", 1, 4096,
                                 lambda n: None if n <= dom.iothreads else
                                 f"the VM has {dom.iothreads} iothread(s) (<iothreads>)"),
        persist_cputune=ct.yesno("persist", False) if ct is not None else False,
        vcpus_live=_parse_vcpus(vc, dom) if vc is not None else None,
        memtune=memtune,
        balloon=_parse_balloon(bl, dom, memtune) if bl is not None else None,
        host=_parse_host(hs, cpu_spec) if hs is not None else None,
    )


def _parse_host(r: _Reader, cpu: CpuSpec | None) -> HostSpec | None:
    spec = HostSpec(r.yesno("isolate", True), r.yesno("irqs", True),
                    r.choice("governor", GOVERNORS, "") or None)
    if spec.any and (cpu is None or cpu.policy != "dedicated"):
        # Isolating shared or hand-pinned CPUs would take them from the host for VMs that do not own them.
        raise r.fail(None, None, "needs <kvm:cpu policy='dedicated'>: only CPUs the VM holds alone are "
                     "taken from the host")
    return spec if spec.any else None


def _parse_cpu(r: _Reader) -> CpuSpec:
    policy = r.choice("policy", ("dedicated", "shared"), "")
    if not policy:
        raise r.fail("policy", None, "is required: dedicated or shared")
    threads = r.choice("threads", ("prefer", "isolate", "require"), "prefer")
    emulator = r.choice("emulator", ("share", "isolate", "pool"), "share")
    return CpuSpec(policy, threads, emulator)  # type: ignore[arg-type]


def _parse_pins(readers: list[_Reader], attr: str, lo: int, hi: int,
                check: Callable[[int], str | None]) -> tuple[Pin, ...]:
    """vcpupin or iothreadpin elements: each target pinned once, and ``check`` says whether the domain has it."""
    pins: dict[int, Pin] = {}
    for r in readers:
        target = r.integer(attr, lo, hi)
        if target is None:
            raise r.fail(attr, None, "is required")
        problem = check(target)
        if problem is not None:
            raise r.fail(attr, str(target), problem)
        if target in pins:
            raise r.fail(attr, str(target), "pinned more than once")
        cpus = r.cpuset("cpuset")
        assert cpus is not None
        pins[target] = Pin(target, cpus)
    return tuple(pins[t] for t in sorted(pins))


def _parse_vcpus(r: _Reader, dom: Domain) -> int | None:
    live = r.integer("live", 1, 4096)
    if live is not None and live > dom.max_vcpus:
        raise r.fail("live", str(live), f"the VM's maximum is {dom.max_vcpus} vCPU(s) (<vcpu>)")
    return live


def _parse_memtune(r: _Reader) -> MemtuneSpec:
    mt = MemtuneSpec(r.size("hard_limit"), r.size("soft_limit"), r.size("swap_hard_limit"), r.size("min_guarantee"))
    if mt.hard_limit and mt.swap_hard_limit and mt.swap_hard_limit < mt.hard_limit:
        raise r.fail("swap_hard_limit", r.get("swap_hard_limit"),
                     "must be at least hard_limit (it limits memory plus swap)")
    if mt.hard_limit and mt.soft_limit and mt.soft_limit > mt.hard_limit:
        raise r.fail("soft_limit", r.get("soft_limit"), "must not exceed hard_limit")
    return mt


def _parse_hugepages(r: _Reader, dom: Domain) -> HugepagesSpec:
    size_text = r.choice("size", ("2M", "1G", "auto"), "auto")
    size = PAGE_SIZES_KIB.get(size_text)
    if size is not None and dom.backing_page_kib and size not in dom.backing_page_kib:
        raise r.fail("size", size_text, f"the domain's <memoryBacking><hugepages><page> asks for "
                     f"{dom.backing_page_kib[0]} KiB pages; make them agree")
    nodes_text = r.get("nodes")
    nodes = None
    if nodes_text is not None and nodes_text != "auto":
        try:
            nodes = parse_node_list(nodes_text)
        except ValueError as e:
            raise r.fail("nodes", nodes_text, f"{e} (or 'auto')") from None
    count = r.integer("count", 1, 1 << 30)
    return HugepagesSpec(size, nodes, count, r.yesno("required", True))


def _parse_balloon(r: _Reader, dom: Domain, memtune: MemtuneSpec | None) -> BalloonSpec:
    target_text, min_text = r.get("target"), r.get("min")
    target = r.size_or_percent("target", dom.memory_kib)
    min_kib = r.size_or_percent("min", dom.memory_kib)
    if min_kib is None:
        min_kib = memtune.min_guarantee if memtune is not None and memtune.min_guarantee else dom.memory_kib // 2
    if min_kib > dom.memory_kib:
        raise r.fail("min", min_text, f"exceeds the VM's memory ({dom.memory_kib} KiB)")
    policy = r.choice("policy", ("fixed", "auto"), "fixed")
    if target is not None and target < min_kib:
        raise r.fail("target", target_text, f"is below the floor min={min_kib} KiB")
    if policy == "fixed" and target is None:
        raise r.fail("target", None, "is required with policy='fixed'")
    period = r.integer("stats-period", 0, 3600)
    transport = r.choice("transport", ("auto", "qmp", "libvirt"), "auto")
    if transport == "qmp" and dom.qmp_socket is None:
        from kvmhooks.domain import qmp_socket_arg

        raise r.fail("transport", "qmp", "the domain has no kvmhooks QMP socket; run 'kvmhooks annotate "
                     f"{dom.name} --qmp' or add <qemu:arg value='-qmp'/><qemu:arg value='"
                     f"{qmp_socket_arg(dom.uuid)}'/>")
    if not dom.has_memballoon:
        raise DomainConfigError("<kvm:balloon> needs a balloon device; add "
                                "<memballoon model='virtio'/> under <devices>", vm=dom.name)
    reclaim = r.choice("reclaim", ("none", "idle"), "none")
    shares = r.integer("shares", MIN_SHARES, MAX_SHARES)
    return BalloonSpec(target, min_kib, 2 if period is None else period, policy,  # type: ignore[arg-type]
                       transport, reclaim,  # type: ignore[arg-type]
                       DEFAULT_SHARES if shares is None else shares)
