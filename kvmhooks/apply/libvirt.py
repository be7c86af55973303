"""libvirt for kvmhooks' own processes (worker, balloond, the CLI): the connection, lookups, and the calls
for live tuning, in one place that classifies errors and retries the transient ones.

As in oVirt MOM, libvirt errors are classified once by their symbolic ``VIR_ERR_*`` names: a domain job
still held by the start that is finishing ("cannot acquire state change lock") is worth a short retry;
anything else is reported as it is.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from kvmhooks.errors import ApplyError, ConnectError, NotFound

log = logging.getLogger(__name__)
T = TypeVar("T")

# Retry window for transient job errors: the start job ends within a second of `started`; libvirt's own
# job wait is 30 s, so 20 s covers a busy host without hiding a stuck one.
RETRY_WINDOW = 20.0
_RETRY_PAUSE = 0.1


def _transient_codes() -> set[int]:
    import libvirt

    return {getattr(libvirt, n) for n in ("VIR_ERR_OPERATION_TIMEOUT", "VIR_ERR_AGAIN", "VIR_ERR_RESOURCE_BUSY")
            if hasattr(libvirt, n)}


def call(what: str, fn: Callable[..., T], *args: Any, window: float = RETRY_WINDOW) -> T:
    """Call a libvirt method, retrying transient errors until ``window`` seconds have passed."""
    import libvirt

    deadline = time.monotonic() + window
    transient = _transient_codes()
    while True:
        try:
            return fn(*args)
        except libvirt.libvirtError as e:
            if e.get_error_code() in transient and time.monotonic() < deadline:
                log.debug("%s: transient libvirt error, retrying: %s", what, e)
                time.sleep(_RETRY_PAUSE)
                continue
            raise ApplyError(what, e) from e


def cpumap(cpus: frozenset[int] | set[int], ncpus: int) -> tuple[bool, ...]:
    """libvirt's cpumap: one bool per host CPU."""
    return tuple(i in cpus for i in range(ncpus))


def from_cpumap(bits: tuple[bool, ...] | list[bool]) -> frozenset[int]:
    return frozenset(i for i, b in enumerate(bits) if b)


def connect(uri: str) -> Any:
    import libvirt

    quiet_libvirt()
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as e:
        hint = ("run as root (qemu:///system needs root or the libvirt group)" if os.geteuid() != 0 else
                "is libvirtd running? (systemctl start libvirtd, or libvirtd -d)")
        raise ConnectError(f"cannot connect to {uri}: {e.get_error_message()}; {hint}") from None


def quiet_libvirt() -> None:
    """libvirt prints every error to stderr by default; we report the ones that matter ourselves."""
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def lookup(conn: Any, name: str) -> Any:
    import libvirt

    for fn in (conn.lookupByName, conn.lookupByUUIDString):
        try:
            return fn(name)
        except libvirt.libvirtError:
            continue
    raise NotFound(f"no domain named {name!r} (see 'virsh list --all')")
