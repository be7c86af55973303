"""The detached worker, against libvirt's test:/// driver with a per-test XML file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.fakehost import FakeHost, domain_xml
from tests.unit.test_hook import hook, write_config

U1 = "11111111-2222-3333-4444-000000000001"
LIVE = '<kvm:hugepages size="2M"/><kvm:vcpupin vcpu="0" cpuset="1"/>'  # something to apply after start


def node_xml(host: FakeHost, runstate: int = 1) -> str:
    """A test:/// node with one domain; runstate 1 = running, 3 = paused (virDomainState)."""
    node = host.root / "node.xml"
    node.write_text(f"""<node>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>vm1</name><uuid>{U1}</uuid><memory>262144</memory><vcpu>2</vcpu>
    <os><type>hvm</type></os><test:runstate>{runstate}</test:runstate>
  </domain>
</node>""")
    return f"test://{node}"


def ledger(host: FakeHost) -> dict:  # type: ignore[type-arg]
    return json.loads((host.root / "run/ledger.json").read_text())  # type: ignore[no-any-return]


def wait_ledger(host: FakeHost, pred, timeout: float = 20) -> dict:  # type: ignore[no-untyped-def,type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = ledger(host)["domains"].get(U1, {})
        if pred(rec):
            return rec  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise AssertionError(f"ledger never satisfied the condition: {ledger(host)}")


def test_started_spawns_a_worker_that_talks_to_libvirt(host: FakeHost) -> None:
    pytest.importorskip("libvirt")
    cfg = write_config(host, libvirt_uri=f'"{node_xml(host)}"')
    xml = domain_xml(uuid=U1, tuning=LIVE)
    assert hook(cfg, "vm1", "prepare", xml).returncode == 0
    r = hook(cfg, "vm1", "started", xml)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    rec = wait_ledger(host, lambda r: r.get("state") == "running")
    worker = rec["applied"]["worker"]
    assert worker["pid"] > 0 and rec["error"] is None
    assert worker["sid"] not in (os.getsid(0), worker["pid"])  # own session, and not its leader (double fork)


def test_worker_is_detached_from_the_hooks_pipes(host: FakeHost) -> None:
    """A worker waiting on a domain that never runs must not keep the hook (and so virsh start) waiting."""
    pytest.importorskip("libvirt")
    cfg = write_config(host, libvirt_uri=f'"{node_xml(host, runstate=3)}"', worker_timeout="2")
    xml = domain_xml(uuid=U1, tuning=LIVE)
    assert hook(cfg, "vm1", "prepare", xml).returncode == 0
    t0 = time.monotonic()
    r = hook(cfg, "vm1", "started", xml)  # capture_output: returns only when every pipe holder is gone
    hook_seconds = time.monotonic() - t0
    assert r.returncode == 0 and r.stdout == b""
    assert hook_seconds < 1.5  # the worker itself takes its full 2 s deadline (below)
    rec = wait_ledger(host, lambda r: r.get("error"))
    assert "not running after 2 s" in rec["error"]


def test_no_worker_when_there_is_nothing_to_apply_live(host: FakeHost) -> None:
    cfg = write_config(host, libvirt_uri='"test:///nonexistent"')  # a worker would fail to connect
    xml = domain_xml(uuid=U1)  # huge pages only
    assert hook(cfg, "vm1", "prepare", xml).returncode == 0
    assert hook(cfg, "vm1", "started", xml).returncode == 0
    time.sleep(0.5)
    rec = ledger(host)["domains"][U1]
    assert rec["state"] == "running" and rec["error"] is None and rec["applied"] == {}


def test_worker_usage_errors() -> None:
    r = subprocess.run([sys.executable, "-m", "kvmhooks.worker", "started", "../../etc"], capture_output=True)
    assert r.returncode == 2 and b"usage" in r.stderr
