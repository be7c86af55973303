"""The hook as libvirt runs it: a separate process, XML on stdin, nothing on stdout, one line on error."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmhooks.ledger import Ledger
from tests.fakehost import GIB, FakeHost, domain_xml

REPO = Path(__file__).resolve().parents[2]
HOOK = REPO / "hooks/qemu"
U1 = "11111111-2222-3333-4444-000000000001"
U2 = "aaaaaaaa-2222-3333-4444-000000000002"


def write_config(host: FakeHost, **extra: str) -> Path:
    lines = [f'sysfs_root = "{host.sysfs}"', f'proc_root = "{host.proc}"', f'state_dir = "{host.root / "run"}"',
             f'cgroup_root = "{host.root / "cgroup"}"', f'run_root = "{host.root / "run-root"}"',
             f'log = "{host.root / "kvmhooks.log"}"', "retry_timeout = 0.2"]
    # (A prepare with live work forks a worker that waits this long for a started hook some tests never run.)
    extra = {"worker_timeout": "10", **extra}
    lines += [f"{k} = {v}" for k, v in extra.items()]
    path = host.root / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def hook(config: Path, name: str, op: str, xml: bytes, sub: str = "begin") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(HOOK), name, op, sub, "-"], input=xml, capture_output=True, env=hook_env(config),
                          timeout=60)


def hook_env(config: Path) -> dict[str, str]:
    """As libvirtd runs hooks (a short PATH, LC_ALL=C), with this interpreter standing in for the installed one."""
    return {"KVMHOOKS_CONFIG": str(config), "KVMHOOKS_PYTHON": sys.executable, "PATH": "/usr/bin:/bin",
            "LC_ALL": "C"}


def hook_with_state(state: Path) -> Path:
    """A copy of hooks/qemu whose built-in state directory (the default config's) is ``state``, not the
    host's /run/kvmhooks."""
    script = state.parent / "qemu-hook"
    # (bytes: the script holds a literal CR, which text mode would turn into a newline)
    script.write_bytes(HOOK.read_bytes().replace(b"STATE=/run/kvmhooks", f"STATE={state}".encode(), 1))
    script.chmod(0o755)
    return script


def prepare_unforked(config: Path, xml: bytes) -> None:
    """A prepare that forks no worker to wait for the start (kvmhooksd's, or one whose worker died): the
    started hook's own ways then tune the VM."""
    from kvmhooks import operations
    from kvmhooks.config import load_config
    from kvmhooks.domain import parse_domain

    operations.prepare(parse_domain(xml), load_config(config))


@pytest.fixture
def cfg(host: FakeHost) -> Path:
    return write_config(host)


def test_full_cycle_through_the_hook_script(host: FakeHost, cfg: Path) -> None:
    xml = domain_xml(uuid=U1)
    for op, sub in (("prepare", "begin"), ("start", "begin")):
        r = hook(cfg, "vm1", op, xml, sub)
        assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    assert host.pool(0) == 128
    for op in ("stopped", "release"):
        r = hook(cfg, "vm1", op, xml, "end")
        assert (r.returncode, r.stdout) == (0, b"")
    assert host.pool(0) == 0
    log = (host.root / "kvmhooks.log").read_text()
    assert f"VM 'vm1' ({U1}): reserved node0/2048kB +128 pages" in log
    assert f"VM 'vm1' ({U1}): released node0/2048kB 128 pages" in log


@pytest.mark.parametrize("op", ["migrate", "restore", "attach", "start", "frobnicate", "reconnect"])
def test_stdout_stays_empty_for_every_operation(host: FakeHost, cfg: Path, op: str) -> None:
    r = hook(cfg, "vm1", op, domain_xml(uuid=U1))
    assert (r.returncode, r.stdout) == (0, b"")


def test_bad_annotation_is_one_line_on_stderr_and_changes_nothing(host: FakeHost, cfg: Path) -> None:
    r = hook(cfg, "web1", "prepare", domain_xml(name="web1", tuning='<kvm:hugepages size="3M"/>'))
    assert r.returncode == 1 and r.stdout == b""
    lines = r.stderr.decode().splitlines()
    assert lines == ["kvmhooks: VM 'web1': <kvm:hugepages size=...> value '3M': expected one of 2M, 1G, auto"]
    assert host.pool(0) == 0 and not (host.root / "run/ledger.json").exists()


def test_capacity_failure_is_fast_and_clean(host: FakeHost, cfg: Path) -> None:
    t0 = time.monotonic()
    r = hook(cfg, "big", "prepare", domain_xml(name="big", memory_kib=64 * GIB))
    assert time.monotonic() - t0 < 5
    assert r.returncode == 1 and b"not enough memory" in r.stderr and len(r.stderr.splitlines()) == 1
    assert host.pool(0) == 0


def test_hostile_xml_fails_prepare_but_not_release(host: FakeHost, cfg: Path) -> None:
    evil = (b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
            b'<domain><metadata><t xmlns="http://kvmhooks.org/xmlns/domain/1.0"/></metadata>&x;</domain>')
    r = hook(cfg, "evil", "prepare", evil)
    assert r.returncode == 1 and b"DOCTYPE" in r.stderr and b"root:" not in r.stderr
    assert hook(cfg, "evil", "release", evil, "end").returncode == 0


def test_reconnect_never_fails(host: FakeHost, cfg: Path) -> None:
    r = hook(cfg, "vm1", "reconnect", b"<domain><metadata>http://kvmhooks.org/xmlns/domain/1.0</metadata>")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    broken = write_config(host, lock_timeout="x")  # even with a broken config file
    r = hook(broken, "vm1", "reconnect", domain_xml(uuid=U1))
    assert (r.returncode, r.stdout) == (0, b"")


def test_broken_config_fails_prepare_with_its_reason(host: FakeHost) -> None:
    broken = write_config(host, lock_timeout='"soon"')
    r = hook(broken, "vm1", "prepare", domain_xml(uuid=U1))
    assert r.returncode == 1 and b"lock_timeout" in r.stderr and r.stderr.count(b"\n") == 1


@pytest.mark.parametrize("op", ["prepare", "started", "release", "reconnect"])
def test_unannotated_vm_never_starts_python(host: FakeHost, cfg: Path, op: str) -> None:
    """The shell decides: an "interpreter" that leaves a mark shows whether Python would have been started."""
    mark = host.root / "python-ran"
    fake = host.root / "fake-python"
    fake.write_text(f"#!/bin/sh\ntouch {mark}\nexit 1\n")
    fake.chmod(0o755)
    env = {**hook_env(cfg), "KVMHOOKS_PYTHON": str(fake)}
    # (A configured state_dir sends every release to Python, which alone reads TOML: use the default here.)
    plain_env = {**env, "KVMHOOKS_CONFIG": str(host.root / "no-config.toml")}
    r = subprocess.run([str(hook_with_state(host.root / "run")), "plain", op, "begin", "-"],
                       input=domain_xml(tuning=None), capture_output=True, env=plain_env, timeout=30)
    assert (r.returncode, r.stdout, r.stderr, mark.exists()) == (0, b"", b"", False)
    r = subprocess.run([str(HOOK), "vm1", op, "begin", "-"], input=domain_xml(), capture_output=True, env=env,
                       timeout=30)
    assert mark.exists() and r.returncode == (1 if op == "prepare" else 0)  # annotated: handed over


def test_enabled_no_releases_leftovers(host: FakeHost, cfg: Path) -> None:
    assert hook(cfg, "vm1", "prepare", domain_xml(uuid=U1)).returncode == 0
    off = domain_xml(uuid=U1).replace(b"<kvm:tuning ", b'<kvm:tuning enabled="no" ')
    assert hook(cfg, "vm1", "prepare", off).returncode == 0
    assert host.pool(0) == 0
    assert not Ledger(host.root / "run/ledger.json").read().domains


def test_an_oversize_unannotated_vm_is_not_refused(host: FakeHost, cfg: Path) -> None:
    padding = b"<!--" + b"x" * (5 * 1024 * 1024) + b"--></devices>"
    big = domain_xml(tuning=None, backing="").replace(b"</devices>", padding)
    r = hook(cfg, "big", "prepare", big)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    annotated = domain_xml().replace(b"</devices>", padding)
    r = hook(cfg, "big", "prepare", annotated)
    assert r.returncode == 1 and b"larger than" in r.stderr


# --- lifecycle hooks that never kill a VM ------------------------------------------------------------------

LIFECYCLE = ("started", "stopped", "release", "reconnect", "attach", "someday-new-op")
# The filter (migrate/restore begin) refuses an incoming VM before its QEMU exists, as prepare refuses a start.
MAY_FAIL = ("prepare", "migrate", "restore")


def _hold_ledger_lock(path: str, seconds: float, ready: object) -> None:
    from kvmhooks.ledger import Ledger

    with Ledger(Path(path), 5).transaction():
        ready.set()  # type: ignore[attr-defined]
        time.sleep(seconds)


def test_started_exits_0_when_the_ledger_lock_is_stuck(host: FakeHost) -> None:
    """Defect 4: a `started` that failed (lock held past lock_timeout) made libvirt stop the running VM."""
    import multiprocessing

    cfg = write_config(host, lock_timeout="0.3", libvirt_uri='"test:///nonexistent"')
    xml = domain_xml(uuid=U1, tuning='<kvm:hugepages size="2M"/><kvm:vcpupin vcpu="0" cpuset="1"/>')
    prepare_unforked(cfg, xml)  # (a worker forked at prepare would take the start without the lock)
    ready = multiprocessing.Event()
    p = multiprocessing.Process(target=_hold_ledger_lock, args=(str(host.root / "run/ledger.json"), 3, ready))
    p.start()
    try:
        ready.wait(5)
        r = hook(cfg, "vm1", "started", xml)
        assert (r.returncode, r.stdout) == (0, b"")
        assert "stayed locked" in (host.root / "run/failures" / U1).read_text()
        r = hook(cfg, "vm1", "prepare", xml)  # only prepare may fail, with one line
        assert r.returncode == 1 and r.stderr.decode().count("\n") == 1 and b"stayed locked" in r.stderr
    finally:
        p.join()


@pytest.mark.parametrize("op", LIFECYCLE)
def test_a_broken_config_never_fails_a_lifecycle_hook(host: FakeHost, op: str) -> None:
    cfg = host.root / "config.toml"
    cfg.write_text("lock_timeot = 3\n")  # a typo
    r = hook(cfg, "vm1", op, domain_xml(uuid=U1))
    assert (r.returncode, r.stdout) == (0, b"")


@pytest.mark.parametrize("op", MAY_FAIL)
def test_a_broken_config_refuses_a_start_or_an_incoming_vm_in_one_line(host: FakeHost, op: str) -> None:
    cfg = host.root / "config.toml"
    cfg.write_text("lock_timeot = 3\n")  # a typo
    r = hook(cfg, "vm1", op, domain_xml(uuid=U1))
    assert (r.returncode, r.stdout) == (1, b"") and r.stderr.count(b"\n") == 1 and b"lock_timeot" in r.stderr


@pytest.mark.parametrize("garbage", [b'{"version": 1, "domains": {"x": ', b"\x00\xff garbage", b'{"version": 99}',
                                     b'{"version": 2, "domains": []}', b'{"version": 2, "domains": {"u": {"name": 3}}}',
                                     b'[1, 2]'])
def test_an_unreadable_ledger_refuses_starts_with_the_fix_and_never_fails_the_rest(host: FakeHost, cfg: Path,
                                                                                     garbage: bytes) -> None:
    """Defect 5: an unreadable ledger gave "internal error (JSONDecodeError…)", stopped VMs at `started`, and
    made release leak silently."""
    (host.root / "run").mkdir()
    (host.root / "run/ledger.json").write_bytes(garbage)
    xml = domain_xml(uuid=U1)
    r = hook(cfg, "vm1", "prepare", xml)
    err = r.stderr.decode()
    assert r.returncode == 1 and err.count("\n") == 1 and "kvmhooks reconcile" in err and "internal" not in err
    assert host.pool(0) == 0
    for op in LIFECYCLE:
        assert hook(cfg, "vm1", op, xml).returncode == 0
    assert "unreadable" in (host.root / "run/failures" / U1).read_text()


def test_reconcile_sets_an_unreadable_ledger_aside_and_rebuilds_it(host: FakeHost) -> None:
    from kvmhooks import operations

    c = host.config()
    host.set_pool(0, 2048, 138)  # a running VM's 128 pages and the admin's 10
    (host.root / "run").mkdir()
    (host.root / "run/ledger.json").write_text('{"version": 2, "domains": {')
    out = operations.reconcile(c, {U1: domain_xml(uuid=U1)}, {})
    assert out.set_aside is not None and out.set_aside.read_text() == '{"version": 2, "domains": {'
    state = operations.ledger_for(c).read()
    assert state.domains[U1].hugepages == {"node0/2048kB": 128} and state.pools["node0/2048kB"].baseline == 10
    assert host.pool(0) == 138
    operations.release(U1, c)
    assert host.pool(0) == 10


@pytest.mark.parametrize("hostile", [
    b"<!-- <!DOCTYPE x [<!ENTITY e 'boom'>]> -->",
    b"<other:x xmlns:other='urn:o'><![CDATA[<!DOCTYPE y>]]></other:x>",
    b"<other:x xmlns:other='urn:o'>" + b"A" * (5 * 1024 * 1024) + b"</other:x>",
])
def test_the_vm_owner_cannot_make_release_refuse(host: FakeHost, cfg: Path, hostile: bytes) -> None:
    """Defect 6: hostile or oversize live metadata made stopped/release refuse, leaking pages and CPUs."""
    xml = domain_xml(uuid=U1)
    assert hook(cfg, "vm1", "prepare", xml).returncode == 0
    assert host.pool(0) == 128
    live = xml.replace(b"</metadata>", hostile + b"</metadata>")
    for op in ("stopped", "release"):
        r = hook(cfg, "vm1", op, live, "end")
        assert (r.returncode, r.stdout) == (0, b"")
    assert host.pool(0) == 0
    assert not Ledger(host.root / "run/ledger.json").read().domains


@pytest.mark.parametrize("op", (*MAY_FAIL, *LIFECYCLE))
def test_hook_script_without_its_package_fails_only_prepare(host: FakeHost, cfg: Path, op: str) -> None:
    """Defect 4: `hooks/qemu` imported without a guard: a half-done upgrade made `reconnect` kill every VM.
    Debian's interpreter in isolated mode has no kvmhooks package: the import fails as in a broken install."""
    if subprocess.run(["/usr/bin/python3", "-I", "-c", "import kvmhooks"], capture_output=True).returncode == 0:
        pytest.skip("the system interpreter has kvmhooks installed")
    r = subprocess.run([str(HOOK), "vm1", op, "begin", "-"], input=domain_xml(uuid=U1), capture_output=True,
                       env={**hook_env(cfg), "KVMHOOKS_PYTHON": "/usr/bin/python3"}, timeout=30)
    assert r.stdout == b""
    if op in MAY_FAIL:
        assert r.returncode == 1 and b"kvmhooks is broken" in r.stderr and r.stderr.count(b"\n") == 1
    else:
        assert r.returncode == 0


def test_hook_script_constants_match_the_package() -> None:
    """hooks/qemu decides before importing anything, so it carries copies; they must not drift."""
    import re as regex

    from kvmhooks import NAMESPACE
    from kvmhooks.config import DEFAULT_CONFIG, Config

    text = HOOK.read_text()
    assert regex.search(r"^NS='(.*)'$", text, regex.M).group(1) == NAMESPACE  # type: ignore[union-attr]
    state = regex.search(r"^STATE=(.*)$", text, regex.M).group(1)  # type: ignore[union-attr]
    assert state == str(Config().state_dir)
    assert regex.search(r"^LEDGER=(.*)$", text, regex.M).group(1).replace("$STATE", state) == str(  # type: ignore[union-attr]
        Config().ledger_path)
    held = regex.search(r"^HELD=(\S*)", text, regex.M).group(1).replace("$STATE", state)  # type: ignore[union-attr]
    assert held == str(Ledger(Config().ledger_path).held_dir)
    assert regex.search(r"^CONFIG=\$\{KVMHOOKS_CONFIG:-(.*)\}$", text, regex.M).group(1) == str(DEFAULT_CONFIG)  # type: ignore[union-attr]


def test_a_hook_run_with_its_stdout_and_stderr_closed_still_succeeds(host: FakeHost, cfg: Path) -> None:
    """The Python side leaves by os._exit after flushing by hand: a closed stdout or stderr (None in Python, a
    hook run by hand or by a wrapper) is nothing to flush, not a failed start."""
    xml = domain_xml(uuid=U1)
    for fds in (">&-", "2>&-", ">&- 2>&-"):
        r = subprocess.run(["/bin/sh", "-c", f'exec "$0" vm1 "$1" begin - {fds}', str(HOOK), "prepare"],
                           input=xml, env=hook_env(cfg), capture_output=True, timeout=60)
        assert r.returncode == 0, (fds, r.stderr)
        assert host.pool(0) == 128
        assert hook(cfg, "vm1", "release", xml, "end").returncode == 0 and host.pool(0) == 0


def test_no_library_module_imports_the_cli() -> None:
    code = ("import sys, kvmhooks.worker, kvmhooks.operations, kvmhooks.dryrun, kvmhooks.apply.live, kvmhooks.hook; "
            "print(sorted(m for m in sys.modules if m.startswith('kvmhooks.cli')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def test_the_shell_starts_python_at_stop_only_for_a_vm_the_ledger_holds(host: FakeHost, tmp_path: Path) -> None:
    """The default-config path of hooks/qemu (no state_dir): an unannotated VM's stop looks for its marker in
    held/ (created with every ledger record) and starts Python only then, for an odd UUID, or for a ledger
    older than the markers. The Python side is a stand-in that notes it ran."""
    cfg = write_config(host)
    xml = domain_xml(uuid=U1)
    assert hook(cfg, "vm1", "prepare", xml).returncode == 0
    ledger = Ledger(host.root / "run/ledger.json")
    assert (ledger.held_dir / U1).exists()
    script = hook_with_state(host.root / "run")
    ran = tmp_path / "python-ran"
    fake_py = tmp_path / "python"
    fake_py.write_text(f"#!/bin/sh\ncat >/dev/null; echo \"$@\" >> {ran}\n")
    fake_py.chmod(0o755)
    env = {**hook_env(tmp_path / "no-config.toml"), "KVMHOOKS_PYTHON": str(fake_py)}

    def stops_start_python(xml: bytes) -> bool:
        ran.unlink(missing_ok=True)
        for op in ("stopped", "release"):
            r = subprocess.run([str(script), "vm1", op, "end", "-"], input=xml, env=env, capture_output=True)
            assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
        return ran.exists()

    plain = domain_xml(uuid=U1, tuning=None, backing="")
    assert stops_start_python(plain)  # holds pages: Python releases them
    assert not stops_start_python(domain_xml(uuid=U2, tuning=None, backing=""))  # holds nothing: no Python
    assert stops_start_python(domain_xml(uuid=U2.upper(), tuning=None, backing=""))  # not canonical: Python
    crlf = domain_xml(uuid=U2, tuning=None, backing="").replace(f"<uuid>{U2}</uuid>".encode(),
                                                                f"<uuid>\r\n\t{U2} \r\n</uuid>".encode())
    assert not stops_start_python(crlf)  # blanks around it (CR included) are trimmed as scan_uuid does
    assert hook(cfg, "vm1", "release", plain, "end").returncode == 0  # the real release drops the marker
    assert not (ledger.held_dir / U1).exists() and not stops_start_python(plain)
    for marker in ledger.held_dir.iterdir():
        marker.unlink()
    ledger.held_dir.rmdir()  # a ledger written before markers existed
    assert stops_start_python(plain)
