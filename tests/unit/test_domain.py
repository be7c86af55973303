"""The v1 annotation contract and the safe parser (valid, invalid, hostile input)."""

from __future__ import annotations

import pytest

from kvmhooks.annotation import BalloonSpec
from kvmhooks.domain import parse_domain, qmp_socket_arg
from kvmhooks.errors import AnnotationError, DomainConfigError, XMLInputError
from kvmhooks.xmlsafe import MAX_XML_BYTES, scan_uuid
from tests.fakehost import domain_xml

FULL = """
<kvm:hugepages size="2M" nodes="auto" required="yes"/>
<kvm:cpu policy="dedicated" threads="prefer" emulator="share"/>
<kvm:vcpupin vcpu="0" cpuset="2"/>
<kvm:vcpupin vcpu="1" cpuset="3"/>
<kvm:emulatorpin cpuset="0-1"/>
<kvm:iothreadpin iothread="1" cpuset="1"/>
<kvm:cputune persist="no"/>
<kvm:vcpus live="2"/>
<kvm:memtune hard_limit="2G" soft_limit="1536M" swap_hard_limit="3G" min_guarantee="1G"/>
<kvm:balloon target="75%" min="512M" stats-period="2" policy="fixed" transport="auto"/>
"""


def test_the_readme_example_parses() -> None:
    dom = parse_domain(domain_xml(memory_kib=4 * 1024 * 1024, tuning=FULL, vcpus=4, extra="<iothreads>1</iothreads>"))
    t = dom.tuning
    assert t is not None and t.enabled and dom.annotated
    assert t.hugepages is not None and t.hugepages.size_kib == 2048 and t.hugepages.nodes is None
    assert t.cpu is not None and t.cpu.policy == "dedicated"
    assert [(p.target, set(p.cpus)) for p in t.vcpupins] == [(0, {2}), (1, {3})]
    assert t.emulatorpin == {0, 1}
    assert t.iothreadpins[0].target == 1
    assert t.vcpus_live == 2
    assert t.memtune is not None and t.memtune.hard_limit == 2 * 1024 * 1024 and t.memtune.min_guarantee == 1024**2
    assert t.balloon is not None and t.balloon.target_kib == 3 * 1024 * 1024 and t.balloon.min_kib == 512 * 1024


def test_unannotated_and_disabled() -> None:
    assert parse_domain(domain_xml(tuning=None)).tuning is None
    dom = parse_domain(domain_xml(tuning="<kvm:hugepages/>").replace(b"<kvm:tuning ", b'<kvm:tuning enabled="no" '))
    assert dom.annotated and dom.active_tuning is None


def test_defaults() -> None:
    dom = parse_domain(domain_xml(tuning="<kvm:hugepages/><kvm:balloon policy='auto'/>"))
    assert dom.tuning is not None and dom.tuning.hugepages is not None
    assert dom.tuning.hugepages.size_kib is None and dom.tuning.hugepages.required
    assert dom.tuning.balloon is not None and dom.tuning.balloon.min_kib == 262144 // 2
    assert dom.tuning.balloon.stats_period == 2 and dom.tuning.balloon.target_kib is None


def test_balloon_floor_follows_memtune_min_guarantee_in_any_order() -> None:
    dom = parse_domain(domain_xml(tuning="<kvm:balloon target='200M'/><kvm:memtune min_guarantee='150M'/>"))
    assert dom.tuning is not None and dom.tuning.balloon is not None
    assert dom.tuning.balloon.min_kib == 150 * 1024


def _balloon(attrs: str) -> BalloonSpec:
    tuning = parse_domain(domain_xml(tuning=f"<kvm:balloon policy='auto' {attrs}/>")).tuning
    assert tuning is not None and tuning.balloon is not None
    return tuning.balloon


def test_balloon_reclaim_and_shares() -> None:
    assert (_balloon("").reclaim, _balloon("").shares) == ("none", 1000)  # the defaults: v1 annotations unchanged
    b = _balloon("reclaim='idle' shares='5000'")
    assert (b.reclaim, b.shares) == ("idle", 5000)
    assert _balloon("shares='1'").shares == 1 and _balloon("shares='100000'").shares == 100000


