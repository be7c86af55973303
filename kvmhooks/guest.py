"""A tiny guest for the demo and the end-to-end tests: Debian's cloud kernel + a busybox initramfs.

It boots under TCG in seconds, loads the virtio modules (the balloon driver among them, unless the kernel
command line says ``kvmhooks.noballoon``; virtio_mem too, idle without a device), prints a ready line on the
serial console and sleeps. Built once from Debian's packages (apt-get download; nothing else can be fetched)
and cached per kernel version: ``CACHE/<kernel version>/`` holds that kernel's ``vmlinuz``, its virtio
modules and the initramfs files built from them (named by a hash of /init and the module list). A kernel
and the modules in an initramfs must be the same build (module vermagic), and every cached initramfs is
booted with the kernel beside it, so a newer kernel gets a new directory and never breaks an older
initramfs; changing /init or the module list rebuilds from the cached modules, with no download.

``kvmhooks.hog=DELAY:MIBPS:TOTAL`` on the kernel command line makes it a memory hog on a schedule, for the
balloon tests (issue 9): a tmpfs of 95 % of its memory is mounted at boot; after DELAY seconds it writes
MIBPS MiB into it every second until TOTAL MiB, with one console line per write (``KVMHOOKS-HOG ok N``, or
``KVMHOOKS-HOG FAILED at N``), so a test sees that every write succeeded. busybox only: mount, dd, sleep.
The tmpfs is at least TOTAL + 8 MiB, so a guest that starts small and grows (virtio-mem) can still be
written that far; its size only limits the tmpfs, it reserves nothing.

``kvmhooks.bench=SECONDS`` makes it measure itself, for bench/guest_bench.py: after the ready line it counts
rounds of a fixed busybox loop for SECONDS (CPU throughput), then runs ``cyclictest`` (Debian's rt-tests,
copied into the initramfs with its libraries by ``build_guest(tools=("cyclictest",))``) for SECONDS and
prints its wake-up latency as p50/p99/max from the histogram, each on one ``KVMHOOKS-BENCH`` console line.
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
BENCH_LINE = "KVMHOOKS-BENCH"
# In dependency order (each module's depends= in modinfo), as measured on Debian 12's cloud kernel.
# virtio_mem (depends=virtio,virtio_ring) plugs memory a virtio-mem device offers; with
# memhp_default_state=online_movable on the command line (domain_xml adds it) its blocks come online
# movable, so they can be unplugged again (the cloud kernel leaves hot-plugged memory offline by default).
MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
           "virtio_mem", "virtio_balloon")
# Cached beside each kernel: every virtio module it ships, so a later module list needs no download.
_MODULE_DIR = "kernel/drivers/virtio"
MEMHP_MOVABLE = "memhp_default_state=online_movable"

_INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
for m in {modules}; do
  if [ "$m" = virtio_balloon ] && /bin/busybox grep -q kvmhooks.noballoon /proc/cmdline; then continue; fi
  /bin/busybox insmod /lib/modules/$m.ko || echo "insmod $m failed"
done
hog=""; bench=""
for w in $(/bin/busybox cat /proc/cmdline); do
  case "$w" in
    kvmhooks.hog=*:*:*) hog=${{w#kvmhooks.hog=}};;
    kvmhooks.bench=*) bench=${{w#kvmhooks.bench=}};;
  esac
done
if [ -n "$hog" ]; then
  /bin/busybox mkdir -p /hog
  memkib=$(/bin/busybox awk '/^MemTotal:/ {{print $2}}' /proc/meminfo)
  tmpkib=$((memkib * 95 / 100)); want=$(((${{hog##*:}} + 8) * 1024))
  if [ "$want" -gt "$tmpkib" ]; then tmpkib=$want; fi
  /bin/busybox mount -t tmpfs -o size=${{tmpkib}}k tmpfs /hog
fi
echo "{ready} $(/bin/busybox cat /proc/meminfo | /bin/busybox head -1)"
if [ -n "$bench" ]; then
  read -r up _ < /proc/uptime; t0=$((${{up%.*}} * 100 + 1${{up#*.}} - 100)); end=$((t0 + bench * 100)); n=0
  while :; do
    i=0; while [ $i -lt 1000 ]; do i=$((i + 1)); done
    n=$((n + 1)); read -r up _ < /proc/uptime; now=$((${{up%.*}} * 100 + 1${{up#*.}} - 100))
    [ "$now" -ge "$end" ] && break
  done
  echo "{bench} throughput rounds=$n centis=$((now - t0))"
  read -r cs < /sys/devices/system/clocksource/clocksource0/current_clocksource
  echo "{bench} clock source=$cs $(/bin/busybox grep -m1 -E 'hres_active|Clock Event Device' /proc/timer_list)"
  /bin/cyclictest -q -m -p 95 -t 1 -i 1000 -D "$bench" -h 50000 > /tmp/cyclictest.out 2>&1
  # (busybox awk reads "000089" as octal: leading zeros go before any number is taken)
  /bin/busybox awk 'function num(x) {{ sub(/^0+/, "", x); return x + 0 }}
    /^[0-9]/ {{ v = num($2); c[num($1)] = v; n += v }}
    /^# Max Latencies/ {{ mx = num($4) }} /^# Histogram Overflows/ {{ ov = num($4) }}
    END {{ n += ov; s = 0; p50 = -1; p99 = -1
      for (i = 0; i < 50000; i++) {{
        s += c[i]; if (p50 < 0 && s * 2 >= n) p50 = i; if (p99 < 0 && s * 100 >= n * 99) p99 = i
        b = 0; for (w = i; w > 1; w = int(w / 2)) b++; h[b] += c[i] }}
      if (p99 < 0) p99 = mx; if (p50 < 0) p50 = mx
      printf "{bench} latency_us p50=%d p99=%d max=%d samples=%d\\n", p50, p99, mx, n
      line = ""; for (b = 0; b < 16; b++) line = line " " b ":" h[b] + 0
      printf "{bench} log2_histogram%s overflow:%d\\n", line, ov }}' /tmp/cyclictest.out
  if ! /bin/busybox grep -q "^# Max Latencies" /tmp/cyclictest.out; then
    echo "{bench} FAILED"; /bin/busybox cat /tmp/cyclictest.out
  fi
  echo "{bench} done"
fi
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
    return _INIT.format(modules=" ".join(MODULES), ready=READY_LINE, hog=HOG_LINE, bench=BENCH_LINE)


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


def _tool_files(tools: tuple[str, ...]) -> dict[str, Path]:
    """{path in the initramfs: host file} for each program in ``tools`` and the shared libraries it loads
    (as ldd lists them, the dynamic loader included), so a Debian binary runs in the busybox guest."""
    files: dict[str, Path] = {}
    for name in tools:
        prog = shutil.which(name)
        if prog is None:
            raise RuntimeError(f"{name} is not installed on this host (for cyclictest: apt-get install rt-tests)")
        files[f"bin/{name}"] = Path(prog)
        for line in _run(["ldd", prog]).splitlines():
            words = line.split()
            lib = words[2] if len(words) > 2 and words[1] == "=>" else words[0] if words else ""
            if lib.startswith("/"):
                files[lib.lstrip("/")] = Path(lib)
    return files


def _initrd_version(tools: tuple[str, ...] = ()) -> str:
    h = hashlib.sha256((_init_script() + " ".join(MODULES)).encode())
    for dest, src in sorted(_tool_files(tools).items()):  # a rebuilt tool or library makes a new initramfs
        h.update(dest.encode() + hashlib.sha256(src.read_bytes()).digest())
    return h.hexdigest()[:12]


def _build_initrd(kdir: Path, initrd: Path, tools: tuple[str, ...] = ()) -> None:
    """An initramfs from the modules cached beside this kernel (all of MODULES must be there)."""
    missing = [m for m in MODULES if not (kdir / "modules" / f"{m}.ko").exists()]
    if missing:
        raise RuntimeError(f"kernel {kdir.name} has no module(s) {', '.join(missing)}")
    busybox = shutil.which("busybox") or "/bin/busybox"
    with tempfile.TemporaryDirectory() as tmp_s:
        root = Path(tmp_s)
        (root / "bin").mkdir(parents=True)
        (root / "lib/modules").mkdir(parents=True)
        shutil.copy2(busybox, root / "bin/busybox")
        for m in MODULES:
            shutil.copy2(kdir / "modules" / f"{m}.ko", root / "lib/modules" / f"{m}.ko")
        for dest, src in _tool_files(tools).items():
            (root / dest).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / dest)  # (copy2 follows symlinks: the library itself, under ldd's name)
        (root / "init").write_text(_init_script())
        (root / "init").chmod(0o755)
        _install(_pack(root), initrd)


def _fetch_kernel(cache: Path) -> Path:
    """Download the cloud kernel package once; keep its vmlinuz and virtio modules in CACHE/<version>/."""
    pkg = kernel_package()
    kdir = cache / pkg.removeprefix("linux-image-")
    if (kdir / "vmlinuz").exists():
        return kdir
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        _run(["apt-get", "download", pkg], cwd=tmp)
        deb = next(tmp.glob("linux-image-*.deb"))
        _run(["dpkg-deb", "-x", str(deb), str(tmp / "x")])
        vmlinuz = next((tmp / "x/boot").glob("vmlinuz-*"))
        (kdir / "modules").mkdir(parents=True, exist_ok=True)
        for src in (tmp / "x/lib/modules").glob(f"*/{_MODULE_DIR}/*.ko*"):
            data = src.read_bytes()
            if src.name.endswith(".xz"):
                import lzma

                data = lzma.decompress(data)
            name = src.name.split(".ko")[0] + ".ko"
            _install(data, kdir / "modules" / name)
        _install(vmlinuz.read_bytes(), kdir / "vmlinuz")  # last: its presence means the directory is complete
    return kdir


def build_guest(cache: Path = DEFAULT_CACHE, tools: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """Return (kernel, initramfs), building them into ``cache`` the first time (or when /init changed).

    Any complete kernel directory serves (the newest first), so the tests do not call apt while a cached
    kernel has every module; a download happens only when none has. ``tools``: host programs copied in with
    their libraries (``("cyclictest",)`` for ``kvmhooks.bench=``)."""
    initrd_name = f"initramfs-{_initrd_version(tools)}.gz"
    cache.mkdir(parents=True, exist_ok=True)
    kdirs = sorted((d for d in cache.iterdir() if d.is_dir() and (d / "vmlinuz").exists()),
                   key=lambda d: d.stat().st_mtime, reverse=True)
    for kdir in kdirs:
        if (kdir / initrd_name).exists():
            return kdir / "vmlinuz", kdir / initrd_name
    for kdir in kdirs:
        if all((kdir / "modules" / f"{m}.ko").exists() for m in MODULES):
            _build_initrd(kdir, kdir / initrd_name, tools)
            return kdir / "vmlinuz", kdir / initrd_name
    kdir = _fetch_kernel(cache)
    _build_initrd(kdir, kdir / initrd_name, tools)
    return kdir / "vmlinuz", kdir / initrd_name


def virtio_mem_xml(size_mib: int, requested_mib: int, block_mib: int = 2) -> str:
    """A virtio-mem device on guest NUMA node 0 (QEMU needs a guest NUMA node to plug it into)."""
    return (f"<memory model='virtio-mem'><target><size unit='MiB'>{size_mib}</size><node>0</node>"
            f"<block unit='MiB'>{block_mib}</block><requested unit='MiB'>{requested_mib}</requested></target>"
            "</memory>")


def domain_xml(name: str, uuid: str, kernel: Path, initrd: Path, memory_mib: int = 256, vcpus: int = 2,
               console_log: Path | None = None, metadata: str = "", memory_backing: str = "",
               extra: str = "", cmdline_extra: str = "", vcpu_current: int | None = None,
               qemu_args: tuple[str, ...] = (), balloon_attrs: str = "",
               virtio_mem: tuple[int, int] | None = None) -> str:
    """A TCG domain (<domain type='qemu'>: never KVM on these hosts) that boots the tiny guest.
    ``balloon_attrs``: extra attributes of its <memballoon>, e.g. `` autodeflate='on'``.
    ``virtio_mem``: (size, requested) in MiB: ``memory_mib`` is then the boot memory (one guest NUMA cell),
    a virtio-mem device of that size is added with what libvirt needs (<maxMemory slots>, <memory> = boot +
    size), and the guest onlines plugged blocks as movable so they can be unplugged again."""
    serial = (f"<serial type='file'><source path='{console_log}'/><target port='0'/></serial>"
              if console_log else "<serial type='pty'/>")
    current = f" current='{vcpu_current}'" if vcpu_current is not None else ""
    ns = " xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'" if qemu_args else ""
    qemu = ("<qemu:commandline>" + "".join(f"<qemu:arg value='{a}'/>" for a in qemu_args)
            + "</qemu:commandline>") if qemu_args else ""
    total, max_memory, numa, device = memory_mib, "", "", ""
    if virtio_mem is not None:
        size, requested = virtio_mem
        total = memory_mib + size
        max_memory = f"<maxMemory slots='4' unit='MiB'>{total}</maxMemory>"
        numa = f"<cpu><numa><cell id='0' cpus='0-{vcpus - 1}' memory='{memory_mib}' unit='MiB'/></numa></cpu>"
        device = virtio_mem_xml(size, requested)
        cmdline_extra = f"{MEMHP_MOVABLE} {cmdline_extra}"
    return f"""<domain type='qemu'{ns}>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  {f"<metadata>{metadata}</metadata>" if metadata else ""}
  {max_memory}
  <memory unit='MiB'>{total}</memory>
  <currentMemory unit='MiB'>{total}</currentMemory>
  {memory_backing}
  <vcpu placement='static'{current}>{vcpus}</vcpu>
  {numa}
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
    {device}
  </devices>
  {qemu}
</domain>
"""
