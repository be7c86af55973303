"""Review 2: reproductions against hooks/qemu (the POSIX shell dispatcher) and `kvmhooks plan`.

Each test states what a correct hook does; a failing test is a defect. The XML is formatted the way libvirt
formats a live definition (one element per line, metadata children as libxml2's xmlNodeDump writes them,
the namespace declared on our element as virDomainSetMetadata / `kvmhooks annotate` leave it).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from kvmhooks.ledger import Ledger
from tests.fakehost import FakeHost, domain_xml
from tests.unit.test_hook import HOOK, U1, hook, hook_env, hook_with_state, write_config

NS = "http://kvmhooks.org/xmlns/domain/1.0"


def libvirt_xml(uuid: str = U1, name: str = "vm1", before: str = "", ours: bool = True, description: str = "",
                devices_extra: str = "") -> bytes:
    """A domain as libvirt formats it for the hook: <name>, <uuid>, <description>, <metadata>, <memory> …"""
    lines = ["<domain type='kvm' id='7'>", f"  <name>{name}</name>", f"  <uuid>{uuid}</uuid>"]
    if description:
        lines.append(f"  <description>{description}</description>")
    meta = []
    if before:
        meta.append(f"    {before}")
    if ours:
        meta += [f'    <kvm:tuning xmlns:kvm="{NS}">', '      <kvm:hugepages size="2M"/>', "    </kvm:tuning>"]
    if meta:
        lines += ["  <metadata>", *meta, "  </metadata>"]
    lines += ["  <memory unit='KiB'>262144</memory>", "  <currentMemory unit='KiB'>262144</currentMemory>",
              "  <memoryBacking>", "    <hugepages/>", "  </memoryBacking>",
              "  <vcpu placement='static'>2</vcpu>", "  <os>", "    <type arch='x86_64' machine='pc'>hvm</type>",
              "  </os>", "  <devices>", "    <memballoon model='virtio'/>"]
    if devices_extra:
        lines.append(devices_extra)
    lines += ["  </devices>", "</domain>", ""]
    return "\n".join(lines).encode()


def held(host: FakeHost) -> dict[str, object]:
    path = host.root / "run/ledger.json"
    return dict(Ledger(path).read().domains) if path.exists() else {}


# --- (1a) an annotated VM the shell does not see: prepare (and every other op) silently skipped -----------

FOREIGN_BEFORE_OURS = {
    # A metadata element of another namespace, default-namespaced and named like a libvirt element: it
    # survives virXMLNodeSanitizeNamespaces (it has a namespace) and xmlNodeDump writes it as is.
    "default-ns element named memory": '<memory xmlns="urn:other"/>',
    "default-ns element named metadata": '<metadata xmlns="urn:other">x</metadata>',
    # Comments and CDATA inside another namespace's element are kept verbatim by libvirt.
    "comment with </metadata>": '<o:x xmlns:o="urn:o"><!-- </metadata> --></o:x>',
    "CDATA with <memory": '<o:x xmlns:o="urn:o"><![CDATA[<memory unit="KiB">1</memory>]]></o:x>',
}


@pytest.mark.parametrize("before", FOREIGN_BEFORE_OURS.values(), ids=FOREIGN_BEFORE_OURS.keys())
def test_annotated_vm_behind_foreign_metadata_is_prepared(host: FakeHost, before: str) -> None:
    """Python's parser sees the annotation (metadata/{NS}tuning); the shell stops at the first line that
    contains '<memory' or '</metadata>' before it ever sees the namespace, so prepare never runs: the VM
    starts with no reserved pages, no pins, no memtune, no balloon — the contract says a typo must not
    silently do nothing, and here not even a typo is needed."""
    from kvmhooks.domain import parse_domain

    cfg = write_config(host)
    xml = libvirt_xml(before=before)
    assert parse_domain(xml).annotated  # the full parser agrees it is ours
    r = hook(cfg, "vm1", "prepare", xml)
    assert (r.returncode, r.stdout) == (0, b"")
    assert host.pool(0) == 128 and U1 in held(host), "prepare was skipped by the shell dispatcher"


# --- (1b) a release skipped: the ledger looked up in the wrong place ---------------------------------------

def _config_with_state_dir(host: FakeHost, line: str, eol: str = "\n") -> Path:
    """The fake tree's config, with state_dir written as `line` ({} is the directory)."""
    lines = [f'sysfs_root = "{host.sysfs}"', f'proc_root = "{host.proc}"', line.format(host.root / "run"),
             f'log = "{host.root / "kvmhooks.log"}"', "retry_timeout = 0.2"]
    path = host.root / "config.toml"
    path.write_text(eol.join(lines) + eol)
    import tomllib

    assert tomllib.loads(path.read_text())["state_dir"] == str(host.root / "run")  # valid TOML, same value
    return path


