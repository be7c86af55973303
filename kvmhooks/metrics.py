"""Prometheus metrics: what kvmhooks holds and did, for a monitoring stack, with the ``prometheus_client`` library.

Two parts, on one :class:`~prometheus_client.CollectorRegistry` (:func:`registry`):

- :class:`StateCollector` reads the shared state **at scrape time** — the ledger (a shared-lock snapshot with
  a short deadline), the host's pools from sysfs and the hook failure records — so a scrape always shows what
  ``/sys`` and the ledger say now, and nothing is cached that could go stale between one-shot processes.
  A source that cannot be read (ledger unreadable or locked, sysfs missing) never fails the scrape: the
  other sources are still shown, ``kvmhooks_ledger_readable``/``kvmhooks_topology_readable`` drop to 0,
  ``kvmhooks_collect_errors_total`` counts it, and the cause is logged once (again only when it changes).
- :class:`Metrics` holds what only a resident process can count (operation durations and failures, balloon
  adjustments, drift events, ledger repairs): the agent increments it, and it lives as long as the agent.

``prometheus_client`` is imported here and nowhere else: the hook runs on every VM start and must not pay
for it (``tests/unit/test_metrics.py`` checks). :func:`render` is the one-shot exposition for a CLI command,
:func:`write_textfile` the node_exporter textfile output (atomic: written aside, then renamed).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import queue
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    write_to_textfile,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvmhooks import operations
from kvmhooks.config import Config, parse_pool_key, pool_key
from kvmhooks.errors import KvmhooksError
from kvmhooks.ledger import DomainRecord, LedgerState
from kvmhooks.plan import pools as accounting
from kvmhooks.plan.cpus import allowed_cpus
from kvmhooks.topology import HostTopology
from kvmhooks.units import format_cpuset

log = logging.getLogger(__name__)

# A scrape waits this long at most for the ledger's shared lock (hooks hold it for milliseconds, a pool write
# for up to retry_timeout). Past it the scrape goes on without the ledger rather than hang Prometheus, whose
# default scrape timeout is 10 s; the configured lock_timeout (30 s) is for writers that must not give up.
LEDGER_TIMEOUT = 2.0

# Operation durations span a hook call (milliseconds) to a balloon landing or a pool write (tens of seconds).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0)

_KIB = 1024
# record_failure writes "YYYY-MM-DD HH:MM:SS op: message".
_FAILURE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) ([\w.-]+): ")

_POOL = ("node", "page_size_bytes")
_VM = ("vm", "uuid")


@dataclass(frozen=True)
class MetricSpec:
    """One metric family: its name, type, labels and meaning — the collector's schema and the README's table."""

    name: str
    kind: str  # gauge, counter, histogram
    labels: tuple[str, ...]
    help: str


# The families StateCollector emits, in this order, on every scrape (a family with nothing to show still
# gets its HELP/TYPE lines, so the schema does not depend on the host's state).
STATE_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("kvmhooks_up", "gauge", (), "1: the kvmhooks exporter answered this scrape"),
    MetricSpec("kvmhooks_ledger_readable", "gauge", (),
               "1: the ledger was read for this scrape; 0: unreadable or locked (per-VM and reserved series "
               "are missing or partial)"),
    MetricSpec("kvmhooks_topology_readable", "gauge", (),
               "1: the host's sysfs pools were read for this scrape; 0: they could not be"),
    MetricSpec("kvmhooks_collect_errors_total", "counter", ("source",),
               "Scrapes of this process that could not read a source: ledger, ledger_record (one VM's record), "
               "topology (sysfs) or collector (anything else)"),
    MetricSpec("kvmhooks_collect_duration_seconds", "gauge", (), "How long this scrape took to read the state"),
    MetricSpec("kvmhooks_hugepages_nr_pages", "gauge", _POOL,
               "nr_hugepages of the node's pool (persistent + surplus), from sysfs"),
    MetricSpec("kvmhooks_hugepages_free_pages", "gauge", _POOL, "free_hugepages of the node's pool, from sysfs"),
    MetricSpec("kvmhooks_hugepages_surplus_pages", "gauge", _POOL,
               "surplus_hugepages of the node's pool (overcommitted, or in use after a shrink), from sysfs"),
    MetricSpec("kvmhooks_hugepages_baseline_pages", "gauge", _POOL,
               "The admin's own size of the pool (kvmhooks keeps persistent pages = baseline + reserved)"),
    MetricSpec("kvmhooks_hugepages_reserved_pages", "gauge", _POOL,
               "Pages kvmhooks added to the pool for live reservations (the ledger's held pages)"),
    MetricSpec("kvmhooks_hugepages_promised_pages", "gauge", _POOL,
               "Pages of a left-alone pool promised to VMs whose QEMU has not mapped them yet"),
    MetricSpec("kvmhooks_hugepages_claimed_pages", "gauge", _POOL,
               "Pages claimed for VMs coming in (migrate/restore filter): counted against the node's memory, "
               "not in the pool until the VM's prepare"),
    MetricSpec("kvmhooks_hugepages_available_pages", "gauge", _POOL,
               "Pages of this size a new VM could still get on the node now, after reservations and claims: "
               "the node's free+reclaimable memory minus open claims and the host reserve, in pages of this size "
               "(a left-alone pool: its free pages not reserved by a mapping nor promised). One number per size: "
               "sizes on one node share the memory"),
    MetricSpec("kvmhooks_dedicated_cpus", "gauge", (), "Host CPUs held exclusively by kvmhooks VMs"),
    MetricSpec("kvmhooks_dedicated_cpus_free", "gauge", (),
               "Host CPUs automatic placement could still give a VM exclusively: the allowed CPUs ([cpu] allowed, "
               "else all online, minus housekeeping) not held by a VM or a claim"),
    MetricSpec("kvmhooks_claims", "gauge", (),
               "Open claims of VMs coming in (migrate/restore filter), expired ones not yet dropped included"),
    MetricSpec("kvmhooks_ledger_intents", "gauge", (),
               "Pool writes in flight (write-ahead intents); non-zero between scrapes means an interrupted write"),
    MetricSpec("kvmhooks_ledger_notes", "gauge", (), "Repairs and inconsistencies the ledger keeps (kvmhooks status)"),
    MetricSpec("kvmhooks_ledger_vms", "gauge", (), "VMs with a record in the ledger"),
    MetricSpec("kvmhooks_vm_state", "gauge", (*_VM, "state"),
               "1 per VM in the ledger, with its reservation state (claimed, preparing, prepared, starting, "
               "running, adopted; stopping: stopped, its record about to be released by the detached worker)"),
    MetricSpec("kvmhooks_vm_hugepages_pages", "gauge", (*_VM, *_POOL), "Huge pages the VM holds in the pool"),
    MetricSpec("kvmhooks_vm_hugepages_borrowed_pages", "gauge", (*_VM, *_POOL),
               "Free pages of a left-alone pool the VM uses (not added by kvmhooks)"),
    MetricSpec("kvmhooks_vm_dedicated_cpus", "gauge", _VM,
               "Host CPUs the VM holds exclusively (vCPUs, reserved siblings, isolated emulator)"),
    MetricSpec("kvmhooks_vm_dedicated_cpu", "gauge", (*_VM, "cpu"), "1 per host CPU the VM holds exclusively"),
    MetricSpec("kvmhooks_vm_shared", "gauge", _VM, "1: the VM's vCPUs float over the shared pool"),
    MetricSpec("kvmhooks_vm_vcpu_pin", "gauge", (*_VM, "vcpu", "cpuset"),
               "1 per vCPU: its planned pin (the ledger's), cpuset as a host CPU list"),
    MetricSpec("kvmhooks_vm_emulator_pin", "gauge", (*_VM, "cpuset"), "1: the planned emulator-thread pin"),
    MetricSpec("kvmhooks_vm_iothread_pin", "gauge", (*_VM, "iothread", "cpuset"), "1 per iothread: its planned pin"),
    MetricSpec("kvmhooks_vm_vcpu_pin_applied", "gauge", (*_VM, "vcpu", "cpuset"),
               "1 per vCPU: its pin as libvirt reported it after the worker applied the tuning"),
    MetricSpec("kvmhooks_vm_vcpus_online", "gauge", _VM, "Online vCPUs after the worker applied the tuning"),
    MetricSpec("kvmhooks_vm_memtune_bytes", "gauge", (*_VM, "param"),
               "memtune limit applied live (hard_limit, soft_limit, swap_hard_limit, min_guarantee), read back"),
    MetricSpec("kvmhooks_vm_balloon_target_bytes", "gauge", _VM, "Balloon target the worker set"),
    MetricSpec("kvmhooks_vm_balloon_actual_bytes", "gauge", _VM,
               "Guest memory the balloon reported last (kvmhooksd: libvirt's BALLOON_CHANGE events)"),
    MetricSpec("kvmhooks_vm_balloon_driver", "gauge", _VM,
               "1: the guest's balloon driver came up; 0: it did not (memory left alone)"),
    MetricSpec("kvmhooks_vm_worker_duration_seconds", "gauge", _VM, "How long the post-start worker took"),
    MetricSpec("kvmhooks_vm_tuning_problems", "gauge", _VM,
               "Parts of the tuning the hypervisor refused or that did not land (kvmhooks status lists them)"),
    MetricSpec("kvmhooks_vm_error", "gauge", _VM, "1: the ledger records an error for the VM"),
    MetricSpec("kvmhooks_vm_memory_bytes", "gauge", (*_VM, "node", "kind"),
               "Where the VM's QEMU process has its memory: per host NUMA node, huge or normal pages "
               "(its numa_maps, what numastat -p reads)"),
    MetricSpec("kvmhooks_vm_hook_failure", "gauge", (*_VM, "op"),
               "1: the VM's last hook/worker run failed in this operation (until its next prepare or release)"),
    MetricSpec("kvmhooks_vm_hook_failure_timestamp_seconds", "gauge", (*_VM, "op"),
               "When that failure was recorded (Unix time)"),
)

# What the resident process counts itself (:class:`Metrics`).
PROCESS_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("kvmhooks_agent_start_time_seconds", "gauge", (),
               "When the process serving these metrics started (Unix time); present only from the agent"),
    MetricSpec("kvmhooks_operation_duration_seconds", "histogram", ("op",),
               "Duration of kvmhooks operations (tune, retune, repin, balloon, reconcile, hook calls reported "
               "to the agent, ...)"),
    MetricSpec("kvmhooks_operation_failures_total", "counter", ("op",), "Operations that failed"),
    MetricSpec("kvmhooks_balloon_adjustments_total", "counter", ("vm",), "Balloon target changes made for the VM"),
    MetricSpec("kvmhooks_drift_events_total", "counter", ("vm", "kind"),
               "Hand changes to a managed VM's tuning that were found (kind: vcpupin, emulatorpin, memtune, ...)"),
    MetricSpec("kvmhooks_ledger_repairs_total", "counter", (), "Repairs made to the ledger or the pools"),
)


def metric_table() -> str:
    """The metrics as a Markdown table, so the README's list is generated from the code, not kept by hand."""
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    rows += [f"| `{m.name}` | {m.kind} | {', '.join(m.labels) or '–'} | {m.help} |"
             for m in (*STATE_METRICS, *PROCESS_METRICS)]
    return "\n".join(rows) + "\n"


