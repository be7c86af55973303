"""Host isolation, hardening round two (issue 17, items 5 and 6), on fake trees.

Item 5: systemd prints AllowedCPUs= with spaces ("0-1 3", cpu_set_to_range_string()); every value read back
is compared as a CPU set, so a crash between set-property and its read-back, an admin's non-contiguous value
and a converge that changes nothing all behave. The fake systemctl (:class:`FakeSystemd`) prints what the
real one prints.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmhooks.annotation import HostSpec
from kvmhooks.apply.isolation import SYSTEMD_UNITS
from kvmhooks.plan.isolation import IsolationTarget, equivalent, parse_list, target_for
from tests.unit.test_isolation import (
    VM_A,
    VM_B,
    Crash,
    FakeSystemd,
    Ledger,
    build,
    run,
    snapshot,
)

# One dedicated CPU in the middle of a 4-CPU host: what the host keeps is not one range ("0-1 3").
MIDDLE = target_for([VM_A])


def systemd_host(base: Path) -> FakeSystemd:
    systemd = build(base, backend="systemd")
    assert systemd is not None
    return systemd


def dropins(base: Path) -> list[str]:
    control = base / "run/systemd/system.control"
    return sorted(str(p.relative_to(control)) for p in control.rglob("*.conf")) if control.exists() else []


class CrashAfterSetProperty(FakeSystemd):
    """systemd applies the k-th set-property, then the process dies before it reads the value back."""

    def __init__(self, run_root: Path, crash_after: int) -> None:
        super().__init__(run_root)
        self.crash_after = crash_after

    def __call__(self, argv: list[str]) -> str:
        out = super().__call__(argv)
        if argv[1] == "set-property" and self.set_calls == self.crash_after:
            self.crash_after = 0
            raise Crash("after set-property, before its read-back")
        return out


def test_the_fake_systemctl_prints_what_systemd_prints(tmp_path: Path) -> None:
    """cpu_set_to_range_string(): ranges joined by spaces; an unset AllowedCPUs is an empty line."""
    systemd = FakeSystemd(tmp_path)
    show = ["systemctl", "show", "-p", "AllowedCPUs", "--value", "user.slice"]
    assert systemd(show) == "\n"
    systemd(["systemctl", "set-property", "--runtime", "user.slice", "AllowedCPUs=3,0-1"])
    assert systemd(show) == "0-1 3\n"
    assert (tmp_path / "systemd/system.control/user.slice.d/50-AllowedCPUs.conf").read_text().endswith(
        "[Slice]\nAllowedCPUs=\nAllowedCPUs=0-1 3\n")


def test_systemd_lists_are_read_as_sets() -> None:
    assert parse_list("0-1 3") == parse_list("0-1,3") == parse_list(" 0-1, 3\n") == frozenset({0, 1, 3})
    assert parse_list("") == parse_list("\n") == frozenset()
    assert equivalent("unit:system.slice", "0-1 3", "0-1,3")
    assert not equivalent("unit:system.slice", "0-1 3", "0-1")
    for bad in ("0-1 x", "3-1"):
        with pytest.raises(ValueError):
            parse_list(bad)


@pytest.mark.parametrize("crash_after", range(1, len(SYSTEMD_UNITS) + 1))
@pytest.mark.parametrize("then", ["same", "empty"])
def test_a_crash_between_set_property_and_its_read_back_leaves_no_unit_restricted(
        tmp_path: Path, crash_after: int, then: str) -> None:
    """The next converge sees kvmhooks' own value (printed with a space) as ours, not as the admin's: after
    the last VM stops every unit is unrestricted again and no drop-in of ours is left."""
    systemd = systemd_host(tmp_path)
    original = snapshot(tmp_path, systemd)
    crashing = CrashAfterSetProperty(tmp_path / "run", crash_after)
    ledger = Ledger()
    assert run(tmp_path, ledger, MIDDLE, crashing) is None
    assert "0-1 3" in crashing.props.values()  # systemd took the value before the process died
    systemd.props = crashing.props
    if then == "same":
        report = run(tmp_path, ledger, MIDDLE, systemd)
        assert report is not None and report.ok and not report.notes  # nothing taken for an admin's change
        assert systemd.props == {unit: "0-1 3" for unit in SYSTEMD_UNITS}
    report = run(tmp_path, ledger, IsolationTarget(), systemd)
    assert systemd.props == {unit: "" for unit in SYSTEMD_UNITS}
    assert dropins(tmp_path) == []
    assert report is not None and report.ok and not report.notes
    assert snapshot(tmp_path, systemd) == original and ledger.disk.empty


@pytest.mark.parametrize(("vm", "kept"), [(VM_B, "0-1"), (VM_A, "0-1 3"),
                                          (({1}, HostSpec(isolate=True, irqs=False, governor=None)), "0 3")])
def test_an_admins_non_contiguous_allowed_cpus_is_isolated_and_restored_exactly(
        tmp_path: Path, vm: tuple[set[int], HostSpec], kept: str) -> None:
    systemd = systemd_host(tmp_path)
    systemd.props["user.slice"] = "0-1 3"  # the admin's AllowedCPUs=0-1,3 in /etc, as systemctl prints it
    original = snapshot(tmp_path, systemd)
    ledger = Ledger()
    report = run(tmp_path, ledger, target_for([vm]), systemd)
    assert report is not None and report.ok
    (cpu,) = vm[0]
    assert parse_list(systemd.props["user.slice"]) == frozenset({0, 1, 3}) - {cpu}
    assert systemd.props["user.slice"] == kept
    assert all(cpu not in parse_list(systemd.props[u]) for u in SYSTEMD_UNITS)
    run(tmp_path, ledger, IsolationTarget(), systemd)
    assert systemd.props["user.slice"] == "0-1 3"
    assert snapshot(tmp_path, systemd) == original and ledger.disk.empty


@pytest.mark.parametrize("admin", ["", "0-1 3"])
def test_converging_twice_without_change_runs_set_property_once(tmp_path: Path, admin: str) -> None:
    systemd = systemd_host(tmp_path)
    systemd.props["system.slice"] = admin
    ledger = Ledger()
    first = run(tmp_path, ledger, MIDDLE, systemd)
    assert first is not None and first.ok
    calls, commits = systemd.set_calls, ledger.commits
    assert calls == len(SYSTEMD_UNITS) - (admin == "0-1 3")  # the admin's already avoids CPU 2
    again = run(tmp_path, ledger, MIDDLE, systemd)
    assert again is not None and again.changed == () and not again.notes
    assert (systemd.set_calls, ledger.commits) == (calls, commits)
