"""The migrate/restore filter (kvmhooks.migrate) and its claims, on fake hosts.

``data/migrate/two-cells-node1.xml`` is libvirt's own formatting (``virsh -c test:///default dumpxml
--migratable`` of a defined domain; libvirt 9.0's domain_conf formats it as the qemu driver does for the
hook): two guest NUMA cells bound to host node 1, the source's vCPU pins on CPUs 5 and 13, a vcpusched, and
huge pages whose ``<page nodeset>`` names guest cells.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from lxml import etree

from kvmhooks import operations
from kvmhooks.config import Config
from kvmhooks.domain import parse_domain
from kvmhooks.errors import CapacityError, HostError
from kvmhooks.ledger import CLAIMED
from kvmhooks.migrate import incoming
from tests.fakehost import FakeHost, FakeKernel, domain_xml
from tests.unit.test_hook import HOOK, hook_env

SOURCE = (Path(__file__).parent / "data/migrate/two-cells-node1.xml").read_bytes()
U = "5a0c6a2e-7d3b-4c1e-9f00-1234567890ab"
OTHER = "00000000-0000-4000-8000-000000000001"
HOST_SIDE = ("cputune/vcpupin", "cputune/emulatorpin", "cputune/iothreadpin", "numatune")


def guest_side(xml: bytes) -> bytes:
    """The XML without the host-side placement the filter may change, canonicalised (C14N, blanks dropped):
    what libvirt's ABI check compares must be byte-identical after the filter."""
    root = etree.fromstring(xml, etree.XMLParser(remove_blank_text=True))
    for path in HOST_SIDE:
        for el in root.findall(path):
            el.getparent().remove(el)
    ct = root.find("cputune")
    if ct is not None and len(ct) == 0:
        root.remove(ct)
    vcpu = root.find("vcpu")
    if vcpu is not None:
        vcpu.attrib.pop("cpuset", None)
    return etree.tostring(root, method="c14n")


def pins(xml: bytes) -> dict[str, str]:
    root = etree.fromstring(xml)
    return {f"{e.tag}{e.get('vcpu') or e.get('iothread') or ''}": e.get("cpuset") for e in root.iterfind("cputune/*")
            if e.tag.endswith("pin")}


def numatune(xml: bytes) -> list[tuple[str, str | None, str | None]]:
    root = etree.fromstring(xml)
    return [(e.tag, e.get("cellid"), e.get("nodeset")) for e in root.iterfind("numatune/*")]


def dedicated(cfg: Config, name: str, uuid: str, vcpus: int) -> None:
    """Another VM already running here with dedicated CPUs."""
    operations.prepare(parse_domain(domain_xml(name=name, uuid=uuid, tuning='<kvm:cpu policy="dedicated"/>',
                                               vcpus=vcpus, backing="")), cfg)


# --- the rewrite ------------------------------------------------------------------------------------------

def test_the_source_placement_is_replanned_here_and_only_host_side_elements_change(numa_host: FakeHost) -> None:
    cfg = numa_host.config()
    got = incoming(SOURCE, cfg)
    assert got is not None and got.xml
    assert guest_side(got.xml) == guest_side(SOURCE)
    rec = operations.ledger_for(cfg).read().domains[U]
    assert rec.state == CLAIMED and rec.expires > time.time()
    p = pins(got.xml)
    # the vCPUs on the CPUs the claim holds, on node 1 where the source's <numatune> keeps the memory
    assert {p["vcpupin0"], p["vcpupin1"]} | set(p["emulatorpin"].split(",")) <= {str(c) for c in rec.cpus}
    assert all(4 <= c <= 7 or 12 <= c <= 15 for c in rec.cpus)
    assert numatune(got.xml) == numatune(SOURCE)  # it fits here as it is: kept
    root = etree.fromstring(got.xml)
    assert root.find("cputune/vcpusched").get("vcpus") == "0"  # indexed by vCPU: stays
    assert root.find("memoryBacking/hugepages/page").get("nodeset") == "0-1"  # guest cells: stays
    assert rec.hugepages == {"node1/2048kB": 128}


def test_the_output_is_a_domain_libvirt_reads(numa_host: FakeHost, tmp_path: Path) -> None:
    got = incoming(SOURCE, numa_host.config())
    assert got is not None
    f = tmp_path / "out.xml"
    f.write_bytes(got.xml)
    r = subprocess.run(["virsh", "-q", "-c", "test:///default", f"define {f}; dumpxml mig1"], capture_output=True)
    assert r.returncode == 0, r.stderr
    back = r.stdout[r.stdout.index(b"<domain"):]
    assert pins(back) == pins(got.xml) and numatune(back) == numatune(got.xml)
    assert guest_side(back) == guest_side(SOURCE)