# --- what is read at scrape time -----------------------------------------------------------------------------

class _Families:
    """Every family of STATE_METRICS, created up front so each scrape shows the full schema."""

    def __init__(self) -> None:
        self.by_name: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        self.arity: dict[str, int] = {}
        for m in STATE_METRICS:
            cls = CounterMetricFamily if m.kind == "counter" else GaugeMetricFamily
            self.by_name[m.name] = cls(m.name, m.help, labels=list(m.labels))
            self.arity[m.name] = len(m.labels)

    def add(self, name: str, value: float, *labels: str) -> None:
        if len(labels) != self.arity[name]:  # add_metric zips names and values: a short list would mislabel
            raise ValueError(f"{name}: {len(labels)} label values for {self.arity[name]} labels")
        self.by_name[name].add_metric(list(labels), value)

    def __iter__(self) -> Iterator[Metric]:
        return iter(self.by_name.values())


def _parse_key(key: str) -> tuple[int, int] | None:
    try:
        return parse_pool_key(key)
    except ValueError:
        return None


def _pool_labels(key: str) -> tuple[str, str]:
    node, size_kib = parse_pool_key(key)  # a record's key: a bad one makes the record count as undecodable
    return str(node), str(size_kib * _KIB)


class StateCollector(Collector):
    """Reads the ledger, the host's pools and the failure records on every ``collect()`` (one scrape).

    Thread-safe (a scrape at a time; the HTTP server may run several threads). Keeps only its error counters
    and what it last logged between scrapes.
    """

    def __init__(self, cfg: Config, ledger_timeout: float = LEDGER_TIMEOUT,
                 live_balloon: Callable[[], Mapping[str, int]] | None = None):
        self.cfg = cfg
        self.ledger_timeout = ledger_timeout
        # The agent's newest balloon figures (uuid → KiB, from libvirt's BALLOON_CHANGE events); they win
        # over the ledger's, which is written only when kvmhooks sets a target.
        self.live_balloon = live_balloon
        self._lock = threading.Lock()
        self._errors: dict[str, int] = {}
        self._logged: dict[str, str] = {}  # source → the error last logged for it

    # A failure is logged once, and again only when it changes: a broken ledger scraped every 15 s must not
    # write four lines a minute, but its repair (or a different fault) is worth a line.
    def _failed(self, source: str, e: BaseException) -> None:
        self._errors[source] = self._errors.get(source, 0) + 1
        text = str(e) or type(e).__name__
        if self._logged.get(source) != text:
            self._logged[source] = text
            log.warning("metrics: cannot read the %s: %s (the other metrics are still exposed)", source, text)

    def _ok(self, source: str) -> None:
        if self._logged.pop(source, None) is not None:
            log.info("metrics: the %s is readable again", source)

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            t0 = time.monotonic()
            fam = _Families()
            fam.add("kvmhooks_up", 1)
            state = self._read_ledger()
            topo = self._read_topology()
            names: dict[str, str] = {}
            records_ok = False
            try:
                self._pools(fam, state, topo)
                if state is not None:
                    names, records_ok = self._vms(fam, state)
                self._failures(fam, names)
            except Exception as e:  # a bug or a shape nobody foresaw: still answer, with what was added so far
                self._failed("collector", e)
            fam.add("kvmhooks_ledger_readable", int(state is not None and records_ok))
            fam.add("kvmhooks_topology_readable", int(topo is not None))
            for source in ("ledger", "ledger_record", "topology", "collector"):
                fam.add("kvmhooks_collect_errors_total", self._errors.get(source, 0), source)
            fam.add("kvmhooks_collect_duration_seconds", time.monotonic() - t0)
            return list(fam)

    def _read_ledger(self) -> LedgerState | None:
        led = operations.ledger_for(self.cfg)
        led.timeout = min(led.timeout, self.ledger_timeout)
        try:
            state = led.read()
        except (KvmhooksError, OSError) as e:  # LedgerError, LockTimeout; a lock file we may not open
            self._failed("ledger", e)
            return None
        self._ok("ledger")
        return state

    def _read_topology(self) -> HostTopology | None:
        try:
            topo = operations.topology_for(self.cfg)
        except (KvmhooksError, OSError, ValueError) as e:  # HostError: no node tree; a garbled sysfs file
            self._failed("topology", e)
            return None
        self._ok("topology")
        return topo

    def _pools(self, fam: _Families, state: LedgerState | None, topo: HostTopology | None) -> None:
        sysfs: dict[tuple[int, int], tuple[int, int, int]] = {}  # (node, KiB) → (nr, free, surplus)
        if topo is not None:
            for node in topo.nodes.values():
                for size, ps in node.pools.items():
                    sysfs[(node.id, size)] = (ps.nr, ps.free, ps.surplus)
        for (node_id, size), (nr, free, surplus) in sorted(sysfs.items()):
            labels = (str(node_id), str(size * _KIB))
            fam.add("kvmhooks_hugepages_nr_pages", nr, *labels)
            fam.add("kvmhooks_hugepages_free_pages", free, *labels)
            fam.add("kvmhooks_hugepages_surplus_pages", surplus, *labels)
        if state is None:
            return  # reserved and baseline are the ledger's: not guessed without it
        summary = state.domains.summary()
        keys = {k: _parse_key(k) for k in {*state.pools, *summary.held, *summary.promised}}
        keys.update({pool_key(n, s): (n, s) for n, s in sysfs})
        for key, where in sorted(keys.items(), key=lambda kv: kv[1] or (-1, -1)):
            if where is None:
                continue  # not a pool key this kvmhooks writes (a newer one's?): nothing to label it with
            labels = (str(where[0]), str(where[1] * _KIB))
            held = summary.held.get(key, 0)
            fam.add("kvmhooks_hugepages_reserved_pages", held, *labels)
            fam.add("kvmhooks_hugepages_promised_pages", summary.promised.get(key, 0), *labels)
            rec = state.pools.get(key)
            now = sysfs.get(where)
            if rec is not None:
                fam.add("kvmhooks_hugepages_baseline_pages", rec.baseline, *labels)
            elif now is not None:  # no record: kvmhooks has not written it, so its size now is the admin's
                fam.add("kvmhooks_hugepages_baseline_pages", max(0, now[0] - now[2] - held), *labels)
            fam.add("kvmhooks_hugepages_claimed_pages", summary.claimed.get(key, 0), *labels)
        if topo is not None:
            self._capacity(fam, state, topo)
        fam.add("kvmhooks_dedicated_cpus", sum(1 for n in summary.cpus.values() if n > 0))
        fam.add("kvmhooks_claims", len(summary.claims))
        fam.add("kvmhooks_ledger_intents", len(state.intents))
        fam.add("kvmhooks_ledger_notes", len(state.notes))
        fam.add("kvmhooks_ledger_vms", len(state.domains))

    def _capacity(self, fam: _Families, state: LedgerState, topo: HostTopology) -> None:
        """What a scheduler needs to pick a host before migrating: the same sums prepare and the filter check."""
        view = accounting.after_claims(topo, state)
        for node in sorted(view.nodes):
            for size in sorted(view.nodes[node].pools):
                key = pool_key(node, size)
                if key in self.cfg.leave_alone:
                    ps = view.nodes[node].pools[size]
                    pages = max(0, ps.free - view.resv_pages.get(size, 0) - state.promised(key))
                else:
                    pages = accounting.spare_kib(view, node, self.cfg) // size
                fam.add("kvmhooks_hugepages_available_pages", pages, str(node), str(size * _KIB))
        fam.add("kvmhooks_dedicated_cpus_free", len(allowed_cpus(topo, self.cfg) - state.dedicated_cpus()))

    def _vms(self, fam: _Families, state: LedgerState) -> tuple[dict[str, str], bool]:
        """Per-VM series; returns uuid → name for the failure records, and whether every record decoded. One
        that does not is skipped (and counted) so the others still show: the header and sums are read already."""
        names: dict[str, str] = {}
        bad: Exception | None = None
        live = self.live_balloon() if self.live_balloon is not None else {}
        stopping = operations.pending_stops(self.cfg, state)
        for uuid in state.domains:
            try:
                rec = state.domains[uuid]
                # (decodes pins and applied results: may raise too)
                rows = list(_vm_rows(uuid, rec, "stopping" if uuid in stopping else rec.state))
            except (KvmhooksError, ValueError) as e:
                bad = e
                continue
            names[uuid] = rec.name
            actual = live.get(uuid)
            for name, value, labels in rows:
                if name != "kvmhooks_vm_balloon_actual_bytes" or actual is None:
                    fam.add(name, value, *labels)
            if actual is not None:
                fam.add("kvmhooks_vm_balloon_actual_bytes", actual * _KIB, rec.name, uuid)
            for node, kinds in sorted(operations.vm_memory(self.cfg, rec.name, uuid).items()):
                for kind, kib in sorted(kinds.items()):
                    fam.add("kvmhooks_vm_memory_bytes", kib * _KIB, rec.name, uuid, str(node), kind)
        if bad is not None:
            self._failed("ledger_record", bad)
        else:
            self._ok("ledger_record")
        return names, bad is None

    def _failures(self, fam: _Families, names: dict[str, str]) -> None:
        for uuid, text in sorted(operations.read_failures(self.cfg).items()):
            m = _FAILURE.match(text)
            op = m.group(2) if m else "unknown"
            labels = (names.get(uuid, ""), uuid, op)
            fam.add("kvmhooks_vm_hook_failure", 1, *labels)
            if m:
                with contextlib.suppress(ValueError, OverflowError):
                    when = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))  # written in local time
                    fam.add("kvmhooks_vm_hook_failure_timestamp_seconds", when, *labels)


