"""kvmhooks on a real systemd (cgroup v2 unified): install.sh's systemd branch, host isolation on real slices,
kvmhooksd as a unit — in a Debian 12 guest booted under TCG (tests/e2e/systemd_guest.py), driven by
tests/e2e/systemd_guest_run.py, which only reports facts; everything is judged here.

One boot-to-poweroff serves every test of the module. It needs no libvirtd on this host (the guest runs its
own), so it does not take the host's e2e lock. The image is built once per machine (30 s on a quiet 2-core
host, 100 s on a busy one) and cached; if it cannot be built the tests fail — they do not skip: without this
guest nothing tests kvmhooks against the systemd it is installed on everywhere but here. Only a non-root run
skips, as every end-to-end test does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import REPO
from tests.e2e.systemd_guest import RESULT_MARK, boot, build_image, payload

pytestmark = [pytest.mark.systemd, pytest.mark.e2e]

UNITS = ("system.slice", "user.slice", "init.scope")
ISOLATED = frozenset({1})  # the guest script's config: housekeeping 0, the dedicated vCPU on 1
VCPUS = 4
# Boot, install.sh (pip under TCG: most of it), the isolation and its crash scenarios, the agent, uninstall:
# about 3 minutes on a quiet 2-core host.
RUN_TIMEOUT = 480

LOGS = Path("/tmp/kvmhooks-systemd-e2e")

Stages = dict[str, list[dict[str, Any]]]


def cpus(text: str) -> frozenset[int]:
    """A CPU list as systemd ("0-1 3") or the kernel ("0-1,3") prints it: the test's own reading, not
    kvmhooks' (whose parser is under test)."""
    out: set[int] = set()
    for part in re.split(r"[\s,]+", text.strip()):
        if part:
            lo, _, hi = part.partition("-")
            out |= set(range(int(lo), int(hi or lo) + 1))
    return frozenset(out)


@pytest.fixture(scope="module")
def guest() -> Iterator[Stages]:
    if os.geteuid() != 0:
        pytest.skip("the systemd guest is built with mmdebstrap --mode=root (as root)")
    image = build_image()  # raises when it cannot be built: a failure, not a skip
    if shutil.which("qemu-system-x86_64") is None:
        raise RuntimeError("qemu-system-x86_64 is missing: run scripts/host-deps.sh")
    with tempfile.TemporaryDirectory(prefix="kvmhooks-systemd-") as tmp_s:
        tmp = Path(tmp_s)
        run_py = (REPO / "tests/e2e/systemd_guest_run.py").read_bytes()
        payload(tmp / "payload.tar", REPO, [
            ("run", b"#!/bin/sh\nexec /usr/bin/python3 /e2e/systemd_guest_run.py\n", 0o755),
            ("systemd_guest_run.py", run_py, 0o644)])
        run = boot(image, tmp / "payload.tar", tmp, RUN_TIMEOUT, vcpus=VCPUS)
        LOGS.mkdir(exist_ok=True)  # kept for a look after a failure
        for name in ("results.log", "console.log"):
            if (tmp / name).exists():
                shutil.copy(tmp / name, LOGS / name)
    stages: Stages = {}
    for line in run.results:
        if line.startswith(RESULT_MARK + " "):
            data = json.loads(line[len(RESULT_MARK) + 1:])
            stages.setdefault(data["stage"], []).append(data)
    print(f"systemd guest: image built in {image.build_seconds:.0f} s (0: cached), run {run.seconds:.0f} s",
          file=sys.stderr)
    if "done" not in stages:
        raise AssertionError(f"the systemd guest did not finish in {run.seconds:.0f} s "
                             f"(qemu exit {run.exit_code}); results:\n" + "\n".join(run.results[-30:])
                             + "\nconsole:\n" + run.console[-4000:])
    yield stages


def stage(stages: Stages, name: str) -> dict[str, Any]:
    (data,) = stages.get(name) or [{"error": f"stage {name} reported nothing"}]
    assert "error" not in data, data["error"]
    return data


