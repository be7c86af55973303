"""A tiny guest for the demo and the end-to-end tests: Debian's cloud kernel + a busybox initramfs.

It boots under TCG in seconds, loads the virtio modules (the balloon driver among them, unless the kernel
command line says ``kvmhooks.noballoon``), prints a ready line on the serial console and sleeps. Built
once from Debian's packages (apt-get download; nothing else can be fetched) and cached; the initramfs is
cached under a hash of its /init, so changing the script here rebuilds it (from the cached one: no download).

``kvmhooks.hog=DELAY:MIBPS:TOTAL`` on the kernel command line makes it a memory hog on a schedule, for the
balloon tests (issue 9): a tmpfs of 95 % of its memory is mounted at boot; after DELAY seconds it writes
MIBPS MiB into it every second until TOTAL MiB, with one console line per write (``KVMHOOKS-HOG ok N``, or
``KVMHOOKS-HOG FAILED at N``), so a test sees that every write succeeded. busybox only: mount, dd, sleep.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

DEFAULT_CACHE = Path("/var/lib/libvirt/images/kvmhooks-guest")
READY_LINE = "KVMHOOKS-GUEST-READY"
HOG_LINE = "KVMHOOKS-HOG"
# In dependency order (each module's depends= in modinfo), as measured on Debian 12's cloud kernel.
MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
           "virtio_balloon")

_INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
for m in {modules}; do
  if [ "$m" = virtio_balloon ] && /bin/busybox grep -q kvmhooks.noballoon /proc/cmdline; then continue; fi
  /bin/busybox insmod /lib/modules/$m.ko || echo "insmod $m failed"
done
hog=""
for w in $(/bin/busybox cat /proc/cmdline); do
  case "$w" in kvmhooks.hog=*:*:*) hog=${{w#kvmhooks.hog=}};; esac
done
if [ -n "$hog" ]; then
  /bin/busybox mkdir -p /hog
  /bin/busybox mount -t tmpfs -o size=95% tmpfs /hog
fi
echo "{ready} $(/bin/busybox cat /proc/meminfo | /bin/busybox head -1)"
if [ -n "$hog" ]; then
  delay=${{hog%%:*}}; rest=${{hog#*:}}; rate=${{rest%%:*}}; total=${{rest#*:}}
  /bin/busybox sleep "$delay"
  echo "{hog} start $rate MiB/s to $total MiB"
  n=0; written=0
  while [ "$written" -lt "$total" ]; do
    if /bin/busybox dd if=/dev/zero of=/hog/x$n bs=1M count="$rate" 2>/dev/null; then
      written=$((written + rate)); echo "{hog} ok $written"
    else
      echo "{hog} FAILED at $written"; break
    fi
    n=$((n + 1))
    /bin/busybox sleep 1
  done
  echo "{hog} done $written"
fi
while true; do /bin/busybox sleep 3600; done
"""


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


def kernel_package() -> str:
    """The versioned kernel package the cloud metapackage depends on (e.g. linux-image-6.1.0-28-cloud-amd64)."""
    out = _run(["apt-cache", "depends", "linux-image-cloud-amd64"])
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends: linux-image-"):
            return line.split()[1]
    raise RuntimeError("cannot find the cloud kernel package (run 'apt-get update' first?)")


def _init_script() -> str:
    return _INIT.format(modules=" ".join(MODULES), ready=READY_LINE, hog=HOG_LINE)


def _pack(root: Path) -> bytes:
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, check=True, capture_output=True,
                          input=("\n".join(files) + "\n").encode()).stdout
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        gz.write(cpio)
    return buf.getvalue()


