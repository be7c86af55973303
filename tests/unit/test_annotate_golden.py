"""`kvmhooks annotate`'s XML edits against golden files: what goes in, what comes out, byte for byte after
normalising the layout. A change to the edits shows as a diff of these files in review.

    KVMHOOKS_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_annotate_golden.py   (rewrite them)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvmhooks.annotate import AnnotateRequest, edit_domain_xml, normalize
from kvmhooks.topology import read_topology
from tests.fakehost import FakeHost, domain_xml

GOLDEN = Path(__file__).parent / "golden" / "annotate"
REGEN = os.environ.get("KVMHOOKS_REGEN_GOLDEN") == "1"
PLAIN = domain_xml(name="web", uuid="11111111-2222-3333-4444-0000000000aa", tuning=None, backing="",
                   vcpus=2).decode()

CASES: dict[str, AnnotateRequest] = {
    "hugepages-2m": AnnotateRequest(hugepages="2M"),
    "dedicated-auto-pins": AnnotateRequest(cpu="dedicated", pin="auto"),
    "explicit-pins": AnnotateRequest(pin="1,0"),
    "balloon-qmp": AnnotateRequest(balloon="75%", qmp=True),
    "balloon-free-page-reporting": AnnotateRequest(balloon="512M", free_page_reporting=True),
    "virtio-mem": AnnotateRequest(virtio_mem="1G"),
    "everything": AnnotateRequest(hugepages="2M", cpu="dedicated", balloon="75%", qmp=True),
}


def check(name: str, xml: str) -> None:
    path = GOLDEN / f"{name}.xml"
    text = normalize(xml)
    if REGEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} is missing: run with KVMHOOKS_REGEN_GOLDEN=1 once"
    assert text == path.read_text(), f"annotate's output for {name} changed (KVMHOOKS_REGEN_GOLDEN=1 to accept)"


@pytest.mark.parametrize("name", sorted(CASES))
def test_annotate_output_matches_its_golden_file(host: FakeHost, name: str) -> None:
    topo = read_topology(host.sysfs, host.proc)
    check("input", PLAIN)
    edited = edit_domain_xml(PLAIN, CASES[name], topo)
    check(name, edited.xml)
    # and --remove takes exactly what this request added back out (virtio-mem stays: it is hardware now)
    removed = edit_domain_xml(edited.xml, AnnotateRequest(remove=True, remove_backing=edited.added_backing,
                                                          remove_autodeflate=edited.added_autodeflate), topo)
    if name != "virtio-mem" and name != "balloon-free-page-reporting":
        assert normalize(removed.xml) == normalize(PLAIN)
