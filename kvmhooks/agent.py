"""kvmhooksd (`kvmhooks agent`): the resident agent. One libvirt connection, libvirt's event loop, and the jobs
that need a process that stays: post-start tuning without a new interpreter, live re-tuning when a running
VM's annotation changes, and the automatic balloon policy (what `kvmhooks balloond` ran alone).

How it meets the hook (which stays self-sufficient: prepare never depends on the agent):

- hooks/qemu hands an annotated VM's prepare to the agent, which runs the hook's own code without an
  interpreter to start (:mod:`kvmhooks.prepare_server`); the hook runs it in Python when that fails;

- the ``started`` hook tells the agent "started UUID" over a root-only unix socket, with a deadline of a few
  milliseconds, and spawns the detached worker instead when nobody answers "ok" (:func:`tell`);
- the agent does not touch that domain while its hook still runs: it tunes on libvirt's STARTED (or
  RESUMED) lifecycle event, and a bounded watchdog covers an event that never comes;
- a domain started paused (``virsh start --paused``) gets its pins, memtune and vCPU count at once; only its
  balloon waits for the RESUMED event (a paused guest cannot move it); a domain migrating in is tuned at the
  RESUMED event that ends the migration (until then the migration holds the domain), one restored paused
  (``virsh restore --paused``) at the SUSPENDED event that ends its restore; a balloon the ledger says is still
  owed (tuned, no balloon result: resumed while the agent was away) is set at the reconnect or within
  :data:`OWED_BALLOON_PERIOD`;
- a METADATA_CHANGE event in the kvmhooks namespace re-plans and re-applies pins, memtune and the vCPU count
  (an invalid edit is refused into the log and ``kvmhooks status``; the previous tuning stays, and what only
  a restart can change, huge pages, is reported as pending);
- a TUNABLE event that changed pins, and a periodic check, compare the live pins with the ledger's plan: a
  hand change is reported, and with ``drift = "restore"`` undone;
- its Prometheus metrics are served on its unix socket, and on ``metrics_listen`` when configured, with a
  fixed number of threads whatever the clients do (:class:`kvmhooks.metrics.MetricsServer`);
- one agent per host: it holds ``agent.lock`` in the state directory for its lifetime; a second one refuses;
  its sockets and pid file are put back if they vanish (an agent from before the lock removes them at exit);
- when libvirtd goes away the agent reconnects with backoff, then tunes every running VM whose tuning never
  finished.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmhooks import NAMESPACE
from kvmhooks.config import Config
from kvmhooks.errors import HostError, KvmhooksError
from kvmhooks.log import VMLog
from kvmhooks.xmlsafe import UUID_RE

if TYPE_CHECKING:
    from kvmhooks.ledger import DomainRecord
    from kvmhooks.prepare_server import PrepareServer

log = logging.getLogger(__name__)

SOCKET_NAME = "agent.sock"
PID_NAME = "agent.pid"
# One agent per host: held (flock) for the agent's lifetime, taken before its socket or pid file is touched,
# so a second agent refuses before it can take the socket over, and only the holder removes what it made.
LOCK_NAME = "agent.lock"
METRICS_SOCKET_NAME = "metrics.sock"  # HTTP, the Prometheus exposition (the agent's counters included)
# The started hook waits this long for the agent's "ok" before it spawns the worker instead: an agent that
# answers at all answers in well under a millisecond; a stuck one must not slow VM starts.
TELL_TIMEOUT = 0.05
# A promised tuning whose STARTED event has not come after this long is looked at anyway (a missed event).
EVENT_GRACE = 2.0
# hooks/qemu's hand-over without Python: at a VM's started, while this agent holds its lock, the shell leaves
# an empty HANDOFF_DIR/UUID and exits; the STARTED event (or, missed, the periodic look) takes it.
HANDOFF_DIR = "handoff"
# A second agent waits this long for the lock before it refuses: the shell's probe of the lock holds it for
# an instant at every VM start.
LOCK_WAIT = 1.0
# Status line for a running VM whose saved definition carries another annotation than the one it runs with.
SAVED_DIFFERS = "pending restart: the saved definition's annotation differs from the running one"
# How long a drift check waits after a TUNABLE event: kvmhooks records its own pin changes (a shared VM's
# re-pin) right after making them, so a comparison made at once could take kvmhooks for the admin.
DRIFT_SETTLE = 1.0
# Besides the TUNABLE event, every managed VM's pins are compared with the plan this often (an event lost while
# libvirtd restarted, a change libvirt does not announce).
DRIFT_PERIOD = 60.0
# How often the ledger is searched for running VMs whose balloon was never set: a VM started paused whose
# RESUMED event this agent did not wait for (it restarted meanwhile); a reconnect looks at once.
OWED_BALLOON_PERIOD = 10.0
# Reconnection backoff after libvirtd went away (seconds, doubling up to the maximum).
BACKOFF_MIN, BACKOFF_MAX = 0.5, 10.0


def socket_path(cfg: Config) -> Path:
    return cfg.state_dir / SOCKET_NAME


def metrics_socket_path(cfg: Config) -> Path:
    return cfg.state_dir / METRICS_SOCKET_NAME


def take_lock(cfg: Config) -> int:
    """The one-agent-per-host lock (an open descriptor; the lock goes with it, at exit or a crash alike).

    :raise HostError: another agent holds it (one line, naming its pid when its pid file says).
    """
    import fcntl

    path = cfg.state_dir / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.02)
                continue
        os.close(fd)
        try:
            pid = f" (pid {int((cfg.state_dir / PID_NAME).read_text())})"
        except (OSError, ValueError):
            pid = ""
        raise HostError(f"kvmhooksd already runs on this host{pid}, holding {path}; not starting a second one "
                        "(scripts/start-agent.sh or 'systemctl restart kvmhooksd' restarts it)") from None
    return fd


def tell(cfg: Config, uuid: str) -> bool:
    """From the started hook: hand the VM to the agent; True only if it answered "ok". Never raises."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(TELL_TIMEOUT)
            s.connect(str(socket_path(cfg)))
            s.sendall(f"started {uuid}\n".encode())
            return s.recv(16).startswith(b"ok")
    except OSError:
        return False


