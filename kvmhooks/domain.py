"""Parse the domain XML (untrusted input) and our v1 annotation into frozen dataclasses.

The XML may come from a user less trusted than root, so it is parsed with every lxml option spelled out
(lxml before 5.0 expands entities by default): no DTD, no entities, no network, a size cap, and any
DOCTYPE is refused outright. Nothing read here is ever used to build a path or a command unchecked: the
UUID is checked against its canonical form, and names are only ever printed.

Parsing validates the whole annotation (including the parts applied at ``started``) against the contract
in the README and against the domain itself (vCPU numbers, iothread ids, balloon device), so a bad value
anywhere fails at ``prepare`` with one line that names the VM, element, attribute and value.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from lxml import etree

from kvmhooks import NAMESPACE
from kvmhooks.errors import AnnotationError, DomainConfigError, XMLInputError
from kvmhooks.units import (
    ASCII_WS,
    clip,
    libvirt_to_kib,
    parse_cpuset,
    parse_node_list,
    parse_percent,
    parse_size_kib,
    parse_uint,
)

# libvirt domain XML is a few KiB; even with hundreds of disks and NICs it stays far below 1 MiB. Four
# MiB leaves room for odd but honest definitions while bounding what a hostile one can cost us.
MAX_XML_BYTES = 4 * 1024 * 1024

QEMU_CMDLINE_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# Where kvmhooks puts a VM's dedicated QMP socket: writable by the QEMU user (libvirt-qemu), unlike
# /run/libvirt/qemu (measured: "Permission denied" there). Derived from the UUID only.
QMP_SOCKET_DIR = "/var/lib/libvirt/qemu/kvmhooks"
# Bounds for the domain's own counts: far above any QEMU (4096 vCPUs at most today), far below what would
# make a planner loop over every vCPU number for minutes.
MAX_DOMAIN_VCPUS = 16384
MAX_DOMAIN_ID = 65535
# A device alias used in a QOM path (/machine/peripheral/ALIAS): libvirt's own (virtiomem0) or a user's
# (ua-...). Anything else is not used to build a path.
_ALIAS_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")

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

    @property
    def live_work(self) -> bool:
        """Anything to apply after start (needs the libvirt API, so the detached worker)?"""
        return bool(self.cpu or self.vcpupins or self.emulatorpin is not None or self.iothreadpins
                    or self.vcpus_live is not None or self.memtune or self.balloon)


@dataclass(frozen=True)
class NumaCell:
    id: int
    cpus: frozenset[int]
    memory_kib: int


@dataclass(frozen=True)
class VirtioMemDevice:
    """A ``<memory model='virtio-mem'>`` device: memory the guest plugs and unplugs in ``block_kib`` units.

    ``requested_kib`` is what the host asks the guest to have plugged, ``current_kib`` what it has plugged
    (only in a running domain's live XML; libvirt follows QEMU's MEMORY_DEVICE_SIZE_CHANGE events, measured
    to land within about a second)."""

    size_kib: int  # the most it can plug
    block_kib: int
    requested_kib: int
    current_kib: int | None = None
    node: int | None = None
    alias: str | None = None  # libvirt's device alias in a live XML (virtiomem0): its QOM path for QMP


@dataclass(frozen=True)
class Domain:
    """What kvmhooks needs to know about a domain, read once from its XML."""

    name: str
    uuid: str
    domain_type: str
    memory_kib: int
    max_vcpus: int
    current_vcpus: int
    cells: tuple[NumaCell, ...] = ()
    numatune_nodes: frozenset[int] | None = None
    numatune_mode: str | None = None
    memnodes: dict[int, frozenset[int]] = field(default_factory=dict)
    hugepage_backing: bool = False
    backing_page_kib: tuple[int, ...] = ()  # explicit <page size=...> under <hugepages>
    iothreads: int = 0
    has_memballoon: bool = False
    # <memballoon autodeflate='on'>: QEMU deflates the balloon itself when the guest is out of memory.
    balloon_autodeflate: bool = False
    # <memballoon freePageReporting='on'>: the guest hands free pages back to the host on its own.
    balloon_free_page_reporting: bool = False
    qmp_socket: str | None = None
    cpu_mode: str | None = None
    os_hint: str = ""  # from libosinfo metadata, for doctor
    has_tablet: bool = False
    annotated: bool = False
    tuning: Tuning | None = None
    # The live <cputune> (in a running domain's XML: what is applied now), for adopting at reconnect.
    live_vcpupins: dict[int, frozenset[int]] = field(default_factory=dict)
    live_emulatorpin: frozenset[int] | None = None
    # virtio-mem devices, and what libvirt needs for them (<maxMemory slots> and its size; None: absent).
    virtio_mem: tuple[VirtioMemDevice, ...] = ()
    max_memory_kib: int | None = None
    max_memory_slots: int | None = None
    memory_devices_kib: int = 0  # the sizes of all <devices><memory> (dimm, virtio-mem, ...), in <memory>

    @property
    def boot_memory_kib(self) -> int:
        """The memory the guest boots with: libvirt's <memory> counts every memory device's full size."""
        return max(0, self.memory_kib - self.memory_devices_kib)

    @property
    def active_tuning(self) -> Tuning | None:
        """The annotation if it asks kvmhooks to act (present and enabled)."""
        return self.tuning if self.tuning is not None and self.tuning.enabled else None


def qmp_socket_path(uuid: str) -> str:
    """The one QMP socket path kvmhooks uses for a VM; derived from the checked UUID only."""
    if not UUID_RE.fullmatch(uuid):
        raise ValueError(f"not a canonical UUID: {uuid!r}")
    return f"{QMP_SOCKET_DIR}/{uuid}.qmp"


def qmp_socket_arg(uuid: str) -> str:
    return f"unix:{qmp_socket_path(uuid)},server=on,wait=off"


def safe_parse(data: bytes) -> etree._Element:
    """Parse untrusted XML: refuse DOCTYPEs and oversize input; never resolve entities or the network."""
    if len(data) > MAX_XML_BYTES:
        raise XMLInputError(f"domain XML is larger than {MAX_XML_BYTES} bytes; refused")
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise XMLInputError("domain XML contains a DOCTYPE or entity declaration; refused")
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, dtd_validation=False,
                             huge_tree=False, remove_pis=True, collect_ids=False)
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as e:
        raise XMLInputError(f"domain XML is not well-formed: {e}") from None
    if getattr(root.getroottree().docinfo, "doctype", ""):
        raise XMLInputError("domain XML contains a DOCTYPE; refused")
    if root.tag != "domain":
        raise XMLInputError(f"expected a <domain> document, got <{root.tag}>")
    return root


def _text(root: etree._Element, path: str) -> str | None:
    el = root.find(path)
    return None if el is None or el.text is None else el.text.strip(ASCII_WS)


def _int(vm: str, text: str | None, what: str, default: int, hi: int = MAX_DOMAIN_ID) -> int:
    """A whole number from the domain XML (element text already stripped, attributes exact): ASCII digits
    only, at most ``hi``. Anything else is an XMLInputError naming the VM and the field."""
    if text is None:
        return default
    try:
        n = parse_uint(text, len(str(hi)))
    except ValueError as e:
        raise XMLInputError(f"VM {vm!r}: domain XML: {what}: {e}") from None
    if n > hi:
        raise XMLInputError(f"VM {vm!r}: domain XML: {what} {clip(text)} is more than {hi}")
    return n


def _switch(vm: str, el: etree._Element | None, attr: str) -> bool:
    """libvirt's on/off attribute (virTristateSwitch): absent is off; anything else libvirt itself refuses."""
    if el is None or el.get(attr) in (None, "off"):
        return False
    if el.get(attr) == "on":
        return True
    raise XMLInputError(f"VM {vm!r}: domain XML: <{el.tag} {attr}> {clip(el.get(attr, ''))}: expected on or off")


