"""kvmhooksd on the real daemon: a start is tuned by the agent (no worker), a live annotation edit moves a pin,
an invalid edit keeps the old pin and says why, and with the agent stopped the worker still tunes."""

from __future__ import annotations

import contextlib
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import CONFIG, LOG, TEST_CONFIG, Env, ledger, run, virsh, wait_for
from tests.e2e.test_cpu_e2e import vcpupin

KVMHOOKS = "/usr/local/bin/kvmhooks"
SOCKET = Path("/run/kvmhooks/agent.sock")
PID_FILE = Path("/run/kvmhooks/agent.pid")
NS = "http://kvmhooks.org/xmlns/domain/1.0"


@contextlib.contextmanager
def running_agent() -> Iterator[subprocess.Popen[bytes]]:
    """kvmhooksd as installed, in the foreground, its log in /tmp; stopped with SIGTERM."""
    with open("/tmp/kvmhooks-agent-e2e.log", "ab") as out:
        p = subprocess.Popen([KVMHOOKS, "agent", "--log-stderr"], stdout=out, stderr=subprocess.STDOUT)
        try:  # serving once its pid file names it (one agent per host: another one running makes it refuse)
            wait_for(lambda: p.poll() is not None or PID_FILE.read_text().strip() == str(p.pid)
                     if PID_FILE.exists() else p.poll() is not None, 10, "the agent's pid file")
            assert p.poll() is None, "kvmhooksd refused to start: see /tmp/kvmhooks-agent-e2e.log"
            yield p
        finally:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def agent(env: Env) -> Iterator[subprocess.Popen[bytes]]:
    with running_agent() as p:
        yield p


@contextlib.contextmanager
def config(extra: str) -> Iterator[None]:
    CONFIG.write_text(extra + TEST_CONFIG)  # top-level keys before [cpu]
    try:
        yield
    finally:
        CONFIG.write_text(TEST_CONFIG)


def test_the_agent_tunes_a_start_and_follows_a_live_annotation_edit(env: Env, agent: subprocess.Popen[bytes]) -> None:
    vm = env.define('<kvm:vcpupin vcpu="0" cpuset="1"/><kvm:vcpupin vcpu="1" cpuset="0"/>', backing="")
    virsh("start", vm.name)
    t0 = time.monotonic()
    wait_for(lambda: vcpupin(vm.name) == {0: "1", 1: "0"}, 2, "pins from the agent")
    pinned_after = time.monotonic() - t0
    rec = wait_for(lambda: ledger()["domains"][vm.uuid]["applied"].get("tuned_by"), 5, "the agent's record")
    assert rec == "agent" and ledger()["domains"][vm.uuid]["applied"]["worker_pid"] == agent.pid
    assert pinned_after < 2
    # The started hook handed it over without Python (hooks/qemu left handoff/UUID): Python would have said
    # "handed to kvmhooksd" in the log.
    assert not [line for line in LOG.read_text().splitlines() if vm.uuid in line and "started:" in line]
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


def test_a_hand_pin_is_restored_and_the_metrics_show_the_pins(env: Env) -> None:
    with config('drift = "restore"\nmetrics_listen = "127.0.0.1:9765"\n'), running_agent():
        vm = env.define('<kvm:hugepages size="2M"/><kvm:vcpupin vcpu="0" cpuset="1"/>'
                        '<kvm:vcpupin vcpu="1" cpuset="0"/>')
        virsh("start", vm.name)
        wait_for(lambda: ledger()["domains"][vm.uuid]["state"] == "running", 5, "the agent's tuning")
        virsh("vcpupin", vm.name, "0", "0")  # the admin, by hand
        wait_for(lambda: "restored" in run(KVMHOOKS, "status", vm.name).stdout, 5, "the drift report")
        assert vcpupin(vm.name) == {0: "1", 1: "0"}  # the planned pin is back
        assert "changed by hand: vCPU 0 on 0 (planned 1); restored" in run(KVMHOOKS, "status", vm.name).stdout
        scrape = urllib.request.urlopen("http://127.0.0.1:9765/metrics", timeout=5).read().decode()
        assert f'kvmhooks_vm_vcpu_pin{{cpuset="1",uuid="{vm.uuid}",vcpu="0",vm="{vm.name}"}} 1.0' in scrape
        # The pages: what the VM holds (the ledger) and the pool as /sys shows it, in the same scrape.
        (key, pages), = ledger()["domains"][vm.uuid]["hugepages"].items()
        node = key.split("/")[0].removeprefix("node")
        pool = Path(f"/sys/devices/system/node/node{node}/hugepages/hugepages-2048kB/nr_hugepages")
        labels = f'node="{node}",page_size_bytes="2097152"'
        assert f'kvmhooks_vm_hugepages_pages{{{labels},uuid="{vm.uuid}",vm="{vm.name}"}} {float(pages)}' in scrape
        assert f"kvmhooks_hugepages_nr_pages{{{labels}}} {float(pool.read_text())}" in scrape


