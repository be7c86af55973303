"""The kvmhooks command against fake sysfs trees and libvirt's test:/// driver (a per-test XML file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmhooks.cli import main
from tests.fakehost import GIB, FakeHost, domain_xml
from tests.unit.test_hook import write_config

pytest.importorskip("libvirt")

NS = 'xmlns:kvm="http://kvmhooks.org/xmlns/domain/1.0"'
U_WEB = "11111111-2222-3333-4444-00000000000a"


def dom(name: str, uuid: str, tuning: str | None = None, memory_kib: int = 262144, extra: str = "",
        devices: str = "<memballoon model='virtio'/>", backing: bool = True, vcpus: int = 2, running: bool = True,
        ) -> str:
    meta = f"<metadata><kvm:tuning {NS}>{tuning}</kvm:tuning></metadata>" if tuning is not None else ""
    mb = "<memoryBacking><hugepages/></memoryBacking>" if backing else ""
    if not running:
        extra += "<test:runstate xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>5</test:runstate>"
    return (f"<domain type='test'><name>{name}</name><uuid>{uuid}</uuid>{meta}<memory>{memory_kib}</memory>"
            f"{mb}<vcpu>{vcpus}</vcpu>{extra}<os><type>hvm</type></os><devices>{devices}</devices></domain>")


@pytest.fixture
def env(numa_host: FakeHost) -> tuple[Path, str, FakeHost]:
    node = numa_host.root / "node.xml"
    node.write_text("<node>" + "".join([
        dom("web", U_WEB, '<kvm:hugepages size="2M"/><kvm:vcpupin vcpu="0" cpuset="1"/>'
                          '<kvm:emulatorpin cpuset="0"/><kvm:memtune hard_limit="1G"/><kvm:balloon target="75%"/>'),
        dom("plain", "11111111-2222-3333-4444-00000000000b", backing=False),
        dom("broken", "11111111-2222-3333-4444-00000000000c", '<kvm:hugepages size="3M"/>'),
        dom("huge", "11111111-2222-3333-4444-00000000000d", '<kvm:hugepages size="2M"/>', memory_kib=64 * GIB,
            running=False),
        dom("win", "11111111-2222-3333-4444-00000000000e", backing=False,
            extra="<metadata><libosinfo:libosinfo xmlns:libosinfo='http://libosinfo.org/xmlns/libvirt/domain/1.0'>"
                  "<libosinfo:os id='http://microsoft.com/win/10'/></libosinfo:libosinfo></metadata>"),
    ]) + "</node>")
    cfg = write_config(numa_host, hooks_dir=f'"{numa_host.root / "hooks"}"', lib_dir=f'"{numa_host.root / "lib"}"')
    return cfg, f"test://{node}", numa_host


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_lists_every_action_without_changing_anything(env, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg, uri, host = env
    code, out, _ = run(capsys, "plan", "web", "--config", str(cfg), "--uri", uri)
    assert code == 0
    assert "node0/hugepages/hugepages-2048kB/nr_hugepages = 128 (now 0; +128 pages)" in out or \
        "node1/hugepages/hugepages-2048kB/nr_hugepages = 128 (now 0; +128 pages)" in out
    assert "pinVcpuFlags(0, 1, AFFECT_LIVE)" in out and "pinEmulator(0, AFFECT_LIVE)" in out
    assert "setMemoryParameters({'hard_limit': 1048576}, AFFECT_LIVE)" in out
    assert "libvirt setMemoryFlags(196608, AFFECT_LIVE)\n  started  libvirt verify the balloon lands at 192M" in out
    assert "setMemoryStatsPeriod(2, AFFECT_LIVE)" in out
    assert host.pool(0) == 0 and host.pool(1) == 0 and not (host.root / "run/ledger.json").exists()
    code, out, _ = run(capsys, "plan", "huge", "--config", str(cfg), "--uri", uri, "--json")
    assert code == 1 and "not enough memory" in json.loads(out)["refuse"]


def test_plan_from_a_file(env, capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg, _, _ = env
    f = tmp_path / "d.xml"
    f.write_text(dom("filevm", U_WEB, '<kvm:cpu policy="dedicated"/>', vcpus=2, backing=False))
    code, out, _ = run(capsys, "plan", "--xml", str(f), "--config", str(cfg), "--json")
    actions = [a["action"] for a in json.loads(out)["actions"]]
    assert code == 0 and any(a.startswith("reserve dedicated CPUs") for a in actions)


def test_validate(env, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg, uri, _ = env
    assert run(capsys, "validate", "web", "--config", str(cfg), "--uri", uri)[0] == 0
    code, out, _ = run(capsys, "validate", "broken", "--config", str(cfg), "--uri", uri)
    assert code == 1 and "VM 'broken': <kvm:hugepages size=...> value '3M'" in out


def test_status_and_host(env, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg, uri, _ = env
    code, out, _ = run(capsys, "status", "--config", str(cfg), "--uri", uri, "--json")
    vms = {v["name"]: v for v in json.loads(out)["vms"]}
    assert code == 0 and "web" in vms and "plain" not in vms
    assert vms["web"]["annotations"] == "hugepages 2M, pins, memtune, balloon fixed"
    assert vms["broken"]["annotations"].startswith("invalid:")
    code, out, _ = run(capsys, "host", "--config", str(cfg), "--json")
    data = json.loads(out)
    assert code == 0 and data["smt"] and data["allowed_cpus"] == "1-15" and data["hook"]["installed"] == []
    code, out, _ = run(capsys, "host", "--config", str(cfg))
    assert "NOT INSTALLED (run install.sh)" in out


def test_doctor_findings(env, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg, uri, host = env
    (host.proc / "sys/kernel").mkdir(parents=True)
    (host.proc / "sys/kernel/numa_balancing").write_text("1\n")
    ksm = host.sysfs / "kernel/mm/ksm"
    ksm.mkdir(parents=True)
    (ksm / "run").write_text("1\n")
    (ksm / "merge_across_nodes").write_text("1\n")
    code, out, _ = run(capsys, "doctor", "--config", str(cfg), "--uri", uri, "--json")
    found = {(f["check"], f["subject"]) for f in json.loads(out)}
    assert code == 1
    assert {("numa-balancing", "host"), ("ksm-across-nodes", "host"), ("tablet", "win"),
            ("annotation", "broken"), ("hugepages", "huge")} <= found
    assert ("tablet", "web") not in found
    code, out, _ = run(capsys, "doctor", "win", "--config", str(cfg), "--uri", uri)
    assert "fix: <input type='tablet' bus='usb'/>" in out


def test_annotate_changes_only_our_parts(env, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg, uri, _ = env
    code, out, _ = run(capsys, "annotate", "plain", "--hugepages", "2M", "--pin", "1,0", "--balloon", "75%", "--qmp",
                       "--dry-run", "--config", str(cfg), "--uri", uri)
    assert code == 0 and out.endswith("(dry run: nothing was changed)\n")
    added = [line for line in out.splitlines() if line.startswith("+") and not line.startswith("+++")]
    removed = [line for line in out.splitlines() if line.startswith("-") and not line.startswith("---")]
    body = "\n".join(added)
    for part in ('<kvm:hugepages size="2M"/>', '<kvm:vcpupin vcpu="1" cpuset="0"/>', '<kvm:balloon target="75%"/>',
                 "<hugepages/>", "-qmp", "/var/lib/libvirt/qemu/kvmhooks/11111111-2222-3333-4444-00000000000b.qmp"):
        assert part in body
    # Only additions, but for the balloon device gaining deflate-on-oom: everything else stays as it was.
    assert removed == ['-    <memballoon model="virtio"/>']
    assert '+    <memballoon model="virtio" autodeflate="on"/>' in added


def test_annotate_refuses_what_the_hook_would_refuse(env, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg, uri, _ = env
    code, _, err = run(capsys, "annotate", "plain", "--pin", "0,1,2", "--config", str(cfg), "--uri", uri)
    assert code == 1 and "<kvm:vcpupin vcpu=...> value '2'" in err


def test_errors_are_one_line_not_tracebacks(env, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg, uri, _ = env
    code, _, err = run(capsys, "status", "nosuch", "--config", str(cfg), "--uri", uri)
    assert code == 1 and err.strip() == "kvmhooks: no domain named 'nosuch' (see 'virsh list --all')"
    code, _, err = run(capsys, "plan", "web", "--config", str(cfg), "--uri", "qemu+unix:///system?socket=/nonexistent")
    assert code == 1 and "is libvirtd running?" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--bogus"])
    assert exc.value.code == 2
    code, _, err = run(capsys, "status", "--config", "/nonexistent/config.toml", "--uri",
                       "qemu+unix:///system?socket=/nonexistent")
    assert code == 0  # no config file = defaults; libvirtd down = a note, the ledger still shown


def test_reconcile_frees_leftovers_but_not_a_vm_that_is_starting(env, capsys) -> None:  # type: ignore[no-untyped-def]
    import time

    from kvmhooks.config import load_config
    from kvmhooks.ledger import DomainRecord, Ledger, PoolRecord

    cfg, uri, host = env
    c = load_config(cfg)
    host.set_pool(0, 2048, 30)  # 10 for the admin + 20 for the leftover
    with Ledger(c.ledger_path).transaction() as st:
        st.domains["99999999-0000-0000-0000-000000000001"] = DomainRecord(
            name="gone", state="running", hugepages={"node0/2048kB": 20}, updated=time.time() - 3600)
        st.domains["99999999-0000-0000-0000-000000000002"] = DomainRecord(name="booting", state="prepared",
                                                                         updated=time.time())
        st.pools["node0/2048kB"] = PoolRecord(baseline=10)
    code, out, _ = run(capsys, "reconcile", "--dry-run", "--config", str(cfg), "--uri", uri)
    assert code == 0 and "would release gone" in out and "would leave booting" in out and host.pool(0) == 30
    code, out, _ = run(capsys, "reconcile", "--config", str(cfg), "--uri", uri)
    left = Ledger(c.ledger_path).read().domains
    assert "99999999-0000-0000-0000-000000000001" not in left and "99999999-0000-0000-0000-000000000002" in left
    log = (host.root / "kvmhooks.log").read_text()  # what reconcile did is in the kvmhooks log too
    assert "VM 'gone' (99999999-0000-0000-0000-000000000001): released node0/2048kB 20 pages" in log
    # The test driver's running, annotated "web" was missing from the ledger: adopted. It has no QEMU process on
    # this two-node host, so where its pages are is not known: they are recorded unplaced, not guessed onto node 0
    # (that counted the 20 pages "gone" left as web's), and the pool goes back to the admin's 10.
    assert "adopt web" in out and left[U_WEB].hugepages == {} and left[U_WEB].unplaced == {"2048kB": 128}
    assert host.pool(0) == 10 and "node0/2048kB" not in Ledger(c.ledger_path).read().pools  # settled
    assert run(capsys, "reconcile", "--config", str(cfg), "--uri", uri)[1].startswith("leave booting")  # only that


def test_validate_warns_about_an_auto_balloon_without_deflate_on_oom(tmp_path: Path, capsys, numa_host) -> None:  # type: ignore[no-untyped-def]
    cfg = write_config(numa_host)
    xml = tmp_path / "auto.xml"
    xml.write_bytes(domain_xml(uuid=U_WEB, tuning='<kvm:balloon policy="auto" min="128M"/>', backing=""))
    code, out, _ = run(capsys, "validate", "--xml", str(xml), "--config", str(cfg))
    assert code == 0 and "annotation valid" in out and "warning: automatic balloon policy without" in out
    xml.write_bytes(domain_xml(uuid=U_WEB, tuning='<kvm:balloon policy="auto" min="128M"/>', backing="",
                               devices="<memballoon model='virtio' autodeflate='on'/>"))
    code, out, _ = run(capsys, "validate", "--xml", str(xml), "--config", str(cfg))
    assert code == 0 and "warning" not in out


def test_annotate_records_the_autodeflate_it_added(env, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg, uri, host = env
    code, out, _ = run(capsys, "annotate", "plain", "--balloon", "75%", "--free-page-reporting", "--config", str(cfg),
                       "--uri", uri)
    assert code == 0 and 'autodeflate="on"' in out and 'freePageReporting="on"' in out
    # Recorded like the hugepage backing, so --remove takes back only what annotate added (the test driver
    # forgets definitions between connections: the removal itself is in the end-to-end annotate test).
    record = json.loads((host.root / "lib/annotated/11111111-2222-3333-4444-00000000000b.json").read_text())
    assert record == {"autodeflate": True}


def test_metrics_command_prints_the_exposition_and_writes_a_textfile(env, capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from prometheus_client.parser import text_string_to_metric_families

    from kvmhooks import operations
    from kvmhooks.config import load_config
    from kvmhooks.domain import parse_domain

    cfg, _, _ = env
    operations.prepare(parse_domain(domain_xml(uuid=U_WEB)), load_config(cfg))
    code, out, _ = run(capsys, "metrics", "--config", str(cfg))
    families = {f.name: f for f in text_string_to_metric_families(out)}
    assert code == 0 and families["kvmhooks_up"].samples[0].value == 1
    reserved = {(s.labels["node"], s.labels["page_size_bytes"]): s.value
                for s in families["kvmhooks_hugepages_reserved_pages"].samples}
    assert sum(reserved.values()) == 128 and 128 in reserved.values(), out
    target = tmp_path / "kvmhooks.prom"
    assert run(capsys, "metrics", "--config", str(cfg), "--textfile", str(target))[0] == 0
    assert "kvmhooks_hugepages_reserved_pages" in target.read_text()


def test_status_shows_a_vm_whose_release_the_worker_has_not_done_yet(env, capsys) -> None:  # type: ignore[no-untyped-def]
    """Stopped without kvmhooksd, holding nothing of the host's: until the detached worker (or any other
    operation) has released its record, status says so rather than show it holding its pins."""
    from kvmhooks import operations
    from kvmhooks.config import load_config
    from kvmhooks.domain import parse_domain

    cfg, uri, _ = env
    c = load_config(cfg)
    token = operations.prepare(parse_domain(domain_xml(name="web", uuid=U_WEB, tuning='<kvm:vcpupin vcpu="0" '
                                                       'cpuset="1"/>', backing="")), c).record.token
    (operations.ledger_for(c).stopping_dir / U_WEB).write_text(f"{token}\n")  # what hooks/qemu leaves
    code, out, _ = run(capsys, "status", "--config", str(cfg), "--uri", uri, "--json")
    assert code == 0 and {v["name"]: v for v in json.loads(out)["vms"]}["web"]["release_pending"] is True
    code, out, _ = run(capsys, "status", "--config", str(cfg), "--uri", uri)
    assert "; being released" in out
    (operations.ledger_for(c).stopping_dir / U_WEB).write_text("0123456789abcdef\n")  # another run's
    code, out, _ = run(capsys, "status", "--config", str(cfg), "--uri", uri, "--json")
    assert "release_pending" not in {v["name"]: v for v in json.loads(out)["vms"]}["web"]