def parse_domain(data: bytes) -> Domain:
    """Parse a domain XML document; validates our annotation when present."""
    root = safe_parse(data)
    name = _text(root, "name") or "?"
    uuid = (_text(root, "uuid") or "").lower()
    if not UUID_RE.fullmatch(uuid):
        raise XMLInputError(f"VM {name!r}: domain XML has no canonical <uuid>")
    mem_el = root.find("memory")
    if mem_el is None or mem_el.text is None:
        raise XMLInputError(f"VM {name!r}: domain XML has no <memory>")
    try:
        memory_kib = libvirt_to_kib(mem_el.text, mem_el.get("unit"))
    except ValueError as e:
        raise XMLInputError(f"VM {name!r}: domain XML: <memory>: {e}") from None
    vcpu_el = root.find("vcpu")
    vcpu_text = None if vcpu_el is None or vcpu_el.text is None else vcpu_el.text.strip(ASCII_WS)
    max_vcpus = _int(name, vcpu_text, "<vcpu>", 1, MAX_DOMAIN_VCPUS)
    current_vcpus = _int(name, vcpu_el.get("current") if vcpu_el is not None else None, "<vcpu current>",
                         max_vcpus, MAX_DOMAIN_VCPUS)

    cells: list[NumaCell] = []
    for c in root.iterfind("cpu/numa/cell"):
        cell_id = _int(name, c.get("id"), "<numa><cell id>", len(cells))
        try:
            cell_cpus = parse_cpuset(c.get("cpus", "")) if c.get("cpus") else frozenset()
        except ValueError as e:
            raise XMLInputError(f"VM {name!r}: domain XML: <numa><cell cpus>: {e}") from None
        try:
            cell_kib = libvirt_to_kib(c.get("memory", "0"), c.get("unit"))
        except ValueError as e:
            raise XMLInputError(f"VM {name!r}: domain XML: <numa><cell memory>: {e}") from None
        cells.append(NumaCell(cell_id, cell_cpus, cell_kib))

    numatune_nodes = None
    numatune_mode = None
    memnodes: dict[int, frozenset[int]] = {}
    nt = root.find("numatune/memory")
    try:
        if nt is not None:
            numatune_mode = nt.get("mode", "strict")
            if nt.get("nodeset"):
                numatune_nodes = parse_node_list(nt.get("nodeset", ""))
        for mn in root.iterfind("numatune/memnode"):
            cellid = _int(name, mn.get("cellid"), "<numatune><memnode cellid>", 0)
            memnodes[cellid] = parse_node_list(mn.get("nodeset", ""))
    except ValueError as e:
        raise XMLInputError(f"VM {name!r}: domain XML: <numatune>: {e}") from None

    hp = root.find("memoryBacking/hugepages")
    page_sizes: list[int] = []
    if hp is not None:
        for page in hp.iterfind("page"):
            try:
                page_sizes.append(libvirt_to_kib(page.get("size", ""), page.get("unit")))
            except ValueError as e:
                raise XMLInputError(f"VM {name!r}: domain XML: <memoryBacking><hugepages><page size>: {e}") \
                    from None

    qmp_socket = None
    expected = qmp_socket_arg(uuid)
    args = [a.get("value") for a in root.iterfind(f"{{{QEMU_CMDLINE_NS}}}commandline/{{{QEMU_CMDLINE_NS}}}arg")]
    for prev, arg in itertools.pairwise(args):
        if prev == "-qmp" and arg == expected:
            qmp_socket = qmp_socket_path(uuid)

    balloon_dev = next((m for m in root.iterfind("devices/memballoon") if m.get("model") not in (None, "none")),
                       None)
    autodeflate = _switch(name, balloon_dev, "autodeflate")
    free_page_reporting = _switch(name, balloon_dev, "freePageReporting")

    cpu_el = root.find("cpu")
    live_vcpupins: dict[int, frozenset[int]] = {}
    live_emulatorpin = None
    try:
        for vp in root.iterfind("cputune/vcpupin"):
            vcpu = _int(name, vp.get("vcpu"), "<cputune><vcpupin vcpu>", 0, MAX_DOMAIN_VCPUS)
            live_vcpupins[vcpu] = parse_cpuset(vp.get("cpuset", ""))
        ep = root.find("cputune/emulatorpin")
        if ep is not None:
            live_emulatorpin = parse_cpuset(ep.get("cpuset", ""))
    except ValueError as e:
        raise XMLInputError(f"VM {name!r}: domain XML: <cputune>: {e}") from None
    virtio_mem, devices_kib = _memory_devices(name, root)
    max_mem_el = root.find("maxMemory")
    max_memory_kib = max_memory_slots = None
    if max_mem_el is not None:
        try:
            max_memory_kib = libvirt_to_kib(max_mem_el.text or "", max_mem_el.get("unit"))
        except ValueError as e:
            raise XMLInputError(f"VM {name!r}: domain XML: <maxMemory>: {e}") from None
        max_memory_slots = _int(name, max_mem_el.get("slots"), "<maxMemory slots>", 0)
    os_hint = ""
    for el in root.iter():
        if isinstance(el.tag, str) and el.tag.endswith("}os") and el.get("id"):
            os_hint = el.get("id", "")
    dom = Domain(
        name=name, uuid=uuid, domain_type=root.get("type", ""), memory_kib=memory_kib,
        max_vcpus=max_vcpus, current_vcpus=current_vcpus, cells=tuple(cells),
        numatune_nodes=numatune_nodes, numatune_mode=numatune_mode, memnodes=memnodes,
        hugepage_backing=hp is not None, backing_page_kib=tuple(page_sizes),
        iothreads=_int(name, _text(root, "iothreads"), "<iothreads>", 0),
        has_memballoon=balloon_dev is not None, balloon_autodeflate=autodeflate,
        balloon_free_page_reporting=free_page_reporting,
        qmp_socket=qmp_socket, cpu_mode=cpu_el.get("mode") if cpu_el is not None else None,
        os_hint=os_hint,
        has_tablet=any(i.get("type") == "tablet" for i in root.iterfind("devices/input")),
        live_vcpupins=live_vcpupins, live_emulatorpin=live_emulatorpin,
        virtio_mem=virtio_mem, max_memory_kib=max_memory_kib, max_memory_slots=max_memory_slots,
        memory_devices_kib=devices_kib,
    )
    tuning_el = root.find(f"metadata/{_K}tuning")
    if tuning_el is None:
        return dom
    tuning = _parse_tuning(tuning_el, dom)
    return Domain(**{**dom.__dict__, "annotated": True, "tuning": tuning})


