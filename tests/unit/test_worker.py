"""The detached worker, against libvirt's test:/// driver with a per-test XML file."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmhooks.ledger import Ledger
from tests.fakehost import FakeHost, domain_xml
from tests.unit.test_hook import hook, write_config

U1 = "11111111-2222-3333-4444-000000000001"
LIVE = '<kvm:hugepages size="2M"/><kvm:vcpupin vcpu="0" cpuset="1"/>'  # something to apply after start
MEMTUNE = '<kvm:hugepages size="2M"/><kvm:memtune hard_limit="1G"/>'


def node_xml(host: FakeHost, runstate: int = 1, tuning: str = "") -> str:
    """A test:/// node with one domain (annotated with ``tuning``); runstate 1 = running, 3 = paused."""
    node = host.root / "node.xml"
    meta = (f'<metadata><kvm:tuning xmlns:kvm="http://kvmhooks.org/xmlns/domain/1.0">{tuning}</kvm:tuning>'
            "</metadata>" if tuning else "")
    node.write_text(f"""<node>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>vm1</name><uuid>{U1}</uuid>{meta}<memory>262144</memory><vcpu>2</vcpu>
    <os><type>hvm</type></os><devices><memballoon model='virtio'/></devices><test:runstate>{runstate}</test:runstate>
  </domain>
</node>""")
    return f"test://{node}"


def ledger(host: FakeHost) -> dict:  # type: ignore[type-arg]
    from kvmhooks.ledger import Ledger

    return Ledger(host.root / "run/ledger.json").read().as_dict()


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
    cfg = write_config(host, libvirt_uri=f'"{node_xml(host, tuning=MEMTUNE)}"')
    xml = domain_xml(uuid=U1, tuning=MEMTUNE)
    assert hook(cfg, "vm1", "prepare", xml).returncode == 0
    r = hook(cfg, "vm1", "started", xml)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    rec = wait_ledger(host, lambda r: r.get("state") == "running" or r.get("error"))
    applied = rec["applied"]
    assert rec["error"] is None and applied["worker_pid"] > 0
    # own session, and not its leader (double fork)
    assert applied["worker_sid"] not in (os.getsid(0), applied["worker_pid"])
    # It applied the live XML's memtune and read it back from libvirt (the test driver keeps it).
    assert applied["memtune"] == {"hard_limit": 1048576}


def test_the_worker_pins_what_the_ledger_planned(host: FakeHost) -> None:
    """libvirt's test driver refuses live pins ("unsupported flags"): the worker must have tried exactly the
    planned pin and said so, not passed with nothing applied."""
    pytest.importorskip("libvirt")
    cfg = write_config(host, libvirt_uri=f'"{node_xml(host, tuning=LIVE)}"')
    xml = domain_xml(uuid=U1, tuning=LIVE)
    assert hook(cfg, "vm1", "prepare", xml).returncode == 0
    assert hook(cfg, "vm1", "started", xml).returncode == 0
    rec = wait_ledger(host, lambda r: r.get("error"))
    assert "vcpupin 0 1" in rec["error"] and "unsupported flags" in rec["error"]
    status = (host.root / "run/failures" / U1).read_text()  # kvmhooks status shows it
    assert "worker" in status and "vcpupin 0 1" in status


def test_worker_is_detached_from_the_hooks_pipes(host: FakeHost) -> None:
    """A worker waiting on a domain that never runs must not keep the hook (and so virsh start) waiting. The
    domain started paused is tuned at once (memtune, read back from libvirt's test driver); only its balloon
    waits for it to run, bounded by worker_timeout."""
    pytest.importorskip("libvirt")
    tuning = MEMTUNE + '<kvm:balloon target="200M" transport="libvirt"/>'
    cfg = write_config(host, libvirt_uri=f'"{node_xml(host, runstate=3, tuning=tuning)}"', worker_timeout="2")
    xml = domain_xml(uuid=U1, tuning=tuning)
    assert hook(cfg, "vm1", "prepare", xml).returncode == 0
    t0 = time.monotonic()
    r = hook(cfg, "vm1", "started", xml)  # capture_output: returns only when every pipe holder is gone
    hook_seconds = time.monotonic() - t0
    assert r.returncode == 0 and r.stdout == b""
    assert hook_seconds < 1.5  # the worker itself takes its full 2 s deadline (below)
    rec = wait_ledger(host, lambda r: r.get("state") == "running" or r.get("error"))
    assert rec["error"] is None and rec["applied"]["memtune"] == {"hard_limit": 1048576}  # while paused
    failures = host.root / "run/failures" / U1
    deadline = time.monotonic() + 20
    while not failures.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "balloon: not set: the domain was not running after 2 s" in failures.read_text()


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


