"""Migration and restore end to end (issue 18): two libvirtd "hosts" A and B on this machine
(tests/e2e/twohosts.py), each with its own kvmhooks hook, ledger, config and log, and a disk-less TCG guest
moved between them with ``virsh migrate`` / ``save`` / ``restore``. The tests check what a user would: exit
codes and errors of virsh, ``virsh vcpupin``/``emulatorpin`` on the host the VM runs on, and each host's
ledger.

The two hosts share one kernel. CPU pins are real (both hosts hand out CPUs 0-1 of this machine, each keeping
its own books). Huge pages are not per host in the kernel, so kvmhooks on each host sees a fake sysfs tree
mirroring this machine (its CPUs, node 0, a 2M pool that starts empty): what kvmhooks reserves for a VM is
written to that host's fake pool, which is what the tests read as the host's accounting; the REAL 2M pool is
sized by the huge-page test itself so QEMU on both hosts finds its pages (twice the guest while a migration
copies it) and put back afterwards.

The migrate/restore filter (kvmhooks/migrate.py) plans an incoming VM on the destination at ``migrate begin``
/ ``restore begin``, records a claim that the VM's prepare turns into its reservation, and rewrites the XML's
``<cputune>`` pins; it refuses with one line ``kvmhooks: VM 'NAME': ...`` when the VM does not fit.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from kvmhooks.config import Config
from tests.e2e.conftest import HUGEPAGE_BACKING, TEST_CONFIG, Env, wait_for
from tests.e2e.twohosts import Host, TwoHosts, real_pool2m, two_hosts

pytestmark = pytest.mark.e2e

DEDICATED = '<kvm:cpu policy="dedicated"/>'
POOL = "node0/2048kB"
# Fixed (not pytest's tmp, which other runs prune) so a failure's libvirt and kvmhooks logs can be read after.
WORKDIR = Path("/var/tmp/kvmhooks-twohosts")
# A claim the filter made for a VM whose prepare never comes expires after this (the default is 120 s).
CLAIM_TIMEOUT = 6.0
# kvmhooksd on each host (the production set-up; its prepare and post-start tuning paths), unless
# KVMHOOKS_E2E_AGENTS=0 asks for the hook alone (its detached worker tunes).
AGENTS = os.environ.get("KVMHOOKS_E2E_AGENTS", "1") != "0"
HAS_CLAIMS = "claim_timeout" in {f.name for f in fields(Config)}
# The suite's host config, plus the claim deadline (its top-level key first: TOML keys after [cpu] are [cpu]'s).
HOST_CONFIG = (f"claim_timeout = {CLAIM_TIMEOUT}\n" if HAS_CLAIMS else "") + TEST_CONFIG


@pytest.fixture(scope="module")
def pair(host: Env) -> Iterator[TwoHosts]:
    with two_hosts(WORKDIR, host.kernel, host.initrd, HOST_CONFIG, agents=AGENTS) as hosts:
        yield hosts


@pytest.fixture
def hosts(pair: TwoHosts) -> Iterator[TwoHosts]:
    yield pair
    pair.cleanup()
    # Nothing leaks: both hosts' ledgers and (fake) pools empty once every VM is gone.
    for h in pair.hosts:
        wait_for(lambda h=h: not h.records(), 10, f"host {h.name}'s ledger empty")
        assert h.pool2m() == 0, f"host {h.name}'s 2M pool not given back"


def pinned(host: Host, name: str) -> frozenset[int]:
    """Every host CPU the VM's vCPUs and emulator are pinned to, as ``virsh`` on ``host`` shows them."""
    cpus = frozenset().union(*host.vcpupin(name).values())
    return cpus | host.emulatorpin(name)


def record(host: Host, name: str) -> dict[str, Any]:
    rec = host.records().get(name)
    assert rec is not None, f"host {host.name}'s ledger has no record of {name}: {host.records()}"
    return rec


def tuned(host: Host, name: str) -> frozenset[int]:
    """Wait until ``host`` has pinned the dedicated VM as its ledger says (one CPU per vCPU, each its own,
    the emulator on the VM's CPUs); returns those CPUs."""
    def done() -> frozenset[int] | None:
        rec = host.records().get(name)
        if rec is None or rec["state"] == "claimed" or not rec["cpus"]:
            return None
        pins = host.vcpupin(name)
        if sorted(frozenset().union(*pins.values())) != sorted(rec["cpus"]) or any(len(c) != 1 for c in pins.values()):
            return None
        return frozenset(rec["cpus"]) if host.emulatorpin(name) <= frozenset(rec["cpus"]) else None
    return wait_for(done, 15, f"{name} pinned on host {host.name} as its ledger says")  # type: ignore[no-any-return]


def gone_from(host: Host, name: str) -> None:
    """The VM left ``host``: no domain, and its release emptied the ledger."""
    wait_for(lambda: name not in host.records(), 10, f"{name} released on host {host.name}")
    assert name not in host.names()


