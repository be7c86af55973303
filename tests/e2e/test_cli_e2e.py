"""The kvmhooks command on the real libvirtd: annotate → start, plan = what the hook does, reconcile, demo."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

from kvmhooks.annotate import normalize
from tests.e2e.conftest import Env, dommemstat, ledger, pool2m, run, virsh, wait_for
from tests.e2e.test_cpu_e2e import emulatorpin, vcpupin

KVMHOOKS = "/opt/kvmhooks/venv/bin/kvmhooks"
HOOK = Path("/etc/libvirt/hooks/qemu.d/kvmhooks")


def kvmhooks(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(KVMHOOKS, *args, check=check, timeout=300)


def strip_ours(xml: str) -> str:
    """The definition without kvmhooks' parts: what annotate must leave as it was."""
    xml = re.sub(r"<metadata>.*?</metadata>", "", xml, flags=re.S)
    xml = re.sub(r"<memoryBacking>.*?</memoryBacking>", "", xml, flags=re.S)
    xml = re.sub(r"<qemu:commandline>.*?</qemu:commandline>", "", xml, flags=re.S)
    xml = xml.replace(" xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'", "")
    xml = xml.replace(" autodeflate='on'", "")  # deflate-on-oom, which annotate --balloon turns on
    return normalize(xml)


def test_annotate_then_start_produces_the_tuning_and_remove_undoes_it(env: Env) -> None:
    vm = env.define(None, backing="")
    original = virsh("dumpxml", "--inactive", vm.name).stdout
    res = kvmhooks("annotate", vm.name, "--hugepages", "2M", "--pin", "1,0", "--balloon", "192M", "--qmp")
    assert re.search(r'^\+\s+<kvm:hugepages size="2M"/>$', res.stdout, re.M)
    assert re.search(r"^\+\s+<hugepages/>$", res.stdout, re.M) and res.stderr == ""
    annotated = virsh("dumpxml", "--inactive", vm.name).stdout
    assert strip_ours(annotated) == strip_ours(original)  # nothing else in the definition changed
    before = pool2m()
    virsh("start", vm.name)
    assert pool2m() == before + 128
    wait_for(lambda: vcpupin(vm.name) == {0: "1", 1: "0"}, 5, "the pins")
    wait_for(lambda: dommemstat(vm.name)["actual"] == 196608, 60, "the balloon over QMP")
    rec = wait_for(lambda: ledger()["domains"][vm.uuid]["applied"].get("balloon"), 10, "the worker's record")
    assert rec["transport"] == "qmp"
    status = json.loads(kvmhooks("status", vm.name, "--json").stdout)["vms"][0]
    assert status["hugepages"] == {"node0/2048kB": 128} and status["balloon"]["actual"] == 196608
    virsh("destroy", vm.name)
    kvmhooks("annotate", vm.name, "--remove")
    assert normalize(virsh("dumpxml", "--inactive", vm.name).stdout) == normalize(original)


def test_plan_matches_what_the_hook_then_does(env: Env) -> None:
    vm = env.define('<kvm:hugepages size="2M"/><kvm:vcpupin vcpu="0" cpuset="1"/><kvm:emulatorpin cpuset="0"/>')
    plan = json.loads(kvmhooks("plan", vm.name, "--json").stdout)
    writes = [a["action"] for a in plan["actions"] if "nr_hugepages =" in a["action"]]
    assert len(writes) == 1
    target = int(re.search(r"nr_hugepages = (\d+)", writes[0]).group(1))  # type: ignore[union-attr]
    pins = [a["action"] for a in plan["actions"] if "pinVcpuFlags" in a["action"] or "pinEmulator" in a["action"]]
    assert pins == ["libvirt pinVcpuFlags(0, 1, AFFECT_LIVE)", "libvirt pinVcpuFlags(1, 0-1, AFFECT_LIVE)"] or \
        "libvirt pinVcpuFlags(0, 1, AFFECT_LIVE)" in pins
    assert "libvirt pinEmulator(0, AFFECT_LIVE)" in pins
    virsh("start", vm.name)
    assert pool2m() == target
    wait_for(lambda: vcpupin(vm.name)[0] == "1" and emulatorpin(vm.name) == "0", 5, "the planned pins")


def test_reconcile_repairs_what_a_vm_killed_without_its_hook_left(env: Env) -> None:
    before = pool2m()
    vm = env.define('<kvm:hugepages size="2M"/>')
    virsh("start", vm.name)
    saved = HOOK.read_bytes()
    HOOK.unlink()  # the hook cannot run: the stop below leaves the reservation behind
    try:
        pid = int(Path(f"/run/libvirt/qemu/{vm.name}.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: virsh("domstate", vm.name).stdout.strip() == "shut off", 20, "libvirt to see the crash")
    finally:
        HOOK.write_bytes(saved)
        HOOK.chmod(0o755)
    assert vm.uuid in ledger()["domains"] and pool2m() == before + 128  # the leftover
    dry = kvmhooks("reconcile", "--dry-run")
    assert f"would release {vm.name}" in dry.stdout and vm.uuid in ledger()["domains"]
    res = kvmhooks("reconcile")
    assert f"release {vm.name}" in res.stdout
    assert vm.uuid not in ledger()["domains"] and pool2m() == before
    assert "nothing to do" in kvmhooks("reconcile").stdout


def test_host_status_doctor_and_demo(env: Env) -> None:
    host = json.loads(kvmhooks("host", "--json").stdout)
    assert str(HOOK) in host["hook"]["installed"]
    doctor = kvmhooks("doctor", check=False)
    assert doctor.returncode in (0, 1) and "Traceback" not in doctor.stderr
    demo = kvmhooks("demo")
    assert "kvmhooks status" in demo.stdout and "ledger entry gone; done" in demo.stdout
    assert re.search(r"kvmhooks-demo\s+running\s+hugepages 2M", demo.stdout)
    assert "192M/192M" in demo.stdout  # the balloon landed before the demo showed status
