"""Two libvirtd "hosts" on this one machine, for the migration and restore end-to-end tests (issue 18).

Each host is a privileged libvirtd started by the tests in its own mount namespace (``unshare -m
--propagation private``) with bind mounts over libvirt's fixed paths (/etc/libvirt, /var/lib/libvirt,
/var/cache/libvirt, /var/log/libvirt, /run/libvirt) and over kvmhooks' per-host paths (/run/kvmhooks,
/etc/kvmhooks, /var/log/kvmhooks), plus a fresh hugetlbfs on /dev/hugepages (libvirt names its hugetlbfs
directories ``<id>-<name>`` and both daemons number domains from 1). So each host has its own libvirt state,
its own kvmhooks hook (its /etc/libvirt starts as a copy of the real one after install.sh), ledger, config and
log, and the suite's own libvirtd is untouched. The recipe and why each key is there:
/work/shared/notes/migration.md parts 4 and 5 (libvirt 9.0 refuses ``migration_host``/``migration_address``
of 127.0.0.1, so every migration passes ``--migrateuri``; both hosts see the same files outside the bind
mounts, so the test hosts run QEMU as root with ``dynamic_ownership = 0``).

What is not per host: the kernel. Both hosts pin real CPUs (0-1 of this machine) and back guests with the one
kernel hugepage pool. kvmhooks on each host therefore gets a fake sysfs root (:class:`tests.fakehost.FakeHost`
mirroring this machine: its online CPUs, node 0, a 2M pool, its memory) as its view of the pools: what it
reserves there is that host's accounting, while the test sizes the REAL pool so QEMU on both hosts finds its
pages (twice the guest while a migration copies it). ``proc_root`` stays the real /proc (seen from the host's
namespace), because kvmhooks also reads the QEMU processes and the hugetlbfs mounts there.

Hosts are stopped by the pids this module started, never by name; QEMUs left behind are found by the pid
files in the host's own /run/libvirt/qemu.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import uuid as uuidlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmhooks.guest import READY_LINE, domain_xml
from kvmhooks.ledger import Ledger
from kvmhooks.units import parse_cpuset
from tests.e2e.conftest import NS, run
from tests.fakehost import FakeHost

LOOPBACK = "127.0.0.1"
PREFIX = "kvmhmig-"
# libvirt's fixed paths of a privileged daemon, then kvmhooks' per-host paths: each gets a bind mount.
LIBVIRT_DIRS = ("/etc/libvirt", "/var/lib/libvirt", "/var/cache/libvirt", "/var/log/libvirt", "/run/libvirt")
KVMHOOKS_DIRS = ("/run/kvmhooks", "/etc/kvmhooks", "/var/log/kvmhooks")
REAL_POOL2M = Path("/sys/devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages")
KVMHOOKS_BIN = Path("/usr/local/bin/kvmhooks")

# The test hosts' qemu.conf additions (Debian ships every key commented out, so appending is enough).
QEMU_CONF = """
security_driver = "none"
cgroup_controllers = [ ]
stdio_handler = "file"
dynamic_ownership = 0
remember_owner = 0
user = "root"
group = "root"
migration_port_min = {pmin}
migration_port_max = {pmax}
"""
LIBVIRTD_CONF = """
host_uuid = "{uuid}"
listen_tls = 0
listen_tcp = 1
listen_addr = "{addr}"
tcp_port = "{port}"
auth_tcp = "none"
"""


def _alive(pid: int, comm: str) -> bool:
    """Whether ``pid`` still runs ``comm`` (a recycled pid running something else is not ours; a zombie has
    exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    name, _, rest = stat.partition("(")[2].rpartition(")")
    return name == comm and rest.split()[0] != "Z"


def _kill(pid: int, comm: str, timeout: float = 10, child: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM, then SIGKILL after ``timeout``: the process ``pid`` if it still runs ``comm`` (``child``: our
    own Popen of it, reaped here)."""
    if _alive(pid, comm):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid, comm) and time.monotonic() < deadline:
            time.sleep(0.02)
        if _alive(pid, comm):
            os.kill(pid, signal.SIGKILL)
            while _alive(pid, comm) and time.monotonic() < deadline + 5:
                time.sleep(0.02)
    if child is not None:
        child.wait(5)


def parse_vcpupin(text: str) -> dict[int, frozenset[int]]:
    """``virsh vcpupin NAME`` → vCPU → host CPUs (the table: `` 0      1``)."""
    pins = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():
            pins[int(parts[0])] = parse_cpuset(parts[1])
    return pins


def parse_emulatorpin(text: str) -> frozenset[int]:
    """``virsh emulatorpin NAME`` → host CPUs (its last line: ``       *: 0-1``)."""
    return parse_cpuset(text.strip().splitlines()[-1].split(":")[-1].strip())


@dataclass
class Host:
    """One libvirtd "host": its namespace, its daemon and its kvmhooks, reached from outside the namespace."""

    name: str
    root: Path  # everything of this host that its bind mounts show (outside every bind mount itself)
    tcp_port: int
    migration_ports: range
    fake: FakeHost  # kvmhooks' view of this host's sysfs (CPUs, node 0, the 2M pool)
    pid: int = 0  # libvirtd (its pid file's, once it answers: under tini it is not the Popen's process)
    agent_pid: int | None = None
    _next_port: int = 0
    _proc: subprocess.Popen[bytes] = field(init=False, repr=False)
    _agent: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def uri(self) -> str:
        return f"qemu+tcp://{LOOPBACK}:{self.tcp_port}/system"

    def source(self, inside: str) -> Path:
        """The directory outside that the namespace's ``inside`` is bound to (e.g. /run/kvmhooks)."""
        return self.root / inside.strip("/").replace("/", "-")

    def virsh(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run("virsh", "-c", self.uri, *args, check=check, timeout=timeout)

    def sh(self, cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``cmd`` in this host's mount namespace (what a user logged into the host would run)."""
        return run("nsenter", "-t", str(self.pid), "-m", "--", "sh", "-c", cmd, check=check, timeout=timeout)

    def ledger(self) -> dict[str, Any]:
        """This host's kvmhooks ledger as plain data, {} when kvmhooks has written none yet."""
        path = self.source("/run/kvmhooks") / "ledger.json"
        return Ledger(path).read().as_dict() if path.exists() else {}

    def records(self) -> dict[str, dict[str, Any]]:
        """The ledger's VM records by VM name."""
        return {r["name"]: r for r in self.ledger().get("domains", {}).values()}

    def pool2m(self) -> int:
        """Pages in this host's (fake) 2M pool on node 0: what kvmhooks reserved here."""
        return self.fake.pool(0, 2048)

    def log(self) -> str:
        try:
            return (self.source("/var/log/kvmhooks") / "kvmhooks.log").read_text(errors="replace")
        except OSError:
            return ""

    def diagnose(self, name: str, lines: int = 15) -> str:
        """The end of this host's kvmhooks log and of libvirt's log of ``name``: for a failing assertion."""
        try:
            qemu = (self.source("/var/log/libvirt") / f"qemu/{name}.log").read_text(errors="replace")
        except OSError:
            qemu = ""
        tail = [*self.log().splitlines()[-lines:], "--", *qemu.splitlines()[-lines:]]
        return f"host {self.name}:\n" + "\n".join(tail)

    def vcpupin(self, name: str) -> dict[int, frozenset[int]]:
        return parse_vcpupin(self.virsh("vcpupin", name).stdout)

    def emulatorpin(self, name: str) -> frozenset[int]:
        return parse_emulatorpin(self.virsh("emulatorpin", name).stdout)

    def threads(self, name: str) -> dict[str, frozenset[int]]:
        """The host CPUs each thread of ``name``'s QEMU on this host may run on, as the kernel says (vCPU
        threads "vcpuN", the main thread "emulator"); {} when no QEMU of that name runs here."""
        try:
            pid = int((self.source("/run/libvirt") / f"qemu/{name}.pid").read_text().split()[0])
            # libvirt writes the pid file while its forked child still waits, before exec, for the handshake;
            # meanwhile the parent sets the child's affinity from <emulatorpin> (qemuProcessInitCpuAffinity)
            # and only then lets it exec QEMU. Until then the child is libvirt's, with libvirtd's affinity:
            # not yet the VM's QEMU, so not counted.
            if not Path(f"/proc/{pid}/comm").read_text().startswith("qemu"):
                return {}
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except (OSError, ValueError, IndexError):
            return {}
        out = {}
        for task in tasks:
            try:
                comm = (task / "comm").read_text().strip()
                status = (task / "status").read_text()
            except OSError:
                continue
            key = "emulator" if task.name == str(pid) else (
                f"vcpu{m.group(1)}" if (m := re.fullmatch(r"CPU (\d+)/\w+", comm)) else None)
            if key is not None:
                allowed = next(line.split()[1] for line in status.splitlines() if line.startswith("Cpus_allowed_list"))
                out[key] = parse_cpuset(allowed)
        return out

    def domstate(self, name: str) -> str:
        """``virsh domstate``, or "" when the host does not know the VM."""
        return self.virsh("domstate", name, check=False).stdout.strip()

    def names(self) -> list[str]:
        return self.virsh("list", "--all", "--name").stdout.split()

    def migrate_uri(self) -> str:
        """A ``--migrateuri`` for migrations into this host: the ports of its range in turn (a port QEMU just
        closed is never the next one asked for)."""
        port = self.migration_ports[self._next_port % len(self.migration_ports)]
        self._next_port += 1
        return f"tcp://{LOOPBACK}:{port}"

    # -- life cycle --

    def prepare(self, kvmhooks_config: str, caps_cache: Path | None = None) -> None:
        """This host's directories: a copy of the real /etc/libvirt (kvmhooks' hook in it), the daemon keys,
        kvmhooks' config pointing at the fake sysfs tree."""
        if self.root.exists():
            self.stop_leftovers()
            shutil.rmtree(self.root)
        for d in (*LIBVIRT_DIRS, *KVMHOOKS_DIRS):
            self.source(d).mkdir(parents=True)
        etc = self.source("/etc/libvirt")
        shutil.copytree("/etc/libvirt", etc, symlinks=True, dirs_exist_ok=True)
        for xml in (etc / "qemu").glob("*.xml"):  # the suite's own persistent VMs are not this host's
            xml.unlink()
        shutil.rmtree(etc / "qemu/autostart", ignore_errors=True)
        with open(etc / "libvirtd.conf", "a") as f:
            f.write(LIBVIRTD_CONF.format(uuid=uuidlib.uuid4(), addr=LOOPBACK, port=self.tcp_port))
        with open(etc / "qemu.conf", "a") as f:
            f.write(QEMU_CONF.format(pmin=self.migration_ports[0], pmax=self.migration_ports[-1]))
        # QEMU's capabilities as a test host probed them before (see two_hosts): without them each host spends
        # ~8 s probing at start. libvirt checks every entry (binaries, kernel, QEMU's user) and re-probes a
        # stale one itself.
        if caps_cache is not None and caps_cache.is_dir():
            shutil.copytree(caps_cache, self.source("/var/cache/libvirt") / "qemu/capabilities")
        (self.source("/var/log/libvirt") / "qemu").mkdir()
        self.fake.build()
        # (its own key first: TOML keys after a [table] belong to that table)
        (self.source("/etc/kvmhooks") / "config.toml").write_text(
            f'sysfs_root = "{self.fake.sysfs}"\n{kvmhooks_config}')

    def start(self) -> None:
        """Start this host's libvirtd in a new mount namespace with its bind mounts (see :meth:`wait_up`)."""
        mounts = "\n".join([*(f"mount --bind {self.source(d)} {d}" for d in (*LIBVIRT_DIRS, *KVMHOOKS_DIRS)),
                            "mount -t hugetlbfs nodev /dev/hugepages"])
        # Under tini as a subreaper when it is there (scripts/start-libvirtd.sh says why: libvirt waits until
        # a stopped QEMU is reaped, and this machine's pid 1 reaps about once a second).
        reaper = "tini -s -- " if shutil.which("tini") else ""
        script = (f"set -e\n{mounts}\n"
                  f"exec {reaper}libvirtd --listen -f /etc/libvirt/libvirtd.conf -p /run/libvirt/libvirtd.pid")
        with open(self.root / "libvirtd.out", "ab") as out:
            # On CPU 0 while it starts: libvirt keeps a cached probe of QEMU only while the host's CPUID reads the
            # same, and on this machine (a VM) it differs from one CPU to the other ("host cpuid changed" in its
            # debug log), which cost ~8 s of probing at every other start. wait_up lets it use every CPU again.
            self._proc = subprocess.Popen(["taskset", "-c", "0", "unshare", "-m", "--propagation", "private",
                                           "sh", "-c", script],
                                          stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)

    def wait_up(self, timeout: float = 60) -> None:
        """Until the daemon answers on its TCP listener."""
        deadline = time.monotonic() + timeout
        while self.virsh("version", check=False, timeout=10).returncode != 0:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"host {self.name}: libvirtd did not come up: "
                                   f"{(self.root / 'libvirtd.out').read_text(errors='replace')[-500:]}")
            time.sleep(0.05)
        self.pid = int((self.source("/run/libvirt") / "libvirtd.pid").read_text().split()[0])
        online = Path("/sys/devices/system/cpu/online").read_text().strip()
        run("taskset", "-a", "-p", "-c", online, str(self.pid))

    def start_agent(self, timeout: float = 15) -> None:
        """kvmhooksd in this host's namespace, with this host's config, lock and socket (its /run/kvmhooks)."""
        state = self.source("/run/kvmhooks")
        log = open(self.source("/var/log/kvmhooks") / "agent.log", "ab")
        self._agent = proc = subprocess.Popen(["nsenter", "-t", str(self.pid), "-m", "--", str(KVMHOOKS_BIN), "agent"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while not ((state / "agent.sock").exists() and (state / "agent.pid").exists()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"host {self.name}: kvmhooksd did not come up: "
                                   f"{(self.source('/var/log/kvmhooks') / 'agent.log').read_text()[-500:]}")
            time.sleep(0.05)
        self.agent_pid = proc.pid  # nsenter execs the agent: this pid is kvmhooksd

    def qemu_pids(self) -> list[int]:
        """The QEMUs this host's libvirtd started (its own /run/libvirt/qemu/*.pid)."""
        pids = []
        for f in self.source("/run/libvirt").glob("qemu/*.pid"):
            with suppress(OSError, ValueError, IndexError):
                pids.append(int(f.read_text().split()[0]))
        return pids

    def stop_leftovers(self) -> None:
        """What a run killed before its teardown left of this host (its pid files say which processes):
        otherwise the new daemon finds its TCP port taken."""
        for pid in self.qemu_pids():
            _kill(pid, "qemu-system-x86")
        for pidfile, comm in ((self.source("/run/kvmhooks") / "agent.pid", "kvmhooks"),
                              (self.source("/run/libvirt") / "libvirtd.pid", "libvirtd")):
            with suppress(OSError, ValueError, IndexError):
                _kill(int(pidfile.read_text().split()[0]), comm)

    def stop(self) -> None:
        """Every VM of this host gone, then its agent and daemon (by their pids)."""
        if self.pid and _alive(self.pid, "libvirtd"):
            for name in self.virsh("list", "--all", "--name", check=False).stdout.split():
                self.virsh("destroy", name, check=False)
                self.virsh("undefine", name, "--managed-save", check=False)
        for pid in self.qemu_pids():
            _kill(pid, "qemu-system-x86")
        if self.agent_pid is not None:
            _kill(self.agent_pid, "kvmhooks", child=self._agent)
            self.agent_pid = None
        if self.pid:
            _kill(self.pid, "libvirtd", child=self._proc)
            self.pid = 0
        elif hasattr(self, "_proc") and self._proc.poll() is None:  # it never answered: its reaper goes with it
            self._proc.terminate()
            self._proc.wait(15)


@dataclass
class TwoHosts:
    """Hosts A and B, the tiny guest's kernel and initramfs (outside every bind mount, so both boot it)."""

    a: Host
    b: Host
    kernel: Path
    initrd: Path
    workdir: Path
    shared: Path = field(init=False)  # a directory both hosts see: save images

    def __post_init__(self) -> None:
        self.shared = self.workdir / "shared"
        self.shared.mkdir(exist_ok=True)

    @property
    def hosts(self) -> tuple[Host, Host]:
        return self.a, self.b

    def guest_xml(self, tuning: str | None = '<kvm:cpu policy="dedicated"/>', memory_mib: int = 128,
                  vcpus: int = 1, backing: str = "", name: str | None = None) -> tuple[str, str]:
        """(name, XML) of a disk-less TCG guest annotated with ``tuning`` (None: not annotated). Its serial
        console is a file in the host's own /var/log/libvirt/qemu (each host sees its own)."""
        name = name or f"{PREFIX}{uuidlib.uuid4().hex[:8]}"
        meta = f"<kvm:tuning {NS}>{tuning}</kvm:tuning>" if tuning is not None else ""
        xml = domain_xml(name, str(uuidlib.uuid4()), self.kernel, self.initrd, memory_mib=memory_mib,
                         vcpus=vcpus, console_log=Path(f"/var/log/libvirt/qemu/{name}-console.log"),
                         metadata=meta, memory_backing=backing)
        return name, xml

    def create(self, host: Host, tuning: str | None = '<kvm:cpu policy="dedicated"/>', persistent: bool = False,
               **kw: Any) -> str:
        """Start a guest on ``host`` (transient, or defined then started); returns its name."""
        name, xml = self.guest_xml(tuning, **kw)
        path = self.workdir / f"{name}.xml"
        path.write_text(xml)
        if persistent:
            host.virsh("define", str(path))
            host.virsh("start", name)
        else:
            host.virsh("create", str(path))
        return name

    def booted(self, host: Host, name: str, timeout: float = 60) -> None:
        """Until the guest on ``host`` printed its ready line (it boots in ~2.5 s under TCG). A guest moved
        while still booting was twice seen reset on its destination right after a migration (libvirt's log
        there: "shutting down, reason=shutdown"; nothing on its console), so tests move booted guests, as
        users do."""
        console = host.source("/var/log/libvirt") / f"qemu/{name}-console.log"
        deadline = time.monotonic() + timeout
        while not (console.exists() and READY_LINE in console.read_text(errors="replace")):
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} did not boot on host {host.name} within {timeout} s")
            time.sleep(0.05)

    def migrate(self, src: Host, dst: Host, name: str, live: bool = True, persistent: bool = False,
                extra: Iterable[str] = ()) -> subprocess.CompletedProcess[str]:
        """``virsh migrate`` from ``src`` to ``dst`` (client-driven: virsh holds both connections), never
        raising: the test looks at the exit code and the one-line error."""
        flags = [*(["--live"] if live else []), *(["--persistent"] if persistent else []), *extra]
        return src.virsh("migrate", *flags, name, dst.uri, "--migrateuri", dst.migrate_uri(), check=False)

    def watching(self, host: Host, name: str, virsh: Host, *args: str
                 ) -> tuple[subprocess.CompletedProcess[str], list[dict[str, frozenset[int]]]]:
        """``virsh`` ``args`` on host ``virsh``, and while it runs, what :meth:`Host.threads` of ``name`` on
        ``host`` says every 20 ms: where the incoming QEMU runs *during* a migration or restore, before
        anything after it (kvmhooksd, the worker) could re-pin it."""
        cmd = ["virsh", "-c", virsh.uri, *args]
        seen = []
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
            while proc.poll() is None:
                if threads := host.threads(name):
                    seen.append(threads)
                time.sleep(0.02)
            out, err = proc.communicate()
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err), seen

    def save(self, host: Host, name: str) -> Path:
        """``virsh save`` to a file both hosts see (outside the bind mounts)."""
        path = self.shared / f"{name}.save"
        path.unlink(missing_ok=True)
        host.virsh("save", name, str(path))
        return path

    def restore(self, host: Host, path: Path) -> subprocess.CompletedProcess[str]:
        return host.virsh("restore", str(path), check=False)

    def managedsave(self, host: Host, name: str) -> None:
        host.virsh("managedsave", name)

    def cleanup(self) -> None:
        """No test VM left on either host (transient or defined, with or without a managed-save image)."""
        def remove(host: Host, name: str) -> None:
            host.virsh("destroy", name, check=False)
            host.virsh("undefine", name, "--managed-save", check=False)

        # All at once: each destroy waits for QEMU and the VM's stop hooks (~1 s here).
        with ThreadPoolExecutor(4) as pool:
            listed = list(pool.map(lambda h: h.virsh("list", "--all", "--name", check=False).stdout.split(),
                                   self.hosts))
            for done in [pool.submit(remove, h, n) for h, names in zip(self.hosts, listed, strict=True) for n in names]:
                done.result()
        for f in self.shared.glob("*.save"):
            f.unlink()

    def stop(self) -> None:
        for host in self.hosts:
            host.stop()


def this_machine(root: Path) -> FakeHost:
    """A fake tree like this machine for kvmhooks' pool view: its CPUs (one node, no SMT, as here), node 0's
    memory, a 2M pool that starts empty (hugetlbfs mounts come from the real /proc)."""
    online = parse_cpuset(Path("/sys/devices/system/cpu/online").read_text().strip())
    meminfo = Path("/sys/devices/system/node/node0/meminfo").read_text()
    figure = {m.group(1): int(m.group(2)) for m in re.finditer(r"Node 0 (\w+):\s+(\d+) kB", meminfo)}
    return FakeHost(root, nodes=1, cores_per_node=max(online) + 1, threads_per_core=1,
                    mem_per_node_kib=figure["MemTotal"], free_per_node_kib=figure["MemFree"],
                    page_sizes=(2048,), mounts=(2048,),
                    offline=frozenset(range(max(online) + 1)) - online)


@contextmanager
def real_pool2m(pages: int) -> Iterator[None]:
    """The machine's real 2M pool at least ``pages`` for the block (both hosts' QEMUs draw from it), then back
    to what it was. kvmhooks on the test hosts never writes it (their sysfs is fake)."""
    before = int(REAL_POOL2M.read_text())
    REAL_POOL2M.write_text(f"{max(before, pages)}\n")
    try:
        got = int(REAL_POOL2M.read_text())
        if got < pages:
            raise RuntimeError(f"the kernel gave {got} of the {pages} 2M pages the test needs")
        yield
    finally:
        REAL_POOL2M.write_text(f"{before}\n")


@contextmanager
def two_hosts(workdir: Path, kernel: Path, initrd: Path, kvmhooks_config: str, agents: bool = False
              ) -> Iterator[TwoHosts]:
    """Hosts A (tcp 16610, migration ports 49152-49183) and B (16611, 49184-49215), started together;
    stopped (every VM, agent and daemon) when the block ends, however it ends."""
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(kernel, workdir / "vmlinuz")
    shutil.copy(initrd, workdir / "initrd.gz")
    a = Host("A", workdir / "A", 16610, range(49152, 49184), this_machine(workdir / "A-fake"))
    b = Host("B", workdir / "B", 16611, range(49184, 49216), this_machine(workdir / "B-fake"))
    pair = TwoHosts(a, b, workdir / "vmlinuz", workdir / "initrd.gz", workdir)
    try:
        # Kept between runs: QEMU's capabilities as the test hosts see them (they run QEMU as root, so the
        # suite's libvirtd's cache does not do: libvirt would probe qemu-system-x86_64 and -i386 again).
        caps = workdir / "qemu-capabilities"
        for host in pair.hosts:
            host.prepare(kvmhooks_config, caps)
        for host in pair.hosts:
            host.start()
        for host in pair.hosts:
            host.wait_up()
        shutil.copytree(a.source("/var/cache/libvirt") / "qemu/capabilities", caps, dirs_exist_ok=True)
        if agents:
            for host in pair.hosts:
                host.start_agent()
        yield pair
    finally:
        pair.stop()
