"""A second test guest, with a real systemd: Debian 12 (mmdebstrap) on the Debian cloud kernel, cgroup v2 only.

The tiny guest (:mod:`kvmhooks.guest`) has no init system at all; this one boots systemd as PID 1 with the
unified cgroup hierarchy, under TCG only (plain ``qemu-system-x86_64 -accel tcg``, never KVM on these hosts),
so install.sh's systemd branch, systemd's own ``AllowedCPUs=`` on real slices and kvmhooksd as a unit meet
the real thing. It is built once per machine from Debian's packages and PyPI and cached beside the tiny guest
(``CACHE/systemd-<key>/``, the key a hash of the package list, the wheels and this module's build code), so a
changed input rebuilds and an unchanged one never calls apt, mmdebstrap or pip again.

What the image holds: systemd, libvirt (its qemu driver, no QEMU: nothing runs a VM inside) and the Python
packages install.sh needs, the qemu.qmp wheel and its build tools in :data:`WHEEL_DIR` (install.sh's pip runs
offline when the test sets ``PIP_NO_INDEX``/``PIP_FIND_LINKS``), the kernel's modules, an empty root password,
and a driver service. On a kernel command line with ``kvmhooks.e2e`` the driver unpacks the tar given as the
second disk (``/dev/vdb``) into /e2e, runs ``/e2e/run`` with its output on the second serial port (ttyS1,
nothing else writes there) and powers the guest off. Each run boots a qcow2 overlay over the cached image,
so the image itself is never written.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kvmhooks.guest import DEFAULT_CACHE, _install, _pack, _run, kernel_package

SUITE = "bookworm"
# What the image is made of: systemd as init; libvirt as install.sh finds it on a real host (libvirtd.service,
# its qemu driver for qemu:///system); what install.sh's venv takes from Debian; pgrep and mountpoint.
PACKAGES = ("systemd", "systemd-sysv", "udev", "kmod", "dbus", "procps", "util-linux",
            "libvirt-daemon-system", "libvirt-clients", "python3-venv", "python3-libvirt", "python3-lxml",
            "python3-prometheus-client")
# PyPI-only: qemu.qmp; and what pip needs to build kvmhooks from its pyproject.toml offline (setuptools'
# build backend asks for wheel too before setuptools 70.1).
WHEELS = ("qemu.qmp", "setuptools>=61", "wheel")
WHEEL_DIR = "/opt/kvmhooks-wheels"
# The boot path, in dependency order (each module's depends=): virtio-pci transport, then the block driver.
INITRD_MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
                  "virtio_blk")
RESULT_MARK = "KVMHOOKS-E2E"
# The guest CPU: TCG's "max" has pdpe1gb, so the guest has 1G huge pages (install.sh's 1G mount unit).
CPU = "max"
# Free room in the image beyond its files: the venv, pip's build, logs (the file is sparse).
_SLACK_MIB = 768

_INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /newroot
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
for m in {modules}; do /bin/busybox insmod /lib/modules/$m.ko || echo "insmod $m failed"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do /bin/busybox sleep 0.1; i=$((i + 1)); done
if ! /bin/busybox mount -t ext4 -o rw /dev/vda /newroot; then
  echo "kvmhooks systemd guest: cannot mount /dev/vda"; /bin/busybox poweroff -f
fi
/bin/busybox umount /proc /sys
/bin/busybox mount --move /dev /newroot/dev
exec /bin/busybox switch_root /newroot /lib/systemd/systemd
"""

_DRIVER = """#!/bin/sh
# kvmhooks systemd test guest: run the test payload (a tar on /dev/vdb), then power off.
exec >/dev/ttyS1 2>&1
stty -F /dev/ttyS1 -onlcr 2>/dev/null
rm -rf /e2e && mkdir -p /e2e && tar -xf /dev/vdb -C /e2e || echo "{mark}-DRIVER no payload on /dev/vdb"
if [ -x /e2e/run ]; then /e2e/run; echo "{mark}-DRIVER exit $?"; fi
systemctl poweroff --no-block
"""

