"""Hugepage pools in sysfs: write a target, read back what the kernel gave, reclaim, restore.

The one seam through which kvmhooks writes to the kernel's pools (tests fake the tree, or subclass
:class:`SysfsPools` to play a kernel that gives fewer pages than asked).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from kvmhooks.errors import ApplyError, CapacityError
from kvmhooks.plan.hugepages import PoolWrite
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
        """Write nr_hugepages and return what the kernel actually holds now."""
        path = pool_dir(self.sysfs_root, node, size_kib) / "nr_hugepages"
        try:
            path.write_text(f"{count}\n")
        except OSError as e:
            raise ApplyError(f"cannot write {path}", e) from e
        return self.read(node, size_kib).nr

    def reclaim(self, node: int) -> None:
        """Drop clean caches and compact the node's memory so huge pages can be cut out of it."""
        for path, value in ((self.proc_root / "sys/vm/drop_caches", "3"),
                            (self.sysfs_root / "devices/system/node" / f"node{node}" / "compact", "1")):
            try:
                path.write_text(value + "\n")
            except OSError as e:
                log.debug("reclaim: cannot write %s: %s", path, e)


def apply_pool_writes(pools: SysfsPools, writes: Sequence[PoolWrite], deadline: float, vm: str) -> None:
    """Raise every pool to its target; on a shortfall reclaim and retry until ``deadline`` (monotonic).

    If still short, every pool is restored to its value before the call and CapacityError is raised:
    a failed reservation leaves the host exactly as it was.
    """
    done: list[PoolWrite] = []
    try:
        short: list[tuple[PoolWrite, int]] = []
        for w in writes:
            done.append(w)
            got = pools.set(w.node, w.size_kib, w.target)
            if got < w.target:
                short.append((w, got))
        while short and time.monotonic() < deadline:
            log.info("VM %r: kernel gave fewer pages than asked (%s); reclaiming memory and retrying", vm,
                     ", ".join(f"{w.pool} {got}/{w.target}" for w, got in short))
            for node in sorted({w.node for w, _ in short}):
                pools.reclaim(node)
            time.sleep(_RETRY_PAUSE)
            short = [(w, got) for w in (w for w, _ in short)
                     if (got := pools.set(w.node, w.size_kib, w.target)) < w.target]
        if short:
            raise CapacityError(f"VM {vm!r}: the kernel could not find enough contiguous memory for huge pages "
                                "(" + ", ".join(f"{w.pool}: got {got - w.before} of {w.target - w.before} pages"
                                                for w, got in short)
                                + "); memory is fragmented: try again, or reserve pages at boot "
                                "(hugepages= on the kernel command line)")
    except BaseException:
        restore(pools, done)
        raise


def restore(pools: SysfsPools, writes: Sequence[PoolWrite]) -> None:
    """Put pools back to their ``before`` values (best effort: log, never raise over the real error)."""
    for w in reversed(writes):
        try:
            pools.set(w.node, w.size_kib, w.before)
        except Exception as e:
            log.error("cannot restore pool %s to %d: %s", w.pool, w.before, e)


def shrink_pools(pools: SysfsPools, writes: Sequence[PoolWrite], vm: str) -> None:
    """Lower pools to their targets after a VM is gone. Pages still in use become surplus in the kernel
    and are freed when released, so the pool never drops below what is in use."""
    for w in writes:
        got = pools.set(w.node, w.size_kib, w.target)
        if got != w.target:
            log.warning("VM %r: pool %s is at %d, target %d (pages still in use are freed by the kernel when "
                        "their user exits)", vm, w.pool, got, w.target)
