"""`kvmhooks status`: what each annotated VM holds and has applied, the pools, the ledger's notes."""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from kvmhooks import operations
from kvmhooks.apply.libvirt import connect, lookup
from kvmhooks.cli.common import read_ledger
from kvmhooks.cli.exit import EXIT_OK
from kvmhooks.cli.render import emit, isolation_lines, isolation_view, pool_rows, pool_table, summarize, table
from kvmhooks.config import Config, parse_pool_key
from kvmhooks.domain import parse_domain
from kvmhooks.errors import ConnectError, KvmhooksError
from kvmhooks.ledger import CLAIMED, DomainRecord, LedgerState
from kvmhooks.units import format_cpuset, format_kib

log = logging.getLogger(__name__)


def claim_view(rec: DomainRecord, now: float) -> dict[str, Any] | None:
    """A claim of a VM coming in (the migrate/restore filter): its deadline, and whether it passed (the next
    ledger session drops it)."""
    if rec.state != CLAIMED:
        return None
    return {"expires": rec.expires, "expires_in": max(0, round(rec.expires - now)), "expired": rec.expires <= now}


def claim_text(claim: dict[str, Any]) -> str:
    return ("claimed, expired (dropped at the next ledger write)" if claim["expired"] else
            f"claimed, expires in {claim['expires_in']} s")


