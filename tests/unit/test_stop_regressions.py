"""Review of the stop left for the detached worker (Ledger.stopping_dir): each test is a defect it found.

The marker was tied to no run, and an empty held/ marker meant "holds nothing": a marker that outlived its
settle released the VM's next run (pages shrunk under a running guest), markers older than the feature sent a
hugepage VM's release to the worker, and a cleanup error in the settle failed every session on the host.
"""

from __future__ import annotations

import errno
import fcntl
import os

import pytest

from kvmhooks import operations, worker
from kvmhooks.config import load_config
from kvmhooks.domain import parse_domain
from kvmhooks.ledger import Ledger
from tests.fakehost import FakeHost, domain_xml
from tests.unit.test_hook import hook, write_config
from tests.unit.test_start_fast import HP_ONLY, PIN_ONLY, U1, U2, Shell, led, stop

DEDICATED = '<kvm:cpu policy="dedicated"/>'


@pytest.fixture
def shell(host: FakeHost, tmp_path: object) -> Shell:
    return Shell(host, tmp_path)  # type: ignore[arg-type]


def left_for_later(host: FakeHost, uuid: str) -> None:
    """What hooks/qemu leaves at the stop: the token of the held/ marker."""
    (led(host).stopping_dir / uuid).write_text((led(host).held_dir / uuid).read_text())


def test_a_cleanup_error_in_the_settle_fails_no_session(host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """The QMP socket directory refusing (EACCES from a security module, EROFS): before, the marker stayed and
    every later session on the host failed on it — every VM's start, and reconcile."""
    from kvmhooks.apply import sockets

    cfg = host.config()
    operations.prepare(parse_domain(domain_xml(uuid=U1, tuning=PIN_ONLY, backing="")), cfg)
    left_for_later(host, U1)

    def eacces(*a: object, **k: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(sockets, "_open_dir", eacces)
    operations.prepare(parse_domain(domain_xml(name="vm2", uuid=U2, tuning=HP_ONLY)), cfg)
    assert set(led(host).read().domains) == {U2} and os.listdir(led(host).stopping_dir) == []
    operations.reconcile(cfg, {}, {})
    operations.prepare(parse_domain(domain_xml(uuid=U1, tuning=PIN_ONLY, backing="")), cfg)


def test_a_marker_that_outlived_its_settle_never_releases_the_next_run(host: FakeHost) -> None:
    """The marker could not be removed (here a directory in its place): the VM's next run, holding 128 pages,
    was released by the next session of any VM and its pool shrunk under the running guest."""
    cfg = host.config()
    operations.prepare(parse_domain(domain_xml(uuid=U1, tuning=PIN_ONLY, backing="")), cfg)
    os.mkdir(led(host).stopping_dir / U1)  # stands in for any unlink that fails
    before = host.pool(0)
    operations.prepare(parse_domain(domain_xml(uuid=U1, tuning=HP_ONLY)), cfg)  # U1's next run
    operations.prepare(parse_domain(domain_xml(name="vm2", uuid=U2, tuning=PIN_ONLY, backing="")), cfg)
    assert U1 in led(host).read().domains and host.pool(0) == before + 128


def test_a_settle_that_cannot_list_the_markers_lets_no_marker_meet_a_new_run(host: FakeHost,
                                                                             monkeypatch: pytest.MonkeyPatch
                                                                             ) -> None:
    """listdir failing (EMFILE in a busy kvmhooksd) while U1's next run is prepared: the marker of the run
    before must not release it later."""
    cfg = host.config()
    operations.prepare(parse_domain(domain_xml(uuid=U1, tuning=PIN_ONLY, backing="")), cfg)
    left_for_later(host, U1)
    real = os.listdir

    def emfile(p: object = ".") -> list[str]:
        if str(p).endswith("/stopping"):
            raise OSError(errno.EMFILE, "Too many open files")
        return real(p)  # type: ignore[arg-type]

    with monkeypatch.context() as m:
        m.setattr(os, "listdir", emfile)
        operations.prepare(parse_domain(domain_xml(uuid=U1, tuning=HP_ONLY)), cfg)
    operations.prepare(parse_domain(domain_xml(name="vm2", uuid=U2, tuning=PIN_ONLY, backing="")), cfg)
    assert U1 in led(host).read().domains and os.listdir(led(host).stopping_dir) == []


def test_the_marker_is_not_light_while_the_ledger_says_the_vm_holds_cpus(host: FakeHost,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A change from dedicated to nothing whose ledger write fails (ENOSPC on /run, or killed there): the
    marker still says "release at once"."""
    cfgp = write_config(host)
    assert hook(cfgp, "vm1", "prepare", domain_xml(uuid=U1, tuning=DEDICATED, backing="", vcpus=1)).returncode == 0
    assert (led(host).held_dir / U1).read_text() == ""
    cfg = load_config(cfgp)

    def full(self: Ledger, text: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(Ledger, "_write", full)
        with pytest.raises(OSError):
            operations.update(U1, cfg, lambda rec: setattr(rec, "cpus", []))
    assert led(host).read().domains[U1].cpus and (led(host).held_dir / U1).read_text() == ""


def test_a_marker_from_before_the_tokens_sends_a_hugepage_stop_to_python(host: FakeHost, shell: Shell) -> None:
    """Every held/ marker an older version made is empty, and commits that do not decode a record never
    touch its marker: empty means "release before the hook returns", so the pages are back when virsh destroy
    returns."""
    cfgp = write_config(host)
    xml = domain_xml(uuid=U1, tuning=HP_ONLY)
    assert hook(cfgp, "vm1", "prepare", xml).returncode == 0
    os.truncate(led(host).held_dir / U1, 0)
    operations.prepare(parse_domain(domain_xml(name="vm2", uuid=U2, tuning=PIN_ONLY, backing="")), load_config(cfgp))
    assert stop(shell, xml, "stopped") and shell.worker(wait=0.3) is None


def test_a_failed_release_left_for_the_worker_shows_in_status(host: FakeHost) -> None:
    """The worker could not take the lock in time: a failing stop hook recorded a failure for `kvmhooks
    status`; the worker did not."""
    cfgp = write_config(host, lock_timeout="0.2")
    assert hook(cfgp, "vm1", "prepare", domain_xml(uuid=U1, tuning=PIN_ONLY, backing="")).returncode == 0
    cfg = load_config(cfgp)
    left_for_later(host, U1)
    fd = os.open(host.root / "run/ledger.json.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another session holds the lock past lock_timeout
    try:
        assert worker.run_job(["stopped", U1], cfg) == 1
    finally:
        os.close(fd)
    assert U1 in led(host).read().domains and "not released yet" in operations.read_failures(cfg)[U1]
    assert worker.run_job(["stopped", U1], cfg) == 0
    assert U1 not in led(host).read().domains and U1 not in operations.read_failures(cfg)


def test_a_stopping_marker_of_another_run_is_replaced_at_the_stop(host: FakeHost, shell: Shell) -> None:
    """A marker that could not be removed earlier (another token) does not make the stop skip its release."""
    cfgp = write_config(host)
    xml = domain_xml(uuid=U1, tuning=PIN_ONLY, backing="")
    assert hook(cfgp, "vm1", "prepare", xml).returncode == 0
    (led(host).stopping_dir / U1).write_text("0123456789abcdef\n")
    assert not stop(shell, xml, "stopped") and shell.worker() is not None
    assert (led(host).stopping_dir / U1).read_text() == (led(host).held_dir / U1).read_text()
