"""Issue 17 ("Hardening, round two"), the repair path: reconcile keeps what it can read of a broken ledger and
reports every repair; adoption finds QEMU by what only libvirt controls and never guesses a node; an admin
who lowers a pool by hand is not overruled; stale ledger temp files go; a version 1 record shows like a
version 2 one. Also the tests a mutation run showed missing: the ledger's write order and held markers, and
the real SysfsPools read-back.

Each test fails on the code before its fix (the docstring says how it failed).
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from kvmhooks import operations
from kvmhooks.apply.pools import SysfsPools, apply_pool_writes
from kvmhooks.config import Config
from kvmhooks.domain import parse_domain
from kvmhooks.errors import CapacityError, HostError
from kvmhooks.ledger import DomainRecord, Ledger
from kvmhooks.plan.pools import PoolWrite
from kvmhooks.topology import machine_names
from tests.fakehost import FakeHost, FakeKernel, domain_xml
from tests.unit.test_adopt import MAPS, fake_qemu
from tests.unit.test_crash_regressions import Events, first_ledger_after_pool
from tests.unit.test_crash_safety import Dead

UA = "aaaaaaaa-1717-4444-8888-00000000000a"
UB = "bbbbbbbb-1717-4444-8888-00000000000b"
UC = "cccccccc-1717-4444-8888-00000000000c"
U1 = "11111111-2222-3333-4444-000000000001"  # test_adopt's VM (its numa_maps: MAPS)
KEY = "node0/2048kB"
KEY1 = "node1/2048kB"


def vm(uuid: str, name: str, mib: int = 64, tuning: str = '<kvm:hugepages size="2M"/>') -> bytes:
    return domain_xml(name=name, uuid=uuid, memory_kib=mib * 1024, tuning=tuning)


def one_node(root: Path, admin: int = 40) -> tuple[FakeHost, Config, SysfsPools]:
    host = FakeHost(root).build()
    host.set_pool(0, 2048, admin)
    return host, host.config(retry_timeout=0.0), FakeKernel(host).install()


def a_across_two_nodes(root: Path) -> tuple[FakeHost, Config, SysfsPools, bytes]:
    """VM a prepared with pages on both nodes of a two-node host whose admin left 40 and 6 pages."""
    host = FakeHost(root, nodes=2).build()
    host.set_pool(0, 2048, 40)
    host.set_pool(1, 2048, 6)
    cfg, pools = host.config(retry_timeout=0.0), FakeKernel(host).install()
    xml = vm(UA, "a", tuning="<kvm:hugepages size='2M' nodes='0,1'/>")
    operations.prepare(parse_domain(xml), cfg, pools)
    return host, cfg, pools, xml


def tokens(cfg: Config) -> dict[str, str]:
    return {u: r.token for u, r in operations.ledger_for(cfg).read().domains.items()}


def break_line(cfg: Config, uuid: str) -> None:
    """Make one VM's line undecodable (a CPU list that is not a list), the rest of the file intact."""
    path = cfg.ledger_path
    lines = path.read_text().splitlines()
    n = next(i for i, line in enumerate(lines) if line.startswith(f'{{"uuid":"{uuid}"'))
    lines[n] = lines[n].replace('"cpus":[]', '"cpus":"zero"')
    path.write_text("\n".join(lines) + "\n")


# --- 1. reconcile keeps every record and baseline that still decodes ----------------------------------------

