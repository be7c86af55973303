"""`kvmhooks demo`: boot an annotated tiny guest under TCG and show the tuning land, then clean up."""

from __future__ import annotations

import time
import uuid as uuidlib
from pathlib import Path

from kvmhooks import NAMESPACE, operations
from kvmhooks.config import Config
from kvmhooks.errors import HostError
from kvmhooks.guest import READY_LINE, build_guest, domain_xml
from kvmhooks.units import format_kib

DEMO_NAME = "kvmhooks-demo"


def _say(step: str) -> None:
    print(f"==> {step}", flush=True)


def demo_tuning(ncpus: int) -> str:
    last = ncpus - 1
    return (f'<kvm:tuning xmlns:kvm="{NAMESPACE}"><kvm:hugepages size="2M"/>'
            f'<kvm:vcpupin vcpu="0" cpuset="{last}"/><kvm:vcpupin vcpu="1" cpuset="0"/>'
            '<kvm:emulatorpin cpuset="0"/><kvm:balloon target="75%" min="128M"/></kvm:tuning>')


def run_demo(cfg: Config, keep: bool = False, uri: str = "qemu:///system") -> int:
    import libvirt

    from kvmhooks.apply.libvirt import connect
    from kvmhooks.cli.host import hook_state
    from kvmhooks.cli.status import cmd_status

    if not hook_state(cfg)["installed"]:
        raise HostError("the kvmhooks hook is not installed: run ./install.sh first")
    conn = connect(uri)
    _say("building the tiny guest (Debian cloud kernel + busybox initramfs, cached after the first time)")
    kernel, initrd = build_guest()
    try:
        old = conn.lookupByName(DEMO_NAME)
        if old.isActive():
            old.destroy()
        old.undefine()
    except libvirt.libvirtError:
        pass
    ncpus = len(operations.topology_for(cfg).online)
    console = Path(f"/var/log/libvirt/qemu/{DEMO_NAME}-console.log")
    console.unlink(missing_ok=True)
    xml = domain_xml(DEMO_NAME, str(uuidlib.uuid4()), kernel, initrd, memory_mib=256, vcpus=2, console_log=console,
                     metadata=demo_tuning(ncpus), memory_backing="<memoryBacking><hugepages/></memoryBacking>")
    _say(f"defining {DEMO_NAME}: 256 MiB on 2M huge pages, 2 vCPUs pinned, emulator pinned, balloon to 75%")
    dom = conn.defineXML(xml)
    _say("virsh start (the prepare hook reserves 128 huge pages before QEMU runs)")
    t0 = time.monotonic()
    dom.create()
    print(f"    started in {time.monotonic() - t0:.1f} s", flush=True)
    state = operations.ledger_for(cfg).read().domains.get(dom.UUIDString())
    if state is not None:
        print(f"    reserved: {state.hugepages}", flush=True)
    _say("waiting for the guest to boot and the tuning to land (pins now, balloon once the guest driver is up)")
    deadline = time.monotonic() + 90
    target = 256 * 1024 * 75 // 100
    while time.monotonic() < deadline:
        booted = console.exists() and READY_LINE in console.read_text(errors="replace")
        actual = int(dom.memoryStats().get("actual", 0))
        rec = operations.ledger_for(cfg).read().domains.get(dom.UUIDString())
        pinned = bool(rec and rec.applied.pins)
        print(f"    t+{time.monotonic() - t0:4.1f}s guest {'up' if booted else 'booting'}, pins "
              f"{'applied' if pinned else 'pending'}, balloon {format_kib(actual)} (target "
              f"{format_kib(target)})", flush=True)
        if booted and pinned and abs(actual - target) <= 4096:
            break
        time.sleep(1)
    _say("kvmhooks status")
    import argparse

    cmd_status(argparse.Namespace(json=False, uri=uri, domains=[DEMO_NAME]), cfg)
    if keep:
        _say(f"kept {DEMO_NAME} running (virsh destroy {DEMO_NAME}; virsh undefine {DEMO_NAME} to remove it)")
        return 0
    _say("virsh destroy (the release hook gives the pages back) and undefine")
    dom.destroy()
    dom.undefine()
    left = operations.ledger_for(cfg).read().domains.get(dom.UUIDString())
    print(f"    ledger entry {'still there!' if left else 'gone'}; done", flush=True)
    return 0 if left is None else 1
