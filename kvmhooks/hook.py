"""The libvirt qemu hook: argv + stdin → one operation → exit code.

libvirt runs ``/etc/libvirt/hooks/qemu NAME OP SUBOP EXTRA`` (or every script in ``qemu.d/``) with the full
domain XML on stdin. Rules this module keeps (libvirt's hooks.rst, and measured on this host):

- stdout stays empty: it is ignored for prepare/start/started and is the XML channel for migrate/restore
  (empty means "unchanged"): only ``migrate begin``/``restore begin`` of an annotated VM print there, the
  XML of :mod:`kvmhooks.migrate`'s filter;
- a non-zero exit of ``prepare`` aborts the start, and its stderr becomes ``virsh start``'s error, so a
  failure prints exactly one line there; the same for the filter, which refuses an incoming VM before any
  QEMU exists (it keeps running on its source);
- only those may fail: ``started`` and ``reconnect`` failing would stop a running VM (libvirtd kills
  it), stopped/release failures help nobody; those log, record the failure for ``kvmhooks status`` and
  exit 0 — whatever goes wrong, including a broken config or ledger;
- never call libvirt from here: ``started`` hands that work to kvmhooksd, or to a detached worker.

This is the only place (with the worker and the CLI) where exceptions become exit codes.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import BinaryIO, TextIO

from kvmhooks import NAMESPACE
from kvmhooks.config import Config, load_config
from kvmhooks.errors import Abandoned, HostError, KvmhooksError, XMLInputError
from kvmhooks.log import VMLog, setup_logging
from kvmhooks.xmlsafe import MAX_XML_BYTES, scan_uuid

log = logging.getLogger(__name__)

OPERATIONS = ("prepare", "start", "started", "stopped", "release", "migrate", "restore", "reconnect", "attach")
# The operations whose failure may reach libvirt: prepare aborts a start that has not begun, the filter
# (migrate/restore begin) an incoming migration or a restore before its QEMU exists. Any other failing hook
# would stop a running VM (started, reconnect) or help nobody (stopped, release): those log, record the
# failure where `kvmhooks status` shows it, and exit 0.
MAY_FAIL = ("prepare", "migrate", "restore")


def run(argv: Sequence[str], data: bytes, cfg: Config, out: BinaryIO | None = None, err: TextIO | None = None,
        repin: Callable[[Config], None] | None = None, forks: bool = True) -> None:
    """Dispatch one hook call; the filter's XML goes to ``out`` (stdout), prepare's warnings to ``err``
    (stderr). ``repin`` lets the shared VMs float over CPUs a stopping VM gave back (kvmhooksd does it over its
    own connection; by default a detached worker). ``forks``: a prepare with live work forks the worker that
    tunes the VM once started (the hook's own process; never kvmhooksd, which is threaded). Raises
    KvmhooksError for the caller to turn into an exit code."""
    from kvmhooks import operations

    op = argv[2] if len(argv) > 2 else ""
    if op in ("migrate", "restore"):
        if (argv[3] if len(argv) > 3 else "") != "begin" or NAMESPACE.encode() not in data:
            return  # (the shell sends only an annotated VM's "begin"): output nothing, the XML is unchanged
        from kvmhooks.migrate import incoming

        got = incoming(data, cfg)
        if got is not None and got.xml:
            stream = out if out is not None else sys.stdout.buffer
            stream.write(got.xml)
            stream.flush()
        return
    if op in ("stopped", "release"):
        # Never the full parser here: the live XML carries metadata the VM's owner may control (a comment
        # with '<!DOCTYPE', megabytes of it), and a release that refuses leaks the VM's pages.
        uuid = scan_uuid(data)
        if uuid is None:
            raise XMLInputError("no canonical <uuid> near the top of the domain XML; nothing released")
        rec = operations.release(uuid, cfg)
        if rec is not None and rec.cpus and operations.has_running_shared(cfg):
            # Dedicated CPUs came free: the shared VMs may float over them again (needs libvirt: detached).
            if repin is not None:
                repin(cfg)
            else:
                from kvmhooks.worker import spawn_detached

                spawn_detached(["repin", "-"], cfg)
        return
    if op not in ("prepare", "started", "reconnect"):
        return  # start, migrate, restore, attach, and anything newer libvirt invents: output nothing
    if NAMESPACE.encode() not in data:
        return  # not ours: never refused, whatever its size or content (the shell may hand over a long XML)
    from kvmhooks.domain import parse_domain  # (here: a stop needs neither it nor lxml)

    dom = parse_domain(data)  # refuses oversize or unsafe XML (xmlsafe.safe_parse)
    vlog = VMLog(dom.name, dom.uuid)
    if op == "reconnect":
        operations.adopt(dom, cfg)  # keeps a VM already in the ledger as it is, even if disabled meanwhile
    elif dom.active_tuning is None:
        if dom.annotated and op == "prepare":  # enabled="no": leave it alone, but give back what it holds
            operations.release(dom.uuid, cfg)
    elif op == "prepare":
        prepared = operations.prepare(dom, cfg)
        for w in prepared.warnings:
            print(f"kvmhooks: warning: {w}", file=err or sys.stderr)
        if forks and dom.active_tuning.live_work:
            # Its tuning waits for this run's started hook in a fork of this process, already warm: the shell's
            # started then starts no interpreter (it sees the tune/ marker locked), and the pins land sooner.
            from kvmhooks.worker import fork_waiting

            if fork_waiting(dom.uuid, prepared.record.token, cfg):
                vlog.info("prepared: its tuning waits for the start in a detached worker")
    elif not dom.active_tuning.live_work:  # started, huge pages only: all done at prepare, no worker needed
        operations.mark(dom.uuid, cfg, state="running")
    elif _left_to_forked_worker(cfg, dom.uuid):  # started: the worker its prepare forked tunes it
        vlog.info("started: tuned by the worker its prepare forked")
    else:  # started: the resident agent tunes it if it answers at once, else a detached worker does
        from kvmhooks.agent import tell

        try:
            operations.mark(dom.uuid, cfg, state="starting")
        finally:  # both have their own deadlines; the VM is tuned even if the mark failed
            if tell(cfg, dom.uuid):
                vlog.info("started: handed to kvmhooksd")
            else:
                from kvmhooks.worker import spawn_detached

                status = spawn_detached(["started", dom.uuid], cfg)
                if status != 0:  # it could not even be started: the VM runs untuned, and status says so
                    raise HostError(f"not tuned: the detached worker could not be started (status {status}); "
                                     "the VM runs without its pins, memtune and balloon", vm=dom.name)
                vlog.info("started: detached worker spawned")


def _left_to_forked_worker(cfg: Config, uuid: str) -> bool:
    """What hooks/qemu does at started, when it hands the call to Python: leave the up/ marker the worker
    forked at prepare waits for, then see whether that worker still holds the run's tune/ marker. In this
    order: a worker that gives up in between looks for the marker once more after unlocking, so the VM is
    tuned at worst twice, never not at all."""
    from kvmhooks.operations import ledger_for

    led = ledger_for(cfg)
    led.mark_up(uuid)
    return (led.up_dir / uuid).exists() and led.tuning_taken(uuid)


def main(argv: Sequence[str] | None = None, stdin: BinaryIO | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    op = argv[2] if len(argv) > 2 else ""

    def load() -> Config:
        cfg: Config | None = None
        try:
            cfg = load_config()
            return cfg
        finally:  # a broken config still logs (to syslog), never as a second line on stderr
            setup_logging(cfg.log if cfg else "syslog", cfg.log_level if cfg else "INFO", op)

    return call(argv, stdin or sys.stdin.buffer, load, sys.stderr)


def call(argv: Sequence[str], stdin: BinaryIO, load: Callable[[], Config], err: TextIO,
         repin: Callable[[Config], None] | None = None, forks: bool = True) -> int:
    """One hook call to its exit code, its one line of failure (and prepare's warnings) on ``err``: main's body
    with the config's loading and stderr as parameters, so kvmhooksd serves prepare and a held VM's stop
    through this very code (:mod:`kvmhooks.prepare_server`: its own logging, the config the hook names, stderr
    sent back, ``repin`` over its connection instead of a forked worker, and no fork: ``forks=False``)."""
    vm = argv[1] if len(argv) > 1 else "?"
    op = argv[2] if len(argv) > 2 else ""
    if op not in OPERATIONS:
        return 0
    cfg: Config | None = None
    data = b""
    try:
        data = stdin.read(MAX_XML_BYTES + 1)
        cfg = load()
        run(argv, data, cfg, err=err, repin=repin, forks=forks)
        return 0
    except Abandoned as e:  # (kvmhooksd, too late: nobody reads the answer, the hook's Python did the call)
        log.warning("%s: VM %r: not done by kvmhooksd: %s", op, vm, e)
        return 1 if op in MAY_FAIL else 0
    except KvmhooksError as e:
        msg = str(e) if e.vm is not None else f"VM {vm!r}: {e}"
        log.error("%s: %s", op, msg)
    except Exception as e:
        log.exception("%s: VM %r: unexpected error", op, vm)
        msg = f"VM {vm!r}: internal error ({type(e).__name__}: {e}); see the kvmhooks log"
    if op in MAY_FAIL:
        print(f"kvmhooks: {msg}", file=err)
        return 1
    uuid = scan_uuid(data)
    if uuid is not None and cfg is not None:  # (a broken config shows in every kvmhooks command anyway)
        from kvmhooks.operations import record_failure

        record_failure(cfg, uuid, op, msg)
    return 0