def _vm_rows(uuid: str, rec: DomainRecord, state: str) -> Iterator[tuple[str, float, tuple[str, ...]]]:
    vm = (rec.name, uuid)
    yield "kvmhooks_vm_state", 1, (*vm, state)
    for key, pages in sorted(rec.hugepages.items()):
        yield "kvmhooks_vm_hugepages_pages", pages, (*vm, *_pool_labels(key))
    for key, pages in sorted(rec.borrowed.items()):
        yield "kvmhooks_vm_hugepages_borrowed_pages", pages, (*vm, *_pool_labels(key))
    yield "kvmhooks_vm_dedicated_cpus", len(rec.cpus), vm
    for cpu in rec.cpus:
        yield "kvmhooks_vm_dedicated_cpu", 1, (*vm, str(cpu))
    yield "kvmhooks_vm_shared", int(rec.shared), vm
    if rec.pins is not None:
        for vcpu, cpus in sorted(rec.pins.vcpus.items()):
            yield "kvmhooks_vm_vcpu_pin", 1, (*vm, str(vcpu), format_cpuset(cpus))
        if rec.pins.emulator:
            yield "kvmhooks_vm_emulator_pin", 1, (*vm, format_cpuset(rec.pins.emulator))
        for iothread, cpus in sorted(rec.pins.iothreads.items()):
            yield "kvmhooks_vm_iothread_pin", 1, (*vm, str(iothread), format_cpuset(cpus))
    a = rec.applied
    for vcpu_text, cpuset in sorted(a.pins.items(), key=lambda kv: (len(kv[0]), kv[0])):
        yield "kvmhooks_vm_vcpu_pin_applied", 1, (*vm, vcpu_text, cpuset)
    if a.vcpus_live is not None:
        yield "kvmhooks_vm_vcpus_online", a.vcpus_live, vm
    for param, kib in sorted(a.memtune.items()):
        yield "kvmhooks_vm_memtune_bytes", kib * _KIB, (*vm, param)
    for part in ("target", "actual"):
        v = a.balloon.get(part)
        if isinstance(v, (int, float)) and not isinstance(v, bool):  # KiB, as libvirt and the worker count
            yield f"kvmhooks_vm_balloon_{part}_bytes", v * _KIB, vm
    driver = a.balloon.get("driver")
    if isinstance(driver, bool):
        yield "kvmhooks_vm_balloon_driver", int(driver), vm
    if a.worker_seconds is not None:
        yield "kvmhooks_vm_worker_duration_seconds", a.worker_seconds, vm
    yield "kvmhooks_vm_tuning_problems", len(a.problems), vm
    yield "kvmhooks_vm_error", int(rec.error is not None), vm