# --- the worker forked at prepare (worker.fork_waiting): warm, and no interpreter at started ----------------

LIVE_ONLY = '<kvm:memtune hard_limit="1G"/>'  # live work the test driver takes (it refuses live pins)


def holders(marker: Path) -> set[int]:
    """The processes with the tune/ marker open (the worker forked at prepare holds it locked)."""
    found = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd).startswith(str(marker)):
                        found.add(int(fd_dir.parent.name))
    return found


def wait_gone(pids: set[int], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{p}").exists() for p in pids):
        assert time.monotonic() < deadline, f"still running: {pids}"
        time.sleep(0.05)


def test_prepare_forks_the_worker_and_the_shells_started_starts_no_interpreter(host: FakeHost,
                                                                               tmp_path: Path) -> None:
    """The prepare hook forks the worker (detached, its own session) with the run's tune/ marker locked; the
    shell's started hook sees the lock, runs no Python and starts no worker; the forked one, waiting for the
    up/ marker the shell left, tunes the VM."""
    pytest.importorskip("libvirt")
    from tests.unit.test_start_fast import Shell

    cfg = write_config(host, libvirt_uri=f'"{node_xml(host, tuning=LIVE_ONLY)}"')
    xml = domain_xml(uuid=U1, tuning=LIVE_ONLY, backing="")
    assert hook(cfg, "vm1", "prepare", xml).returncode == 0
    marker = host.root / "run/tune" / U1
    (forked,) = holders(marker)
    assert Ledger(host.root / "run/ledger.json").tuning_taken(U1)
    assert os.getsid(forked) not in (os.getsid(0), forked)  # detached: its own session, not its leader
    sh = Shell(host, tmp_path)
    sh.env["KVMHOOKS_CONFIG"] = str(cfg)  # (the same state directory as the hook's built-in one: the shell decides)
    assert not sh.started(xml) and sh.worker(wait=0.3) is None
    rec = wait_ledger(host, lambda r: r.get("state") == "running" or r.get("error"))
    assert rec["applied"]["worker_pid"] == forked and rec["applied"]["memtune"] == {"hard_limit": 1048576}
    assert "started: detached worker spawned" not in (host.root / "kvmhooks.log").read_text()


def test_a_started_hook_handed_to_python_leaves_the_vm_to_the_forked_worker(host: FakeHost) -> None:
    """A configured state directory sends started to Python: it leaves the up/ marker the worker waits for,
    and spawns no second worker."""
    pytest.importorskip("libvirt")
    cfg = write_config(host, libvirt_uri=f'"{node_xml(host, tuning=LIVE_ONLY)}"')
    xml = domain_xml(uuid=U1, tuning=LIVE_ONLY, backing="")
    assert hook(cfg, "vm1", "prepare", xml).returncode == 0
    (forked,) = holders(host.root / "run/tune" / U1)
    assert hook(cfg, "vm1", "started", xml).returncode == 0
    rec = wait_ledger(host, lambda r: r.get("state") == "running" or r.get("error"))
    assert rec["error"] is None and rec["applied"]["worker_pid"] == forked
    log = (host.root / "kvmhooks.log").read_text()
    assert "tuned by the worker its prepare forked" in log and "detached worker spawned" not in log


def test_the_forked_worker_leaves_when_its_run_is_over(host: FakeHost) -> None:
    """A start that failed after prepare: the stop releases the VM (its marker goes) and the worker leaves; a
    next prepare makes a new marker, and only the new run's worker holds it."""
    cfg = write_config(host, libvirt_uri='"test:///nonexistent"')
    xml = domain_xml(uuid=U1, tuning=LIVE_ONLY, backing="")
    marker = host.root / "run/tune" / U1
    assert hook(cfg, "vm1", "prepare", xml).returncode == 0
    first = holders(marker)
    assert hook(cfg, "vm1", "prepare", xml).returncode == 0  # (libvirtd killed before its stop hooks)
    wait_gone(first)
    second = holders(marker)
    assert len(second) == 1 and second != first
    assert hook(cfg, "vm1", "release", xml, "end").returncode == 0
    wait_gone(second)
    assert not (host.root / "run/failures" / U1).exists()  # nothing tuned, nothing failed


def test_a_forked_worker_past_its_wait_leaves_the_start_to_the_started_hook(host: FakeHost,
                                                                            tmp_path: Path) -> None:
    """QEMU took longer than worker_timeout to start: the forked worker leaves (unlocking the marker), and the
    shell's started starts a worker as it would without one."""
    from tests.unit.test_start_fast import Shell

    cfg = write_config(host, libvirt_uri='"test:///nonexistent"', worker_timeout="0.5")
    xml = domain_xml(uuid=U1, tuning=LIVE_ONLY, backing="")
    assert hook(cfg, "vm1", "prepare", xml).returncode == 0
    wait_gone(holders(host.root / "run/tune" / U1))
    assert not Ledger(host.root / "run/ledger.json").tuning_taken(U1)
    sh = Shell(host, tmp_path)
    assert not sh.started(xml) and sh.worker() == f"-I -m kvmhooks.worker started {U1}"


# --- review of the forked worker: a VM never left untuned -----------------------------------------------

def settled(host: FakeHost, wait: float) -> dict:  # type: ignore[type-arg]
    """The record once the VM is tuned (or failed), or as it is after ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        rec = ledger(host)["domains"][U1]
        if rec.get("state") == "running" or rec.get("error"):
            return rec  # type: ignore[no-any-return]
        time.sleep(0.05)
    return ledger(host)["domains"][U1]  # type: ignore[no-any-return]


def test_a_started_hook_in_python_leaves_up_before_it_probes(host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review: hook.run (started handed to Python) probed the lock, then left up/: a worker reaching its
    deadline in between left (no up/ yet) and nobody tuned the VM. Now up/ first, as the shell does."""
    pytest.importorskip("libvirt")
    from kvmhooks import hook as hookmod
    from kvmhooks.config import load_config

    cfg = write_config(host, libvirt_uri=f'"{node_xml(host, tuning=LIVE_ONLY)}"', worker_timeout="1")
    xml = domain_xml(uuid=U1, tuning=LIVE_ONLY, backing="")
    assert hook(cfg, "vm1", "prepare", xml).returncode == 0
    marker = host.root / "run/tune" / U1
    forked = holders(marker)
    assert len(forked) == 1
    real = Ledger.tuning_taken

    def probe_then_worker_deadline(self: Ledger, uuid: str) -> bool:
        taken = real(self, uuid)
        wait_gone(forked)  # the worker's worker_timeout ends right after the probe
        return taken

    monkeypatch.setattr(Ledger, "tuning_taken", probe_then_worker_deadline)
    hookmod.run(["hook", "vm1", "started", "begin", "-"], xml, load_config(cfg))
    rec = settled(host, 5)
    assert rec.get("state") == "running" or rec.get("error"), f"never tuned: {rec}"


def test_the_shells_started_without_held_markers_still_leaves_up_for_the_worker(host: FakeHost, tmp_path: Path) -> None:
    """Review: held/ out of use (Ledger._retire after an OSError, or _make_marker_dir failing): the shell's
    started wrote no up/ marker (it was gated on held/UUID) but still trusted the lock and exited; the forked
    worker waited for up/ until worker_timeout and left, and nobody tuned the VM."""
    pytest.importorskip("libvirt")
    from tests.unit.test_start_fast import Shell

    cfg = write_config(host, libvirt_uri=f'"{node_xml(host, tuning=LIVE_ONLY)}"', worker_timeout="2")
    xml = domain_xml(uuid=U1, tuning=LIVE_ONLY, backing="")
    assert hook(cfg, "vm1", "prepare", xml).returncode == 0
    led = Ledger(host.root / "run/ledger.json")
    assert len(holders(led.tune_dir / U1)) == 1
    shutil.rmtree(led.held_dir)  # as _retire(held_dir) leaves it until the next commit
    sh = Shell(host, tmp_path)
    sh.env["KVMHOOKS_CONFIG"] = str(cfg)
    assert not sh.started(xml)
    spawned = sh.worker(wait=0.3)
    rec = settled(host, 5)
    assert spawned is not None or rec.get("state") == "running" or rec.get("error"), \
        f"never tuned: up/ marker: {(led.up_dir / U1).exists()}, record {rec}"