def running(cfg: Config) -> bool:
    """Whether a kvmhooksd answers on its socket (for kvmhooks status)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(TELL_TIMEOUT)
            s.connect(str(socket_path(cfg)))
        return True
    except OSError:
        return False


class Agent:
    def __init__(self, cfg: Config):
        from kvmhooks.balloond import Service

        self.cfg = cfg
        self.stop = threading.Event()
        self.conn: Any = None
        self.pending: dict[str, float] = {}  # uuid → when the hook handed it over
        # uuid → the jobs ("tune", "balloon") that wait for its RESUMED event: the balloon of a VM started
        # paused, the whole tuning of one migrating in (see _defer).
        self.at_resume: dict[str, set[str]] = {}
        # The runs (ledger tokens) whose balloon step this agent ran or found nothing to do for: the ledger says
        # which runs still owe one (see check_owed_balloons), this says which ones were tried already.
        self.ballooned: set[str] = set()
        self.lock = threading.Lock()
        self.balloon = Service(cfg)
        # One job of a kind per VM at a time (see _serial): its lock, and the jobs asked for meanwhile.
        self.job_locks: dict[tuple[str, str], threading.Lock] = {}
        self.queued: dict[tuple[str, str], dict[str, Callable[[], None]]] = {}
        self.metrics: Any = None  # kvmhooks.metrics.Metrics once run() set up the endpoints
        self.hook_socket: socket.socket | None = None  # the hook's socket (serve)
        # uuid → guest memory (KiB) from libvirt's BALLOON_CHANGE events: fresher than the ledger's figure,
        # which is written when kvmhooks sets a target, for the metrics' balloon_actual.
        self.balloon_actual: dict[str, int] = {}
        self.prepare_server: PrepareServer | None = None  # hooks/qemu's prepare, served (run)

    # --- the hook's socket ------------------------------------------------------------------------------

    def serve(self) -> None:
        path = socket_path(self.cfg)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # root only: the socket is created 0600
        try:
            srv.bind(str(path))
        finally:
            os.umask(old)
        srv.listen(64)
        srv.settimeout(0.5)
        if self.hook_socket is not None:  # its path was removed: its thread ends at the close
            self.hook_socket.close()
        self.hook_socket = srv
        threading.Thread(target=self._accept, args=(srv,), name="agent-socket", daemon=True).start()

    def _accept(self, srv: socket.socket) -> None:
        while not self.stop.is_set():
            try:
                c, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with c:
                c.settimeout(0.5)
                try:
                    words = c.recv(128).decode("ascii", "replace").split()
                    if len(words) == 2 and words[0] == "started" and UUID_RE.fullmatch(words[1]):
                        with self.lock:
                            self.pending[words[1]] = time.monotonic()
                        c.sendall(b"ok\n")
                    else:
                        c.sendall(b"error\n")
                except OSError as e:
                    log.debug("agent: socket client: %s", e)

    # --- libvirt events ---------------------------------------------------------------------------------

    def _lifecycle(self, conn: Any, dom: Any, event: int, detail: int, opaque: object) -> None:
        import libvirt

        uuid = dom.UUIDString()
        if event == libvirt.VIR_DOMAIN_EVENT_STARTED:
            with self.lock:
                promised = self.pending.pop(uuid, None) is not None
                self.balloon_actual.pop(uuid, None)  # a figure from its previous run
            # at_resume stays: a tuning the missed-event look deferred before this (late) event is still owed.
            # A previous run's was dropped at its STOPPED event, or at the reconnect that missed it.
            if self._take_handoff(uuid) or promised:
                self._spawn(self._tune, uuid)  # (it starts the balloon step itself)
        elif event == libvirt.VIR_DOMAIN_EVENT_RESUMED:
            with self.lock:
                promised = self.pending.pop(uuid, None) is not None
                waiting = self.at_resume.pop(uuid, set())
            promised = self._take_handoff(uuid) or promised
            if promised or "tune" in waiting:
                self._spawn(self._tune, uuid)
            elif "balloon" in waiting:
                self._spawn(self._balloon, uuid)
        elif event == libvirt.VIR_DOMAIN_EVENT_SUSPENDED and detail in (
                libvirt.VIR_DOMAIN_EVENT_SUSPENDED_PAUSED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_RESTORED):
            # Its start (``virsh restore --paused``, a managed save's ``start --paused``) is over and left it
            # paused: a tuning deferred while that start held the domain runs now (the balloon still waits).
            with self.lock:
                deferred = "tune" in self.at_resume.get(uuid, set())
            if deferred:
                self._undefer(uuid, "tune")
                self._spawn(self._tune, uuid)
        elif event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            with self.lock:
                self.pending.pop(uuid, None)
                self.at_resume.pop(uuid, None)
                self.balloon_actual.pop(uuid, None)
        elif event == libvirt.VIR_DOMAIN_EVENT_DEFINED:
            self._spawn(self._defined, uuid)

    def _balloon_change(self, conn: Any, dom: Any, actual_kib: int, opaque: object) -> None:
        with self.lock:
            self.balloon_actual[dom.UUIDString()] = int(actual_kib)

    def _metadata(self, conn: Any, dom: Any, mtype: int, nsuri: str | None, opaque: object) -> None:
        if nsuri == NAMESPACE and dom.isActive():
            self._spawn(self._retune, dom.UUIDString())

    def _tunable(self, conn: Any, dom: Any, params: dict[str, object], opaque: object) -> None:
        if any(str(k).startswith("cputune.") and "pin" in str(k) for k in params):
            self._spawn(self._check_drift, dom.UUIDString())

    def _live_balloon(self) -> dict[str, int]:
        with self.lock:
            return dict(self.balloon_actual)

    def _spawn(self, job: Any, uuid: str) -> None:
        threading.Thread(target=job, args=(uuid,), name=f"agent-{uuid[:8]}", daemon=True).start()

    # --- the jobs ---------------------------------------------------------------------------------------

    def _timed(self, op: str) -> Any:
        return self.metrics.timed(op) if self.metrics is not None else contextlib.nullcontext()

    def _serial(self, uuid: str, kind: str, name: str, job: Callable[[], None]) -> None:
        """Run ``job`` for one VM with no other job of that kind running for it (``tuning``: start tuning,
        re-tune, drift check and restore, which all read the plan and set pins; ``balloon``). A job asked for
        while another runs is queued and run by that thread right after (one per ``name``: a re-tune asked
        twice runs once more, with the newest XML), so no edit is lost and none is undone by an older one."""
        key = (uuid, kind)
        with self.lock:
            self.queued.setdefault(key, {})[name] = job
            lk = self.job_locks.setdefault(key, threading.Lock())
        while lk.acquire(blocking=False):
            try:
                while True:
                    with self.lock:
                        jobs = self.queued.pop(key, {})
                    if not jobs:
                        break
                    for j in jobs.values():
                        try:
                            j()
                        except Exception:  # each job records its own failures; the queue goes on
                            log.exception("agent: %s job for %s failed", kind, uuid)
            finally:
                lk.release()
            with self.lock:
                if not self.queued.get(key):
                    return
            # queued between the last run and the release: run it (unless another thread took the lock)

    def _tune(self, uuid: str) -> None:
        """A start: the CPU and memory tuning, then (apart: it waits for the guest to boot) the balloon."""
        self._serial(uuid, "tuning", "tune", lambda: self._tune_once(uuid))

    def _tune_once(self, uuid: str) -> None:
        """Pins, memtune and the vCPU count at once, the domain running or paused (``virsh start --paused``,
        OpenStack's way); the balloon when the guest runs (now, or at its RESUMED event)."""
        from kvmhooks.worker import SETTLED, tune_live

        try:
            dom = self.conn.lookupByUUIDString(uuid)
            if self._defer(uuid, dom, "tune", SETTLED):
                VMLog(dom.name(), uuid).info("agent: a job still holds it (migrating in, or a restore); tuned when "
                                             "that ends")
                return
        except Exception as e:  # (gone, or libvirt away: tune_live looks again and records why)
            log.debug("agent: state of %s: %s", uuid, e)
        with self._timed("tune"):
            result = tune_live(self.conn, uuid, self.cfg, "agent")  # records its own failure
        if result is None:
            if self.metrics is not None:
                self.metrics.failed("tune")
            return
        d, dom, vlog = result.domain, result.dom, result.vlog
        t = d.active_tuning
        if t is not None and t.balloon is not None:
            self._balloon_when_running(uuid, dom, vlog)

    def _balloon_when_running(self, uuid: str, dom: Any, vlog: VMLog) -> None:
        """The balloon step now, or at the RESUMED event of a paused domain (a paused guest cannot move its
        balloon: the step would wait for its driver in vain)."""
        from kvmhooks.worker import RUNNING

        try:
            if self._defer(uuid, dom, "balloon", RUNNING):
                vlog.info("agent: the domain is paused; its balloon is set when it runs")
                return
        except Exception as e:  # it stopped meanwhile: the balloon step finds out and says so
            log.debug("agent: state of %s: %s", uuid, e)
        self._spawn(self._balloon, uuid)

    def _defer(self, uuid: str, dom: Any, job: str, ready: frozenset[str]) -> bool:
        """True when ``job`` must wait for the domain's RESUMED event (its :func:`~kvmhooks.worker.phase` is
        not in ``ready``): then the event runs it. The job is put down before the state is read, so an event
        that comes in between finds it (and runs it) rather than being missed."""
        from kvmhooks.worker import phase

        with self.lock:
            self.at_resume.setdefault(uuid, set()).add(job)
        try:
            if phase(dom) not in ready:
                return True
        except BaseException:  # it stopped (or libvirt went away): nothing waits for its RESUMED event
            self._undefer(uuid, job)
            raise
        with self.lock:
            if job not in self.at_resume.get(uuid, set()):
                return True  # the event came meanwhile and started it
        self._undefer(uuid, job)
        return False

    def _undefer(self, uuid: str, job: str) -> None:
        with self.lock:
            jobs = self.at_resume.get(uuid, set())
            jobs.discard(job)
            if not jobs:
                self.at_resume.pop(uuid, None)

    def _balloon(self, uuid: str, owed: bool = False) -> None:
        """The balloon step for the VM's current live XML (at start, or a live edit of a fixed target; ``owed``:
        only if no step ran for this run of the VM yet)."""
        from kvmhooks import operations
        from kvmhooks.domain import parse_domain
        from kvmhooks.worker import balloon_step

        def step() -> None:
            try:
                rec = operations.ledger_for(self.cfg).read().domains.get(uuid)
                dom = self.conn.lookupByUUIDString(uuid)
                d = parse_domain(dom.XMLDesc(0).encode())
            except Exception as e:  # it went away, or its annotation broke (the re-tune says so)
                log.info("agent: balloon step of %s skipped: %s", uuid, e)
                return
            with self.lock:
                if rec is not None:
                    if owed and rec.token in self.ballooned:
                        return  # set meanwhile (the start's own step ran first)
                    self.ballooned.add(rec.token)
            t = d.active_tuning
            if t is not None and t.balloon is not None:
                with self._timed("balloon"):
                    balloon_step(d, dom, self.cfg, VMLog(d.name, uuid))

        self._serial(uuid, "balloon", "owed" if owed else "balloon", step)

    def _balloon_if_owed(self, uuid: str) -> None:
        """The balloon step of a running VM whose run still owes it (see :meth:`_owes_balloon`)."""
        from kvmhooks import operations

        try:
            rec = operations.ledger_for(self.cfg).read().domains.get(uuid)
            if rec is None or not self._owes_balloon(rec):
                return
            dom = self.conn.lookupByUUIDString(uuid)
            if not self._balloon_due(dom, rec):
                return
        except Exception as e:  # it went away, or libvirt did: the next look (reconnect, period) tries again
            log.debug("agent: owed balloon of %s: %s", uuid, e)
            return
        VMLog(rec.name, uuid).info("agent: its balloon was never set (it ran while the agent was away or "
                                   "restarting); setting it now")
        self._balloon(uuid, owed=True)

    def _owes_balloon(self, rec: DomainRecord) -> bool:
        """The ledger's side: tuned ("running") with no balloon result, and no step of this agent's tried it
        for this run (a step that failed left its failure in status; it is not retried every period)."""
        try:
            landed = bool(rec.applied.balloon)
        except KvmhooksError:  # a worker result that does not decode (status says so): not judged here
            return False
        with self.lock:
            return rec.state == "running" and not landed and rec.token not in self.ballooned

    def _balloon_due(self, dom: Any, rec: DomainRecord) -> bool:
        """The domain's side: it runs (a paused one waits for its RESUMED event) and its live tuning has a
        balloon (one without is remembered as owing none)."""
        from kvmhooks.domain import parse_domain
        from kvmhooks.worker import phase

        if phase(dom) != "running":
            return False
        t = parse_domain(dom.XMLDesc(0).encode()).active_tuning
        if t is None or t.balloon is None:
            with self.lock:
                self.ballooned.add(rec.token)
            return False
        return True

    def check_owed_balloons(self) -> None:
        """Every running VM whose run still owes its balloon (the ledger says so, not this process's memory):
        a VM started paused and resumed while the agent was restarting or disconnected."""
        from kvmhooks import operations

        try:
            domains = operations.ledger_for(self.cfg).read().domains
        except KvmhooksError as e:
            log.info("agent: owed balloons not looked for: %s", e)
            return
        with self.lock:
            self.ballooned &= {r.token for r in domains.values()}  # (runs that ended are forgotten)
        for uuid, rec in domains.items():
            if self._owes_balloon(rec):
                self._spawn(self._balloon_if_owed, uuid)

    def _retune(self, uuid: str) -> None:
        """The annotation of a running VM changed: re-plan and apply, or keep the old tuning and say why."""
        self._serial(uuid, "tuning", "retune", lambda: self._retune_once(uuid))

    def _retune_once(self, uuid: str) -> None:
        """One re-plan and apply from the live XML read now."""
        from kvmhooks import operations
        from kvmhooks.apply.live import apply_started
        from kvmhooks.domain import parse_domain

        vlog = VMLog("?", uuid)
        try:
            dom = self.conn.lookupByUUIDString(uuid)
            vlog = VMLog(dom.name(), uuid)
            d = parse_domain(dom.XMLDesc(0).encode())
            done = operations.retune(d, self.cfg)
            if done is None:
                return
            applied = apply_started(self.conn, dom, d, self.cfg, vlog)
            applied.tuned_by = "agent"
            applied.problems += [f"pending restart: {p}" for p in done.pending_restart] + list(done.warnings)

            def record(rec: DomainRecord) -> None:
                applied.balloon = rec.applied.balloon  # the balloon step's own part stays as it landed
                rec.applied, rec.error = applied, None

            operations.update(uuid, self.cfg, record)
            operations.clear_failure(self.cfg, uuid)
            vlog.info("agent: re-tuned after an annotation change: pins %s%s", applied.pins,
                      f"; pending restart: {'; '.join(done.pending_restart)}" if done.pending_restart else "")
            t = d.active_tuning
            if t is not None and t.balloon is not None and t.balloon.policy == "fixed":
                self._balloon_when_running(uuid, dom, vlog)  # a new target (the automatic policy: its next cycle)
        except Exception as e:  # an invalid edit (KvmhooksError), or the VM went away: the old tuning stays
            vlog.warning("agent: live annotation change not applied (the previous tuning stays): %s", e)
            operations.record_failure(self.cfg, uuid, "retune", f"live annotation change not applied: {e}")

    def _defined(self, uuid: str) -> None:
        """The saved definition changed (``virsh edit``, virt-manager on the persistent config, ``virsh define``).
        For a running VM that changes nothing now; if its annotation differs from the running one, status says
        so ("pending restart", or ``kvmhooks annotate --live`` to apply it now) instead of leaving the admin
        to wonder why the edit did nothing."""
        import libvirt

        from kvmhooks import operations
        from kvmhooks.domain import parse_domain

        try:
            dom = self.conn.lookupByUUIDString(uuid)
            rec = operations.ledger_for(self.cfg).read().domains.get(uuid)
            if rec is None or not dom.isActive():
                return
            live = parse_domain(dom.XMLDesc(0).encode()).tuning
            problem = None
            try:
                if parse_domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode()).tuning != live:
                    problem = f"{SAVED_DIFFERS}: it applies at the next start, or now with 'kvmhooks annotate --live'"
            except KvmhooksError as e:  # prepare will refuse the next start: say so now
                problem = f"{SAVED_DIFFERS} and is invalid (the next start will be refused): {e}"

            def note(r: DomainRecord) -> None:  # only this line of the record: a re-tune may run meanwhile
                r.applied.problems = [p for p in r.applied.problems if not p.startswith(SAVED_DIFFERS)]
                if problem is not None:
                    r.applied.problems.append(problem)

            operations.update(uuid, self.cfg, note)
            if problem is not None:
                VMLog(rec.name, uuid).info("agent: %s", problem)
        except Exception as e:  # it went away meanwhile
            log.info("agent: definition of %s changed: %s", uuid, e)

    def _check_drift(self, uuid: str) -> None:
        """Pins or memtune changed: by kvmhooks (tuning, a shared re-pin) or by hand? Compare, after a moment
        (kvmhooks records its own changes right after making them), the live pins with the ledger's plan and
        the live memtune with what kvmhooks read back after setting it (libvirt sends no TUNABLE event for
        memtune: the periodic check finds those)."""
        time.sleep(DRIFT_SETTLE)
        self._serial(uuid, "tuning", "drift", lambda: self._drift_once(uuid))

    def _drift_once(self, uuid: str) -> None:
        """One drift check, run exclusively with the VM's tuning jobs (it reads the plan they change)."""
        import libvirt

        from kvmhooks import operations
        from kvmhooks.apply.live import apply_memtune, apply_pins, read_pins
        from kvmhooks.units import format_cpuset

        try:
            rec = operations.ledger_for(self.cfg).read().domains.get(uuid)
            if rec is None or rec.state != "running":
                return  # not managed, or its tuning is not finished
            dom = self.conn.lookupByUUIDString(uuid)
            changed: list[str] = []
            if rec.pins is not None:
                live_vcpus, live_emulator = read_pins(dom)
                changed = [f"vCPU {v} on {cs} (planned {format_cpuset(rec.pins.vcpus[int(v)])})"
                           for v, cs in sorted(live_vcpus.items(), key=lambda kv: int(kv[0]))
                           if int(v) in rec.pins.vcpus and cs != format_cpuset(rec.pins.vcpus[int(v)])]
                if rec.pins.emulator and live_emulator != format_cpuset(rec.pins.emulator):
                    changed.append(f"emulator on {live_emulator} (planned {format_cpuset(rec.pins.emulator)})")
            pins_changed = bool(changed)
            memtune = rec.applied.memtune
            live_mt = dom.memoryParameters(libvirt.VIR_DOMAIN_AFFECT_LIVE) if memtune else {}
            mt_changed = {k: v for k, v in memtune.items() if abs(int(live_mt.get(k, -1)) - v) >= 4}  # (pages)
            changed += [f"memtune {k} {live_mt.get(k)} KiB (set {v} KiB)" for k, v in sorted(mt_changed.items())]
            if not changed:
                return
            vlog = VMLog(rec.name, uuid)
            what = "changed by hand: " + "; ".join(changed)
            if self.cfg.drift == "restore":
                if pins_changed and rec.pins is not None:
                    apply_pins(self.conn, dom, rec.pins, False, vlog)
                # Lowering a hard limit under a running guest can get QEMU OOM-killed: reported, never forced.
                risky = {k for k, v in mt_changed.items()
                         if k in ("hard_limit", "swap_hard_limit") and v < int(live_mt.get(k, -1))}
                if set(mt_changed) - risky:
                    apply_memtune(dom, sorted((k, v) for k, v in mt_changed.items() if k not in risky), vlog)
                what += "; restored" if not risky else (
                    f"; {'restored but ' if len(changed) > len(risky) else ''}not lowered back: memtune "
                    f"{', '.join(sorted(risky))} (lowering it under a running guest could get QEMU killed; "
                    "set it by hand if meant)")
            vlog.warning("agent: %s", what)
            operations.record_failure(self.cfg, uuid, "drift", what)
            if self.metrics is not None:
                if pins_changed:
                    self.metrics.drift(rec.name, "pins")
                if mt_changed:
                    self.metrics.drift(rec.name, "memtune")
        except Exception as e:  # it may have stopped meanwhile
            log.info("agent: drift check of %s: %s", uuid, e)

    def check_all_drift(self) -> None:
        from kvmhooks import operations

        try:
            managed = [u for u, r in operations.ledger_for(self.cfg).read().domains.items()
                       if r.state == "running" and (r.pins is not None or r.applied.memtune)]
        except KvmhooksError as e:
            log.info("agent: periodic drift check skipped: %s", e)
            return
        for uuid in managed:
            self._spawn(self._check_drift, uuid)

    def catch_up(self) -> None:
        """After (re)connecting: a running VM whose tuning never finished (the ledger still says "starting":
        the agent or its libvirt connection went away in between) is tuned now. Tuning twice is harmless."""
        import libvirt

        from kvmhooks import operations

        try:
            state = operations.ledger_for(self.cfg).read()
        except KvmhooksError as e:
            log.warning("agent: cannot read the ledger to catch up: %s", e)
            return
        with self.lock:
            deferred = list(self.at_resume)
        for uuid in deferred:  # a deferral whose STOPPED event was missed while disconnected
            try:
                active = bool(self.conn.lookupByUUIDString(uuid).isActive())
            except libvirt.libvirtError:
                active = False
            if not active:
                with self.lock:
                    self.at_resume.pop(uuid, None)
        handed = set(self._handoffs(older_than=0))  # left while the agent was away or disconnected
        # A hand-over taken but never finished (the agent died between the STARTED event and its "running"
        # mark) leaves no handoff marker: the record still says "prepared" while its tune/ marker says the
        # started hook had work.
        led = operations.ledger_for(self.cfg)
        for uuid, rec in state.domains.items():
            unfinished = rec.state == "starting" or uuid in handed or (
                rec.state == "prepared" and UUID_RE.fullmatch(uuid) is not None and (led.tune_dir / uuid).exists())
            if not unfinished or led.tuning_taken(uuid):  # (the worker its prepare forked tunes it)
                continue
            try:
                running = bool(self.conn.lookupByUUIDString(uuid).isActive())
            except libvirt.libvirtError:
                running = False
            if running:
                VMLog(rec.name, uuid).info("agent: its tuning never finished; tuning it now")
                self._spawn(self._tune, uuid)
        self.check_owed_balloons()  # a VM resumed while disconnected: its RESUMED event was lost

    def _missed_events(self) -> None:
        """A promised VM whose STARTED event did not come: look at it anyway (bounded by the worker's wait)."""
        now = time.monotonic()
        with self.lock:
            late = [u for u, t in self.pending.items() if now - t > EVENT_GRACE]
            for u in late:
                del self.pending[u]
        late += self._handoffs(older_than=EVENT_GRACE)
        for u in late:
            self._spawn(self._tune, u)

    # --- the shell's hand-over (hooks/qemu at started, no Python) ------------------------------------------

    @property
    def handoff_dir(self) -> Path:
        return self.cfg.state_dir / HANDOFF_DIR

    def _take_handoff(self, uuid: str) -> bool:
        """Whether the shell handed this VM's start over (the marker is gone once taken: one tuning per start)."""
        if not UUID_RE.fullmatch(uuid):
            return False
        try:
            (self.handoff_dir / uuid).unlink()
            return True
        except OSError:
            return False

    def _handoffs(self, older_than: float) -> list[str]:
        """Hand-overs no event took within ``older_than`` seconds (the event was missed, or the agent was
        away): taken now. The tuning itself waits for a start still in progress (tune_live, bounded)."""
        now = time.time()
        taken = []
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.handoff_dir):
                with contextlib.suppress(OSError):
                    if now - entry.stat(follow_symlinks=False).st_mtime >= older_than and \
                            self._take_handoff(entry.name):
                        taken.append(entry.name)
        return taken

    # --- the loop ---------------------------------------------------------------------------------------

    def _connect(self) -> Any:
        import libvirt

        conn = libvirt.open(self.cfg.libvirt_uri)
        conn.setKeepAlive(5, 3)
        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, None)
        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE, self._metadata, None)
        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_TUNABLE, self._tunable, None)
        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE, self._balloon_change, None)
        return conn

    def run(self, once: bool = False) -> int:
        """Serve until :attr:`stop` is set. Refuses (HostError) while another agent runs on this host."""
        lock = take_lock(self.cfg)  # before the socket and the pid file: they are the lock holder's alone
        pid_file = self.cfg.state_dir / PID_NAME  # which process is the agent (start-agent.sh restarts it)
        servers: list[Any] = []
        try:
            self._run(once, pid_file, servers)
        finally:
            if self.prepare_server is not None:  # (first: its prepares under way may answer)
                self.prepare_server.close()
            for srv in servers:
                srv.close()
            for path in (socket_path(self.cfg), metrics_socket_path(self.cfg), pid_file):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            os.close(lock)  # only now may another agent start
        log.info("agent: stopped")
        return 0

    def _run(self, once: bool, pid_file: Path, servers: list[Any]) -> None:
        import libvirt

        from kvmhooks.apply.libvirt import quiet_libvirt

        quiet_libvirt()
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=self._events, name="libvirt-events", daemon=True).start()
        self.serve()
        self._serve_prepare()  # (after serve: its umask, set for the socket's bind, is the whole process's)
        from kvmhooks.metrics import registry, serve_unix

        reg, self.metrics = registry(self.cfg, live_balloon=self._live_balloon)
        servers.append(serve_unix(reg, metrics_socket_path(self.cfg)))  # always (root only): `kvmhooks metrics`
        if self.cfg.metrics_listen:
            from kvmhooks.metrics import serve_http

            servers.append(serve_http(reg, self.cfg.metrics_listen))
            log.info("agent: Prometheus metrics on http://%s/metrics", self.cfg.metrics_listen)
        self.handoff_dir.mkdir(mode=0o755, exist_ok=True)  # (root's, like the rest of the state directory)
        self._write_pid(pid_file)  # last: start-agent.sh takes it as "ready"
        log.info("agent: started (socket %s, balloon every %g s)", socket_path(self.cfg), self.cfg.balloon_interval)
        backoff = BACKOFF_MIN
        next_balloon = 0.0
        next_drift = time.monotonic() + DRIFT_PERIOD
        next_owed = time.monotonic() + OWED_BALLOON_PERIOD  # (the first look is catch_up's, at the connect)
        while not self.stop.is_set():
            try:
                self._keep_files(pid_file, servers, reg)
            except OSError as e:  # (the state directory itself went away): tried again next round
                log.warning("agent: cannot put its socket or pid file back: %s", e)
            try:
                if self.conn is None or not self.conn.isAlive():
                    self.conn = self._connect()
                    backoff = BACKOFF_MIN
                    log.info("agent: connected to %s", self.cfg.libvirt_uri)
                    with self.lock:
                        self.balloon_actual.clear()  # events may have been missed while disconnected
                    self.catch_up()
                self._missed_events()
                if time.monotonic() >= next_drift:
                    next_drift = time.monotonic() + DRIFT_PERIOD
                    self.check_all_drift()
                if time.monotonic() >= next_owed:
                    next_owed = time.monotonic() + OWED_BALLOON_PERIOD
                    self.check_owed_balloons()
                if time.monotonic() >= next_balloon:
                    next_balloon = time.monotonic() + self.cfg.balloon_interval
                    with self._timed("balloon"):
                        moved = self.balloon.cycle(self.conn)
                    if self.metrics is not None:
                        for uuid in moved:
                            self.metrics.balloon_adjusted(uuid)
            except libvirt.libvirtError as e:
                log.warning("agent: libvirt unavailable (%s); retrying in %g s", e, backoff)
                self.conn = None
                self.stop.wait(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)
                continue
            except Exception:  # the agent keeps guests tuned and alive: log a bug, go on
                log.exception("agent: cycle failed")
            if once:
                break
            self.stop.wait(0.2)

    def _repin_soon(self, cfg: Config) -> None:
        """After a release served here freed dedicated CPUs: the shared VMs float over them again, over this
        agent's connection, in a thread of its own (the hook's answer does not wait for libvirt), planned with
        ``cfg``, the config the served call read (the admin may have changed it since the agent started)."""
        threading.Thread(target=self._repin, args=(cfg,), name="agent-repin", daemon=True).start()

    def _repin(self, cfg: Config) -> None:
        from kvmhooks.apply.live import repin_shared
        from kvmhooks.prepare_server import spawn_repin_worker

        conn = self.conn
        if conn is None:  # not connected now: a worker connects on its own
            spawn_repin_worker()
            return
        try:
            with self._timed("repin"):
                repin_shared(conn, cfg, VMLog("-", "-"))
        except Exception:  # (libvirt away meanwhile: the next start of a shared VM plans afresh)
            log.exception("agent: re-pinning the shared VMs failed")
            if self.metrics is not None:
                self.metrics.failed("repin")

    def _serve_prepare(self) -> None:
        """hooks/qemu's prepare without an interpreter to start; the hook runs its own when this is not served."""
        from kvmhooks.prepare_server import PrepareServer

        server = PrepareServer(self.cfg, repin=self._repin_soon)
        try:
            server.start()
        except (OSError, KvmhooksError) as e:
            server.close(0)
            log.warning("agent: prepare not served (%s): the hook runs it in Python", e)
            return
        self.prepare_server = server

    def _write_pid(self, pid_file: Path) -> None:
        tmp = pid_file.with_name(f".{PID_NAME}.{os.getpid()}")
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, pid_file)

    def _keep_files(self, pid_file: Path, servers: list[Any], reg: Any) -> None:
        """Put back a socket or pid file of ours that vanished. An agent from before agent.lock holds no lock
        and removes both sockets and the pid file when it exits: ran beside this one (an upgrade without
        systemd, before start-agent.sh stopped it), its exit would leave the hook without an agent."""
        from kvmhooks.metrics import serve_unix

        if not socket_path(self.cfg).exists():
            log.warning("agent: %s was removed (another agent that exited?); serving it again",
                        socket_path(self.cfg))
            self.serve()
        if not metrics_socket_path(self.cfg).exists():
            servers[0].close()
            servers[0] = serve_unix(reg, metrics_socket_path(self.cfg))
        if not pid_file.exists():
            self._write_pid(pid_file)

    def _events(self) -> None:
        import libvirt

        while not self.stop.is_set():
            try:
                libvirt.virEventRunDefaultImpl()
            except Exception:  # the loop must outlive one bad callback
                log.exception("agent: event loop")