def _memory_devices(vm: str, root: etree._Element) -> tuple[tuple[VirtioMemDevice, ...], int]:
    """The virtio-mem devices, and the total size of all memory devices (what <memory> adds to the boot
    memory). libvirt has validated its own XML; this only refuses what it cannot read as a size."""
    found: list[VirtioMemDevice] = []
    total = 0

    def size(el: etree._Element, tag: str) -> int | None:
        sub = el.find(f"target/{tag}")
        if sub is None or sub.text is None:
            return None
        try:
            return libvirt_to_kib(sub.text, sub.get("unit"))
        except ValueError as e:
            raise XMLInputError(f"VM {vm!r}: domain XML: <memory model={clip(el.get('model', ''))}> "
                                f"<{tag}>: {e}") from None

    for el in root.iterfind("devices/memory"):
        kib = size(el, "size") or 0
        total += kib
        if el.get("model") != "virtio-mem":
            continue
        block = size(el, "block") or 2048  # libvirt's and QEMU's default on x86: the THP size
        node_text = el.findtext("target/node")
        alias_el = el.find("alias")
        alias = alias_el.get("name") if alias_el is not None else None
        found.append(VirtioMemDevice(
            size_kib=kib, block_kib=block, requested_kib=size(el, "requested") or 0, current_kib=size(el, "current"),
            node=_int(vm, node_text.strip(ASCII_WS), "<memory><target><node>", 0) if node_text else None,
            alias=alias if alias is not None and _ALIAS_RE.fullmatch(alias) else None))
    return tuple(found), total


