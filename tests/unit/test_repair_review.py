"""Issue 17 items 1-4, a review of the repair path: a pool record lost with a set-aside, adoption into a pool
with no record, a repair killed after the set-aside, a broken or missing header line, a salvaged release
intent, unplaced pages in a salvaged pool, a summary that does not decode (D1-D6, D10).

Each test fails on the code before its fix (the docstring says how it failed).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmhooks import operations
from kvmhooks.apply.pools import SysfsPools
from kvmhooks.config import Config
from kvmhooks.domain import parse_domain
from kvmhooks.errors import LedgerError
from kvmhooks.ledger import RECOUNTED, salvage
from tests.fakehost import FakeHost, FakeKernel
from tests.unit.test_adopt import fake_qemu
from tests.unit.test_crash_regressions import Events, first_pool
from tests.unit.test_crash_safety import Dead
from tests.unit.test_repair_regressions import (
    KEY,
    KEY1,
    U1,
    UA,
    UB,
    UC,
    a_across_two_nodes,
    break_line,
    one_node,
    tokens,
    vm,
)


def cli_snapshot(cfg: Config) -> dict[str, str]:
    """What `kvmhooks reconcile` passes as the snapshot (kvmhooks/cli/reconcile.py: salvage when unreadable)."""
    try:
        return tokens(cfg)
    except LedgerError:
        return {u: r.token for u, r in salvage(cfg.ledger_path.read_bytes())[0].domains.items()}


def edit_header(cfg: Config, change: Callable[[dict[str, Any]], object]) -> None:
    path = cfg.ledger_path
    head, _, rest = path.read_text().partition("\n")
    h = json.loads(head)
    change(h)
    path.write_text(json.dumps(h, separators=(",", ":")) + "\n" + rest)


def two_running(tmp_path: Path, admin: int = 20) -> tuple[FakeHost, Config, SysfsPools]:
    host, cfg, pools = one_node(tmp_path, admin=admin)
    for u, n in ((UA, "a"), (UB, "b")):
        operations.prepare(parse_domain(vm(u, n)), cfg, pools)
        operations.mark(u, cfg, state="running")
    assert host.pool(0) == admin + 64
    return host, cfg, pools


# --- D1: a pool record lost with the set-aside ---------------------------------------------------------------

def test_a_lost_pool_record_leaks_the_vms_pages_at_release(tmp_path: Path) -> None:
    """Before: the kept VM record held pages in a pool with no record; target() took the pool's size (those
    pages included) for the admin's, so node 1 ended at 22 pages, not the admin's 6."""
    host, cfg, pools, xml = a_across_two_nodes(tmp_path)
    held1 = operations.ledger_for(cfg).read().domains[UA].hugepages[KEY1]
    token = tokens(cfg)[UA]
    edit_header(cfg, lambda h: h["pools"][KEY1].update(baseline=-1))
    out = operations.reconcile(cfg, {UA: xml}, {UA: token}, pools=pools)
    assert host.pool(1) == 6 + held1
    assert operations.ledger_for(cfg).read().pools[KEY1].baseline == 6
    operations.release(UA, cfg, pools)
    assert (host.pool(0), host.pool(1)) == (40, 6)
    assert any(a.startswith(f"pool {KEY1} had lost its record") for a in out.actions), out.actions


def test_a_lost_pool_record_and_a_vm_stopped_meanwhile(tmp_path: Path) -> None:
    """Before: B, stopped while the ledger was unreadable, was released to baseline + held with the pool's
    size as baseline: the pool stayed at 116 with the admin's 20 counted as 84."""
    host, cfg, pools = two_running(tmp_path)
    before = tokens(cfg)
    edit_header(cfg, lambda h: h["pools"][KEY].update(baseline="x"))
    operations.reconcile(cfg, {UA: vm(UA, "a")}, before, pools=pools)
    assert host.pool(0) == 20 + 32
    operations.release(UA, cfg, pools)
    assert host.pool(0) == 20


def test_the_dry_run_rebuilds_a_lost_pool_record_too(tmp_path: Path) -> None:
    """Before: the dry run took the pool's size for the admin's and would have raised it "from 84 to 116"."""
    _host, cfg, pools = two_running(tmp_path)
    before = tokens(cfg)
    edit_header(cfg, lambda h: h["pools"][KEY].update(baseline="x"))
    text = cfg.ledger_path.read_bytes()
    out = operations.reconcile(cfg, {UA: vm(UA, "a")}, before, dry_run=True, pools=pools)
    assert f"set pool {KEY} from 84 to 52 pages" in out.actions, out.actions
    assert any(a.startswith(f"pool {KEY} had lost its record") for a in out.actions)
    assert cfg.ledger_path.read_bytes() == text


# --- D2: adoption into a pool with no record -----------------------------------------------------------------