@pytest.mark.parametrize(("attrs", "attribute", "value"), [
    ("reclaim='always'", "reclaim", "always"), ("reclaim='IDLE'", "reclaim", "IDLE"),
    ("shares='0'", "shares", "0"), ("shares='100001'", "shares", "100001"), ("shares='1e3'", "shares", "1e3"),
    ("shares='²'", "shares", "²"), ("shares=' 12 '", "shares", " 12 "), ("shares='-1'", "shares", "-1"),
    ("shares='+5'", "shares", "+5"), ("shares='0x10'", "shares", "0x10"),
    ("shares='" + "1" * 5000 + "'", "shares", "1" * 5000),
])
def test_bad_balloon_reclaim_and_shares(attrs: str, attribute: str, value: str) -> None:
    with pytest.raises(AnnotationError) as exc:
        parse_domain(domain_xml(name="web1", tuning=f"<kvm:balloon policy='auto' {attrs}/>"))
    assert (exc.value.vm, exc.value.element, exc.value.attribute, exc.value.value) == ("web1", "balloon", attribute,
                                                                                       value)


@pytest.mark.parametrize(("device", "autodeflate", "reporting"), [
    ("<memballoon model='virtio'/>", False, False),
    ("<memballoon model='virtio' autodeflate='on'/>", True, False),
    ("<memballoon model='virtio' freePageReporting='on'/>", False, True),
    ("<memballoon model='virtio' autodeflate='on' freePageReporting='on'><stats period='2'/></memballoon>", True, True),
    ("<memballoon model='virtio' autodeflate='off' freePageReporting='off'/>", False, False),
    ("<memballoon model='none' autodeflate='on'/>", False, False),
    ("", False, False),
])
def test_memballoon_autodeflate_and_free_page_reporting(device: str, autodeflate: bool, reporting: bool) -> None:
    dom = parse_domain(domain_xml(tuning=None, devices=device))
    assert (dom.balloon_autodeflate, dom.balloon_free_page_reporting) == (autodeflate, reporting)


def test_memballoon_switches_are_on_or_off() -> None:
    with pytest.raises(XMLInputError, match=r"^VM 'web1': domain XML: <memballoon autodeflate> 'yes'"):
        parse_domain(domain_xml(name="web1", devices="<memballoon model='virtio' autodeflate='yes'/>"))


@pytest.mark.parametrize(("first", "second"), [
    ('<kvm:balloon target="100M"/>', '<kvm:memtune min_guarantee="64M"/>'),  # floor 64M, not the 50% default
    ('<kvm:balloon target="75%" min="64M"/>', '<kvm:memtune hard_limit="1G" min_guarantee="100M"/>'),
    ('<kvm:vcpupin vcpu="1" cpuset="3"/>', '<kvm:vcpupin vcpu="0" cpuset="2"/>'),
    ('<kvm:vcpus live="1"/>', '<kvm:cpu policy="dedicated"/>'),
])
def test_element_order_never_matters(first: str, second: str) -> None:
    one = parse_domain(domain_xml(tuning=first + second)).tuning
    other = parse_domain(domain_xml(tuning=second + first)).tuning
    assert one is not None and one == other


def test_the_same_error_whatever_the_order() -> None:
    bad = ['<kvm:balloon target="100M"/>', '<kvm:memtune min_guarantee="200M"/>']
    messages = []
    for order in (bad, bad[::-1]):
        with pytest.raises(AnnotationError) as exc:
            parse_domain(domain_xml(name="web1", tuning="".join(order)))
        messages.append(str(exc.value))
    assert messages[0] == messages[1] and "below the floor" in messages[0]


