"""The balloon end to end: what `virsh dommemstat` shows after start, over QMP and over libvirt."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.e2e.conftest import Env, dommemstat, domstate, ledger, virsh, wait_for

KVMHOOKS = "/opt/kvmhooks/venv/bin/kvmhooks"


@contextlib.contextmanager
def balloond(interval: float) -> Iterator[subprocess.Popen[str]]:
    """The automatic balloon service in the foreground; stopped with SIGTERM, which must end it cleanly."""
    svc = subprocess.Popen([KVMHOOKS, "balloond", "--interval", str(interval), "--log-stderr"],
                           stderr=subprocess.PIPE, text=True)
    try:
        yield svc
    finally:
        svc.send_signal(signal.SIGTERM)
        out = svc.communicate(timeout=10)[1]
    assert svc.returncode == 0 and "Traceback" not in out, out


def balloon_record(uuid: str) -> dict:  # type: ignore[type-arg]
    return ledger()["domains"].get(uuid, {}).get("applied", {}).get("balloon")  # type: ignore[no-any-return]


def test_fixed_target_over_qmp(env: Env) -> None:
    vm = env.define('<kvm:balloon target="192M"/>', backing="", qmp=True)
    virsh("start", vm.name)
    rec = wait_for(lambda: balloon_record(vm.uuid), 60, "the worker's balloon step")
    assert rec["transport"] == "qmp" and rec["driver"] is True
    assert rec["landed_seconds"] < 5  # within a few seconds of the driver coming up
    assert dommemstat(vm.name)["actual"] == 196608
    virsh("destroy", vm.name)
    assert not Path(f"/var/lib/libvirt/qemu/kvmhooks/{vm.uuid}.qmp").exists()  # nothing left behind
    assert vm.uuid not in ledger()["domains"]


def test_fixed_target_over_libvirt_when_there_is_no_socket(env: Env) -> None:
    vm = env.define('<kvm:balloon target="75%"/>', backing="")
    virsh("start", vm.name)
    rec = wait_for(lambda: balloon_record(vm.uuid), 60, "the worker's balloon step")
    assert rec["transport"] == "libvirt" and rec["target"] == 196608
    assert dommemstat(vm.name)["actual"] == 196608


def test_guest_without_balloon_driver_keeps_its_memory(env: Env) -> None:
    vm = env.define('<kvm:balloon target="192M"/>', backing="", cmdline_extra="kvmhooks.noballoon")
    virsh("start", vm.name)  # the start itself succeeds at once
    rec = wait_for(lambda: balloon_record(vm.uuid), 60, "the worker to give up on the driver")
    assert rec["driver"] is False
    assert dommemstat(vm.name)["actual"] == 262144
    assert domstate(vm.name) == "running"


def test_auto_service_shrinks_an_idle_guest_to_its_floor_and_never_below(env: Env) -> None:
    # reclaim="idle": the default squeezes only when the host needs memory (see test_elastic_e2e.py).
    vm = env.define('<kvm:balloon policy="auto" min="160M" reclaim="idle"/>', backing="", qmp=True)
    virsh("start", vm.name)
    wait_for(lambda: balloon_record(vm.uuid), 60, "the guest's balloon driver")
    with balloond(0.5) as svc:
        seen = []

        def at_floor() -> bool:
            seen.append(dommemstat(vm.name)["actual"])
            return seen[-1] == 160 * 1024

        wait_for(at_floor, 30, "the idle guest to reach its floor", interval=0.2)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3:  # several more cycles: it stays at the floor
            seen.append(dommemstat(vm.name)["actual"])
            time.sleep(0.2)
        assert min(seen) == 160 * 1024 and seen[-1] == 160 * 1024
        # The VM vanishing mid-run does not take the service down.
        virsh("destroy", vm.name)
        time.sleep(1.5)
        assert svc.poll() is None


def test_balloond_survives_a_libvirtd_restart(env: Env) -> None:
    from tests.e2e.conftest import start_libvirtd, stop_daemon

    vm = env.define('<kvm:balloon policy="auto" min="200M" reclaim="idle"/>', backing="", qmp=True)
    virsh("start", vm.name)
    wait_for(lambda: balloon_record(vm.uuid), 60, "the guest's balloon driver")
    with balloond(0.3) as svc:
        wait_for(lambda: dommemstat(vm.name)["actual"] == 200 * 1024, 30, "the floor")
        stop_daemon("libvirtd")
        time.sleep(1)
        assert svc.poll() is None
        start_libvirtd()
        assert domstate(vm.name) == "running"
        virsh("setmem", vm.name, "256M", "--live")  # undo its work: it must do it again after the restart
        wait_for(lambda: dommemstat(vm.name)["actual"] == 200 * 1024, 30, "the floor again after the restart")
        assert svc.poll() is None