_UNIT = """[Unit]
Description=kvmhooks systemd test guest: run the payload of /dev/vdb
After=multi-user.target
ConditionKernelCommandLine=kvmhooks.e2e
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/kvmhooks-e2e-driver
[Install]
WantedBy=multi-user.target
"""


def _sources() -> str:
    """The build code itself, part of the cache key (a changed build rebuilds)."""
    return "".join(inspect.getsource(f) for f in (_build, _configure, _initrd, _kernel))


def cache_key() -> str:
    text = "\n".join([SUITE, " ".join(PACKAGES), " ".join(WHEELS), WHEEL_DIR, " ".join(INITRD_MODULES), _INIT,
                      _DRIVER.format(mark=RESULT_MARK), _UNIT, _sources()])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Image:
    """A built guest: kernel, initramfs and the root file system (raw ext4, never written by a run)."""

    kernel: Path
    initrd: Path
    rootfs: Path
    build_seconds: float = 0.0  # 0 when it came from the cache


def build_image(cache: Path = DEFAULT_CACHE) -> Image:
    """The cached image for the current inputs, built first if there is none (minutes, once per machine).

    :raise RuntimeError: when it cannot be built (no mmdebstrap, no network to Debian or PyPI).
    """
    d = cache / f"systemd-{cache_key()}"
    image = Image(d / "vmlinuz", d / "initramfs.gz", d / "rootfs.img")
    if image.rootfs.exists():
        return image
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "systemd.lock", "w") as lock:  # concurrent sessions: one builds, the other waits
        fcntl.flock(lock, fcntl.LOCK_EX)
        if image.rootfs.exists():
            return image
        t0 = time.monotonic()
        for tool in ("mmdebstrap", "mkfs.ext4", "apt-get", "qemu-img"):
            if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
                raise RuntimeError(f"{tool} is missing: run scripts/host-deps.sh (as root)")
        work = Path(tempfile.mkdtemp(prefix=".systemd-build-", dir=cache))
        try:
            _build(work)
        except subprocess.CalledProcessError as e:  # say why, loudly: CI must not lose this guest silently
            raise RuntimeError(f"cannot build the systemd test guest: {' '.join(map(str, e.cmd))[:200]} failed: "
                               f"{(e.stderr or '').strip()[-2000:]}") from e
        else:
            for old in cache.glob("systemd-*"):  # an image for older inputs: never booted again
                shutil.rmtree(old, ignore_errors=True)
            os.replace(work, d)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return Image(image.kernel, image.initrd, image.rootfs, time.monotonic() - t0)


def _build(work: Path) -> None:
    """Kernel, root tree, initramfs, then the ext4 image last (its presence means the directory is complete)."""
    tree = work / "tree"
    kx = _kernel(work)
    _run(["mmdebstrap", "--quiet", "--variant=minbase", "--mode=root", "--include=" + ",".join(PACKAGES),
          SUITE, str(tree)])
    version = next((kx / "lib/modules").iterdir()).name
    shutil.copytree(kx / "lib/modules" / version, tree / "lib/modules" / version, symlinks=True)
    _run(["chroot", str(tree), "depmod", version])  # (the image's kmod: the host may have none)
    wheels = tree / WHEEL_DIR.lstrip("/")
    wheels.mkdir(parents=True)
    _run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--only-binary=:all:",
          "-d", str(wheels), *WHEELS])
    _configure(tree)
    (work / "vmlinuz").write_bytes(next((kx / "boot").glob("vmlinuz-*")).read_bytes())
    _initrd(kx / "lib/modules" / version, work / "initramfs.gz")
    used_mib = int(_run(["du", "-sxm", str(tree)]).split()[0])
    img = work / ".rootfs.img"
    _run(["mkfs.ext4", "-q", "-F", "-L", "kvmhroot", "-d", str(tree), str(img), f"{used_mib + _SLACK_MIB}M"])
    shutil.rmtree(tree)
    shutil.rmtree(kx)
    os.chmod(work, 0o755)
    os.replace(img, work / "rootfs.img")


def _kernel(work: Path) -> Path:
    """The cloud kernel package unpacked (the same one the tiny guest boots: apt-get download)."""
    pkg = kernel_package()
    _run(["apt-get", "download", "-q", pkg], cwd=work)
    deb = next(work.glob("linux-image-*.deb"))
    _run(["dpkg-deb", "-x", str(deb), str(work / "kernel")])
    deb.unlink()
    return work / "kernel"


