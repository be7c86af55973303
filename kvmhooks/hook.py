"""The libvirt qemu hook: argv + stdin → one operation → exit code.

libvirt runs ``/etc/libvirt/hooks/qemu NAME OP SUBOP EXTRA`` (or every script in ``qemu.d/``) with the full
domain XML on stdin. Rules this module keeps (libvirt's hooks.rst, and measured on this host):

- stdout stays empty: it is ignored for prepare/start/started and is the XML channel for migrate/restore
  (empty means "unchanged");
- a non-zero exit of ``prepare`` aborts the start, and its stderr becomes ``virsh start``'s error, so a
  failure prints exactly one line there;
- ``reconnect`` must never fail (libvirtd kills the VM), and stopped/release failures help nobody: those
  log and exit 0;
- never call libvirt from here: ``started`` hands that work to a detached worker.

This is the only place (with the worker and the CLI) where exceptions become exit codes.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import BinaryIO

from kvmhooks import NAMESPACE
from kvmhooks.config import CONFIG_ENV, Config, load_config
from kvmhooks.domain import MAX_XML_BYTES, parse_domain, read_uuid_and_name
from kvmhooks.errors import KvmhooksError, XMLInputError
from kvmhooks.log import VMLog, setup_logging

log = logging.getLogger(__name__)

OPERATIONS = ("prepare", "start", "started", "stopped", "release", "migrate", "restore", "reconnect", "attach")
# Operations whose failure must never reach libvirt.
_NEVER_FAIL = ("stopped", "release", "reconnect", "attach", "migrate", "restore")


def read_input(stdin: BinaryIO) -> bytes:
    data = stdin.read(MAX_XML_BYTES + 1)
    if len(data) > MAX_XML_BYTES:
        raise XMLInputError(f"domain XML is larger than {MAX_XML_BYTES} bytes; refused")
    return data


def run(argv: Sequence[str], data: bytes, cfg: Config) -> None:
    """Dispatch one hook call. Raises KvmhooksError for the caller to turn into an exit code."""
    from kvmhooks import operations

    op = argv[2] if len(argv) > 2 else ""
    if op in ("prepare", "started", "reconnect"):
        dom = parse_domain(data)
        vlog = VMLog(dom.name, dom.uuid)
        if dom.active_tuning is None:
            if dom.annotated:  # enabled="no": leave it alone, but give back anything it still holds
                operations.release(dom.uuid, cfg)
            return
        if op == "prepare":
            prepared = operations.prepare(dom, cfg)
            for w in prepared.warnings:
                print(f"kvmhooks: warning: {w}", file=sys.stderr)
        elif op == "started":
            if not dom.active_tuning.live_work:  # huge pages only: all done at prepare, no worker needed
                operations.mark(dom.uuid, cfg, state="running")
                return
            from kvmhooks.worker import spawn_detached

            operations.mark(dom.uuid, cfg, state="starting")
            status = spawn_detached(["started", dom.uuid], os.environ.get(CONFIG_ENV))
            vlog.info("started: detached worker spawned (status %d)", status)
        else:
            operations.adopt(dom, cfg)
    elif op in ("stopped", "release"):
        uuid, _ = read_uuid_and_name(data)
        rec = operations.release(uuid, cfg)
        if rec is not None and rec.cpus and operations.has_running_shared(cfg):
            # Dedicated CPUs came free: the shared VMs may float over them again (needs libvirt: detached).
            from kvmhooks.worker import spawn_detached

            spawn_detached(["repin", "-"], os.environ.get(CONFIG_ENV))
    # start, migrate, restore, attach, and anything newer libvirt invents: nothing to do, output nothing.


def main(argv: Sequence[str] | None = None, stdin: BinaryIO | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    stdin = stdin or sys.stdin.buffer
    vm = argv[1] if len(argv) > 1 else "?"
    op = argv[2] if len(argv) > 2 else ""
    if op not in OPERATIONS:
        return 0
    try:
        cfg = load_config()
        setup_logging(cfg.log, cfg.log_level, op)
        run(argv, read_input(stdin), cfg)
        return 0
    except KvmhooksError as e:
        msg = str(e) if str(e).startswith("VM ") else f"VM {vm!r}: {e}"
        log.error("%s: %s", op, msg)
        if op in _NEVER_FAIL:
            return 0
        print(f"kvmhooks: {msg}", file=sys.stderr)
        return 1
    except Exception as e:
        log.exception("%s: VM %r: unexpected error", op, vm)
        if op in _NEVER_FAIL:
            return 0
        print(f"kvmhooks: VM {vm!r}: internal error ({type(e).__name__}: {e}); see the kvmhooks log",
              file=sys.stderr)
        return 1


def wants(data: bytes) -> bool:
    """Cheap pre-check the installed hook does before importing us: is our namespace in the XML?"""
    return NAMESPACE.encode() in data