def test_guest_is_systemd_on_cgroup_v2(guest: Stages) -> None:
    b = stage(guest, "boot")
    assert b["cgroup_fs"] == "cgroup2fs" and "cpuset" in b["controllers"].split()
    assert b["nproc"] == VCPUS and "systemd.unified_cgroup_hierarchy=1" in b["cmdline"]


def test_install_sh_systemd_branch(guest: Stages) -> None:
    i = stage(guest, "install")
    assert i["install"]["rc"] == 0, i["install"]
    assert i["kvmhooksd"] == {"active": "active", "enabled": "enabled"}, i
    assert "ExecStart=/opt/kvmhooks/venv/bin/kvmhooks agent" in i["unit_file"]
    assert i["hook"]
    # /dev/hugepages is systemd's own mount; a 1G mount gets a unit of ours, enabled and mounted.
    assert i["dev_hugepages"]["active"] == "active" and i["dev_hugepages"]["findmnt"].startswith("hugetlbfs")
    assert i["hugepages_1g"], "the guest CPU (-cpu max) has pdpe1gb: 1G pages exist"
    unit = i["mount_units"].get("/etc/systemd/system/dev-hugepages1G.mount")
    assert unit is not None, i["mount_units"]
    assert unit["enabled"] == "enabled" and unit["active"] == "active", unit
    assert unit["findmnt"].startswith("hugetlbfs") and "pagesize=1024M" in unit["findmnt"], unit
    assert "kvmhooks" not in (i["fstab"] or ""), "systemd hosts get units, not fstab lines"
    assert i["failed"] == "", i["failed"]


def expected_during(before: dict[str, str], online: frozenset[int]) -> dict[str, frozenset[int]]:
    """Each unit's AllowedCPUs minus the isolated CPU ("" means every CPU)."""
    return {u: (cpus(v) or online) - ISOLATED for u, v in before.items()}


def enforced(snapshot: dict[str, Any]) -> dict[str, frozenset[int]]:
    """The CPUs the kernel lets each unit's tasks use (cpuset.cpus.effective), PID 1 (init.scope) and
    journald (system.slice). Not cpuset.cpus itself: once written, the kernel takes no empty value back
    (an empty write is ignored, "\\n" is refused), so "every CPU" may read "" before and "0-3" after."""
    out = {u: cpus(v["cpuset.cpus.effective"]) for u, v in snapshot["cgroup"].items()}
    return {**out, "pid 1": cpus(snapshot["pid1_cpus"]), "journald": cpus(snapshot["journald_cpus"])}


def test_isolation_on_real_slices(guest: Stages) -> None:
    iso = stage(guest, "isolation")
    online = frozenset(range(VCPUS))
    before, during, after = iso["before"], iso["during"], iso["after"]
    assert iso["admin"]["rc"] == 0
    assert cpus(before["value"][iso["admin_unit"]]) == {0, 1, 3}
    assert iso["prepare"]["rc"] == 0, iso["prepare"]
    assert iso["ledger_during"]["domains"][iso["uuid"]]["cpus"] == sorted(ISOLATED), iso["ledger_during"]
    # Every unit off the isolated CPU, the admin's non-contiguous value too; the kernel's cgroups agree.
    want = expected_during(before["value"], online)
    got = {u: cpus(v) for u, v in during["value"].items()}
    assert got == want, (during["show"], iso["log"])
    for u in UNITS:
        assert cpus(during["cgroup"][u]["cpuset.cpus.effective"]) == want[u], during["cgroup"]
    assert cpus(during["pid1_cpus"]) == want["init.scope"] and cpus(during["journald_cpus"]) == want["system.slice"]
    assert len(iso["prepare_calls"]) == len(set(iso["prepare_calls"])) == len(UNITS), iso["prepare_calls"]
    # Released: every unit exactly as before, the admin's drop-in kept, none of ours left.
    assert iso["release"]["rc"] == 0
    assert after["show"] == before["show"], (after["show"], before["show"], iso["log"])
    assert after["dropins"] == before["dropins"], after["dropins"]
    # What the kernel enforces, not only what systemd says: the cgroups' effective CPUs, PID 1 and journald.
    assert enforced(after) == enforced(before), (after["cgroup"], before["cgroup"], iso["log"])
    assert not iso["ledger_after"].get("isolation"), iso["ledger_after"]


