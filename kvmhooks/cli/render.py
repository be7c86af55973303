"""One place that renders what the commands show: tables, JSON, the pool table, annotation summaries."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

from kvmhooks.config import pool_key
from kvmhooks.domain import Domain
from kvmhooks.ledger import LedgerState
from kvmhooks.topology import HostTopology
from kvmhooks.units import format_kib


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def emit(args: argparse.Namespace, data: object, human: Callable[[], str]) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else human())


def summarize(dom: Domain) -> str:
    t = dom.tuning
    if t is None:
        return "-"
    parts = []
    if not t.enabled:
        return "disabled"
    if t.hugepages:
        parts.append(f"hugepages {format_kib(t.hugepages.size_kib) if t.hugepages.size_kib else 'auto'}")
    if t.cpu:
        parts.append(f"cpu {t.cpu.policy}")
    if t.vcpupins or t.emulatorpin or t.iothreadpins:
        parts.append("pins")
    if t.memtune:
        parts.append("memtune")
    if t.vcpus_live:
        parts.append(f"vcpus {t.vcpus_live}")
    if t.balloon:
        parts.append(f"balloon {t.balloon.policy}")
    return ", ".join(parts) or "(empty)"


def pool_rows(topo: HostTopology, state: LedgerState) -> list[dict[str, Any]]:
    rows = []
    for nid, node in sorted(topo.nodes.items()):
        for size, ps in sorted(node.pools.items()):
            key = pool_key(nid, size)
            reserved = state.reserved(key)
            if not (ps.nr or reserved):
                continue
            rec = state.pools.get(key)
            baseline = rec.baseline if rec else ps.nr - ps.surplus
            rows.append({"pool": key, "size": format_kib(size), "baseline": baseline, "reserved": reserved,
                         "nr_hugepages": ps.nr, "in_use": ps.in_use, "free": ps.free})
    return rows


def pool_table(pools: Sequence[dict[str, Any]]) -> str:
    """The POOL table that status and host both show."""
    return table(["POOL", "BASELINE", "RESERVED", "NR_HUGEPAGES", "IN USE", "FREE"],
                 [[p["pool"], p["baseline"], p["reserved"], p["nr_hugepages"], p["in_use"], p["free"]] for p in pools])