def _configure(tree: Path) -> None:
    """Root without a password (the serial console), a host name, the driver service enabled."""
    shadow = tree / "etc/shadow"
    shadow.write_text("".join(("root::" + line.split(":", 2)[2] + "\n") if line.startswith("root:") else line + "\n"
                              for line in shadow.read_text().splitlines()))
    (tree / "etc/hostname").write_text("kvmhooks-systemd\n")
    driver = tree / "usr/local/sbin/kvmhooks-e2e-driver"
    driver.parent.mkdir(parents=True, exist_ok=True)
    driver.write_text(_DRIVER.format(mark=RESULT_MARK))
    driver.chmod(0o755)
    (tree / "etc/systemd/system/kvmhooks-e2e.service").write_text(_UNIT)
    wants = tree / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "kvmhooks-e2e.service").symlink_to("/etc/systemd/system/kvmhooks-e2e.service")
    for f in tree.glob("var/cache/apt/archives/*.deb"):
        f.unlink()


def _initrd(modules: Path, dest: Path) -> None:
    """busybox, the boot modules and an /init that mounts /dev/vda and hands over to systemd."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    with tempfile.TemporaryDirectory() as tmp_s:
        root = Path(tmp_s)
        (root / "bin").mkdir()
        (root / "lib/modules").mkdir(parents=True)
        shutil.copy2(busybox, root / "bin/busybox")
        for m in INITRD_MODULES:
            (src,) = modules.glob(f"kernel/drivers/*/{m}.ko*")
            data = src.read_bytes()
            if src.name.endswith(".xz"):
                import lzma

                data = lzma.decompress(data)
            (root / "lib/modules" / f"{m}.ko").write_bytes(data)
        (root / "init").write_text(_INIT.format(modules=" ".join(INITRD_MODULES)))
        (root / "init").chmod(0o755)
        _install(_pack(root), dest)


# --- one run --------------------------------------------------------------------------------------------

_SKIP = {".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", "build"}


def payload(dest: Path, src: Path, files: Iterable[tuple[str, bytes, int]]) -> None:
    """A tar for /dev/vdb: the project tree ``src`` as ``src/`` plus ``files`` (name, data, mode)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
            parts = Path(info.name).parts
            if any(p in _SKIP or p.endswith(".egg-info") for p in parts):
                return None
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            return info

        tar.add(str(src), arcname="src", filter=keep)
        for name, data, mode in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    dest.write_bytes(data + b"\0" * (-len(data) % 512))


@dataclass
class Run:
    """What one boot-to-poweroff produced: the result lines (ttyS1), the console (ttyS0), and timings."""

    results: list[str]
    console: str
    seconds: float
    exit_code: int | None


def boot(image: Image, tar: Path, workdir: Path, timeout: float, vcpus: int = 4, memory_mib: int = 1024) -> Run:
    """Boot a throw-away overlay of ``image`` with ``tar`` as /dev/vdb until it powers off (or ``timeout``).

    TCG only (these hosts are microVMs: nested KVM is unreliable).
    """
    overlay = workdir / "overlay.qcow2"
    _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image.rootfs), str(overlay)])
    console, results = workdir / "console.log", workdir / "results.log"
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", CPU, "-smp", str(vcpus), "-m", str(memory_mib),
            "-nodefaults", "-display", "none", "-no-user-config", "-no-reboot",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", "console=ttyS0 root=/dev/vda systemd.unified_cgroup_hierarchy=1 kvmhooks.e2e panic=-1 "
                       "quiet systemd.show_status=0",
            "-drive", f"file={overlay},if=virtio,format=qcow2,discard=unmap",
            "-drive", f"file={tar},if=virtio,format=raw,readonly=on",
            "-serial", f"file:{console}", "-serial", f"file:{results}"]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        code = None
    seconds = time.monotonic() - t0

    def text(p: Path) -> str:
        return p.read_text(errors="replace").replace("\r", "") if p.exists() else ""

    return Run(text(results).splitlines(), text(console) + out.decode(errors="replace"), seconds, code)
