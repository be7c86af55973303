"""The tuning's effect seen from inside a guest on a noisy host: wake-up latency and CPU throughput.

    sudo .venv/bin/python bench/guest_bench.py [--seconds 30]

Run on the real libvirtd with kvmhooks installed (after `sudo bash tests/run.sh`, or install.sh + libvirtd
restarted), as root, with kvmhooksd stopped or running as you like and no other VM. The tiny guest (1 vCPU,
256 MiB, TCG) boots with ``kvmhooks.bench=SECONDS``: it counts rounds of a fixed busybox loop for SECONDS,
then runs cyclictest (Debian's rt-tests, copied into its initramfs) for SECONDS and prints p50,
p99 and max wake-up latency on its console. Three runs, one after the other:

- quiet: the host idle, the guest without any kvmhooks annotation;
- noisy, untuned: stress-ng on the host (a CPU worker on every host CPU, a VM-memory worker and a cache
  worker, started before the guest as a noisy neighbour would be), the same guest;
- noisy, tuned: the same noise, the guest annotated ``<kvm:cpu policy="dedicated"/>``, ``<kvm:host
  isolate="yes" irqs="yes"/>`` and ``<kvm:hugepages size="2M"/>`` (hugepage-backed).

Every figure is printed as a ratio in the same run: tuned-under-noise / quiet (the limit is 1.0) and
untuned-under-noise / tuned-under-noise. Under TCG every guest instruction is emulated, so the absolute
figures are far from a KVM guest's; what carries over is the host's share: who else runs on the guest's CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kvmhooks.guest import BENCH_LINE, build_guest, domain_xml  # noqa: E402

NS = 'xmlns:kvm="http://kvmhooks.org/xmlns/domain/1.0"'
TUNED = '<kvm:cpu policy="dedicated"/><kvm:host isolate="yes" irqs="yes"/><kvm:hugepages size="2M"/>'
HUGEPAGE_BACKING = "<memoryBacking><hugepages/></memoryBacking>"
_THROUGHPUT = re.compile(rf"{BENCH_LINE} throughput rounds=(\d+) centis=(\d+)")
_LATENCY = re.compile(rf"{BENCH_LINE} latency_us p50=(\d+) p99=(\d+) max=(\d+) samples=(\d+)")
_CLOCK = re.compile(rf"{BENCH_LINE} clock (.*)")
_HISTOGRAM = re.compile(rf"{BENCH_LINE} log2_histogram((?: \d+:\d+)+) overflow:(\d+)")


@dataclass(frozen=True)
class Figures:
    """What the guest measured of itself: loop rounds per second and wake-up latency in microseconds."""

    rounds_per_s: float
    p50_us: int
    p99_us: int
    max_us: int
    samples: int
    histogram: tuple[int, ...] = ()  # wake-ups per latency bucket [2^b, 2^(b+1)) µs (b = 0: 0-1 µs)
    clock: str = ""  # the guest's clock source and whether its high-resolution timers are on

    @property
    def high_resolution(self) -> bool:
        """Without high-resolution timers cyclictest wakes at the guest's tick: its figures then say nothing."""
        return re.search(r"hres_active\s*:\s*1", self.clock) is not None


def parse(console: str) -> Figures | None:
    """The guest's figures from its console text; None until both lines are there."""
    t, lat = _THROUGHPUT.search(console), _LATENCY.search(console)
    if t is None or lat is None:
        return None
    rounds, centis = int(t.group(1)), int(t.group(2))
    p50, p99, mx, n = (int(x) for x in lat.groups())
    if n == 0:
        raise RuntimeError("cyclictest in the guest measured nothing:\n" + console[-2000:])
    h = _HISTOGRAM.search(console)
    hist = (*(int(pair.split(":")[1]) for pair in h.group(1).split()), int(h.group(2))) if h else ()
    clock = _CLOCK.search(console)
    return Figures(rounds * 100 / max(centis, 1), p50, p99, mx, n, hist, clock.group(1).strip() if clock else "")


def histogram_chart(runs: list[tuple[str, Figures]], width: int = 40) -> str:
    """The latency distributions side by side as text: one row per power-of-two bucket, a bar per run."""
    buckets = max(len(f.histogram) for _, f in runs)
    used = [b for b in range(buckets) if any(b < len(f.histogram) and f.histogram[b] for _, f in runs)]
    lines = []
    for b in used:
        last = b == buckets - 1
        label = "overflow" if last else (f"{2 ** b if b else 0}-{2 ** (b + 1) - 1} µs")
        for i, (name, f) in enumerate(runs):
            share = f.histogram[b] / max(sum(f.histogram), 1) if b < len(f.histogram) else 0.0
            bar = "#" * round(share * width)
            lines.append(f"{label if i == 0 else '':>14} {name:<8} {bar:<{width}} {share * 100:5.1f} %")
    return "\n".join(lines)


