"""Regressions from an adversarial review of the crash-safe core: crashes during recovery itself, admin
resizes between a crash and its recovery, reconcile/adoption races, hostile hook invocations.

Each test asserts a promise; steps are found by rule (e.g. "the first ledger write after a pool write")
rather than by number, so the tests stay valid while the write sequence changes.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmhooks import operations
from kvmhooks.apply.pools import SysfsPools
from kvmhooks.config import Config
from kvmhooks.domain import parse_domain
from kvmhooks.errors import CapacityError
from kvmhooks.xmlsafe import scan_uuid
from tests.fakehost import GIB, FakeHost, FakeKernel, domain_xml
from tests.unit.test_crash_safety import Dead, Faults, check_invariant, recover

REPO = Path(__file__).resolve().parents[2]
HOOK = REPO / "hooks/qemu"
UA = "aaaaaaaa-2222-3333-4444-00000000000a"
UB = "bbbbbbbb-2222-3333-4444-00000000000b"
UC = "cccccccc-2222-3333-4444-00000000000c"
KEY = "node0/2048kB"


def one_node(root: Path, admin: int = 40, **kw: object) -> tuple[FakeHost, Config, SysfsPools]:
    host = FakeHost(root, **kw).build()  # type: ignore[arg-type]
    host.set_pool(0, 2048, admin)
    return host, host.config(retry_timeout=0.0), FakeKernel(host).install()


def small(uuid: str, name: str = "vm", mib: int = 64, tuning: str = '<kvm:hugepages size="2M"/>',
          **kw: object) -> bytes:
    return domain_xml(name=name, uuid=uuid, memory_kib=mib * 1024, tuning=tuning, **kw)  # type: ignore[arg-type]


class Events(Faults):
    """Faults that also records the sequence of steps ("ledger"/"pool") and can break the first step that
    matches a rule (e.g. the first ledger write after a pool write), so tests do not hard-code step numbers
    of code that is still moving."""

    def __init__(self, kind: str = "count", rule: object = None):
        super().__init__(0, kind)
        self.trace: list[str] = []
        self.rule = rule  # callable(trace_so_far, what) -> bool

    def step(self, what: str) -> None:
        if self.dead:
            raise Dead(what)
        hit = self.rule is not None and self.rule(self.trace, what)  # type: ignore[operator]
        self.trace.append(what)
        if hit:
            self.at = self.steps + 1
        super().step(what)


def first_ledger_after_pool(trace: list[str], what: str) -> bool:
    return what == "ledger" and "pool" in trace


def first_pool(trace: list[str], what: str) -> bool:
    return what == "pool" and "pool" not in trace


def ledger_before_first_pool(expected: list[str]) -> object:
    """The ledger write immediately before the first pool write (the intent commit), found by a dry run."""
    idx = expected.index("pool") - 1
    return lambda trace, what: len(trace) == idx


def dry_trace(root: Path, fn: object) -> list[str]:
    """The steps ``fn(cfg, pools)`` makes, run on a copy of the tree."""
    import shutil

    copy = root.parent / (root.name + "-trace")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(root, copy)
    host = FakeHost(copy)
    cfg = host.config(retry_timeout=0.0)
    ev = Events()
    with ev.installed(FakeKernel(host).install()) as counting:
        fn(cfg, counting)  # type: ignore[operator]
    return ev.trace


def kill_prepare_after_pool_write(cfg: Config, pools: SysfsPools, xml: bytes) -> None:
    ev = Events("kill", first_ledger_after_pool)
    with ev.installed(pools) as broken, pytest.raises(Dead):
        operations.prepare(parse_domain(xml), cfg, broken)


def break_recovery(root: Path, cfg: Config, pools: SysfsPools, kind: str) -> None:
    """The next hook call's recovery: killed at its first pool write, or its intent commit fails (ENOSPC)."""
    if kind == "kill":
        ev = Events("kill", first_pool)
    else:
        ev = Events("enospc", ledger_before_first_pool(dry_trace(root, recover)))
    with ev.installed(pools) as broken, pytest.raises((Dead, OSError)):
        recover(cfg, broken)


# --- (a)/(c): a crash or a failed write during recovery itself -------------------------------------------

