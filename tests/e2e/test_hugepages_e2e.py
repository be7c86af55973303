"""The foundation, end to end: hugepages reserved before QEMU, given back at stop, refused cleanly."""

from __future__ import annotations

import os
import signal
import time

from tests.e2e.conftest import (
    LOG,
    Env,
    domstate,
    free2m,
    ledger,
    pool2m,
    run,
    start_libvirtd,
    stop_daemon,
    virsh,
    wait_for,
)


def test_annotated_guest_gets_its_pages_and_gives_them_back(env: Env) -> None:
    before = pool2m()
    vm = env.define('<kvm:hugepages size="2M"/>', memory_mib=256)
    virsh("start", vm.name)
    # The pool only had the admin's baseline: QEMU could not have started on huge pages unless prepare
    # raised it first. 256 MiB / 2 MiB = 128 pages, and QEMU holds them.
    assert pool2m() == before + 128
    rec = ledger()["domains"][vm.uuid]
    assert rec["hugepages"] == {"node0/2048kB": 128}
    assert free2m() < pool2m()
    wait_for(vm.ready, 60, "the guest's ready line")
    assert domstate(vm.name) == "running"
    # Where its memory is (numastat's data), as status shows it: huge pages on node 0, this host's only node.
    import json

    status = json.loads(run("/usr/local/bin/kvmhooks", "status", vm.name, "--json").stdout)["vms"][0]
    assert status["memory_nodes"]["0"]["huge"] > 0
    # Huge pages only: everything was done at prepare, so its started hook is the shell's alone (no Python:
    # it would mark the record running; no worker), and its record stays as prepare left it.
    assert ledger()["domains"][vm.uuid]["state"] == "prepared"
    assert "worker_pid" not in ledger()["domains"][vm.uuid]["applied"]
    virsh("destroy", vm.name)
    assert pool2m() == before
    assert vm.uuid not in ledger()["domains"]


def test_impossible_reservation_fails_start_and_changes_nothing(env: Env) -> None:
    before = pool2m()
    vm = env.define('<kvm:hugepages size="2M"/>', memory_mib=64 * 1024)  # more than this host has
    t0 = time.monotonic()
    res = virsh("start", vm.name, check=False)
    elapsed = time.monotonic() - t0
    assert res.returncode != 0
    assert "kvmhooks: VM" in res.stderr and vm.name in res.stderr and "not enough memory" in res.stderr
    assert pool2m() == before
    assert vm.uuid not in ledger()["domains"]
    assert domstate(vm.name) == "shut off"
    assert elapsed < 10  # refused at once, not after a retry loop (the figure itself is in bench/)


def test_bad_annotation_names_vm_element_attribute_and_value(env: Env) -> None:
    before = pool2m()
    vm = env.define('<kvm:hugepages size="3M"/>')
    res = virsh("start", vm.name, check=False)
    assert res.returncode != 0
    line = next(x for x in res.stderr.splitlines() if "kvmhooks:" in x)
    for part in (vm.name, "<kvm:hugepages size=...>", "'3M'"):
        assert part in line
    assert pool2m() == before


def test_missing_hugepage_backing_says_how_to_fix(env: Env) -> None:
    vm = env.define('<kvm:hugepages size="2M"/>', backing="")
    res = virsh("start", vm.name, check=False)
    assert res.returncode != 0
    assert "<memoryBacking><hugepages/></memoryBacking>" in res.stderr


def test_unannotated_guest_is_untouched(env: Env) -> None:
    before = pool2m()
    log_before = LOG.stat().st_size if LOG.exists() else 0
    vm = env.define(None, backing="")
    virsh("start", vm.name)
    wait_for(vm.ready, 60, "the guest's ready line")
    assert pool2m() == before
    assert vm.uuid not in ledger()["domains"]
    virsh("destroy", vm.name)
    text = LOG.read_text()[log_before:] if LOG.exists() else ""
    assert vm.uuid not in text


def test_libvirtd_restart_keeps_vm_running_and_accounted(env: Env) -> None:
    before = pool2m()
    vm = env.define('<kvm:hugepages size="2M"/>')
    virsh("start", vm.name)
    qemu_pid = int(open(f"/run/libvirt/qemu/{vm.name}.pid").read())
    stop_daemon("libvirtd")
    start_libvirtd()  # runs the reconnect hook for the running VM
    assert domstate(vm.name) == "running"
    assert os.path.exists(f"/proc/{qemu_pid}")  # the same QEMU, not a restarted one
    rec = ledger()["domains"][vm.uuid]
    assert rec["hugepages"] == {"node0/2048kB": 128}
    assert pool2m() == before + 128  # nothing reserved twice
    virsh("destroy", vm.name)
    assert pool2m() == before


def test_reconnect_adopts_a_vm_missing_from_the_ledger(env: Env) -> None:
    before = pool2m()
    vm = env.define('<kvm:hugepages size="2M"/>')
    virsh("start", vm.name)
    stop_daemon("libvirtd")
    # Simulate a lost entry (e.g. a ledger restored from elsewhere): reconnect must adopt, not reserve.
    from kvmhooks.ledger import Ledger
    from tests.e2e.conftest import LEDGER

    with Ledger(LEDGER).transaction() as st:
        del st.domains[vm.uuid]
    start_libvirtd()
    assert domstate(vm.name) == "running"
    assert ledger()["domains"][vm.uuid]["hugepages"] == {"node0/2048kB": 128}
    assert pool2m() == before + 128
    virsh("destroy", vm.name)
    assert pool2m() == before


def test_crashed_qemu_gives_pages_back(env: Env) -> None:
    before = pool2m()
    vm = env.define('<kvm:hugepages size="2M"/>')
    virsh("start", vm.name)
    pid = int(open(f"/run/libvirt/qemu/{vm.name}.pid").read())
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: domstate(vm.name) == "shut off", 20, "libvirt to notice the crash")
    wait_for(lambda: pool2m() == before, 10, "the pool to shrink back")
    assert vm.uuid not in ledger()["domains"]


def test_concurrent_starts_reserve_exactly(env: Env) -> None:
    import subprocess

    before = pool2m()
    vms = [env.define('<kvm:hugepages size="2M"/>', memory_mib=128) for _ in range(4)]
    procs = [subprocess.Popen(["virsh", "-c", "qemu:///system", "start", vm.name], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for vm in vms]
    assert all(p.wait(120) == 0 for p in procs)
    assert pool2m() == before + 4 * 64
    held = ledger()["domains"]
    assert [held[vm.uuid]["hugepages"] for vm in vms] == [{"node0/2048kB": 64}] * 4
    procs = [subprocess.Popen(["virsh", "-c", "qemu:///system", "destroy", vm.name], stdout=subprocess.PIPE)
             for vm in vms]
    assert all(p.wait(60) == 0 for p in procs)
    assert pool2m() == before and not any(vm.uuid in ledger()["domains"] for vm in vms)


def test_the_no_editor_path_virsh_metadata(env: Env) -> None:
    """The README's `virsh metadata --set` line: libvirt stores our element, the hook picks it up."""
    before = pool2m()
    vm = env.define(None)  # hugepage backing, no annotation yet
    virsh("metadata", vm.name, "--uri", "http://kvmhooks.org/xmlns/domain/1.0", "--key", "kvm", "--set",
          '<tuning><hugepages size="2M"/></tuning>', "--config")
    virsh("start", vm.name)
    assert pool2m() == before + 128 and ledger()["domains"][vm.uuid]["hugepages"] == {"node0/2048kB": 128}
    virsh("destroy", vm.name)
    assert pool2m() == before