def test_a_libvirtd_restart_leaves_vms_running_and_the_agent_reconnected(env: Env,
                                                                        agent: subprocess.Popen[bytes]) -> None:
    from tests.e2e.conftest import domstate, start_libvirtd, stop_daemon

    a = env.define('<kvm:vcpupin vcpu="0" cpuset="1"/>', backing="")
    virsh("start", a.name)
    wait_for(lambda: ledger()["domains"][a.uuid]["applied"].get("tuned_by") == "agent", 5, "the first VM tuned")
    stop_daemon("libvirtd")
    start_libvirtd()
    assert domstate(a.name) == "running" and agent.poll() is None
    assert "kvmhooksd: running" in run(KVMHOOKS, "status").stdout
    b = env.define('<kvm:vcpupin vcpu="0" cpuset="0"/>', backing="")
    virsh("start", b.name)  # tuned by the agent again: it reconnected and re-registered its events
    wait_for(lambda: ledger()["domains"][b.uuid]["applied"].get("tuned_by") == "agent", 20, "the agent back")
    assert vcpupin(b.name)[0] == "0"


def test_annotate_live_retunes_a_running_vm(env: Env, agent: subprocess.Popen[bytes]) -> None:
    vm = env.define('<kvm:vcpupin vcpu="0" cpuset="1"/><kvm:vcpupin vcpu="1" cpuset="0"/>', backing="")
    virsh("start", vm.name)
    wait_for(lambda: vcpupin(vm.name) == {0: "1", 1: "0"}, 5, "the first pins")
    res = run(KVMHOOKS, "annotate", vm.name, "--pin", "0,1", "--live", check=False)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert '<kvm:vcpupin vcpu="0" cpuset="0"/>' in out
    wait_for(lambda: vcpupin(vm.name) == {0: "0", 1: "1"}, 3, "the pins to follow annotate --live")


def test_a_live_switch_from_shared_to_dedicated_reserves_and_pins(env: Env, agent: subprocess.Popen[bytes]) -> None:
    """virsh metadata --live turning a shared VM dedicated: the agent reserves a CPU in the ledger under
    prepare's rules and pins the vCPU there; back to shared frees it and the vCPU floats again."""
    vm = env.define('<kvm:cpu policy="shared"/>', backing="", vcpus=1)
    virsh("start", vm.name)
    wait_for(lambda: ledger()["domains"][vm.uuid]["state"] == "running", 5, "the agent's tuning")
    rec = ledger()["domains"][vm.uuid]
    assert rec["shared"] and rec["cpus"] == []
    virsh("metadata", vm.name, "--uri", NS, "--key", "kvm", "--live", "--set",
          '<tuning><cpu policy="dedicated"/></tuning>')
    held = wait_for(lambda: ledger()["domains"][vm.uuid]["cpus"], 2, "a dedicated CPU in the ledger")
    assert len(held) == 1 and not ledger()["domains"][vm.uuid]["shared"]
    wait_for(lambda: vcpupin(vm.name) == {0: str(held[0])}, 2, "the vCPU pinned to its dedicated CPU")
    virsh("metadata", vm.name, "--uri", NS, "--key", "kvm", "--live", "--set",
          '<tuning><cpu policy="shared"/></tuning>')
    wait_for(lambda: ledger()["domains"][vm.uuid]["shared"] and not ledger()["domains"][vm.uuid]["cpus"], 2,
             "the CPU given back")
    wait_for(lambda: vcpupin(vm.name) == {0: "0-1"}, 2, "the vCPU floating over the shared pool again")