@contextlib.contextmanager
def noise(seconds: int = 900) -> Iterator[subprocess.Popen[bytes]]:
    """A noisy neighbour: stress-ng with a CPU worker per host CPU, a memory worker and a cache worker.

    Started in its own session so it is stopped as a whole; --timeout makes it end by itself whatever
    happens to this process."""
    ncpu = os.cpu_count() or 1
    p = subprocess.Popen(["stress-ng", "--cpu", str(ncpu), "--vm", "1", "--vm-bytes", "128M", "--cache", "1",
                          "--timeout", f"{seconds}s", "--quiet"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(2)  # its workers are up and spinning before the guest starts
        if p.poll() is not None:
            raise RuntimeError(f"stress-ng exited at once (status {p.returncode}): is it installed?")
        yield p
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, 15)
        p.wait(30)


def guest_xml(name: str, uuid: str, console: Path, seconds: int, tuned: bool) -> str:
    kernel, initrd = build_guest(tools=("cyclictest",))
    return domain_xml(name, uuid, kernel, initrd, memory_mib=256, vcpus=1, console_log=console,
                      metadata=f"<kvm:tuning {NS}>{TUNED}</kvm:tuning>" if tuned else "",
                      memory_backing=HUGEPAGE_BACKING if tuned else "",
                      # tsc=reliable: a vCPU starved while it boots must not make the guest drop its TSC;
                      # ACPI: one starved while the kernel calibrates the TSC (it then goes without it) still
                      # has HPET and the ACPI PM timer (seen once, in a full suite beside other work: the
                      # untuned guest at its 250 Hz tick, "refined-jiffies")
                      extra="<features><acpi/></features>",
                      cmdline_extra=f"kvmhooks.bench={seconds} kvmhooks.noballoon tsc=reliable")


def wait_figures(console: Path, seconds: int) -> Figures:
    """The guest's figures, waiting for them as long as a slow boot under noise and the run can take."""
    deadline = time.monotonic() + 120 + seconds * 4
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            f = parse(console.read_text(errors="replace"))
            if f is not None:
                return f
        time.sleep(0.5)
    raise RuntimeError(f"no {BENCH_LINE} figures on {console} in time")


def run_once(seconds: int, tuned: bool) -> Figures:
    """Define, start, measure, destroy and undefine one guest (by virsh, as a user would)."""
    name = f"kvmhbench-guest-{uuidlib.uuid4().hex[:6]}"
    uuid = str(uuidlib.uuid4())
    console = Path(f"/var/log/libvirt/qemu/{name}-console.log")
    xml = Path(f"/tmp/{name}.xml")
    xml.write_text(guest_xml(name, uuid, console, seconds, tuned))

    def virsh(*args: str) -> None:
        subprocess.run(["virsh", "-c", "qemu:///system", *args], check=True, capture_output=True, timeout=120)

    virsh("define", str(xml))
    try:
        virsh("start", name)
        return wait_figures(console, seconds)
    finally:
        subprocess.run(["virsh", "-c", "qemu:///system", "destroy", name], capture_output=True, timeout=60)
        subprocess.run(["virsh", "-c", "qemu:///system", "undefine", name], capture_output=True, timeout=60)
        xml.unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=30, help="cyclictest's run time in the guest (≥ 30 for p99)")
    args = ap.parse_args()
    quiet = run_once(args.seconds, tuned=False)
    with noise():
        untuned = run_once(args.seconds, tuned=False)
        tuned = run_once(args.seconds, tuned=True)
    print(f"guest: 1 vCPU, 256 MiB, TCG; loop rounds over {args.seconds} s, then cyclictest {args.seconds} s "
          "at 1 kHz\n")
    print("| run | loop rounds/s | p50 µs | p99 µs | max µs | samples |\n|---|---:|---:|---:|---:|---:|")
    for label, f in (("quiet host", quiet), ("noisy host, untuned", untuned), ("noisy host, tuned", tuned)):
        print(f"| {label} | {f.rounds_per_s:.1f} | {f.p50_us} | {f.p99_us} | {f.max_us} | {f.samples} |"
              + ("" if f.high_resolution else f" (no high-resolution timers: {f.clock})"))
    print("\nwake-up latency in the guest (cyclictest), share of wake-ups per bucket:\n")
    print(histogram_chart([("quiet", quiet), ("untuned", untuned), ("tuned", tuned)]))
    print("\n| ratio | throughput | p50 | p99 | max |\n|---|---:|---:|---:|---:|")
    for label, a, b in (("tuned under noise / quiet", tuned, quiet),
                        ("untuned under noise / tuned under noise", untuned, tuned)):
        print(f"| {label} | {a.rounds_per_s / b.rounds_per_s:.2f} | {a.p50_us / max(b.p50_us, 1):.2f} | "
              f"{a.p99_us / max(b.p99_us, 1):.2f} | {a.max_us / max(b.max_us, 1):.2f} |")


if __name__ == "__main__":
    main()
