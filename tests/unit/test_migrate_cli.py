"""What an admin or a scheduler sees of the migrate/restore filter before and during a migration:
``kvmhooks plan --incoming`` (the filter's dry run on a candidate host), claims in ``kvmhooks status``, the
capacity gauges in the metrics, and doctor's post-copy note. Real outcomes on fake hosts."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvmhooks import metrics, operations
from kvmhooks.cli import main
from kvmhooks.config import Config
from kvmhooks.doctor import check_domain, domain_facts, read_host_facts
from kvmhooks.domain import parse_domain
from kvmhooks.migrate import incoming
from kvmhooks.units import format_cpuset
from tests.fakehost import FakeHost, domain_xml
from tests.unit.test_hook import write_config

SOURCE_FILE = Path(__file__).parent / "data/migrate/two-cells-node1.xml"
SOURCE = SOURCE_FILE.read_bytes()
U = "5a0c6a2e-7d3b-4c1e-9f00-1234567890ab"
OTHER = "00000000-0000-4000-8000-000000000001"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- plan --incoming ----------------------------------------------------------------------------------------

def test_plan_incoming_shows_the_rewrite_and_the_claim_and_holds_nothing(numa_host: FakeHost,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    conf = write_config(numa_host)
    code, out, _ = run(capsys, "plan", "--incoming", str(SOURCE_FILE), "--config", str(conf), "--json")
    assert code == 0
    got = json.loads(out)
    assert got["claim"]["hugepages"] == {"node1/2048kB": 128}
    cpus = set(got["claim"]["cpus"])
    assert cpus and all(4 <= c <= 7 or 12 <= c <= 15 for c in cpus)  # node 1, where <numatune> keeps it
    assert any(c.startswith("<cputune> pins") for c in got["changes"])
    # a dry run: nothing claimed, no pool written
    assert U not in operations.ledger_for(numa_host.config()).read().domains
    assert numa_host.pool(0) == 0 and numa_host.pool(1) == 0
    code, out, _ = run(capsys, "plan", "--incoming", str(SOURCE_FILE), "--config", str(conf))
    assert code == 0 and "would claim node1/2048kB 128 pages, CPUs " in out and "\n  <cputune> pins " in out


def test_plan_incoming_refusal_is_one_line_and_exit_1(host: FakeHost, capsys: pytest.CaptureFixture[str]) -> None:
    conf = write_config(host, cpu='{ housekeeping = "" }')
    cfg = host.config(cpu_housekeeping=frozenset())
    operations.prepare(parse_domain(domain_xml(name="other", uuid=OTHER, tuning='<kvm:cpu policy="dedicated"/>',
                                               vcpus=2, backing="")), cfg)  # both CPUs of this host
    code, out, err = run(capsys, "plan", "--incoming", str(SOURCE_FILE), "--config", str(conf))
    assert code == 1 and err == ""
    assert out.count("\n") == 1 and out.startswith("would refuse the migration: VM 'mig1'")


def test_plan_incoming_of_a_page_size_this_host_lacks_is_a_one_line_refusal(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    h = FakeHost(tmp_path, page_sizes=(2048,), mounts=(2048,)).build()
    f = tmp_path / "in.xml"
    f.write_bytes(SOURCE.replace(b'<kvm:hugepages size="2M"/>', b'<kvm:hugepages size="1G"/>')
                  .replace(b"<page size='2048' unit='KiB'", b"<page size='1048576' unit='KiB'")
                  .replace(b"262144", b"2097152").replace(b"131072", b"1048576"))
    code, out, err = run(capsys, "plan", "--incoming", str(f), "--config", str(write_config(h)), "--json")
    assert code == 1 and err == ""
    assert "this host has no 1G huge pages" in json.loads(out)["refuse"]
    assert not (h.root / "run/ledger.json").exists() or U not in operations.ledger_for(h.config()).read().domains


# --- status -------------------------------------------------------------------------------------------------

def status_row(capsys: pytest.CaptureFixture[str], conf: Path) -> tuple[dict[str, Any], str]:
    code, out, _ = run(capsys, "status", "--config", str(conf), "--uri", "test:///default", "--json")
    assert code == 0
    rows = [v for v in json.loads(out)["vms"] if v["uuid"] == U]
    assert len(rows) == 1
    code, human, _ = run(capsys, "status", "--config", str(conf), "--uri", "test:///default")
    return rows[0], human


def test_status_shows_a_claim_what_it_holds_and_the_time_left(numa_host: FakeHost,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    cfg = numa_host.config()
    got = incoming(SOURCE, cfg)
    assert got is not None
    rec = operations.ledger_for(cfg).read().domains[U]
    row, human = status_row(capsys, write_config(numa_host))
    assert row["ledger_state"] == "claimed" and row["claim"]["expired"] is False
    assert 0 < row["claim"]["expires_in"] <= cfg.claim_timeout and row["claim"]["expires"] == rec.expires
    assert row["hugepages"] == {"node1/2048kB": 128} and row["cpus"] == format_cpuset(rec.cpus)
    line = next(x for x in human.splitlines() if x.startswith("mig1 "))
    assert "claimed, expires in " in line and "node1 128x2M" in line and format_cpuset(rec.cpus) in line


def test_status_says_expired_for_a_claim_past_its_deadline_not_yet_dropped(numa_host: FakeHost,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    incoming(SOURCE, numa_host.config(claim_timeout=0.001))
    time.sleep(0.01)
    row, human = status_row(capsys, write_config(numa_host))
    assert row["claim"]["expired"] is True and row["claim"]["expires_in"] == 0
    assert "claimed, expired" in next(x for x in human.splitlines() if x.startswith("mig1 "))


# --- metrics --------------------------------------------------------------------------------------------------

def gauges(cfg: Config) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    text = metrics.render(metrics.state_registry(cfg)).decode()
    for fam in text_string_to_metric_families(text):  # type: ignore[no-untyped-call]
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def pool(name: str, node: int, size_kib: int) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset({("node", str(node)), ("page_size_bytes", str(size_kib * 1024))})


def test_capacity_gauges_count_claims_and_say_what_a_new_vm_could_get(numa_host: FakeHost) -> None:
    numa_host.set_free(1, 1024 * 1024 + 300 * 1024)  # node 1: the 1 GiB host reserve + 300 MiB
    cfg = numa_host.config()
    before = gauges(cfg)
    assert before[pool("kvmhooks_hugepages_available_pages", 1, 2048)] == 150  # 300 MiB / 2 MiB
    assert before[pool("kvmhooks_hugepages_available_pages", 1, 1048576)] == 0
    assert before[pool("kvmhooks_hugepages_available_pages", 0, 2048)] == (12 - 1) * 512  # 12 GiB free - reserve
    assert before[("kvmhooks_claims", frozenset())] == 0
    free_cpus = before[("kvmhooks_dedicated_cpus_free", frozenset())]
    assert free_cpus == 16 - 1  # all online minus the housekeeping CPU 0
    got = incoming(SOURCE, cfg)  # 128 x 2M on node 1 (its <numatune>), 150 could be had
    assert got is not None
    rec = operations.ledger_for(cfg).read().domains[U]
    after = gauges(cfg)
    assert after[pool("kvmhooks_hugepages_claimed_pages", 1, 2048)] == 128
    assert after[pool("kvmhooks_hugepages_available_pages", 1, 2048)] == 150 - 128
    assert after[pool("kvmhooks_hugepages_available_pages", 0, 2048)] == (12 - 1) * 512
    assert after[("kvmhooks_claims", frozenset())] == 1
    assert after[("kvmhooks_dedicated_cpus_free", frozenset())] == free_cpus - len(rec.cpus)
    # the gauge is the filter's own limit: a second VM of 128 pages no longer fits on node 1
    second = SOURCE.replace(U.encode(), OTHER.encode()).replace(b"<name>mig1</name>", b"<name>mig2</name>")
    got2 = incoming(second, cfg, dry_run=True)
    assert got2 is not None and got2.placement.relaxed and got2.placement.hugepages is not None
    assert set(got2.placement.hugepages.pages) == {0}


# --- doctor / validate: post-copy ------------------------------------------------------------------------------

def test_validate_and_doctor_advise_pre_copy_for_a_hugepage_vm_only(numa_host: FakeHost, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    conf = write_config(numa_host)
    code, out, _ = run(capsys, "validate", "--xml", str(SOURCE_FILE), "--config", str(conf), "--json")
    got = json.loads(out)
    assert code == 0 and got["ok"] and len(got["notes"]) == 1  # advice: the start and a pre-copy would go ahead
    assert "post-copy" in got["notes"][0] and "virsh migrate --live' without --postcopy" in got["notes"][0]
    plain = tmp_path / "plain.xml"
    plain.write_bytes(domain_xml(name="plain", uuid=OTHER, tuning='<kvm:cpu policy="dedicated"/>', vcpus=2,
                                backing=""))
    code, out, _ = run(capsys, "validate", "--xml", str(plain), "--config", str(conf), "--json")
    assert code == 0 and json.loads(out)["notes"] == []
    cfg = numa_host.config()
    topo = operations.topology_for(cfg)
    found = check_domain(read_host_facts(topo, cfg), domain_facts("mig1", SOURCE), cfg, 0)
    assert [(f.check, f.severity) for f in found if f.check == "postcopy"] == [("postcopy", "info")]
    assert not [f for f in check_domain(read_host_facts(topo, cfg), domain_facts("plain", plain.read_bytes()), cfg, 0)
                if f.check == "postcopy"]
