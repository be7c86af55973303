from __future__ import annotations

import pytest

from kvmhooks.units import format_cpuset, format_kib, libvirt_to_kib, parse_cpuset, parse_percent, parse_size_kib


@pytest.mark.parametrize(("text", "kib"), [
    ("1048576", 1048576), ("512M", 524288), ("2G", 2097152), ("2GiB", 2097152), ("1536m", 1572864),
    ("100K", 100), ("1T", 1024**3), (" 4 MiB ", 4096),
])
def test_sizes(text: str, kib: int) -> None:
    assert parse_size_kib(text) == kib


@pytest.mark.parametrize("text", ["", "2GB", "1.5G", "-1G", "G", "2 G B", "1e6", "0x10"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size_kib(text)


def test_percent() -> None:
    assert parse_percent("75%") == 75
    assert parse_percent("512M") is None
    for bad in ("0%", "101%", "7.5%", "%"):
        with pytest.raises(ValueError):
            parse_percent(bad)


def test_libvirt_units() -> None:
    assert libvirt_to_kib("256", "MiB") == 262144
    assert libvirt_to_kib("262144", None) == 262144
    assert libvirt_to_kib("1", "GB") == 976563  # 10^9 bytes, rounded up
    assert libvirt_to_kib("1", "G") == 1048576
    with pytest.raises(ValueError):
        libvirt_to_kib("1", "parsecs")


@pytest.mark.parametrize(("text", "cpus"), [
    ("0", {0}), ("0-3", {0, 1, 2, 3}), ("0-3,^2,8", {0, 1, 3, 8}), ("1,1,2", {1, 2}), ("0-7,^0-1", None),
])
def test_cpusets(text: str, cpus: set[int] | None) -> None:
    if cpus is None:
        with pytest.raises(ValueError):
            parse_cpuset(text)
    else:
        assert parse_cpuset(text) == cpus


@pytest.mark.parametrize("text", ["", ",", "a", "3-1", "^2", "0-99999", "1,,2", "1-", "-1"])
def test_bad_cpusets(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpuset(text)


def test_format() -> None:
    assert format_cpuset({0, 1, 2, 3, 8, 10, 11}) == "0-3,8,10-11"
    assert format_kib(2097152) == "2G" and format_kib(1572864) == "1536M" and format_kib(100) == "100K"
