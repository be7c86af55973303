"""Reading XML that a user less trusted than root wrote, and finding a domain's UUID without reading it.

The domain XML may come from a VM owner, so it is parsed with every lxml option spelled out (lxml before
5.0 expands entities by default): no DTD, no entities, no network, a size cap, and any DOCTYPE refused
outright. The stopped/release hooks must not depend on that parser at all (a refused release leaks pages):
:func:`scan_uuid` finds the UUID with a bounded byte scan.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from kvmhooks.errors import XMLInputError

if TYPE_CHECKING:
    from lxml import etree  # (imported where it parses: a stop, which only scans, never loads lxml)

# libvirt domain XML is a few KiB; even with hundreds of disks and NICs it stays far below 1 MiB. Four
# MiB leaves room for odd but honest definitions while bounding what a hostile one can cost us.
MAX_XML_BYTES = 4 * 1024 * 1024
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def safe_parse(data: bytes) -> etree._Element:
    """Parse untrusted XML: refuse DOCTYPEs and oversize input; never resolve entities or the network."""
    if len(data) > MAX_XML_BYTES:
        raise XMLInputError(f"domain XML is larger than {MAX_XML_BYTES} bytes; refused")
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise XMLInputError("domain XML contains a DOCTYPE or entity declaration; refused")
    from lxml import etree

    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, dtd_validation=False,
                             huge_tree=False, remove_pis=True, collect_ids=False)
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as e:
        raise XMLInputError(f"domain XML is not well-formed: {e}") from None
    if getattr(root.getroottree().docinfo, "doctype", ""):
        raise XMLInputError("domain XML contains a DOCTYPE; refused")
    if root.tag != "domain":
        raise XMLInputError(f"expected a <domain> document, got <{root.tag}>")
    return root


# scan_uuid reads only this much: libvirt writes <name> and <uuid> first, a few hundred bytes in.
SCAN_UUID_BYTES = 64 * 1024
_SCAN_UUID_RE = re.compile(rb"<uuid>[ \t\r\n]*([0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-"
                           rb"[0-9A-Fa-f]{12})[ \t\r\n]*</uuid>")


def scan_uuid(data: bytes) -> str | None:
    """The domain's UUID without parsing the XML, for the stopped/release hooks; None if there is none.

    Release must work for any VM that got through prepare, even when its XML would now be refused (another
    namespace's metadata with a DOCTYPE in a comment, a definition grown past MAX_XML_BYTES): a refused
    release leaks the VM's pages and CPUs until a reconcile. So this only looks at the first
    SCAN_UUID_BYTES for the first literal ``<uuid>`` tag. That tag is the real one: libvirt writes <name>
    and <uuid> before <metadata>, and user text before it (name, title, description) is escaped, so it
    cannot contain a literal tag; comments and CDATA sections are stepped over. Only the canonical
    8-4-4-4-12 hex form is accepted (returned lowercased); a malformed first tag is None, never a reason to
    look further.
    """
    head = data[:SCAN_UUID_BYTES]
    pos = 0
    while True:  # a linear walk: each step moves past a tag or a comment/CDATA section, never back
        start = head.find(b"<uuid>", pos)
        if start < 0:
            return None
        skip = head.find(b"<!", pos, start)
        if skip < 0:
            break
        # A comment or CDATA section before the tag may hold a literal "<uuid>" that is not the domain's.
        # libvirt never sends one, but a hand-made XML may, and hooks/qemu makes the same call: it hands any
        # XML with "<!" before its first <uuid> to Python rather than trust that tag.
        end = head.find(b"]]>" if head.startswith(b"<![CDATA[", skip) else b"-->", skip + 2)
        if end < 0:
            return None
        pos = end + 3
    m = _SCAN_UUID_RE.match(head, start)
    return None if m is None else m.group(1).decode("ascii").lower()
