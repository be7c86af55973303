"""The hook as libvirt runs it: a separate process, XML on stdin, nothing on stdout, one line on error."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fakehost import GIB, FakeHost, domain_xml

REPO = Path(__file__).resolve().parents[2]
HOOK = REPO / "hooks/qemu"
U1 = "11111111-2222-3333-4444-000000000001"


def write_config(host: FakeHost, **extra: str) -> Path:
    lines = [f'sysfs_root = "{host.sysfs}"', f'proc_root = "{host.proc}"', f'state_dir = "{host.root / "run"}"',
             f'log = "{host.root / "kvmhooks.log"}"', "retry_timeout = 0.2"]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    path = host.root / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def hook(config: Path, name: str, op: str, xml: bytes, sub: str = "begin") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, str(HOOK), name, op, sub, "-"], input=xml, capture_output=True,
                          env={"KVMHOOKS_CONFIG": str(config), "PATH": "/usr/bin:/bin", "LC_ALL": "C"}, timeout=60)


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
    assert r.returncode == 1 and b"lock_timeout" in r.stderr


def test_unannotated_vm_exits_before_importing_kvmhooks(host: FakeHost, cfg: Path) -> None:
    # With the package made unimportable, an unannotated VM still passes: nothing was imported.
    env = {"KVMHOOKS_CONFIG": str(cfg), "PYTHONPATH": str(host.root / "nowhere")}
    code = (f"import sys; sys.modules['kvmhooks'] = None; sys.argv = ['qemu', 'plain', 'prepare', 'begin', '-'];"
            f" exec(compile(open({str(HOOK)!r}).read(), 'qemu', 'exec'))")
    r = subprocess.run([sys.executable, "-c", code], input=domain_xml(tuning=None), capture_output=True, env=env)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")


def test_enabled_no_releases_leftovers(host: FakeHost, cfg: Path) -> None:
    assert hook(cfg, "vm1", "prepare", domain_xml(uuid=U1)).returncode == 0
    off = domain_xml(uuid=U1).replace(b"<kvm:tuning ", b'<kvm:tuning enabled="no" ')
    assert hook(cfg, "vm1", "prepare", off).returncode == 0
    assert host.pool(0) == 0
    assert json.loads((host.root / "run/ledger.json").read_text())["domains"] == {}


def test_an_oversize_unannotated_vm_is_not_refused(host: FakeHost, cfg: Path) -> None:
    padding = b"<!--" + b"x" * (5 * 1024 * 1024) + b"--></devices>"
    big = domain_xml(tuning=None, backing="").replace(b"</devices>", padding)
    r = hook(cfg, "big", "prepare", big)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    annotated = domain_xml().replace(b"</devices>", padding)
    r = hook(cfg, "big", "prepare", annotated)
    assert r.returncode == 1 and b"larger than" in r.stderr
