"""Regressions from the adversarial review of kvmhooksd, the forked worker and the held/ markers: each test
is a reproduction that failed before its fix, stating what a correct kvmhooks does."""

from __future__ import annotations

import io
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from kvmhooks import hook, operations
from kvmhooks.agent import Agent
from kvmhooks.domain import parse_domain
from kvmhooks.ledger import Applied, Ledger, LedgerState
from kvmhooks.metrics import fetch_unix
from tests.fakehost import FakeHost, domain_xml
from tests.unit.test_hook import write_config
from tests.unit.test_live import FakeConn, FakeDom

U1 = "11111111-2222-3333-4444-000000000001"


def pinned(cpu: int, extra: str = "") -> bytes:
    return domain_xml(uuid=U1, backing="", tuning=f'<kvm:vcpupin vcpu="0" cpuset="{cpu}"/>{extra}', vcpus=1)


def running_agent(host: FakeHost, xml: bytes) -> tuple[Agent, FakeDom]:
    cfg = host.config(drift="restore")
    operations.prepare(parse_domain(xml), cfg)
    operations.mark(U1, cfg, state="running")
    dom = FakeDom(U1, xml, vcpus=1)
    a = Agent(cfg)
    a.conn = FakeConn(dom)
    return a, dom


def test_an_edit_made_while_a_retune_runs_is_applied_after_it(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The second METADATA_CHANGE arrives while the first re-tune is applying: it is queued, and the newest
    XML is the last one applied (it was dropped: "busy")."""
    host = FakeHost(tmp_path, cores_per_node=4).build()
    a, dom = running_agent(host, pinned(1))
    dom.xml = pinned(2)
    real = operations.retune
    calls = []

    def retune_and_edit_again(d, cfg):  # type: ignore[no-untyped-def]
        calls.append(d.active_tuning.vcpupins[0].cpus)
        if len(calls) == 1:
            dom.xml = pinned(3)  # the admin's next edit, while this re-tune runs
            t = threading.Thread(target=a._retune, args=(U1,))  # its event, on another thread
            t.start()
            t.join()  # returns at once: the VM's tuning job is taken, the edit is queued
        return real(d, cfg)

    monkeypatch.setattr(operations, "retune", retune_and_edit_again)
    a._retune(U1)
    assert calls == [frozenset({2}), frozenset({3})]
    assert operations.ledger_for(a.cfg).read().domains[U1].pins.vcpus[0] == {3}  # type: ignore[union-attr]
    assert dom.vcpus[0] == {3}


def test_a_drift_check_never_undoes_a_retune_running_beside_it(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The drift check runs exclusively with the VM's re-tunes: it reads the plan after the re-tune wrote it,
    so the new pin is not taken for a hand change and "restored" to the old one."""
    from kvmhooks import agent as agent_mod

    monkeypatch.setattr(agent_mod, "DRIFT_SETTLE", 0.0)
    host = FakeHost(tmp_path, cores_per_node=4).build()
    a, dom = running_agent(host, pinned(1))
    dom.vcpus[0] = frozenset({1})
    dom.xml = pinned(2)
    real = operations.retune

    def retune_with_a_drift_check_beside(d, cfg):  # type: ignore[no-untyped-def]
        t = threading.Thread(target=a._check_drift, args=(U1,))  # TUNABLE event of this very re-pin
        t.start()
        t.join()
        return real(d, cfg)

    monkeypatch.setattr(operations, "retune", retune_with_a_drift_check_beside)
    a._retune(U1)
    assert dom.vcpus[0] == {2}
    assert not (host.root / "run/failures" / U1).exists()  # nothing reported as a hand change


def test_a_defined_event_touches_only_its_own_line_of_the_record(tmp_path: Path) -> None:
    host = FakeHost(tmp_path, cores_per_node=4).build()
    a, _ = running_agent(host, pinned(1))
    operations.mark(U1, a.cfg, applied=Applied(memtune={"hard_limit": 2097152}, problems=["older line"]))

    class Saved(FakeDom):
        def XMLDesc(self, flags: int) -> str:
            return (pinned(2) if flags else pinned(1)).decode()

        def isActive(self) -> bool:
            return True

    a.conn = FakeConn(Saved(U1, pinned(1), vcpus=1))
    a._defined(U1)
    applied = operations.ledger_for(a.cfg).read().domains[U1].applied
    assert applied.memtune == {"hard_limit": 2097152}  # untouched (a re-tune's result is never put back)
    assert applied.problems[0] == "older line" and "differs from the running one" in applied.problems[1]


def test_a_failing_balloon_step_is_the_balloons_failure_not_the_retunes(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    host = FakeHost(tmp_path, cores_per_node=4).build()
    bal = '<kvm:balloon target="200M" transport="libvirt"/>'
    a, dom = running_agent(host, pinned(1, bal))
    dom.xml = pinned(2, bal)
    monkeypatch.setattr(a, "_spawn", lambda job, uuid: job(uuid))

    def broken(*args: object, **kw: object) -> dict[str, object]:
        from kvmhooks.errors import ApplyError

        raise ApplyError("setmem --live: the guest said no")

    monkeypatch.setattr("kvmhooks.apply.balloon.apply_balloon", broken)
    a._retune(U1)
    assert dom.vcpus[0] == {2}
    failure = (host.root / "run/failures" / U1).read_text()
    assert " balloon: " in failure and "retune" not in failure


def test_a_fork_failure_at_release_is_not_a_failed_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host = FakeHost(tmp_path, cores_per_node=4).build()
    monkeypatch.setenv("KVMHOOKS_CONFIG", str(write_config(host)))
    from kvmhooks.config import load_config

    cfg = load_config()
    xml = domain_xml(uuid=U1, backing="", tuning='<kvm:cpu policy="dedicated"/>', vcpus=1)
    operations.prepare(parse_domain(xml), cfg)
    monkeypatch.setattr(operations, "has_running_shared", lambda cfg: True)

    def no_fork() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    assert hook.main(["qemu", "vm1", "release", "end", "-"], io.BytesIO(xml)) == 0
    assert U1 not in operations.ledger_for(cfg).read().domains and not (host.root / "run/failures" / U1).exists()
    # At started the same failure leaves the VM untuned: that is recorded (status shows it), and exits 0.
    operations.prepare(parse_domain(pinned(1)), cfg)
    monkeypatch.setattr("kvmhooks.agent.tell", lambda cfg, uuid: False)
    assert hook.main(["qemu", "vm1", "started", "begin", "-"], io.BytesIO(pinned(1))) == 0
    assert "not tuned: the detached worker could not be started" in (host.root / "run/failures" / U1).read_text()


def test_fetching_the_agents_metrics_has_one_deadline(tmp_path: Path) -> None:
    path = tmp_path / "m.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def slow() -> None:  # a peer that answers a byte every 0.3 s
        c, _ = srv.accept()
        c.recv(1024)
        with c:
            for b in b"HTTP/1.0 200 OK\r\n\r\nxxxxxxxxxxxxxxxxxxxx":
                try:
                    c.sendall(bytes([b]))
                except OSError:
                    return
                time.sleep(0.3)

    threading.Thread(target=slow, daemon=True).start()
    t0 = time.monotonic()
    assert fetch_unix(path, timeout=1.0) is None
    assert time.monotonic() - t0 < 1.5
    srv.close()


def test_a_marker_directory_that_cannot_be_written_never_blocks_a_commit(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC (or EROFS) making a marker: held/ is taken out of use, so the shell hands every stop to Python,
    and the commit (here a prepare's) goes on; the next commit that can makes the markers again."""
    import errno

    ledger = Ledger(tmp_path / "run/ledger.json")
    real_open = os.open

    def no_space(path: object, flags: int, mode: int = 0o777, **kw: object) -> int:
        if "held" in str(path) and flags & os.O_CREAT:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, flags, mode, **kw)  # type: ignore[arg-type]

    from kvmhooks.ledger import DomainRecord

    monkeypatch.setattr(os, "open", no_space)
    with ledger.hold() as txn:
        txn.state.domains[U1] = DomainRecord(name="vm1")
    monkeypatch.setattr(os, "open", real_open)
    assert U1 in ledger.read().domains and not ledger.held_dir.is_dir()  # the shell's fallback: Python
    with ledger.hold() as txn:
        txn.state.note("another commit")
    assert (ledger.held_dir / U1).exists()


def test_a_record_part_set_before_any_is_read_is_kept() -> None:
    """Records decode lazily: setting one part (the balloon's result) before reading any other must not be
    lost when the record is written back (the raw JSON it was read from used to win)."""
    text = LedgerState().to_json()
    state = LedgerState.from_json(text)
    from kvmhooks.ledger import DomainRecord

    state.domains[U1] = DomainRecord(name="vm1", applied=Applied(memtune={"hard_limit": 1}))
    again = LedgerState.from_json(state.to_json())
    again.domains[U1].applied.balloon = {"target": 5}  # set first: nothing of applied read before
    final = LedgerState.from_json(again.to_json()).domains[U1].applied
    assert final.balloon == {"target": 5} and final.memtune == {"hard_limit": 1}

