"""What kvmhooks needs to know about a domain, read once from its (untrusted) XML: :class:`Domain`.

The XML is read with :mod:`kvmhooks.xmlsafe`'s parser; nothing read here is ever used to build a path or a
command unchecked (the UUID is checked against its canonical form, names are only ever printed). When the
domain carries our annotation, :mod:`kvmhooks.annotation` reads it against the contract and against the
domain itself (vCPU numbers, iothread ids, balloon device), so a bad value anywhere fails at ``prepare``
with one line that names the VM, element, attribute and value.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

from lxml import etree

from kvmhooks import NAMESPACE
from kvmhooks.annotation import Tuning, parse_tuning
from kvmhooks.apply.sockets import qmp_socket_path
from kvmhooks.errors import XMLInputError
from kvmhooks.units import (
    ASCII_WS,
    clip,
    libvirt_to_kib,
    parse_cpuset,
    parse_node_list,
    parse_uint,
)
from kvmhooks.xmlsafe import UUID_RE, safe_parse

QEMU_CMDLINE_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
# Bounds for the domain's own counts: far above any QEMU (4096 vCPUs at most today), far below what would
# make a planner loop over every vCPU number for minutes.
MAX_DOMAIN_VCPUS = 16384
MAX_DOMAIN_ID = 65535
# A device alias used in a QOM path (/machine/peripheral/ALIAS): libvirt's own (virtiomem0) or a user's
# (ua-...). Anything else is not used to build a path.
_ALIAS_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")

_K = f"{{{NAMESPACE}}}"


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




def qmp_socket_arg(uuid: str) -> str:
    return f"unix:{qmp_socket_path(uuid)},server=on,wait=off"


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
        raise XMLInputError(f"domain XML: {what}: {e}", vm=vm) from None
    if n > hi:
        raise XMLInputError(f"domain XML: {what} {clip(text)} is more than {hi}", vm=vm)
    return n


def _switch(vm: str, el: etree._Element | None, attr: str) -> bool:
    """libvirt's on/off attribute (virTristateSwitch): absent is off; anything else libvirt itself refuses."""
    if el is None or el.get(attr) in (None, "off"):
        return False
    if el.get(attr) == "on":
        return True
    raise XMLInputError(f"domain XML: <{el.tag} {attr}> {clip(el.get(attr, ''))}: expected on or off", vm=vm)


def parse_domain(data: bytes) -> Domain:
    """Parse a domain XML document; validates our annotation when present."""
    root = safe_parse(data)
    name = _text(root, "name") or "?"
    uuid = (_text(root, "uuid") or "").lower()
    if not UUID_RE.fullmatch(uuid):
        raise XMLInputError("domain XML has no canonical <uuid>", vm=name)
    mem_el = root.find("memory")
    if mem_el is None or mem_el.text is None:
        raise XMLInputError("domain XML has no <memory>", vm=name)
    try:
        memory_kib = libvirt_to_kib(mem_el.text, mem_el.get("unit"))
    except ValueError as e:
        raise XMLInputError(f"domain XML: <memory>: {e}", vm=name) from None
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
            raise XMLInputError(f"domain XML: <numa><cell cpus>: {e}", vm=name) from None
        try:
            cell_kib = libvirt_to_kib(c.get("memory", "0"), c.get("unit"))
        except ValueError as e:
            raise XMLInputError(f"domain XML: <numa><cell memory>: {e}", vm=name) from None
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
        raise XMLInputError(f"domain XML: <numatune>: {e}", vm=name) from None

    hp = root.find("memoryBacking/hugepages")
    page_sizes: list[int] = []
    if hp is not None:
        for page in hp.iterfind("page"):
            try:
                page_sizes.append(libvirt_to_kib(page.get("size", ""), page.get("unit")))
            except ValueError as e:
                raise XMLInputError(f"domain XML: <memoryBacking><hugepages><page size>: {e}", vm=name) \
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
        raise XMLInputError(f"domain XML: <cputune>: {e}", vm=name) from None
    virtio_mem, devices_kib = _memory_devices(name, root)
    max_mem_el = root.find("maxMemory")
    max_memory_kib = max_memory_slots = None
    if max_mem_el is not None:
        try:
            max_memory_kib = libvirt_to_kib(max_mem_el.text or "", max_mem_el.get("unit"))
        except ValueError as e:
            raise XMLInputError(f"domain XML: <maxMemory>: {e}", vm=name) from None
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
    tuning = parse_tuning(tuning_el, dom)
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
            raise XMLInputError(f"domain XML: <memory model={clip(el.get('model', ''))}> "
                                f"<{tag}>: {e}", vm=vm) from None

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