STATE_DIR_SPELLINGS = {
    "literal string": ("state_dir = '{}'", "\n"),
    "trailing comment": ('state_dir = "{}"  # moved off /run', "\n"),
    "tab separated": ('state_dir\t=\t"{}"', "\n"),
    "indented key": ('  state_dir = "{}"', "\n"),
    "CRLF file": ('state_dir = "{}"', "\r\n"),
    "escaped quoted key": ('"state\\u005fdir" = "{}"', "\n"),  # no "state_dir" in the file at all
    "commented default above": ('# state_dir = "/run/kvmhooks"\nstate_dir = "{}"', "\n"),
}


@pytest.mark.parametrize("spelling", STATE_DIR_SPELLINGS.values(), ids=STATE_DIR_SPELLINGS.keys())
def test_release_of_a_live_deannotated_vm_honours_any_valid_state_dir(host: FakeHost, spelling: tuple[str, str]
                                                                      ) -> None:
    """The VM owner removes the annotation live (virsh metadata --live --remove); at stop the shell must find
    the UUID in the ledger Python uses. Its hand-made TOML reader only knows `state_dir = "…"` at column 0
    with LF endings: every other valid spelling sends it to /run/kvmhooks/ledger.json, the release is
    skipped, and the VM's 128 pages stay in the pool for good (per VM, per start: a memory leak the VM owner
    can repeat)."""
    cfg = _config_with_state_dir(host, *spelling)
    assert hook(cfg, "vm1", "prepare", libvirt_xml()).returncode == 0
    assert host.pool(0) == 128
    live = libvirt_xml(ours=False)
    for op in ("stopped", "release"):
        r = hook(cfg, "vm1", op, live, "end")
        assert (r.returncode, r.stdout) == (0, b"")
    assert host.pool(0) == 0 and not held(host), "release skipped: pages leaked"


def test_release_matches_the_uuid_case_insensitively_like_python(host: FakeHost) -> None:
    """Python lower-cases the UUID (parse_domain, scan_uuid) and the ledger stores it lower case; the old
    Python dispatcher lower-cased it before looking in the ledger, the shell does not. (libvirt itself
    always formats lower case, so this needs an XML not formatted by libvirt: by-hand runs, other tools.)"""
    cfg = write_config(host)
    lower = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
    up = lower.upper()
    assert hook(cfg, "vm1", "prepare", libvirt_xml(uuid=up)).returncode == 0
    assert host.pool(0) == 128 and lower in held(host)
    for op in ("stopped", "release"):
        assert hook(cfg, "vm1", op, libvirt_xml(uuid=up, ours=False), "end").returncode == 0
    assert host.pool(0) == 0, "release skipped: the shell grep is case-sensitive"


# --- (1c) an unannotated VM refused: the MAX_LINES fallback hands it to the strict parser ------------------

def test_an_unannotated_vm_with_a_long_description_is_not_refused(host: FakeHost) -> None:
    """More than MAX_LINES (5000) lines before </metadata> (a multi-line <description>, or another
    namespace's metadata) and the shell gives up deciding: Python then parses the whole XML and refuses an
    unannotated VM's start when it is over 4 MiB (the old Python dispatcher exited 0: no namespace in the
    first 4 MiB = not ours; test_an_oversize_unannotated_vm_is_not_refused promises the same)."""
    cfg = write_config(host)
    desc = "\n".join(["line"] * 5001)
    padding = "<!--" + "x" * (5 * 1024 * 1024) + "-->"
    xml = libvirt_xml(ours=False, description=desc, devices_extra=padding)
    r = hook(cfg, "big", "prepare", xml)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")


