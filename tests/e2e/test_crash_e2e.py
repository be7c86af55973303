"""The crash-safe core on the real daemon: failing lifecycle hooks never stop a VM, the VM's owner cannot make
release refuse, an admin's hand resize survives reconcile and the VM's stop, a broken install kills nothing."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from tests.e2e.conftest import (
    CONFIG,
    POOL2M,
    TEST_CONFIG,
    Env,
    domstate,
    ledger,
    pool2m,
    run,
    start_libvirtd,
    stop_daemon,
    virsh,
    wait_for,
)

HOOKS_D = Path("/etc/libvirt/hooks/qemu.d")
# Runs before qemu.d/kvmhooks (libvirt runs qemu.d scripts in name order): on `started` of a VM whose name says
# so, it takes the ledger lock and leaves it to a detached child for a few seconds.
LOCK_HOLDER = """#!/usr/bin/python3
import fcntl, os, sys, time
if len(sys.argv) > 2 and sys.argv[2] == "started" and "-lock-" in sys.argv[1]:
    fd = os.open("/run/kvmhooks/ledger.json.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    if os.fork() == 0:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for i in (0, 1, 2):
            os.dup2(null, i)
        time.sleep(4)
        os._exit(0)
"""


@contextlib.contextmanager
def config(extra: str) -> Iterator[None]:
    CONFIG.write_text(extra + TEST_CONFIG.replace("lock_timeout = 20\n", ""))  # top-level keys before [cpu]
    try:
        yield
    finally:
        CONFIG.write_text(TEST_CONFIG)


def test_a_failing_started_hook_leaves_the_vm_running(env: Env) -> None:
    script = HOOKS_D / "00-kvmhtest-lockholder"
    script.write_text(LOCK_HOLDER)
    script.chmod(0o755)
    try:
        with config("lock_timeout = 1\n"):
            vm = env.define('<kvm:hugepages size="2M"/><kvm:memtune soft_limit="200M"/>')
            vm.name = vm.name.replace("kvmhtest-", "kvmhtest-lock-")
            virsh("domrename", vm.name.replace("kvmhtest-lock-", "kvmhtest-"), vm.name)
            r = virsh("start", vm.name, check=False)  # started: lock held by the other script: kvmhooks fails, exit 0
            assert r.returncode == 0, r.stderr
            failure = Path(f"/run/kvmhooks/failures/{vm.uuid}")
            wait_for(failure.exists, 10, "the failure record")
            assert "stayed locked" in failure.read_text()
            time.sleep(1)
            assert domstate(vm.name) == "running"
            status = run("kvmhooks", "status", vm.name, check=False)  # the ledger is still locked
            assert status.returncode == 0 and "stayed locked" in status.stdout, status.stderr
            time.sleep(4)  # the holder lets go
            status = run("kvmhooks", "status", vm.name, check=False)
            assert status.returncode == 0 and "stayed locked" in status.stdout  # started's, or its worker's
    finally:
        script.unlink()


def test_hostile_and_oversize_live_metadata_cannot_make_release_refuse(env: Env) -> None:
    import libvirt

    before = pool2m()
    big = "<x>" + "A" * (2560 * 1024) + "</x>"  # libvirt's RPC takes up to 4 MiB per call: two make the XML >4 MiB
    for hostile in (["<x><!-- <!DOCTYPE x [<!ENTITY e 'boom'>]> --></x>"], [big, big]):
        vm = env.define('<kvm:hugepages size="2M"/>')
        virsh("start", vm.name)
        assert pool2m() == before + 128
        conn = libvirt.open("qemu:///system")
        try:  # the VM's owner can do this through libvirt's API with no root on the host
            for n, element in enumerate(hostile):
                conn.lookupByName(vm.name).setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, element, f"o{n}",
                                                       f"urn:other{n}", libvirt.VIR_DOMAIN_AFFECT_LIVE)
        finally:
            conn.close()
        virsh("destroy", vm.name)
        assert pool2m() == before
        assert vm.uuid not in ledger()["domains"]


def test_an_admin_resize_survives_reconcile_and_the_vm_stop(env: Env) -> None:
    before = pool2m()
    vm = env.define('<kvm:hugepages size="2M"/>')
    virsh("start", vm.name)
    nr = POOL2M / "nr_hugepages"
    try:
        nr.write_text(f"{before + 128 + 50}\n")  # the admin adds 50 pages by hand while the VM runs
        out = run("kvmhooks", "reconcile").stdout
        assert "set pool" not in out
        assert pool2m() == before + 178
        virsh("destroy", vm.name)
        assert pool2m() == before + 50  # the VM's pages went back, the admin's stayed
    finally:
        nr.write_text(f"{before}\n")  # the admin takes them away again (the harness checks the pool)


def test_an_admin_lowering_a_pool_is_not_overruled(env: Env) -> None:
    """Issue 17 item 4 on the real kernel: the admin's 10 extra pages, then they give 5 back while a VM runs.
    reconcile keeps their value, and after the VM's stop the pool is what they left (round one put 10 back)."""
    before = pool2m()
    nr = POOL2M / "nr_hugepages"
    nr.write_text(f"{before + 10}\n")  # the admin's own pages, before any kvmhooks write
    vm = env.define('<kvm:hugepages size="2M"/>')
    try:
        virsh("start", vm.name)
        assert pool2m() == before + 10 + 128
        nr.write_text(f"{before + 5 + 128}\n")  # the admin gives 5 back while the VM runs
        out = run("kvmhooks", "reconcile").stdout
        assert "set pool" not in out and "lowered by hand" in out
        assert pool2m() == before + 5 + 128
        virsh("destroy", vm.name)
        assert pool2m() == before + 5
    finally:
        nr.write_text(f"{before}\n")  # the admin takes theirs away again (the harness checks the pool)


def test_a_broken_install_kills_no_vm(env: Env) -> None:
    """A half-done upgrade (the package gone from the venv): reconnect and release must exit 0."""
    before = pool2m()
    vm = env.define('<kvm:hugepages size="2M"/>')
    virsh("start", vm.name)
    (pkg,) = glob.glob("/opt/kvmhooks/venv/lib/python3*/site-packages/kvmhooks")
    aside = pkg + ".kvmhtest-aside"
    shutil.move(pkg, aside)
    try:
        qemu_pid = int(open(f"/run/libvirt/qemu/{vm.name}.pid").read())
        stop_daemon("libvirtd")
        start_libvirtd()  # reconnect runs without the package
        assert domstate(vm.name) == "running" and os.path.exists(f"/proc/{qemu_pid}")
        virsh("destroy", vm.name)  # release runs without the package: exits 0, nothing released
        assert domstate(vm.name) == "shut off" and pool2m() == before + 128
    finally:
        shutil.move(aside, pkg)
    out = run("kvmhooks", "reconcile").stdout  # the documented repair
    assert f"release {vm.name}" in out
    wait_for(lambda: pool2m() == before, 10, "the pages back")
