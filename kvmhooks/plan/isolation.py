"""Host isolation as data: which CPUs the host must stay off, and what each host setting should read.

A VM with ``<kvm:host>`` and dedicated CPUs asks for the host to be kept off those CPUs while it runs. The
isolated set is the union over every VM holding such a request (:func:`target_for`); every host setting
kvmhooks touches for it is one *key* with a string value, read and written whole:

==================  ==========================================================  ==========================
key                 host setting                                                format
==================  ==========================================================  ==========================
``irq:N``           /proc/irq/N/smp_affinity_list                               CPU list ("0-3,6")
``irq:default``     /proc/irq/default_smp_affinity                              hex mask ("ff,ffffffff")
``workqueue``       /sys/devices/virtual/workqueue/cpumask                      hex mask
``governor:N``      /sys/devices/system/cpu/cpuN/cpufreq/scaling_governor       a name
``unit:U``          systemd's runtime ``AllowedCPUs=`` of system.slice and co.  "0-1 3", "" = all
``subtree:cpuset``  "+cpuset" in the cgroup v2 root's cgroup.subtree_control    "on" / "off"
``tasks``           kvmhooks' own host cpuset (cgroup v1/v2) holding host tasks  CPU list, "" = none
==================  ==========================================================  ==========================

Every value is a pure function of the admin's original and the target (:func:`desired`), so an empty target
means "every key back to its original" and several VMs can come and go in any order. What was changed and
what the admin had before lives in :class:`IsolationState`, stored in the ledger; :func:`settle` reads a key
found after a crash or an admin's edit, :func:`changes` and :func:`forgettable` decide the rest. No I/O here:
:mod:`kvmhooks.apply.isolation` reads and writes, and runs the crash-safe loop.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kvmhooks.annotation import HostSpec
from kvmhooks.errors import LedgerError
from kvmhooks.units import ASCII_WS, MAX_CPU_ID, format_cpuset, parse_cpuset

TASKS = "tasks"
SUBTREE = "subtree:cpuset"
WORKQUEUE = "workqueue"
IRQ_DEFAULT = "irq:default"
IRQ_PREFIX = "irq:"
GOVERNOR_PREFIX = "governor:"
UNIT_PREFIX = "unit:"
# What ``tasks`` reads when kvmhooks' host cpuset exists but holds no CPUs yet (a crash between its mkdir and
# its first cpuset.cpus write): neither "shielded" nor "not shielded", so the next write finishes or undoes it.
INCOMPLETE = "incomplete"
# Keys kvmhooks owns outright: their original is always "not there", whatever they read when first seen
# (a shield left by a lost ledger must not become the "original"), and an edit of them is not the admin's.
OWNED = frozenset({TASKS})

# What separates the ranges of a CPU list: the kernel's comma, or systemd's spaces (ASCII whitespace only).
_LIST_SEP_RE = re.compile(r"[ \t\r\n,]+")
# A 32-bit group of a kernel cpumask ("%*pb"), and how many of them NR_CPUS allows.
_MASK_GROUP_RE = re.compile(r"[0-9a-fA-F]{1,8}")
_MAX_MASK_GROUPS = (MAX_CPU_ID + 1) // 32
# Ledger sanity bounds: a key is short ("governor:8191"), a value at most a full mask or CPU list.
_MAX_KEY = 64
_MAX_VALUE = 4096


def parse_mask(text: str) -> frozenset[int]:
    """Parse a kernel hex cpumask ("3", "ff,ffffffff": comma-separated 32-bit groups, most significant first).

    :raise ValueError: on anything else.
    """
    groups = text.strip(ASCII_WS).split(",")
    if len(groups) > _MAX_MASK_GROUPS or not all(_MASK_GROUP_RE.fullmatch(g) for g in groups):
        raise ValueError(f"expected a hex CPU mask like ff,ffffffff, got {text[:40]!r}")
    value = int("".join(g.rjust(8, "0") for g in groups), 16)
    return frozenset(i for i in range(value.bit_length()) if value >> i & 1)


def format_mask(cpus: Iterable[int], like: str = "") -> str:
    """Format CPUs as a hex cpumask shaped like ``like`` (the value it replaces), as the kernel prints it.

    The kernel pads to ``nr_cpu_ids`` bits ("00,ffffffff" on a 40-CPU host); keeping the shape of the value
    read makes our write read back byte for byte, so a read-back never looks like somebody else's change.
    """
    ordered = sorted(set(cpus))
    value = sum(1 << c for c in ordered)
    shape = like.strip(ASCII_WS).split(",") if like.strip(ASCII_WS) else ["0"]
    n = max(len(shape), ordered[-1] // 32 + 1 if ordered else 1)
    chunks = [(value >> (32 * i)) & 0xFFFFFFFF for i in reversed(range(n))]
    width = len(shape[0]) if n == len(shape) else 1
    return ",".join([f"{chunks[0]:0{width}x}"] + [f"{c:08x}" for c in chunks[1:]])


def parse_list(text: str) -> frozenset[int]:
    """A CPU list as the kernel prints it ("0-1,3") or as systemd does: ``systemctl show -p AllowedCPUs``
    joins ranges with spaces ("0-1 3", cpu_set_to_range_string() in systemd's cpu-set-util.c), and
    set-property takes spaces and commas alike. "" is the empty set (systemd: "all", kvmhooks' shield:
    "none"). Values read back are compared as sets through this, never as strings.

    :raise ValueError: on anything else.
    """
    words = [w for w in _LIST_SEP_RE.split(text) if w]
    return parse_cpuset(",".join(words)) if words else frozenset()


def kind(key: str) -> str:
    """The family of a key: "irq", "irqmask", "workqueue", "governor", "unit", "subtree", "tasks" or ""."""
    if key == IRQ_DEFAULT:
        return "irqmask"
    if key.startswith(IRQ_PREFIX):
        return "irq"
    if key.startswith(GOVERNOR_PREFIX):
        return "governor"
    if key.startswith(UNIT_PREFIX):
        return "unit"
    return {WORKQUEUE: "workqueue", SUBTREE: "subtree", TASKS: "tasks"}.get(key, "")


def key_cpu(key: str) -> int | None:
    """The number in ``irq:N`` / ``governor:N`` (None for other keys or a malformed one)."""
    tail = key.partition(":")[2]
    return int(tail) if tail.isascii() and tail.isdecimal() and len(tail) <= 5 else None


def same_list(a: str, b: str) -> bool:
    """Whether two CPU (or node) lists name the same set; two values that are not lists, the same text."""
    try:
        return parse_list(a) == parse_list(b)
    except ValueError:
        return a.strip(ASCII_WS) == b.strip(ASCII_WS)


def equivalent(key: str, a: str, b: str) -> bool:
    """Whether two values of a key mean the same: CPU sets are compared as sets, since the kernel and systemd
    print a set otherwise than it was written ("0-1,3" reads back "0-1 3" from systemd); governors and the
    controller switch as text."""
    k = kind(key)
    if k in ("irq", "unit", "tasks"):
        return same_list(a, b)
    if k in ("irqmask", "workqueue"):
        with contextlib.suppress(ValueError):
            return parse_mask(a) == parse_mask(b)
    return a.strip(ASCII_WS) == b.strip(ASCII_WS)


@dataclass(frozen=True)
class IsolationTarget:
    """What the running VMs ask for together: CPUs to keep host tasks and kernel work queues off (``tasks``),
    CPUs to keep movable IRQs off (``irqs``), and cpufreq governors for some of them."""

    tasks: frozenset[int] = frozenset()
    irqs: frozenset[int] = frozenset()
    governors: Mapping[int, str] = field(default_factory=dict, hash=False)

    @property
    def cpus(self) -> frozenset[int]:
        """Every CPU isolation is about, for status."""
        return self.tasks | self.irqs | frozenset(self.governors)

    @property
    def empty(self) -> bool:
        """Nothing isolated: every key goes back to its original."""
        return not self.cpus


def target_for(holders: Iterable[tuple[Iterable[int], HostSpec]]) -> IsolationTarget:
    """The union of every holder's request: ``(dedicated CPUs, <kvm:host>)`` per VM holding one.

    Dedicated CPUs are exclusive, so two VMs never ask a governor for the same CPU; if a corrupt ledger said
    otherwise, the name that sorts first wins, so the answer does not depend on the order of the VMs.
    """
    tasks: set[int] = set()
    irqs: set[int] = set()
    governors: dict[int, str] = {}
    for cpus, spec in holders:
        cpu_set = frozenset(cpus)
        if spec.isolate:
            tasks |= cpu_set
        if spec.irqs:
            irqs |= cpu_set
        if spec.governor is not None:
            for cpu in cpu_set:
                governors[cpu] = min(governors.get(cpu, spec.governor), spec.governor)
    return IsolationTarget(frozenset(tasks), frozenset(irqs), dict(sorted(governors.items())))


def _minus(original: frozenset[int], isolated: frozenset[int], online: frozenset[int]) -> frozenset[int]:
    """Original minus the isolated CPUs; if that leaves nothing, every online CPU minus them (may be empty)."""
    return (original - isolated) or (online - isolated)


def desired(key: str, original: str, target: IsolationTarget, online: frozenset[int]) -> str:
    """The value ``key`` should have under ``target``, given the admin's ``original``.

    The original itself whenever the target does not concern the key's kind (so an empty target restores
    everything), when the result would mean the same as the original (so nothing is rewritten in another
    spelling), when isolation would leave no CPU at all (never write an empty affinity), or when the original
    cannot be read as its kind (a value we do not understand is left alone).
    """
    k = kind(key)
    try:
        if k == "irq" and target.irqs:
            cpus = _minus(parse_list(original), target.irqs, online)
            return format_cpuset(cpus) if cpus and cpus != parse_list(original) else original
        if (k == "irqmask" and target.irqs) or (k == "workqueue" and target.tasks):
            isolated = target.irqs if k == "irqmask" else target.tasks
            cpus = _minus(parse_mask(original), isolated, online)
            return format_mask(cpus, original) if cpus and cpus != parse_mask(original) else original
        if k == "unit" and target.tasks:
            cpus = _minus(parse_list(original) or online, target.tasks, online)
            return format_cpuset(cpus) if cpus and cpus != (parse_list(original) or online) else original
    except ValueError:
        return original
    if k == "tasks" and target.tasks:
        cpus = online - target.tasks
        return format_cpuset(cpus) if cpus else original
    if k == "subtree" and target.tasks:
        return "on"
    if k == "governor":
        cpu = key_cpu(key)
        return target.governors.get(cpu, original) if cpu is not None else original
    return original


def order(key: str) -> tuple[int, int, str]:
    """Apply order: the cgroup controller before the cpuset that needs it, tasks before the rest, IRQs by
    number. Restores run in the reverse order (the cpuset is gone before its controller is disabled)."""
    rank = {"subtree": 0, "tasks": 1, "unit": 2, "workqueue": 3, "irqmask": 4, "irq": 5, "governor": 6}
    cpu = key_cpu(key)
    return rank.get(kind(key), 7), -1 if cpu is None else cpu, key


def _str_map(data: object, what: str) -> dict[str, str]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LedgerError(f"{what}: expected an object, got {type(data).__name__}")
    for k, v in data.items():
        if not isinstance(k, str) or not k or len(k) > _MAX_KEY:
            raise LedgerError(f"{what}: bad key {str(k)[:_MAX_KEY]!r}")
        if not isinstance(v, str) or len(v) > _MAX_VALUE:
            raise LedgerError(f"{what}[{k!r}]: expected a string, got {str(v)[:40]!r}")
    return dict(data)


@dataclass
class IsolationState:
    """The isolation part of the ledger: what kvmhooks changed on the host and what was there before.

    ``saved`` holds the admin's original of every key kvmhooks changed (committed before its first write);
    ``pending`` the write-ahead intents (committed before the write, cleared in the commit after it);
    ``wrote`` what each key read back after kvmhooks' last write, which tells our value from an admin's edit;
    ``unmovable`` the keys the kernel refused (not retried while isolation lasts); ``skipped_tasks`` how many
    tasks the last move skipped; ``isolated`` the CPUs last isolated (for status).
    """

    saved: dict[str, str] = field(default_factory=dict)
    pending: dict[str, str] = field(default_factory=dict)
    wrote: dict[str, str] = field(default_factory=dict)
    unmovable: list[str] = field(default_factory=list)
    skipped_tasks: int = 0
    isolated: list[int] = field(default_factory=list)
    # The IRQs there were when the default IRQ mask became ours: one requested later got our mask, and goes
    # back to the admin's default with it; one that was there keeps whatever it had (it may be the same).
    irqs_before: list[int] = field(default_factory=list)
    # systemd units whose runtime drop-in (systemctl set-property --runtime) kvmhooks created: removed with
    # the restore, so it does not outlive the isolation and mask the admin's own settings in /etc.
    dropins: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """Nothing changed on the host and nothing to report: the ledger may drop the whole section."""
        return not (self.saved or self.pending or self.wrote or self.unmovable or self.skipped_tasks
                    or self.isolated or self.irqs_before or self.dropins)

    def forget(self, key: str) -> None:
        """Drop every trace of ``key`` (restored, or vanished from the host)."""
        self.saved.pop(key, None)
        self.pending.pop(key, None)
        self.wrote.pop(key, None)
        if key in self.unmovable:
            self.unmovable.remove(key)

    def to_json(self) -> dict[str, Any]:
        return {"saved": dict(sorted(self.saved.items())), "pending": dict(sorted(self.pending.items())),
                "wrote": dict(sorted(self.wrote.items())), "unmovable": list(self.unmovable),
                "skipped_tasks": self.skipped_tasks, "isolated": sorted(self.isolated),
                "irqs_before": sorted(self.irqs_before), "dropins": sorted(self.dropins)}

    @classmethod
    def from_json(cls, data: object, what: str = "isolation") -> IsolationState:
        """Read the ledger's section tolerantly: missing fields (or a missing section) take their defaults,
        unknown ones are ignored, anything of the wrong shape raises :class:`LedgerError`."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise LedgerError(f"{what}: expected an object, got {type(data).__name__}")
        unmovable = data.get("unmovable") or []
        if not isinstance(unmovable, list) or not all(isinstance(k, str) and 0 < len(k) <= _MAX_KEY
                                                      for k in unmovable):
            raise LedgerError(f"{what}.unmovable: expected a list of keys")
        skipped = data.get("skipped_tasks") or 0
        if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
            raise LedgerError(f"{what}.skipped_tasks: expected a count, got {skipped!r}")
        isolated = data.get("isolated") or []
        if not isinstance(isolated, list) or not all(
                isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= MAX_CPU_ID for c in isolated):
            raise LedgerError(f"{what}.isolated: expected a list of CPU numbers")
        before = data.get("irqs_before") or []
        if not isinstance(before, list) or not all(
                isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 1 << 20 for n in before):
            raise LedgerError(f"{what}.irqs_before: expected a list of IRQ numbers")
        dropins = data.get("dropins") or []
        if not isinstance(dropins, list) or not all(isinstance(k, str) and kind(k) == "unit" for k in dropins):
            raise LedgerError(f"{what}.dropins: expected a list of unit keys")
        return cls(_str_map(data.get("saved"), f"{what}.saved"), _str_map(data.get("pending"), f"{what}.pending"),
                   _str_map(data.get("wrote"), f"{what}.wrote"), list(unmovable), skipped, sorted(set(isolated)),
                   sorted(set(before)), sorted(set(dropins)))