# --- what the resident process counts -------------------------------------------------------------------------

class Metrics:
    """Counters and the duration histogram the agent updates as it works, on the scrape's registry.

    Label values are free text from the caller (an operation name, a VM name); keep ``op`` and ``kind`` to a
    small fixed vocabulary, as every distinct value is a series for as long as the process lives.
    """

    def __init__(self, registry: CollectorRegistry):
        def spec(name: str) -> tuple[str, str, tuple[str, ...]]:
            s = next(m for m in PROCESS_METRICS if m.name == name)
            return s.name, s.help, s.labels

        Gauge(*spec("kvmhooks_agent_start_time_seconds"), registry=registry).set_to_current_time()
        self.durations = Histogram(*spec("kvmhooks_operation_duration_seconds"), registry=registry,
                                   buckets=DURATION_BUCKETS)
        self.failures = Counter(*spec("kvmhooks_operation_failures_total"), registry=registry)
        self.balloon_adjustments = Counter(*spec("kvmhooks_balloon_adjustments_total"), registry=registry)
        self.drift_events = Counter(*spec("kvmhooks_drift_events_total"), registry=registry)
        self.ledger_repairs = Counter(*spec("kvmhooks_ledger_repairs_total"), registry=registry)

    def observe(self, op: str, seconds: float) -> None:
        """An operation took ``seconds`` (e.g. a hook call's own timing, reported to the agent)."""
        self.durations.labels(op=op).observe(seconds)

    def failed(self, op: str) -> None:
        self.failures.labels(op=op).inc()

    @contextlib.contextmanager
    def timed(self, op: str) -> Iterator[None]:
        """Time the block as ``op``; an exception out of it also counts as a failure of ``op`` (and propagates)."""
        t0 = time.monotonic()
        try:
            yield
        except BaseException:
            self.failed(op)
            raise
        finally:
            self.observe(op, time.monotonic() - t0)

    def balloon_adjusted(self, vm: str) -> None:
        self.balloon_adjustments.labels(vm=vm).inc()

    def drift(self, vm: str, kind: str) -> None:
        self.drift_events.labels(vm=vm, kind=kind).inc()

    def ledger_repaired(self, count: int = 1) -> None:
        if count > 0:
            self.ledger_repairs.inc(count)


