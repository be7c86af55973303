"""The ``kvmhooks`` command: see and steer what the hook does.

Exit codes: 0 ok, 1 a finding or a failure, 2 usage. Human tables by default, ``--json`` for scripts.
Talks to libvirt through libvirt-python (never by running virsh), and reads the same ledger and topology
code the hook uses. This module (with hook and worker) is where exceptions become exit codes.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvmhooks import __version__, operations
from kvmhooks.apply.libvirt import connect, lookup
from kvmhooks.apply.libvirt import quiet_libvirt as quiet_libvirt  # balloond's, until it imports it from there
from kvmhooks.config import Config, load_config, parse_pool_key, pool_key
from kvmhooks.domain import Domain, parse_domain
from kvmhooks.errors import ConnectError, KvmhooksError
from kvmhooks.ledger import LedgerState
from kvmhooks.topology import HostTopology
from kvmhooks.units import format_cpuset, format_kib

log = logging.getLogger(__name__)
EXIT_OK, EXIT_FINDING, EXIT_USAGE = 0, 1, 2


# --- helpers ----------------------------------------------------------------------------------------------

def inactive_xml(dom: Any, secure: bool = False) -> str:
    import libvirt

    flags = libvirt.VIR_DOMAIN_XML_INACTIVE | (libvirt.VIR_DOMAIN_XML_SECURE if secure else 0)
    return str(dom.XMLDesc(flags))


def read_ledger(cfg: Config) -> LedgerState:
    try:
        return operations.ledger_for(cfg).read()
    except PermissionError:
        raise KvmhooksError(f"cannot read {cfg.ledger_path}: run as root") from None


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


# --- status -------------------------------------------------------------------------------------------------

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
                       applied=rec.applied.to_json(), error=rec.error, ledger_state=rec.state)
        if uuid in failures:
            row["failure"] = failures[uuid]
        if d.isActive():
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
                        "error": rec.error, "ledger_state": rec.state, "failure": failures.get(uuid)})
    pools = pool_rows(topo, state)

    def human() -> str:
        out = []
        if note:
            out.append(note)
        rows = []
        for v in vms:
            hp = ", ".join(f"node{node} {n}x{format_kib(size)}"
                           for (node, size), n in ((parse_pool_key(k), n) for k, n in v.get("hugepages", {}).items()))
            applied = v.get("applied") or {}
            pin_s = " ".join(f"{k}:{c}" for k, c in applied.get("pins", {}).items())
            if applied.get("emulator"):
                pin_s += f" emu:{applied['emulator']}"
            bal = v.get("balloon")
            bal_s = ""
            if bal:
                bal_s = f"{format_kib(bal['actual'])}/" + (format_kib(bal["target"]) if bal["target"] else "auto")
            other = []
            if "vcpus_live" in applied:
                other.append(f"vcpus {applied['vcpus_live']}")
            other += [f"{k} {format_kib(val)}" for k, val in applied.get("memtune", {}).items()]
            problems = "; ".join([*applied.get("problems", []), *([v["error"]] if v.get("error") else []),
                                  *([v["failure"]] if v.get("failure") else [])])
            rows.append([v["name"], v["state"], v["annotations"], hp or "-", v.get("cpus") or "-", pin_s or "-",
                         bal_s or "-", ", ".join(other) or "-", problems])
        out.append(table(["VM", "STATE", "ANNOTATIONS", "HUGEPAGES", "DEDICATED", "PINS (live)", "BALLOON",
                          "OTHER (live)", "PROBLEMS"], rows) if rows else "no annotated VMs")
        if pools:
            out.append("")
            out.append(table(["POOL", "BASELINE", "RESERVED", "NR_HUGEPAGES", "IN USE", "FREE"],
                             [[p["pool"], p["baseline"], p["reserved"], p["nr_hugepages"], p["in_use"], p["free"]]
                              for p in pools]))
        return "\n".join(out)

    notes = state.notes + [f"interrupted write in flight: {i.op} of pool {i.pool} ({i.before} → {i.target}) by "
                           f"process {i.pid}" for i in state.intents]

    def human_with_notes() -> str:
        return human() + ("\n\nledger notes:\n" + "\n".join(f"  {n}" for n in notes) if notes else "")

    emit(args, {"vms": vms, "pools": pools, "notes": notes}, human_with_notes)
    return EXIT_OK


# --- plan / validate --------------------------------------------------------------------------------------

def _xml_for(args: argparse.Namespace, cfg: Config) -> tuple[bytes, bool, bool]:
    """The domain XML to look at, whether the VM runs now, and whether it is persistent (a file: as if
    defined from it)."""
    if args.xml:
        try:
            return Path(args.xml).read_bytes(), False, True
        except OSError as e:
            raise KvmhooksError(f"cannot read {args.xml}: {e.strerror}") from None
    if not args.domain:
        raise KvmhooksError("name a domain or give --xml FILE")
    conn = connect(args.uri or cfg.libvirt_uri)
    d = lookup(conn, args.domain)
    return inactive_xml(d).encode(), bool(d.isActive()), bool(d.isPersistent())


def cmd_plan(args: argparse.Namespace, cfg: Config) -> int:
    from kvmhooks.dryrun import plan

    data, running, persistent = _xml_for(args, cfg)
    dom = parse_domain(data)
    if dom.active_tuning is None:
        emit(args, {"vm": dom.name, "actions": [], "note": "not annotated (or enabled='no'): kvmhooks does nothing"},
             lambda: f"VM {dom.name!r}: not annotated (or enabled='no'): kvmhooks does nothing")
        return EXIT_OK
    try:  # the real prepare and started code, against recorders and a copy of the ledger
        actions = [{"phase": a.phase, "action": a.action} for a in plan(dom, cfg, persistent)]
    except KvmhooksError as e:
        reason = str(e)
        emit(args, {"vm": dom.name, "refuse": reason}, lambda: f"would refuse the start: {reason}")
        return EXIT_FINDING
    note = " (running now: this is the plan for its next start)" if running else ""

    def human() -> str:
        return f"VM {dom.name!r}{note}:\n" + "\n".join(f"  {a['phase']:8} {a['action']}" for a in actions)

    emit(args, {"vm": dom.name, "running": running, "actions": actions}, human)
    return EXIT_OK


def validate_problems(data: bytes, cfg: Config) -> tuple[str, list[str]]:
    from kvmhooks.plan.cpus import plan_cpus
    from kvmhooks.plan.hugepages import plan_hugepages

    try:
        dom = parse_domain(data)
    except KvmhooksError as e:
        return "?", [str(e)]
    problems = []
    topo = operations.topology_for(cfg)
    hp = None
    try:
        hp = plan_hugepages(dom, topo, cfg)
    except KvmhooksError as e:
        problems.append(str(e))
    try:
        plan_cpus(dom, topo, cfg, LedgerState(), frozenset(hp.pages) if hp else frozenset())
    except KvmhooksError as e:
        problems.append(str(e))
    return dom.name, problems


def cmd_validate(args: argparse.Namespace, cfg: Config) -> int:
    from kvmhooks.doctor import check_balloon, domain_facts

    data, _, _ = _xml_for(args, cfg)
    name, problems = validate_problems(data, cfg)
    # The guest's own defences are advice, not refusals: the start would go ahead.
    warnings = [f"warning: {f.what} ({f.fix})" for f in check_balloon(domain_facts(name, data))
                if f.severity == "warning"] if not problems else []
    emit(args, {"vm": name, "ok": not problems, "problems": problems, "warnings": warnings},
         lambda: "\n".join(problems) if problems else "\n".join([f"VM {name!r}: annotation valid for this host",
                                                                   *warnings]))
    return EXIT_FINDING if problems else EXIT_OK


# --- host / doctor ----------------------------------------------------------------------------------------

def hook_state(cfg: Config) -> dict[str, Any]:
    """Where the hook is installed, and facts about libvirtd, without a verdict: libvirtd does not say which
    hooks it has loaded (it looks at start and on SIGHUP, which install.sh sends), so guessing from start
    times only misleads."""
    import time

    marker = "kvmhooks: libvirt qemu hook"
    found = [p for p in (cfg.hooks_dir / "qemu", cfg.hooks_dir / "qemu.d/kvmhooks")
             if p.is_file() and marker in p.read_text(errors="replace")]
    out: dict[str, Any] = {"installed": [str(p) for p in found],
                           "executable": all(os.access(p, os.X_OK) for p in found)}
    try:
        pid = int(Path("/run/libvirtd.pid").read_text().split()[0])
        if Path(f"/proc/{pid}/comm").read_text().strip() == "libvirtd":
            out["libvirtd_pid"] = pid
            out["libvirtd_since"] = time.strftime("%Y-%m-%d %H:%M:%S",
                                                  time.localtime(Path(f"/proc/{pid}").stat().st_mtime))
    except (OSError, ValueError, IndexError):
        pass
    return out


def cmd_host(args: argparse.Namespace, cfg: Config) -> int:
    from kvmhooks.plan.cpus import allowed_cpus

    topo = operations.topology_for(cfg)
    state = read_ledger(cfg)
    data: dict[str, Any] = {
        "nodes": {n: {"cpus": format_cpuset(node.cpus), "mem_total": node.mem_total_kib, "mem_free": node.mem_free_kib}
                  for n, node in sorted(topo.nodes.items())},
        "smt": topo.smt,
        "cores": sorted({format_cpuset(c.siblings) for c in topo.cpus.values()}, key=lambda s: int(s.split(",")[0]
                                                                                        .split("-")[0])),
        "allowed_cpus": format_cpuset(allowed_cpus(topo, cfg)),
        "dedicated_cpus": format_cpuset(state.dedicated_cpus()),
        "page_sizes": [format_kib(s) for s in sorted(topo.page_sizes)],
        "hugetlbfs": {format_kib(s): m for s, m in sorted(topo.hugetlbfs.items())},
        "pools": pool_rows(topo, state),
        "hook": hook_state(cfg),
    }

    def human() -> str:
        lines = [table(["NODE", "CPUS", "MEMORY", "FREE"],
                       [[n, v["cpus"], format_kib(v["mem_total"]), format_kib(v["mem_free"])]
                        for n, v in data["nodes"].items()]), "",
                 f"cores (SMT siblings): {' '.join(data['cores'])}  (SMT {'on' if topo.smt else 'off'})",
                 f"CPUs kvmhooks may hand out: {data['allowed_cpus'] or 'none'}; dedicated now: "
                 f"{data['dedicated_cpus'] or 'none'}",
                 f"huge page sizes: {', '.join(data['page_sizes'])}; hugetlbfs: "
                 + (", ".join(f"{k} on {v}" for k, v in data["hugetlbfs"].items()) or "NOT MOUNTED")]
        hook = data["hook"]
        where = ", ".join(hook["installed"]) if hook["installed"] else "NOT INSTALLED (run install.sh)"
        lines.append("hook: " + where + ("" if hook["executable"] else " (NOT EXECUTABLE: chmod +x it)")
                     + (f"; libvirtd pid {hook['libvirtd_pid']} running since {hook['libvirtd_since']} (it loads "
                        "hooks at start and on SIGHUP)" if "libvirtd_pid" in hook else "; libvirtd is not running"))
        if data["pools"]:
            lines += ["", table(["POOL", "BASELINE", "RESERVED", "NR_HUGEPAGES", "IN USE", "FREE"],
                                [[p["pool"], p["baseline"], p["reserved"], p["nr_hugepages"], p["in_use"], p["free"]]
                                 for p in data["pools"]])]
        return "\n".join(lines)

    emit(args, data, human)
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace, cfg: Config) -> int:
    import libvirt

    from kvmhooks.doctor import DomainFacts, check_domain, check_host, domain_facts, read_host_facts

    topo = operations.topology_for(cfg)
    facts = read_host_facts(topo, cfg)
    doms: list[DomainFacts] = []
    running_vcpus = 0
    try:
        conn = connect(args.uri or cfg.libvirt_uri)
    except ConnectError as e:
        conn = None
        print(f"kvmhooks: note: {e}; checking the host only", file=sys.stderr)
    if conn is not None:
        targets = [lookup(conn, n) for n in args.domains] if args.domains else conn.listAllDomains()
        for d in conn.listAllDomains():
            if d.isActive():
                running_vcpus += d.info()[3]
        for d in targets:
            try:  # domain_facts also sees what Domain does not carry (a VFIO device)
                doms.append(domain_facts(d.name(), d.XMLDesc(0).encode(), bool(d.isActive())))
            except libvirt.libvirtError as e:  # it vanished while we looked: that VM only
                log.info("doctor: skipping a domain: %s", e)
    findings = check_host(facts, doms)
    for d in doms:
        findings += check_domain(facts, d, cfg, running_vcpus)
    warnings = [f for f in findings if f.severity == "warning"]

    def human() -> str:
        if not findings:
            return "no findings: host and VMs follow the KVM tuning advice kvmhooks knows"
        return "\n\n".join(f"[{f.severity}] {f.subject}: {f.what}\n  why: {f.why}\n  fix: {f.fix}" for f in findings)

    emit(args, [f.__dict__ for f in findings], human)
    return EXIT_FINDING if warnings else EXIT_OK


# --- reconcile --------------------------------------------------------------------------------------------

def audit_log(cfg: Config, command: str) -> None:
    """Commands that change the host log what they do where the hook logs (the admin's audit trail)."""
    from kvmhooks.log import setup_logging

    setup_logging(cfg.log, cfg.log_level, command)


def cmd_reconcile(args: argparse.Namespace, cfg: Config) -> int:
    import libvirt

    from kvmhooks.errors import LedgerError

    if not args.dry_run:
        audit_log(cfg, "reconcile")
    try:  # the reservations as they are *before* libvirt is asked what runs (see operations.reconcile)
        snapshot = {u: r.token for u, r in operations.ledger_for(cfg).read().domains.items()}
    except LedgerError:
        snapshot = {}
    conn = connect(args.uri or cfg.libvirt_uri)
    running: dict[str, bytes] = {}
    for d in conn.listAllDomains():
        try:
            if d.isActive():
                running[d.UUIDString()] = d.XMLDesc(0).encode()
        except libvirt.libvirtError as e:  # it stopped or vanished while we looked: not running
            log.debug("reconcile: skipping a domain: %s", e)
    result = operations.reconcile(cfg, running, snapshot, dry_run=args.dry_run)
    actions = result.actions
    emit(args, {"dry_run": args.dry_run, "actions": actions,
                "set_aside": str(result.set_aside) if result.set_aside else None},
         lambda: ("\n".join(("would " if args.dry_run else "") + a for a in actions)
                  if actions else "ledger, running VMs and pools agree: nothing to do"))
    return EXIT_OK


# --- annotate ---------------------------------------------------------------------------------------------

def cmd_annotate(args: argparse.Namespace, cfg: Config) -> int:
    from kvmhooks.annotate import AnnotateRequest, edit_domain_xml, normalize

    if not (args.remove or args.hugepages or args.cpu or args.pin or args.balloon or args.qmp
            or args.free_page_reporting or args.virtio_mem):
        raise KvmhooksError("nothing to annotate: give --hugepages, --cpu, --pin, --balloon, --qmp, "
                            "--free-page-reporting, --virtio-mem or --remove")
    conn = connect(args.uri or cfg.libvirt_uri)
    d = lookup(conn, args.domain)
    uuid = d.UUIDString()
    # What annotate itself added, so --remove takes exactly that away and nothing of the admin's.
    record = cfg.lib_dir / "annotated" / f"{uuid}.json"
    added = json.loads(record.read_text()) if record.exists() else {}
    before = inactive_xml(d)
    req = AnnotateRequest(hugepages=args.hugepages, cpu=args.cpu, pin=args.pin, balloon=args.balloon, qmp=args.qmp,
                          free_page_reporting=args.free_page_reporting, virtio_mem=args.virtio_mem, remove=args.remove,
                          remove_backing=bool(added.get("backing")), remove_autodeflate=bool(added.get("autodeflate")))
    topo = operations.topology_for(cfg)
    edited = edit_domain_xml(inactive_xml(d, secure=True), req, topo)  # secure: keep passwords on redefine
    if not args.remove:
        parse_domain(edited.xml.encode())  # refuse to define what the hook would refuse at start
    if args.dry_run:
        after = edit_domain_xml(before, req, topo).xml
    else:
        audit_log(cfg, "annotate")
        conn.defineXML(edited.xml)
        log.info("VM %r (%s): annotate %s", args.domain, uuid, "--remove" if args.remove else
                 " ".join(f"--{k}={v}" for k, v in req.__dict__.items() if v and k not in ("remove", "remove_backing")))
        after = inactive_xml(lookup(conn, uuid))
        if args.remove:
            record.unlink(missing_ok=True)
        elif edited.added_backing or edited.added_autodeflate:
            ours = {**added, **({"backing": True} if edited.added_backing else {}),
                    **({"autodeflate": True} if edited.added_autodeflate else {})}
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps(ours))
    diff = "".join(difflib.unified_diff(normalize(before).splitlines(True), normalize(after).splitlines(True),
                                        f"{args.domain} (before)", f"{args.domain} (after)"))
    notes = list(edited.notes)
    emit(args, {"vm": args.domain, "dry_run": args.dry_run, "diff": diff, "notes": notes},
         lambda: (diff or "no change") + "".join(f"\nnote: {n}" for n in notes)
         + ("\n(dry run: nothing was changed)" if args.dry_run else ""))
    return EXIT_OK