# --- the annotation -------------------------------------------------------------------------------------

_ELEMENTS: dict[str, tuple[str, ...]] = {
    "hugepages": ("size", "nodes", "count", "required"),
    "cpu": ("policy", "threads", "emulator"),
    "vcpupin": ("vcpu", "cpuset"),
    "emulatorpin": ("cpuset",),
    "iothreadpin": ("iothread", "cpuset"),
    "cputune": ("persist",),
    "vcpus": ("live",),
    "memtune": ("hard_limit", "soft_limit", "swap_hard_limit", "min_guarantee"),
    "balloon": ("target", "min", "stats-period", "policy", "transport", "reclaim", "shares"),
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


def _parse_tuning(el: etree._Element, dom: Domain) -> Tuning:
    """Validate and read ``<kvm:tuning>`` in two passes, so the order of its elements never matters.

    Pass 1 checks each element on its own (our namespace, a known tag, given once unless repeatable, known
    attributes) and collects them. Pass 2 reads them in a fixed dependency order (memtune before balloon,
    whose floor defaults to memtune/min_guarantee) and applies the rules that span elements.
    """
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
        if tag not in _ELEMENTS:
            raise AnnotationError(vm, tag, None, None, "unknown element (known: " + ", ".join(_ELEMENTS) + ")")
        if tag in found and tag not in _REPEATABLE:
            raise AnnotationError(vm, tag, None, None, "given more than once")
        r = _Reader(vm, tag, child)
        for attr in map(str, child.keys()):
            if attr not in _ELEMENTS[tag]:
                raise r.fail(attr, child.get(attr), "unknown attribute (known: " + ", ".join(_ELEMENTS[tag]) + ")")
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
    return Tuning(
        enabled=enabled,
        hugepages=_parse_hugepages(hp, dom) if hp is not None else None,
        cpu=_parse_cpu(cpu) if cpu is not None else None,
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
    )


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
        raise r.fail("transport", "qmp", "the domain has no kvmhooks QMP socket; run 'kvmhooks annotate "
                     f"{dom.name} --qmp' or add <qemu:arg value='-qmp'/><qemu:arg value='"
                     f"{qmp_socket_arg(dom.uuid)}'/>")
    if not dom.has_memballoon:
        raise DomainConfigError(f"VM {dom.name!r}: <kvm:balloon> needs a balloon device; add "
                                "<memballoon model='virtio'/> under <devices>")
    reclaim = r.choice("reclaim", ("none", "idle"), "none")
    shares = r.integer("shares", MIN_SHARES, MAX_SHARES)
    return BalloonSpec(target, min_kib, 2 if period is None else period, policy,  # type: ignore[arg-type]
                       transport, reclaim,  # type: ignore[arg-type]
                       DEFAULT_SHARES if shares is None else shares)


# scan_uuid reads only this much: libvirt writes <name> and <uuid> first, a few hundred bytes in.
SCAN_UUID_BYTES = 64 * 1024
_SCAN_UUID_RE = re.compile(rb"<uuid>[ \t\r\n]*([0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-"
                           rb"[0-9A-Fa-f]{12})[ \t\r\n]*</uuid>")


def scan_uuid(data: bytes) -> str | None:
    """The domain's UUID without parsing the XML, for the stopped/release hooks; None if there is none.

    Release must work for any VM that got through prepare, even when its XML would now be refused (another
    namespace's metadata with a DOCTYPE in a comment, a definition grown past MAX_XML_BYTES): a refused
    release leaks the VM's pages and CPUs until a reconcile. So this only looks at the first
    SCAN_UUID_BYTES for the first literal ``<uuid>`` tag. That tag is the real one: libvirt writes <name>
    and <uuid> before <metadata>, and user text before it (name, title, description) is escaped, so it
    cannot contain a literal tag. Only the canonical 8-4-4-4-12 hex form is accepted (returned lowercased);
    a malformed first tag is None, never a reason to look further.
    """
    head = data[:SCAN_UUID_BYTES]
    start = head.find(b"<uuid>")
    if start < 0:
        return None
    m = _SCAN_UUID_RE.match(head, start)
    return None if m is None else m.group(1).decode("ascii").lower()


def read_uuid_and_name(data: bytes) -> tuple[str, str]:
    """Cheap UUID/name extraction for hooks that only need to release (no validation of the rest)."""
    root = safe_parse(data)
    uuid = (_text(root, "uuid") or "").lower()
    if not UUID_RE.fullmatch(uuid):
        raise XMLInputError("domain XML has no canonical <uuid>")
    return uuid, _text(root, "name") or "?"
