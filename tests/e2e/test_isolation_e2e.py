"""Host isolation on this machine's real cgroup v1 cpuset hierarchy, IRQs and work-queue mask: while a
dedicated VM with <kvm:host> runs, a host process started before it may not run on the VM's CPU, movable
IRQs and unbound kernel work avoid it; after `virsh destroy` every value is back to what it was."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmhooks.units import parse_cpuset
from tests.e2e.conftest import Env, ledger, run, virsh, wait_for
from tests.e2e.test_cpu_e2e import vcpupin

KVMHOOKS = "/usr/local/bin/kvmhooks"
CPUSET = Path("/sys/fs/cgroup/cpuset")
SHIELD = CPUSET / "kvmhooks-host"
WORKQUEUE = Path("/sys/devices/virtual/workqueue/cpumask")
DEFAULT_IRQ = Path("/proc/irq/default_smp_affinity")


def irqs() -> dict[str, str]:
    return {p.parent.name: p.read_text().strip() for p in Path("/proc/irq").glob("*/smp_affinity_list")}


def allowed(pid: int) -> frozenset[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return parse_cpuset(line.split(":", 1)[1].strip())
    raise AssertionError(f"no Cpus_allowed_list for {pid}")


def host_values() -> dict[str, object]:
    return {"irqs": irqs(), "default": DEFAULT_IRQ.read_text(), "workqueue": WORKQUEUE.read_text(),
            "shield": SHIELD.exists(), "root_cpus": (CPUSET / "cpuset.cpus").read_text()}


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A host process started before the VM (a daemon, a user's shell)."""
    p = subprocess.Popen(["sleep", "600"])
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def test_an_isolating_vm_keeps_the_host_off_its_cpu_and_gives_everything_back(
        env: Env, sleeper: subprocess.Popen[bytes]) -> None:
    if not (CPUSET / "cpuset.cpus").exists() or Path("/run/systemd/system").is_dir():
        pytest.skip("this test drives the cgroup v1 cpuset backend (a host without systemd)")
    before = host_values()
    before_allowed = allowed(sleeper.pid)
    assert not before["shield"]
    vm = env.define('<kvm:cpu policy="dedicated"/><kvm:host/>', backing="", vcpus=1)
    virsh("start", vm.name)
    (cpu,) = wait_for(lambda: ledger()["domains"][vm.uuid]["cpus"], 5, "the VM's dedicated CPU")
    wait_for(lambda: vcpupin(vm.name) == {0: str(cpu)}, 10, "the vCPU pinned to its dedicated CPU")

    # Host tasks: the process started before the VM is moved off the CPU; the VM's own vCPU is not.
    assert cpu not in allowed(sleeper.pid) and allowed(sleeper.pid) == before_allowed - {cpu}
    assert SHIELD.is_dir() and str(sleeper.pid) in (SHIELD / "tasks").read_text().split()
    # Movable IRQs and the unbound work queues avoid it; the ones the kernel refused are listed as unmovable.
    state = ledger()["isolation"]
    assert state["isolated"] == [cpu]
    unmovable = {k.removeprefix("irq:") for k in state.get("unmovable", [])}
    moved = {irq: aff for irq, aff in irqs().items() if irq in before["irqs"] and irq not in unmovable}  # type: ignore[operator]
    assert moved and all(cpu not in parse_cpuset(aff) for aff in moved.values()), moved
    assert WORKQUEUE.read_text() != before["workqueue"]
    status = run(KVMHOOKS, "status").stdout
    assert "isolated" in status and vm.name in status

    virsh("destroy", vm.name)
    wait_for(lambda: vm.uuid not in ledger()["domains"], 10, "the release")
    assert host_values() == before and allowed(sleeper.pid) == before_allowed
    assert "isolation" not in ledger() or not ledger()["isolation"]