# --- demo ---------------------------------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace, cfg: Config) -> int:
    from kvmhooks.demo import run_demo

    return run_demo(cfg, keep=args.keep, uri=args.uri or cfg.libvirt_uri)


def cmd_balloond(args: argparse.Namespace, cfg: Config) -> int:
    from dataclasses import replace

    from kvmhooks.balloond import run
    from kvmhooks.log import setup_logging

    setup_logging("stderr" if args.foreground_log else cfg.log, cfg.log_level, "balloond")
    if args.interval:
        cfg = replace(cfg, balloon_interval=args.interval)
    return run(cfg, once=args.once)


# --- main ---------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmhooks", description="See and steer kvmhooks, the libvirt hook that tunes "
                                "annotated KVM guests at start.",
                                epilog="exit codes: 0 ok, 1 a finding or a failure, 2 usage")
    p.add_argument("--version", action="version", version=f"kvmhooks {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--config", type=Path, help="host config (default /etc/kvmhooks/config.toml)")
    common.add_argument("--uri", help="libvirt URI (default from config: qemu:///system)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("status", parents=[common], help="what each annotated VM holds and has applied")
    s.add_argument("domains", nargs="*", metavar="DOM")
    s.set_defaults(func=cmd_status)
    for name, fn, hlp in (("plan", cmd_plan, "dry run: every action the hook would take for a VM"),
                          ("validate", cmd_validate, "check a VM's annotation against the contract and this host")):
        s = sub.add_parser(name, parents=[common], help=hlp)
        s.add_argument("domain", nargs="?", metavar="DOM")
        s.add_argument("--xml", metavar="FILE", help="a domain XML file instead of a defined domain")
        s.set_defaults(func=fn)
    s = sub.add_parser("annotate", parents=[common], help="write the annotation (and what it needs) into a domain")
    s.add_argument("domain", metavar="DOM")
    s.add_argument("--hugepages", metavar="SIZE", choices=["2M", "1G", "auto"], help="2M, 1G or auto")
    s.add_argument("--cpu", metavar="POLICY", choices=["dedicated", "shared"], help="dedicated or shared")
    s.add_argument("--pin", metavar="auto|LIST", help="auto (dedicated placement) or host CPUs for vCPU 0,1,...")
    s.add_argument("--balloon", metavar="TARGET", help="balloon target: a size (768M) or a percentage (75%%)")
    s.add_argument("--qmp", action="store_true", help="add the dedicated QMP socket kvmhooks drives the balloon over")
    s.add_argument("--free-page-reporting", action="store_true",
                   help="turn on <memballoon freePageReporting='on'> (not for hugepage-backed or VFIO VMs)")
    s.add_argument("--virtio-mem", metavar="SIZE", help="add a virtio-mem device of SIZE (and <maxMemory>, a guest "
                   "NUMA cell, an auto policy) that balloond resizes")
    s.add_argument("--dry-run", action="store_true", help="show the diff, change nothing")
    s.add_argument("--remove", action="store_true", help="remove the annotation and what annotate added")
    s.set_defaults(func=cmd_annotate)
    s = sub.add_parser("reconcile", parents=[common], help="repair the ledger and pools against running VMs")
    s.add_argument("--dry-run", action="store_true")
    s.set_defaults(func=cmd_reconcile)
    s = sub.add_parser("host", parents=[common], help="topology, pools, mounts and hook state")
    s.set_defaults(func=cmd_host)
    s = sub.add_parser("doctor", parents=[common], help="KVM tuning advice for this host and its VMs (reads only)")
    s.add_argument("domains", nargs="*", metavar="DOM")
    s.set_defaults(func=cmd_doctor)
    s = sub.add_parser("balloond", parents=[common], help="the automatic balloon service (runs in the foreground)")
    s.add_argument("--once", action="store_true", help="one cycle, then exit")
    s.add_argument("--interval", type=float, help="seconds between cycles (default from config: 10)")
    s.add_argument("--log-stderr", dest="foreground_log", action="store_true", help="log to stderr")
    s.set_defaults(func=cmd_balloond)
    s = sub.add_parser("demo", parents=[common], help="boot an annotated tiny TCG guest and show the tuning land")
    s.add_argument("--keep", action="store_true", help="keep the demo VM defined and running")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config)
        return int(args.func(args, cfg))
    except KvmhooksError as e:
        print(f"kvmhooks: {e}", file=sys.stderr)
        return EXIT_FINDING
    except PermissionError as e:
        print(f"kvmhooks: permission denied: {e.filename or e}: run as root", file=sys.stderr)
        return EXIT_FINDING
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
