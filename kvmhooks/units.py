"""The small languages of the annotation: sizes, percentages and libvirt cpusets. Pure functions."""

from __future__ import annotations

import re

# Binary multipliers in KiB. The annotation contract says a bare integer is KiB, as in libvirt.
_SIZE_UNITS_KIB = {"": 1, "k": 1, "kib": 1, "m": 1024, "mib": 1024, "g": 1024**2, "gib": 1024**2,
                   "t": 1024**3, "tib": 1024**3}
_SIZE_RE = re.compile(r"\s*(\d{1,15})\s*([A-Za-z]*)\s*")

# libvirt's own <memory unit=...> vocabulary (docs: formatdomain "Memory Allocation"), in bytes.
_LIBVIRT_UNITS_BYTES = {"b": 1, "bytes": 1, "kb": 1000, "k": 1024, "kib": 1024, "mb": 1000**2,
                        "m": 1024**2, "mib": 1024**2, "gb": 1000**3, "g": 1024**3, "gib": 1024**3,
                        "tb": 1000**4, "t": 1024**4, "tib": 1024**4}

# A cpuset naming more CPUs than this is certainly a typo (Linux's NR_CPUS maximum is 8192).
MAX_CPU_ID = 8191


def parse_size_kib(text: str) -> int:
    """Parse an annotation size ("512M", "2GiB", "1048576") into KiB.

    Units are binary only; "2GB" is refused rather than guessed, since libvirt reads GB as 10^9.

    :raise ValueError: with a reason fit for an AnnotationError.
    """
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise ValueError("expected an integer with an optional unit K, M, G or T (e.g. 512M, 2G)")
    unit = m.group(2).lower()
    if unit not in _SIZE_UNITS_KIB:
        raise ValueError(f"unknown unit {m.group(2)!r}: use K, M, G or T (binary), or KiB, MiB, GiB, TiB")
    return int(m.group(1)) * _SIZE_UNITS_KIB[unit]


def parse_percent(text: str) -> int | None:
    """Return the percentage in "75%" (1..100), None when the text is not a percentage at all."""
    t = text.strip()
    if not t.endswith("%"):
        return None
    body = t[:-1].strip()
    if not body.isdigit() or not 1 <= int(body) <= 100:
        raise ValueError("a percentage must be a whole number from 1% to 100%")
    return int(body)


def libvirt_to_kib(value: str, unit: str | None) -> int:
    """Convert a libvirt ``<memory unit=...>`` value to KiB, rounding up as libvirt does."""
    u = (unit or "KiB").lower()
    if u not in _LIBVIRT_UNITS_BYTES or not value.strip().isdigit():
        raise ValueError(f"cannot read memory {value!r} {unit!r}")
    total = int(value.strip()) * _LIBVIRT_UNITS_BYTES[u]
    return -(-total // 1024)


def format_kib(kib: int) -> str:
    """Format KiB as the largest exact binary unit ("2G", "1536M", "100K")."""
    for unit, mult in (("T", 1024**3), ("G", 1024**2), ("M", 1024)):
        if kib and kib % mult == 0:
            return f"{kib // mult}{unit}"
    return f"{kib}K"


def parse_cpuset(text: str) -> frozenset[int]:
    """Parse libvirt's cpuset syntax ("0-3,^2,8") into a set of CPU numbers.

    Exclusions apply to everything listed so far, as in libvirt's virBitmapParse.

    :raise ValueError: on syntax errors, ranges that run backwards, or an empty result.
    """
    cpus: set[int] = set()
    excluded: set[int] = set()
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise ValueError("expected a CPU list like 0-3,^2,8")
    for part in parts:
        neg = part.startswith("^")
        body = part[1:] if neg else part
        m = re.fullmatch(r"(\d{1,5})(?:-(\d{1,5}))?", body)
        if m is None:
            raise ValueError(f"bad CPU list element {part!r}: expected N, N-M or ^N")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"bad CPU range {part!r}: runs backwards")
        if hi > MAX_CPU_ID:
            raise ValueError(f"CPU {hi} is beyond any host (max {MAX_CPU_ID})")
        if neg and m.group(2) is not None:
            raise ValueError(f"bad exclusion {part!r}: exclude single CPUs (^N)")
        (excluded if neg else cpus).update(range(lo, hi + 1))
    result = cpus - excluded
    if not result:
        raise ValueError("the CPU list is empty")
    return frozenset(result)


def format_cpuset(cpus: frozenset[int] | set[int] | list[int]) -> str:
    """Format CPUs compactly ("0-3,8"), the form ``virsh vcpupin`` prints."""
    out: list[str] = []
    ordered = sorted(set(cpus))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)


def parse_node_list(text: str) -> frozenset[int]:
    """Parse a NUMA node list; same syntax as a cpuset."""
    return parse_cpuset(text)
