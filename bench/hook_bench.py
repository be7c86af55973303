"""Hook wall time beside its floor (median of many runs).

    sudo .venv/bin/python bench/hook_bench.py [--runs 200] [--real-pools]

Floors: a bare ``/bin/sh -c :`` for a VM without our annotation (the cost every VM on the host pays: the
hook is a shell dispatcher that starts no Python for it), and, for an annotated VM, the same interpreter
importing lxml.etree and writing the pool once. Cases: unannotated prepare/release, an annotated
``prepare`` + ``release`` pair (import, parse, plan, lock, intents, write, read back, ledger), the refusal
of an impossible reservation. ``--real-pools`` writes the host's real node-0 2M pool (root).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fakehost import GIB, FakeHost, domain_xml  # noqa: E402
from tests.unit.test_hook import hook_with_state  # noqa: E402


def timed(cmd: list[str], stdin: bytes, env: dict[str, str], runs: int) -> float:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, input=stdin, capture_output=True, env=env)
        samples.append(time.perf_counter() - t0)
        if r.returncode not in (0, 1):
            raise SystemExit(f"{cmd} failed: {r.stderr.decode()}")
    return statistics.median(samples) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--python", default=sys.executable, help="interpreter the hook runs with")
    ap.add_argument("--real-pools", action="store_true",
                    help="write the host's real 2M pool of node 0 (as root; it is put back after each pair)")
    args = ap.parse_args()
    py = args.python
    with tempfile.TemporaryDirectory() as tmp:
        host = FakeHost(Path(tmp)).build()
        # The hook with its built-in state directory (the default config's) in the temporary tree, so the
        # host's own /run/kvmhooks plays no part.
        hook = str(hook_with_state(host.root / "run"))
        sysfs = Path("/sys") if args.real_pools else host.sysfs
        cfg = Path(tmp) / "config.toml"
        cfg.write_text(f'sysfs_root = "{sysfs}"\nproc_root = "{"/proc" if args.real_pools else host.proc}"\n'
                       f'state_dir = "{host.root}/run"\nlog = "{host.root}/log"\nretry_timeout = 0.1\n'
                       'host_reserve = "256M"\n')
        env = {"KVMHOOKS_CONFIG": str(cfg), "KVMHOOKS_PYTHON": py, "PATH": "/usr/bin:/bin", "LC_ALL": "C"}
        plain = domain_xml(tuning=None, backing="")
        annotated = domain_xml()
        too_big = domain_xml(memory_kib=1024 * GIB)
        pool = sysfs / "devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages"
        now = pool.read_text().strip()
        rows = []
        sh = timed(["/bin/sh", "-c", ":"], b"", env, args.runs)
        rows.append(("bare shell (/bin/sh -c :)", sh, sh))
        bare = timed([py, "-I", "-c", "pass"], b"", env, args.runs)
        rows.append(("bare interpreter (python -I -c pass)", bare, sh))
        # The floor for an annotated call: the same interpreter importing lxml and writing the pool once.
        floor = timed([py, "-I", "-c", f"import lxml.etree; open({str(pool)!r}, 'w').write('{now}')"], b"", env,
                      args.runs)
        rows.append(("floor: interpreter + import lxml.etree + one pool write", floor, floor))
        # An unannotated VM as on an installed host: the default config (no state_dir, the default ledger).
        plain_env = {**env, "KVMHOOKS_CONFIG": str(Path(tmp) / "default-config.toml")}
        rows.append(("hook, unannotated VM, prepare", timed([hook, "vm", "prepare", "begin", "-"], plain, plain_env,
                                                             args.runs), sh))
        rows.append(("hook, unannotated VM, release", timed([hook, "vm", "release", "end", "-"], plain, plain_env,
                                                             args.runs), sh))
        pair = []
        for _ in range(max(10, args.runs // 4)):
            t0 = time.perf_counter()
            subprocess.run([hook, "vm", "prepare", "begin", "-"], input=annotated, env=env, check=True)
            t1 = time.perf_counter()
            subprocess.run([hook, "vm", "release", "end", "-"], input=annotated, env=env, check=True)
            pair.append((t1 - t0, time.perf_counter() - t1))
        rows.append(("hook, annotated VM, prepare (reserve 128 x 2M)", statistics.median(p[0] for p in pair) * 1000,
                     floor))
        rows.append(("hook, annotated VM, release", statistics.median(p[1] for p in pair) * 1000, floor))
        rows.append(("hook, impossible reservation refused", timed([hook, "vm", "prepare", "begin", "-"], too_big,
                                                                   env, max(10, args.runs // 4)), floor))
        assert pool.read_text().strip() == now, "the pool was not given back"
    print(f"python: {py} ({sys.version.split()[0]}), {os.cpu_count()} CPUs, median of {args.runs} runs, "
          f"{'real' if args.real_pools else 'fake'} pools\n")
    print("| case | median ms | × its floor |\n|---|---:|---:|")
    for name, ms, base in rows:
        print(f"| {name} | {ms:.1f} | {ms / base:.2f} |")


if __name__ == "__main__":
    main()
