"""kvmhooksd runs the prepare hook: the hook's own code (:func:`kvmhooks.hook.call`) without an interpreter to start.

An annotated VM's prepare is the one hook call of a start that must run Python: 70–90 ms of a 500 ms start,
most of it the interpreter and its imports (lxml, the ledger). While kvmhooksd runs, hooks/qemu hands the
call to it, and runs its own Python prepare only when that exchange fails, in any way. The same goes for the
stop of a VM that holds something (``stopped``, or ``release`` when that comes first): its release is the one
Python call of a ``virsh destroy`` (≈ 60 ms of ≈ 240 ms here). A release that frees dedicated CPUs lets the
shared VMs float over them through the agent's own libvirt connection (``repin``), not a forked worker.

The exchange needs nothing a POSIX shell lacks (Debian's base has no unix-socket client): files and FIFOs in
a root-only directory (``STATE/prepare``, 0700) that this server makes and reads.

1. The shell writes ``PID.args`` (:data:`MAGIC`, the config file it would read, argc and argv, each ended by
   a NUL) and ``PID.xml`` (exactly the bytes the hook's Python would read: the XML up to MAX_XML_BYTES + 1),
   makes a ``PID.reply`` FIFO, writes its PID as one line into the ``requests`` FIFO (a few bytes, far below
   PIPE_BUF: the lines of two shells never mix) and opens ``PID.reply`` to read.
2. The server *takes* the request by opening ``PID.reply`` to write (the shell waits :data:`PICKUP_WAIT`
   for that), removes the three names, runs prepare in a thread of its own, writes ``kvmhooks-prepare CODE
   LEN`` and a newline, then the LEN bytes the hook would have written to stderr, and closes.
3. The shell prints that text and exits with that code.

The shell runs its Python prepare instead (and removes its files) when kvmhooksd does not run (its lock is
free), the FIFO is missing, nobody takes the request in time, the answer does not come in time, or comes
incomplete — an agent that dies after taking a request closes the reply FIFO, so the shell sees its end at
once. The server refuses (closes the reply unanswered: the shell goes to Python without waiting) what it
cannot serve exactly as the hook would: a config that does not load or names another state directory,
kvmhooks' files changed since the agent started (an upgrade: the hook would run the new code), a malformed
request.

A prepare the agent began and the shell then runs again in Python is safe: both take the ledger lock, and the
second finds the first's reservation and replaces it; one killed midway leaves intents that the next session
rolls back (:mod:`kvmhooks.operations`). A release run twice finds nothing the second time. Neither calls
libvirt, so these threads never wait on the agent's libvirt event thread (the repin after a release runs in
a thread of its own).
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import re
import select
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import kvmhooks
from kvmhooks.config import Config, load_config
from kvmhooks.errors import HostError, KvmhooksError

log = logging.getLogger(__name__)

DIR_NAME = "prepare"  # hooks/qemu's PREP, in the state directory
REQUESTS = "requests"
MAGIC = b"kvmhooks-prepare 1"
REPLY = "kvmhooks-prepare"
# hooks/qemu's PICKUP: how long the shell waits for its request to be taken. The server stops trying to take
# a request after as long: its shell has gone to Python by then.
PICKUP_WAIT = 1.0
# The args file holds a config path and libvirt's four arguments, a domain name among them: far less.
ARGS_MAX = 64 * 1024
# Request files this old have no shell behind them (a shell waits PICKUP + ANSWER at most, then its Python
# prepare, bounded by lock_timeout + retry_timeout): one killed meanwhile left them; removed when the agent starts.
STALE_AGE = 600.0
# How long a stopping agent lets the prepares under way answer (one cut short is safe, and falls back).
DRAIN_WAIT = 5.0
# The hook calls served: prepare, and the stop of a VM that holds something (the shell sends only those).
SERVED = ("prepare", "stopped", "release")
# A request is named by its shell's PID: no other name is ever opened.
_NAME_RE = re.compile(r"[0-9]{1,10}")
_PARTS = (".args", ".xml", ".reply")
_OPEN = os.O_NOFOLLOW | os.O_CLOEXEC


class PrepareServer:
    """The server side of hooks/qemu's prepare exchange (see the module docstring)."""

    def __init__(self, cfg: Config, package_dir: Path | None = None,
                 repin: Callable[[Config], None] | None = None):
        self.cfg = cfg
        # After a release that freed dedicated CPUs, with its config (a worker reads the file itself).
        self._repin = repin or (lambda cfg: spawn_repin_worker())
        self.dir = cfg.state_dir / DIR_NAME
        self._package = package_dir or Path(kvmhooks.__file__).parent
        self._code = code_signature(self._package)  # the code this process runs
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._busy: set[threading.Thread] = set()
        self._reader: threading.Thread | None = None
        self._dir_fd = -1
        self._fifo_fd = -1  # the requests FIFO, opened to read and write: it never reaches end of file
        self._said: set[str] = set()  # refusals logged once

    def start(self) -> None:
        """Make the directory and a new FIFO (a previous agent's goes, and request files left long ago) and serve.

        :raise HostError: the directory is not root's own (nothing is served: the hook runs Python).
        """
        self.dir.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        with contextlib.suppress(FileExistsError):
            self.dir.mkdir(mode=0o700)
        self._dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | _OPEN)
        if os.fstat(self._dir_fd).st_uid != os.geteuid():
            raise HostError(f"{self.dir} is not owned by this user; prepare is not served by kvmhooksd")
        os.fchmod(self._dir_fd, 0o700)
        self._sweep()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(REQUESTS, dir_fd=self._dir_fd)
        os.mkfifo(REQUESTS, 0o600, dir_fd=self._dir_fd)
        self._fifo_fd = os.open(REQUESTS, os.O_RDWR | os.O_NONBLOCK | _OPEN, dir_fd=self._dir_fd)
        from kvmhooks import hook, operations  # noqa: F401  (now: not in the first start's time)

        self._reader = threading.Thread(target=self._read, name="prepare-requests", daemon=True)
        self._reader.start()

    def close(self, wait: float = DRAIN_WAIT) -> None:
        """Take no more requests, let those under way answer for up to ``wait`` seconds, remove the FIFO."""
        self._stop.set()
        deadline = time.monotonic() + wait
        if self._reader is not None:
            self._reader.join(wait)
        with self._lock:
            busy = list(self._busy)
        for t in busy:
            t.join(max(0.0, deadline - time.monotonic()))
        if self._dir_fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(REQUESTS, dir_fd=self._dir_fd)
        for fd in (self._fifo_fd, self._dir_fd):
            if fd >= 0:
                os.close(fd)
        self._fifo_fd = self._dir_fd = -1

    def _sweep(self) -> None:
        now = time.time()
        for entry in os.scandir(self._dir_fd):
            with contextlib.suppress(OSError):
                if entry.name.endswith(_PARTS) and now - entry.stat(follow_symlinks=False).st_mtime > STALE_AGE:
                    os.unlink(entry.name, dir_fd=self._dir_fd)

    def _read(self) -> None:
        buf = b""
        while not self._stop.is_set():
            try:
                if not select.select([self._fifo_fd], [], [], 0.5)[0]:
                    continue
                buf += os.read(self._fifo_fd, 4096)
            except BlockingIOError:
                continue
            except OSError as e:
                log.error("agent: prepare requests: %s; the hook runs prepare itself from now on", e)
                return
            *lines, buf = buf.split(b"\n")
            if len(buf) > 4096:  # (a request line is a PID: not a request)
                buf = b""
            for line in lines:
                name = line.decode("ascii", "replace")
                if _NAME_RE.fullmatch(name):
                    t = threading.Thread(target=self._serve, args=(name,), name=f"prepare-{name}", daemon=True)
                    with self._lock:
                        self._busy.add(t)
                    t.start()
                else:
                    log.warning("agent: prepare request %r ignored: not a PID", name[:64])

    def _serve(self, name: str) -> None:
        try:
            w = self._take(name)
            if w is None:
                return  # its shell is gone (and ran Python)
            try:
                with open(self._open(f"{name}.args"), "rb") as args, open(self._open(f"{name}.xml"), "rb") as xml:
                    for part in _PARTS:  # taken: the shell leaves them (a fallback reads the XML it keeps open)
                        os.unlink(name + part, dir_fd=self._dir_fd)
                    answer = self._answer(args, xml, w)
                if answer is not None:
                    _write_all(w, answer)
            finally:
                os.close(w)  # unanswered: the shell sees the end of the reply and runs Python
        except BrokenPipeError:  # (the agent is signal-safe: SIGPIPE is ignored in Python)
            log.warning("agent: hook request %s: its hook stopped waiting before the answer", name)
        except Exception:
            log.exception("agent: hook request %s failed; the hook runs it itself", name)
        finally:
            with self._lock:
                self._busy.discard(threading.current_thread())

    def _open(self, name: str) -> int:
        return os.open(name, os.O_RDONLY | _OPEN, dir_fd=self._dir_fd)

    def _take(self, name: str) -> int | None:
        """The reply FIFO, open to write (the shell waits for that in its open), or None: its shell is gone."""
        deadline = time.monotonic() + PICKUP_WAIT
        while True:
            try:
                w = os.open(f"{name}.reply", os.O_WRONLY | os.O_NONBLOCK | _OPEN, dir_fd=self._dir_fd)
                break
            except OSError as e:  # ENXIO: no reader yet (the shell writes the request line, then opens)
                if e.errno != errno.ENXIO or time.monotonic() >= deadline or self._stop.is_set():
                    return None
                time.sleep(0.002)
        if not stat.S_ISFIFO(os.fstat(w).st_mode):
            os.close(w)
            return None
        os.set_blocking(w, True)
        return w

    def _answer(self, args: BinaryIO, xml: BinaryIO, reply: int) -> bytes | None:
        """The hook's exit code and stderr for this request; None when it cannot be served as the hook would.
        Nothing of it is done once the hook stopped waiting (``reply`` has no reader left): see
        :func:`kvmhooks.operations.served`."""
        from kvmhooks import operations
        from kvmhooks.hook import call

        served = self._servable(read_args(args))
        if isinstance(served, str):
            if served not in self._said:  # (once: the next starts would say the same)
                self._said.add(served)
                log.warning("agent: prepare not served (%s): the hook runs it in Python", served)
            return None
        cfg, argv = served
        err = io.StringIO()
        with operations.served(lambda: hook_waits(reply)):
            code = call(["kvmhooksd", *argv], xml, lambda: cfg, err, repin=self._repin, forks=False)
        text = err.getvalue().encode("utf-8", "backslashreplace")  # as Python's sys.stderr encodes
        return f"{REPLY} {code} {len(text)}\n".encode() + text

    def _servable(self, request: tuple[str, list[str]] | None) -> tuple[Config, list[str]] | str:
        """The config and arguments the hook would run with, or why this process cannot run it so."""
        if request is None or len(request[1]) < 2 or request[1][1] not in SERVED:
            return "a malformed request"
        config, argv = request
        try:
            cfg = load_config(Path(config))  # the file the hook would read now, as it would read it
        except KvmhooksError as e:
            return f"its config does not load ({e})"  # the hook's Python says it, its way
        if cfg.state_dir != self.cfg.state_dir:
            return f"{config} names another state directory than kvmhooksd's"
        if code_signature(self._package) != self._code:
            return (f"kvmhooks' files in {self._package} changed since kvmhooksd started (an upgrade?); restart "
                    "kvmhooksd")
        return cfg, argv