def test_kill_at_each_set_property_then_the_next_converge_restores(guest: Stages) -> None:
    kills = guest.get("kill") or []
    pristine = stage(guest, "isolation")["before"]  # the kernel's view before any isolation at all
    assert kills and all("error" not in k for k in kills), kills
    assert {(k["phase"], k["n"], k["when"]) for k in kills} == {
        *((p, n, "after") for p in ("isolate", "restore") for n in (1, 2, 3)),
        ("isolate", 1, "before")}
    for k in kills:
        what = f"killed {k['when']} set-property #{k['n']} of the {k['phase']}"
        assert k["killed"], f"{what}: the hook never got there ({k['calls']})"
        # The next converge: the failed start's stopped/release hooks, or kvmhooks reconcile after a restore.
        if k["reconcile"] is not None:
            assert k["reconcile"]["rc"] == 0, (what, k["reconcile"])
        assert k["after"]["value"] == k["before"]["value"], (what, k["mid"]["show"], k["after"]["show"], k["log"])
        assert k["after"]["dropins"] == k["before"]["dropins"], (what, k["after"]["dropins"])
        assert enforced(k["after"]) == enforced(pristine), (what, k["after"]["cgroup"], pristine["cgroup"], k["log"])
        assert not k["ledger_after"].get("isolation"), (what, k["ledger_after"].get("isolation"))
        assert k["uuid"] not in k["ledger_after"].get("domains", {}), what


def test_kvmhooksd_as_a_unit(guest: Stages) -> None:
    a = stage(guest, "agent")
    for when in ("first", "after_restart", "after_kill", "started"):
        f = a[when]
        assert f["active"] == "active" and f["pid_file"] == f["main_pid"] and f["socket"], (when, f, a["journal"])
        assert f["metrics"].get("status", "").split()[1:2] == ["200"], (when, f["metrics"])
        assert "kvmhooks_up" in f["metrics"]["names"], (when, f["metrics"])
        assert not f["old_alive"], when
    pids = [a[w]["main_pid"] for w in ("first", "after_restart", "after_kill", "started")]
    assert len(set(pids)) == 4, pids  # restart, a SIGKILL (Restart=on-failure) and stop/start: new agents
    assert a["cli_rc"] == 0 and "kvmhooks_up" in a["cli_metrics_head"]
    assert a["stop"]["rc"] == 0 and a["stopped"]["active"] == "inactive", a["stopped"]
    assert not a["stopped"]["pid_file"] and not a["stopped"]["socket"], a["stopped"]


def test_our_mount_unit_restarts_then_uninstall_removes_everything(guest: Stages) -> None:
    u = stage(guest, "uninstall")
    m = u["mount_unit"]  # install.sh mounted by hand; systemd mounting from the unit is what a boot does
    assert m["stop"]["rc"] == 0 and m["start"]["rc"] == 0, m
    assert m["active"] == "active" and m["findmnt"].startswith("hugetlbfs") and "pagesize=1024M" in m["findmnt"], m
    assert u["uninstall"]["rc"] == 0, u["uninstall"]
    assert not u["units_left"] and not u["hook"], u
    assert u["kvmhooksd"]["active"] == "inactive" and u["kvmhooksd"]["enabled"] != "enabled", u
    assert u["mount_after"]["enabled"] != "enabled", u  # (the mount itself stays until reboot, as documented)
    # systemd forgot the deleted unit files (a daemon-reload), so nothing is left half-loaded.
    assert "LoadState=not-found" in u["loaded"]["kvmhooksd.service"], u["loaded"]
    for state in u["loaded"].values():
        assert "NeedDaemonReload=no" in state and "FragmentPath=\n" in state + "\n", u["loaded"]