def test_an_unannotated_vm_with_doctype_text_in_long_foreign_metadata_is_not_refused(host: FakeHost) -> None:
    """Same fallback: 5001 lines of another namespace's metadata with '<!DOCTYPE' in a comment (kept by
    libvirt) and kvmhooks refuses to start a VM that is not its business."""
    cfg = write_config(host)
    foreign = ("<o:x xmlns:o=\"urn:o\">\n" + "\n".join(["      <o:y/>"] * 5001)
               + "\n      <!-- <!DOCTYPE x> -->\n    </o:x>")
    r = hook(cfg, "plain", "prepare", libvirt_xml(ours=False, before=foreign))
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")


# --- (1d) time: the read loop is quadratic ------------------------------------------------------------------

def test_an_unannotated_vm_costs_bounded_time_whatever_its_description(host: FakeHost) -> None:
    """The shell once read line by line into a growing string: ~2 MB in 4990 lines before </metadata> cost
    seconds (4 MB: ~25 s), and libvirt has no timeout on hooks. Now it reads one bounded prefix."""
    cfg = write_config(host)
    desc = "\n".join(["d" * 400] * 4990)
    xml = libvirt_xml(ours=False, description=desc)
    env = hook_env(cfg)  # long XML: the shell reads 64 KiB and hands over; Python sees no namespace and exits
    t0 = time.monotonic()
    try:
        r = subprocess.run([str(HOOK), "plain", "prepare", "begin", "-"], input=xml, capture_output=True, env=env,
                           timeout=3)
    except subprocess.TimeoutExpired:
        pytest.fail("the shell dispatcher spent more than 3 s on 2 MB of an unannotated VM's XML")
    assert r.returncode == 0 and time.monotonic() - t0 < 2.0


# --- promises that held (kept as guards) ---------------------------------------------------------------------