def hook_waits(reply: int) -> bool:
    """Whether the hook's client still holds the reply FIFO open to read: it closes it when it gives up (the
    answer deadline kills it), and a FIFO's write end then polls POLLERR."""
    p = select.poll()
    p.register(reply, select.POLLOUT)
    return not any(ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, ev in p.poll(0))


def spawn_repin_worker() -> None:
    """The repin job in a worker of its own (``python -m kvmhooks.worker repin -``): fork *and exec*, the only
    safe way out of a threaded process (hook.run's default, :func:`kvmhooks.worker.spawn_detached`, forks
    without exec: fine for the single-threaded hook, not here). The worker reads the config file itself, as
    the hook did just before."""
    import subprocess
    import sys

    try:
        subprocess.Popen([sys.executable, "-I", "-m", "kvmhooks.worker", "repin", "-"], cwd="/",
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    except OSError as e:
        log.warning("agent: cannot start the repin worker: %s; shared VMs keep their pins until the next start", e)


def read_args(f: BinaryIO) -> tuple[str, list[str]] | None:
    """(config path, libvirt's arguments) from a request's ``args``; None if it is not one."""
    raw = f.read(ARGS_MAX + 1)
    fields = raw.split(b"\0")
    if len(raw) > ARGS_MAX or len(fields) < 4 or fields[0] != MAGIC or not fields[2].isdigit():
        return None
    n = int(fields[2])
    if len(fields) != n + 4 or fields[-1] != b"":
        return None
    return os.fsdecode(fields[1]), [os.fsdecode(f) for f in fields[3:-1]]  # (decoded as Python decodes argv)


def code_signature(package: Path) -> frozenset[tuple[str, int, int]]:
    """Each source file of the package with its modification time and size: an upgrade changes them."""
    out = set()
    for d, dirs, files in os.walk(package):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        for f in files:
            if f.endswith(".py"):
                with contextlib.suppress(OSError):
                    st = os.stat(os.path.join(d, f))
                    out.add((os.path.join(d, f), st.st_mtime_ns, st.st_size))
    return frozenset(out)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
