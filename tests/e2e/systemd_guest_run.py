"""Runs inside the systemd test guest (tests/e2e/systemd_guest.py), as root, with Debian's /usr/bin/python3.

It only gathers facts: every stage prints one line ``KVMHOOKS-E2E {json}`` on the result port, and
tests/e2e/test_systemd_e2e.py judges them on the host (the oracle lives there, not here): install.sh (systemd
branch, pip offline), host isolation on the real slices through the installed hook (prepare and release, as
libvirt calls it: argv and the domain XML on stdin) with a kill of the hook at each systemctl set-property and
the next converge after it, kvmhooksd as a unit, our mount unit restarted, then ``install.sh --uninstall``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, "/e2e/src")
from kvmhooks.guest import domain_xml  # (stdlib only: Debian's python3 runs it)

MARK = "KVMHOOKS-E2E"
SRC = Path("/e2e/src")
BIN = Path("/e2e/bin")
CALLS = Path("/e2e/calls.log")
COUNT = Path("/e2e/count")
KILLED = Path("/e2e/killed")
HOOK = "/etc/libvirt/hooks/qemu.d/kvmhooks"
KVMHOOKS = "/usr/local/bin/kvmhooks"
UNITS = ("system.slice", "user.slice", "init.scope")
CONTROL = Path("/run/systemd/system.control")
STATE = Path("/run/kvmhooks")
WHEELS = "/opt/kvmhooks-wheels"
NS = "http://kvmhooks.org/xmlns/domain/1.0"
# The admin's own runtime AllowedCPUs= on one slice, not contiguous (systemd prints it "0-1 3").
ADMIN_UNIT, ADMIN_CPUS = "user.slice", "0-1,3"
# The guest has CPUs 0-3: housekeeping on 0, the isolating VM's dedicated vCPU on 1.
CONFIG = """\
lock_timeout = 20
worker_timeout = 10
[cpu]
allowed = "1"
housekeeping = "0"
"""
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The real systemctl, every set-property recorded; with KVMH_KILL_AT=N the N-th set-property SIGKILLs the
# caller (the hook's Python): KVMH_KILL_WHEN=before, before systemctl runs; after, once systemd took the
# value and before the caller could read it back or commit anything.
WRAPPER = f"""#!/bin/sh
if [ "$1" = set-property ]; then
  echo "$*" >> {CALLS}
  if [ -n "$KVMH_KILL_AT" ]; then
    n=$(( $(cat {COUNT} 2>/dev/null || echo 0) + 1 )); echo $n > {COUNT}
    if [ "$n" = "$KVMH_KILL_AT" ]; then
      [ "$KVMH_KILL_WHEN" = after ] && /usr/bin/systemctl "$@"
      echo "$*" > {KILLED}
      kill -9 $PPID
      exit 1
    fi
  fi
fi
exec /usr/bin/systemctl "$@"
"""


def emit(stage: str, **data: Any) -> None:
    print(MARK, json.dumps({"stage": stage, **data}), flush=True)


def sh(*argv: str, env: dict[str, str] | None = None, stdin: bytes = b"", timeout: float = 120) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        p = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout,
                           env={"PATH": PATH, "LC_ALL": "C", **(env or {})})
        rc, out, err = p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
    except subprocess.TimeoutExpired:
        rc, out, err = None, "", f"timed out after {timeout} s"
    return {"rc": rc, "out": out, "err": err, "seconds": round(time.monotonic() - t0, 2)}


def out(*argv: str) -> str:
    return str(sh(*argv)["out"]).strip()


def wait(pred: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(interval)


def read(path: Path | str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


# --- what systemd says ---------------------------------------------------------------------------------

def slices() -> dict[str, Any]:
    """AllowedCPUs of the three units as systemctl prints them (both ways), their runtime drop-ins, and
    what the kernel's cgroups say."""
    raw = out("systemctl", "show", "-p", "AllowedCPUs", *UNITS)
    value = {u: out("systemctl", "show", "-p", "AllowedCPUs", "--value", u) for u in UNITS}
    dropins = {u: {f.name: f.read_text() for f in sorted((CONTROL / f"{u}.d").glob("*.conf"))} for u in UNITS}
    cgroup = {u: {f: (read(f"/sys/fs/cgroup/{u}/{f}") or "").strip() for f in ("cpuset.cpus", "cpuset.cpus.effective")}
              for u in UNITS}
    return {"show": raw, "value": value, "dropins": dropins, "cgroup": cgroup,
            "pid1_cpus": status_field(1, "Cpus_allowed_list"), "journald_cpus": journald_cpus()}