@pytest.mark.parametrize(("tuning", "element", "attribute", "value"), [
    ('<kvm:hugepages size="3M"/>', "hugepages", "size", "3M"),
    ('<kvm:hugepages nodes="zero"/>', "hugepages", "nodes", "zero"),
    ('<kvm:hugepages required="maybe"/>', "hugepages", "required", "maybe"),
    ('<kvm:hugepages count="-1"/>', "hugepages", "count", "-1"),
    ('<kvm:hugepages colour="red"/>', "hugepages", "colour", "red"),
    ('<kvm:cpu policy="exclusive"/>', "cpu", "policy", "exclusive"),
    ('<kvm:cpu policy="dedicated" threads="share"/>', "cpu", "threads", "share"),
    ('<kvm:vcpupin vcpu="2" cpuset="1"/>', "vcpupin", "vcpu", "2"),
    ('<kvm:vcpupin vcpu="0" cpuset="1-x"/>', "vcpupin", "cpuset", "1-x"),
    ('<kvm:vcpupin vcpu="0" cpuset="1"/><kvm:vcpupin vcpu="0" cpuset="2"/>', "vcpupin", "vcpu", "0"),
    ('<kvm:emulatorpin cpuset=""/>', "emulatorpin", "cpuset", ""),
    ('<kvm:iothreadpin iothread="1" cpuset="0"/>', "iothreadpin", "iothread", "1"),
    ('<kvm:vcpus live="3"/>', "vcpus", "live", "3"),
    ('<kvm:memtune hard_limit="2GB"/>', "memtune", "hard_limit", "2GB"),
    ('<kvm:memtune hard_limit="1G" soft_limit="2G"/>', "memtune", "soft_limit", "2G"),
    ('<kvm:balloon target="512M"/>', "balloon", "target", "512M"),
    ('<kvm:balloon target="150%"/>', "balloon", "target", "150%"),
    ('<kvm:balloon target="100M" min="200M"/>', "balloon", "target", "100M"),
    ('<kvm:balloon/>', "balloon", "target", None),
    ('<kvm:balloon target="200M" transport="qmp"/>', "balloon", "transport", "qmp"),
    ('<kvm:balloon target="200M" stats-period="x"/>', "balloon", "stats-period", "x"),
    ('<kvm:cputune persist="sometimes"/>', "cputune", "persist", "sometimes"),
])
def test_bad_values_name_vm_element_attribute_value(tuning: str, element: str, attribute: str,
                                                     value: str | None) -> None:
    with pytest.raises(AnnotationError) as exc:
        parse_domain(domain_xml(name="web1", tuning=tuning))
    e = exc.value
    assert (e.vm, e.element, e.attribute, e.value) == ("web1", element, attribute, value)
    msg = str(e)
    assert "\n" not in msg and msg.startswith("VM 'web1': <kvm:" + element)
    if value:
        assert repr(value) in msg


def test_unknown_and_repeated_elements() -> None:
    with pytest.raises(AnnotationError, match="unknown element"):
        parse_domain(domain_xml(tuning="<kvm:hugepage/>"))
    with pytest.raises(AnnotationError, match="more than once"):
        parse_domain(domain_xml(tuning="<kvm:hugepages/><kvm:hugepages/>"))
    with pytest.raises(AnnotationError, match="outside the kvmhooks namespace"):
        parse_domain(domain_xml(tuning="<hugepages/>"))


def test_balloon_needs_a_balloon_device() -> None:
    with pytest.raises(DomainConfigError, match="memballoon"):
        parse_domain(domain_xml(tuning="<kvm:balloon target='200M'/>", devices=""))


def test_qmp_socket_is_recognised_only_at_our_path() -> None:
    uuid = "11111111-2222-3333-4444-555555555555"
    ok = (f"<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><qemu:arg value='-qmp'/>"
          f"<qemu:arg value='{qmp_socket_arg(uuid)}'/></qemu:commandline>")
    xml = domain_xml(tuning="<kvm:balloon target='200M' transport='qmp'/>").replace(b"</domain>",
                                                                                  ok.encode() + b"</domain>")
    assert parse_domain(xml).qmp_socket == f"/var/lib/libvirt/qemu/kvmhooks/{uuid}.qmp"
    other = xml.replace(b"kvmhooks/" + uuid.encode() + b".qmp", b"../../../etc/x.qmp")
    with pytest.raises(AnnotationError):
        parse_domain(other)


