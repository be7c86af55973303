"""`kvmhooks plan` (a dry run of the real code) and `kvmhooks validate`."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvmhooks import operations
from kvmhooks.cli.common import xml_for
from kvmhooks.cli.exit import EXIT_FINDING, EXIT_OK
from kvmhooks.cli.render import emit
from kvmhooks.config import Config
from kvmhooks.domain import parse_domain
from kvmhooks.errors import KvmhooksError, UsageError
from kvmhooks.ledger import LedgerState
from kvmhooks.units import format_cpuset


def cmd_plan(args: argparse.Namespace, cfg: Config) -> int:
    from kvmhooks.dryrun import plan

    if getattr(args, "incoming", None):
        return plan_incoming(args, cfg)
    data, running, persistent = xml_for(args, cfg)
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


def plan_incoming(args: argparse.Namespace, cfg: Config) -> int:
    """The migrate/restore filter as this (candidate) host would run it, holding nothing: pick a destination
    before ``virsh migrate`` rather than learn from a refused migration."""
    from kvmhooks.migrate import incoming

    try:
        data = Path(args.incoming).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {args.incoming}: {e.strerror}") from None
    try:
        got = incoming(data, cfg, dry_run=True)
    except KvmhooksError as e:  # the filter's refusal: the migration would fail, the VM stay on its source
        reason = str(e)
        emit(args, {"incoming": True, "refuse": reason}, lambda: f"would refuse the migration: {reason}")
        return EXIT_FINDING
    if got is None:
        name = parse_domain(data).name
        emit(args, {"vm": name, "incoming": True, "changes": [], "note": "not annotated (or enabled='no'): "
                    "kvmhooks lets it in unchanged"},
             lambda: f"VM {name!r}: not annotated (or enabled='no'): kvmhooks lets it in unchanged")
        return EXIT_OK
    p = got.placement
    pages = dict(sorted(p.hugepages.pools().items())) if p.hugepages is not None else {}
    cpus = sorted(p.cpus.dedicated) if p.cpus is not None else []
    name = p.dom.name

    def human() -> str:
        held = [f"{k} {n} pages" for k, n in pages.items()] + ([f"CPUs {format_cpuset(cpus)}"] if cpus else [])
        return (f"VM {name!r} would come in; the filter would claim {', '.join(held) or 'nothing'}\n"
                + ("\n".join(f"  {c}" for c in got.changes) if got.changes else "  placement unchanged"))

    emit(args, {"vm": name, "incoming": True, "claim": {"hugepages": pages, "cpus": cpus},
                "changes": list(got.changes), "relaxed_numatune": p.relaxed}, human)
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
    from kvmhooks.doctor import check_balloon, check_migration, domain_facts

    data, _, _ = xml_for(args, cfg)
    name, problems = validate_problems(data, cfg)
    facts = domain_facts(name, data)
    # The guest's own defences are advice, not refusals: the start would go ahead.
    warnings = [f"warning: {f.what} ({f.fix})" for f in check_balloon(facts)
                if f.severity == "warning"] if not problems else []
    notes = [f"note: {f.what} ({f.fix})" for f in check_migration(facts)]
    emit(args, {"vm": name, "ok": not problems, "problems": problems, "warnings": warnings, "notes": notes},
         lambda: "\n".join([*problems, *notes]) if problems else "\n".join([
             f"VM {name!r}: annotation valid for this host", *warnings, *notes]))
    return EXIT_FINDING if problems else EXIT_OK
