"""CPU tuning end to end: what `virsh vcpupin`, `emulatorpin`, `vcpucount`, `memtune` and `dumpxml` show."""

from __future__ import annotations

import os
import time

from tests.e2e.conftest import LOG, Env, ledger, virsh, wait_for


def vcpupin(name: str, *flags: str) -> dict[int, str]:
    out = virsh("vcpupin", name, *flags).stdout
    pins = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():
            pins[int(parts[0])] = parts[1]
    return pins


def emulatorpin(name: str) -> str:
    return virsh("emulatorpin", name).stdout.strip().splitlines()[-1].split(":")[-1].strip()


def test_explicit_pins_show_in_virsh_within_a_second(env: Env) -> None:
    vm = env.define('<kvm:vcpupin vcpu="0" cpuset="1"/><kvm:vcpupin vcpu="1" cpuset="0"/>'
                    '<kvm:emulatorpin cpuset="0"/>', backing="")
    virsh("start", vm.name)
    t0 = time.monotonic()
    wait_for(lambda: vcpupin(vm.name) == {0: "1", 1: "0"} and emulatorpin(vm.name) == "0", 1.0,
             "pins in virsh vcpupin/emulatorpin")
    assert time.monotonic() - t0 <= 1.0
    # The detached worker did it (it talks to libvirt) without holding up virsh start, and said so.
    rec = wait_for(lambda: ledger()["domains"][vm.uuid]["applied"].get("worker_pid"), 5, "the worker's record")
    assert rec > 0 and ledger()["domains"][vm.uuid]["state"] == "running"
    # (The one the prepare hook forked, warm: the started hook started no interpreter.)
    said = [line for line in LOG.read_text().splitlines() if vm.uuid in line]
    assert any("its tuning waits for the start in a detached worker" in line for line in said), said
    assert not any("detached worker spawned" in line for line in said), said
    assert ledger()["domains"][vm.uuid]["applied"]["pins"] == {"0": "1", "1": "0"}  # read back from libvirt
    # Live only: the persistent definition is untouched without persist="yes".
    assert "<cputune>" not in virsh("dumpxml", "--inactive", vm.name).stdout


def test_iothread_pin(env: Env) -> None:
    vm = env.define('<kvm:iothreadpin iothread="1" cpuset="1"/>', backing="", extra="<iothreads>1</iothreads>")
    virsh("start", vm.name)

    def iothreads() -> dict[str, str]:
        rows = [line.split() for line in virsh("iothreadinfo", vm.name).stdout.splitlines()]
        return {r[0]: r[-1] for r in rows if len(r) >= 2 and r[0].isdigit()}

    wait_for(lambda: iothreads().get("1") == "1", 5, "the iothread pin in virsh iothreadinfo")


def test_persist_yes_writes_cputune_into_the_definition(env: Env) -> None:
    vm = env.define('<kvm:vcpupin vcpu="0" cpuset="1"/><kvm:emulatorpin cpuset="0"/><kvm:cputune persist="yes"/>',
                    backing="")
    virsh("start", vm.name)
    wait_for(lambda: "<vcpupin vcpu='0' cpuset='1'/>" in virsh("dumpxml", "--inactive", vm.name).stdout, 5,
             "cputune in the persistent XML")
    assert "<emulatorpin cpuset='0'/>" in virsh("dumpxml", "--inactive", vm.name).stdout


def test_dedicated_vms_get_different_cpus_and_a_third_is_refused(env: Env) -> None:
    a = env.define('<kvm:cpu policy="dedicated"/>', vcpus=1, backing="")
    b = env.define('<kvm:cpu policy="dedicated"/>', vcpus=1, backing="")
    c = env.define('<kvm:cpu policy="dedicated"/>', vcpus=1, backing="")
    virsh("start", a.name)
    virsh("start", b.name)
    pa = wait_for(lambda: vcpupin(a.name).get(0) if vcpupin(a.name).get(0) in ("0", "1") else None, 5, "a's pin")
    pb = wait_for(lambda: vcpupin(b.name).get(0) if vcpupin(b.name).get(0) in ("0", "1") else None, 5, "b's pin")
    assert {pa, pb} == {"0", "1"}
    assert emulatorpin(a.name) == pa  # emulator="share": on the VM's own CPU
    res = virsh("start", c.name, check=False)
    assert res.returncode != 0 and f"kvmhooks: VM '{c.name}'" in res.stderr and "dedicated" in res.stderr
    assert c.uuid not in ledger()["domains"]
    virsh("destroy", a.name)  # gives its CPU back
    virsh("start", c.name)
    wait_for(lambda: vcpupin(c.name).get(0) == pa, 5, "c to get a's old CPU")


