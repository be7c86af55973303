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
    data = json.loads((tmp_path / "run/ledger.json").read_text())
    assert sorted(data["domains"]) == sorted(UUID.format(i) for i in ok)
    assert sum(d["hugepages"]["node0/2048kB"] for d in data["domains"].values()) == 15 * 512
    assert sorted(os.listdir(tmp_path / "run")) == ["ledger.json", "ledger.json.lock"]  # no temp files left
