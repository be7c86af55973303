"""`kvmhooks reconcile`: the repair, through kvmhooks.operations.reconcile."""

from __future__ import annotations

import argparse
import logging

from kvmhooks import operations
from kvmhooks.apply.libvirt import connect
from kvmhooks.cli.common import audit_log
from kvmhooks.cli.exit import EXIT_OK
from kvmhooks.cli.render import emit
from kvmhooks.config import Config

log = logging.getLogger(__name__)


def cmd_reconcile(args: argparse.Namespace, cfg: Config) -> int:
    import libvirt

    from kvmhooks.errors import LedgerError
    from kvmhooks.ledger import salvage

    if not args.dry_run:
        audit_log(cfg, "reconcile")
    try:  # the reservations as they are *before* libvirt is asked what runs (see operations.reconcile)
        snapshot = {u: r.token for u, r in operations.ledger_for(cfg).read().domains.items()}
    except LedgerError:  # the records that still decode are kept by the repair: their tokens count too
        try:
            raw = cfg.ledger_path.read_bytes()  # replaced atomically: one whole version, without the lock
        except OSError:
            raw = b""
        snapshot = {u: r.token for u, r in salvage(raw)[0].domains.items()}
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
                "set_aside": str(result.set_aside) if result.set_aside else None, "lost": result.lost},
         lambda: ("\n".join(("would " if args.dry_run else "") + a for a in actions)
                  if actions else "ledger, running VMs and pools agree: nothing to do"))
    return EXIT_OK