def _install(data: bytes, dest: Path) -> None:
    """Atomically, readable by the QEMU user: concurrent test sessions may build at the same time."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)


def _rebuild_initrd(old: Path, initrd: Path) -> bool:
    """A new /init into a cached initramfs (same busybox and modules): no kernel download needed."""
    with tempfile.TemporaryDirectory() as tmp_s:
        root = Path(tmp_s)
        try:
            subprocess.run(["cpio", "-idm", "--quiet"], cwd=root, check=True, capture_output=True,
                           input=gzip.decompress(old.read_bytes()))
        except (OSError, subprocess.CalledProcessError, gzip.BadGzipFile):
            return False
        if not all((root / "lib/modules" / f"{m}.ko").exists() for m in MODULES):
            return False
        (root / "init").write_text(_init_script())
        (root / "init").chmod(0o755)
        _install(_pack(root), initrd)
    return True


def build_guest(cache: Path = DEFAULT_CACHE) -> tuple[Path, Path]:
    """Return (kernel, initramfs), building them into ``cache`` the first time (or when /init changed)."""
    version = hashlib.sha256((_init_script() + " ".join(MODULES)).encode()).hexdigest()[:12]
    kernel, initrd = cache / "vmlinuz", cache / f"initramfs-{version}.gz"
    if kernel.exists() and initrd.exists():
        return kernel, initrd
    cache.mkdir(parents=True, exist_ok=True)
    if kernel.exists():
        for old in sorted(cache.glob("initramfs*.gz"), key=lambda p: p.stat().st_mtime, reverse=True):
            if _rebuild_initrd(old, initrd):
                return kernel, initrd
    busybox = shutil.which("busybox") or "/bin/busybox"
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        pkg = kernel_package()
        _run(["apt-get", "download", pkg], cwd=tmp)
        deb = next(tmp.glob("linux-image-*.deb"))
        _run(["dpkg-deb", "-x", str(deb), str(tmp / "x")])
        vmlinuz = next((tmp / "x/boot").glob("vmlinuz-*"))
        root = tmp / "root"
        (root / "bin").mkdir(parents=True)
        (root / "lib/modules").mkdir(parents=True)
        shutil.copy2(busybox, root / "bin/busybox")
        for mod in MODULES:
            found = list((tmp / "x/lib/modules").rglob(f"{mod}.ko*"))
            if not found:
                raise RuntimeError(f"module {mod} not found in {pkg}")
            src = found[0]
            data = src.read_bytes()
            if src.name.endswith(".xz"):
                import lzma

                data = lzma.decompress(data)
            (root / "lib/modules" / f"{mod}.ko").write_bytes(data)
        init = root / "init"
        init.write_text(_init_script())
        init.chmod(0o755)
        _install(_pack(root), initrd)
        _install(vmlinuz.read_bytes(), kernel)
    return kernel, initrd


def domain_xml(name: str, uuid: str, kernel: Path, initrd: Path, memory_mib: int = 256, vcpus: int = 2,
               console_log: Path | None = None, metadata: str = "", memory_backing: str = "",
               extra: str = "", cmdline_extra: str = "", vcpu_current: int | None = None,
               qemu_args: tuple[str, ...] = (), balloon_attrs: str = "") -> str:
    """A TCG domain (<domain type='qemu'>: never KVM on these hosts) that boots the tiny guest.
    ``balloon_attrs``: extra attributes of its <memballoon>, e.g. `` autodeflate='on'``."""
    serial = (f"<serial type='file'><source path='{console_log}'/><target port='0'/></serial>"
              if console_log else "<serial type='pty'/>")
    current = f" current='{vcpu_current}'" if vcpu_current is not None else ""
    ns = " xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'" if qemu_args else ""
    qemu = ("<qemu:commandline>" + "".join(f"<qemu:arg value='{a}'/>" for a in qemu_args)
            + "</qemu:commandline>") if qemu_args else ""
    return f"""<domain type='qemu'{ns}>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  {f"<metadata>{metadata}</metadata>" if metadata else ""}
  <memory unit='MiB'>{memory_mib}</memory>
  <currentMemory unit='MiB'>{memory_mib}</currentMemory>
  {memory_backing}
  <vcpu placement='static'{current}>{vcpus}</vcpu>
  {extra}
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet {cmdline_extra}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {serial}
    <memballoon model='virtio'{balloon_attrs}/>
  </devices>
  {qemu}
</domain>
"""