def test_vcpus_live_and_memtune(env: Env) -> None:
    vm = env.define('<kvm:vcpus live="2"/><kvm:vcpupin vcpu="2" cpuset="1"/>'
                    '<kvm:memtune hard_limit="1G" soft_limit="800M" min_guarantee="100M"/>', vcpus=3,
                    vcpu_current=1, backing="")
    virsh("start", vm.name)

    def counts() -> dict[str, str]:
        out = virsh("vcpucount", vm.name).stdout
        return {" ".join(line.split()[:2]): line.split()[2] for line in out.splitlines() if line.strip()}

    wait_for(lambda: counts().get("current live") == "2", 5, "2 vCPUs online")
    wait_for(lambda: "1048576" in virsh("memtune", vm.name).stdout, 5, "memtune")
    mt = virsh("memtune", vm.name).stdout
    assert "hard_limit     : 1048576" in mt and "soft_limit     : 819200" in mt
    # min_guarantee is refused by QEMU: reported once, the rest applied.
    rec = wait_for(lambda: ledger()["domains"][vm.uuid] if ledger()["domains"][vm.uuid].get("applied") else None,
                   5, "the worker's record")
    assert any("min_guarantee" in p for p in rec["applied"]["problems"])
    # vCPU 2 is offline but pinned; plugging it keeps the pin (no unpinned hot-plugged vCPU).
    virsh("setvcpus", vm.name, "3", "--live")
    assert vcpupin(vm.name)[2] == "1"


def test_shared_vm_moves_off_a_dedicated_cpu_and_back(env: Env) -> None:
    s = env.define('<kvm:cpu policy="shared"/>', vcpus=1, backing="")
    d = env.define('<kvm:cpu policy="dedicated"/>', vcpus=1, backing="")
    virsh("start", s.name)
    wait_for(lambda: vcpupin(s.name).get(0) == "0-1", 5, "the shared VM on the whole pool")
    virsh("start", d.name)
    mine = wait_for(lambda: vcpupin(d.name).get(0) if vcpupin(d.name).get(0) in ("0", "1") else None, 5, "d's pin")
    other = "1" if mine == "0" else "0"
    wait_for(lambda: vcpupin(s.name).get(0) == other and emulatorpin(s.name) == other, 5,
             "the shared VM off the dedicated CPU")
    virsh("destroy", d.name)
    wait_for(lambda: vcpupin(s.name).get(0) == "0-1", 5, "the shared VM back on the whole pool")


def test_a_pinned_vm_stops_without_an_interpreter_and_starts_again_at_once(env: Env) -> None:
    """No kvmhooksd, pins only: the VM holds nothing of the host's, so `virsh destroy` waits for no Python (the
    detached worker releases its record); a start right after the destroy is a new run, pinned as asked, and
    the ledger forgets the VM moments after its last stop."""
    vm = env.define('<kvm:vcpupin vcpu="0" cpuset="1"/>', backing="")
    virsh("start", vm.name)
    wait_for(lambda: ledger()["domains"].get(vm.uuid, {}).get("state") == "running", 5, "the worker's tuning")
    token = ledger()["domains"][vm.uuid]["token"]
    virsh("destroy", vm.name)
    virsh("start", vm.name)  # before or after the worker's release: the prepare settles it first
    wait_for(lambda: ledger()["domains"].get(vm.uuid, {}).get("state") == "running", 5, "the new run's tuning")
    assert ledger()["domains"][vm.uuid]["token"] != token and vcpupin(vm.name)[0] == "1"
    virsh("destroy", vm.name)
    wait_for(lambda: vm.uuid not in ledger()["domains"], 10, "the worker's release")
    assert os.listdir("/run/kvmhooks/stopping") == [] and not os.path.exists(f"/run/kvmhooks/held/{vm.uuid}")
