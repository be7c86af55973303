"""virtio-mem end to end (issue 9): a real TCG guest whose memory `kvmhooks balloond` plugs and unplugs.

The VM is defined plain and given its device by ``kvmhooks annotate --virtio-mem`` (so libvirt itself accepts
what annotate writes), with 256 MiB requested at start. With a low host target balloond unplugs the idle
guest toward ``min`` (its boot memory); then the guest writes 10 MiB/s into a tmpfs and balloond must plug
memory ahead of it: every write succeeds, no OOM, and the live XML's ``<current>`` follows what was
requested. The run's table (time, guest used, plugged, written) is left in /tmp/kvmhooks-virtio-mem.txt.
"""

from __future__ import annotations

import time
from pathlib import Path

from lxml import etree

from kvmhooks.guest import MEMHP_MOVABLE
from tests.e2e.conftest import Env, dommemstat, run, virsh, wait_for
from tests.e2e.test_elastic_e2e import KVMHOOKS, Recorder, assert_survived, balloond, driver_up, follow_hog, written

MIB = 1024
BOOT, SIZE, START = 256, 512, 256  # MiB


def device(name: str) -> tuple[int, int]:
    """(requested, current) KiB from the live XML, as an admin would read them (virsh dumpxml)."""
    root = etree.fromstring(virsh("dumpxml", name).stdout.encode())
    target = root.find("devices/memory[@model='virtio-mem']/target")
    assert target is not None
    return int(target.findtext("requested") or 0), int(target.findtext("current") or 0)


class PlugRecorder(Recorder):
    """Recorder's rows with ``given`` = boot + plugged (the balloon's actual stays at the boot memory)."""

    def sample(self) -> tuple[int, int]:
        s = dommemstat(self.vm.name)
        _, current = device(self.vm.name)
        given = BOOT * MIB + current
        used = given - s["usable"] if "usable" in s else -1
        if self.rows and (given != self.rows[-1][2] or s.get("last_update") == self._last_update):
            used = self.rows[-1][1]  # stats taken while the size moved mix two moments: keep the last at rest
        self._last_update = s.get("last_update")
        self.rows.append((time.monotonic() - self.t0, used, given, written(self.vm)))
        assert s["actual"] == BOOT * MIB, "a virtio-mem guest was ballooned"
        return used, current


def test_virtio_mem_guest_is_unplugged_when_idle_and_plugged_ahead_of_a_10_mib_per_s_hog(env: Env) -> None:
    total = 200
    vm = env.define(None, memory_mib=BOOT, backing="", balloon_attrs=" autodeflate='on'",
                    cmdline_extra=f"{MEMHP_MOVABLE} kvmhooks.hog=25:10:{total}")
    run(KVMHOOKS, "annotate", vm.name, "--virtio-mem", f"{SIZE}M")
    # Start with memory plugged (annotate starts at 0), and guest stats every second.
    root = etree.fromstring(virsh("dumpxml", "--inactive", vm.name).stdout.encode())
    req = root.find("devices/memory[@model='virtio-mem']/target/requested")
    bal = root.find("metadata/{http://kvmhooks.org/xmlns/domain/1.0}tuning/{http://kvmhooks.org/xmlns/domain/1.0}"
                    "balloon")
    assert req is not None and bal is not None and bal.get("policy") == "auto" and bal.get("min") == f"{BOOT}M"
    req.text, req.attrib["unit"] = str(START * MIB), "KiB"
    bal.set("stats-period", "1")
    path = Path(f"/tmp/{vm.name}-vmem.xml")
    path.write_bytes(etree.tostring(root))
    virsh("define", str(path))
    virsh("start", vm.name)
    wait_for(lambda: device(vm.name)[1] == START * MIB, 30, "the guest to plug its first 256 MiB")
    with balloond(1.0, 'balloon_host_target = 0.01\nballoon_step = "200M"') as log:
        rec = PlugRecorder(vm)
        wait_for(lambda: driver_up(vm), 60, "the balloon driver (the policy's guest stats)")
        lowest_idle = follow_hog(vm, rec, 75, START * MIB)
    table = rec.save("virtio-mem")
    Path("/tmp/kvmhooks-virtio-mem.txt").write_text(table + "\n")
    Path("/tmp/kvmhooks-virtio-mem.log").write_text("\n".join(log) + "\n")
    assert lowest_idle <= 16 * MIB, "the idle guest was not unplugged toward min\n" + table + "\n".join(log)
    assert_survived(vm, total, rec)
    requested, current = device(vm.name)
    used, given = rec.rows[-1][1], rec.rows[-1][2]
    assert current >= lowest_idle + total * MIB // 2 and abs(requested - current) < 2 * MIB, table
    assert given > used + 16 * MIB, table
    assert any("virtio-mem requested" in line and "pressure" in line for line in log), "\n".join(log)
    assert any("virtio-mem requested" in line and "squeeze" in line for line in log), "\n".join(log)
    assert not any("has plugged" in line or "still has" in line for line in log), "\n".join(log)
