"""kvmhooksd on the real daemon: a start is tuned by the agent (no worker), a live annotation edit moves a pin,
an invalid edit keeps the old pin and says why, and with the agent stopped the worker still tunes."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Env, ledger, run, virsh, wait_for
from tests.e2e.test_cpu_e2e import vcpupin

KVMHOOKS = "/usr/local/bin/kvmhooks"
SOCKET = Path("/run/kvmhooks/agent.sock")
NS = "http://kvmhooks.org/xmlns/domain/1.0"


@pytest.fixture
def agent(env: Env) -> Iterator[subprocess.Popen[bytes]]:
    out = open("/tmp/kvmhooks-agent-e2e.log", "wb")
    p = subprocess.Popen([KVMHOOKS, "agent", "--log-stderr"], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(SOCKET.exists, 10, "the agent's socket")
        yield p
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
        out.close()


def test_the_agent_tunes_a_start_and_follows_a_live_annotation_edit(env: Env, agent: subprocess.Popen[bytes]) -> None:
    vm = env.define('<kvm:vcpupin vcpu="0" cpuset="1"/><kvm:vcpupin vcpu="1" cpuset="0"/>', backing="")
    virsh("start", vm.name)
    t0 = time.monotonic()
    wait_for(lambda: vcpupin(vm.name) == {0: "1", 1: "0"}, 2, "pins from the agent")
    pinned_after = time.monotonic() - t0
    rec = wait_for(lambda: ledger()["domains"][vm.uuid]["applied"].get("tuned_by"), 5, "the agent's record")
    assert rec == "agent" and ledger()["domains"][vm.uuid]["applied"]["worker_pid"] == agent.pid
    assert pinned_after < 2
    # A live edit of the annotation (virsh metadata --live, what virt-manager's XML tab does on a running VM).
    virsh("metadata", vm.name, "--uri", NS, "--key", "kvm", "--live", "--set",
          '<tuning><vcpupin vcpu="0" cpuset="0"/><vcpupin vcpu="1" cpuset="1"/></tuning>')
    wait_for(lambda: vcpupin(vm.name) == {0: "0", 1: "1"}, 2, "the pins to follow the live annotation")
    # An invalid edit: refused into the log and status, the previous pins stay.
    virsh("metadata", vm.name, "--uri", NS, "--key", "kvm", "--live", "--set",
          '<tuning><vcpupin vcpu="0" cpuset="4000"/></tuning>')
    status = wait_for(lambda: "not applied" in (out := run(KVMHOOKS, "status", vm.name).stdout) and out, 5,
                      "the refusal in kvmhooks status")
    assert "4000" in status and vcpupin(vm.name) == {0: "0", 1: "1"}


def agent_answers() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(SOCKET))
        return True
    except OSError:
        return False


def test_without_the_agent_the_worker_still_tunes(env: Env) -> None:
    if agent_answers():
        pytest.skip("a kvmhooksd runs on this host (demo.sh starts one)")
    vm = env.define('<kvm:vcpupin vcpu="0" cpuset="1"/>', backing="")
    virsh("start", vm.name)
    wait_for(lambda: vcpupin(vm.name).get(0) == "1", 5, "pins from the worker")
    assert wait_for(lambda: ledger()["domains"][vm.uuid]["applied"].get("tuned_by"), 5, "the record") == "worker"
