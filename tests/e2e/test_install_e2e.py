"""install.sh on this host: idempotent, never overwrites a foreign hook silently, --uninstall restores it.

Runs in scratch locations (--prefix, --hooks-dir, --conf-dir, --bin-link) so it does not disturb the
installation the other end-to-end tests use; re-runs the real install at the end (fstab lines are shared)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO, Env

FOREIGN = "#!/bin/sh\n# the admin's own hook\nexit 0\n"


@pytest.fixture
def scratch(tmp_path: Path, host: Env) -> Iterator[list[str]]:
    args = ["--prefix", str(tmp_path / "opt"), "--hooks-dir", str(tmp_path / "hooks"), "--conf-dir",
            str(tmp_path / "etc"), "--bin-link", str(tmp_path / "bin/kvmhooks"), "--state-dir", str(tmp_path / "run"),
            "--no-apt", "--no-reload"]
    (tmp_path / "bin").mkdir()
    (tmp_path / "hooks").mkdir()
    yield args
    subprocess.run([str(REPO / "install.sh"), "--no-apt", "--no-reload"], check=True, capture_output=True)


def install(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / "install.sh"), *args], capture_output=True, text=True, check=check, timeout=300)


def test_qemu_d_beside_a_foreign_hook_idempotent_and_uninstall(scratch: list[str], tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    (hooks / "qemu").write_text(FOREIGN)
    install(*scratch)
    ours = hooks / "qemu.d/kvmhooks"
    assert f"\nPYTHON={tmp_path}/opt/venv/bin/python3\n" in ours.read_text()
    assert (hooks / "qemu").read_text() == FOREIGN  # untouched: libvirt >= 6.5 runs both
    assert (tmp_path / "etc/config.toml").exists()
    assert (tmp_path / "bin/kvmhooks").resolve() == (tmp_path / "opt/venv/bin/kvmhooks").resolve()
    r = subprocess.run([str(tmp_path / "bin/kvmhooks"), "--version"], capture_output=True, text=True)
    assert r.stdout.startswith("kvmhooks ")
    (tmp_path / "etc/config.toml").write_text("lock_timeout = 5\n")
    install(*scratch)  # again: same result, the admin's config kept
    assert (tmp_path / "etc/config.toml").read_text() == "lock_timeout = 5\n"
    install(*scratch, "--uninstall")
    assert not ours.exists() and not (tmp_path / "opt").exists() and not (tmp_path / "bin/kvmhooks").exists()
    assert (hooks / "qemu").read_text() == FOREIGN


def test_uninstall_refuses_while_vms_hold_reservations(scratch: list[str], tmp_path: Path) -> None:
    install(*scratch)
    (tmp_path / "run").mkdir()
    (tmp_path / "run/ledger.json").write_text('{"version": 1, "domains": {"u": {"name": "web1"}}, "pools": {}}')
    r = install(*scratch, "--uninstall", check=False)
    assert r.returncode != 0 and "still hold reservations" in r.stderr
    assert (tmp_path / "hooks/qemu.d/kvmhooks").exists() and (tmp_path / "run/ledger.json").exists()
    install(*scratch, "--uninstall", "--force")
    assert not (tmp_path / "hooks/qemu.d/kvmhooks").exists() and not (tmp_path / "run").exists()


def test_replacing_a_foreign_qemu_hook_needs_consent_and_is_undone(scratch: list[str], tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    (hooks / "qemu").write_text(FOREIGN)
    r = install(*scratch, "--hook", "qemu", check=False)
    assert r.returncode != 0 and "exists and is not ours" in r.stderr
    assert (hooks / "qemu").read_text() == FOREIGN and not (tmp_path / "opt").exists()  # refused before anything
    install(*scratch, "--hook", "qemu", "--replace-hook")
    assert "kvmhooks: libvirt qemu hook" in (hooks / "qemu").read_text()
    assert (hooks / "qemu.kvmhooks-orig").read_text() == FOREIGN
    install(*scratch, "--hook", "qemu", "--replace-hook")  # idempotent: the first backup is kept
    assert (hooks / "qemu.kvmhooks-orig").read_text() == FOREIGN
    install(*scratch, "--uninstall")
    assert (hooks / "qemu").read_text() == FOREIGN and not (hooks / "qemu.kvmhooks-orig").exists()