def original_of(key: str, current: str, state: IsolationState | None = None) -> str:
    """The original to save for a key seen for the first time: what it reads, except for keys we own, and
    except an IRQ requested while the default IRQ mask was ours: it got our mask, its original is the
    admin's default."""
    if key in OWNED:
        return ""
    if state is not None and kind(key) == "irq" and IRQ_DEFAULT in state.saved and IRQ_DEFAULT in state.wrote \
            and key_cpu(key) not in state.irqs_before:
        try:
            if parse_list(current) == parse_mask(state.wrote[IRQ_DEFAULT]):
                return format_cpuset(parse_mask(state.saved[IRQ_DEFAULT]))
        except ValueError:
            pass
    return current


def admin_changed(state: IsolationState, key: str, current: str) -> bool:
    """Whether ``key`` reads something kvmhooks neither wrote nor was about to write, nor its original: then
    somebody else (the admin, a tool) changed it while it was isolated. Keys kvmhooks owns never are."""
    if key in OWNED or key not in state.saved:
        return False
    ours = [state.saved[key]] + [v for v in (state.pending.get(key), state.wrote.get(key)) if v is not None]
    return not any(equivalent(key, current, v) for v in ours)


def settle(state: IsolationState, key: str, current: str) -> str | None:
    """Bring ``state`` in line with what ``key`` really reads, before anything is decided from it.

    A pending intent left by a crash is resolved by what the key reads: the intended value (written: keep it
    as ours), our previous value or the original (never written: drop the intent), or anything else (the
    admin's). A key the admin changed takes their value as its new original, so their change survives the
    restore instead of being overwritten by a stale one. Returns a line for the log when that happens.
    """
    pending = state.pending.get(key)
    if pending is not None:
        if equivalent(key, current, pending):
            state.wrote[key] = current
            del state.pending[key]
            return None
        if key in state.wrote and equivalent(key, current, state.wrote[key]):
            del state.pending[key]
            return None
        if key in state.saved and equivalent(key, current, state.saved[key]):
            del state.pending[key]
            state.wrote.pop(key, None)
            return None
        del state.pending[key]
        if key in OWNED:
            state.wrote.pop(key, None)  # half done: the next write finishes or undoes it
            return None
    if admin_changed(state, key, current):
        before = state.saved[key]
        state.saved[key] = current
        state.wrote.pop(key, None)
        return f"{key} was changed from outside kvmhooks while isolated ({before!r} → {current!r}): kept as " \
               "the value to restore"
    if key in state.wrote and key in state.saved and equivalent(key, current, state.saved[key]) \
            and not equivalent(key, current, state.wrote[key]):
        state.wrote.pop(key)  # back at its original (put back by hand): nothing of ours there any more
    return None


def changes(state: IsolationState, current: Mapping[str, str], target: IsolationTarget,
            online: frozenset[int]) -> dict[str, str]:
    """Keys to write and their values: every key whose desired value differs from what it reads.

    A key the kernel refused once is not tried again while isolation lasts, unless it holds a value of ours
    (then it must still be put back).
    """
    out: dict[str, str] = {}
    for key, value in current.items():
        if key in state.unmovable and key not in state.wrote:
            continue
        want = desired(key, state.saved.get(key, original_of(key, value, state)), target, online)
        if not equivalent(key, value, want):
            out[key] = want
    return out


def is_restore(state: IsolationState, key: str, value: str) -> bool:
    """Whether writing ``value`` puts ``key`` back to its original (those run last, in reverse order)."""
    return key in state.saved and equivalent(key, value, state.saved[key])


def forgettable(state: IsolationState, current: Mapping[str, str], target: IsolationTarget,
                online: frozenset[int]) -> list[str]:
    """Keys back at their original that the target no longer changes: nothing left to restore for them."""
    out = []
    for key, original in state.saved.items():
        if key in state.pending or key not in current:
            continue
        if equivalent(key, current[key], original) and equivalent(key, desired(key, original, target, online),
                                                                   original):
            out.append(key)
    return out
