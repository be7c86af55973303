"""Live-tuning latency on the real libvirtd (run after `sudo bash tests/run.sh` or install.sh, as root).

    sudo .venv/bin/python bench/live_bench.py [--runs 10]

- pins: time from `virsh start` returning until every vCPU and emulator pin is visible through libvirt
  (what `virsh vcpupin`/`emulatorpin` print), median over repeated starts of one TCG guest.
- balloon: time from the guest's balloon driver being ready (the worker sees guest stats) to actual ==
  target, as the worker measures it, over QMP and over the libvirt fallback side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import libvirt  # noqa: E402

from kvmhooks.domain import qmp_socket_arg  # noqa: E402
from kvmhooks.guest import build_guest, domain_xml  # noqa: E402
from kvmhooks.ledger import Ledger  # noqa: E402

NS = 'xmlns:kvm="http://kvmhooks.org/xmlns/domain/1.0"'


@contextlib.contextmanager
def defined(conn: libvirt.virConnect, name: str, tuning: str | None, qmp: bool = False, backing: str = ""
            ) -> Iterator[libvirt.virDomain]:
    """A benchmark VM (``tuning`` None: no annotation at all), destroyed and undefined whatever happens."""
    kernel, initrd = build_guest()
    uuid = str(uuidlib.uuid4())
    meta = "" if tuning is None else f"<kvm:tuning {NS}>{tuning}</kvm:tuning>"
    xml = domain_xml(name, uuid, kernel, initrd, metadata=meta, memory_backing=backing,
                     console_log=Path(f"/var/log/libvirt/qemu/{name}-console.log"),
                     qemu_args=("-qmp", qmp_socket_arg(uuid)) if qmp else ())
    dom = conn.defineXML(xml)
    try:
        yield dom
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()


def pins_latency(conn: libvirt.virConnect, runs: int) -> list[float]:
    want_v = [(False, True), (True, False)]
    out = []
    with defined(conn, "kvmhbench-pins", '<kvm:vcpupin vcpu="0" cpuset="1"/><kvm:vcpupin vcpu="1" cpuset="0"/>'
                 '<kvm:emulatorpin cpuset="0"/>') as dom:
        for _ in range(runs):
            subprocess.run(["virsh", "-c", "qemu:///system", "start", dom.name()], check=True, capture_output=True)
            t0 = time.perf_counter()
            while True:
                v = [tuple(x[:2]) for x in dom.vcpuPinInfo(libvirt.VIR_DOMAIN_AFFECT_LIVE)]
                e = tuple(dom.emulatorPinInfo(libvirt.VIR_DOMAIN_AFFECT_LIVE)[:2])
                if v == want_v and e == (True, False):
                    break
                if time.perf_counter() - t0 > 10:
                    raise SystemExit("pins never appeared: is kvmhooks installed and libvirtd restarted?")
                time.sleep(0.002)
            out.append(time.perf_counter() - t0)
            dom.destroy()
    return out


def live_edit_latency(conn: libvirt.virConnect, runs: int) -> list[float]:
    """With kvmhooksd: from `virsh metadata --live` returning (a vCPU pin moved in the annotation) until
    libvirt shows the vCPU on its new CPU. The pin swaps between CPUs 0 and 1 at each run."""
    out = []
    ns = NS.split('"')[1]
    with defined(conn, "kvmhbench-edit", '<kvm:vcpupin vcpu="0" cpuset="1"/>') as dom:
        dom.create()
        for i in range(runs):
            cpu = i % 2
            subprocess.run(["virsh", "-c", "qemu:///system", "metadata", dom.name(), "--uri", ns, "--key", "kvm",
                            "--live", "--set", f'<tuning><vcpupin vcpu="0" cpuset="{cpu}"/></tuning>'],
                           check=True, capture_output=True)
            t0 = time.perf_counter()
            want = tuple(c == cpu for c in range(2))
            while tuple(dom.vcpuPinInfo(libvirt.VIR_DOMAIN_AFFECT_LIVE)[0][:2]) != want:
                if time.perf_counter() - t0 > 10:
                    raise SystemExit("the live edit was never applied: is kvmhooksd running?")
                time.sleep(0.002)
            out.append(time.perf_counter() - t0)
        dom.destroy()
    return out


def balloon_latency(conn: libvirt.virConnect, runs: int, qmp: bool) -> list[float]:
    out = []
    name = f"kvmhbench-balloon-{'qmp' if qmp else 'libvirt'}"
    with defined(conn, name, '<kvm:balloon target="192M"/>', qmp=qmp) as dom:
        uuid = dom.UUIDString()
        for _ in range(runs):
            dom.create()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                rec = Ledger(Path("/run/kvmhooks/ledger.json")).read().as_dict()["domains"].get(uuid, {})
                bal = rec.get("applied", {}).get("balloon")
                if bal:
                    if "landed_seconds" not in bal:
                        raise SystemExit(f"balloon did not land: {bal}")
                    out.append(bal["landed_seconds"])
                    break
                time.sleep(0.1)
            else:
                raise SystemExit("the worker never recorded the balloon")
            dom.destroy()
    return out


@contextlib.contextmanager
def agent() -> Iterator[None]:
    """kvmhooksd running for the duration (the installed command), stopped after."""
    p = subprocess.Popen(["/usr/local/bin/kvmhooks", "agent"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not Path("/run/kvmhooks/agent.sock").exists():
            if time.monotonic() > deadline:
                raise SystemExit("the agent did not come up")
            time.sleep(0.05)
        yield
    finally:
        p.terminate()
        p.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--pins-only", action="store_true", help="skip the balloon measurements (slow: guest boots)")
    args = ap.parse_args()
    conn = libvirt.open("qemu:///system")
    rows = [("pins visible after `virsh start` returns, detached worker", pins_latency(conn, args.runs))]
    with agent():
        rows.append(("pins visible after `virsh start` returns, kvmhooksd", pins_latency(conn, args.runs)))
        rows.append(("a vCPU pin moved by `virsh metadata --live`, kvmhooksd", live_edit_latency(conn, args.runs)))
    if not args.pins_only:
        rows += [("balloon 256M → 192M landed after the driver is ready, QMP", balloon_latency(conn, args.runs, True)),
                 ("balloon 256M → 192M landed after the driver is ready, libvirt",
                  balloon_latency(conn, args.runs, False))]
    print(f"median of {args.runs} starts of a TCG guest\n")
    print("| measurement | median ms | min ms | max ms |\n|---|---:|---:|---:|")
    for name, xs in rows:
        print(f"| {name} | {statistics.median(xs) * 1000:.0f} | {min(xs) * 1000:.0f} | {max(xs) * 1000:.0f} |")


if __name__ == "__main__":
    main()
