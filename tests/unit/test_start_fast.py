"""Issue "A tuned VM starts as fast as a plain one": Python runs only where there is work.

prepare leaves a tune/ marker for a VM whose started hook has work (live tuning, or borrowed pages to count as
mapped); hooks/qemu ends a started without one at once, and hands one with a marker to kvmhooksd without
Python while the agent holds its lock (an empty handoff/UUID the agent takes at the STARTED event).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmhooks import operations, worker
from kvmhooks.agent import HANDOFF_DIR, LOCK_NAME, Agent
from kvmhooks.config import load_config
from kvmhooks.domain import parse_domain
from kvmhooks.ledger import Ledger
from tests.fakehost import FakeHost, domain_xml
from tests.unit.test_hook import HOOK, hook, hook_env, hook_with_state, prepare_unforked, write_config
from tests.unit.test_worker import holders, wait_gone

libvirt = pytest.importorskip("libvirt")
U1 = "11111111-2222-3333-4444-000000000001"
U2 = "11111111-2222-3333-4444-000000000002"
HP_ONLY = '<kvm:hugepages size="2M"/>'
PINNED = '<kvm:hugepages size="2M"/><kvm:vcpupin vcpu="0" cpuset="1"/>'


def tune_dir(host: FakeHost) -> Path:
    return Ledger(host.root / "run/ledger.json").tune_dir


class Shell:
    """hooks/qemu on its default-config path (the shell decides alone), with a stand-in for Python."""

    def __init__(self, host: FakeHost, tmp_path: Path):
        self.state = host.root / "run"
        self.script = hook_with_state(self.state)
        self.ran = tmp_path / "python-ran"
        fake_py = tmp_path / "python"
        fake_py.write_text(f"#!/bin/sh\ncat >/dev/null; echo \"$@\" >> {self.ran}\n")
        fake_py.chmod(0o755)
        self.env = {**hook_env(tmp_path / "no-config.toml"), "KVMHOOKS_PYTHON": str(fake_py)}

    def started(self, xml: bytes) -> bool:
        """Runs the started hook; whether the hook itself ran Python (the detached worker it may start from the
        shell is :meth:`worker`'s to tell)."""
        self.ran.unlink(missing_ok=True)
        r = subprocess.run([str(self.script), "vm1", "started", "begin", "-"], input=xml, env=self.env,
                           capture_output=True, timeout=30)
        assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
        return any(" -c " in line for line in self._lines())

    def worker(self, wait: float = 3.0) -> str | None:
        """The arguments of the worker the shell started (it runs in the background), or None."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            found = [line for line in self._lines() if "kvmhooks.worker" in line]
            if found:
                return found[0]
            time.sleep(0.02)
        return None

    def _lines(self) -> list[str]:
        return self.ran.read_text().splitlines() if self.ran.exists() else []


@pytest.fixture
def shell(host: FakeHost, tmp_path: Path) -> Shell:
    return Shell(host, tmp_path)


@contextlib.contextmanager
def agent_lock_held(host: FakeHost) -> Iterator[None]:
    """What a running kvmhooksd looks like to the shell: its lock held, its hand-over directory there."""
    state = host.root / "run"
    (state / HANDOFF_DIR).mkdir(parents=True, exist_ok=True)
    fd = os.open(state / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        os.close(fd)


def test_a_start_with_nothing_left_for_started_costs_no_python(host: FakeHost, shell: Shell) -> None:
    """Huge pages only: prepare did everything; the started hook is the shell's alone."""
    cfg = write_config(host)
    xml = domain_xml(uuid=U1, tuning=HP_ONLY)
    assert hook(cfg, "vm1", "prepare", xml).returncode == 0
    assert tune_dir(host).is_dir() and not (tune_dir(host) / U1).exists()
    assert not shell.started(xml)


def test_a_start_with_live_work_starts_the_worker_from_the_shell_without_an_agent(host: FakeHost,
                                                                                   shell: Shell) -> None:
    """Without kvmhooksd the started hook ran Python only to fork the detached worker (≈ 65 ms of libvirt's
    wait): the shell starts the worker itself, detached, and returns. (Here no worker forked at prepare
    waits for the start: a prepare served in-process, as a worker that died would leave it.)"""
    xml = domain_xml(uuid=U1, tuning=PINNED)
    prepare_unforked(write_config(host), xml)
    assert (tune_dir(host) / U1).exists()
    assert not shell.started(xml)
    assert shell.worker() == f"-I -m kvmhooks.worker started {U1}"
    assert not (host.root / "run" / HANDOFF_DIR / U1).exists()


def test_with_the_agent_running_started_hands_the_vm_over_without_python(host: FakeHost, shell: Shell) -> None:
    """(kvmhooksd served the prepare: no worker was forked there.)"""
    xml = domain_xml(uuid=U1, tuning=PINNED)
    prepare_unforked(write_config(host), xml)
    with agent_lock_held(host):
        assert not shell.started(xml)
        assert (host.root / "run" / HANDOFF_DIR / U1).exists()
    (host.root / "run" / HANDOFF_DIR / U1).unlink()
    os.rmdir(host.root / "run" / HANDOFF_DIR)  # an agent that left no hand-over directory: Python, as before
    with agent_lock_held(host):
        os.rmdir(host.root / "run" / HANDOFF_DIR)
        assert not shell.started(xml) and shell.worker() is not None


def test_without_markers_started_goes_to_python(host: FakeHost, shell: Shell) -> None:
    """A ledger from before the tune/ markers (an upgrade while VMs run): Python decides, as before."""
    cfg = write_config(host)
    xml = domain_xml(uuid=U1, tuning=HP_ONLY)
    assert hook(cfg, "vm1", "prepare", xml).returncode == 0
    os.rmdir(tune_dir(host))
    assert shell.started(xml)


def test_an_unannotated_vm_never_starts_python_at_started(host: FakeHost, shell: Shell) -> None:
    assert not shell.started(domain_xml(uuid=U1, tuning=None, backing=""))


def test_the_marker_follows_the_annotation_and_goes_with_the_release(host: FakeHost) -> None:
    cfg = host.config()
    operations.prepare(parse_domain(domain_xml(uuid=U1, tuning=PINNED)), cfg)
    assert (tune_dir(host) / U1).exists()
    operations.prepare(parse_domain(domain_xml(uuid=U1, tuning=HP_ONLY)), cfg)  # the next start: pins gone
    assert not (tune_dir(host) / U1).exists()
    operations.prepare(parse_domain(domain_xml(uuid=U1, tuning=PINNED)), cfg)
    operations.release(U1, cfg)
    assert not (tune_dir(host) / U1).exists()


def test_borrowed_pages_leave_work_for_started(host: FakeHost) -> None:
    """Pages of a left-alone pool count as promised until started marks them mapped: that is work."""
    cfg = host.config(leave_alone=frozenset({"node0/2048kB"}))
    host.set_pool(0, 2048, 128)
    operations.prepare(parse_domain(domain_xml(uuid=U1, tuning=HP_ONLY)), cfg)
    assert (tune_dir(host) / U1).exists()


def test_a_tune_directory_made_anew_marks_every_vm_still_starting(host: FakeHost) -> None:
    """tune/ gone (out of use after a failed write) while U1 waits for its started: U2's prepare makes it
    again with a marker for U1 too; a marker too many costs a Python start, one too few a tuning."""
    cfg = host.config()
    operations.prepare(parse_domain(domain_xml(uuid=U1, tuning=HP_ONLY)), cfg)
    os.rmdir(tune_dir(host))
    operations.prepare(parse_domain(domain_xml(uuid=U2, tuning=PINNED)), cfg)
    assert sorted(os.listdir(tune_dir(host))) == [U1, U2]


class Dom:
    def __init__(self, uuid: str):
        self.uuid = uuid

    def UUIDString(self) -> str:
        return self.uuid


def test_the_agent_takes_a_hand_over_at_the_started_event_once(host: FakeHost, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    a = Agent(host.config())
    tuned: list[str] = []
    monkeypatch.setattr(a, "_spawn", lambda job, uuid: tuned.append(uuid))
    a.handoff_dir.mkdir(parents=True)
    a._lifecycle(None, Dom(U1), libvirt.VIR_DOMAIN_EVENT_STARTED, 0, None)
    assert tuned == []  # nobody handed it over: not ours
    (a.handoff_dir / U1).touch()
    a._lifecycle(None, Dom(U1), libvirt.VIR_DOMAIN_EVENT_STARTED, 0, None)
    assert tuned == [U1] and not (a.handoff_dir / U1).exists()
    a._lifecycle(None, Dom(U1), libvirt.VIR_DOMAIN_EVENT_RESUMED, 0, None)
    assert tuned == [U1]  # taken once
    (a.handoff_dir / "../../etc").mkdir(parents=True, exist_ok=True)
    a._lifecycle(None, Dom("../../etc"), libvirt.VIR_DOMAIN_EVENT_STARTED, 0, None)
    assert tuned == [U1]


def test_a_hand_over_whose_event_was_missed_is_taken_later(host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    a = Agent(host.config())
    tuned: list[str] = []
    monkeypatch.setattr(a, "_spawn", lambda job, uuid: tuned.append(uuid))
    a.handoff_dir.mkdir(parents=True)
    (a.handoff_dir / U1).touch()
    a._missed_events()
    assert tuned == []  # its event may still come
    old = (a.handoff_dir / U1).stat().st_mtime - 10
    os.utime(a.handoff_dir / U1, (old, old))
    a._missed_events()
    assert tuned == [U1] and not (a.handoff_dir / U1).exists()


def test_after_a_reconnect_a_vm_handed_over_meanwhile_is_tuned(host: FakeHost, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    cfg = host.config()
    operations.prepare(parse_domain(domain_xml(uuid=U1, tuning=PINNED)), cfg)
    operations.prepare(parse_domain(domain_xml(uuid=U2, tuning=PINNED)), cfg)

    class Conn:
        def lookupByUUIDString(self, uuid: str) -> Any:
            class D:
                def isActive(self) -> bool:
                    return uuid == U1
            return D()

    a = Agent(cfg)
    a.conn = Conn()
    a.handoff_dir.mkdir(parents=True)
    (a.handoff_dir / U1).touch()
    (a.handoff_dir / U2).touch()  # (stopped since)
    tuned: list[str] = []
    monkeypatch.setattr(a, "_spawn", lambda job, uuid: tuned.append(uuid))
    a.catch_up()
    assert tuned == [U1] and not list(a.handoff_dir.iterdir())


def test_a_second_agent_waits_out_the_shells_probe_of_the_lock(host: FakeHost) -> None:
    """The shell's `flock -n -s` probe holds the lock for an instant at every start: an agent starting at
    that instant waits for it (a bounded wait) instead of refusing."""
    from kvmhooks.agent import take_lock

    cfg = host.config()
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    probe = subprocess.Popen(["/usr/bin/flock", "-s", str(cfg.state_dir / LOCK_NAME), "sleep", "0.3"])
    try:
        subprocess.run(["sleep", "0.1"], check=True)
        fd = take_lock(cfg)
        os.close(fd)
    finally:
        probe.wait(5)


@pytest.mark.parametrize(("tuning", "commits"), [(HP_ONLY, 2), (PINNED, 2), ('<kvm:vcpupin vcpu="0" cpuset="1"/>', 1)])
def test_prepare_makes_only_the_durable_commits_crash_safety_needs(host: FakeHost, monkeypatch: pytest.MonkeyPatch,
                                                                   tuning: str, commits: int) -> None:
    """The intent with the record before any pool write (a crash during the write is rolled back), and the
    record "prepared" (the start may go on). The read-back rides with the second: a crash before it finds
    the intent and rolls back either way."""
    from kvmhooks import ledger as ledger_mod

    cfg = host.config()
    operations.prepare(parse_domain(domain_xml(uuid=U2, tuning=HP_ONLY)), cfg)  # (the ledger exists already)
    writes: list[str] = []
    real = ledger_mod.Ledger._write
    monkeypatch.setattr(ledger_mod.Ledger, "_write", lambda self, text: (writes.append(text), real(self, text))[1])
    operations.prepare(parse_domain(domain_xml(uuid=U1, tuning=tuning, backing="<hugepages/>" if "huge" in tuning
                                               else "")), cfg)
    assert len(writes) == commits


# --- review: the hand-over and the markers under failure -------------------------------------------------

class ActiveConn:
    def __init__(self, active: set[str]):
        self.active = active

    def lookupByUUIDString(self, uuid: str) -> Any:
        outer = self

        class D:
            def isActive(self) -> bool:
                return uuid in outer.active
        return D()


def test_an_agent_that_dies_after_taking_the_hand_over_is_finished_by_the_next(host: FakeHost, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch
                                                                               ) -> None:
    """The shell's path marks nothing in the ledger: an agent killed between taking handoff/UUID and its
    "running" mark left a record "prepared" that nothing looked at again (the Python hook marked "starting",
    which catch_up finds). The tune/ marker says the start had work: the next agent's catch_up finishes it."""
    xml = domain_xml(uuid=U1, tuning=PINNED)
    prepare_unforked(write_config(host), xml)
    with agent_lock_held(host):
        assert not Shell(host, tmp_path).started(xml)
        first = Agent(host.config())
        monkeypatch.setattr(first, "_spawn", lambda job, uuid: None)  # killed before its tuning thread ran
        first._lifecycle(None, Dom(U1), libvirt.VIR_DOMAIN_EVENT_STARTED, 0, None)
    assert not list(first.handoff_dir.iterdir())
    second = Agent(host.config())
    second.conn = ActiveConn({U1})
    tuned: list[str] = []
    monkeypatch.setattr(second, "_spawn", lambda job, uuid: tuned.append(uuid))
    second.catch_up()
    assert tuned == [U1]


def test_a_tune_directory_made_anew_appears_with_its_markers(host: FakeHost, tmp_path: Path) -> None:
    """tune/ was made first and filled after: a started hook in between saw the directory without its
    marker and ended without its tuning."""
    cfg = write_config(host)
    xml1 = domain_xml(uuid=U1, tuning=PINNED)
    assert hook(cfg, "vm1", "prepare", xml1).returncode == 0
    for p in tune_dir(host).iterdir():
        p.unlink()
    os.rmdir(tune_dir(host))  # out of use, U1 still waiting for its started
    shell = Shell(host, tmp_path)
    seen: list[bool] = []

    def starting() -> list[str]:  # U1's started hook runs while the directory is being made
        seen.append(shell.started(xml1))
        return [U1, U2]

    Ledger(host.root / "run/ledger.json").mark_tune(U2, True, starting)
    assert sorted(os.listdir(tune_dir(host))) == [U1, U2]
    assert seen == [True]  # no directory yet: Python decided


def test_a_probe_that_cannot_open_the_lock_is_no_proof_of_an_agent(host: FakeHost, tmp_path: Path) -> None:
    """flock(1) exits 75 (-E) on a conflict only; failing to open agent.lock (here a dangling symlink) is
    not an agent holding it: the VM goes to the detached worker, not to a hand-over nobody takes."""
    xml = domain_xml(uuid=U1, tuning=PINNED)
    prepare_unforked(write_config(host), xml)
    run = host.root / "run"
    (run / HANDOFF_DIR).mkdir()  # left by an agent that ran once
    (run / LOCK_NAME).symlink_to(run / "nowhere" / "agent.lock")
    sh = Shell(host, tmp_path)
    assert not sh.started(xml) and sh.worker() is not None
    assert not (run / HANDOFF_DIR / U1).exists()


def test_a_vm_that_started_and_died_is_released_by_reconcile_at_once(host: FakeHost, tmp_path: Path) -> None:
    """Huge pages only: its record stays "prepared" (no Python at started), and reconcile gives a prepared
    record of a VM that does not run a starting grace (it may be between prepare and QEMU). The shell's
    up/UUID says this run did start: killed without its stop hooks, it is released at once."""
    cfg = write_config(host)
    xml = domain_xml(uuid=U1, tuning=HP_ONLY)
    assert hook(cfg, "vm1", "prepare", xml).returncode == 0
    c = host.config()
    snap = {u: r.token for u, r in operations.ledger_for(c).read().domains.items()}
    out = operations.reconcile(c, {}, snap)  # prepared, not running yet: it may be starting
    assert U1 in operations.ledger_for(c).read().domains and any("starting" in a for a in out.actions)
    assert not Shell(host, tmp_path).started(xml)  # the start goes on; the shell notes it ran
    assert (Ledger(host.root / "run/ledger.json").up_dir / U1).exists()
    out = operations.reconcile(c, {}, snap)  # then QEMU died without its stop hooks
    assert U1 not in operations.ledger_for(c).read().domains and host.pool(0) == 0
    assert not (Ledger(host.root / "run/ledger.json").up_dir / U1).exists()
    assert hook(cfg, "vm1", "prepare", xml).returncode == 0  # a new run: its started has not run yet
    assert not (Ledger(host.root / "run/ledger.json").up_dir / U1).exists()


def test_held_made_anew_appears_whole(host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """held/ was made first and filled after: a stop in between saw the directory without its VM's marker
    and skipped the release (reconcile repaired it later). Now it appears with every marker in it."""
    cfg = host.config()
    for u in (U1, U2):
        operations.prepare(parse_domain(domain_xml(uuid=u, tuning=HP_ONLY)), cfg)
    led = Ledger(host.root / "run/ledger.json")
    shutil.rmtree(led.held_dir)
    seen: list[object] = []
    real_open = os.open

    def spy(path: Any, *args: Any, **kwargs: Any) -> int:
        seen.append(sorted(os.listdir(led.held_dir)) if led.held_dir.is_dir() else None)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    led.sync_markers()
    monkeypatch.undo()
    assert sorted(os.listdir(led.held_dir)) == [U1, U2]
    assert all(x is None or x == [U1, U2] for x in seen), seen


# --- a stop that changes only the ledger waits for no interpreter (Ledger.stopping_dir) ----------------------

PIN_ONLY = '<kvm:vcpupin vcpu="0" cpuset="1"/>'


def stop(shell: Shell, xml: bytes, op: str) -> bool:
    """Runs the stopped or release hook; whether the hook itself ran Python."""
    shell.ran.unlink(missing_ok=True)
    r = subprocess.run([str(shell.script), "vm1", op, "end", "-"], input=xml, env=shell.env, capture_output=True,
                       timeout=30)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    return any(" -c " in line for line in shell._lines())


def led(host: FakeHost) -> Ledger:
    return Ledger(host.root / "run/ledger.json")


def test_the_stop_of_a_vm_holding_nothing_of_the_hosts_is_left_to_the_worker(host: FakeHost, shell: Shell) -> None:
    """Pins only, no kvmhooksd: releasing its record changes nothing on the host, so neither stop hook runs
    an interpreter; the shell leaves stopping/UUID and starts the worker once, which releases it."""
    cfg = write_config(host)
    xml = domain_xml(uuid=U1, tuning=PIN_ONLY, backing="")
    assert hook(cfg, "vm1", "prepare", xml).returncode == 0
    token = led(host).read().domains[U1].token
    assert (led(host).held_dir / U1).read_text() == f"{token}\n"  # nothing of the host's: it may wait
    assert not stop(shell, xml, "stopped")
    assert shell.worker() == f"-I -m kvmhooks.worker stopped {U1}"
    assert (led(host).stopping_dir / U1).read_text() == f"{token}\n"
    assert not stop(shell, xml, "release")  # the second of the two finds the marker
    assert shell.worker(wait=0.3) is None
    assert U1 in led(host).read().domains  # (the stand-in for Python did nothing)
    assert worker.run_stopped(U1, load_config(cfg)) == 0  # what the worker the shell started runs
    assert U1 not in led(host).read().domains
    assert os.listdir(led(host).stopping_dir) == [] and not (led(host).held_dir / U1).exists()


@pytest.mark.parametrize("tuning, backing", [(HP_ONLY, "<hugepages/>"), ('<kvm:cpu policy="dedicated"/>', "")])
def test_a_vm_holding_pages_or_cpus_is_released_before_the_stop_hook_returns(host: FakeHost, shell: Shell,
                                                                             tuning: str, backing: str) -> None:
    """What a user checks right after virsh destroy (the pool, the CPUs) is back when it returns."""
    cfg = write_config(host)
    xml = domain_xml(uuid=U1, tuning=tuning, backing=backing, vcpus=1)
    assert hook(cfg, "vm1", "prepare", xml).returncode == 0
    assert (led(host).held_dir / U1).stat().st_size == 0
    assert stop(shell, xml, "stopped")
    assert shell.worker(wait=0.3) is None and os.listdir(led(host).stopping_dir) == []


@pytest.mark.parametrize("tuning, backing", [(HP_ONLY, "<hugepages/>"), (PIN_ONLY, "")])
def test_a_stop_imports_no_xml_parser(host: FakeHost, tmp_path: Path, tuning: str, backing: str) -> None:
    """A stop needs the ledger and the UUID of the XML only: lxml and the annotation parser are a third of
    the imports of a prepare. (They came in by the ledger's check of a record's governor at every load.)"""
    cfg = write_config(host)
    xml = domain_xml(uuid=U1, tuning=tuning, backing=backing, vcpus=1)
    assert hook(cfg, "vm1", "prepare", xml).returncode == 0
    py = tmp_path / "python-importtime"
    py.write_text(f"#!/bin/sh\nexec {sys.executable} -X importtime \"$@\"\n")
    py.chmod(0o755)
    r = subprocess.run([str(HOOK), "vm1", "stopped", "end", "-"], input=xml, capture_output=True, timeout=60,
                       env={**hook_env(cfg), "KVMHOOKS_PYTHON": str(py)})
    assert (r.returncode, r.stdout) == (0, b"")
    imported = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.decode().splitlines() if "|" in line]
    assert "kvmhooks.ledger" in imported  # (the release did run in this interpreter)
    assert not [m for m in imported if m.startswith("lxml") or m in ("kvmhooks.annotation", "kvmhooks.domain")]
    assert U1 not in led(host).read().domains and host.pool(0) == 0


def test_with_the_agent_running_a_stop_is_its_to_serve(host: FakeHost, shell: Shell) -> None:
    """kvmhooksd releases in milliseconds and exactly when the hook returns: the shell asks it (here there is
    no request FIFO, so the call falls back to the hook's Python), never the worker."""
    cfg = write_config(host)
    xml = domain_xml(uuid=U1, tuning=PIN_ONLY, backing="")
    assert hook(cfg, "vm1", "prepare", xml).returncode == 0
    with agent_lock_held(host):
        assert stop(shell, xml, "stopped")
    assert shell.worker(wait=0.3) is None and os.listdir(led(host).stopping_dir) == []


def test_a_deferred_stop_is_settled_by_the_vms_next_prepare_first(host: FakeHost,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The worker never ran (killed, or slower than the user's next virsh start): the next prepare, of this VM
    or any other, releases the marked VM before its own work, so the new run is not taken for a stale one."""
    cfg = host.config()
    dom = parse_domain(domain_xml(uuid=U1, tuning=PIN_ONLY, backing=""))
    first = operations.prepare(dom, cfg).record.token
    (led(host).stopping_dir / U1).write_text(f"{first}\n")  # what hooks/qemu leaves at the stop
    second = operations.prepare(dom, cfg).record
    assert second.token != first and "stale reservation" not in caplog.text
    assert led(host).read().domains[U1].token == second.token and os.listdir(led(host).stopping_dir) == []
    (led(host).stopping_dir / U1).write_text(f"{second.token}\n")
    operations.prepare(parse_domain(domain_xml(name="vm2", uuid=U2, tuning=PIN_ONLY, backing="")), cfg)
    assert set(led(host).read().domains) == {U2}


def test_a_marker_whose_release_was_committed_is_only_removed(host: FakeHost) -> None:
    """Killed between the release's commit and the marker's removal: the next session finds a marker with no
    record, removes it, and touches nothing else (the VM may be in no run at all, or its marker is older than
    any run the ledger has)."""
    cfg = host.config()
    operations.prepare(parse_domain(domain_xml(uuid=U2, tuning=PINNED)), cfg)
    before = led(host).read().as_dict(), host.pool(0)
    (led(host).stopping_dir / U1).touch()
    with operations.session(cfg) as s:
        assert s.settled == {}
    assert (led(host).read().as_dict(), host.pool(0)) == before and os.listdir(led(host).stopping_dir) == []


def test_the_held_marker_says_whether_the_record_holds_the_hosts(host: FakeHost) -> None:
    """The token goes in after the commit that makes the record light, and out before the one that makes it
    hold something: a marker is never light while the ledger says the VM holds pages or CPUs."""
    cfg = host.config()
    token = operations.prepare(parse_domain(domain_xml(uuid=U1, tuning=PIN_ONLY, backing="")), cfg).record.token
    marker = led(host).held_dir / U1
    assert marker.read_text() == f"{token}\n"
    operations.update(U1, cfg, lambda rec: setattr(rec, "cpus", [1]))
    assert marker.read_text() == ""
    operations.update(U1, cfg, lambda rec: setattr(rec, "cpus", []))
    assert marker.read_text() == f"{token}\n"
    shutil.rmtree(led(host).held_dir)  # made anew: empty markers (released at once) until a commit fills them
    operations.prepare(parse_domain(domain_xml(name="vm2", uuid=U2, tuning=PIN_ONLY, backing="")), cfg)
    assert marker.read_text() == "" and (led(host).held_dir / U2).stat().st_size > 0


def test_an_agent_coming_up_leaves_a_vm_to_the_worker_its_prepare_forked(host: FakeHost,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """kvmhooksd started between a prepare (the hook's Python, which forked the worker) and the VM's started:
    its catch-up finds the record "prepared" with a tune/ marker, but the worker holds that marker."""
    cfg = write_config(host, libvirt_uri='"test:///nonexistent"')
    xml = domain_xml(uuid=U1, tuning=PINNED)
    assert hook(cfg, "vm1", "prepare", xml).returncode == 0
    forked = holders(tune_dir(host) / U1)
    agent = Agent(host.config())
    agent.conn = ActiveConn({U1})
    tuned: list[str] = []
    monkeypatch.setattr(agent, "_spawn", lambda job, uuid: tuned.append(uuid))
    agent.catch_up()
    assert len(forked) == 1 and tuned == []
    for pid in forked:
        os.kill(pid, 9)
    wait_gone(forked)
    agent.catch_up()  # the worker died: the agent finishes it
    assert tuned == [U1]
