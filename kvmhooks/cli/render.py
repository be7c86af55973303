"""One place that renders what the commands show: tables, JSON, the pool table, annotation summaries."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

from kvmhooks.config import Config, pool_key
from kvmhooks.domain import Domain
from kvmhooks.ledger import LedgerState
from kvmhooks.topology import HostTopology
from kvmhooks.units import format_cpuset, format_kib


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
    if t.host:
        parts.append("host isolation")
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


def isolation_view(cfg: Config, state: LedgerState) -> dict[str, Any]:
    """What host isolation holds now, from the ledger (no host write; reads /proc for irqbalance only)."""
    from kvmhooks.apply.isolation import irqbalance_running
    from kvmhooks.operations import host_settings

    iso = state.isolation
    holders = {}
    for uuid in sorted(state.domains.summary().isolating):
        rec = state.domains[uuid]
        holders[rec.name] = {"uuid": uuid, "cpus": format_cpuset(rec.cpus), **(rec.isolation or {})}
    return {"isolated": format_cpuset(iso.get("isolated", [])), "holders": holders,
            "backend": host_settings(cfg).backend if iso or holders else None,
            "changed": len(iso.get("wrote", {})), "unmovable": list(iso.get("unmovable", [])),
            "skipped_tasks": iso.get("skipped_tasks", 0), "pending": sorted(iso.get("pending", {})),
            "irqbalance": bool(holders) and irqbalance_running(cfg.proc_root)}


def isolation_lines(view: dict[str, Any]) -> list[str]:
    if not view["holders"] and not view["isolated"] and not view["pending"]:
        return []
    who = ", ".join(f"{name} ({h['cpus']})" for name, h in view["holders"].items()) or "no VM (being restored)"
    lines = [f"host isolation: CPUs {view['isolated'] or 'none'} isolated for {who}; tasks via {view['backend']}, "
             f"{view['changed']} host setting(s) changed"]
    if view["unmovable"]:
        lines.append(f"  left where the kernel keeps them: {', '.join(view['unmovable'])}")
    if view["skipped_tasks"]:
        lines.append(f"  {view['skipped_tasks']} task(s) could not be moved (per-CPU or exiting)")
    if view["pending"]:
        lines.append(f"  interrupted change in flight on {', '.join(view['pending'])}: the next operation or "
                     "kvmhooks reconcile finishes it")
    if view["irqbalance"]:
        lines.append(f"  irqbalance runs and may move IRQs back: IRQBALANCE_BANNED_CPULIST={view['isolated']} in "
                     "/etc/default/irqbalance")
    return lines


def cpu_map(topo: HostTopology, cfg: Config, state: LedgerState) -> str:
    """The host's CPUs as a compact picture: one bracket per core (its SMT threads), one letter per CPU.

    ``H`` housekeeping, ``.`` shared (kvmhooks may hand it out), ``-`` not kvmhooks', a lower-case letter
    dedicated to the VM listed below, upper case when the host is also kept off it (isolated).
    """
    from kvmhooks.plan.cpus import allowed_cpus

    allowed = allowed_cpus(topo, cfg)
    isolated = frozenset(state.isolation.get("isolated", []))
    owner: dict[int, str] = {}
    legend = []
    for n, uuid in enumerate(u for u in state.domains if state.domains[u].cpus):
        rec = state.domains[uuid]
        letter = "abcdefghijklmnopqrstuvwxyz"[n % 26]
        for c in rec.cpus:
            owner[c] = letter
        legend.append(f"{letter} = {rec.name} ({format_cpuset(rec.cpus)})")

    def glyph(c: int) -> str:
        if c in owner:
            return owner[c].upper() if c in isolated else owner[c]
        if c in cfg.cpu_housekeeping:
            return "H"
        return "." if c in allowed else "-"

    lines = []
    for nid, node in sorted(topo.nodes.items()):
        cores: dict[frozenset[int], None] = {}
        for c in sorted(node.cpus):
            if c in topo.cpus:
                cores.setdefault(frozenset(topo.cpus[c].siblings), None)
        lines.append(f"node{nid}: " + " ".join(
            "[" + " ".join(f"{c}{glyph(c)}" for c in sorted(core)) + "]" for core in cores))
    lines.append("H housekeeping, . shared, - not kvmhooks', a-z dedicated to a VM, A-Z dedicated and isolated")
    return "\n".join(lines + [f"  {x}" for x in legend])