def test_numa_cells_and_numatune() -> None:
    extra = ("<cpu><numa><cell id='0' cpus='0' memory='128' unit='MiB'/><cell id='1' cpus='1' memory='128' "
             "unit='MiB'/></numa></cpu><numatune><memory mode='strict' nodeset='0-1'/>"
             "<memnode cellid='1' mode='strict' nodeset='1'/></numatune>")
    dom = parse_domain(domain_xml(extra=extra))
    assert [c.memory_kib for c in dom.cells] == [131072, 131072]
    assert dom.numatune_nodes == {0, 1} and dom.memnodes == {1: {1}}


# --- hostile input ---------------------------------------------------------------------------------------

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE domain [<!ENTITY xxe SYSTEM "file:///etc/shadow">]>
<domain><name>&xxe;</name><uuid>11111111-2222-3333-4444-555555555555</uuid><memory>1</memory></domain>"""

LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<domain><name>&lol3;</name></domain>"""


@pytest.mark.parametrize("data", [XXE, LAUGHS], ids=["xxe", "billion-laughs"])
def test_doctype_and_entities_are_refused(data: bytes) -> None:
    with pytest.raises(XMLInputError, match="DOCTYPE|entity"):
        parse_domain(data)


def test_external_xinclude_and_network_are_not_followed() -> None:
    data = domain_xml(name="x").replace(
        b"<name>x</name>", b"<name xmlns:xi='http://www.w3.org/2001/XInclude'>x<xi:include href='/etc/passwd'/></name>")
    assert parse_domain(data).name == "x"  # include element ignored, never resolved


def test_oversize_and_malformed() -> None:
    with pytest.raises(XMLInputError, match="larger"):
        parse_domain(b"<domain>" + b" " * MAX_XML_BYTES + b"</domain>")
    with pytest.raises(XMLInputError, match="well-formed"):
        parse_domain(b"<domain><name>x</domain>")
    with pytest.raises(XMLInputError, match="<uuid>"):
        parse_domain(domain_xml(uuid="../../etc/passwd"))
    with pytest.raises(XMLInputError, match="expected a <domain>"):
        parse_domain(b"<network/>")


def test_wrong_namespace_is_not_ours() -> None:
    data = domain_xml(tuning="<kvm:hugepages/>").replace(b"http://kvmhooks.org/xmlns/domain/1.0",
                                                        b"http://kvmhooks.org/xmlns/domain/2.0")
    assert parse_domain(data).tuning is None


def test_every_annotation_in_the_readme_parses() -> None:
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = re.findall(r"```xml\n(<metadata>.*?</metadata>)\n```", readme, re.S)
    assert len(blocks) >= 2
    for block in blocks:
        xml = (f"<domain type='kvm'><name>doc</name><uuid>11111111-2222-3333-4444-555555555555</uuid>{block}"
               "<memory unit='GiB'>4</memory><memoryBacking><hugepages/></memoryBacking><vcpu>4</vcpu>"
               "<devices><memballoon model='virtio'/></devices></domain>")
        assert parse_domain(xml.encode()).active_tuning is not None


# --- numbers: ASCII digits only, bounded lengths ---------------------------------------------------------

HOSTILE_NUMBERS = ["²", "٣", "1" * 5000, "+5", "-1", "0x10", "１"]


def _integer_attrs(v: str) -> list[tuple[str, str, str]]:
    """(annotation, element, attribute) for every plain-integer attribute, with value v."""
    return [
        (f'<kvm:vcpupin vcpu="{v}" cpuset="1"/>', "vcpupin", "vcpu"),
        (f'<kvm:iothreadpin iothread="{v}" cpuset="1"/>', "iothreadpin", "iothread"),
        (f'<kvm:hugepages count="{v}"/>', "hugepages", "count"),
        (f'<kvm:vcpus live="{v}"/>', "vcpus", "live"),
        (f'<kvm:balloon target="200M" stats-period="{v}"/>', "balloon", "stats-period"),
        (f'<kvm:balloon target="200M" shares="{v}"/>', "balloon", "shares"),
    ]


