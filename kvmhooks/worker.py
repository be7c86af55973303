"""The detached worker: the only kvmhooks code that calls libvirt for a starting VM.

A hook must never call back into libvirtd (the daemon waits for the hook while holding the domain's
job: a deadlock). So the worker runs in its own session with stdio on /dev/null and no other inherited
descriptor (libvirtd reads the hook's stdout/stderr pipes until EOF, so a worker holding them would hang
``virsh start``), and the hook returns at once. The worker then waits (bounded) for the domain to run and
applies the live tuning.

Three ways in. Usually the prepare hook's own interpreter, once the VM is reserved, forks it
(:func:`fork_waiting`): already warm, it waits for the run's started hook with the run's ``tune/`` marker
locked, and the shell's started hook, seeing the lock, starts nothing (no interpreter in it, none starting
beside QEMU's first moments). Where there is no such worker (kvmhooksd served the prepare but stopped since,
the worker died or waited past ``worker_timeout``), the started hook's shell starts one (``setsid python -I
-m kvmhooks.worker started UUID``). Where the shell hands the call to Python (it cannot decide alone: a
configured state directory, a ledger without markers), the hook's interpreter double-forks it
(:func:`spawn_detached`). A hook is single-threaded and holds no lock when it forks; the child sets up its
own logging, and leaves with ``os._exit`` (no atexit handlers, no flushing of buffers that belong to the
hook). kvmhooksd, which is threaded, never forks it: it tunes over its own connection, or starts ``python -m
kvmhooks.worker`` (:func:`kvmhooks.prepare_server.spawn_repin_worker`).

The same worker also releases a stop hooks/qemu left for later (``stopped UUID``:
:attr:`kvmhooks.ledger.Ledger.stopping_dir`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from kvmhooks.config import Config, load_config
from kvmhooks.domain import Domain, parse_domain
from kvmhooks.errors import ApplyError, KvmhooksError
from kvmhooks.ledger import DomainRecord
from kvmhooks.log import VMLog, setup_logging
from kvmhooks.xmlsafe import UUID_RE

log = logging.getLogger(__name__)


def spawn_detached(args: Sequence[str], cfg: Config, keep: int | None = None) -> int:
    """Run the worker job ``args`` (see :func:`run_job`) in a fully detached grandchild of this process;
    returns the intermediate child's status at once. ``keep``: the one descriptor of the caller's the
    worker keeps (the tune/ marker :func:`fork_waiting` locked)."""
    try:
        pid = os.fork()
    except OSError as e:  # out of processes or memory: the caller says what is left undone
        log.warning("cannot fork the worker for %s: %s", " ".join(args), e)
        return -1
    if pid == 0:  # first child: new session, fork again so the worker is no session leader, then leave
        code = 127
        try:
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            # Close the hook's log handlers while their descriptors are still theirs: a handler freed after
            # closerange would close whatever descriptor reused its number (libvirt's socket, the new log).
            logging.shutdown()
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            top = os.sysconf("SC_OPEN_MAX") if os.sysconf("SC_OPEN_MAX") > 0 else 65536
            if keep is None:
                os.closerange(3, top)
            else:
                os.closerange(3, keep)
                os.closerange(keep + 1, top)
            os.chdir("/")
            os.environ.update(PATH="/usr/sbin:/usr/bin:/sbin:/bin", LC_ALL="C.UTF-8")
            setup_logging(cfg.log, cfg.log_level, "worker")  # the hook's handler wrote to a closed descriptor
            code = run_job(args, cfg)
        except BaseException:
            with contextlib.suppress(BaseException):
                log.exception("worker %s crashed", " ".join(args))
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def phase(dom: Any) -> str:
    """Where a domain's start is: ``running``; ``paused`` when it was started paused (``virsh start --paused``,
    what OpenStack does while it waits for its network) or paused since — pins, memtune and the vCPU count
    apply now, only the balloon needs a running guest; ``busy`` while its start or an incoming migration still
    holds the domain's job (libvirt would make every tuning call wait for it, then time out).

    :raise ApplyError: the domain stopped.
    """
    import libvirt

    state, reason = dom.state()
    if state == libvirt.VIR_DOMAIN_RUNNING:
        return "running"
    if state in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED):
        raise ApplyError("the domain stopped before it could be tuned")
    if state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_STARTING_UP:
        return "busy"
    if state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_MIGRATION and _job_active(dom):
        return "busy"
    return "paused"


def _job_active(dom: Any) -> bool:
    """Whether a job still holds a domain paused for "migration". libvirt gives that reason to every domain
    started with an incoming stream: a migration's destination (the started hook runs before the memory
    arrives; a RESUMED event ends it), but also ``virsh restore --paused`` and a managed save's ``start
    --paused``, which stay paused for "migration" once restored (qemuProcessStart passes PAUSED_MIGRATION for
    any incoming start, and the restore keeps it). On the destination libvirt refuses job statistics while the
    migration runs ("migration statistics are available only on the source host"); a restore that finished
    has no job (VIR_DOMAIN_JOB_NONE)."""
    import libvirt

    try:
        return bool(int(dom.jobInfo()[0]) != libvirt.VIR_DOMAIN_JOB_NONE)
    except libvirt.libvirtError:
        return True


def wait_phase(dom: Any, timeout: float, ready: frozenset[str]) -> str:
    """Wait (bounded) until :func:`phase` is one of ``ready``; returns it."""
    deadline = time.monotonic() + timeout
    while True:
        now = phase(dom)
        if now in ready:
            return now
        if time.monotonic() >= deadline:
            what = "running" if ready == RUNNING else "done starting (or migrating in)"
            raise ApplyError(f"the domain was not {what} after {timeout:g} s")
        time.sleep(0.05)


RUNNING = frozenset({"running"})
SETTLED = frozenset({"running", "paused"})


_POLL = 0.01  # how often a worker forked at prepare looks for its VM's started hook (two stat calls)


def fork_waiting(uuid: str, token: str, cfg: Config) -> bool:
    """From the prepare hook (single-threaded, the ledger lock released): fork the worker that tunes this run
    once it has started, with the run's tune/ marker locked, which tells the shell's started hook that the VM
    is taken care of (it then starts no interpreter). The lock is taken here, before the hook returns, so no
    started hook can come before it; the worker holds it until it ends. Whether it was forked."""
    import fcntl

    from kvmhooks.operations import ledger_for

    led = ledger_for(cfg)
    if not led.up_dir.is_dir():  # (the worker waits for the up/ marker the shell leaves at started)
        return False
    try:
        fd = os.open(led.tune_dir / uuid, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return spawn_detached(["waiting", uuid, token, str(fd)], cfg, keep=fd) == 0
    except OSError:
        return False
    finally:
        os.close(fd)  # the worker's copy keeps the lock


def run_waiting(uuid: str, token: str, fd: int, cfg: Config) -> int:
    """The worker :func:`fork_waiting` made: warm up, wait for the run's started hook, then tune.

    It waits ``worker_timeout`` (what a worker waits for its domain to run; QEMU preallocating a large guest's
    memory may take longer: then it leaves, and the started hook, finding the marker unlocked, starts a worker
    as without it). Its run is over, and it leaves, when the tune/ marker it locked is no longer the one at its
    path (the VM's release removed it, or its next prepare made a new one) or the VM's stop was left for
    later."""
    from kvmhooks import operations
    from kvmhooks.apply import live  # noqa: F401  (imported while QEMU starts, not after)
    from kvmhooks.apply.libvirt import quiet_libvirt

    quiet_libvirt()
    led = operations.ledger_for(cfg)
    up, marker, stopping = led.up_dir / uuid, led.tune_dir / uuid, led.stopping_dir / uuid
    mine = os.fstat(fd)
    deadline = time.monotonic() + cfg.worker_timeout
    while not up.exists():
        try:
            now = os.stat(marker)
        except OSError:
            return 0
        if (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino) or stopping.exists():
            return 0  # this run is over: nothing of it to tune
        if time.monotonic() >= deadline:
            os.close(fd)  # from now on the shell's started hook starts a worker
            if not up.exists():
                VMLog("?", uuid).info("worker: not started after %g s; its started hook tunes it", cfg.worker_timeout)
                return 0
            break  # it came just now: the shell may have seen the lock (a second tuning changes nothing)
        time.sleep(_POLL)
    return run_started(uuid, cfg, token)


def run_started(uuid: str, cfg: Config, token: str | None = None) -> int:
    """The detached worker's job: connect, then :func:`tune` the just-started VM (the run of ``token``)."""
    import libvirt

    from kvmhooks import operations

    try:
        conn = libvirt.open(cfg.libvirt_uri)
    except libvirt.libvirtError as e:
        VMLog("?", uuid).error("worker: cannot connect to %s: %s", cfg.libvirt_uri, e)
        operations.mark(uuid, cfg, error=f"worker: cannot connect to libvirt: {e}")
        return 1
    try:
        return tune(conn, uuid, cfg, "worker", token)
    finally:
        conn.close()


def tune(conn: Any, uuid: str, cfg: Config, by: str, token: str | None = None) -> int:
    """Apply the live tuning of a just-started VM over ``conn`` (the worker's own), then its balloon.

    A VM started paused is tuned at once; only its balloon waits (bounded) for the guest to run.
    Everything it did goes to the ledger for status; a failure goes to the failure record. Never raises.
    """
    from kvmhooks import operations

    done = tune_live(conn, uuid, cfg, by, token)
    if done is None:
        return 1
    d, dom, vlog = done.domain, done.dom, done.vlog
    if d.active_tuning is None or d.active_tuning.balloon is None:
        return 0
    try:
        wait_phase(dom, cfg.worker_timeout, RUNNING)
    except Exception as e:
        if stopped(dom) or not still_ours(cfg, uuid, done.token):  # off, or its newer run: nothing failed
            vlog.info("balloon: not set: the domain stopped or was restarted meanwhile")
            return 0
        vlog.warning("balloon: not set: %s", e)
        operations.record_failure(cfg, uuid, "balloon", f"not set: {e} (started paused and not resumed in time?)")
        return 1
    return 0 if balloon_step(d, dom, cfg, vlog) else 1


def stopped(dom: Any) -> bool:
    """Whether the domain is off (or gone, a transient one); False when that cannot be told."""
    import libvirt

    try:
        return bool(dom.state()[0] in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED))
    except libvirt.libvirtError as e:
        return bool(e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN)


