"""The small languages of the annotation: sizes, percentages and libvirt cpusets. Pure functions.

Numbers are ASCII digits only, and their length is checked before any conversion: Python's
``str.isdigit()``, ``int()`` and regex ``\\d`` also take '²', Arabic-Indic '٣', fullwidth '１', '+5' and
'1_000', and ``int()`` of more than 4300 digits raises a ValueError of its own from deep inside. Whitespace
tolerated around a value is ASCII whitespace only (``str.strip()`` would also eat U+2003 and friends).
"""

from __future__ import annotations

import re

# What XML may legitimately put around a value (pretty-printed element text). Not str.strip()'s Unicode set.
ASCII_WS = " \t\r\n"
_DIGITS_RE = re.compile(r"[0-9]+")
# Annotation numbers: 15 digits is far beyond any real size in KiB or any count, and far below int()'s limit.
MAX_DIGITS = 15

# Binary multipliers in KiB. The annotation contract says a bare integer is KiB, as in libvirt.
_SIZE_UNITS_KIB = {"": 1, "k": 1, "kib": 1, "m": 1024, "mib": 1024, "g": 1024**2, "gib": 1024**2,
                   "t": 1024**3, "tib": 1024**3}
_SIZE_RE = re.compile(r"[ \t\r\n]*([0-9]+)[ \t\r\n]*([A-Za-z]*)[ \t\r\n]*")
# Longer than any honest size ("1048576 KiB" and some spaces); checked before the regex even runs.
_MAX_SIZE_TEXT = 40
# libvirt's ceiling for every memory value in KiB (VIR_DOMAIN_MEMORY_PARAM_UNLIMITED, 2^53 - 1): a bigger
# size could never be applied and would overflow libvirt's unsigned long long in bytes.
MAX_SIZE_KIB = 2**53 - 1
# libvirt writes memory as an unsigned long long (at most 20 digits) in any of its units.
_LIBVIRT_MAX_DIGITS = 20

# libvirt's own <memory unit=...> vocabulary (docs: formatdomain "Memory Allocation"), in bytes.
_LIBVIRT_UNITS_BYTES = {"b": 1, "bytes": 1, "kb": 1000, "k": 1024, "kib": 1024, "mb": 1000**2,
                        "m": 1024**2, "mib": 1024**2, "gb": 1000**3, "g": 1024**3, "gib": 1024**3,
                        "tb": 1000**4, "t": 1024**4, "tib": 1024**4}

# A cpuset naming more CPUs than this is certainly a typo (Linux's NR_CPUS maximum is 8192).
MAX_CPU_ID = 8191
_CPU_RANGE_RE = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")


def clip(text: str, limit: int = 32) -> str:
    """``repr`` of text cut to ``limit`` characters, for error messages about input of any length."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"… ({len(text)} characters)"


def parse_uint(text: str, max_digits: int = MAX_DIGITS) -> int:
    """Parse a plain decimal number: 1 to ``max_digits`` ASCII digits, nothing else (no sign, no spaces).

    :raise ValueError: with a reason fit for an AnnotationError or XMLInputError (never the whole input).
    """
    if not _DIGITS_RE.fullmatch(text):
        raise ValueError(f"expected a whole number (digits 0-9, at most {max_digits} of them), got {clip(text)}")
    if len(text) > max_digits:  # before int(): bounded work, and never int()'s own digit-limit error
        raise ValueError(f"too long: at most {max_digits} digits")
    return int(text)


def parse_size_kib(text: str) -> int:
    """Parse an annotation size ("512M", "2GiB", "1048576") into KiB.

    Units are binary only; "2GB" is refused rather than guessed, since libvirt reads GB as 10^9.

    :raise ValueError: with a reason fit for an AnnotationError.
    """
    m = _SIZE_RE.fullmatch(text) if len(text) <= _MAX_SIZE_TEXT else None
    if m is None:
        raise ValueError("expected an integer with an optional unit K, M, G or T (e.g. 512M, 2G)")
    unit = m.group(2).lower()
    if unit not in _SIZE_UNITS_KIB:
        raise ValueError(f"unknown unit {m.group(2)!r}: use K, M, G or T (binary), or KiB, MiB, GiB, TiB")
    kib = parse_uint(m.group(1)) * _SIZE_UNITS_KIB[unit]
    if kib > MAX_SIZE_KIB:
        raise ValueError(f"too large: libvirt's maximum is {MAX_SIZE_KIB} KiB")
    return kib


def parse_percent(text: str) -> int | None:
    """Return the percentage in "75%" (1..100), None when the text is not a percentage at all."""
    t = text.strip(ASCII_WS)
    if not t.endswith("%"):
        return None
    body = t[:-1].strip(ASCII_WS)
    if not body or len(body) > 3 or not _DIGITS_RE.fullmatch(body) or not 1 <= int(body) <= 100:
        raise ValueError("a percentage must be a whole number from 1% to 100%")
    return int(body)


def libvirt_to_kib(value: str, unit: str | None) -> int:
    """Convert a libvirt ``<memory unit=...>`` value to KiB, rounding up as libvirt does.

    The value may carry ASCII whitespace (pretty-printed element text); the unit must be ASCII (``lower()``
    would turn the Kelvin sign into 'k').
    """
    raw = unit or "KiB"
    u = raw.lower()
    if not raw.isascii() or u not in _LIBVIRT_UNITS_BYTES:
        raise ValueError(f"unknown unit {clip(raw)}")
    try:
        number = parse_uint(value.strip(ASCII_WS), _LIBVIRT_MAX_DIGITS)
    except ValueError as e:
        raise ValueError(f"cannot read the value: {e}") from None
    return -(-(number * _LIBVIRT_UNITS_BYTES[u]) // 1024)


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
    parts = [p.strip(ASCII_WS) for p in text.split(",")]
    if not text.strip(ASCII_WS) or any(not p for p in parts):
        raise ValueError("expected a CPU list like 0-3,^2,8")
    for part in parts:
        neg = part.startswith("^")
        body = part[1:] if neg else part
        m = _CPU_RANGE_RE.fullmatch(body)
        if m is None:
            raise ValueError(f"bad CPU list element {clip(part)}: expected N, N-M or ^N (digits 0-9)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"bad CPU range {clip(part)}: runs backwards")
        if hi > MAX_CPU_ID:
            raise ValueError(f"CPU {hi} is beyond any host (max {MAX_CPU_ID})")
        if neg and m.group(2) is not None:
            raise ValueError(f"bad exclusion {clip(part)}: exclude single CPUs (^N)")
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
