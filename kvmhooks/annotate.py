"""Edit a domain definition for ``kvmhooks annotate``: our metadata element plus what it needs to work.

Pure text-in/text-out over lxml, so the CLI can show a diff before (or instead of) defining it. Only our
parts change: the ``<kvm:tuning>`` element, ``<memoryBacking><hugepages>``, the dedicated QMP socket, and
with ``--balloon`` the balloon device's own defence, ``autodeflate='on'`` (QEMU's deflate-on-oom: a guest
about to OOM takes its ballooned memory back itself, whatever balloond does; issue 9). Free page reporting
is offered (a note), or written when asked for: it changes how the guest uses its memory, which is the
admin's call, and it cannot work with huge page backing or a VFIO device.

``--virtio-mem SIZE`` adds a virtio-mem device of SIZE and what libvirt needs for it: ``<maxMemory
slots>`` (at least the new total), a guest NUMA cell holding the boot memory when the domain has none,
``<memory>`` grown by SIZE (libvirt counts the device's full size there), and the device with
``requested`` 0, so the guest boots exactly as before and ``kvmhooks balloond`` plugs what it needs. Without
a ``<kvm:balloon>`` it also writes ``<kvm:balloon policy="auto" min=BOOT/>`` (the guest's total moves between
its boot memory and boot + SIZE) and a balloon device, whose guest stats the policy reads. ``--remove``
leaves the device: it is the VM's hardware now, and removing it changes what the guest can have.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from lxml import etree

from kvmhooks import NAMESPACE, PREFIX
from kvmhooks.domain import QEMU_CMDLINE_NS, qmp_socket_arg
from kvmhooks.errors import DomainConfigError, UsageError
from kvmhooks.topology import HostTopology
from kvmhooks.units import format_kib, libvirt_to_kib, parse_cpuset, parse_size_kib
from kvmhooks.xmlsafe import safe_parse

_K = f"{{{NAMESPACE}}}"
_Q = f"{{{QEMU_CMDLINE_NS}}}"
GIB_KIB = 1024 * 1024


@dataclass(frozen=True)
class AnnotateRequest:
    hugepages: str | None = None  # 2M / 1G / auto
    cpu: str | None = None  # dedicated / shared
    pin: str | None = None  # auto / "2,3"
    balloon: str | None = None  # target
    qmp: bool = False
    free_page_reporting: bool = False  # <memballoon freePageReporting='on'> (refused where it cannot work)
    virtio_mem: str | None = None  # SIZE of a virtio-mem device to add (or to resize ours to)
    remove: bool = False
    remove_backing: bool = False  # with remove: annotate had added the hugepage backing
    remove_autodeflate: bool = False  # with remove: annotate had turned autodeflate on (Edited.added_autodeflate)


@dataclass(frozen=True)
class Edited:
    xml: str
    added_backing: bool = False
    added_autodeflate: bool = False  # the CLI records it, as the backing, so --remove takes back only ours
    notes: tuple[str, ...] = ()  # advice for the admin beside the diff (e.g. free page reporting on offer)


def has_vfio_hostdev(root: etree._Element) -> bool:
    """A PCI or mdev host device (both go through VFIO on today's libvirt): the guest's memory is pinned for
    DMA, so neither the balloon's free page reporting nor huge-page-less reclaim can hand pages back."""
    return any(h.get("type") in ("pci", "mdev") for h in root.iterfind("devices/hostdev"))


def _memballoon(root: etree._Element) -> etree._Element:
    """The domain's virtio balloon device, added when the XML names none (libvirt would add the same)."""
    for mb in root.iterfind("devices/memballoon"):
        if mb.get("model") not in (None, "none"):
            return mb
    devices = root.find("devices")
    if devices is None:
        devices = etree.SubElement(root, "devices")
    if devices.find("memballoon") is not None:  # model='none': the admin's choice; parse_domain says so
        return devices.find("memballoon")  # type: ignore[return-value]
    return etree.SubElement(devices, "memballoon", model="virtio")


def _new_after(root: etree._Element, tag: str, *anchors: str) -> etree._Element:
    """A new child of <domain> right after the first anchor element present (libvirt's usual order)."""
    el = etree.Element(tag)
    anchor = next((a for a in (root.find(t) for t in anchors) if a is not None), None)
    if anchor is not None:
        anchor.addnext(el)
    else:
        root.append(el)
    return el


def _set(tuning: etree._Element, name: str, **attrs: str) -> None:
    for old in tuning.findall(_K + name):
        tuning.remove(old)
    el = etree.SubElement(tuning, _K + name)
    for k, v in attrs.items():
        el.set(k.replace("_", "-") if k == "stats_period" else k, v)


def auto_page_kib(memory_kib: int, topo: HostTopology) -> int:
    """The contract's `auto`: 1G when the memory is whole GiB and the host has (mounted) 1G pages, else 2M."""
    if memory_kib % GIB_KIB == 0 and GIB_KIB in topo.page_sizes and GIB_KIB in topo.hugetlbfs:
        return GIB_KIB
    return 2048


def _remove_persisted_pins(root: etree._Element) -> None:
    """Undo ``<kvm:cputune persist="yes"/>``: the worker wrote the pins into the persistent ``<cputune>``, so
    the pins there are kvmhooks'; the rest of ``<cputune>`` (shares, period, quota) stays the admin's."""
    cputune = root.find("cputune")
    if cputune is None:
        return
    for tag in ("vcpupin", "emulatorpin", "iothreadpin"):
        for el in cputune.findall(tag):
            cputune.remove(el)
    if len(cputune) == 0:
        root.remove(cputune)


def edit_domain_xml(xml: str, req: AnnotateRequest, topo: HostTopology) -> Edited:
    root = safe_parse(xml.encode())
    uuid = (root.findtext("uuid") or "").strip()
    if req.remove:
        meta = root.find("metadata")
        if meta is not None and meta.findall(_K + "tuning"):
            for el in meta.findall(_K + "tuning"):
                persist = el.find(_K + "cputune")
                if persist is not None and persist.get("persist") == "yes":
                    _remove_persisted_pins(root)
                meta.remove(el)
            if len(meta) == 0:  # we emptied it
                root.remove(meta)
        _remove_qmp(root, uuid)
        if req.remove_autodeflate:
            for dev in root.iterfind("devices/memballoon"):
                if "autodeflate" in dev.attrib:
                    del dev.attrib["autodeflate"]
        if req.remove_backing:
            mb = root.find("memoryBacking")
            if mb is not None and mb.find("hugepages") is not None:
                mb.remove(mb.find("hugepages"))  # type: ignore[arg-type]
                if len(mb) == 0:
                    root.remove(mb)
        return Edited(etree.tostring(root, encoding="unicode"))
    meta = root.find("metadata")
    if meta is None:
        meta = _new_after(root, "metadata", "description", "title", "uuid", "name")
    tuning = meta.find(_K + "tuning")
    if tuning is None:
        tuning = etree.SubElement(meta, _K + "tuning", nsmap={PREFIX: NAMESPACE})
    added_backing = False
    if req.hugepages:
        _set(tuning, "hugepages", size=req.hugepages)
        mem = root.find("memory")
        memory_kib = libvirt_to_kib(mem.text or "0", mem.get("unit")) if mem is not None else 0
        size = {"2M": 2048, "1G": GIB_KIB}.get(req.hugepages) or auto_page_kib(memory_kib, topo)
        mb = root.find("memoryBacking")
        if mb is None:
            mb = _new_after(root, "memoryBacking", "currentMemory", "memory")
        hp = mb.find("hugepages")
        if hp is None:
            hp = etree.SubElement(mb, "hugepages")
            added_backing = True
        if size != topo.default_page_kib and not hp.findall("page"):
            etree.SubElement(hp, "page", size=str(size), unit="KiB")
    if req.cpu or req.pin == "auto":
        _set(tuning, "cpu", policy=req.cpu or "dedicated")
    if req.pin and req.pin != "auto":
        try:
            cpus = [int(c) for c in req.pin.split(",")]
            for c in cpus:
                parse_cpuset(str(c))
        except ValueError:
            raise UsageError(f"--pin {req.pin!r}: expected 'auto' or host CPUs for vCPU 0,1,... like 2,3") from None
        for old in tuning.findall(_K + "vcpupin"):
            tuning.remove(old)
        for v, c in enumerate(cpus):
            etree.SubElement(tuning, _K + "vcpupin", vcpu=str(v), cpuset=str(c))
    notes: list[str] = []
    added_autodeflate = False
    if req.balloon:
        _set(tuning, "balloon", target=req.balloon)
        dev = _memballoon(root)
        if dev.get("model") not in (None, "none") and dev.get("autodeflate") != "on":
            dev.set("autodeflate", "on")
            added_autodeflate = True
    hugepage_backed = root.find("memoryBacking/hugepages") is not None
    vfio = has_vfio_hostdev(root)
    if req.free_page_reporting:
        if hugepage_backed or vfio:
            raise DomainConfigError("free page reporting cannot work for this VM: " + (
                "it is backed by huge pages (the host cannot take back part of a huge page)" if hugepage_backed
                else "it has a VFIO host device (its memory is pinned for DMA)"))
        _memballoon(root).set("freePageReporting", "on")
    elif req.balloon and not hugepage_backed and not vfio and _memballoon(root).get("freePageReporting") != "on":
        notes.append("free page reporting is available for this VM: the guest hands the pages it frees back to "
                     "the host without shrinking (<memballoon freePageReporting='on'>, libvirt ≥ 6.9; takes effect "
                     "at the next start)")
    if req.virtio_mem:
        notes += _add_virtio_mem(root, req.virtio_mem, tuning)
        if tuning.find(_K + "balloon") is not None:
            dev = _memballoon(root)  # the policy's eyes: guest stats come from the balloon driver
            if dev.get("model") not in (None, "none") and dev.get("autodeflate") != "on":
                dev.set("autodeflate", "on")
                added_autodeflate = True
    if req.qmp:
        _add_qmp(root, uuid)
    return Edited(etree.tostring(root, encoding="unicode"), added_backing, added_autodeflate, tuple(notes))


# virtio-mem's block: 2 MiB on x86 (the THP size; QEMU's and libvirt's default), or the backing's huge page.
VIRTIO_MEM_BLOCK_KIB = 2048
VIRTIO_MEM_GUEST_NOTE = (
    "virtio-mem needs the guest's cooperation: a Linux kernel ≥ 5.8 with virtio_mem (built in or loaded), "
    "and hot-plugged memory onlined as movable so it can be unplugged again: memhp_default_state="
    "online_movable on the guest's kernel command line (or a udev rule onlining memory blocks as "
    "online_movable). Without it the guest plugs nothing (or never gives memory back); balloond reports it")


def _kib_of(el: etree._Element | None) -> int:
    return libvirt_to_kib(el.text or "0", el.get("unit")) if el is not None else 0


def _add_virtio_mem(root: etree._Element, size_text: str, tuning: etree._Element) -> list[str]:
    """Add (or resize) the virtio-mem device and what it needs; returns notes for the admin."""
    try:
        size = parse_size_kib(size_text)
    except ValueError as e:
        raise UsageError(f"--virtio-mem {size_text!r}: {e}") from None
    page = root.find("memoryBacking/hugepages/page")
    block = VIRTIO_MEM_BLOCK_KIB
    if page is not None and page.get("size"):  # a block must hold whole huge pages
        block = max(block, libvirt_to_kib(page.get("size", "0"), page.get("unit")))
    size = -(-size // block) * block
    if size <= 0:
        raise UsageError(f"--virtio-mem {size_text!r}: must be more than zero")
    mem = root.find("memory")
    if mem is None:
        raise DomainConfigError("the domain has no <memory>")
    devices = root.find("devices")
    if devices is None:
        devices = etree.SubElement(root, "devices")
    ours = next((m for m in devices.iterfind("memory") if m.get("model") == "virtio-mem"), None)
    old_size = _kib_of(ours.find("target/size")) if ours is not None else 0
    all_devices = sum(_kib_of(m.find("target/size")) for m in devices.iterfind("memory"))
    boot = _kib_of(mem) - all_devices
    total = boot + all_devices - old_size + size
    if boot <= 0:
        raise DomainConfigError("cannot tell the boot memory: <memory> is not above its memory devices' sizes")
    mem.text, mem.attrib["unit"] = str(total), "KiB"
    maxmem = root.find("maxMemory")
    if maxmem is None:
        maxmem = etree.Element("maxMemory", slots="16", unit="KiB")
        mem.addprevious(maxmem)
        maxmem.text = str(total)
    elif _kib_of(maxmem) < total:
        maxmem.text, maxmem.attrib["unit"] = str(total), "KiB"
    cells = root.findall("cpu/numa/cell")
    if not cells:
        cpu = root.find("cpu")
        if cpu is None:
            cpu = _new_after(root, "cpu", "vcpu", "currentMemory", "memory")
        numa = cpu.find("numa")
        if numa is None:
            numa = etree.SubElement(cpu, "numa")
        vcpu = root.find("vcpu")
        n = int((vcpu.text or "1").strip()) if vcpu is not None else 1
        etree.SubElement(numa, "cell", id="0", cpus=f"0-{n - 1}" if n > 1 else "0", memory=str(boot), unit="KiB")
    node = cells[0].get("id", "0") if cells else "0"
    if ours is None:
        ours = etree.SubElement(devices, "memory", model="virtio-mem")
        target = etree.SubElement(ours, "target")
        etree.SubElement(target, "size", unit="KiB").text = str(size)
        etree.SubElement(target, "node").text = node
        etree.SubElement(target, "block", unit="KiB").text = str(block)
        etree.SubElement(target, "requested", unit="KiB").text = "0"
    else:
        sz = ours.find("target/size")
        assert sz is not None  # counted above
        sz.text, sz.attrib["unit"] = str(size), "KiB"
        req_el = ours.find("target/requested")
        if req_el is not None and _kib_of(req_el) > size:
            req_el.text, req_el.attrib["unit"] = str(size), "KiB"
    if tuning.find(_K + "balloon") is None:
        _set(tuning, "balloon", policy="auto", min=format_kib(boot))
    return [VIRTIO_MEM_GUEST_NOTE]


def normalize(xml: str) -> str:
    """One layout for any domain XML (libvirt's or ours), so a diff shows only what changed in meaning."""
    root = safe_parse(xml.encode())
    for el in root.iter():
        if len(el) and el.text is not None and not el.text.strip():
            el.text = None
        if el.tail is not None and not el.tail.strip():
            el.tail = None
    return etree.tostring(root, encoding="unicode", pretty_print=True)


def _add_qmp(root: etree._Element, uuid: str) -> None:
    cmd = root.find(_Q + "commandline")
    if cmd is None:
        cmd = etree.SubElement(root, _Q + "commandline", nsmap={"qemu": QEMU_CMDLINE_NS})
    values = [a.get("value") for a in cmd.findall(_Q + "arg")]
    if qmp_socket_arg(uuid) in values:
        return
    etree.SubElement(cmd, _Q + "arg", value="-qmp")
    etree.SubElement(cmd, _Q + "arg", value=qmp_socket_arg(uuid))


def _remove_qmp(root: etree._Element, uuid: str) -> None:
    cmd = root.find(_Q + "commandline")
    if cmd is None:
        return
    args = cmd.findall(_Q + "arg")
    for prev, arg in itertools.pairwise(args):
        if prev.get("value") == "-qmp" and arg.get("value") == qmp_socket_arg(uuid):
            cmd.remove(prev)
            cmd.remove(arg)
    if len(cmd) == 0:
        root.remove(cmd)