def test_one_broken_vm_line_costs_only_that_vm(tmp_path: Path) -> None:
    """Before: the whole ledger was set aside with the admin's baseline: A was re-adopted (a new token), the
    stopped C was forgotten and never released, and its 32 pages became part of the admin's baseline."""
    host, cfg, pools = one_node(tmp_path)
    for uuid, name in ((UA, "a"), (UB, "b"), (UC, "c")):
        operations.prepare(parse_domain(vm(uuid, name)), cfg, pools)
        operations.mark(uuid, cfg, state="running")
    assert host.pool(0) == 40 + 96
    before = tokens(cfg)
    break_line(cfg, UB)
    with pytest.raises(Exception, match="unreadable"):
        operations.ledger_for(cfg).read().domains[UB]
    # A and B run; C stopped without its release hook.
    snapshot = {u: t for u, t in before.items() if u != UB}  # what `kvmhooks reconcile` salvages first
    out = operations.reconcile(cfg, {UA: vm(UA, "a"), UB: vm(UB, "b")}, snapshot, pools=pools)
    state = operations.ledger_for(cfg).read()
    assert out.set_aside is not None and out.set_aside.exists()
    assert state.domains[UA].token == before[UA]  # kept, not re-adopted
    assert UC not in state.domains and any(a.startswith("release c") for a in out.actions)
    assert state.domains[UB].state == "adopted" and state.domains[UB].hugepages == {KEY: 32}  # from facts
    assert host.pool(0) == 40 + 64 and state.pools[KEY].baseline == 40
    assert len(out.lost) == 1 and UB in out.lost[0]
    operations.release(UA, cfg, pools)
    operations.release(UB, cfg, pools)
    assert host.pool(0) == 40


@pytest.mark.parametrize("garbage", ["{", '{"uuid":"x"}', "[1,2]", '{"uuid":"%s","name":7}'])
def test_any_one_line_broken_keeps_every_other_line(tmp_path: Path, garbage: str) -> None:
    """Whichever VM line is replaced by garbage, the other VMs keep their records and the pool its baseline;
    after the running VMs are adopted and everything is released the pool is the admin's again."""
    names = {UA: "a", UB: "b", UC: "c"}
    for broken in names:
        host, cfg, pools = one_node(tmp_path / broken[:8])
        for uuid, name in names.items():
            operations.prepare(parse_domain(vm(uuid, name)), cfg, pools)
            operations.mark(uuid, cfg, state="running")
        before = tokens(cfg)
        lines = cfg.ledger_path.read_text().splitlines()
        lines = [garbage.replace("%s", broken) if line.startswith(f'{{"uuid":"{broken}"') else line for line in lines]
        cfg.ledger_path.write_text("\n".join(lines) + "\n")
        running = {u: vm(u, n) for u, n in names.items()}
        out = operations.reconcile(cfg, running, {u: t for u, t in before.items() if u != broken}, pools=pools)
        state = operations.ledger_for(cfg).read()
        assert {u: state.domains[u].token for u in names if u != broken} == \
            {u: t for u, t in before.items() if u != broken}, out.actions
        assert state.domains[broken].hugepages == {KEY: 32} and state.pools[KEY].baseline == 40
        assert host.pool(0) == 40 + 96
        for uuid in names:
            operations.release(uuid, cfg, pools)
        assert host.pool(0) == 40


def test_a_broken_pool_record_costs_only_that_pool(tmp_path: Path) -> None:
    """Before: a bad pool record (a negative baseline) set the VM records aside too."""
    host, cfg, pools, xml = a_across_two_nodes(tmp_path)
    token = tokens(cfg)[UA]
    path = cfg.ledger_path
    head, _, rest = path.read_text().partition("\n")
    h = json.loads(head)
    h["pools"][KEY1]["baseline"] = -1
    path.write_text(json.dumps(h, separators=(",", ":")) + "\n" + rest)
    out = operations.reconcile(cfg, {UA: xml}, {UA: token}, pools=pools)
    state = operations.ledger_for(cfg).read()
    assert state.domains[UA].token == token and state.pools[KEY].baseline == 40
    assert any(KEY1 in part for part in out.lost)
    operations.release(UA, cfg, pools)
    assert host.pool(0) == 40


def test_the_dry_run_says_what_would_be_kept_and_what_rebuilt(tmp_path: Path) -> None:
    _host, cfg, pools = one_node(tmp_path)
    for uuid, name in ((UA, "a"), (UB, "b")):
        operations.prepare(parse_domain(vm(uuid, name)), cfg, pools)
    break_line(cfg, UB)
    text = cfg.ledger_path.read_bytes()
    out = operations.reconcile(cfg, {UA: vm(UA, "a"), UB: vm(UB, "b")}, {}, dry_run=True, pools=pools)
    assert any("1 VM record(s), 1 pool record(s)" in a for a in out.actions), out.actions
    assert any("could not read the record of VM 'b'" in a for a in out.actions)
    assert cfg.ledger_path.read_bytes() == text  # nothing written