@pytest.mark.parametrize("kind", ["kill", "enospc"])
def test_crash_during_recovery_of_a_prepare_does_not_turn_leaked_pages_into_baseline(tmp_path: Path,
                                                                                      kind: str) -> None:
    root = tmp_path / "h"
    host, cfg, pools = one_node(root)
    kill_prepare_after_pool_write(cfg, pools, small(UA))
    assert host.pool(0) == 40 + 32
    break_recovery(root, cfg, pools, kind)
    recover(cfg, pools)  # the hook call after that
    state = operations.ledger_for(cfg).read()
    assert host.pool(0) == 40, (host.pool(0), state.pools, state.notes)
    # and the next VM does not see 72 as the admin's value
    operations.prepare(parse_domain(small(UB)), cfg, pools)
    operations.release(UB, cfg, pools)
    assert host.pool(0) == 40


@pytest.mark.parametrize("kind", ["kill", "enospc"])
def test_crash_during_recovery_of_a_release_does_not_leak_the_pages(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "h"
    host, cfg, pools = one_node(root)
    operations.prepare(parse_domain(small(UA)), cfg, pools)
    assert host.pool(0) == 72
    # release dies at its pool write: VM removed and intent 72 -> 40 committed, pool still 72
    with Events("kill", first_pool).installed(pools) as broken, pytest.raises(Dead):
        operations.release(UA, cfg, broken)
    assert host.pool(0) == 72
    break_recovery(root, cfg, pools, kind)
    recover(cfg, pools)
    assert host.pool(0) == 40, operations.ledger_for(cfg).read()


# --- (g): an admin resize between the crash and the recovery ---------------------------------------------

def test_admin_raise_between_a_crashed_prepare_and_its_recovery_is_kept(tmp_path: Path) -> None:
    host, cfg, pools = one_node(tmp_path)
    kill_prepare_after_pool_write(cfg, pools, small(UA))  # intent 40 -> 72, pool 72
    pools.set(0, 2048, 80)  # the admin adds 8 pages by hand before any kvmhooks call
    recover(cfg, pools)
    assert host.pool(0) == 48  # the admin's 40 + 8; kvmhooks' 32 rolled back


def test_admin_raise_between_a_crashed_release_and_its_recovery_is_kept(tmp_path: Path) -> None:
    host, cfg, pools = one_node(tmp_path)
    operations.prepare(parse_domain(small(UA)), cfg, pools)
    with Events("kill", first_pool).installed(pools) as broken, pytest.raises(Dead):
        operations.release(UA, cfg, broken)  # intent 72 -> 40, pool 72
    pools.set(0, 2048, 80)
    recover(cfg, pools)
    assert host.pool(0) == 48


# --- (g): reconcile acting on a stale decision; (e): one CPU held by two VMs ----------------------------

DEDICATED = '<kvm:hugepages size="2M"/><kvm:cpu policy="dedicated"/>'


def live(uuid: str, pins: dict[int, int], name: str = "vm") -> bytes:
    cputune = "<cputune>" + "".join(f"<vcpupin vcpu='{v}' cpuset='{c}'/>" for v, c in pins.items()) + "</cputune>"
    return small(uuid, name=name, tuning=DEDICATED, extra=cputune)


def test_reconcile_does_not_adopt_a_vm_that_stopped_while_it_looked(tmp_path: Path) -> None:
    _host, cfg, pools = one_node(tmp_path, cores_per_node=4)
    rec = operations.prepare(parse_domain(small(UA, tuning=DEDICATED)), cfg, pools).record
    pins = {v: min(c) for v, c in rec.pins.vcpus.items()} if rec.pins else {}
    snapshot = {u: r.token for u, r in operations.ledger_for(cfg).read().domains.items()}
    running = {UA: live(UA, pins)}  # libvirt said it runs...
    operations.release(UA, cfg, pools)  # ...then it stopped and was released before reconcile took the lock
    out = operations.reconcile(cfg, running, snapshot, pools=pools)
    state = operations.ledger_for(cfg).read()
    assert UA not in state.domains, (out.actions, state.domains[UA].cpus)


def test_adoption_never_records_a_cpu_another_vm_holds(tmp_path: Path) -> None:
    host, cfg, pools = one_node(tmp_path, cores_per_node=4)
    rec_b = operations.prepare(parse_domain(small(UB, name="b", tuning=DEDICATED)), cfg, pools).record
    assert rec_b.cpus
    # A runs, annotated, not in the ledger (ledger rebuilt, or reconnect); its owner pinned it live onto B's CPUs
    a_pins = {0: rec_b.cpus[0], 1: rec_b.cpus[-1]}
    host.set_pool(0, 2048, host.pool(0) + 32)  # A's pages are in the pool
    tokens = {u: r.token for u, r in operations.ledger_for(cfg).read().domains.items()}
    operations.reconcile(cfg, {UA: live(UA, a_pins, "a"), UB: live(UB, {}, "b")}, tokens, pools=pools)
    state = operations.ledger_for(cfg).read()
    assert UA in state.domains
    assert not set(state.domains[UA].cpus) & set(state.domains[UB].cpus), (state.domains[UA].cpus,
                                                                              state.domains[UB].cpus)


# --- required='no', stale records, vanished pools, v1 ledgers: promises that hold ---------------------------

def test_required_no_with_a_kernel_shortfall_replacing_a_stale_record(tmp_path: Path) -> None:
    host, cfg, pools = one_node(tmp_path)
    operations.prepare(parse_domain(small(UA)), cfg, pools)  # a stale record: libvirtd died, no release
    kernel = FakeKernel(host)

    class Fragmented(type(pools)):  # type: ignore[misc]
        def set(self, node: int, size_kib: int, count: int) -> int:
            nr, _, surplus = kernel.state(node, size_kib)
            return super().set(node, size_kib, min(count, nr - surplus + 5))  # 5 more pages at most

    frag = Fragmented(host.sysfs, host.proc)
    xml = small(UA, mib=256, tuning='<kvm:hugepages size="2M" required="no"/>')
    prepared = operations.prepare(parse_domain(xml), cfg, frag)
    assert prepared.warnings and prepared.record.hugepages == {}
    check_invariant(host, cfg, {(0, 2048): 40})
    operations.release(UA, cfg, pools)
    assert host.pool(0) == 40


def test_release_when_the_pool_directory_vanished(tmp_path: Path) -> None:
    host = FakeHost(tmp_path, nodes=2).build()
    pools = FakeKernel(host).install()
    cfg = host.config(retry_timeout=0.0)
    xml = small(UC, mib=2048, tuning="<kvm:hugepages size='1G' nodes='1'/>",
                backing="<hugepages><page size='1' unit='G'/></hugepages>")
    operations.prepare(parse_domain(xml), cfg, pools)
    pd = host.sysfs / "devices/system/node/node1/hugepages/hugepages-1048576kB"
    for f in pd.iterdir():
        f.unlink()
    pd.rmdir()
    operations.release(UC, cfg, pools)
    assert UC not in operations.ledger_for(cfg).read().domains
    recover(cfg, pools)


def test_a_version_1_ledger_is_read_and_released(tmp_path: Path) -> None:
    host, cfg, pools = one_node(tmp_path, admin=72)  # admin 40 + 32 pages of a VM prepared by kvmhooks 1
    cfg.ledger_path.parent.mkdir(parents=True)
    v1 = {"version": 1,
          "domains": {UA: {"name": "a", "state": "running", "hugepages": {KEY: 32}, "cpus": [1], "shared": False,
                           "pins": {"vcpus": {"0": "1", "1": "1"}, "emulator": None, "iothreads": {},
                                    "floating": [], "emulator_floats": False},
                           "applied": {"state": "running", "vcpus_live": 2, "pins": {"vcpus": {"0": "1"},
                                                                                     "emulator": "1"},
                                       "memtune": {"hard_limit": 1048576}, "problems": [],
                                       "balloon": {"transport": "qmp", "driver": True, "actual": None},
                                       "worker": {"pid": 5, "sid": 5, "seconds": 0.5}},
                           "error": None, "updated": 1.0}},
          "pools": {KEY: {"baseline": 40}}}
    cfg.ledger_path.write_text(json.dumps(v1, indent=1))
    operations.prepare(parse_domain(small(UB)), cfg, pools)
    assert host.pool(0) == 104
    operations.release(UA, cfg, pools)
    operations.release(UB, cfg, pools)
    assert host.pool(0) == 40


# --- concurrency -------------------------------------------------------------------------------------------

def _worker(root: str, uuid: str, rounds: int) -> None:
    host = FakeHost(Path(root))
    cfg = host.config(retry_timeout=0.0, lock_timeout=60.0)
    pools = FakeKernel(host).install()
    xml = small(uuid, name=uuid[:4])
    for _ in range(rounds):
        operations.prepare(parse_domain(xml), cfg, pools)
        operations.release(uuid, cfg, pools)
    operations.prepare(parse_domain(xml), cfg, pools)
    os._exit(0)


def _reconciler(root: str, rounds: int) -> None:
    host = FakeHost(Path(root))
    cfg = host.config(retry_timeout=0.0, lock_timeout=60.0)
    pools = FakeKernel(host).install()
    for _ in range(rounds):
        snap = {u: r.token for u, r in operations.ledger_for(cfg).read().domains.items()}
        operations.reconcile(cfg, {}, snap, pools=pools)  # nothing "runs", but all are within STARTING_GRACE
    os._exit(0)


def test_concurrent_prepare_release_reconcile(tmp_path: Path) -> None:
    host, cfg, pools = one_node(tmp_path)
    FakeKernel(host)  # records the node's memory before any huge page
    ctx = multiprocessing.get_context("fork")
    uuids = [f"{i:08x}-2222-3333-4444-000000000000" for i in range(1, 5)]
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), u, 8)) for u in uuids]
    procs.append(ctx.Process(target=_reconciler, args=(str(tmp_path), 8)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    state = operations.ledger_for(cfg).read()
    assert sorted(state.domains) == uuids
    check_invariant(host, cfg, {(0, 2048): 40})
    for u in uuids:
        operations.release(u, cfg, pools)
    assert host.pool(0) == 40


# --- the hook script: argv, stdin, the early exit ---------------------------------------------------------

def write_config(host: FakeHost) -> Path:
    lines = [f'sysfs_root = "{host.sysfs}"', f'proc_root = "{host.proc}"', f'state_dir = "{host.root / "run"}"',
             f'log = "{host.root / "kvmhooks.log"}"', "retry_timeout = 0.2"]
    path = host.root / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_hook(config: Path, args: list[str], xml: bytes | None, **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(HOOK), *args], input=xml, capture_output=xml is not None,
                          env={"KVMHOOKS_CONFIG": str(config), "KVMHOOKS_PYTHON": sys.executable,
                               "PATH": "/usr/bin:/bin", "LC_ALL": "C"},
                          timeout=60, **kw)  # type: ignore[call-overload]


def test_release_of_a_vm_whose_owner_removed_the_live_annotation_with_a_configured_state_dir(
        tmp_path: Path) -> None:
    """`virsh metadata --live --remove` by the VM's owner; the admin keeps state under state_dir."""
    host, _, _ = one_node(tmp_path)
    conf = write_config(host)
    xml = small(UA)
    assert run_hook(conf, ["vm", "prepare", "begin", "-"], xml).returncode == 0
    assert host.pool(0) == 72
    unannotated = small(UA, tuning=None)
    r = run_hook(conf, ["vm", "release", "end", "-"], unannotated)
    assert r.returncode == 0
    assert host.pool(0) == 40, "the VM's pages leaked: hooks/qemu looked in /run/kvmhooks, not state_dir"


@pytest.mark.parametrize("args", [[], ["vm"], ["vm", "reconnect"], ["vm", "stopped", "end"]])
def test_hook_with_short_argv_exits_0(tmp_path: Path, args: list[str]) -> None:
    host, _, _ = one_node(tmp_path)
    r = run_hook(write_config(host), args, small(UA))
    assert (r.returncode, r.stdout) == (0, b"")


@pytest.mark.parametrize("op", ["reconnect", "started", "release"])
def test_hook_with_stdin_closed_exits_0(tmp_path: Path, op: str) -> None:
    host, _, _ = one_node(tmp_path)
    conf = write_config(host)
    r = subprocess.run([str(HOOK), "vm", op, "begin", "-"], stdin=None, capture_output=True,
                       env={"KVMHOOKS_CONFIG": str(conf), "KVMHOOKS_PYTHON": sys.executable,
                            "PATH": "/usr/bin:/bin"}, timeout=60,
                       preexec_fn=lambda: os.close(0))
    assert r.returncode == 0, r.stderr.decode()[-300:]


@pytest.mark.parametrize("op", ["reconnect", "started", "stopped", "release", "prepare"])
def test_hook_with_truncated_stdin(tmp_path: Path, op: str) -> None:
    host, _, _ = one_node(tmp_path)
    xml = small(UA)
    r = run_hook(write_config(host), ["vm", op, "begin", "-"], xml[: len(xml) // 2])
    assert r.stdout == b""
    assert r.returncode == (1 if op == "prepare" else 0)
    if op == "prepare":
        assert r.stderr.count(b"\n") == 1


def test_uppercase_uuid_is_released(tmp_path: Path) -> None:
    host, _, _ = one_node(tmp_path)
    conf = write_config(host)
    xml = small(UA.upper())
    assert run_hook(conf, ["vm", "prepare", "begin", "-"], xml).returncode == 0
    assert host.pool(0) == 72
    assert run_hook(conf, ["vm", "release", "end", "-"], xml).returncode == 0
    assert host.pool(0) == 40


def test_scan_uuid_ignores_a_uuid_in_a_comment_before_the_real_one() -> None:
    """Not producible through libvirt (it formats <uuid> before any user comment), but hooks/qemu and Python
    must agree on the UUID (tests/unit/test_hook_dispatcher.py checks the shell)."""
    xml = small(UA).replace(b"<name>", f"<!-- <uuid>{UB}</uuid> --><name>".encode())
    assert scan_uuid(xml) == UA
    cdata = small(UA).replace(b"<name>", f"<description><![CDATA[<uuid>{UB}</uuid>]]></description><name>".encode())
    assert scan_uuid(cdata) == UA
    assert scan_uuid(small(UA).replace(b"<name>", b"<!-- never closed <name>")) is None


# --- (a)/(b) property: the prepare matrix but killing the recovery at every step too ------------------------

def test_double_crash_matrix(tmp_path: Path) -> None:
    """Kill prepare/release at every step, then kill the first recovery at every step; the second recovery
    must restore the invariant (admin 40 + held) and keep the admin's baseline."""
    failures = []
    for op in ("prepare", "release"):
        for at in range(1, 7):
            for rat in range(1, 7):
                root = tmp_path / f"{op}-{at}-{rat}"
                host, cfg, pools = one_node(root)
                if op == "release":
                    operations.prepare(parse_domain(small(UA)), cfg, pools)
                f = Events("kill", lambda t, w, at=at: len(t) == at - 1)
                with f.installed(pools) as broken:
                    try:
                        if op == "prepare":
                            operations.prepare(parse_domain(small(UA)), cfg, broken)
                        else:
                            operations.release(UA, cfg, broken)
                    except Dead:
                        pass
                if not f.dead:
                    continue
                g = Events("kill", lambda t, w, rat=rat: len(t) == rat - 1)
                with g.installed(pools) as broken, contextlib.suppress(Dead):
                    recover(cfg, broken)
                if not g.dead:
                    continue
                recover(cfg, pools)
                state = operations.ledger_for(cfg).read()
                held = state.reserved(KEY)
                if host.pool(0) != 40 + held or (KEY in state.pools and state.pools[KEY].baseline != 40):
                    failures.append((op, "+".join(f.trace), "+".join(g.trace), host.pool(0), held,
                                     state.pools[KEY].baseline if KEY in state.pools else None))
    assert not failures, "\n".join(map(str, failures))


def test_capacity_error_is_not_swallowed_for_required_yes(tmp_path: Path) -> None:
    host, cfg, pools = one_node(tmp_path)
    host.set_free(0, 10 * 1024)
    with pytest.raises(CapacityError):
        operations.prepare(parse_domain(small(UA)), cfg, pools)
    assert host.pool(0) == 40 and operations.ledger_for(cfg).read().domains == {}


_ = GIB
