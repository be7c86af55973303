"""Cost of one ledger transaction with N VMs in the ledger (the global lock is held for all of it).

    .venv/bin/python bench/ledger_bench.py [--vms 1000] [--runs 50]

Three figures per ledger size, medians of ``--runs``:
- transaction: what a hook's `mark` does: lock, read the file, change one record, encode, write (temp file,
  fsync, rename, fsync of the directory), unlock;
- read: a shared-lock snapshot (status, balloond, the worker);
- prepare+release: a whole hugepage reservation and its release through kvmhooks.operations on a fake sysfs
  tree (two sessions: recovery check, drift rule, planning against every other VM, intents, pool writes).
Target ≤ 10 ms per transaction at 1000 VMs (the issue's figure: the indented pure-Python encoder took 136 ms).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kvmhooks import operations  # noqa: E402
from kvmhooks.domain import parse_domain  # noqa: E402
from kvmhooks.ledger import Applied, DomainRecord, Ledger, Pins, PoolRecord, new_token, stamp  # noqa: E402
from tests.fakehost import FakeHost, FakeKernel, domain_xml  # noqa: E402


def populate(led: Ledger, n: int) -> None:
    with led.transaction() as st:
        for i in range(n):
            uuid = f"11111111-2222-3333-4444-{i:012d}"
            st.domains[uuid] = DomainRecord(
                name=f"vm{i}", state="running", token=new_token(), hugepages={"node0/2048kB": 2},
                cpus=[i % 64], threads="prefer", pins=Pins({0: frozenset({i % 64}), 1: frozenset({(i + 1) % 64})},
                                                           frozenset({i % 64})),
                applied=Applied(vcpus_live=2, pins={"0": str(i % 64), "1": str((i + 1) % 64)}, emulator=str(i % 64),
                                memtune={"hard_limit": 4194304}, worker_pid=1000 + i, worker_sid=999 + i,
                                worker_seconds=0.05))
        st.pools["node0/2048kB"] = PoolRecord(0, 2 * n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vms", type=int, nargs="*", default=[10, 1000, 10000])
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()
    print(f"{'VMs':>6}  {'transaction':>12}  {'read':>8}  {'prepare+release':>16}  {'file':>9}")
    for n in args.vms:
        with tempfile.TemporaryDirectory() as tmp:
            host = FakeHost(Path(tmp), free_per_node_kib=64 * 1024 * 1024, mem_per_node_kib=64 * 1024 * 1024).build()
            pools = FakeKernel(host).install()
            cfg = host.config()
            led = Ledger(cfg.ledger_path)
            populate(led, n)
            host.set_pool(0, 2048, 2 * n)
            uuid = "11111111-2222-3333-4444-000000000000"
            txn, rd = [], []
            for i in range(args.runs):
                t0 = time.perf_counter()
                with led.transaction() as st:
                    st.domains[uuid].state = "running" if i % 2 else "starting"
                    stamp(st.domains[uuid])
                txn.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                led.read()
                rd.append(time.perf_counter() - t0)
            cycle = []
            dom = parse_domain(domain_xml(uuid="99999999-2222-3333-4444-000000000000", memory_kib=65536))
            for _ in range(args.runs):
                t0 = time.perf_counter()
                operations.prepare(dom, cfg, pools)
                operations.release(dom.uuid, cfg, pools)
                cycle.append(time.perf_counter() - t0)
            size = cfg.ledger_path.stat().st_size
            print(f"{n:>6}  {statistics.median(txn) * 1000:>9.1f} ms  {statistics.median(rd) * 1000:>5.1f} ms  "
                  f"{statistics.median(cycle) * 1000:>13.1f} ms  {size / 1024:>6.0f} KiB")


if __name__ == "__main__":
    main()