# --- entry points ---------------------------------------------------------------------------------------------

def registry(cfg: Config, ledger_timeout: float = LEDGER_TIMEOUT,
             live_balloon: Callable[[], Mapping[str, int]] | None = None) -> tuple[CollectorRegistry, Metrics]:
    """The agent's registry: the state read at scrape time and the process's own counters, together.

    A fresh registry rather than prometheus_client's global one, so nothing else that imports the library in
    the same process (or a second instance in a test) mixes its series into ours.
    """
    reg = CollectorRegistry()
    reg.register(StateCollector(cfg, ledger_timeout, live_balloon))
    return reg, Metrics(reg)


def state_registry(cfg: Config, ledger_timeout: float = LEDGER_TIMEOUT) -> CollectorRegistry:
    """The state alone, for one-shot use (a CLI command, cron writing a textfile): a short-lived process has no
    operation counts worth exposing, and zeros would look like an agent that never did anything."""
    reg = CollectorRegistry()
    reg.register(StateCollector(cfg, ledger_timeout))
    return reg


def render(reg: CollectorRegistry) -> bytes:
    """The Prometheus text exposition (version 0.0.4) of ``reg``; serve it with :data:`CONTENT_TYPE`."""
    return generate_latest(reg)


CONTENT_TYPE = CONTENT_TYPE_LATEST


