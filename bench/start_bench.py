"""What an annotated VM costs its user at `virsh start` and `virsh destroy`, beside the same VM without kvmhooks.

    sudo .venv/bin/python bench/start_bench.py [--runs 10]

Run on the real libvirtd with kvmhooks installed (after `sudo bash tests/run.sh`, or install.sh + libvirtd
restarted), as root, with no other VM starting. One TCG guest (256 MiB, 2 vCPUs) is defined four ways:

- plain: no annotation, no huge pages;
- pins: ``<kvm:vcpupin vcpu="0" cpuset="1"/>`` only (the hook's prepare and started; pins by kvmhooksd or
  the detached worker);
- hand-sized huge pages: ``<memoryBacking><hugepages/>`` and no annotation, on a 2M pool the "admin" sized
  to the guest once, before the rounds;
- huge pages + pins: the same backing with ``<kvm:hugepages size="2M"/>`` and the pin: kvmhooks grows the
  pool by the guest's 128 pages at prepare (the admin's pages are not its to use) and gives them back at
  release.

Each round starts and destroys every case once, in turn (alternating, so drift in the machine's load falls on
all of them alike), and waits until the guest has been running for a moment before destroying it; the wall
time of the `virsh` command is what a user feels. The figures are medians over the rounds, first without
kvmhooksd (the hook's detached worker does the post-start tuning), then with it, and are printed as ratios to
their plain counterpart: annotated / plain, annotated huge pages / hand-sized huge pages.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import libvirt  # noqa: E402

from bench.live_bench import agent, defined  # noqa: E402
from kvmhooks.agent import running as agent_running  # noqa: E402
from kvmhooks.config import load_config  # noqa: E402

POOL = Path("/sys/devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages")
PAGES = 128  # 256 MiB of 2M pages
PIN = '<kvm:vcpupin vcpu="0" cpuset="1"/>'
BACKING = "<memoryBacking><hugepages/></memoryBacking>"
HP = '<kvm:hugepages size="2M"/>'
# (name, annotation or None, memory backing)
CASES = [("plain", None, ""), ("pins", PIN, ""), ("hand-sized huge pages", None, BACKING),
         ("huge pages + pins", HP + PIN, BACKING)]


def virsh(*args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["virsh", "-c", "qemu:///system", *args], check=True, capture_output=True, timeout=120)
    return time.perf_counter() - t0


def rounds(conn: libvirt.virConnect, runs: int) -> dict[str, tuple[list[float], list[float]]]:
    """{case: (start seconds, destroy seconds)} over ``runs`` alternating rounds."""
    out: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name, *_ in CASES}
    with contextlib.ExitStack() as stack:
        doms = [stack.enter_context(defined(conn, f"kvmhbench-start{i}", tuning, backing=backing))
                for i, (_, tuning, backing) in enumerate(CASES)]
        base = int(POOL.read_text())
        # The admin sizes the pool for the hand-sized guest once, as an admin would; kvmhooks then grows it by
        # the annotated guest's 128 pages at each of its starts (those are not the admin's to use).
        POOL.write_text(str(base + PAGES))
        try:
            for _ in range(runs + 1):  # the first round warms caches and is not counted
                for (name, _, _), dom in zip(CASES, doms, strict=True):
                    started = virsh("start", dom.name())
                    time.sleep(0.5)  # let the post-start tuning finish: destroy is timed on a settled VM
                    destroyed = virsh("destroy", dom.name())
                    out[name][0].append(started)
                    out[name][1].append(destroyed)
        finally:
            POOL.write_text(str(base))
        for starts, destroys in out.values():
            del starts[0], destroys[0]
    return out


def report(title: str, res: dict[str, tuple[list[float], list[float]]]) -> None:
    med = {name: (statistics.median(s) * 1000, statistics.median(d) * 1000) for name, (s, d) in res.items()}
    ref = {"plain": "plain", "pins": "plain", "hand-sized huge pages": "plain",
           "huge pages + pins": "hand-sized huge pages"}
    print(f"\n{title}\n")
    print("| VM | start ms | × | destroy ms | × |\n|---|---:|---:|---:|---:|")
    for name, (s, d) in med.items():
        rs, rd = med[ref[name]]
        print(f"| {name} (vs {ref[name]}) | {s:.0f} | {s / rs:.2f} | {d:.0f} | {d / rd:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    cfg = load_config()
    if agent_running(cfg):
        raise SystemExit("kvmhooksd is running: stop it first (this bench runs without it, then with its own)")
    conn = libvirt.open("qemu:///system")
    print(f"median of {args.runs} alternating rounds; TCG guest, 256 MiB, 2 vCPUs")
    report("without kvmhooksd (detached worker)", rounds(conn, args.runs))
    with agent():
        report("with kvmhooksd", rounds(conn, args.runs))


if __name__ == "__main__":
    main()
