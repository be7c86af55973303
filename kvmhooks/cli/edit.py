"""`kvmhooks annotate`: write the annotation and what it needs into a definition, show the diff."""

from __future__ import annotations

import argparse
import difflib
import json
import logging
from typing import Any

from kvmhooks import operations
from kvmhooks.apply.libvirt import connect, lookup
from kvmhooks.cli.common import audit_log, inactive_xml
from kvmhooks.cli.exit import EXIT_OK
from kvmhooks.cli.render import emit
from kvmhooks.config import Config
from kvmhooks.domain import parse_domain
from kvmhooks.errors import ApplyError, UsageError

log = logging.getLogger(__name__)


def cmd_annotate(args: argparse.Namespace, cfg: Config) -> int:
    from kvmhooks.annotate import AnnotateRequest, edit_domain_xml, normalize

    if not (args.remove or args.hugepages or args.cpu or args.pin or args.balloon or args.qmp
            or args.free_page_reporting or args.virtio_mem):
        raise UsageError("nothing to annotate: give --hugepages, --cpu, --pin, --balloon, --qmp, "
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
        if args.live:
            _annotate_live(d, edited.xml, args.domain)
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


def _annotate_live(dom: Any, edited_xml: str, name: str) -> None:
    """Carry the annotation (only it: backing and devices need a restart) to the running domain, where
    kvmhooksd re-tunes from it (libvirt's METADATA_CHANGE event)."""
    import libvirt
    from lxml import etree

    from kvmhooks import NAMESPACE, PREFIX
    from kvmhooks.xmlsafe import safe_parse

    if not dom.isActive():
        raise UsageError(f"--live: {name} is not running (the definition was changed for its next start)")

    def plain(el: etree._Element) -> etree._Element:  # libvirt puts the element in our namespace itself
        out = etree.Element(etree.QName(el).localname, {str(k): str(v) for k, v in el.attrib.items()})
        out.extend(plain(c) for c in el if isinstance(c.tag, str))
        return out

    tuning = safe_parse(edited_xml.encode()).find(f"metadata/{{{NAMESPACE}}}tuning")
    try:
        if tuning is None:  # --remove: the running VM loses its annotation too
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, NAMESPACE,
                            libvirt.VIR_DOMAIN_AFFECT_LIVE)
        else:
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, etree.tostring(plain(tuning), encoding="unicode"),
                            PREFIX, NAMESPACE, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    except libvirt.libvirtError as e:
        raise ApplyError(f"--live: libvirt did not take the annotation for the running {name}", e) from None
    log.info("VM %r: annotation carried to the running domain", name)