def write_textfile(reg: CollectorRegistry, path: str | Path) -> None:
    """Write ``reg`` for node_exporter's textfile collector (``--collector.textfile.directory``).

    prometheus_client writes a temporary file beside ``path`` and renames it over, so node_exporter never
    reads half a file; its temporary name does not end in ``.prom``, so it is never collected either. If the
    exposition fails half-way, the temporary file is removed here (the library leaves it). node_exporter only
    reads files named ``*.prom``.
    """
    path = os.fspath(path)
    try:
        write_to_textfile(path, reg)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(f"{path}.{os.getpid()}.{threading.current_thread().ident}")  # the library's temporary name
        raise


# --- the agent's HTTP endpoints ---------------------------------------------------------------------------
#
# prometheus_client's own server (start_http_server: wsgiref + ThreadingMixIn) starts a thread per connection
# and never times a read out, so idle connections pin one agent thread each for as long as they stay open
# (measured: 300 idle clients, 300 threads). socketserver with a semaphore bounds the threads but not the
# harm: a few idle clients then hold every slot and the real scrape is refused. So a connection gets no thread
# until its whole request has arrived: one selector thread reads request heads without blocking, under a
# deadline and a cap on how many may wait, and a fixed pool answers complete requests with prometheus_client's
# MetricsHandler (its parsing, content negotiation and exposition), fed the head already read.