@pytest.mark.parametrize("by", ["agent", "worker"])
def test_a_vm_started_paused_is_pinned_at_once_and_ballooned_when_resumed(env: Env, by: str) -> None:
    """`virsh start --paused` (OpenStack's start, every incoming migration): the pins land while the domain
    is still paused; the balloon waits for `virsh resume`, then lands, and the pins stay."""
    from tests.e2e.conftest import dommemstat, domstate

    if by == "worker" and agent_answers():
        pytest.skip("a kvmhooksd runs on this host (demo.sh starts one)")
    with running_agent() if by == "agent" else contextlib.nullcontext():
        vm = env.define('<kvm:vcpus live="2"/><kvm:vcpupin vcpu="0" cpuset="1"/><kvm:vcpupin vcpu="1" cpuset="0"/>'
                        '<kvm:memtune hard_limit="1G"/><kvm:balloon target="192M"/>', backing="", vcpus=3,
                        vcpu_current=1)

        def pins() -> dict[int, str]:  # (vCPU 2, offline and unpinned, is listed too)
            return {v: cs for v, cs in vcpupin(vm.name).items() if v < 2}

        virsh("start", "--paused", vm.name)
        t0 = time.monotonic()
        wait_for(lambda: pins() == {0: "1", 1: "0"}, 3, "pins on the paused domain")
        pinned_after = time.monotonic() - t0
        rec = wait_for(lambda: (r := ledger()["domains"][vm.uuid])["state"] == "running" and r, 5, "the record")
        assert rec["applied"]["tuned_by"] == by and rec["error"] is None
        # The vCPU count and memtune too, read back from libvirt while the domain is paused.
        assert rec["applied"]["vcpus_live"] == 2 and rec["applied"]["memtune"] == {"hard_limit": 1048576}
        assert "hard_limit     : 1048576" in virsh("memtune", vm.name).stdout
        assert domstate(vm.name) == "paused" and "balloon" not in rec["applied"]
        time.sleep(1)
        assert dommemstat(vm.name)["actual"] == 262144  # a paused guest's balloon is left alone
        virsh("resume", vm.name)
        landed = wait_for(lambda: ledger()["domains"][vm.uuid]["applied"].get("balloon"), 60, "the balloon")
        assert landed["target"] == 196608 and dommemstat(vm.name)["actual"] == 196608
        assert pins() == {0: "1", 1: "0"} and domstate(vm.name) == "running"
        print(f"pins on the paused domain {pinned_after:.3f} s after virsh start --paused returned ({by})")


@pytest.mark.parametrize("by", ["agent", "worker"])
def test_a_vm_restored_paused_is_tuned_while_paused(env: Env, by: str) -> None:
    """`virsh restore --paused` leaves the domain paused for "migration" (libvirt's reason for every start with an
    incoming stream) with no job left: it was taken for a migration still running and tuned only once resumed
    (the worker gave up and recorded a failure). Now pinned while paused; the balloon waits for the resume."""
    from tests.e2e.conftest import domstate

    if by == "worker" and agent_answers():
        pytest.skip("a kvmhooksd runs on this host (demo.sh starts one)")
    with running_agent() if by == "agent" else contextlib.nullcontext():
        vm = env.define('<kvm:vcpupin vcpu="0" cpuset="1"/><kvm:vcpupin vcpu="1" cpuset="0"/>', backing="")
        virsh("start", vm.name)
        wait_for(lambda: ledger()["domains"][vm.uuid]["state"] == "running", 10, "the first start's tuning")
        image = Path(f"/tmp/kvmhooks-e2e-{vm.name}.save")
        try:
            virsh("save", vm.name, str(image))
            virsh("restore", "--paused", str(image))
        finally:
            image.unlink(missing_ok=True)
        t0 = time.monotonic()
        assert virsh("domstate", "--reason", vm.name).stdout.strip() == "paused (migrating)"
        assert "None" in virsh("domjobinfo", vm.name).stdout  # (no job holds it: "Job type: None")
        rec = wait_for(lambda: (r := ledger()["domains"][vm.uuid])["state"] == "running" and r, 8,
                       "the tuning of the domain restored paused")
        tuned_after = time.monotonic() - t0
        assert rec["applied"]["tuned_by"] == by and rec["error"] is None and domstate(vm.name) == "paused"
        assert vcpupin(vm.name) == {0: "1", 1: "0"}
        virsh("resume", vm.name)
        assert domstate(vm.name) == "running"
        print(f"restored paused: tuned {tuned_after:.2f} s after virsh restore --paused returned ({by})")