def test_cpus_another_vm_holds_here_are_never_given(numa_host: FakeHost) -> None:
    cfg = numa_host.config(cpu_housekeeping=frozenset())
    dedicated(cfg, "other", OTHER, 6)  # takes node 0 (its first choice): 6 of its 8 CPUs
    others = set(operations.ledger_for(cfg).read().domains[OTHER].cpus)
    got = incoming(SOURCE, cfg)
    assert got is not None
    held = set(operations.ledger_for(cfg).read().domains[U].cpus)
    assert not held & others
    assert {int(c) for v in pins(got.xml).values() for c in v.split(",")} <= held


def test_numatune_naming_a_node_this_host_lacks_is_rewritten_to_the_nodes_chosen(host: FakeHost) -> None:
    """The source had two nodes and bound both cells to node 1; this host has node 0 only."""
    cfg = host.config(cpu_housekeeping=frozenset())
    got = incoming(SOURCE, cfg)
    assert got is not None
    assert numatune(got.xml) == [("memory", None, "0"), ("memnode", "0", "0"), ("memnode", "1", "0")]
    assert guest_side(got.xml) == guest_side(SOURCE)
    assert operations.ledger_for(cfg).read().domains[U].hugepages == {"node0/2048kB": 128}
    assert any("numatune" in c for c in got.changes)


def test_numatune_on_a_full_node_moves_to_the_node_with_room(numa_host: FakeHost) -> None:
    numa_host.set_free(1, 1024 * 1024)  # node 1: nothing to spare beyond the host reserve
    cfg = numa_host.config()
    got = incoming(SOURCE, cfg)
    assert got is not None
    assert {n for _, _, n in numatune(got.xml)} == {"0"}
    rec = operations.ledger_for(cfg).read().domains[U]
    assert rec.hugepages == {"node0/2048kB": 128} and all(c < 4 or 8 <= c < 12 for c in rec.cpus)


def test_nothing_fits_refuses_and_holds_nothing(host: FakeHost) -> None:
    cfg = host.config(cpu_housekeeping=frozenset())
    dedicated(cfg, "other", OTHER, 2)  # both CPUs of this host
    before = operations.ledger_for(cfg).read().as_dict()
    with pytest.raises(CapacityError, match="VM 'mig1'"):
        incoming(SOURCE, cfg)
    assert operations.ledger_for(cfg).read().as_dict()["domains"] == before["domains"]
    assert host.pool(0) == 0


def test_an_unannotated_or_disabled_vm_is_not_planned(host: FakeHost) -> None:
    cfg = host.config()
    assert incoming(domain_xml(tuning=None), cfg) is None
    off = SOURCE.replace(b'<kvm:tuning xmlns', b'<kvm:tuning enabled="no" xmlns')
    assert incoming(off, cfg) is None
    assert not operations.ledger_for(cfg).read().domains


def test_a_vm_already_held_here_is_refused(host: FakeHost) -> None:
    """libvirt runs the filter before it checks that the domain exists here: a claim must never replace the
    reservation of a VM that runs on this host."""
    cfg = host.config(cpu_housekeeping=frozenset())
    dom = parse_domain(SOURCE.replace(b"<numatune>", b"<!--").replace(b"</numatune>", b"-->"))
    operations.prepare(dom, cfg)
    with pytest.raises(HostError, match="already holds a reservation"):
        incoming(SOURCE, cfg)
    assert operations.ledger_for(cfg).read().domains[U].state == "prepared"


def test_the_filter_run_twice_keeps_one_claim_and_the_same_pins(numa_host: FakeHost) -> None:
    cfg = numa_host.config()
    first = incoming(SOURCE, cfg)
    assert first is not None
    again = incoming(first.xml, cfg)  # a migration tried again with the rewritten XML
    assert again is not None and again.xml == b""  # unchanged: nothing to print
    assert len(operations.ledger_for(cfg).read().domains) == 1


# --- claims: counted, turned into the reservation, expired -------------------------------------------------

def test_prepare_turns_the_claim_into_the_reservation_with_the_claimed_cpus(numa_host: FakeHost) -> None:
    cfg = numa_host.config(cpu_housekeeping=frozenset())
    pools = FakeKernel(numa_host).install()
    node1 = "<numatune><memory mode='strict' nodeset='1'/></numatune>"
    operations.prepare(parse_domain(domain_xml(name="other", uuid=OTHER, vcpus=2, extra=node1,
                                               tuning='<kvm:hugepages size="2M"/><kvm:cpu policy="dedicated"/>')),
                       cfg, pools)
    got = incoming(SOURCE, cfg)
    assert got is not None
    xml = got.xml or SOURCE  # (here the planner chose the source's own CPUs, 5 and 13: nothing to rewrite)
    claimed = operations.ledger_for(cfg).read().domains[U]
    assert numa_host.pool(1) == 128  # the other VM's: a claim grows no pool
    # The other VM stops meanwhile, freeing CPUs the planner now prefers: the incoming QEMU was launched with
    # the claim's pins, and its reservation keeps exactly them.
    operations.release(OTHER, cfg, pools)
    st = operations.ledger_for(cfg).read()
    del st.domains[U]
    _, fresh = operations.check(parse_domain(xml), cfg, None, st)
    assert fresh is not None and sorted(fresh.dedicated) != claimed.cpus
    rec = operations.prepare(parse_domain(xml), cfg, pools).record
    assert rec.state == "prepared" and rec.cpus == claimed.cpus and rec.expires == 0
    assert numa_host.pool(1) == 128
    st = operations.ledger_for(cfg).read()
    assert st.reserved("node1/2048kB") == 128 and st.claimed("node1/2048kB") == 0  # no double count
    assert st.domains.summary().to_json() == st.domains.recount().to_json()
    operations.release(U, cfg, pools)
    assert numa_host.pool(1) == 0 and not operations.ledger_for(cfg).read().domains