def status_field(pid: int | str, name: str) -> str | None:
    for line in (read(f"/proc/{pid}/status") or "").splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return None


def journald_cpus() -> str | None:
    pid = out("systemctl", "show", "-p", "MainPID", "--value", "systemd-journald")
    return status_field(pid, "Cpus_allowed_list") if pid.isdecimal() and pid != "0" else None


def ledger() -> dict[str, Any]:
    """The ledger decoded by the installed kvmhooks (as ``kvmhooks status --json`` would)."""
    code = ("import json, pathlib; from kvmhooks.ledger import Ledger; "
            "print(json.dumps(Ledger(pathlib.Path('/run/kvmhooks/ledger.json')).read().as_dict()))")
    r = sh("/opt/kvmhooks/venv/bin/python3", "-c", code)
    try:
        data: dict[str, Any] = json.loads(r["out"])
        return data
    except ValueError:
        return {"unreadable": r}


def unit_state(unit: str) -> dict[str, str]:
    return {"active": out("systemctl", "is-active", unit), "enabled": out("systemctl", "is-enabled", unit)}


# --- boot 1 --------------------------------------------------------------------------------------------

def stage_boot() -> None:
    emit("boot", uname=out("uname", "-r"), cmdline=read("/proc/cmdline"), nproc=os.cpu_count(),
         cgroup_fs=out("stat", "-fc", "%T", "/sys/fs/cgroup"), controllers=read("/sys/fs/cgroup/cgroup.controllers"),
         systemd=out("systemctl", "--version").splitlines()[:1], running=out("systemctl", "is-system-running"),
         libvirtd=unit_state("libvirtd"), uptime=read("/proc/uptime"))


def stage_install() -> None:
    env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": WHEELS}  # offline: PyPI's wheels were put in the image
    first = sh("bash", str(SRC / "install.sh"), env=env, timeout=600)
    wait(lambda: out("systemctl", "is-active", "kvmhooksd") == "active", 30)
    ours = sorted(str(p) for p in Path("/etc/systemd/system").glob("*.mount")
                  if "added by kvmhooks" in (read(p) or ""))
    mounts = {p: {**unit_state(Path(p).name), "findmnt": out(
        "findmnt", "-n", "-o", "FSTYPE,OPTIONS", out("systemctl", "show", "-p", "Where", "--value", Path(p).name))}
        for p in ours}
    facts = {
        "install": first, "kvmhooksd": unit_state("kvmhooksd"),
        "unit_file": read("/etc/systemd/system/kvmhooksd.service"), "mount_units": mounts,
        "dev_hugepages": {**unit_state("dev-hugepages.mount"),
                          "findmnt": out("findmnt", "-n", "-o", "FSTYPE,OPTIONS", "/dev/hugepages")},
        "hugepages_1g": Path("/sys/kernel/mm/hugepages/hugepages-1048576kB").is_dir(),
        "fstab": read("/etc/fstab"), "hook": Path(HOOK).is_file(), "libvirtd": unit_state("libvirtd"),
        "failed": out("systemctl", "--failed", "--plain", "--no-legend"),
    }
    emit("install", **facts)


def hook(name: str, xml: str, op: str, sub: str, kill: tuple[int, str] | None = None) -> dict[str, Any]:
    """The installed hook, as libvirt runs it; ``kill``: (N, when) arms the systemctl wrapper (its count
    goes on over several calls until :func:`arm` resets it)."""
    env = {"PATH": f"{BIN}:{PATH}"}
    if kill is not None:
        env |= {"KVMH_KILL_AT": str(kill[0]), "KVMH_KILL_WHEN": kill[1]}
    return sh(HOOK, name, op, sub, "-", env=env, stdin=xml.encode(), timeout=120)


def arm() -> None:
    COUNT.unlink(missing_ok=True)
    KILLED.unlink(missing_ok=True)