# Connections whose request has not arrived yet; one more closes the one that has waited longest of the peer
# address holding the most (a scraper sends its request within a millisecond of connecting, so an idle
# client is the one that goes, and a flood from one address evicts only its own connections).
MAX_WAITING = 64
# Waiting connections one TCP peer address may hold; its next one closes its own longest-waiting one. A
# Prometheus server scrapes a target over one connection at a time, a few scrapers behind one NAT fit. (The
# unix socket is root's alone: its peers share no address, so only MAX_WAITING applies there.)
MAX_WAITING_PER_PEER = 8
# To send the request line and headers (Prometheus sends them at once), and to take the answer (a few KiB:
# it fits the socket buffer, so only a client that stopped reading takes long). Prometheus' own default
# scrape_timeout is 10 s: an honest scraper is never cut off by these.
REQUEST_TIMEOUT = 5.0
WRITE_TIMEOUT = 5.0
# A scrape's request is a few hundred bytes; http.server's own limit per line is 64 KiB.
MAX_HEAD = 8192
# Threads that answer (the collector reads the state one scrape at a time anyway), and complete requests that
# may wait for one; past that a request is answered 503 at once.
ANSWER_THREADS = 2
MAX_QUEUED = 16
_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nRetry-After: 1\r\n"
         b"Connection: close\r\n\r\ntoo many metrics requests at once\n")


@dataclass
class _Waiting:
    deadline: float
    head: bytearray
    address: object

    @property
    def peer(self) -> object:
        """The client's host (a TCP address's first part; every unix-socket client is the same peer)."""
        return self.address[0] if isinstance(self.address, tuple) and self.address else None


def _evictee(waiting: Mapping[socket.socket, _Waiting], peer: object) -> socket.socket | None:
    """Which waiting connection a new one from ``peer`` replaces, if any: ``peer``'s own longest-waiting one
    once it holds :data:`MAX_WAITING_PER_PEER` (TCP), else, when :data:`MAX_WAITING` wait, the longest-waiting
    one of the peer holding the most (``waiting`` is in arrival order)."""
    by_peer: dict[object, list[socket.socket]] = {}
    for conn, w in waiting.items():
        by_peer.setdefault(w.peer, []).append(conn)
    own = by_peer.get(peer, [])
    if peer is not None and len(own) >= MAX_WAITING_PER_PEER:
        return own[0]
    if len(waiting) < MAX_WAITING:
        return None
    return max(by_peer.values(), key=len)[0]


