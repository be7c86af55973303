"""bench/start_bench.py's left-alone phase rewrites the installed config: the admin's file comes back whole,
with its mode and owner, however the bench ends — normally, by an exception, by SIGTERM, or killed at any
step (then by the next run of the phase, before anything else)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("libvirt")  # (the bench talks to libvirt; its module imports it)

from bench import start_bench

REPO = Path(__file__).resolve().parents[2]
ADMIN = b'lock_timeout = 20\n\n[cpu]\nallowed = "0-1"\n'


def admin_config(tmp_path: Path) -> Path:
    p = tmp_path / "config.toml"
    p.write_bytes(ADMIN)
    p.chmod(0o640)
    return p


def assert_admins(p: Path) -> None:
    assert p.read_bytes() == ADMIN and p.stat().st_mode & 0o7777 == 0o640
    assert sorted(x.name for x in p.parent.iterdir() if x.name.startswith("config.toml")) == ["config.toml"]


def run_phase(p: Path, code: str) -> subprocess.CompletedProcess[str]:
    """The phase in a child process, ``code`` run inside it (or as a patch before it)."""
    script = (f"import os, signal, sys\nfrom pathlib import Path\nfrom bench import start_bench as sb\n{code}\n")
    return subprocess.run([sys.executable, "-c", script, str(p)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def test_the_phase_sees_leave_alone_and_puts_the_config_back(tmp_path: Path) -> None:
    p = admin_config(tmp_path)
    with start_bench.pool_left_alone(p):
        assert start_bench.load_config(p).leave_alone == {"node0/2048kB"}
        assert start_bench.load_config(p).cpu_allowed == {0, 1}  # (the admin's [cpu] table kept as it was)
    assert_admins(p)
    with pytest.raises(RuntimeError), start_bench.pool_left_alone(p):
        raise RuntimeError("a round failed")
    assert_admins(p)


def test_a_config_that_sets_leave_alone_is_not_the_benchs_to_change(tmp_path: Path) -> None:
    p = tmp_path / "config.toml"
    p.write_bytes(b'leave_alone = ["node0/1G"]\n')
    with pytest.raises(SystemExit), start_bench.pool_left_alone(p):
        pass
    assert p.read_bytes() == b'leave_alone = ["node0/1G"]\n' and not (tmp_path / "config.toml.before-bench").exists()


def test_sigterm_in_the_phase_puts_the_config_back(tmp_path: Path) -> None:
    p = admin_config(tmp_path)
    r = run_phase(p, "with sb.pool_left_alone(Path(sys.argv[1])):\n    os.kill(os.getpid(), signal.SIGTERM)\n"
                     "    signal.pause()")
    assert r.returncode == 143, r.stderr
    assert_admins(p)


@pytest.mark.parametrize("crash", ["before-replace-1", "after-replace-1", "before-replace-2", "after-replace-2"])
def test_a_bench_killed_at_any_step_is_mended_by_the_next_phase(tmp_path: Path, crash: str) -> None:
    """os.replace is where the config changes (once into the phase, once back): a SIGKILL on either side of
    each, then the next phase starts by putting the original back."""
    p = admin_config(tmp_path)
    when, _, n = crash.rpartition("-")
    code = f"""
real, calls = os.replace, []
def replace(a, b):
    calls.append(a)
    if {when!r} == "before-replace" and len(calls) == {n}:
        os.kill(os.getpid(), signal.SIGKILL)
    real(a, b)
    if {when!r} == "after-replace" and len(calls) == {n}:
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
with sb.pool_left_alone(Path(sys.argv[1])):
    pass
"""
    r = run_phase(p, code)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert (tmp_path / "config.toml.before-bench").read_bytes() == ADMIN  # (kept until the original is back)
    with start_bench.pool_left_alone(p):
        assert start_bench.load_config(p).leave_alone == {"node0/2048kB"}
    assert_admins(p)