def _other_numeric_attrs(v: str) -> list[tuple[str, str, str]]:
    return [
        (f'<kvm:memtune hard_limit="{v}"/>', "memtune", "hard_limit"),
        (f'<kvm:memtune soft_limit="{v}M"/>', "memtune", "soft_limit"),
        (f'<kvm:balloon target="{v}%"/>', "balloon", "target"),
        (f'<kvm:balloon target="200M" min="{v}"/>', "balloon", "min"),
        (f'<kvm:hugepages nodes="{v}"/>', "hugepages", "nodes"),
        (f'<kvm:vcpupin vcpu="0" cpuset="{v}"/>', "vcpupin", "cpuset"),
        (f'<kvm:emulatorpin cpuset="0-{v}"/>', "emulatorpin", "cpuset"),
    ]


_NUMERIC_CASES = [(*case, v) for v in [*HOSTILE_NUMBERS, " 12 "] for case in _integer_attrs(v)] + \
    [(*case, v) for v in HOSTILE_NUMBERS for case in _other_numeric_attrs(v)]


@pytest.mark.parametrize(("tuning", "element", "attribute", "value"), _NUMERIC_CASES)
def test_numbers_in_the_annotation_are_ascii_digits_only(tuning: str, element: str, attribute: str,
                                                         value: str) -> None:
    with pytest.raises(AnnotationError) as exc:
        parse_domain(domain_xml(name="web1", tuning=tuning, extra="<iothreads>2</iothreads>"))
    e = exc.value
    assert (e.vm, e.element, e.attribute) == ("web1", element, attribute)
    assert e.value is not None and value in e.value
    assert "\n" not in str(e) and str(e).startswith(f"VM 'web1': <kvm:{element} {attribute}=...>")


def _with(xml: bytes, old: str, new: str) -> bytes:
    assert old.encode() in xml
    return xml.replace(old.encode(), new.encode(), 1)


_DOMAIN_FIELDS: list[tuple[str, str, str]] = [
    # (replace this, with this ({} = the value), field the message names)
    ("<vcpu placement='static'>2</vcpu>", "<vcpu placement='static'>{}</vcpu>", "<vcpu>"),
    ("<vcpu placement='static'>2</vcpu>", "<vcpu placement='static' current='{}'>2</vcpu>", "<vcpu current>"),
    ("<memory unit='KiB'>262144</memory>", "<memory unit='KiB'>{}</memory>", "<memory>"),
    ("<os>", "<iothreads>{}</iothreads><os>", "<iothreads>"),
    ("<os>", "<cpu><numa><cell id='{}' cpus='0' memory='1' unit='GiB'/></numa></cpu><os>", "<numa><cell"),
    ("<os>", "<cpu><numa><cell id='0' cpus='0' memory='{}' unit='GiB'/></numa></cpu><os>", "<numa><cell"),
    ("<os>", "<cpu><numa><cell id='0' cpus='{}' memory='1' unit='GiB'/></numa></cpu><os>", "<numa><cell"),
    ("<os>", "<numatune><memnode cellid='{}' mode='strict' nodeset='0'/></numatune><os>", "<numatune>"),
    ("<os>", "<numatune><memory mode='strict' nodeset='{}'/></numatune><os>", "<numatune>"),
    ("<hugepages/>", "<hugepages><page size='{}' unit='KiB'/></hugepages>", "<page size>"),
    ("<os>", "<cputune><vcpupin vcpu='{}' cpuset='0'/></cputune><os>", "<cputune>"),
    ("<os>", "<cputune><emulatorpin cpuset='{}'/></cputune><os>", "<cputune>"),
]