def vm_xml() -> tuple[str, str, str]:
    name, uuid = f"kvmhsd-{uuidlib.uuid4().hex[:6]}", str(uuidlib.uuid4())
    meta = f'<kvm:tuning xmlns:kvm="{NS}"><kvm:cpu policy="dedicated"/><kvm:host isolate="yes"/></kvm:tuning>'
    return name, uuid, domain_xml(name, uuid, Path("/nonexistent/vmlinuz"), Path("/nonexistent/initrd"),
                                  memory_mib=128, vcpus=1, metadata=meta)


def calls() -> list[str]:
    lines = (read(CALLS) or "").splitlines()
    CALLS.unlink(missing_ok=True)
    return lines


def stage_isolation() -> None:
    BIN.mkdir(parents=True, exist_ok=True)
    (BIN / "systemctl").write_text(WRAPPER)
    (BIN / "systemctl").chmod(0o755)
    Path("/etc/kvmhooks/config.toml").write_text(CONFIG)
    admin = sh("systemctl", "set-property", "--runtime", ADMIN_UNIT, f"AllowedCPUs={ADMIN_CPUS}")
    before = slices()
    name, uuid, xml = vm_xml()
    calls()
    prep = hook(name, xml, "prepare", "begin")
    during = slices()
    during_ledger = ledger()
    prepare_calls = calls()
    status = sh(KVMHOOKS, "status")
    stopped = hook(name, xml, "stopped", "end")
    release = hook(name, xml, "release", "end")
    after = slices()
    emit("isolation", admin=admin, admin_unit=ADMIN_UNIT, before=before, prepare=prep, during=during,
         ledger_during=during_ledger, prepare_calls=prepare_calls, status=status, stopped=stopped,
         release=release, release_calls=calls(), after=after, ledger_after=ledger(), uuid=uuid,
         log=tail("/var/log/kvmhooks/kvmhooks.log"))


def tail(path: str, n: int = 40) -> str:
    return "\n".join((read(path) or "").splitlines()[-n:])


def reset(before: dict[str, Any]) -> None:
    """Put the units back by hand after a scenario that did not, so the next one starts clean."""
    now = slices()
    for u in UNITS:
        if now["value"][u] != before["value"][u] or now["dropins"][u] != before["dropins"][u]:
            sh("systemctl", "set-property", "--runtime", u, f"AllowedCPUs={before['value'][u]}")
            if not before["dropins"][u]:
                (CONTROL / f"{u}.d" / "50-AllowedCPUs.conf").unlink(missing_ok=True)


def stage_kills() -> None:
    """For each set-property of an isolation and of a restore: kill the hook there, then the next converge."""
    base = slices()
    scenarios = [("isolate", n, "after") for n in range(1, 4)] + [("restore", n, "after") for n in range(1, 4)] \
        + [("isolate", 1, "before")]
    for phase, n, when in scenarios:
        name, uuid, xml = vm_xml()
        calls()
        first: dict[str, Any] | None = None
        released: dict[str, Any] | None = None
        if phase == "restore":  # the VM stops: stopped and release (whichever restores, the N-th write dies)
            first = hook(name, xml, "prepare", "begin")
            arm()
            killed_run = [hook(name, xml, op, "end", kill=(n, when)) for op in ("stopped", "release")]
            killed = read(KILLED)
            mid = slices()
        else:  # the start fails: libvirt runs stopped and release, the next converge
            arm()
            killed_run = [hook(name, xml, "prepare", "begin", kill=(n, when))]
            killed = read(KILLED)
            mid = slices()
            for op in ("stopped", "release"):
                hook(name, xml, op, "end")
            released = slices()
        # A restore killed half-way: nobody calls the hook for that VM again; the next operation (here
        # kvmhooks reconcile, as an admin or kvmhooksd would run it) finishes the restore.
        rec = sh(KVMHOOKS, "reconcile", timeout=120) if phase == "restore" else None
        after, after_ledger = slices(), ledger()
        emit("kill", phase=phase, n=n, when=when, killed=killed, run=killed_run, prepare=first, mid=mid,
             released=released, reconcile=rec, after=after, ledger_after=after_ledger, before=base,
             calls=calls(), uuid=uuid, log=tail("/var/log/kvmhooks/kvmhooks.log", 15))
        if after["value"] != base["value"] or after["dropins"] != base["dropins"] or uuid in after_ledger.get(
                "domains", {}):
            for op in ("stopped", "release"):
                hook(name, xml, op, "end")
            reset(base)


