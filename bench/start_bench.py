"""What an annotated VM costs its user at `virsh start` and `virsh destroy`, beside the same VM without kvmhooks.

    sudo .venv/bin/python bench/start_bench.py [--runs 10]

Run on the real libvirtd with kvmhooks installed (after `sudo bash tests/run.sh`, or install.sh + libvirtd
restarted), as root, with no other VM starting. One TCG guest (256 MiB, 2 vCPUs) is defined four ways:

- plain: no annotation, no huge pages;
- pins: ``<kvm:vcpupin vcpu="0" cpuset="1"/>`` only (the hook's prepare and started; pins by kvmhooksd or
  the detached worker);
- hand-sized huge pages: ``<memoryBacking><hugepages/>`` and no annotation, on a 2M pool the "admin" sized
  to the guest once, before the rounds;
- hand-grown huge pages: the same guest, its pool grown by hand by 128 pages just before each ``virsh start``
  and shrunk just after each ``virsh destroy``, both inside the timed command: kvmhooks' pool work without
  kvmhooks;
- huge pages + pins: the same backing with ``<kvm:hugepages size="2M"/>`` and the pin: kvmhooks grows the
  pool by the guest's 128 pages at prepare (the admin's pages are not its to use) and gives them back at
  release. Its ratio to the hand-sized guest is the issue's goal; its ratio to the hand-grown one is what
  kvmhooks itself adds.

Why two references: a pool grown at start takes pages from free memory, and where the host is itself a guest
whose kernel reports free memory to its hypervisor (virtio-balloon free page reporting, as on the machines
this project is developed on), every 2 MiB block that stayed free for about two seconds has been handed back
and is filled again, slowly, when QEMU preallocates the guest's memory. The bench measures that first (128
pages faulted fresh from free memory, then again from the pool) and, before each start whose pool grows, waits
until the pages freed by the last shrink have been reported, as they would be between a user's stop and next
start: otherwise the hand-grown and the annotated guest would take each other's still-warm pages by the
accident of the rounds' order.

Each round starts and destroys every case once, in turn (alternating, so drift in the machine's load falls on
all of them alike), and waits until the guest has been running for a moment before destroying it, and after
the destroy until a release left to the detached worker is done (the pinned VM without kvmhooksd: it holds
nothing of the host's, so `virsh destroy` does not wait for it; its interpreter must not slow the next
case's start, and how long after the destroy it was done is printed); the wall time of the `virsh` command is
what a user feels. The figures are medians over the rounds, first without
kvmhooksd (the hook's detached worker does the post-start tuning), then with it, and are printed as ratios to
their plain counterpart: annotated / plain, annotated huge pages / hand-sized huge pages.

A last phase puts the annotated guest on the pool the admin sized by hand: the config's ``leave_alone`` names
node0/2M for its duration (written at the top of the installed config, the original put back after), so
kvmhooks grows nothing and lets the guest use free pages of that pool (the ledger counts them as borrowed),
beside the hand-sized guest on the same pool, without and then with kvmhooksd.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import libvirt  # noqa: E402

from bench.live_bench import agent, defined  # noqa: E402
from kvmhooks.agent import running as agent_running  # noqa: E402
from kvmhooks.config import CONFIG_ENV, DEFAULT_CONFIG, load_config, pool_key  # noqa: E402

POOL = Path("/sys/devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages")
PAGES = 128  # 256 MiB of 2M pages
PIN = '<kvm:vcpupin vcpu="0" cpuset="1"/>'
BACKING = "<memoryBacking><hugepages/></memoryBacking>"
HP = '<kvm:hugepages size="2M"/>'
# (name, annotation or None, memory backing, pool grown by hand at each start)
CASES = [("plain", None, "", False), ("pins", PIN, "", False), ("hand-sized huge pages", None, BACKING, False),
         ("hand-grown huge pages", None, BACKING, True), ("huge pages + pins", HP + PIN, BACKING, False)]
GROWN = {"hand-grown huge pages", "huge pages + pins"}  # their pool grows at each start
# The last phase: both on the pool the admin sized once, which kvmhooks is told to leave alone.
LEFT_ALONE_CASES = [("hand-sized huge pages", None, BACKING, False),
                    ("huge pages + pins, pool left alone", HP + PIN, BACKING, False)]
LEFT_ALONE_REF = [("huge pages + pins, pool left alone", "hand-sized huge pages")]
LEFT_ALONE = "node0/2M"  # the pool POOL is
REF = [("plain", "plain"), ("pins", "plain"), ("hand-sized huge pages", "plain"),
       ("hand-grown huge pages", "hand-sized huge pages"), ("huge pages + pins", "hand-sized huge pages"),
       ("huge pages + pins", "hand-grown huge pages")]
# Free page reporting: this platform's kernel counts what it reported; upstream has no counter.
BALLOONS = Path("/sys/bus/virtio/drivers/virtio_balloon")
REPORTED_KIB = Path("/sys/module/page_reporting/parameters/reported_kib")
SETTLE_S = 10.0  # upstream reports 2 s after a free; its passes here took up to 6 s to take all 256 MiB
STOPPING = Path("/run/kvmhooks/stopping")  # kvmhooks.ledger.Ledger.stopping_dir


def virsh(*args: str, resize: int = 0) -> float:
    """Wall time of one virsh command; the pool grown by ``resize`` pages just before it, or shrunk by
    ``-resize`` just after, inside the time (where kvmhooks' prepare and release do it)."""
    t0 = time.perf_counter()
    if resize > 0:
        POOL.write_text(str(int(POOL.read_text()) + resize))
    subprocess.run(["virsh", "-c", "qemu:///system", *args], check=True, capture_output=True, timeout=120)
    if resize < 0:
        POOL.write_text(str(int(POOL.read_text()) + resize))
    return time.perf_counter() - t0


def stops_released(timeout: float = 10.0) -> float:
    """Seconds until no stop is left for the detached worker (a VM that held nothing of the host's, without
    kvmhooksd): the next round starts after it, so its interpreter does not slow the next case's start."""
    t0 = time.perf_counter()
    while STOPPING.is_dir() and os.listdir(STOPPING) and time.perf_counter() - t0 < timeout:
        time.sleep(0.005)
    return time.perf_counter() - t0


def reporting() -> bool:
    """Whether a virtio balloon negotiated VIRTIO_BALLOON_F_REPORTING (feature bit 5): free memory goes back
    to the hypervisor."""
    return any(f.read_text()[5:6] == "1" for f in BALLOONS.glob("virtio*/features"))


def reported_kib() -> int | None:
    try:
        return int(REPORTED_KIB.read_text())
    except (OSError, ValueError):
        return None


def settle(mark: tuple[int | None, float]) -> None:
    """Wait until the pages freed at ``mark`` (the counter, the monotonic time) have been reported to the
    hypervisor: 2 s at least (the kernel's reporting delay), then until the counter has grown by them (a fixed
    pause where reporting has no counter; nothing where there is no reporting)."""
    if not reporting():
        return
    kib, at = mark
    time.sleep(max(0.0, at + (2.0 if kib is not None else 4.0) - time.monotonic()))
    while kib is not None and time.monotonic() < at + SETTLE_S and (reported_kib() or 0) - kib < PAGES * 2048:
        time.sleep(0.1)


def fault_ms() -> float:
    """Milliseconds to fault PAGES huge pages of the 2M pool (each is zeroed by the kernel at its fault)."""
    m = mmap.mmap(-1, PAGES << 21, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_HUGETLB", 0x40000))
    t0 = time.perf_counter()
    for i in range(PAGES):
        m[i << 21] = 1
    dt = time.perf_counter() - t0
    m.close()
    return dt * 1000


def cold_pages() -> tuple[float, float]:
    """(ms to fault PAGES pages just taken from long-free memory, ms to fault the same pool pages again)."""
    base = int(POOL.read_text())
    POOL.write_text(str(base + PAGES))
    try:
        return fault_ms(), fault_ms()
    finally:
        POOL.write_text(str(base))


Case = tuple[str, str | None, str, bool]


def rounds(conn: libvirt.virConnect, runs: int, cases: list[Case] | None = None
           ) -> dict[str, tuple[list[float], list[float], list[float]]]:
    """{case: (start seconds, destroy seconds, seconds from destroy to its release)} over ``runs`` alternating
    rounds."""
    cases = CASES if cases is None else cases
    out: dict[str, tuple[list[float], list[float], list[float]]] = {name: ([], [], []) for name, *_ in cases}
    with contextlib.ExitStack() as stack:
        doms = [stack.enter_context(defined(conn, f"kvmhbench-start{i}", tuning, backing=backing))
                for i, (_, tuning, backing, _) in enumerate(cases)]
        base = int(POOL.read_text())
        # The admin sizes the pool for the hand-sized guest once, as an admin would; kvmhooks then grows it by
        # the annotated guest's 128 pages at each of its starts (those are not the admin's to use).
        POOL.write_text(str(base + PAGES))
        try:
            mark = reported_kib(), time.monotonic()
            for _ in range(runs + 1):  # the first round warms caches and is not counted
                for (name, _, _, by_hand), dom in zip(cases, doms, strict=True):
                    if name in GROWN:
                        settle(mark)
                    started = virsh("start", dom.name(), resize=PAGES if by_hand else 0)
                    time.sleep(0.5)  # let the post-start tuning finish: destroy is timed on a settled VM
                    destroyed = virsh("destroy", dom.name(), resize=-PAGES if by_hand else 0)
                    out[name][2].append(stops_released())
                    if name in GROWN:
                        mark = reported_kib(), time.monotonic()
                    out[name][0].append(started)
                    out[name][1].append(destroyed)
        finally:
            POOL.write_text(str(base))
        for starts, destroys, _ in out.values():
            del starts[0], destroys[0]
    return out


@contextlib.contextmanager
def pool_left_alone(path: Path) -> Iterator[None]:
    """The installed config with ``leave_alone = [LEFT_ALONE]`` for the duration, its own bytes, mode and owner
    put back after (a config that sets leave_alone itself is the admin's to change, not the bench's).

    The original is kept beside it (``.before-bench``, fsync'd) until it is back: a bench killed in the phase
    (SIGTERM ends it through the ``finally``, SIGKILL cannot) leaves it there, and the next call puts it back
    before anything else."""
    saved = path.with_name(path.name + ".before-bench")
    tmp = path.with_name(path.name + ".bench")
    if not path.exists():
        raise SystemExit(f"{path} is missing: install kvmhooks first (install.sh writes it)")
    st = path.stat()

    def put(data: bytes) -> None:  # whole, durable, with the original's mode and owner
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chown(tmp, st.st_uid, st.st_gid)
        os.chmod(tmp, st.st_mode & 0o7777)
        os.replace(tmp, path)

    if saved.exists():  # a phase that was killed: its original first
        put(saved.read_bytes())
        saved.unlink()
        print(f"{path}: put back from {saved} (a bench killed in its left-alone phase)", file=sys.stderr)
    original = path.read_bytes()
    if b"leave_alone" in original:
        raise SystemExit(f"{path} sets leave_alone already: the left-alone phase needs it to itself")
    with open(saved, "wb") as f:
        f.write(original)
        os.fsync(f.fileno())
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        # At the top: a key after a [table] header would belong to that table.
        put(f'leave_alone = ["{LEFT_ALONE}"]  # bench/start_bench.py, for its last phase\n'.encode() + original)
        if pool_key(0, 2048) not in load_config(path).leave_alone:
            raise SystemExit(f"{path}: the bench's leave_alone did not take")
        yield
    finally:
        put(original)
        saved.unlink()
        signal.signal(signal.SIGTERM, previous)


def report(title: str, res: dict[str, tuple[list[float], list[float], list[float]]],
           refs: list[tuple[str, str]] | None = None) -> None:
    med = {name: (statistics.median(s) * 1000, statistics.median(d) * 1000) for name, (s, d, _) in res.items()}
    print(f"\n{title}\n")
    print("| VM | start ms | × | destroy ms | × |\n|---|---:|---:|---:|---:|")
    for name, ref in REF if refs is None else refs:
        (s, d), (rs, rd) = med[name], med[ref]
        print(f"| {name} (vs {ref}) | {s:.0f} | {s / rs:.2f} | {d:.0f} | {d / rd:.2f} |")
    lags = {name: statistics.median(r[2]) * 1000 for name, r in res.items() if statistics.median(r[2]) > 0.001}
    for name, lag in lags.items():
        print(f"\n{name}: released by the detached worker {lag:.0f} ms (median) after `virsh destroy` returned")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    cfg = load_config()
    if agent_running(cfg):
        raise SystemExit("kvmhooksd is running: stop it first (this bench runs without it, then with its own)")
    conn = libvirt.open("qemu:///system")
    cold, warm = cold_pages()
    print(f"free page reporting to a hypervisor: {'on' if reporting() else 'off'}; "
          f"{PAGES} huge pages faulted fresh from free memory in {cold:.0f} ms, again from the pool in {warm:.0f} ms")
    print(f"median of {args.runs} alternating rounds; TCG guest, 256 MiB, 2 vCPUs")
    report("without kvmhooksd (detached worker)", rounds(conn, args.runs))
    with agent():
        report("with kvmhooksd", rounds(conn, args.runs))
    config = Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)
    with pool_left_alone(config):
        report(f"the annotated guest on the hand-sized pool ({config}: leave_alone = [\"{LEFT_ALONE}\"]), "
               "without kvmhooksd", rounds(conn, args.runs, LEFT_ALONE_CASES), LEFT_ALONE_REF)
        with agent():
            report("the same, with kvmhooksd", rounds(conn, args.runs, LEFT_ALONE_CASES), LEFT_ALONE_REF)


if __name__ == "__main__":
    main()