def migrated_ok(hosts: TwoHosts, src: Host, dst: Host, name: str, **kw: Any) -> None:
    r = hosts.migrate(src, dst, name, **kw)
    assert r.returncode == 0, f"virsh migrate {src.name}→{dst.name} failed: {r.stderr.strip()}\n{dst.diagnose(name)}"
    assert dst.domstate(name) == "running", dst.diagnose(name)


def test_pins_that_fit_arrive_valid_and_only_the_destination_holds_them(hosts: TwoHosts) -> None:
    a, b = hosts.hosts
    name = hosts.create(a, DEDICATED)
    tuned(a, name)
    hosts.booted(a, name)
    migrated_ok(hosts, a, b, name)
    cpus = tuned(b, name)
    assert b.records().keys() == {name} and sorted(cpus) == record(b, name)["cpus"]
    assert pinned(b, name) == cpus
    gone_from(a, name)
    assert a.records() == {}


def test_the_incoming_vm_is_re_pinned_away_from_the_destinations_dedicated_vm(hosts: TwoHosts) -> None:
    a, b = hosts.hosts
    name = hosts.create(a, DEDICATED)
    other = hosts.create(b, DEDICATED)
    taken = tuned(b, other)
    source = tuned(a, name)
    hosts.booted(a, name)
    # Both hosts plan the same way from empty books: the VM leaves A on the very CPU B gave its own VM.
    assert source == taken, f"precondition: A pinned {sorted(source)}, B's VM holds {sorted(taken)}"
    # Watched from its launch until virsh returns: B's incoming QEMU runs where the filter planned it, never
    # on B's other VM's CPU (before the filter: on A's pins, the other VM's CPU, until the migration ended
    # and kvmhooks re-pinned it).
    r, seen = hosts.watching(b, name, a, "migrate", "--live", name, b.uri, "--migrateuri", b.migrate_uri())
    assert r.returncode == 0, f"virsh migrate failed: {r.stderr.strip()}\n{b.diagnose(name)}"
    assert seen, f"{name}'s QEMU on B was never seen during the migration"
    on_taken = [t for t in seen if any(cpus & taken for cpus in t.values())]
    assert not on_taken, f"{name} ran on B's {other}'s CPU {sorted(taken)} while coming in: {on_taken[0]}"
    arrived = pinned(b, name)
    assert not arrived & taken, f"{name} arrived on {sorted(arrived)}, B's {other} holds {sorted(taken)}"
    rec = record(b, name)
    assert rec["state"] != "claimed" and not set(rec["cpus"]) & taken
    assert tuned(b, name) == frozenset(rec["cpus"])
    assert tuned(b, other) == taken
    gone_from(a, name)


def test_a_vm_that_does_not_fit_is_refused_in_one_line_and_keeps_running_on_the_source(hosts: TwoHosts) -> None:
    a, b = hosts.hosts
    full = hosts.create(b, DEDICATED, vcpus=2)  # B's both CPUs
    tuned(b, full)
    name = hosts.create(a, DEDICATED)
    before = tuned(a, name)
    r = hosts.migrate(a, b, name)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if f"kvmhooks: VM '{name}':" in line]
    assert len(lines) == 1, f"expected kvmhooks' one-line refusal naming {name}, got: {r.stderr.strip()}"
    assert a.domstate(name) == "running" and tuned(a, name) == before
    assert name not in b.names()
    # No claim, no record: B's books hold its own VM only.
    assert b.records().keys() == {full}
    assert not b.ledger()["summary"].get("claims")


def test_migrating_back_leaves_the_vm_held_on_a_only(hosts: TwoHosts) -> None:
    a, b = hosts.hosts
    name = hosts.create(a, DEDICATED)
    tuned(a, name)
    hosts.booted(a, name)
    migrated_ok(hosts, a, b, name)
    tuned(b, name)
    gone_from(a, name)
    migrated_ok(hosts, b, a, name)
    cpus = tuned(a, name)
    assert a.records().keys() == {name} and pinned(a, name) == cpus
    gone_from(b, name)


def test_saved_on_a_and_restored_on_b_is_held_by_b(hosts: TwoHosts) -> None:
    a, b = hosts.hosts
    name = hosts.create(a, DEDICATED)
    other = hosts.create(b, DEDICATED)
    taken = tuned(b, other)
    tuned(a, name)
    hosts.booted(a, name)
    image = hosts.save(a, name)
    gone_from(a, name)  # the save released A's CPUs
    r, seen = hosts.watching(b, name, b, "restore", str(image))
    assert r.returncode == 0, r.stderr.strip()
    assert b.domstate(name) == "running"
    on_taken = [t for t in seen if any(cpus & taken for cpus in t.values())]
    assert not on_taken, f"{name} ran on B's {other}'s CPU {sorted(taken)} while being restored: {on_taken[0]}"
    assert not pinned(b, name) & taken, f"{name} restored onto {sorted(pinned(b, name))}, {other} holds {sorted(taken)}"
    cpus = tuned(b, name)
    assert not cpus & taken and b.records().keys() == {name, other}
    assert a.records() == {}


