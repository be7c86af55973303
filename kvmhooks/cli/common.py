"""What several commands need: the ledger as root reads it, a domain's XML, the audit log."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kvmhooks import operations
from kvmhooks.apply.libvirt import connect, lookup
from kvmhooks.config import Config
from kvmhooks.errors import UsageError
from kvmhooks.ledger import LedgerState


def inactive_xml(dom: Any, secure: bool = False) -> str:
    import libvirt

    flags = libvirt.VIR_DOMAIN_XML_INACTIVE | (libvirt.VIR_DOMAIN_XML_SECURE if secure else 0)
    return str(dom.XMLDesc(flags))


def read_ledger(cfg: Config) -> LedgerState:
    try:
        return operations.ledger_for(cfg).read()
    except PermissionError:
        raise UsageError(f"cannot read {cfg.ledger_path}: run as root") from None


def xml_for(args: argparse.Namespace, cfg: Config) -> tuple[bytes, bool, bool]:
    """The domain XML to look at, whether the VM runs now, and whether it is persistent (a file: as if
    defined from it)."""
    if args.xml:
        try:
            return Path(args.xml).read_bytes(), False, True
        except OSError as e:
            raise UsageError(f"cannot read {args.xml}: {e.strerror}") from None
    if not args.domain:
        raise UsageError("name a domain or give --xml FILE")
    conn = connect(args.uri or cfg.libvirt_uri)
    d = lookup(conn, args.domain)
    return inactive_xml(d).encode(), bool(d.isActive()), bool(d.isPersistent())


def audit_log(cfg: Config, command: str) -> None:
    """Commands that change the host log what they do where the hook logs (the admin's audit trail)."""
    from kvmhooks.log import setup_logging

    setup_logging(cfg.log, cfg.log_level, command)
