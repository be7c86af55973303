"""End-to-end harness: a real libvirtd + QEMU (TCG) started by the tests themselves, kvmhooks installed by
its own install.sh, and a tiny guest that boots in seconds. Needs root on a Debian host with the packages
tests/run.sh installs; everything is checked the way a user would, with virsh and /sys."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvmhooks.domain import qmp_socket_arg
from kvmhooks.guest import READY_LINE, build_guest, domain_xml

REPO = Path(__file__).resolve().parents[2]
URI = "qemu:///system"
CONFIG = Path("/etc/kvmhooks/config.toml")
LEDGER = Path("/run/kvmhooks/ledger.json")
STOPPING = Path("/run/kvmhooks/stopping")  # kvmhooks.ledger.Ledger.stopping_dir
LOG = Path("/var/log/kvmhooks/kvmhooks.log")
POOL2M = Path("/sys/devices/system/node/node0/hugepages/hugepages-2048kB")
PREFIX = "kvmhtest-"
NS = 'xmlns:kvm="http://kvmhooks.org/xmlns/domain/1.0"'
HUGEPAGE_BACKING = "<memoryBacking><hugepages/></memoryBacking>"

# The test host's kvmhooks configuration: automatic placement on CPUs 0-1 with no housekeeping CPU, so the
# CPU tests mean the same on any host with two CPUs or more; a short worker deadline; the normal log file so
# the tests can read what the hook did.
TEST_CONFIG = """\
lock_timeout = 20
retry_timeout = 3
host_reserve = "512M"
worker_timeout = 30
balloon_timeout = 15
[cpu]
allowed = "0-1"
housekeeping = ""
"""

pytestmark = pytest.mark.e2e


def run(*cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=timeout)


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run("virsh", "-c", URI, *args, check=check)


def daemon_pid(name: str) -> int | None:
    """The pid in the daemon's own pid file (``libvirtd -d`` writes /run/libvirtd.pid), if that process runs.

    The harness stops daemons by this, never by name: another libvirtd on the machine is not ours.
    """
    try:
        pid = int(Path(f"/run/{name}.pid").read_text().split()[0])
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError, IndexError):
        return None
    return pid if comm == name else None


def stop_daemon(name: str, timeout: float = 15) -> None:
    pid = daemon_pid(name)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    if os.path.exists(f"/proc/{pid}"):
        os.kill(pid, signal.SIGKILL)


def start_libvirtd() -> None:
    """The project's one way to (re)start libvirtd (also what demo.sh uses)."""
    run("bash", str(REPO / "scripts/start-libvirtd.sh"))


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@dataclass
class VM:
    name: str
    uuid: str
    console: Path

    def ready(self) -> bool:
        try:
            return READY_LINE in self.console.read_text(errors="replace")
        except OSError:
            return False


@dataclass
class Env:
    kernel: Path
    initrd: Path
    vms: list[VM] = field(default_factory=list)
    baseline_pages: int = 0  # the 2M pool before any test: every test must leave it so

    def define(self, tuning: str | None = None, memory_mib: int = 256, backing: str = HUGEPAGE_BACKING,
               qmp: bool = False, **kw: object) -> VM:
        name = f"{PREFIX}{uuidlib.uuid4().hex[:8]}"
        uuid = str(uuidlib.uuid4())
        if qmp:
            kw["qemu_args"] = ("-qmp", qmp_socket_arg(uuid))
        console = Path(f"/var/log/libvirt/qemu/{name}-console.log")
        console.unlink(missing_ok=True)
        meta = f"<kvm:tuning {NS}>{tuning}</kvm:tuning>" if tuning is not None else ""
        xml = domain_xml(name, uuid, self.kernel, self.initrd, memory_mib=memory_mib, console_log=console,
                         metadata=meta, memory_backing=backing, **kw)  # type: ignore[arg-type]
        path = Path(f"/tmp/{name}.xml")
        path.write_text(xml)
        virsh("define", str(path))
        vm = VM(name, uuid, console)
        self.vms.append(vm)
        return vm

    def cleanup(self) -> None:
        for vm in self.vms:
            virsh("destroy", vm.name, check=False)
            virsh("undefine", vm.name, check=False)
        self.vms.clear()


def pool2m() -> int:
    return int((POOL2M / "nr_hugepages").read_text())


def free2m() -> int:
    return int((POOL2M / "free_hugepages").read_text())


def ledger() -> dict:  # type: ignore[type-arg]
    from kvmhooks.ledger import Ledger

    return Ledger(LEDGER).read().as_dict()


def dommemstat(name: str) -> dict[str, int]:
    out = virsh("dommemstat", name).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines() if line.strip())}


def domstate(name: str) -> str:
    return virsh("domstate", name).stdout.strip()


@pytest.fixture(scope="session")
def host() -> Iterator[Env]:
    if os.geteuid() != 0:
        pytest.skip("end-to-end tests need root (they install kvmhooks and run libvirtd)")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("the end-to-end CPU tests pin to host CPUs 0 and 1")
    for tool in ("libvirtd", "virsh", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed; tests/run.sh installs it")
    saved_config = CONFIG.read_text() if CONFIG.exists() else None
    run(str(REPO / "install.sh"), "--no-apt", "--no-reload", timeout=300)
    CONFIG.write_text(TEST_CONFIG)
    # Our own daemon, started after the hugetlbfs mounts and the hook exist (libvirtd reads both at start).
    was_running = daemon_pid("libvirtd") is not None
    start_libvirtd()
    kernel, initrd = build_guest()
    env = Env(kernel, initrd, baseline_pages=pool2m())
    for name in virsh("list", "--all", "--name").stdout.split():
        if name.startswith(PREFIX):
            virsh("destroy", name, check=False)
            virsh("undefine", name, check=False)
    try:
        yield env
    finally:
        env.cleanup()
        if saved_config is not None:
            CONFIG.write_text(saved_config)
        if not was_running:  # leave the host as we found it
            stop_daemon("libvirtd")
            stop_daemon("virtlogd")


@pytest.fixture
def env(host: Env) -> Iterator[Env]:
    yield host
    host.cleanup()
    # Nothing leaks: no test VM left in the ledger, the pool back where the session found it. (A VM that held
    # nothing of the host's is released by the detached worker moments after its stop: stopping/ empties.)
    wait_for(lambda: not os.listdir(STOPPING) if STOPPING.is_dir() else True, 10, "the stops left to the worker")
    left = {u: r["name"] for u, r in ledger()["domains"].items() if r["name"].startswith(PREFIX)}
    assert not left, f"ledger entries left behind: {left}"
    wait_for(lambda: pool2m() == host.baseline_pages, 10, f"the 2M pool back at {host.baseline_pages}")