# --- 2. every repair is reported --------------------------------------------------------------------------

def test_reconcile_reports_a_rolled_back_prepare(tmp_path: Path) -> None:
    """Before: reconcile's recovery rolled the prepare back and then printed "nothing to do"."""
    host, cfg, pools = one_node(tmp_path)
    with Events("kill", first_ledger_after_pool).installed(pools) as broken, pytest.raises(Dead):
        operations.prepare(parse_domain(vm(UA, "a")), cfg, broken)
    assert host.pool(0) == 72
    out = operations.reconcile(cfg, {}, {}, pools=pools)
    assert host.pool(0) == 40
    assert any("rolled back the unfinished reservation of VM 'a'" in a for a in out.actions), out.actions
    assert any("recovered an interrupted prepare write on pool node0/2048kB" in a for a in out.actions)


def test_reconcile_reports_a_set_aside_ledger(tmp_path: Path) -> None:
    """Before: a ledger that was not JSON at all was set aside and reconcile said "nothing to do"."""
    _host, cfg, _pools = one_node(tmp_path)
    cfg.ledger_path.parent.mkdir(parents=True)
    cfg.ledger_path.write_text("{not json\n")
    out = operations.reconcile(cfg, {}, {})
    assert out.set_aside is not None
    assert any(a.startswith(f"set the unreadable ledger aside to {out.set_aside}") for a in out.actions)
    assert any("could not read everything" in a for a in out.actions)


def test_reconcile_reports_a_recounted_summary(tmp_path: Path) -> None:
    """Before: the header's sums were repaired silently ("nothing to do")."""
    _host, cfg, pools = one_node(tmp_path)
    operations.prepare(parse_domain(vm(UA, "a")), cfg, pools)
    operations.mark(UA, cfg, state="running")
    path = cfg.ledger_path
    path.write_text(path.read_text().replace('"held":{"node0/2048kB":32}', '"held":{"node0/2048kB":30}'))
    out = operations.reconcile(cfg, {UA: vm(UA, "a")}, tokens(cfg), pools=pools)
    assert any("recounted" in a for a in out.actions), out.actions
    assert operations.ledger_for(cfg).read().reserved(KEY) == 32


