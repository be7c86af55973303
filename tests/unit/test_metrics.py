"""Prometheus metrics: a scrape says what the fake /sys and the ledger say, and never fails."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from kvmhooks import metrics, operations
from kvmhooks.config import Config
from kvmhooks.domain import parse_domain
from kvmhooks.ledger import Applied
from kvmhooks.units import format_cpuset
from tests.fakehost import FakeHost, FakeKernel, domain_xml

HUGE = "11111111-2222-3333-4444-000000000001"
CPUS = "11111111-2222-3333-4444-000000000002"
P2M = str(2 * 1024 * 1024)
P1G = str(1024 * 1024 * 1024)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: bytes) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def scrape(reg: CollectorRegistry) -> Samples:
    return parse(metrics.render(reg))


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for n, labels in samples if n == name]


def sysfs(host: FakeHost, node: int, size: int, what: str) -> int:
    return int((host.sysfs / f"devices/system/node/node{node}/hugepages/hugepages-{size}kB/{what}_hugepages")
               .read_text())


@pytest.fixture
def two_vms(numa_host: FakeHost) -> tuple[FakeHost, Config]:
    """An admin pool of 10 2M pages on node 0, then a 256 MiB 2M-hugepage VM there and a dedicated-CPU VM."""
    numa_host.set_pool(0, 2048, 10)
    cfg = numa_host.config()
    pools = FakeKernel(numa_host).install()
    operations.prepare(parse_domain(domain_xml(name="huge", uuid=HUGE, memory_kib=256 * 1024,
                                               tuning='<kvm:hugepages size="2M" nodes="0"/>')), cfg, pools)
    operations.prepare(parse_domain(domain_xml(name="cpus", uuid=CPUS, tuning='<kvm:cpu policy="dedicated"/>',
                                               vcpus=2, backing="")), cfg, pools)
    return numa_host, cfg


def test_scrape_matches_sysfs_and_the_ledger(two_vms: tuple[FakeHost, Config]) -> None:
    host, cfg = two_vms
    s = scrape(metrics.state_registry(cfg))
    state = operations.ledger_for(cfg).read()
    assert get(s, "kvmhooks_up") == 1
    assert get(s, "kvmhooks_ledger_readable") == 1 and get(s, "kvmhooks_topology_readable") == 1
    for source in ("ledger", "ledger_record", "topology", "collector"):
        assert get(s, "kvmhooks_collect_errors_total", source=source) == 0

    # Every pool of every node, straight from the fake sysfs files.
    for node in (0, 1):
        for size, label in ((2048, P2M), (1048576, P1G)):
            pool = {"node": str(node), "page_size_bytes": label}
            for what in ("nr", "free", "surplus"):
                assert get(s, f"kvmhooks_hugepages_{what}_pages", **pool) == sysfs(host, node, size, what)
            key = f"node{node}/{size}kB"
            assert get(s, "kvmhooks_hugepages_reserved_pages", **pool) == state.reserved(key)
    n0 = {"node": "0", "page_size_bytes": P2M}
    assert get(s, "kvmhooks_hugepages_reserved_pages", **n0) == 128
    assert get(s, "kvmhooks_hugepages_baseline_pages", **n0) == state.pools["node0/2048kB"].baseline == 10
    assert get(s, "kvmhooks_hugepages_nr_pages", **n0) == host.pool(0) == 138
    assert get(s, "kvmhooks_hugepages_baseline_pages", node="1", page_size_bytes=P2M) == 0

    # Per VM: pages, dedicated CPUs, planned pins.
    huge = {"vm": "huge", "uuid": HUGE}
    assert get(s, "kvmhooks_vm_hugepages_pages", **huge, **n0) == state.domains[HUGE].hugepages["node0/2048kB"]
    assert series(s, "kvmhooks_vm_hugepages_pages") == [{**huge, **n0}]
    assert get(s, "kvmhooks_vm_dedicated_cpus", **huge) == 0
    rec = state.domains[CPUS]
    cpus = {"vm": "cpus", "uuid": CPUS}
    assert len(rec.cpus) == 2
    assert get(s, "kvmhooks_vm_dedicated_cpus", **cpus) == 2
    assert sorted(int(x["cpu"]) for x in series(s, "kvmhooks_vm_dedicated_cpu")) == rec.cpus
    assert get(s, "kvmhooks_dedicated_cpus") == 2
    assert rec.pins is not None
    pins = {x["vcpu"]: x["cpuset"] for x in series(s, "kvmhooks_vm_vcpu_pin") if x["uuid"] == CPUS}
    assert pins == {str(v): format_cpuset(c) for v, c in rec.pins.vcpus.items()} and len(pins) == 2
    assert get(s, "kvmhooks_vm_state", **cpus, state="prepared") == 1
    assert get(s, "kvmhooks_ledger_vms") == 2 and get(s, "kvmhooks_ledger_intents") == 0


def test_worker_results_balloon_and_failures(two_vms: tuple[FakeHost, Config]) -> None:
    _, cfg = two_vms
    operations.mark(HUGE, cfg, state="running", applied=Applied(
        vcpus_live=1, pins={"0": "2", "1": "3"}, memtune={"hard_limit": 524288, "soft_limit": 262144},
        balloon={"transport": "qmp", "driver": True, "target": 196608, "actual": 196612}, worker_seconds=0.25,
        problems=["memtune min_guarantee refused by the hypervisor: no"]))
    operations.record_failure(cfg, CPUS, "started", "VM 'cpus': something broke")
    s = scrape(metrics.state_registry(cfg))
    vm = {"vm": "huge", "uuid": HUGE}
    assert get(s, "kvmhooks_vm_vcpus_online", **vm) == 1
    assert get(s, "kvmhooks_vm_memtune_bytes", **vm, param="hard_limit") == 512 * 1024 * 1024
    assert get(s, "kvmhooks_vm_memtune_bytes", **vm, param="soft_limit") == 256 * 1024 * 1024
    assert get(s, "kvmhooks_vm_balloon_target_bytes", **vm) == 196608 * 1024
    assert get(s, "kvmhooks_vm_balloon_actual_bytes", **vm) == 196612 * 1024
    assert get(s, "kvmhooks_vm_balloon_driver", **vm) == 1
    assert get(s, "kvmhooks_vm_worker_duration_seconds", **vm) == 0.25
    assert get(s, "kvmhooks_vm_tuning_problems", **vm) == 1
    assert get(s, "kvmhooks_vm_vcpu_pin_applied", **vm, vcpu="1", cpuset="3") == 1
    assert get(s, "kvmhooks_vm_state", **vm, state="running") == 1
    assert series(s, "kvmhooks_vm_balloon_target_bytes") == [vm]  # the other VM has no balloon
    failed = {"vm": "cpus", "uuid": CPUS, "op": "started"}
    assert get(s, "kvmhooks_vm_hook_failure", **failed) == 1
    assert get(s, "kvmhooks_vm_hook_failure_timestamp_seconds", **failed) > 1e9


def test_an_unreadable_ledger_still_scrapes_and_is_logged_once(two_vms: tuple[FakeHost, Config],
                                                               caplog: pytest.LogCaptureFixture) -> None:
    host, cfg = two_vms
    cfg.ledger_path.write_text("{not json")
    reg = metrics.state_registry(cfg)
    with caplog.at_level(logging.WARNING, logger="kvmhooks.metrics"):
        s = scrape(reg)
        scrape(reg)
        s = scrape(reg)
    assert get(s, "kvmhooks_up") == 1 and get(s, "kvmhooks_ledger_readable") == 0
    assert get(s, "kvmhooks_collect_errors_total", source="ledger") == 3
    assert get(s, "kvmhooks_hugepages_nr_pages", node="0", page_size_bytes=P2M) == host.pool(0)  # sysfs still
    assert not series(s, "kvmhooks_hugepages_reserved_pages") and not series(s, "kvmhooks_vm_state")
    assert len([r for r in caplog.records if "cannot read the ledger" in r.getMessage()]) == 1  # of 3 scrapes


def test_one_bad_record_hides_only_that_vm(two_vms: tuple[FakeHost, Config]) -> None:
    _, cfg = two_vms
    lines = cfg.ledger_path.read_text().splitlines()
    lines = [ln.replace('"cpus":[', '"cpus":"x","was":[') if ln.startswith(f'{{"uuid":"{CPUS}"') else ln
             for ln in lines]
    cfg.ledger_path.write_text("\n".join(lines) + "\n")
    s = scrape(metrics.state_registry(cfg))
    assert get(s, "kvmhooks_ledger_readable") == 0
    assert get(s, "kvmhooks_collect_errors_total", source="ledger_record") == 1
    assert [x["vm"] for x in series(s, "kvmhooks_vm_state")] == ["huge"]
    assert get(s, "kvmhooks_hugepages_reserved_pages", node="0", page_size_bytes=P2M) == 128  # the header's sums


def test_a_locked_ledger_and_a_missing_sysfs_do_not_fail_the_scrape(two_vms: tuple[FakeHost, Config],
                                                                   tmp_path: Path) -> None:
    _, cfg = two_vms
    reg = metrics.state_registry(cfg, ledger_timeout=0.05)
    with operations.ledger_for(cfg).hold():
        s = scrape(reg)
    assert get(s, "kvmhooks_ledger_readable") == 0 and get(s, "kvmhooks_topology_readable") == 1
    assert get(s, "kvmhooks_collect_errors_total", source="ledger") == 1
    gone = replace(cfg, sysfs_root=tmp_path / "no-sys")
    s = scrape(metrics.state_registry(gone))
    assert get(s, "kvmhooks_topology_readable") == 0 and get(s, "kvmhooks_ledger_readable") == 1
    assert get(s, "kvmhooks_collect_errors_total", source="topology") == 1
    assert not series(s, "kvmhooks_hugepages_nr_pages")
    assert get(s, "kvmhooks_hugepages_reserved_pages", node="0", page_size_bytes=P2M) == 128  # the ledger's


def test_textfile_is_replaced_atomically_and_parses(two_vms: tuple[FakeHost, Config], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _, cfg = two_vms
    out = tmp_path / "textfile" / "kvmhooks.prom"
    out.parent.mkdir()
    out.write_text("# old\n")
    before = out.stat().st_ino
    reg = metrics.state_registry(cfg)
    metrics.write_textfile(reg, out)
    assert out.stat().st_ino != before  # renamed over, not rewritten in place
    assert get(parse(out.read_bytes()), "kvmhooks_hugepages_reserved_pages", node="0", page_size_bytes=P2M) == 128
    assert os.listdir(out.parent) == ["kvmhooks.prom"]

    import prometheus_client.exposition

    def broken(_: object) -> bytes:
        raise RuntimeError("half-way")

    good = out.read_bytes()
    monkeypatch.setattr(prometheus_client.exposition, "generate_latest", broken)
    with pytest.raises(RuntimeError):
        metrics.write_textfile(reg, str(out))
    assert out.read_bytes() == good and os.listdir(out.parent) == ["kvmhooks.prom"]


def test_process_counters_and_histogram(two_vms: tuple[FakeHost, Config]) -> None:
    _, cfg = two_vms
    reg, m = metrics.registry(cfg)
    m.observe("tune", 0.02)
    with m.timed("repin"):
        pass
    with pytest.raises(ValueError), m.timed("retune"):
        raise ValueError("invalid live edit")
    m.failed("tune")
    m.balloon_adjusted("huge")
    m.balloon_adjusted("huge")
    m.drift("cpus", "vcpupin")
    m.ledger_repaired(2)
    m.ledger_repaired(0)
    s = scrape(reg)
    assert get(s, "kvmhooks_operation_duration_seconds_count", op="tune") == 1
    assert get(s, "kvmhooks_operation_duration_seconds_sum", op="tune") == pytest.approx(0.02)
    assert get(s, "kvmhooks_operation_duration_seconds_bucket", op="tune", le="0.025") == 1
    assert get(s, "kvmhooks_operation_duration_seconds_bucket", op="tune", le="0.01") == 0
    assert get(s, "kvmhooks_operation_duration_seconds_count", op="retune") == 1
    assert get(s, "kvmhooks_operation_failures_total", op="retune") == 1
    assert get(s, "kvmhooks_operation_failures_total", op="tune") == 1
    assert ("kvmhooks_operation_failures_total", frozenset({("op", "repin")})) not in s
    assert get(s, "kvmhooks_balloon_adjustments_total", vm="huge") == 2
    assert get(s, "kvmhooks_drift_events_total", vm="cpus", kind="vcpupin") == 1
    assert get(s, "kvmhooks_ledger_repairs_total") == 2
    assert get(s, "kvmhooks_agent_start_time_seconds") > 1e9
    assert get(s, "kvmhooks_hugepages_reserved_pages", node="0", page_size_bytes=P2M) == 128  # same registry


def test_every_family_is_in_the_documented_list(two_vms: tuple[FakeHost, Config]) -> None:
    _, cfg = two_vms
    reg, m = metrics.registry(cfg)
    m.observe("tune", 0.1)
    m.failed("tune")
    m.balloon_adjusted("huge")
    m.drift("huge", "memtune")
    families = {f.name for f in text_string_to_metric_families(metrics.render(reg).decode())}
    documented = {s.name.removesuffix("_total") for s in (*metrics.STATE_METRICS, *metrics.PROCESS_METRICS)}
    # prometheus_client adds a "<name>_created" timestamp beside each counter and histogram (the library's
    # convention; 0.16 can turn it off only through the environment).
    created = {f.removesuffix("_created") for f in families if f.endswith("_created")}
    assert families - {f"{c}_created" for c in created} == documented
    assert created == {s.name.removesuffix("_total") for s in metrics.PROCESS_METRICS if s.kind != "gauge"}
    table = metrics.metric_table()
    assert all(f"`{s.name}`" in table for s in metrics.STATE_METRICS + metrics.PROCESS_METRICS)


def test_the_hook_never_imports_prometheus_client() -> None:
    code = "import sys, kvmhooks.hook; sys.exit('prometheus_client' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
    package = Path(__file__).parents[2] / "kvmhooks"
    users = sorted(str(p.relative_to(package)) for p in package.rglob("*.py") if "prometheus_client" in p.read_text())
    assert users == ["metrics.py"]


def test_the_agents_balloon_events_win_over_the_ledgers_figure(two_vms: tuple[FakeHost, Config]) -> None:
    """kvmhooksd keeps the newest BALLOON_CHANGE figure per VM; the scrape shows it instead of what the ledger
    recorded when kvmhooks last set a target (one series per VM either way)."""
    from kvmhooks.agent import Agent

    _, cfg = two_vms
    operations.mark(HUGE, cfg, state="running", applied=Applied(balloon={"target": 196608, "actual": 196612}))
    agent = Agent(cfg)
    reg, _ = metrics.registry(cfg, live_balloon=agent._live_balloon)
    vm = {"vm": "huge", "uuid": HUGE}
    assert get(scrape(reg), "kvmhooks_vm_balloon_actual_bytes", **vm) == 196612 * 1024

    class Dom:
        def UUIDString(self) -> str:
            return HUGE

    agent._balloon_change(None, Dom(), 131072, None)  # the guest gave memory back (by hand, or its policy)
    s = scrape(reg)
    assert get(s, "kvmhooks_vm_balloon_actual_bytes", **vm) == 131072 * 1024
    assert series(s, "kvmhooks_vm_balloon_actual_bytes") == [vm]


def test_the_agents_unix_socket_serves_its_counters_root_only(two_vms: tuple[FakeHost, Config]) -> None:
    """kvmhooksd always serves on state_dir/metrics.sock (no TCP port unless metrics_listen says so);
    `kvmhooks metrics` prints that (the agent's counters included), and the state alone without an agent."""
    import stat

    from kvmhooks.agent import metrics_socket_path

    host, cfg = two_vms
    path = metrics_socket_path(cfg)
    assert metrics.fetch_unix(path) is None  # no agent
    reg, m = metrics.registry(cfg)
    m.drift("huge", "memtune")
    metrics.serve_unix(reg, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    body = metrics.fetch_unix(path)
    assert body is not None
    s = parse(body)
    assert get(s, "kvmhooks_drift_events_total", vm="huge", kind="memtune") == 1
    assert get(s, "kvmhooks_vm_hugepages_pages", vm="huge", uuid=HUGE, node="0", page_size_bytes=P2M) == 128
    cfg_file = host.root / "config.toml"
    cfg_file.write_text(f'sysfs_root = "{cfg.sysfs_root}"\nproc_root = "{cfg.proc_root}"\n'
                        f'state_dir = "{cfg.state_dir}"\n')
    out = subprocess.run([sys.executable, "-m", "kvmhooks.cli", "metrics", "--config", str(cfg_file)],
                         capture_output=True, check=True, cwd=Path(__file__).parents[2]).stdout
    assert get(parse(out), "kvmhooks_drift_events_total", vm="huge", kind="memtune") == 1


def test_a_vm_whose_release_the_worker_has_not_done_yet_is_stopping(two_vms: tuple[FakeHost, Config]) -> None:
    _, cfg = two_vms
    pinned = "11111111-2222-3333-4444-000000000003"
    token = operations.prepare(parse_domain(domain_xml(name="pinned", uuid=pinned, backing="",
                                                       tuning='<kvm:vcpupin vcpu="0" cpuset="1"/>')), cfg).record.token
    (operations.ledger_for(cfg).stopping_dir / pinned).write_text(f"{token}\n")  # what hooks/qemu leaves
    s = scrape(metrics.state_registry(cfg))
    assert get(s, "kvmhooks_vm_state", vm="pinned", uuid=pinned, state="stopping") == 1
    assert get(s, "kvmhooks_vm_state", vm="huge", uuid=HUGE, state="prepared") == 1