def still_ours(cfg: Config, uuid: str, token: str | None) -> bool:
    """Whether the VM's record is still the run ``token`` belongs to (True when that cannot be told: a failure
    is then recorded rather than lost). A VM stopped (released) or restarted since is another run's."""
    from kvmhooks import operations

    if token is None:
        return True
    try:
        rec = operations.ledger_for(cfg).read().domains.get(uuid)
    except KvmhooksError:
        return True
    return rec is not None and rec.token == token


class Tuned(NamedTuple):
    """What :func:`tune_live` did and the balloon step needs: the live definition, the domain, its log, and
    the token of the run it was tuned for."""

    domain: Domain
    dom: Any
    vlog: VMLog
    token: str | None


def tune_live(conn: Any, uuid: str, cfg: Config, by: str, run: str | None = None) -> Tuned | None:
    """The CPU and memory part of a start's tuning (pins, memtune, vCPU count), recorded in the ledger;
    returns what the balloon step needs, or None when it failed (and recorded why). Never raises.

    A domain started paused is tuned at once (libvirt takes pins, memtune and the vCPU count on a paused
    domain); one still starting or migrating in is waited for (bounded). kvmhooksd runs this and
    :func:`balloon_step` apart: the balloon waits for the guest to run and boot, and a live edit in the
    meantime must not wait behind it. ``run``: the token of the run to tune (a worker forked at prepare), none
    other.
    """
    from kvmhooks import operations

    started = time.monotonic()
    vlog = VMLog("?", uuid)
    # The run this tuning is for: a newer run of the VM (stopped and started meanwhile) has another token,
    # and its record is not ours to write.
    token: str | None = None
    try:
        rec = operations.ledger_for(cfg).read().domains.get(uuid)
        token = rec.token if rec is not None else None
        if run is not None and token != run:
            vlog.info("%s: the VM was stopped or restarted meanwhile; its new run is tuned on its own", by)
            return None
        dom = conn.lookupByUUIDString(uuid)
        vlog = VMLog(dom.name(), uuid)
        now = wait_phase(dom, cfg.worker_timeout, SETTLED)
        from kvmhooks.apply.live import apply_started

        d = parse_domain(dom.XMLDesc(0).encode())  # the live XML: what this start runs with
        applied = apply_started(conn, dom, d, cfg, vlog)
        applied.worker_pid, applied.worker_sid = os.getpid(), os.getsid(0)
        applied.worker_seconds = round(time.monotonic() - started, 3)
        applied.tuned_by = by
        if token is not None and not operations.mark(uuid, cfg, token=token, state="running", applied=applied,
                                                     error=None):
            vlog.info("%s: the VM was restarted meanwhile; its new run is tuned on its own", by)
            return None
        vlog.info("%s: CPU and memory tuning done in %.3f s%s", by, time.monotonic() - started,
                  " (the domain is paused)" if now == "paused" else "")
        return Tuned(d, dom, vlog, token)
    except Exception as e:
        ours = True  # (the ledger unreadable: the failure file is where it is seen)
        if token is not None:
            with contextlib.suppress(Exception):
                ours = operations.mark(uuid, cfg, token=token, error=f"{by}: {e}")
        if not ours:  # stopped or restarted meanwhile: the newer run (or none) is not this one's to fail
            vlog.info("%s: not tuned (%s); the VM was stopped or restarted meanwhile", by, e)
            return None
        vlog.error("%s: %s", by, e)
        operations.record_failure(cfg, uuid, by, str(e))
        return None


