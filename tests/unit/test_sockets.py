"""The QMP socket directory under the QEMU user's /var/lib/libvirt/qemu, created and cleaned as root.

That user owns the parent, so it can replace ``kvmhooks/`` with a symlink (to /etc, say) between two VM
starts. Nothing here may then chown, chmod or unlink through the link: it refuses, one line.
"""

from __future__ import annotations

import inspect
import os
import stat
from pathlib import Path

import pytest

from kvmhooks.apply.sockets import QMP_SOCKET_DIR, ensure_socket_dir, remove_socket
from kvmhooks.errors import HostError

QEMU_UID = QEMU_GID = 64055  # an unprivileged owner for the fake /var/lib/libvirt/qemu
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


@pytest.fixture
def parent(tmp_path: Path) -> Path:
    """A stand-in for /var/lib/libvirt/qemu, owned by the QEMU user where we can arrange it."""
    p = tmp_path / "qemu"
    p.mkdir(mode=0o750)
    if os.geteuid() == 0:
        os.chown(p, QEMU_UID, QEMU_GID)
    return p


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """What a planted symlink points at (think /etc): must come out untouched."""
    v = tmp_path / "etc"
    v.mkdir()
    v.chmod(0o755)
    (v / "shadow").write_text("secret")
    return v


def _owner_mode(p: Path) -> tuple[int, int, int]:
    st = p.stat()
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def test_the_default_directory_is_the_real_one() -> None:
    assert inspect.signature(ensure_socket_dir).parameters["directory"].default == QMP_SOCKET_DIR
    assert inspect.signature(remove_socket).parameters["directory"].default == QMP_SOCKET_DIR


def test_creates_the_directory_owned_like_its_parent_mode_0750(parent: Path) -> None:
    d = parent / "kvmhooks"
    ensure_socket_dir(str(d / "u.qmp"), directory=str(d))
    st = d.stat()
    assert stat.S_ISDIR(st.st_mode) and not d.is_symlink()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (*_owner_mode(parent)[:2], 0o750)
    ensure_socket_dir(directory=str(d))  # again: already there is fine


@needs_root
def test_an_existing_directory_gets_the_right_owner_and_mode(parent: Path) -> None:
    d = parent / "kvmhooks"
    d.mkdir()
    d.chmod(0o777)
    ensure_socket_dir(directory=str(d))
    assert _owner_mode(d) == (QEMU_UID, QEMU_GID, 0o750)


@pytest.mark.parametrize("plant", ["symlink-to-dir", "symlink-to-file", "dangling-symlink", "file", "fifo"])
def test_a_planted_non_directory_is_refused_and_nothing_changes(parent: Path, victim: Path, plant: str) -> None:
    d = parent / "kvmhooks"
    if plant == "symlink-to-dir":
        d.symlink_to(victim)
    elif plant == "symlink-to-file":
        d.symlink_to(victim / "shadow")
    elif plant == "dangling-symlink":
        d.symlink_to(victim / "nowhere")
    elif plant == "file":
        d.write_text("")
    else:
        os.mkfifo(d)  # opening it for reading would block: must not even try
    before = {p: _owner_mode(p) for p in (victim, victim / "shadow")}
    with pytest.raises(HostError) as exc:
        ensure_socket_dir(directory=str(d))
    msg = str(exc.value)
    assert str(d) in msg and "not a real directory" in msg and "\n" not in msg
    assert {p: _owner_mode(p) for p in before} == before
    assert not (victim / "nowhere").exists()


def test_a_symlinked_parent_is_refused(tmp_path: Path, victim: Path) -> None:
    (tmp_path / "qemu").symlink_to(victim)
    before = _owner_mode(victim)
    with pytest.raises(HostError, match="not a real directory"):
        ensure_socket_dir(directory=str(tmp_path / "qemu" / "kvmhooks"))
    assert _owner_mode(victim) == before and not (victim / "kvmhooks").exists()


def test_a_missing_parent_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(HostError, match="does not exist"):
        ensure_socket_dir(directory=str(tmp_path / "nope" / "kvmhooks"))


def test_a_socket_outside_the_directory_is_a_programming_error(parent: Path) -> None:
    with pytest.raises(ValueError):
        ensure_socket_dir("/etc/x.qmp", directory=str(parent / "kvmhooks"))
    with pytest.raises(ValueError):
        remove_socket("/etc/passwd", directory=str(parent / "kvmhooks"))


# --- remove_socket ---------------------------------------------------------------------------------------

def test_remove_socket(parent: Path) -> None:
    d = parent / "kvmhooks"
    ensure_socket_dir(directory=str(d))
    (d / "u.qmp").write_text("")
    remove_socket(str(d / "u.qmp"), directory=str(d))
    assert not (d / "u.qmp").exists()
    remove_socket(str(d / "u.qmp"), directory=str(d))  # already gone: fine
    remove_socket(str(parent / "gone" / "u.qmp"), directory=str(parent / "gone"))  # no directory: fine


def test_remove_socket_through_a_symlinked_directory_does_nothing(parent: Path, victim: Path) -> None:
    d = parent / "kvmhooks"
    d.symlink_to(victim)
    remove_socket(str(d / "shadow"), directory=str(d))
    assert (victim / "shadow").read_text() == "secret"


def test_remove_socket_through_a_symlinked_parent_does_nothing(tmp_path: Path, victim: Path) -> None:
    (victim / "kvmhooks").mkdir()
    (victim / "kvmhooks" / "u.qmp").write_text("keep")
    (tmp_path / "qemu").symlink_to(victim)
    d = tmp_path / "qemu" / "kvmhooks"
    remove_socket(str(d / "u.qmp"), directory=str(d))
    assert (victim / "kvmhooks" / "u.qmp").read_text() == "keep"


def test_remove_socket_leaves_a_planted_directory_alone(parent: Path) -> None:
    d = parent / "kvmhooks"
    ensure_socket_dir(directory=str(d))
    (d / "u.qmp").mkdir()
    remove_socket(str(d / "u.qmp"), directory=str(d))  # release must not fail over it
    assert (d / "u.qmp").is_dir()
