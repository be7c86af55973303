"""virtio-mem transports: resize a device's ``requested`` size and read what the guest has plugged.

Two ways, as for the balloon, but with libvirt preferred (``transport="auto"``):

- libvirt: ``updateDeviceFlags`` with the device's own live XML and a new ``<requested>`` (what ``virsh
  update-memory-device --requested-size`` does); the plugged size is the live XML's ``<current>``, which
  libvirt updates from QEMU's MEMORY_DEVICE_SIZE_CHANGE events (measured: within about a second).
- QMP on kvmhooks' dedicated socket (only with ``transport="qmp"``): ``qom-set requested-size`` on the
  device's QOM path and ``qom-get size``. Measured on libvirt 9.0: libvirt then follows ``<current>`` but
  keeps its old ``<requested>``, which it would hand to a migration or a restore and which ``virsh
  dumpxml`` shows; so QMP is the admin's explicit choice, not the default.

Every call has a deadline: QMP's own (the adapter's), and for libvirt a watchdog thread (a libvirtd that
never answers costs balloond that VM's cycle, not the service).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from lxml import etree

from kvmhooks.annotation import BalloonSpec
from kvmhooks.apply.libvirt import call
from kvmhooks.apply.qmp import QMPBalloon, QMPTransportError, _uint
from kvmhooks.domain import Domain, VirtioMemDevice
from kvmhooks.errors import ApplyError
from kvmhooks.xmlsafe import safe_parse

T = TypeVar("T")
# libvirt's own QEMU job wait is 30 s; a call still running after this is stuck.
LIBVIRT_TIMEOUT = 35.0
POLL = 0.05


def with_deadline(what: str, fn: Callable[..., T], *args: Any, timeout: float = LIBVIRT_TIMEOUT) -> T:
    """``call(what, fn, *args)`` (transient libvirt errors retried), abandoned after ``timeout`` seconds.

    libvirt's Python calls block without a timeout of their own; the call runs in a daemon thread, which a
    stuck libvirtd leaves waiting (it ends with the process or when libvirtd answers)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call(what, fn, *args, window=min(timeout / 2, 20.0))
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, name=f"kvmhooks {what}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise ApplyError(f"{what}: libvirt did not answer within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


class VirtioMemResizer(Protocol):
    transport: str

    def read(self) -> tuple[int, int]: ...  # (requested, plugged) KiB
    def set_requested_kib(self, kib: int) -> None: ...


def _device_element(xml: bytes, alias: str | None) -> etree._Element:
    root = safe_parse(xml)
    devices = [m for m in root.iterfind("devices/memory") if m.get("model") == "virtio-mem"]
    for m in devices:
        a = m.find("alias")
        if alias is None or (a is not None and a.get("name") == alias):
            return m
    raise ApplyError(f"no virtio-mem device{f' {alias!r}' if alias else ''} in the domain's live XML")


def _kib(el: etree._Element, tag: str) -> int:
    from kvmhooks.units import libvirt_to_kib

    sub = el.find(f"target/{tag}")
    if sub is None or sub.text is None:
        return 0
    try:
        return libvirt_to_kib(sub.text, sub.get("unit"))
    except ValueError as e:
        raise ApplyError(f"virtio-mem <{tag}> in the live XML: {e}") from None


class LibvirtVirtioMem:
    """``virsh update-memory-device --live`` and the live XML's ``<current>``, through the libvirt API."""

    transport = "libvirt"

    def __init__(self, dom: Any, alias: str | None, timeout: float = LIBVIRT_TIMEOUT):
        self.dom, self.alias, self.timeout = dom, alias, timeout

    def _live(self) -> etree._Element:
        xml = with_deadline("dumpxml", self.dom.XMLDesc, 0, timeout=self.timeout)
        return _device_element(xml.encode() if isinstance(xml, str) else xml, self.alias)

    def read(self) -> tuple[int, int]:
        el = self._live()
        return _kib(el, "requested"), _kib(el, "current")

    def set_requested_kib(self, kib: int) -> None:
        import libvirt

        el = self._live()
        req = el.find("target/requested")
        if req is None:
            target = el.find("target")
            if target is None:
                raise ApplyError("virtio-mem device without <target> in the live XML")
            req = etree.SubElement(target, "requested")
        req.text, req.attrib["unit"] = str(kib), "KiB"
        xml = etree.tostring(el, encoding="unicode")
        with_deadline("update-memory-device --live", self.dom.updateDeviceFlags, xml,
                      libvirt.VIR_DOMAIN_AFFECT_LIVE, timeout=self.timeout)


class QMPVirtioMem:
    """``qom-set requested-size`` / ``qom-get size`` on the device's QOM path, over the dedicated socket
    (the connection is the balloon's: one socket, one client per VM and cycle)."""

    transport = "qmp"

    def __init__(self, qmp: QMPBalloon, alias: str):
        self.qmp = qmp
        self.path = f"/machine/peripheral/{alias}"

    def _get(self, prop: str) -> int:
        raw = self.qmp.execute("qom-get", {"path": self.path, "property": prop})
        n = _uint(raw)
        if n is None:
            raise QMPTransportError(f"QMP qom-get {prop} on {self.path}: expected a byte count, got {str(raw)[:80]!r}")
        return n // 1024

    def read(self) -> tuple[int, int]:
        return self._get("requested-size"), self._get("size")

    def set_requested_kib(self, kib: int) -> None:
        self.qmp.execute("qom-set", {"path": self.path, "property": "requested-size", "value": kib * 1024})


def open_virtio_mem(d: Domain, spec: BalloonSpec, libvirt_dom: Any, qmp: QMPBalloon | None) \
        -> tuple[VirtioMemDevice, VirtioMemResizer]:
    """The VM's (first) virtio-mem device and its transport: QMP only when asked (``transport="qmp"``)
    and the live XML names the device; libvirt otherwise, which keeps its definition in step."""
    if not d.virtio_mem:
        raise ApplyError("the domain has no virtio-mem device")
    dev = d.virtio_mem[0]
    if spec.transport == "qmp" and qmp is not None and dev.alias is not None:
        return dev, QMPVirtioMem(qmp, dev.alias)
    return dev, LibvirtVirtioMem(libvirt_dom, dev.alias)


def wait_plugged(r: VirtioMemResizer, requested_kib: int, tolerance_kib: int, timeout: float) -> int:
    """Poll until the guest has ``requested_kib`` plugged (within ``tolerance_kib``) or ``timeout``; returns
    what it has plugged."""
    deadline = time.monotonic() + timeout
    while True:
        current = r.read()[1]
        if abs(current - requested_kib) <= tolerance_kib or time.monotonic() >= deadline:
            return current
        time.sleep(POLL if timeout < 1 else 0.2)