def balloon_step(d: Domain, dom: Any, cfg: Config, vlog: VMLog) -> bool:
    """The balloon step of a tuning (at start, or after a live edit): apply, and record what landed in the
    record's balloon part only (the rest may have been re-tuned meanwhile). A failure is the balloon's own
    (status: "balloon: ..."), never the tuning's. Returns whether it went through. Never raises."""
    from kvmhooks import operations
    from kvmhooks.apply.balloon import apply_balloon

    t = d.active_tuning
    assert t is not None and t.balloon is not None
    try:
        result = apply_balloon(d, t.balloon, dom, cfg.balloon_timeout, vlog)
    except Exception as e:
        vlog.warning("balloon: %s", e)
        with contextlib.suppress(Exception):
            operations.record_failure(cfg, d.uuid, "balloon", str(e))
        return False
    landed = {k: v for k, v in result.items() if isinstance(v, (str, int, float, bool))}

    def record(rec: DomainRecord) -> None:
        rec.applied.balloon = landed

    operations.update(d.uuid, cfg, record)
    return True


def run_repin(cfg: Config) -> int:
    """After a dedicated VM stopped: let the shared VMs float over the CPUs it gave back."""
    import libvirt

    from kvmhooks.apply.live import repin_shared

    try:
        conn = libvirt.open(cfg.libvirt_uri)
    except libvirt.libvirtError as e:
        log.error("repin worker: cannot connect to %s: %s", cfg.libvirt_uri, e)
        return 1
    try:
        repin_shared(conn, cfg, VMLog("-", "-"))
        return 0
    finally:
        conn.close()


