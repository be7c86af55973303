"""The contract table covers the parser and the parser covers the table (virtinst's coverage idea): every
element and attribute in kvmhooks.annotation.ELEMENTS has a sample here, and each sample changes what is
parsed. A new attribute without a sample, or one that is read but has no effect, fails this test."""

from __future__ import annotations

import pytest

from kvmhooks.annotation import ELEMENTS, Tuning
from kvmhooks.domain import parse_domain
from tests.fakehost import domain_xml

# (element, attribute) → (the element's other attributes, a value that must change the parsed Tuning)
SAMPLES: dict[tuple[str, str], tuple[dict[str, str], str]] = {
    ("hugepages", "size"): ({}, "1G"),
    ("hugepages", "nodes"): ({}, "0"),
    ("hugepages", "count"): ({}, "7"),
    ("hugepages", "required"): ({}, "no"),
    ("cpu", "policy"): ({"policy": "shared"}, "dedicated"),
    ("cpu", "threads"): ({"policy": "dedicated"}, "isolate"),
    ("cpu", "emulator"): ({"policy": "dedicated"}, "isolate"),
    ("vcpupin", "vcpu"): ({"vcpu": "0", "cpuset": "1"}, "1"),
    ("vcpupin", "cpuset"): ({"vcpu": "0", "cpuset": "1"}, "0"),
    ("emulatorpin", "cpuset"): ({"cpuset": "0"}, "1"),
    ("iothreadpin", "iothread"): ({"iothread": "1", "cpuset": "1"}, "2"),
    ("iothreadpin", "cpuset"): ({"iothread": "1", "cpuset": "1"}, "0"),
    ("cputune", "persist"): ({}, "yes"),
    ("vcpus", "live"): ({"live": "2"}, "1"),
    ("memtune", "hard_limit"): ({}, "1G"),
    ("memtune", "soft_limit"): ({}, "512M"),
    ("memtune", "swap_hard_limit"): ({}, "2G"),
    ("memtune", "min_guarantee"): ({}, "128M"),
    ("balloon", "target"): ({"target": "75%"}, "50%"),
    ("balloon", "min"): ({"target": "75%"}, "64M"),
    ("balloon", "stats-period"): ({"target": "75%"}, "5"),
    ("balloon", "policy"): ({"target": "75%"}, "auto"),
    ("balloon", "transport"): ({"target": "75%"}, "libvirt"),
    ("balloon", "reclaim"): ({"target": "75%"}, "idle"),
    ("balloon", "shares"): ({"target": "75%"}, "2000"),
    ("host", "isolate"): ({}, "no"),
    ("host", "irqs"): ({}, "no"),
    ("host", "governor"): ({}, "performance"),
}


def tuning(element: str, attrs: dict[str, str]) -> Tuning:
    body = " ".join(f'{k}="{v}"' for k, v in attrs.items())
    extra = '<kvm:cpu policy="dedicated"/>' if element == "host" else ""  # <kvm:host> needs dedicated CPUs
    xml = domain_xml(tuning=f"<kvm:{element} {body}/>{extra}", vcpus=2, extra="<iothreads>2</iothreads>",
                     backing="<hugepages><page size='1' unit='G'/></hugepages>" if attrs.get("size") == "1G"
                     else "<hugepages/>")
    t = parse_domain(xml).tuning
    assert t is not None
    return t


def test_every_attribute_of_the_table_has_a_sample() -> None:
    assert set(SAMPLES) == {(e, a) for e, attrs in ELEMENTS.items() for a in attrs}


@pytest.mark.parametrize(("element", "attribute"), sorted(SAMPLES))
def test_every_attribute_changes_what_is_parsed(element: str, attribute: str) -> None:
    base, value = SAMPLES[(element, attribute)]
    assert tuning(element, base) != tuning(element, {**base, attribute: value})
