"""Issue 16 on the real daemon: while kvmhooksd runs it serves the prepare hook (no interpreter at `virsh start`);
a refusal reads as the hook's Python says it; a stopped agent costs a start its pickup deadline, a killed one
nothing, and the hook's Python prepares instead."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import LOG, Env, ledger, pool2m, virsh, wait_for
from tests.e2e.test_agent_e2e import agent_answers, running_agent
from tests.e2e.test_cpu_e2e import vcpupin

AGENT_LOG = Path("/tmp/kvmhooks-agent-e2e.log")  # running_agent's
PREP = Path("/run/kvmhooks/prepare")
PIN = '<kvm:vcpupin vcpu="0" cpuset="1"/>'
TOO_BIG = 64 * 1024  # MiB of huge pages: more than this host has


def tail(path: Path, start: int) -> str:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read().decode(errors="replace")


def size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def refusal(name: str) -> str:
    """The kvmhooks line of a start that prepare refuses (virsh adds libvirt's own words around it), its
    figures masked: free memory moves between two starts."""
    res = virsh("start", name, check=False)
    assert res.returncode != 0
    lines = [line[line.index("kvmhooks: VM"):] for line in res.stderr.splitlines() if "kvmhooks: VM" in line]
    assert len(lines) == 1, res.stderr
    return re.sub(r"[0-9]+", "#", lines[0])


def prepared_by(vm_uuid: str, log: str) -> bool:
    return any(vm_uuid in line and "CPUs:" in line for line in log.splitlines())


@pytest.fixture(autouse=True)
def no_other_agent() -> None:
    if agent_answers():
        pytest.skip("a kvmhooksd runs on this host (demo.sh starts one)")


def test_kvmhooksd_serves_prepare_and_refuses_as_the_hook_does(env: Env) -> None:
    vm = env.define(PIN, backing="")
    big = env.define('<kvm:hugepages size="2M"/>', memory_mib=TOO_BIG)
    pool = pool2m()
    without_agent = refusal(big.name)  # (the hook's Python)
    agent_at, log_at = size(AGENT_LOG), size(LOG)
    with running_agent():
        virsh("start", vm.name)
        with_agent = refusal(big.name)
        agent_log, hook_log = tail(AGENT_LOG, agent_at), tail(LOG, log_at)
        assert os.listdir(PREP) == ["requests"]  # nothing left of either exchange
    # The agent's log has the prepare (its "CPUs:" line), the hook's log has none: no Python ran it.
    assert prepared_by(vm.uuid, agent_log) and not prepared_by(vm.uuid, hook_log)
    assert vm.uuid in ledger()["domains"]
    assert with_agent == without_agent and "not enough memory for huge pages" in with_agent
    assert big.name in agent_log and big.uuid not in ledger()["domains"] and pool2m() == pool


def test_a_stopped_agent_delays_a_start_by_its_pickup_deadline_and_a_killed_one_not_at_all(env: Env) -> None:
    stopped, killed = env.define(PIN, backing=""), env.define(PIN, backing="")
    log_at = size(LOG)
    with running_agent() as agent:
        os.kill(agent.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            virsh("start", stopped.name)
            took = time.monotonic() - t0
        finally:
            os.kill(agent.pid, signal.SIGCONT)
        assert 1.0 <= took < 10
        agent.kill()
        agent.wait(10)
        virsh("start", killed.name)  # its lock went with it: the shell does not even ask
        assert set(os.listdir(PREP)) <= {"requests"}  # (a killed agent leaves its FIFO; the next one replaces it)
    hook_log = tail(LOG, log_at)
    assert prepared_by(stopped.uuid, hook_log) and prepared_by(killed.uuid, hook_log)  # the hook's Python
    assert {stopped.uuid, killed.uuid} <= set(ledger()["domains"])


def released_by(vm_uuid: str, log: str) -> bool:
    return any(vm_uuid in line and "released" in line for line in log.splitlines())


def test_kvmhooksd_serves_the_stop_and_lets_the_shared_vm_back_over_its_own_connection(env: Env) -> None:
    """`virsh destroy` of a dedicated VM while kvmhooksd runs: the release is the agent's (no Python in the
    hook), the ledger forgets the VM, and the shared VM floats over the CPU it gave back, as a user sees in
    `virsh vcpupin`."""
    s = env.define('<kvm:cpu policy="shared"/>', vcpus=1, backing="")
    d = env.define('<kvm:cpu policy="dedicated"/>', vcpus=1, backing="")
    agent_at, log_at = size(AGENT_LOG), size(LOG)
    with running_agent():
        virsh("start", s.name)
        wait_for(lambda: vcpupin(s.name).get(0) == "0-1", 10, "the shared VM on the whole pool")
        virsh("start", d.name)
        mine = wait_for(lambda: vcpupin(d.name).get(0) if vcpupin(d.name).get(0) in ("0", "1") else None, 10,
                        "d's pin")
        wait_for(lambda: vcpupin(s.name).get(0) == ("1" if mine == "0" else "0"), 10, "the shared VM off d's CPU")
        virsh("destroy", d.name)
        assert d.uuid not in ledger()["domains"]  # released before virsh returned
        wait_for(lambda: vcpupin(s.name).get(0) == "0-1", 10, "the shared VM back on the whole pool")
        agent_log, hook_log = tail(AGENT_LOG, agent_at), tail(LOG, log_at)
        assert os.listdir(PREP) == ["requests"]
    assert released_by(d.uuid, agent_log) and not released_by(d.uuid, hook_log)