def run_stopped(uuid: str, cfg: Config) -> int:
    """After hooks/qemu left a VM's stop for later (:attr:`kvmhooks.ledger.Ledger.stopping_dir`): a session,
    which releases every VM so marked (this one's, unless another session was first). A failure is recorded
    for ``kvmhooks status``, as a failing stop hook's is; the next session releases the VM."""
    from kvmhooks import operations

    try:
        with operations.session(cfg) as s:
            settled = dict(s.settled)
    except KvmhooksError as e:
        VMLog("?", uuid).error("worker: the release left for it failed: %s", e)
        operations.record_failure(cfg, uuid, "stopped", f"not released yet ({e}); the next kvmhooks operation "
                                  "(any VM's start, kvmhooks reconcile) releases it")
        return 1
    if any(rec.cpus for rec in settled.values()) and operations.has_running_shared(cfg):
        # (A record holding CPUs has a marker that sends its stop to the hook's own release: not here, but safe.)
        from kvmhooks.apply.libvirt import quiet_libvirt

        quiet_libvirt()
        return run_repin(cfg)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    valid = (len(args) == 2 and ((args[0] in ("started", "stopped") and UUID_RE.fullmatch(args[1]))
                                 or (args[0] == "repin" and args[1] == "-")))
    if not valid:
        print("usage: python -m kvmhooks.worker started UUID | stopped UUID | repin -", file=sys.stderr)
        return 2
    try:
        cfg = load_config()
    except KvmhooksError as e:
        print(f"kvmhooks worker: {e}", file=sys.stderr)
        return 1
    setup_logging(cfg.log, cfg.log_level, "worker")
    return run_job(args, cfg)


def run_job(args: Sequence[str], cfg: Config) -> int:
    """``started UUID`` (tune a just-started VM), ``stopped UUID`` (release what a stop left for later) or
    ``repin -`` (after a dedicated VM stopped)."""
    try:
        if args[0] == "stopped":
            return run_stopped(args[1], cfg)
        if args[0] == "waiting":  # (forked by the prepare hook only: fork_waiting)
            return run_waiting(args[1], args[2], int(args[3]), cfg)
        from kvmhooks.apply.libvirt import quiet_libvirt

        quiet_libvirt()
        return run_started(args[1], cfg) if args[0] == "started" else run_repin(cfg)
    except Exception:
        log.exception("worker for %s crashed", args[1])
        return 1


if __name__ == "__main__":
    sys.exit(main())
