"""Hugepage pools in sysfs: write a target, read back what the kernel gave, reclaim and retry.

The one seam through which kvmhooks writes to the kernel's pools (tests fake the tree, or subclass
:class:`SysfsPools` to play a kernel that gives fewer pages than asked, or fails a write). It never decides
a target: :mod:`kvmhooks.plan.pools` does, and :mod:`kvmhooks.operations` wraps every call in a write-ahead
intent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from kvmhooks.errors import ApplyError, CapacityError
from kvmhooks.plan.pools import PoolWrite, persistent
from kvmhooks.topology import PoolState, pool_dir, read_pool

log = logging.getLogger(__name__)

# Between reclaim rounds: compaction works in the background for a moment; polling faster only burns CPU.
_RETRY_PAUSE = 0.2


class SysfsPools:
    def __init__(self, sysfs_root: Path = Path("/sys"), proc_root: Path = Path("/proc")):
        self.sysfs_root = sysfs_root
        self.proc_root = proc_root

    def read(self, node: int, size_kib: int) -> PoolState:
        return read_pool(self.sysfs_root, node, size_kib)

    def set(self, node: int, size_kib: int, count: int) -> int:
        """Write nr_hugepages (the kernel's *persistent* pool size) and return the persistent size read back.

        Surplus pages are not persistent: a pool shrunk below what is in use keeps those pages as surplus
        until their user exits, so reading back nr alone would mistake them for ours.
        """
        path = pool_dir(self.sysfs_root, node, size_kib) / "nr_hugepages"
        try:
            path.write_text(f"{count}\n")
        except OSError as e:
            raise ApplyError(f"cannot write {path}", e) from e
        return persistent(self.read(node, size_kib))

    def reclaim(self, node: int) -> None:
        """Drop clean caches and compact the node's memory so huge pages can be cut out of it."""
        for path, value in ((self.proc_root / "sys/vm/drop_caches", "3"),
                            (self.sysfs_root / "devices/system/node" / f"node{node}" / "compact", "1")):
            try:
                path.write_text(value + "\n")
            except OSError as e:
                log.debug("reclaim: cannot write %s: %s", path, e)


def apply_pool_writes(pools: SysfsPools, writes: Sequence[PoolWrite], deadline: float, vm: str) -> dict[str, int]:
    """Write every target; returns each pool's persistent size read back.

    A raise the kernel cannot fully satisfy is retried after reclaiming memory until ``deadline``
    (monotonic), then refused with CapacityError; the caller puts the pools back (its intents say which).
    A shrink the kernel cannot finish (pages it fails to free) is not an error: the read-back is returned,
    recorded, and retried by the next operation on that pool.
    """
    got: dict[str, int] = {}
    short: list[PoolWrite] = []
    for w in writes:
        got[w.pool] = pools.set(w.node, w.size_kib, w.target)
        if w.target > w.before and got[w.pool] < w.target:
            short.append(w)
        elif w.target < w.before and got[w.pool] > w.target:
            log.warning("VM %r: pool %s is at %d pages, target %d: the kernel did not free them all yet (it is "
                        "retried by the next kvmhooks operation)", vm, w.pool, got[w.pool], w.target)
    while short and time.monotonic() < deadline:
        log.info("VM %r: kernel gave fewer pages than asked (%s); reclaiming memory and retrying", vm,
                 ", ".join(f"{w.pool} {got[w.pool]}/{w.target}" for w in short))
        for node in sorted({w.node for w in short}):
            pools.reclaim(node)
        time.sleep(_RETRY_PAUSE)
        for w in short:
            got[w.pool] = pools.set(w.node, w.size_kib, w.target)
        short = [w for w in short if got[w.pool] < w.target]
    if short:
        raise CapacityError("the kernel could not find enough contiguous memory for huge pages "
                            "(" + ", ".join(f"{w.pool}: got {got[w.pool] - w.before} of {w.target - w.before} pages"
                                            for w in short)
                            + "); memory is fragmented: try again, or reserve pages at boot "
                            "(hugepages= on the kernel command line)", vm=vm)
    return got
