"""The per-VM QMP socket directory: created at prepare, the socket removed at release.

Kept apart from :mod:`kvmhooks.apply.qmp` so the hook does not import qemu.qmp (and asyncio) to do it.
"""

from __future__ import annotations

import contextlib
import os


def ensure_socket_dir(socket_path: str) -> None:
    """Create the socket's directory owned like its parent (the QEMU user's /var/lib/libvirt/qemu): QEMU
    runs as that user and must be able to create the socket (under /run/libvirt/qemu it cannot)."""
    d = os.path.dirname(socket_path)
    parent = os.stat(os.path.dirname(d))
    os.makedirs(d, mode=0o750, exist_ok=True)
    os.chown(d, parent.st_uid, parent.st_gid)


def remove_socket(socket_path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