HOSTILE_NAMES = ["a b", "it's", 'q"q', "*", "$(touch /tmp/kvmhooks-pwned)", "back\\slash\\c", "-n", "`id`",
                 "new\nline", "x;exit 1", "${PATH}"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
@pytest.mark.parametrize("op", ["prepare", "started", "stopped", "release", "reconnect", "migrate"])
def test_hostile_names_are_data(host: FakeHost, name: str, op: str) -> None:
    cfg = write_config(host)
    marker = Path("/tmp/kvmhooks-pwned")
    marker.unlink(missing_ok=True)
    for xml in (libvirt_xml(ours=False), libvirt_xml()):
        r = subprocess.run([str(HOOK), name, op, "begin", "-"], input=xml, capture_output=True,
                           env=hook_env(cfg), cwd=host.root, timeout=60)
        assert (r.returncode, r.stdout) == (0, b""), r.stderr
    assert not marker.exists()
    for op2 in ("stopped", "release"):
        hook(cfg, name, op2, libvirt_xml(), "end")
    assert host.pool(0) == 0


def test_shell_metacharacters_in_the_xml_are_data(host: FakeHost) -> None:
    cfg = write_config(host)
    (host.root / "x").write_text("")
    evil = "$(touch pwned) `touch pwned2` * ; exit 3 \\ &quot;"
    xml = libvirt_xml(description=evil, uuid=U1)
    for op in ("prepare", "stopped", "release"):
        r = subprocess.run([str(HOOK), "vm1", op, "begin", "-"], input=xml, capture_output=True,
                           env=hook_env(cfg), cwd=host.root, timeout=60)
        assert (r.returncode, r.stdout) == (0, b"")
    assert not (host.root / "pwned").exists() and not (host.root / "pwned2").exists()
    assert host.pool(0) == 0


def test_state_dir_with_spaces_and_quotes_in_the_basic_string(host: FakeHost, tmp_path: Path) -> None:
    """A double-quoted state_dir with spaces at column 0 (what install.sh's template suggests) works."""
    odd = tmp_path / "state dir $x"
    cfg = host.root / "config.toml"
    cfg.write_text(f'sysfs_root = "{host.sysfs}"\nproc_root = "{host.proc}"\nstate_dir = "{odd}"\n'
                   f'log = "{host.root / "kvmhooks.log"}"\nretry_timeout = 0.2\n')
    assert hook(cfg, "vm1", "prepare", libvirt_xml()).returncode == 0 and host.pool(0) == 128
    for op in ("stopped", "release"):
        assert hook(cfg, "vm1", op, libvirt_xml(ours=False), "end").returncode == 0
    assert host.pool(0) == 0


# --- (2) kvmhooks plan ---------------------------------------------------------------------------------------

def test_plan_changes_nothing_on_the_host(host: FakeHost) -> None:
    """The dry run, with a crashed prepare's intent in the real ledger (so recovery runs in the plan):
    sysfs, the ledger, its lock, the failure files and the log stay as they were."""
    pytest.importorskip("libvirt")
    from kvmhooks import dryrun, operations
    from kvmhooks.domain import parse_domain
    from kvmhooks.ledger import Intent
    from tests.fakehost import FakeKernel

    host = FakeHost(host.root / "big", cores_per_node=6).build()
    kernel = FakeKernel(host)
    cfg = host.config(cpu_housekeeping=frozenset({0}))
    operations.prepare(parse_domain(domain_xml(uuid="11111111-2222-3333-4444-000000000009", name="other")), cfg,
                       kernel.install())
    led = Ledger(cfg.ledger_path)
    with led.transaction() as st:
        st.intents.append(Intent("node0/2048kB", 128, 256, 999999, "prepare", "11111111-2222-3333-4444-00000000000a"))
    (cfg.state_dir / "failures").mkdir(exist_ok=True)
    (cfg.state_dir / "failures" / U1).write_text("old failure\n")

    def snapshot() -> dict[str, bytes]:
        out = {}
        for p in sorted(host.root.rglob("*")):
            if p.is_file():
                out[str(p.relative_to(host.root))] = p.read_bytes()
        return out

    before = snapshot()
    tuning = ('<kvm:hugepages size="2M"/><kvm:cpu policy="dedicated"/><kvm:memtune hard_limit="1G"/>'
              '<kvm:balloon target="50%"/>')
    dryrun.plan(parse_domain(domain_xml(uuid=U1, tuning=tuning)), cfg, persistent_domain=True)
    assert snapshot() == before


def test_plan_says_when_the_start_goes_on_without_reserved_pages(host: FakeHost) -> None:
    """required='no' on a host that cannot spare the memory: a real prepare warns on stderr ("starting
    without reserved pages") and reserves nothing; dryrun.plan drops Prepared.warnings, so `kvmhooks plan`
    lists no pool write and no reason — it reads like a plan in which the pages are simply there."""
    pytest.importorskip("libvirt")
    from kvmhooks import dryrun
    from kvmhooks.domain import parse_domain

    dom = parse_domain(domain_xml(uuid=U1, memory_kib=64 * 1024 * 1024,
                                  tuning='<kvm:hugepages size="2M" required="no"/>'))
    cfg = write_config(host)
    r = hook(cfg, "vm1", "prepare", domain_xml(uuid=U1, memory_kib=64 * 1024 * 1024,
                                               tuning='<kvm:hugepages size="2M" required="no"/>'))
    assert r.returncode == 0 and b"without reserved pages" in r.stderr  # the real start says so
    actions = [a.action for a in dryrun.plan(dom, host.config(), persistent_domain=True)]
    assert any("without reserved pages" in a for a in actions), actions


# --- round two: the shell and Python agree on the UUID when a comment holds a <uuid> tag --------------------

def _python_stand_in(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    ran = tmp_path / "python-ran"
    fake_py = tmp_path / "python"
    fake_py.write_text(f"#!/bin/sh\ncat >/dev/null; echo \"$@\" >> {ran}\n")
    fake_py.chmod(0o755)
    return ran, {**hook_env(tmp_path / "no-config.toml"), "KVMHOOKS_PYTHON": str(fake_py)}


HIDDEN_UUID = {"comment": "<!-- <uuid>{}</uuid> -->",
               "cdata": "<description><![CDATA[<uuid>{}</uuid>]]></description>"}
OTHER = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"


@pytest.mark.parametrize("hide", HIDDEN_UUID.values(), ids=HIDDEN_UUID.keys())
def test_a_uuid_tag_in_a_comment_before_the_real_one_does_not_skip_the_release(host: FakeHost, hide: str) -> None:
    """Python steps over comments and CDATA (scan_uuid) and releases the real UUID's pages."""
    cfg = write_config(host)
    assert hook(cfg, "vm1", "prepare", libvirt_xml()).returncode == 0
    assert host.pool(0) == 128
    xml = libvirt_xml(ours=False).replace(b"<name>", (hide.format(OTHER) + "<name>").encode(), 1)
    for op in ("stopped", "release"):
        r = hook(cfg, "vm1", op, xml, "end")
        assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    assert host.pool(0) == 0 and not held(host), "release skipped: a <uuid> in a comment was taken"


@pytest.mark.parametrize("hide", HIDDEN_UUID.values(), ids=HIDDEN_UUID.keys())
def test_the_shell_hands_a_uuid_behind_a_comment_to_python(host: FakeHost, tmp_path: Path, hide: str) -> None:
    """The default-config path (no state_dir: the shell decides alone) took the first literal <uuid> even in
    a comment: the held VM's stop exited without Python and its pages stayed reserved. Python is a stand-in
    here that notes it ran."""
    cfg = write_config(host)
    assert hook(cfg, "vm1", "prepare", libvirt_xml()).returncode == 0
    script = hook_with_state(host.root / "run")
    ran, env = _python_stand_in(tmp_path)
    xml = libvirt_xml(ours=False).replace(b"<name>", (hide.format(OTHER) + "<name>").encode(), 1)
    r = subprocess.run([str(script), "vm1", "release", "end", "-"], input=xml, env=env, capture_output=True)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    assert ran.exists(), "the shell trusted a <uuid> inside a comment and skipped the release"


# --- issue "A tuned VM starts as fast as a plain one": Python only where there is work ----------------------

@pytest.mark.parametrize("op", ["start", "attach", "shutdown", "newer-op"])
def test_operations_kvmhooks_ignores_start_no_python_even_for_an_annotated_vm(host: FakeHost, tmp_path: Path,
                                                                              op: str) -> None:
    """An annotated VM started Python for every operation libvirt calls, start included: five interpreter
    starts per lifecycle where two do the work."""
    ran, env = _python_stand_in(tmp_path)
    r = subprocess.run([str(HOOK), "vm1", op, "begin", "-"], input=libvirt_xml(), env=env, capture_output=True)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    assert not ran.exists()


@pytest.mark.parametrize("op", ["migrate", "restore"])
@pytest.mark.parametrize("sub,ours,python", [("begin", True, True), ("begin", False, False), ("end", True, False),
                                             ("-", True, False)])
def test_only_an_annotated_vms_migrate_or_restore_begin_reaches_the_filter(host: FakeHost, tmp_path: Path, op: str,
                                                                          sub: str, ours: bool, python: bool) -> None:
    """The filter's door: an unannotated VM coming in costs the shell only and prints nothing (= XML unchanged)."""
    ran, env = _python_stand_in(tmp_path)
    r = subprocess.run([str(HOOK), "vm1", op, sub, "-"], input=libvirt_xml(ours=ours), env=env, capture_output=True)
    assert (r.returncode, r.stdout) == (0, b"")
    assert ran.exists() == python


def test_an_annotated_vm_stops_through_python_once(host: FakeHost, tmp_path: Path) -> None:
    """stopped and release both started Python for an annotated VM; now only a VM with a held marker does,
    so the first of the two releases it and the second costs the shell only."""
    cfg = write_config(host)
    assert hook(cfg, "vm1", "prepare", libvirt_xml()).returncode == 0
    script = hook_with_state(host.root / "run")
    ran, env = _python_stand_in(tmp_path)

    def starts_python(op: str) -> bool:
        ran.unlink(missing_ok=True)
        r = subprocess.run([str(script), "vm1", op, "end", "-"], input=libvirt_xml(), env=env, capture_output=True)
        assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
        return ran.exists()

    assert starts_python("stopped")  # holds 128 pages: Python releases them
    assert hook(cfg, "vm1", "stopped", libvirt_xml(), "end").returncode == 0  # (the real release)
    assert host.pool(0) == 0
    assert not starts_python("release")  # nothing held any more: the second one is the shell's alone
    assert not starts_python("stopped")
    big = libvirt_xml(devices_extra="<!--" + "x" * 70000 + "-->")  # over the shell's 64 KiB: still no Python
    ran.unlink(missing_ok=True)
    r = subprocess.run([str(script), "vm1", "release", "end", "-"], input=big, env=env, capture_output=True)
    assert r.returncode == 0 and not ran.exists()