def test_a_claim_is_not_given_to_another_vm(host: FakeHost) -> None:
    """Node 0 can spare 1 GiB beyond the host reserve: the claim's 256 MiB counts, so a VM asking for 900 MiB
    is refused while the claim is open, and fits once it expired."""
    host.set_free(0, 2 * 1024 * 1024)
    cfg = host.config(cpu_housekeeping=frozenset(), claim_timeout=1.0)
    assert incoming(SOURCE, cfg) is not None
    big = parse_domain(domain_xml(name="big", uuid=OTHER, memory_kib=900 * 1024))
    with pytest.raises(CapacityError, match="VM 'big'"):
        operations.prepare(big, cfg)
    with pytest.raises(CapacityError, match="VM 'cpus'"):  # its CPUs too: both are claimed
        dedicated(cfg, "cpus", "00000000-0000-4000-8000-000000000002", 1)
    time.sleep(1.1)
    operations.prepare(big, cfg)  # the session drops the expired claim first
    assert host.pool(0) == 450


def test_an_unused_claim_expires_at_the_next_ledger_transaction(host: FakeHost) -> None:
    cfg = host.config(cpu_housekeeping=frozenset(), claim_timeout=0.2)
    assert incoming(SOURCE, cfg) is not None
    assert U in operations.ledger_for(cfg).read().domains
    time.sleep(0.3)
    with operations.session(cfg) as s:
        assert any("expired claim of mig1" in r for r in s.repairs)
    st = operations.ledger_for(cfg).read()
    assert U not in st.domains and not st.claims() and not st.dedicated_cpus()
    assert any("expired claim" in n for n in st.notes)


def test_reconcile_leaves_an_open_claim_and_drops_an_expired_one(host: FakeHost) -> None:
    cfg = host.config(cpu_housekeeping=frozenset(), claim_timeout=60)
    assert incoming(SOURCE, cfg) is not None
    snap = {u: r.token for u, r in operations.ledger_for(cfg).read().domains.items()}
    out = operations.reconcile(cfg, {}, snap)
    assert U in operations.ledger_for(cfg).read().domains
    assert any("claimed" in a for a in out.actions)
    preview = operations.reconcile(cfg, {}, snap, dry_run=True, now=time.time() + 61)
    assert any("expired claim" in a for a in preview.actions) and U in operations.ledger_for(cfg).read().domains
    out = operations.reconcile(cfg, {}, snap, now=time.time() + 61)
    assert U not in operations.ledger_for(cfg).read().domains
    assert any("expired claim" in a for a in out.actions)


# --- through the hook: stdout is the XML channel ------------------------------------------------------------

def _config(host: FakeHost) -> Path:
    cfg = host.root / "config.toml"
    cfg.write_text(f'sysfs_root = "{host.sysfs}"\nproc_root = "{host.proc}"\nstate_dir = "{host.root}/run"\n'
                   f'log = "{host.root}/log"\nrun_root = "{host.root}/run-root"\ncgroup_root = "{host.root}/cgroup"\n'
                   '[cpu]\nhousekeeping = ""\n')
    return cfg


@pytest.mark.parametrize("op", ["migrate", "restore"])
def test_the_hook_prints_the_rewritten_xml_and_nothing_else(host: FakeHost, op: str) -> None:
    cfg = _config(host)
    r = subprocess.run([str(HOOK), "mig1", op, "begin", "-"], input=SOURCE, capture_output=True,
                       env=hook_env(cfg), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(b"<domain") and guest_side(r.stdout) == guest_side(SOURCE)
    assert numatune(r.stdout)[0] == ("memory", None, "0")


def test_the_hook_refuses_in_one_line_and_prints_no_xml(host: FakeHost) -> None:
    cfg = _config(host)
    big = SOURCE.replace(b"<vcpu placement='static'>2</vcpu>", b"<vcpu placement='static'>3</vcpu>")
    r = subprocess.run([str(HOOK), "mig1", "migrate", "begin", "-"], input=big, capture_output=True,
                       env=hook_env(cfg), timeout=60)
    assert (r.returncode, r.stdout) == (1, b"")
    err = r.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("kvmhooks: VM 'mig1':") and "CPUs" in err
