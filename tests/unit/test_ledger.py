"""The shared ledger: atomic writes, lock deadline, and 16 concurrent prepares in separate processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from kvmhooks.errors import LockTimeout
from kvmhooks.ledger import DomainRecord, Ledger
from tests.fakehost import GIB, FakeHost, FakeKernel

UUID = "11111111-2222-3333-4444-{:012d}"


def test_transaction_writes_atomically_and_only_on_change(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "run/ledger.json", timeout=1)
    with led.transaction() as st:
        st.domains[UUID.format(1)] = DomainRecord(name="a", hugepages={"node0/2048kB": 3})
    mtime = (tmp_path / "run/ledger.json").stat().st_mtime_ns
    with led.transaction():
        pass
    assert (tmp_path / "run/ledger.json").stat().st_mtime_ns == mtime
    assert led.read().reserved("node0/2048kB") == 3
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_failed_transaction_changes_nothing(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "ledger.json", timeout=1)
    with pytest.raises(RuntimeError), led.transaction() as st:
        st.domains["x"] = DomainRecord(name="a")
        raise RuntimeError("boom")
    assert led.read().domains == {}


def _hold_lock(path: str, seconds: float, ready: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    with Ledger(Path(path), 5).transaction():
        ready.set()
        time.sleep(seconds)


def test_lock_has_a_deadline(tmp_path: Path) -> None:
    ready = multiprocessing.Event()
    p = multiprocessing.Process(target=_hold_lock, args=(str(tmp_path / "ledger.json"), 3, ready))
    p.start()
    ready.wait(5)
    t0 = time.monotonic()
    late = Ledger(tmp_path / "ledger.json", 0.3)
    with pytest.raises(LockTimeout, match="stayed locked for 0.3 s"), late.transaction():
        pass
    assert time.monotonic() - t0 < 2
    p.terminate()
    p.join()


def _prepare_one(root: str, i: int, go: multiprocessing.synchronize.Event, out: multiprocessing.Queue) -> None:  # type: ignore[name-defined,type-arg]
    from kvmhooks import operations
    from kvmhooks.domain import parse_domain
    from kvmhooks.errors import KvmhooksError
    from tests.fakehost import domain_xml

    host = FakeHost(Path(root), free_per_node_kib=15 * GIB + GIB + 512 * 1024)
    pools = FakeKernel(host).install()
    cfg = host.config(lock_timeout=30.0, host_reserve_kib=GIB)
    dom = parse_domain(domain_xml(name=f"vm{i}", uuid=UUID.format(i), memory_kib=GIB))
    go.wait(10)
    try:
        operations.prepare(dom, cfg, pools=pools)  # type: ignore[arg-type]
        out.put((i, "ok"))
    except KvmhooksError as e:
        out.put((i, f"{type(e).__name__}: {e}"))


def test_16_concurrent_prepares_exact_counts_and_one_capacity_failure(tmp_path: Path) -> None:
    host = FakeHost(tmp_path, free_per_node_kib=15 * GIB + GIB + 512 * 1024).build()
    FakeKernel(host)
    go = multiprocessing.Event()
    out: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    procs = [multiprocessing.Process(target=_prepare_one, args=(str(tmp_path), i, go, out)) for i in range(16)]
    for p in procs:
        p.start()
    go.set()
    results = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(10)
    ok = [i for i, r in results.items() if r == "ok"]
    failed = {i: r for i, r in results.items() if r != "ok"}
    assert len(ok) == 15 and len(failed) == 1
    (msg,) = failed.values()
    assert msg.startswith("CapacityError: VM 'vm") and "not enough memory" in msg
    assert host.pool(0) == 15 * 512
    data = Ledger(tmp_path / "run/ledger.json").read().as_dict()
    assert sorted(data["domains"]) == sorted(UUID.format(i) for i in ok)
    assert sum(d["hugepages"]["node0/2048kB"] for d in data["domains"].values()) == 15 * 512
    assert sorted(os.listdir(tmp_path / "run")) == ["held", "ledger.json", "ledger.json.lock", "stopping", "tune",
                                                 "up"]  # no temps
    assert sorted(os.listdir(tmp_path / "run/held")) == sorted(data["domains"])  # one marker per record
    assert os.listdir(tmp_path / "run/tune") == []  # huge pages only: nothing for their started hooks


def test_a_transaction_touching_one_vm_decodes_only_that_one(tmp_path: Path) -> None:
    """The file is one line per VM plus running sums: a hook that marks one VM leaves the other lines as read,
    and planning reads the sums (bench/ledger_bench.py has the figures)."""
    led = Ledger(tmp_path / "ledger.json")
    with led.transaction() as st:
        for i in range(50):
            st.domains[UUID.format(i)] = DomainRecord(name=f"vm{i}", hugepages={"node0/2048kB": 2}, cpus=[i])
    before = (tmp_path / "ledger.json").read_text().splitlines()
    with led.transaction() as st:
        st.domains[UUID.format(7)].state = "running"
        assert st.reserved("node0/2048kB") == 100 and len(st.dedicated_cpus(excluding=UUID.format(7))) == 49
        assert len(st.domains._rec) == 1  # only the one it touched was decoded
    after = (tmp_path / "ledger.json").read_text().splitlines()
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert changed == [8]  # line 0 is the header; VM 7 is line 8; the sums did not change
    st = led.read()
    assert st.domains.summary() == st.domains.recount()


def test_a_wrong_summary_is_recounted_by_the_repair_path(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "ledger.json")
    with led.transaction() as st:
        st.domains[UUID.format(1)] = DomainRecord(name="a", hugepages={"node0/2048kB": 5})
    path = tmp_path / "ledger.json"
    path.write_text(path.read_text().replace('"held":{"node0/2048kB":5}', '"held":{"node0/2048kB":9}'))
    assert led.read().reserved("node0/2048kB") == 9  # trusted on the hot path...
    with led.hold(quarantine=True) as txn:  # ...and checked by kvmhooks reconcile
        assert txn.state.reserved("node0/2048kB") == 5
        assert "recounted" in txn.state.notes[-1]
    assert led.read().reserved("node0/2048kB") == 5


def test_version_1_files_are_read(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    path.write_text(json.dumps({"version": 1, "domains": {UUID.format(1): {
        "name": "a", "state": "running", "hugepages": {"node0/2048kB": 64}, "cpus": [2], "shared": False,
        "pins": {"vcpus": {"0": "2"}, "emulator": "2", "iothreads": {}, "floating": [], "emulator_floats": False},
        "applied": {"pins": {"vcpus": {"0": "2"}, "emulator": "2"}, "worker": {"pid": 5, "sid": 4, "seconds": 0.1}},
        "error": None, "updated": 1.0, "some_future_field": 1}}, "pools": {"node0/2048kB": {"baseline": 10}}},
        indent=1))
    st = Ledger(path).read()
    rec = st.domains[UUID.format(1)]
    assert st.reserved("node0/2048kB") == 64 and st.dedicated_cpus() == {2}
    assert rec.pins is not None and rec.pins.vcpus == {0: frozenset({2})} and rec.applied.worker_pid == 5
    assert rec.applied.pins == {"0": "2"} and st.pools["node0/2048kB"].expected == -1
