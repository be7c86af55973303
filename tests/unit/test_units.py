from __future__ import annotations

import pytest

from kvmhooks.units import (
    format_cpuset,
    format_kib,
    libvirt_to_kib,
    parse_cpuset,
    parse_percent,
    parse_size_kib,
    parse_uint,
)


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


# --- ASCII digits only, bounded lengths ------------------------------------------------------------------
# str.isdigit() and int() accept '²', Arabic-Indic '٣', fullwidth '１', '+5', ' 12 ' and '1_000'; int() of
# more than 4300 digits raises its own ValueError from deep inside. None of that is a number in the contract.

HOSTILE = ["²", "٣", "１２", "1" * 5000, "+5", "-1", "0x10", "1_000", "12\u2003", "\u20031"]


@pytest.mark.parametrize("text", [*HOSTILE, " 12 ", "", "0" * 16])
def test_parse_uint_takes_ascii_digits_only(text: str) -> None:
    with pytest.raises(ValueError):
        parse_uint(text)


def test_parse_uint() -> None:
    assert parse_uint("0") == 0 and parse_uint("007") == 7 and parse_uint("9" * 15) == 10**15 - 1
    assert parse_uint("65535", max_digits=5) == 65535
    with pytest.raises(ValueError, match="at most 5 digits"):
        parse_uint("123456", max_digits=5)
    with pytest.raises(ValueError) as exc:
        parse_uint("1" * 5000)
    assert len(str(exc.value)) < 200  # never echoes the whole input


@pytest.mark.parametrize("text", [*HOSTILE, *(h + "M" for h in HOSTILE), "\u212aiB", "1" * 16 + "K", "1" * 5000 + "G"])
def test_sizes_take_ascii_digits_only(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size_kib(text)


def test_sizes_are_bounded_by_libvirts_maximum() -> None:
    assert parse_size_kib("8191T") == 8191 * 1024**3
    with pytest.raises(ValueError, match="too large"):
        parse_size_kib("999999999999999T")


@pytest.mark.parametrize("text", [h + "%" for h in HOSTILE])
def test_percent_takes_ascii_digits_only(text: str) -> None:
    with pytest.raises(ValueError):
        parse_percent(text)


@pytest.mark.parametrize(("value", "unit"), [*((h, "KiB") for h in HOSTILE), ("1", "\u212aiB"), ("1" * 21, "b")])
def test_libvirt_units_take_ascii_digits_only(value: str, unit: str) -> None:
    with pytest.raises(ValueError):
        libvirt_to_kib(value, unit)


def test_libvirt_units_tolerate_element_whitespace() -> None:
    assert libvirt_to_kib("\n  262144\n", "KiB") == 262144  # pretty-printed element text


@pytest.mark.parametrize("text", [*HOSTILE, "0-٣", "٣-4", "^²", "0,1" + ",1" * 10 + ",0x1", "123456"])
def test_cpusets_take_ascii_digits_only(text: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_cpuset(text)
    assert len(str(exc.value)) < 200
