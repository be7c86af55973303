"""The per-VM QMP socket directory: created at prepare, the socket removed at release.

Kept apart from :mod:`kvmhooks.apply.qmp` so the hook does not import qemu.qmp (and asyncio) to do it.

This runs as root in a directory the QEMU user owns (/var/lib/libvirt/qemu), so that user can replace
``kvmhooks/`` with a symlink to /etc, or anything else, between two VM starts; ``os.makedirs`` + ``os.chown``
would then hand /etc to the QEMU user. So nothing here follows a link: the parent and the directory are
opened with O_DIRECTORY|O_NOFOLLOW, the directory is created and opened relative to the parent's
descriptor, and its owner and mode are set through its own descriptor (fchown/fchmod). Anything that is not
a real directory is refused with one line (prepare) or left alone (release).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat

from kvmhooks.errors import HostError
from kvmhooks.xmlsafe import UUID_RE

log = logging.getLogger(__name__)


def qmp_socket_path(uuid: str) -> str:
    """The one QMP socket path kvmhooks uses for a VM; derived from the checked UUID only. (Here, not in
    :mod:`kvmhooks.domain`: a stop removes the socket without loading the XML parser.)"""
    if not UUID_RE.fullmatch(uuid):
        raise ValueError(f"not a canonical UUID: {uuid!r}")
    return f"{QMP_SOCKET_DIR}/{uuid}.qmp"

# Where kvmhooks puts a VM's dedicated QMP socket: writable by the QEMU user (libvirt-qemu), unlike
# /run/libvirt/qemu (measured: "Permission denied" there). Derived from the UUID only.
QMP_SOCKET_DIR = "/var/lib/libvirt/qemu/kvmhooks"

# QEMU (the directory's owner) creates its socket there; its group may read; nobody else needs to look.
SOCKET_DIR_MODE = 0o750
# O_RDONLY on a directory lists nothing by itself; O_DIRECTORY fails with ENOTDIR on anything else (a FIFO
# is never opened, so never blocks), O_NOFOLLOW with ELOOP on a symlink as the last component.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NOT_A_DIR = (errno.ELOOP, errno.ENOTDIR)


class _NotARealDirectory(Exception):
    """Internal: the path exists but is a symlink or not a directory (each caller decides what that means)."""


def _split(directory: str, socket_path: str | None) -> tuple[str, str]:
    """(parent, name) of the socket directory; a socket path given must lie directly in it."""
    d = os.path.normpath(directory)
    parent, name = os.path.split(d)
    if not os.path.isabs(d) or name in ("", ".", ".."):
        raise ValueError(f"not a usable socket directory: {directory!r}")
    if socket_path is not None and os.path.dirname(os.path.normpath(socket_path)) != d:
        raise ValueError(f"socket {socket_path!r} is not directly in {directory!r}")
    return parent, name


def _open_dir(path: str, dir_fd: int | None = None) -> int:
    """A descriptor for a real directory, never through a symlink in its last component.

    :raise _NotARealDirectory: a symlink, or not a directory. Other OSErrors (ENOENT, EACCES) as they come.
    """
    try:
        return os.open(path, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in _NOT_A_DIR:
            raise _NotARealDirectory from e
        raise


def _refused(path: str) -> HostError:
    return HostError(f"{path}: not a real directory (a symlink or another kind of file, which the QEMU user can "
                     "plant there); refusing to touch it. Remove it; kvmhooks recreates the directory")


def ensure_socket_dir(socket_path: str | None = None, *, directory: str = QMP_SOCKET_DIR) -> None:
    """Create the QMP socket directory owned like its parent (the QEMU user's /var/lib/libvirt/qemu), mode
    0750: QEMU runs as that user and must be able to create the socket (under /run/libvirt/qemu it cannot).

    ``socket_path``, when given, must lie directly in ``directory`` (callers name the socket they want).

    :raise HostError: one line naming the path, when the parent or the directory is not a real directory
        (e.g. a symlink planted by the QEMU user), or the parent is missing or cannot be opened.
    """
    parent, name = _split(directory, socket_path)
    try:
        pfd = _open_dir(parent)
    except _NotARealDirectory:
        raise _refused(parent) from None
    except FileNotFoundError:
        raise HostError(f"{parent}: does not exist (is libvirt's QEMU driver installed?); cannot create "
                        f"{os.path.join(parent, name)} for the VM's QMP socket") from None
    except OSError as e:
        raise HostError(f"{parent}: cannot open: {e.strerror}") from None
    try:
        _ensure_child(pfd, name, os.path.join(parent, name))
    finally:
        os.close(pfd)


def _ensure_child(pfd: int, name: str, path: str) -> None:
    """mkdir + open + fchown/fchmod of ``name`` in the directory ``pfd``, all through descriptors."""
    try:
        parent_st = os.fstat(pfd)
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, SOCKET_DIR_MODE, dir_fd=pfd)
        dfd = _open_dir(name, dir_fd=pfd)
    except _NotARealDirectory:
        raise _refused(path) from None
    except OSError as e:
        raise HostError(f"{path}: cannot create the QMP socket directory: {e.strerror}") from None
    try:
        st = os.fstat(dfd)
        if not stat.S_ISDIR(st.st_mode):  # O_DIRECTORY already guarantees it; cheap to be sure
            raise _refused(path)
        if (st.st_uid, st.st_gid) != (parent_st.st_uid, parent_st.st_gid):
            os.fchown(dfd, parent_st.st_uid, parent_st.st_gid)
        if stat.S_IMODE(st.st_mode) != SOCKET_DIR_MODE:
            os.fchmod(dfd, SOCKET_DIR_MODE)
    except OSError as e:
        raise HostError(f"{path}: cannot set its owner and mode: {e.strerror}") from None
    finally:
        os.close(dfd)


def remove_socket(socket_path: str, *, directory: str = QMP_SOCKET_DIR) -> None:
    """Remove a VM's QMP socket (QEMU leaves it behind); idempotent.

    Unlinks relative to the directory's descriptor, so a symlink planted in place of the directory (or its
    parent) is never followed. A missing socket or directory is fine; a symlinked or non-directory
    directory, or a directory planted where the socket was, is logged and left alone: release must not fail.
    """
    parent, name = _split(directory, socket_path)
    d = os.path.join(parent, name)
    sock = os.path.basename(os.path.normpath(socket_path))
    fds: list[int] = []
    try:
        fds.append(_open_dir(parent))
        fds.append(_open_dir(name, dir_fd=fds[0]))
        os.unlink(sock, dir_fd=fds[1])
    except FileNotFoundError:
        pass
    except _NotARealDirectory:
        log.warning("%s: not a real directory (a symlink?); left alone, %s not removed", d, sock)
    except IsADirectoryError:
        log.warning("%s/%s: a directory, not a socket; left alone", d, sock)
    finally:
        for fd in fds:
            os.close(fd)
