"""Hook wall time beside a bare interpreter start-up of the same Python (median of many runs).

    sudo .venv/bin/python bench/hook_bench.py [--runs 200]

Cases: the bare interpreter (``python -I -c pass``), the hook for a VM without our annotation (the cost
every VM on the host pays), an annotated ``prepare`` + ``release`` pair on a fake sysfs tree (the full
path: import, parse, plan, lock, write, ledger), and the refusal of an impossible reservation.
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
    args = ap.parse_args()
    py = args.python
    hook = str(REPO / "hooks/qemu")
    with tempfile.TemporaryDirectory() as tmp:
        host = FakeHost(Path(tmp)).build()
        cfg = Path(tmp) / "config.toml"
        cfg.write_text(f'sysfs_root = "{host.sysfs}"\nproc_root = "{host.proc}"\nstate_dir = "{host.root}/run"\n'
                       f'log = "{host.root}/log"\nretry_timeout = 0.1\n')
        env = {"KVMHOOKS_CONFIG": str(cfg), "PATH": "/usr/bin:/bin", "LC_ALL": "C"}
        plain = domain_xml(tuning=None, backing="")
        annotated = domain_xml()
        too_big = domain_xml(memory_kib=1024 * GIB)
        rows = []
        bare = timed([py, "-I", "-c", "pass"], b"", env, args.runs)
        rows.append(("bare interpreter (python -I -c pass)", bare))
        rows.append(("hook, unannotated VM, prepare", timed([py, "-I", hook, "vm", "prepare", "begin", "-"], plain, env,
                                                             args.runs)))
        rows.append(("hook, unannotated VM, release", timed([py, "-I", hook, "vm", "release", "end", "-"], plain, env,
                                                             args.runs)))
        pair = []
        for _ in range(max(10, args.runs // 4)):
            t0 = time.perf_counter()
            subprocess.run([py, "-I", hook, "vm", "prepare", "begin", "-"], input=annotated, env=env, check=True)
            t1 = time.perf_counter()
            subprocess.run([py, "-I", hook, "vm", "release", "end", "-"], input=annotated, env=env, check=True)
            pair.append((t1 - t0, time.perf_counter() - t1))
        rows.append(("hook, annotated VM, prepare (reserve 128 x 2M)", statistics.median(p[0] for p in pair) * 1000))
        rows.append(("hook, annotated VM, release", statistics.median(p[1] for p in pair) * 1000))
        rows.append(("hook, impossible reservation refused", timed([py, "-I", hook, "vm", "prepare", "begin", "-"],
                                                                   too_big, env, max(10, args.runs // 4))))
    print(f"python: {py} ({sys.version.split()[0]}), {os.cpu_count()} CPUs, median of {args.runs} runs\n")
    print("| case | median ms | × bare |\n|---|---:|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} | {ms / bare:.2f} |")


if __name__ == "__main__":
    main()