class MetricsServer:
    """The agent's metrics endpoint on one listening socket (TCP or unix): bounded in threads (one selector
    plus :data:`ANSWER_THREADS`, whatever the clients do), in waiting connections (:data:`MAX_WAITING`, and
    :data:`MAX_WAITING_PER_PEER` per TCP peer address) and in time (:data:`REQUEST_TIMEOUT`, :data:`WRITE_TIMEOUT`)."""

    def __init__(self, reg: CollectorRegistry, listener: socket.socket, name: str):
        from prometheus_client import MetricsHandler

        class Handler(MetricsHandler):
            registry = reg

            def setup(self) -> None:  # the head was read by the selector; answer on the socket itself
                conn, head = self.request
                self.connection = conn
                self.rfile = io.BytesIO(head)
                self.wfile = conn.makefile("wb")

            def address_string(self) -> str:  # a unix socket's peer has no host address
                return str(self.client_address[0]) if self.client_address else "unix"

        self.handler = Handler
        self.listener = listener
        self.name = name
        self.stopped = threading.Event()
        self.queue: queue.Queue[tuple[socket.socket, bytes, object] | None] = queue.Queue(MAX_QUEUED)
        listener.setblocking(False)
        self.threads = [threading.Thread(target=self._select, name=f"{name}-select", daemon=True)]
        self.threads += [threading.Thread(target=self._answer, name=f"{name}-{i}", daemon=True)
                         for i in range(ANSWER_THREADS)]
        for t in self.threads:
            t.start()

    def close(self) -> None:
        """Stop serving (the threads end within a selector round; connections still waiting are closed)."""
        self.stopped.set()
        for _ in range(ANSWER_THREADS):
            with contextlib.suppress(queue.Full):
                self.queue.put_nowait(None)

    def _select(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        waiting: dict[socket.socket, _Waiting] = {}  # in arrival order: the first has waited longest

        def drop(conn: socket.socket) -> None:
            if waiting.pop(conn, None) is not None:
                sel.unregister(conn)
            conn.close()

        try:
            while not self.stopped.is_set():
                try:
                    self._round(sel, waiting, drop)
                except Exception:  # a bug: this round's clients may lose their answer; the endpoint stays
                    log.exception("metrics: %s: selector round failed", self.name)
                    self.stopped.wait(0.1)  # (a bug that recurs each round must not spin a core)
        finally:
            for conn in list(waiting):
                drop(conn)
            sel.close()
            self.listener.close()

    def _round(self, sel: selectors.BaseSelector, waiting: dict[socket.socket, _Waiting],
               drop: Callable[[socket.socket], None]) -> None:
        """One select(): read what arrived, then accept, then close who ran out of time. A connection is
        evicted to make room only after a last read found no whole request: one that came is answered."""
        now = time.monotonic()
        wait = min([w.deadline - now for w in waiting.values()] + [0.5])
        incoming = False
        for key, _ in sel.select(max(wait, 0.0)):
            conn = key.fileobj
            assert isinstance(conn, socket.socket)
            if conn is self.listener:
                incoming = True
            elif conn in waiting:  # (not if dealt with earlier in this round)
                self._read(conn, waiting, sel, drop)
        if incoming:
            self._accept(sel, waiting, drop)
        now = time.monotonic()
        for conn in [c for c, w in waiting.items() if w.deadline <= now]:
            log.debug("metrics: %s: no request within %g s; closed", self.name, REQUEST_TIMEOUT)
            drop(conn)

    def _read(self, conn: socket.socket, waiting: dict[socket.socket, _Waiting], sel: selectors.BaseSelector,
              drop: Callable[[socket.socket], None]) -> bool:
        """Read what ``conn`` sent; True when it left ``waiting`` (its request is whole and queued, or it went
        away or sent no scrape), False while its request is still incomplete."""
        w = waiting[conn]
        try:
            data = conn.recv(MAX_HEAD + 1 - len(w.head))
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data = b""
        w.head += data
        if b"\r\n\r\n" in w.head or b"\n\n" in w.head:
            sel.unregister(conn)
            del waiting[conn]
            self._dispatch(conn, bytes(w.head), w.address)
        elif not data or len(w.head) > MAX_HEAD:  # gone, or not a scrape
            drop(conn)
        else:
            return False
        return True

    def _accept(self, sel: selectors.BaseSelector, waiting: dict[socket.socket, _Waiting],
                drop: Callable[[socket.socket], None]) -> None:
        for _ in range(MAX_WAITING):  # then the reads get their turn, even under a flood of connects
            try:
                conn, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of descriptors (EMFILE): the waiting ones time out and free some
                log.debug("metrics: %s: accept: %s", self.name, e)
                return
            conn.setblocking(False)
            new = _Waiting(time.monotonic() + REQUEST_TIMEOUT, bytearray(), address)
            while (victim := _evictee(waiting, new.peer)) is not None:
                if not self._read(victim, waiting, sel, drop):  # its request came meanwhile: answered instead
                    drop(victim)
            waiting[conn] = new
            sel.register(conn, selectors.EVENT_READ)

    def _dispatch(self, conn: socket.socket, head: bytes, address: object) -> None:
        try:
            self.queue.put_nowait((conn, head, address))
        except queue.Full:
            with contextlib.suppress(OSError):
                conn.send(_BUSY)  # non-blocking: whatever fits (all of it, into an empty socket buffer)
            conn.close()

    def _answer(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            conn, head, address = item
            try:
                conn.settimeout(WRITE_TIMEOUT)
                self.handler((conn, head), address, None)  # type: ignore[arg-type]
            except Exception as e:  # the client went away or stopped reading: its problem, not the agent's
                log.debug("metrics: %s: answer: %s", self.name, e)
            finally:
                conn.close()


def serve_http(reg: CollectorRegistry, listen: str) -> MetricsServer:
    """Serve ``reg`` at http://HOST:PORT/metrics (the agent's ``metrics_listen``; IPv6 as ``[::1]:PORT``)."""
    host, _, port = listen.rpartition(":")
    family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]") or None, int(port),
                                                         type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    srv = socket.socket(family, kind, proto)
    try:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restarted agent binds at once
        srv.bind(address)
        srv.listen(socket.SOMAXCONN)
    except BaseException:
        srv.close()
        raise
    return MetricsServer(reg, srv, "metrics-http")


def serve_unix(reg: CollectorRegistry, path: Path) -> MetricsServer:
    """Serve ``reg`` over HTTP on the unix socket ``path`` (root only, 0600): the agent's always-on endpoint,
    which ``kvmhooks metrics`` reads (no TCP port is opened by default). The same limits as over TCP."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        srv.bind(str(path))
        srv.listen(socket.SOMAXCONN)
    except BaseException:
        srv.close()
        raise
    finally:
        os.umask(old)
    return MetricsServer(reg, srv, "metrics-unix")


def fetch_unix(path: Path, timeout: float = 2.0) -> bytes | None:
    """The exposition from the agent's unix socket, or None when no agent answers there (in time)."""
    deadline = time.monotonic() + timeout  # for the whole exchange, not each read: a slow peer cannot stall us
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            chunks = []
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                s.settimeout(left)
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
    except OSError:
        return None
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return body if head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200") else None