def test_two_vms_adopted_into_a_pool_with_no_record_both_hold_their_pages(tmp_path: Path) -> None:
    """Before: the first VM adopted made the record with baseline = pool - its pages, so the second found
    nothing beyond the admin's and held 0 pages: its 32 became the admin's for good (52 left, not 20)."""
    host, cfg, pools = two_running(tmp_path)
    cfg.ledger_path.write_text("{garbage\n")  # nothing of the ledger reads
    out = operations.reconcile(cfg, {UA: vm(UA, "a"), UB: vm(UB, "b")}, cli_snapshot(cfg), pools=pools)
    state = operations.ledger_for(cfg).read()
    assert {u: state.domains[u].hugepages for u in (UA, UB)} == {UA: {KEY: 32}, UB: {KEY: 32}}, out.actions
    assert state.pools[KEY].baseline == 20 and host.pool(0) == 84
    operations.release(UA, cfg, pools)
    operations.release(UB, cfg, pools)
    assert host.pool(0) == 20


# --- D3: a repair killed after the set-aside ------------------------------------------------------------------

def test_reconcile_killed_right_after_the_set_aside_keeps_the_ledger(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the ledger was renamed aside and the kept part written only at the first commit: a reconcile
    killed in between left no ledger, and the next one re-adopted A and B with nothing to tell C's 32
    pages from the admin's."""
    import kvmhooks.ledger as ledger_mod

    host, cfg, pools = one_node(tmp_path)
    for uuid, name in ((UA, "a"), (UB, "b"), (UC, "c")):
        operations.prepare(parse_domain(vm(uuid, name)), cfg, pools)
        operations.mark(uuid, cfg, state="running")
    before = tokens(cfg)
    break_line(cfg, UB)
    running = {UA: vm(UA, "a"), UB: vm(UB, "b")}  # C stopped without its release

    def killed(raw: bytes) -> None:  # the process dies while salvaging, after the set-aside
        raise Dead("salvage")

    with monkeypatch.context() as m:
        m.setattr(ledger_mod, "salvage", killed)
        with pytest.raises(Dead):
            operations.reconcile(cfg, running, {u: t for u, t in before.items() if u != UB}, pools=pools)
    operations.reconcile(cfg, running, cli_snapshot(cfg), pools=pools)
    state = operations.ledger_for(cfg).read()
    assert state.domains[UA].token == before[UA] and UC not in state.domains
    assert host.pool(0) == 40 + 64 and state.pools[KEY].baseline == 40


# --- D4: the header line broken or gone ------------------------------------------------------------------------

def test_a_broken_header_line_keeps_the_vm_lines(tmp_path: Path) -> None:
    """Before: a header that did not decode cost "everything": A was re-adopted and B, stopped meanwhile,
    was never released."""
    host, cfg, pools = two_running(tmp_path)
    before = tokens(cfg)
    head, _, rest = cfg.ledger_path.read_text().partition("\n")
    cfg.ledger_path.write_text(head[:-7] + "\n" + rest)  # the header cut short
    out = operations.reconcile(cfg, {UA: vm(UA, "a")}, cli_snapshot(cfg), pools=pools)  # B stopped
    state = operations.ledger_for(cfg).read()
    assert state.domains[UA].token == before[UA] and [u for u, _ in out.released] == [UB]
    assert any(p.startswith("the header") for p in out.lost), out.lost
    operations.release(UA, cfg, pools)
    assert host.pool(0) == 20


def test_a_lost_header_line_keeps_the_first_vm(tmp_path: Path) -> None:
    """Before: the first VM's line was taken for the header; that record was neither kept nor reported lost,
    so A, stopped meanwhile, was never released and its pages stayed."""
    host, cfg, pools = two_running(tmp_path)
    lines = cfg.ledger_path.read_text().splitlines()
    assert lines[1].startswith(f'{{"uuid":"{UA}"')
    cfg.ledger_path.write_text("\n".join(lines[1:]) + "\n")
    out = operations.reconcile(cfg, {UB: vm(UB, "b")}, cli_snapshot(cfg), pools=pools)  # A stopped
    assert [u for u, _ in out.released] == [UA] and any(p.startswith("the header") for p in out.lost), out.lost
    operations.release(UB, cfg, pools)
    assert host.pool(0) == 20


# --- D5: a salvaged release intent whose pool record was lost --------------------------------------------------

def test_a_salvaged_release_intent_whose_pool_record_was_lost_completes(tmp_path: Path) -> None:
    """Before: recovery rebuilt the record from the intent's "before" (84, B's pages included) minus A's:
    the release's target became 84 and B's 32 pages were never given back."""
    host, cfg, pools = two_running(tmp_path)
    with Events("kill", first_pool).installed(pools) as broken, pytest.raises(Dead):
        operations.release(UB, cfg, broken)
    assert host.pool(0) == 84
    snap = tokens(cfg)
    edit_header(cfg, lambda h: h["pools"][KEY].update(baseline=None))
    assert json.loads(cfg.ledger_path.read_text().partition("\n")[0])["intents"][0]["op"] == "release"
    operations.reconcile(cfg, {UA: vm(UA, "a")}, snap, pools=pools)
    assert host.pool(0) == 52
    operations.release(UA, cfg, pools)
    assert host.pool(0) == 20


# --- D6: unplaced pages in a salvaged pool ----------------------------------------------------------------------

def test_unplaced_pages_in_a_salvaged_pool_are_not_written_away(numa_host: FakeHost) -> None:
    """Before: the VM whose line broke was adopted unplaced (its QEMU cannot be read), and reconcile wrote the
    pool to baseline + held, "from 138 to 10": on a real kernel its 128 pages in use become surplus and the
    admin's 10 free pages go back to the kernel in their place."""
    numa_host.set_free(0, 12 * 1024 * 1024)
    numa_host.set_free(1, 4 * 1024 * 1024)
    numa_host.set_pool(0, 2048, 10)
    numa_host.set_pool(1, 2048, 6)
    cfg, pools = numa_host.config(retry_timeout=0.0), FakeKernel(numa_host).install()
    xml = vm(U1, "vm1", mib=256)
    operations.prepare(parse_domain(xml), cfg, pools)
    operations.mark(U1, cfg, state="running")
    assert (numa_host.pool(0), numa_host.pool(1)) == (138, 6)
    numa_host.set_pool(0, 2048, 138, free=10)  # QEMU maps its 128 pages (the admin's 10 are free)
    break_line(cfg, U1)
    fake_qemu(numa_host, 4242, U1, None)  # its numa_maps cannot be read
    out = operations.reconcile(cfg, {U1: xml}, {}, pools=pools)
    assert operations.ledger_for(cfg).read().domains[U1].unplaced
    assert numa_host.pool(0) == 138
    assert any(a.startswith("leave pool node0/2048kB at 138 pages, not 10") for a in out.actions), out.actions


# --- D10: a summary that does not decode -------------------------------------------------------------------------

def test_a_summary_that_does_not_decode_is_reported(tmp_path: Path) -> None:
    """Before: the loader recounted it silently, quarantine found the sums agreeing, and reconcile said
    "nothing to do" while rewriting a header that was not the one it read."""
    _host, cfg, pools = one_node(tmp_path, admin=20)
    operations.prepare(parse_domain(vm(UA, "a")), cfg, pools)
    operations.mark(UA, cfg, state="running")
    snap = tokens(cfg)
    edit_header(cfg, lambda h: h["summary"].update(held={KEY: "lots"}))
    broken = cfg.ledger_path.read_text()
    out = operations.reconcile(cfg, {UA: vm(UA, "a")}, snap, pools=pools)
    assert cfg.ledger_path.read_text() != broken and RECOUNTED in out.actions, out.actions


# --- any VM lines broken, any VMs stopped, the header intact or not ----------------------------------------------

UUIDS = [f"{c * 8}-1717-4444-8888-00000000000{c}" for c in "abcd"]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(broken=st.sets(st.sampled_from(range(4))), running=st.sets(st.sampled_from(range(4))),
       mibs=st.lists(st.sampled_from([32, 64, 128]), min_size=4, max_size=4), admin=st.integers(0, 50),
       header=st.sampled_from(["ok", "pool", "garbage"]))
def test_broken_lines_and_stopped_vms(broken: set[int], running: set[int], mibs: list[int], admin: int,
                                      header: str) -> None:
    """Before: a lost pool record (or header) left the kept VMs' pages to the admin at release, and adoption
    into a pool with no record counted only the first VM's pages. A VM that stopped while its line and the
    pool record were both broken is the one loss nothing can tell apart (its pages stay the admin's)."""
    root = Path(tempfile.mkdtemp(prefix="kvmhooks-review-"))
    try:
        host = FakeHost(root).build()
        host.set_pool(0, 2048, admin)
        cfg, pools = host.config(retry_timeout=0.0), FakeKernel(host).install()
        xmls = {u: vm(u, f"v{i}", mib=mibs[i]) for i, u in enumerate(UUIDS)}
        for u in UUIDS:
            operations.prepare(parse_domain(xmls[u]), cfg, pools)
            operations.mark(u, cfg, state="running")
        lines = cfg.ledger_path.read_text().splitlines()
        if header == "pool":
            lines[0] = lines[0].replace('"baseline":', '"baseline":"x","b":', 1)
        elif header == "garbage":
            lines[0] = "{garbage"
        bad = tuple(f'{{"uuid":"{UUIDS[i]}"' for i in broken)
        cfg.ledger_path.write_text("\n".join("{" if bad and line.startswith(bad) else line for line in lines) + "\n")
        out = operations.reconcile(cfg, {UUIDS[i]: xmls[UUIDS[i]] for i in running}, cli_snapshot(cfg), pools=pools)
        lost = sum(mibs[i] // 2 for i in broken - running) if header != "ok" else 0
        assert host.pool(0) == admin + lost + sum(mibs[i] // 2 for i in running), out.actions
        for u in UUIDS:
            operations.release(u, cfg, pools)
        assert host.pool(0) == admin + lost, out.actions
    finally:
        shutil.rmtree(root, ignore_errors=True)