@pytest.mark.parametrize("value", HOSTILE_NUMBERS)
@pytest.mark.parametrize(("old", "new", "field"), _DOMAIN_FIELDS)
def test_numbers_in_the_domain_xml_are_ascii_digits_only(old: str, new: str, field: str, value: str) -> None:
    xml = _with(domain_xml(name="web1"), old, new.format(value))
    with pytest.raises(XMLInputError) as exc:
        parse_domain(xml)
    msg = str(exc.value)
    assert msg.startswith("VM 'web1': ") and field in msg and "\n" not in msg and len(msg) < 300, msg


def test_domain_integers_are_bounded() -> None:
    """A <vcpu> of 10^14 would make the CPU planner loop over every vCPU number: refused at parse."""
    with pytest.raises(XMLInputError, match="<vcpu>"):
        parse_domain(_with(domain_xml(name="web1"), ">2</vcpu>", ">99999999999999</vcpu>"))
    assert parse_domain(_with(domain_xml(), ">2</vcpu>", ">\n  2\n</vcpu>")).max_vcpus == 2


# --- scan_uuid: the stopped/release hooks' bounded, tolerant UUID scan ---------------------------------

U = "11111111-2222-3333-4444-555555555555"


def test_scan_uuid_reads_libvirts_uuid() -> None:
    assert scan_uuid(domain_xml(uuid=U)) == U
    assert scan_uuid(domain_xml(uuid=U.upper().replace("1", "A"))) == U.replace("1", "a")
    assert scan_uuid(f"<domain><uuid>\n  {U}\n</uuid></domain>".encode()) == U  # pretty-printed


def test_scan_uuid_never_parses_the_rest() -> None:
    """Another namespace's metadata may hold what safe_parse refuses (a DOCTYPE in a comment or CDATA):
    release must still find the VM, or it would leak its pages and CPUs."""
    other = ("<other:x xmlns:other='http://example.org/x'><!-- <!DOCTYPE x [<!ENTITY a 'b'>]> -->"
             "<![CDATA[<!DOCTYPE y><uuid>99999999-2222-3333-4444-555555555555</uuid>]]></other:x>")
    xml = domain_xml(uuid=U, tuning=None).replace(b"<memory", f"<metadata>{other}</metadata><memory".encode())
    with pytest.raises(XMLInputError):
        parse_domain(xml)
    assert scan_uuid(xml) == U


def test_scan_uuid_of_oversize_xml() -> None:
    xml = domain_xml(uuid=U).replace(b"</domain>", b"<!--" + b"x" * (MAX_XML_BYTES + 1) + b"--></domain>")
    assert len(xml) > MAX_XML_BYTES
    assert scan_uuid(xml) == U


def test_scan_uuid_looks_at_the_first_64_kib_only() -> None:
    late = b"<domain>" + b" " * (64 * 1024) + f"<uuid>{U}</uuid></domain>".encode()
    assert scan_uuid(late) is None
    split = b"<domain>" + b" " * (64 * 1024 - 20) + f"<uuid>{U}</uuid></domain>".encode()  # tag cut at 64 KiB
    assert scan_uuid(split) is None


@pytest.mark.parametrize("data", [
    b"", b"garbage", b"\xff\xfe\x00<uuid>", b"<domain><name>x</name></domain>",
    f"<domain><uuid>{U}".encode(),  # no closing tag
    b"<domain><uuid>../../etc/passwd</uuid></domain>",
    f"<domain><uuid>{U}0</uuid></domain>".encode(),
    f"<domain><uuid>{U.replace('-', '')}</uuid></domain>".encode(),  # libvirt accepts it; it never writes it
    f"<domain><uuid>{U[:-1]}g</uuid></domain>".encode(),
    f"<domain><uuid>{U.replace('1', '١')}</uuid></domain>".encode(),  # Arabic-Indic digits
    b"<domain><uuid>" + b"a" * 10_000_000 + b"</uuid></domain>",
    # The first literal <uuid> tag is the one: a bad first one is not skipped for a later one.
    f"<domain><uuid>nope</uuid><uuid>{U}</uuid></domain>".encode(),
], ids=lambda d: repr(d[:40]))
def test_scan_uuid_refuses_anything_else(data: bytes) -> None:
    assert scan_uuid(data) is None