def test_the_reconcile_command_reports_repairs_in_json_and_text(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("libvirt")
    from kvmhooks.cli import main
    from tests.unit.test_hook import write_config

    host, cfg, pools = one_node(tmp_path)
    with Events("kill", first_ledger_after_pool).installed(pools) as broken, pytest.raises(Dead):
        operations.prepare(parse_domain(vm(UA, "a")), cfg, broken)
    node = tmp_path / "node.xml"
    node.write_text("<node></node>")
    conf = write_config(host)
    assert main(["reconcile", "--json", "--config", str(conf), "--uri", f"test://{node}"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert any("rolled back" in a for a in data["actions"]) and data["lost"] == []
    cfg.ledger_path.write_text("[]\n")
    assert main(["reconcile", "--config", str(conf), "--uri", f"test://{node}"]) == 0
    text = capsys.readouterr().out
    assert "nothing to do" not in text and "set the unreadable ledger aside" in text


# --- 3. adoption: QEMU identified by what only libvirt controls; no guessed node -------------------------

def adopt(host: FakeHost, xml: bytes) -> DomainRecord | None:
    return operations.adopt(parse_domain(xml), host.config())


IMPOSTOR_MAPS = ("7f1000000000 default file=/dev/hugepages/x huge dirty=128 N0=128 kernelpagesize_kB=2048\n")


@pytest.mark.parametrize("how", ["no pid file", "pid file names a user's process", "wrong cgroup",
                                 "a delegated cgroup named like libvirt's", "another domain's cgroup"])
def test_a_process_that_names_the_uuid_is_not_taken_for_the_vm(numa_host: FakeHost, how: str) -> None:
    """Before: any process with "-uuid UUID" in its arguments was taken for the VM's QEMU: here a user's
    process claiming 128 pages on node 0 made adoption count node 0's admin pages as the VM's (and its stop
    then shrank the admin's pool), while the VM's real pages on node 1 leaked."""
    numa_host.set_pool(0, 2048, 128)  # the admin's own
    numa_host.set_pool(1, 2048, 128 + 6)  # the VM's, and the admin's 6
    if how == "no pid file":
        fake_qemu(numa_host, 4242, U1, IMPOSTOR_MAPS, uid=1000, pidfile=False,
                  cgroup="0::/user.slice/user-1000.slice/session-3.scope\n")
    elif how == "pid file names a user's process":  # a stale pid file whose pid a user's process got
        fake_qemu(numa_host, 4242, U1, IMPOSTOR_MAPS, uid=1000,
                  cgroup="0::/user.slice/user-1000.slice/user@1000.service/machine-qemu\\x2d1\\x2dvm1.scope\n")
    elif how == "a delegated cgroup named like libvirt's":  # systemd lets a user make cgroups under its own
        fake_qemu(numa_host, 4242, U1, IMPOSTOR_MAPS,
                  cgroup="0::/user.slice/user-1000.slice/user@1000.service/machine.slice/"
                         "machine-qemu\\x2d1\\x2dvm1.scope\n")
    elif how == "wrong cgroup":
        fake_qemu(numa_host, 4242, U1, IMPOSTOR_MAPS, cgroup="0::/user.slice/user-1000.slice/session-3.scope\n")
    else:
        fake_qemu(numa_host, 4242, U1, IMPOSTOR_MAPS, cgroup="12:cpuset:/machine/qemu-2-vm2.libvirt-qemu/emulator\n")
    rec = adopt(numa_host, domain_xml(uuid=U1))
    assert rec is not None and rec.hugepages == {} and rec.unplaced == {"2048kB": 128}
    state = operations.ledger_for(numa_host.config()).read()
    assert state.pools == {} and any("not placed" in n for n in state.notes)
    operations.release(U1, numa_host.config())
    assert (numa_host.pool(0), numa_host.pool(1)) == (128, 134)  # left alone: nothing lowered


def test_unreadable_numa_maps_do_not_guess_a_node(numa_host: FakeHost) -> None:
    """Before: no readable numa_maps → the planner's node (0, more free memory) was assumed: node 1's pages
    leaked and node 0's admin pool was taken for the VM's."""
    numa_host.set_free(0, 12 * 1024 * 1024)
    numa_host.set_free(1, 4 * 1024 * 1024)
    numa_host.set_pool(0, 2048, 128)
    numa_host.set_pool(1, 2048, 128 + 6)
    fake_qemu(numa_host, 4242, U1, None)
    cfg = numa_host.config()
    rec = adopt(numa_host, domain_xml(uuid=U1))
    assert rec is not None and rec.hugepages == {} and rec.unplaced == {"2048kB": 128}
    out = operations.reconcile(cfg, {U1: domain_xml(uuid=U1)}, tokens(cfg))
    assert any("still unplaced" in a for a in out.actions) and not any("set pool" in a for a in out.actions)
    assert (numa_host.pool(0), numa_host.pool(1)) == (128, 134)
    # once the facts can be read, reconcile places them
    (numa_host.proc / "4242/numa_maps").write_text(MAPS)
    out = operations.reconcile(cfg, {U1: domain_xml(uuid=U1)}, tokens(cfg))
    state = operations.ledger_for(cfg).read()
    assert state.domains[U1].hugepages == {KEY1: 128} and not state.domains[U1].unplaced, out.actions
    assert state.pools[KEY1].baseline == 6
    operations.release(U1, cfg)
    assert (numa_host.pool(0), numa_host.pool(1)) == (128, 6)


def test_libvirts_qemu_is_found_on_systemd_and_cgroup_v1_layouts(numa_host: FakeHost) -> None:
    fake_qemu(numa_host, 4242, U1, MAPS, uid=64055, name="web.prod-1",
              cgroup="0::/machine.slice/machine-qemu\\x2d7\\x2dweb.prod\\x2d1.scope/libvirt/emulator\n")
    cfg = Config(proc_root=numa_host.proc, run_root=numa_host.root / "run-root",
                 hooks_dir=numa_host.root / "etc/libvirt/hooks")
    (numa_host.root / "etc/libvirt").mkdir(parents=True)
    (numa_host.root / "etc/libvirt/qemu.conf").write_text('# user = "qemu"\nuser = "+64055"\ngroup = "kvm"\n')
    assert operations.qemu_of(cfg, "web.prod-1", U1).pid == 4242
    (numa_host.root / "etc/libvirt/qemu.conf").write_text('user = "+64056"\n')  # another QEMU user
    with pytest.raises(HostError, match="not owned by root or the QEMU user"):
        operations.qemu_of(cfg, "web.prod-1", U1)
    for bad in ("../../etc/passwd", "a/b", ".", "", "x" * 300):
        with pytest.raises(HostError, match="cannot name a libvirt pid file"):
            operations.qemu_of(cfg, bad, U1)


def test_a_pid_file_that_is_a_symlink_is_refused(numa_host: FakeHost) -> None:
    fake_qemu(numa_host, 4242, U1, MAPS, pidfile=False)
    run = numa_host.root / "run-root/libvirt/qemu"
    run.mkdir(parents=True)
    (numa_host.root / "elsewhere").write_text("4242")
    (run / "vm1.pid").symlink_to(numa_host.root / "elsewhere")
    with pytest.raises(HostError, match="no libvirt pid file"):
        operations.qemu_of(numa_host.config(), "vm1", U1)


# libvirt's own expectations for its machine names (tests/virsystemdtest.c, testMachineName).
LIBVIRT_MACHINE_NAMES = [
    ("demo", 1, "qemu-1-demo"), ("demo-name", 2, "qemu-2-demo-name"), ("demo!name", 3, "qemu-3-demoname"),
    (".demo", 4, "qemu-4-demo"), ("bull\U0001f4a9", 5, "qemu-5-bull"), ("demo..name", 6, "qemu-6-demo.name"),
    ("12345678901234567890123456789012345678901234567890123456789", 7,
     "qemu-7-123456789012345678901234567890123456789012345678901234567"),
    ("123456789012345678901234567890123456789012345678901234567890", 8,
     "qemu-8-123456789012345678901234567890123456789012345678901234567"),
    ("kstest-network-device-default-httpks_(c9eed63e-981e-48ec-acdc-56b3f8c5f678)", 100,
     "qemu-100-kstest-network-device-default-httpksc9eed63e-981e-48ec"),
    ("kstest-network-device-default-httpks_(c9eed63e-981e-48ec--cdc-56b3f8c5f678)", 10,
     "qemu-10-kstest-network-device-default-httpksc9eed63e-981e-48ec-c"),
    ("demo.-.test.", 11, "qemu-11-demo.test"),
]


@pytest.mark.parametrize(("name", "dom_id", "want"), LIBVIRT_MACHINE_NAMES)
def test_machine_names_are_libvirts(name: str, dom_id: int, want: str) -> None:
    assert want in machine_names(dom_id, name)


def test_status_and_metrics_memory_come_from_libvirts_qemu_only(numa_host: FakeHost) -> None:
    """Before: a user's process naming the UUID supplied the VM's memory per node to status and metrics."""
    fake_qemu(numa_host, 4242, U1, MAPS, uid=1000)
    assert operations.vm_memory(numa_host.config(), "vm1", U1) == {}
    (numa_host.proc / "4242/status").write_text("Name:\tqemu\nUid:\t0\t0\t0\t0\n")
    assert operations.vm_memory(numa_host.config(), "vm1", U1)[1]["huge"] == 100 * 2048


# --- 4. an admin who lowers a pool by hand is not overruled -------------------------------------------------

def test_an_admin_lowering_a_pool_keeps_their_value(tmp_path: Path) -> None:
    """The measured case: admin 20 + VM 128 = 148; the admin writes 143. Before: reconcile set 148 again and
    after the VM's stop the pool was 20 where the admin wanted 15."""
    host, cfg, pools = one_node(tmp_path, admin=20)
    operations.prepare(parse_domain(domain_xml(uuid=UA)), cfg, pools)
    assert host.pool(0) == 148
    pools.set(0, 2048, 143)  # the admin, by hand
    out = operations.reconcile(cfg, {UA: domain_xml(uuid=UA)}, tokens(cfg), pools=pools)
    assert host.pool(0) == 143 and not any("set pool" in a for a in out.actions)
    state = operations.ledger_for(cfg).read()
    assert state.pools[KEY].baseline == 15
    assert any("lowered by hand from 148 to 143" in a for a in out.actions)
    operations.release(UA, cfg, pools)
    assert host.pool(0) == 15


def test_a_pool_lowered_while_an_intent_names_it_is_not_the_admins(tmp_path: Path) -> None:
    """A release killed after its intent and before its write: the pool is where the intent began; recovery
    finishes it, the baseline is the admin's 40, not taken from the half-done write."""
    host, cfg, pools = one_node(tmp_path)
    operations.prepare(parse_domain(vm(UA, "a")), cfg, pools)
    from tests.unit.test_crash_regressions import first_pool

    with Events("kill", first_pool).installed(pools) as broken, pytest.raises(Dead):
        operations.release(UA, cfg, broken)
    operations.reconcile(cfg, {}, {}, pools=pools)
    assert host.pool(0) == 40
    operations.prepare(parse_domain(vm(UB, "b")), cfg, pools)
    operations.release(UB, cfg, pools)
    assert host.pool(0) == 40


# --- 11a. a killed writer's temp file does not stay for good ------------------------------------------------

def test_stale_ledger_temp_files_are_removed_by_the_next_writer(tmp_path: Path) -> None:
    """Before: `.ledger.json.PID.tmp` of a writer killed between its open and its rename stayed forever."""
    led = Ledger(tmp_path / "ledger.json")
    with led.transaction() as st:
        st.domains[UA] = DomainRecord(name="a")
    dead = tmp_path / ".ledger.json.999999.tmp"
    reused = tmp_path / f".ledger.json.{os.getppid()}.tmp"  # a dead writer's PID, now another live process's
    others = [tmp_path / ".other.json.1.tmp", tmp_path / ".ledger.json.tmp", tmp_path / "ledger.json.broken-x"]
    for p in (dead, reused, *others):
        p.write_text("{half")
    with led.transaction() as st:
        st.domains[UA].state = "running"
    assert not dead.exists() and not reused.exists()
    assert all(p.exists() for p in others)
    assert led.read().domains[UA].state == "running"


# --- 11e. a version 1 record shows like a version 2 one -----------------------------------------------------

def test_status_shows_the_pins_of_a_version_1_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: `kvmhooks status` printed "vcpus:{'0': '1'}" for a VM recorded by kvmhooks 1."""
    pytest.importorskip("libvirt")
    from kvmhooks.cli import main
    from tests.unit.test_hook import write_config

    host, cfg, _ = one_node(tmp_path, admin=72)
    cfg.ledger_path.parent.mkdir(parents=True)
    v1 = {"version": 1, "pools": {KEY: {"baseline": 40}},
          "domains": {UA: {"name": "a", "state": "running", "hugepages": {KEY: 32}, "cpus": [1],
                           "pins": {"vcpus": {"0": "1"}, "emulator": None, "iothreads": {}, "floating": [],
                                    "emulator_floats": False},
                           "applied": {"vcpus_live": 1, "pins": {"vcpus": {"0": "1"}, "emulator": "1"},
                                       "worker": {"pid": 5, "sid": 5, "seconds": 0.5}},
                           "error": None, "updated": 1.0}}}
    cfg.ledger_path.write_text(json.dumps(v1, indent=1))
    node = tmp_path / "node.xml"
    node.write_text(f"<node><domain type='test'><name>a</name><uuid>{UA}</uuid><memory>65536</memory>"
                    "<vcpu>1</vcpu><os><type>hvm</type></os></domain></node>")
    conf = write_config(host)
    assert main(["status", "--config", str(conf), "--uri", f"test://{node}"]) == 0
    out = capsys.readouterr().out
    assert "0:1 emu:1" in out and "{" not in out, out
    assert main(["status", "--json", "--config", str(conf), "--uri", f"test://{node}"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["vms"]
    assert row["applied"]["pins"] == {"0": "1"} and row["applied"]["worker_pid"] == 5


# --- tests the mutation run showed missing ------------------------------------------------------------------

def test_the_ledger_is_written_file_fsync_rename_directory_fsync(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A rename before the file's fsync can leave an empty ledger after a power cut; a missing directory fsync
    can lose the rename. The real calls are made; they are only recorded."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        what = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file", what))
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        events.append(("rename", f"{src} -> {dst}"))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)  # the ledger calls os.fsync / os.replace through the module
    monkeypatch.setattr(os, "replace", replace)
    led = Ledger(tmp_path / "ledger.json")
    with led.transaction() as st:
        st.domains[UA] = DomainRecord(name="a")
    kinds = [k for k, _ in events]
    assert kinds == ["fsync-file", "rename", "fsync-dir"], events
    assert events[0][1] == str(tmp_path / f".ledger.json.{os.getpid()}.tmp")
    assert events[1][1] == f"{tmp_path / f'.ledger.json.{os.getpid()}.tmp'} -> {tmp_path / 'ledger.json'}"
    assert events[2][1] == str(tmp_path)


def test_the_held_marker_exists_before_the_record_is_committed(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The shell dispatcher skips a stop whose VM has no marker: a record committed before its marker would
    lose that VM's release if the process died between the two; a marker removed before the commit that drops
    the record likewise."""
    seen: list[tuple[bool, bool]] = []  # (record in the text written, marker present) at each write
    real_write = Ledger._write

    def write(self: Ledger, text: str) -> None:
        seen.append((UA in text, (self.held_dir / UA).exists()))
        real_write(self, text)

    monkeypatch.setattr(Ledger, "_write", write)
    led = Ledger(tmp_path / "ledger.json")
    with led.transaction() as st:
        st.domains[UA] = DomainRecord(name="a")
    with led.transaction() as st:
        del st.domains[UA]
    assert seen == [(True, True), (False, True)]
    assert not (led.held_dir / UA).exists()


class FifoKernel:
    """A kernel behind a fake sysfs tree's nr_hugepages, a FIFO: it reads the count written (the request),
    then answers one read with what it managed (``give(asked)``), as /sys does after a write."""

    def __init__(self, path: Path, give: object):
        self.path, self.give = path, give
        self.asked: list[int] = []
        path.unlink()
        os.mkfifo(path)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with open(self.path) as f:
            asked = int(f.read())
        self.asked.append(asked)
        with open(self.path, "w") as f:
            f.write(f"{self.give(asked)}\n")  # type: ignore[operator]

    def stop(self) -> None:
        if self.thread.is_alive():  # the code under test never read back: unblock the thread
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
            time.sleep(0.1)
            os.close(fd)
        self.thread.join(5)


def test_the_real_sysfspools_refuses_a_kernel_that_gives_40_of_128(tmp_path: Path) -> None:
    """Every other test's pools are a subclass that plays the kernel; this one goes through the real class on
    a fake sysfs tree whose kernel gives 40 pages when asked for 128."""
    host = FakeHost(tmp_path).build()
    nr = host.sysfs / "devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages"
    kernel = FifoKernel(nr, lambda asked: 40)
    try:
        with pytest.raises(CapacityError, match="got 40 of 128 pages"):
            apply_pool_writes(SysfsPools(host.sysfs, host.proc), [PoolWrite(KEY, 0, 2048, 0, 128, 0)],
                              time.monotonic(), "vm1")
    finally:
        kernel.stop()
    assert kernel.asked == [128]


def test_the_real_sysfspools_reads_back_persistent_pages_not_surplus(tmp_path: Path) -> None:
    """A shrink under pages in use: the kernel keeps them as surplus; the read-back is nr - surplus."""
    host = FakeHost(tmp_path).build()
    pd = host.sysfs / "devices/system/node/node0/hugepages/hugepages-2048kB"
    (pd / "surplus_hugepages").write_text("118\n")
    kernel = FifoKernel(pd / "nr_hugepages", lambda asked: asked + 118)
    try:
        got = apply_pool_writes(SysfsPools(host.sysfs, host.proc), [PoolWrite(KEY, 0, 2048, 128, 10, 128)],
                                time.monotonic(), "vm1")
    finally:
        kernel.stop()
    assert got == {KEY: 10} and kernel.asked == [10]