def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    import libvirt

    from kvmhooks.errors import LedgerError, LockTimeout

    notes_first: list[str] = []
    try:
        state = read_ledger(cfg)
    except (LockTimeout, LedgerError) as e:  # status is how an admin finds out: show what can be shown
        state = LedgerState()
        notes_first.append(f"note: {e}; showing libvirt's view without reservations")
    topo = operations.topology_for(cfg)
    failures = operations.read_failures(cfg)
    stopping = operations.pending_stops(cfg, state)  # stopped; the detached worker is releasing them
    vms: list[dict[str, Any]] = []
    conn = None
    try:
        conn = connect(args.uri or cfg.libvirt_uri)
    except ConnectError as e:
        notes_first.append(f"note: {e}; showing the ledger only")
    note = "\n".join(notes_first)
    if conn is not None:
        doms = [lookup(conn, n) for n in args.domains] if args.domains else conn.listAllDomains()
    else:
        doms = []
    seen = set()
    now = time.time()

    def row_for(d: Any) -> dict[str, Any] | None:
        uuid = d.UUIDString()
        try:
            dom = parse_domain(d.XMLDesc(0).encode())
        except KvmhooksError as e:
            return {"name": d.name(), "uuid": uuid, "state": "?", "annotations": f"invalid: {e}"}
        rec = state.domains.get(uuid)
        if rec is None and not dom.annotated and not args.domains:
            return None
        seen.add(uuid)
        info = d.info()
        row: dict[str, Any] = {"name": d.name(), "uuid": uuid,
                               "state": {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_PAUSED: "paused",
                                         libvirt.VIR_DOMAIN_SHUTOFF: "shut off"}.get(info[0], str(info[0])),
                               "annotations": summarize(dom)}
        if rec is not None:
            row.update(hugepages=rec.hugepages, cpus=format_cpuset(rec.cpus) if rec.cpus else "",
                       shared=rec.shared, pins=rec.pins.to_json() if rec.pins else None,
                       applied=rec.applied.to_json(), error=rec.error, ledger_state=rec.state,
                       unplaced=rec.unplaced)
            claim = claim_view(rec, now)
            if claim is not None:
                row["claim"] = claim
            if uuid in stopping:
                row["release_pending"] = True
        if uuid in failures:
            row["failure"] = failures[uuid]
        if d.isActive():
            # Where its memory really is (numastat -p's data), huge pages and normal pages apart; nothing when
            # its QEMU cannot be identified as libvirt's (never another process's memory).
            row["memory_nodes"] = {str(n): v for n, v in sorted(operations.vm_memory(cfg, d.name(), uuid).items())}
            # memoryStats asks QEMU; info()[2] is libvirt's copy, updated by throttled BALLOON_CHANGE events.
            actual = int(d.memoryStats().get("actual", info[2]))
            row["memory_kib"] = {"max": info[1], "actual": actual}
            t = dom.active_tuning
            if t is not None and t.balloon is not None:
                row["balloon"] = {"target": t.balloon.target_kib, "min": t.balloon.min_kib, "actual": actual,
                                  "policy": t.balloon.policy}
        return row

    for d in doms:
        try:
            row = row_for(d)
        except (libvirt.libvirtError, KvmhooksError) as e:  # it vanished or broke while we looked: that VM only
            log.info("status: %s", e)
            row = {"name": "?", "uuid": "?", "state": "?", "annotations": f"could not be read: {e}"}
        if row is not None:
            vms.append(row)
    for uuid, rec in sorted(state.domains.items()):
        if uuid not in seen and not args.domains:
            vms.append({"name": rec.name, "uuid": uuid, "state": "unknown to libvirt" if conn else "?",
                        "annotations": "?", "hugepages": rec.hugepages, "cpus": format_cpuset(rec.cpus),
                        "error": rec.error, "ledger_state": rec.state, "failure": failures.get(uuid),
                        **({"claim": c} if (c := claim_view(rec, now)) is not None else {}),
                        **({"release_pending": True} if uuid in stopping else {})})
    pools = pool_rows(topo, state)

    def human() -> str:
        out = []
        if note:
            out.append(note)
        rows = []
        for v in vms:
            hp = ", ".join([f"node{node} {n}x{format_kib(size)}" for (node, size), n in
                            ((parse_pool_key(k), n) for k, n in v.get("hugepages", {}).items())]
                           + [f"{n}x{format_kib(int(k.removesuffix('kB')))} node unknown"
                              for k, n in v.get("unplaced", {}).items()])
            applied = v.get("applied") or {}
            pin_s = " ".join(f"{k}:{c}" for k, c in applied.get("pins", {}).items())
            if applied.get("emulator"):
                pin_s += f" emu:{applied['emulator']}"
            bal = v.get("balloon")
            bal_s = ""
            if bal:
                bal_s = f"{format_kib(bal['actual'])}/" + (format_kib(bal["target"]) if bal["target"] else "auto")
            other = [f"by {applied['tuned_by']}"] if applied.get("tuned_by") else []
            if "vcpus_live" in applied:
                other.append(f"vcpus {applied['vcpus_live']}")
            other += [f"{k} {format_kib(val)}" for k, val in applied.get("memtune", {}).items()]
            problems = "; ".join([*applied.get("problems", []), *([v["error"]] if v.get("error") else []),
                                  *([v["failure"]] if v.get("failure") else [])])
            mem_s = " ".join(f"n{n}:{m['huge'] / 1024:.0f}M huge+{m['normal'] / 1024:.0f}M"
                             for n, m in v.get("memory_nodes", {}).items() if m["huge"] or m["normal"])
            state_s = v["state"] + (f"; {claim_text(v['claim'])}" if v.get("claim") else "") + (
                "; being released" if v.get("release_pending") else "")
            rows.append([v["name"], state_s, v["annotations"], hp or "-", v.get("cpus") or "-", pin_s or "-",
                         bal_s or "-", mem_s or "-", ", ".join(other) or "-", problems])
        out.append(table(["VM", "STATE", "ANNOTATIONS", "HUGEPAGES", "DEDICATED", "PINS (live)", "BALLOON",
                          "MEMORY/NODE", "OTHER (live)", "PROBLEMS"], rows) if rows else "no annotated VMs")
        if pools:
            out.append("")
            out.append(pool_table(pools))
        return "\n".join(out)

    notes = state.notes + [f"interrupted write in flight: {i.op} of pool {i.pool} ({i.before} → {i.target}) by "
                           f"process {i.pid}" for i in state.intents]
    from kvmhooks.agent import running

    agent = running(cfg)
    agent_line = ("kvmhooksd: running (post-start and live tuning, drift, the automatic balloon)" if agent else
                  "kvmhooksd: not running (VMs are tuned at start by the hook's worker; no live re-tuning)")

    isolation = isolation_view(cfg, state)

    def human_with_notes() -> str:
        iso = isolation_lines(isolation)
        return (human() + "\n\n" + agent_line + ("\n" + "\n".join(iso) if iso else "")
                + ("\n\nledger notes:\n" + "\n".join(f"  {n}" for n in notes) if notes else ""))

    emit(args, {"vms": vms, "pools": pools, "notes": notes, "agent": agent, "isolation": isolation},
         human_with_notes)
    return EXIT_OK