def metrics() -> dict[str, Any]:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(STATE / "metrics.sock"))
            s.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError as e:
        return {"error": str(e)}
    head, _, body = data.decode(errors="replace").partition("\r\n\r\n")
    names = sorted({line.split("{")[0].split()[0] for line in body.splitlines() if line and line[0] != "#"})
    return {"status": head.splitlines()[0] if head else "", "names": names}


def agent_facts() -> dict[str, Any]:
    return {"active": out("systemctl", "is-active", "kvmhooksd"),
            "main_pid": out("systemctl", "show", "-p", "MainPID", "--value", "kvmhooksd"),
            "pid_file": (read(STATE / "agent.pid") or "").strip(), "socket": (STATE / "metrics.sock").is_socket()}


def settled(old_pid: str) -> dict[str, Any]:
    """Wait for a (new) agent whose pid file names it and whose socket answers."""
    def ok() -> dict[str, Any] | None:
        f = agent_facts()
        return f if f["active"] == "active" and f["main_pid"] not in ("0", old_pid) \
            and f["pid_file"] == f["main_pid"] and f["socket"] else None
    f = wait(ok, 30) or agent_facts()
    return {**f, "metrics": metrics(), "old_alive": old_pid.isdecimal() and Path(f"/proc/{old_pid}").exists()}


def stage_agent() -> None:
    first = settled("")
    restart = sh("systemctl", "restart", "kvmhooksd")
    after_restart = settled(first["main_pid"])
    killed = sh("systemctl", "kill", "-s", "KILL", "kvmhooksd")
    after_kill = settled(after_restart["main_pid"])
    cli = sh(KVMHOOKS, "metrics")
    status = sh(KVMHOOKS, "status")
    stop = sh("systemctl", "stop", "kvmhooksd")
    stopped = agent_facts()
    start = sh("systemctl", "start", "kvmhooksd")
    started = settled(after_kill["main_pid"])
    emit("agent", first=first, restart=restart, after_restart=after_restart, kill=killed, after_kill=after_kill,
         cli_metrics_head=str(cli["out"])[:2000], cli_rc=cli["rc"], status=status, stop=stop, stopped=stopped,
         start=start, started=started, journal=out("journalctl", "-u", "kvmhooksd", "--no-pager", "-n", "40"))


def stage_uninstall() -> None:
    """The mount unit of ours as systemd runs it at boot (install.sh mounted by hand: the unit only took the
    mount over), then install.sh --uninstall."""
    unit = "dev-hugepages1G.mount"
    stop, start = sh("systemctl", "stop", unit), sh("systemctl", "start", unit)
    restarted = {**unit_state(unit), "findmnt": out("findmnt", "-n", "-o", "FSTYPE,OPTIONS", "/dev/hugepages1G"),
                 "stop": stop, "start": start}
    uninstall = sh("bash", str(SRC / "install.sh"), "--uninstall", timeout=120)
    left = sorted(str(p) for p in Path("/etc/systemd/system").rglob("*")
                  if "kvmhooks" in p.name and not p.name.startswith("kvmhooks-e2e"))
    loaded = {u: out("systemctl", "show", "-p", "LoadState,FragmentPath,NeedDaemonReload", u)
              for u in ("kvmhooksd.service", unit)}
    emit("uninstall", mount_unit=restarted, uninstall=uninstall, kvmhooksd=unit_state("kvmhooksd"),
         units_left=left, hook=Path(HOOK).exists(), mount_after=unit_state(unit), loaded=loaded)


def guarded(name: str, fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:
        emit(name, error=traceback.format_exc())


def hook_alone(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` with kvmhooksd stopped: the isolation and kill stages watch (and kill) the hook's own process
    at each systemctl call; with kvmhooksd running, kvmhooksd would serve the prepare instead."""
    def run() -> None:
        sh("systemctl", "stop", "kvmhooksd")
        try:
            fn()
        finally:
            sh("systemctl", "start", "kvmhooksd")
    return run


def main() -> None:
    for name, fn in (("boot", stage_boot), ("install", stage_install), ("isolation", hook_alone(stage_isolation)),
                     ("kill", hook_alone(stage_kills)), ("agent", stage_agent), ("uninstall", stage_uninstall)):
        guarded(name, fn)
    emit("done")


if __name__ == "__main__":
    main()