def test_managedsave_then_start_restores_the_vm_held_again(hosts: TwoHosts) -> None:
    a, _ = hosts.hosts
    name = hosts.create(a, DEDICATED, persistent=True)
    tuned(a, name)
    hosts.booted(a, name)
    hosts.managedsave(a, name)
    assert a.domstate(name) == "shut off"
    gone_from_books = wait_for(lambda: name not in a.records(), 10, f"{name} released at its managedsave")
    assert gone_from_books
    a.virsh("start", name)  # restores the managed-save image (restore begin, then prepare)
    assert a.domstate(name) == "running"
    cpus = tuned(a, name)
    assert a.records().keys() == {name} and pinned(a, name) == cpus


def test_huge_pages_are_reserved_by_the_destination_and_given_back_by_the_source(hosts: TwoHosts) -> None:
    a, b = hosts.hosts
    pages = 128 * 1024 // 2048
    with real_pool2m(2 * pages):  # both QEMUs hold the guest's pages while the migration copies it
        name = hosts.create(a, f'<kvm:hugepages size="2M"/>{DEDICATED}', backing=HUGEPAGE_BACKING)
        tuned(a, name)
        assert record(a, name)["hugepages"] == {POOL: pages} and a.pool2m() == pages
        hosts.booted(a, name)
        migrated_ok(hosts, a, b, name)
        rec = record(b, name)
        assert rec["state"] != "claimed" and rec["hugepages"] == {POOL: pages}
        assert b.pool2m() == pages
        gone_from(a, name)
        assert a.pool2m() == 0 and a.records() == {}
        tuned(b, name)
        b.virsh("destroy", name)
        wait_for(lambda: b.pool2m() == 0, 10, "B's 2M pool given back at the VM's release")


def test_persistent_migration_keeps_the_stale_cputune_and_the_plan_wins_at_the_next_start(hosts: TwoHosts) -> None:
    a, b = hosts.hosts
    name = hosts.create(a, DEDICATED)
    source = tuned(a, name)
    hosts.booted(a, name)
    migrated_ok(hosts, a, b, name, persistent=True)
    tuned(b, name)
    inactive = b.virsh("dumpxml", "--inactive", name).stdout
    stale = f"<vcpupin vcpu='0' cpuset='{min(source)}'/>"
    assert stale in inactive, f"B's persistent definition lost A's <cputune> ({stale}):\n{inactive}"
    b.virsh("destroy", name)
    wait_for(lambda: name not in b.records(), 10, f"{name} released on B")
    other = hosts.create(b, DEDICATED)
    taken = tuned(b, other)
    assert taken == source, f"precondition: B's new VM holds {sorted(taken)}, the stale pin is {sorted(source)}"
    b.virsh("start", name)
    cpus = tuned(b, name)
    assert not cpus & taken, f"{name} restarted on {sorted(cpus)}: the stale <cputune> won over the plan"
    assert pinned(b, name) == cpus


@pytest.mark.skipif(not HAS_CLAIMS, reason="kvmhooks has no claims (claim_timeout) yet")
def test_a_claim_whose_prepare_never_comes_expires(hosts: TwoHosts) -> None:
    """An offline migration runs B's migrate filter (a claim) and never B's prepare: the claim holds B's CPUs
    until it expires, and no release will ever come for it."""
    a, b = hosts.hosts
    name, xml = hosts.guest_xml(DEDICATED, vcpus=2)
    (hosts.workdir / f"{name}.xml").write_text(xml)
    a.virsh("define", str(hosts.workdir / f"{name}.xml"))
    r = hosts.migrate(a, b, name, live=False, persistent=True, extra=("--offline",))
    assert r.returncode == 0, r.stderr.strip()
    assert b.domstate(name) == "shut off"
    claim = record(b, name)
    assert claim["state"] == "claimed" and sorted(claim["cpus"]) == [0, 1], claim
    # While it holds: B has no CPU to dedicate (prepare refuses, nothing recorded).
    early, early_xml = hosts.guest_xml(DEDICATED)
    path = hosts.workdir / f"{early}.xml"
    path.write_text(early_xml)
    assert b.virsh("create", str(path), check=False).returncode != 0
    assert b.records().keys() == {name}
    time.sleep(max(0.0, claim["expires"] - time.time()) + 0.2)
    other = hosts.create(b, DEDICATED)  # the expired claim no longer holds B's CPUs
    tuned(b, other)
    assert b.records().keys() == {other}


def test_harness_hosts_are_apart(hosts: TwoHosts) -> None:
    """Each host sees its own kvmhooks state and hook; the machine's own is neither."""
    a, b = hosts.hosts
    for h in (a, b):
        assert h.sh("cat /etc/kvmhooks/config.toml").stdout.startswith(f'sysfs_root = "{h.fake.sysfs}"')
        assert h.sh("ls /etc/libvirt/hooks/qemu.d").stdout.split() == ["kvmhooks"]
    assert Path(a.source("/run/kvmhooks")) != Path(b.source("/run/kvmhooks"))
