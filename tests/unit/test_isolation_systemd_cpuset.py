"""systemd leaves a unit's cpuset.cpus behind when its AllowedCPUs= is emptied (systemd 252, seen in the
systemd test guest, tests/e2e/test_systemd_e2e.py): while another unit under the root keeps the cpuset
controller on, the kernel goes on confining the unit's tasks to the isolated set although ``systemctl show``
says "". The systemd backend reads that as the unit's value and, restoring "", writes the kernel's file."""

from __future__ import annotations

from pathlib import Path

from kvmhooks.apply.isolation import HostSettings


class Systemd:
    """systemctl as far as these tests need it: ``show -p AllowedCPUs --value`` prints the unit's setting
    (an empty line when unset, as systemd does) and set-property changes it; like systemd 252, emptying
    AllowedCPUs= does not touch the unit's cpuset.cpus (the kernel keeps what it had)."""

    def __init__(self, cgroup: Path) -> None:
        self.cgroup = cgroup
        self.allowed: dict[str, str] = {}

    def __call__(self, argv: list[str]) -> str:
        if argv[1] == "show":
            return self.allowed.get(argv[-1], "") + "\n"
        unit, value = argv[3], argv[4].removeprefix("AllowedCPUs=")
        self.allowed[unit] = value
        if value:
            (self.cgroup / unit / "cpuset.cpus").write_text(",".join(value.split()) + "\n")
        return ""


def host(tmp_path: Path, left: str) -> tuple[HostSettings, Systemd]:
    cgroup = tmp_path / "cgroup"
    (cgroup / "system.slice").mkdir(parents=True)
    (cgroup / "cpuset.cpus.effective").write_text("0-3\n")
    (cgroup / "system.slice/cpuset.cpus").write_text(left)
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    systemd = Systemd(cgroup)
    return HostSettings(cgroup_root=cgroup, run_root=tmp_path / "run", runner=systemd), systemd


def test_a_unit_systemd_calls_unset_but_the_kernel_confines_reads_as_confined(tmp_path: Path) -> None:
    settings, _ = host(tmp_path, "0,2-3\n")
    assert settings.read("unit:system.slice") == "0,2-3"


def test_restoring_all_cpus_frees_the_kernel_cpuset_too(tmp_path: Path) -> None:
    settings, systemd = host(tmp_path, "")
    assert settings.write("unit:system.slice", "0,2-3") == "0,2-3"
    assert settings.write("unit:system.slice", "") == ""
    assert systemd.allowed["system.slice"] == ""
    assert (tmp_path / "cgroup/system.slice/cpuset.cpus").read_text().strip() == "0-3"


def test_a_unit_without_a_cpuset_or_confined_to_every_cpu_reads_unset(tmp_path: Path) -> None:
    for left in ("", "0-3\n"):
        settings, _ = host(tmp_path / left.strip(), left)
        assert settings.read("unit:system.slice") == ""
