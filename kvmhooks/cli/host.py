"""`kvmhooks host` (topology, pools, mounts, hook) and `kvmhooks doctor` (the advice, read only)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from kvmhooks import operations
from kvmhooks.apply.libvirt import connect, lookup
from kvmhooks.cli.common import read_ledger
from kvmhooks.cli.exit import EXIT_FINDING, EXIT_OK
from kvmhooks.cli.render import cpu_map, emit, isolation_lines, isolation_view, pool_rows, pool_table, table
from kvmhooks.config import Config
from kvmhooks.errors import ConnectError, KvmhooksError
from kvmhooks.units import format_cpuset, format_kib

log = logging.getLogger(__name__)


def hook_state(cfg: Config) -> dict[str, Any]:
    """Where the hook is installed, and facts about libvirtd, without a verdict: libvirtd does not say which
    hooks it has loaded (it looks at start and on SIGHUP, which install.sh sends), so guessing from start
    times only misleads."""
    import time

    marker = "kvmhooks: libvirt qemu hook"
    found = [p for p in (cfg.hooks_dir / "qemu", cfg.hooks_dir / "qemu.d/kvmhooks")
             if p.is_file() and marker in p.read_text(errors="replace")]
    out: dict[str, Any] = {"installed": [str(p) for p in found],
                           "executable": all(os.access(p, os.X_OK) for p in found)}
    try:
        pid = int(Path("/run/libvirtd.pid").read_text().split()[0])
        if Path(f"/proc/{pid}/comm").read_text().strip() == "libvirtd":
            out["libvirtd_pid"] = pid
            out["libvirtd_since"] = time.strftime("%Y-%m-%d %H:%M:%S",
                                                  time.localtime(Path(f"/proc/{pid}").stat().st_mtime))
    except (OSError, ValueError, IndexError):
        pass
    return out


def cmd_host(args: argparse.Namespace, cfg: Config) -> int:
    from kvmhooks.plan.cpus import allowed_cpus

    topo = operations.topology_for(cfg)
    state = read_ledger(cfg)
    data: dict[str, Any] = {
        "nodes": {n: {"cpus": format_cpuset(node.cpus), "mem_total": node.mem_total_kib, "mem_free": node.mem_free_kib}
                  for n, node in sorted(topo.nodes.items())},
        "smt": topo.smt,
        "cores": sorted({format_cpuset(c.siblings) for c in topo.cpus.values()}, key=lambda s: int(s.split(",")[0]
                                                                                        .split("-")[0])),
        "allowed_cpus": format_cpuset(allowed_cpus(topo, cfg)),
        "dedicated_cpus": format_cpuset(state.dedicated_cpus()),
        "page_sizes": [format_kib(s) for s in sorted(topo.page_sizes)],
        "hugetlbfs": {format_kib(s): m for s, m in sorted(topo.hugetlbfs.items())},
        "pools": pool_rows(topo, state),
        "hook": hook_state(cfg),
        "isolation": isolation_view(cfg, state),
    }

    def human() -> str:
        lines = [table(["NODE", "CPUS", "MEMORY", "FREE"],
                       [[n, v["cpus"], format_kib(v["mem_total"]), format_kib(v["mem_free"])]
                        for n, v in data["nodes"].items()]), "",
                 f"cores (SMT siblings): {' '.join(data['cores'])}  (SMT {'on' if topo.smt else 'off'})",
                 f"CPUs kvmhooks may hand out: {data['allowed_cpus'] or 'none'}; dedicated now: "
                 f"{data['dedicated_cpus'] or 'none'}",
                 f"huge page sizes: {', '.join(data['page_sizes'])}; hugetlbfs: "
                 + (", ".join(f"{k} on {v}" for k, v in data["hugetlbfs"].items()) or "NOT MOUNTED")]
        hook = data["hook"]
        where = ", ".join(hook["installed"]) if hook["installed"] else "NOT INSTALLED (run install.sh)"
        lines.append("hook: " + where + ("" if hook["executable"] else " (NOT EXECUTABLE: chmod +x it)")
                     + (f"; libvirtd pid {hook['libvirtd_pid']} running since {hook['libvirtd_since']} (it loads "
                        "hooks at start and on SIGHUP)" if "libvirtd_pid" in hook else "; libvirtd is not running"))
        lines += ["", cpu_map(topo, cfg, state), *isolation_lines(data["isolation"])]
        if data["pools"]:
            lines += ["", pool_table(data["pools"])]
        return "\n".join(lines)

    emit(args, data, human)
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace, cfg: Config) -> int:
    import libvirt

    from kvmhooks.doctor import (
        DomainFacts,
        check_domain,
        check_host,
        check_isolation,
        domain_facts,
        read_host_facts,
    )

    topo = operations.topology_for(cfg)
    facts = read_host_facts(topo, cfg)
    doms: list[DomainFacts] = []
    running_vcpus = 0
    try:
        conn = connect(args.uri or cfg.libvirt_uri)
    except ConnectError as e:
        conn = None
        print(f"kvmhooks: note: {e}; checking the host only", file=sys.stderr)
    if conn is not None:
        targets = [lookup(conn, n) for n in args.domains] if args.domains else conn.listAllDomains()
        for d in conn.listAllDomains():
            if d.isActive():
                running_vcpus += d.info()[3]
        for d in targets:
            try:  # domain_facts also sees what Domain does not carry (a VFIO device)
                facts_d = domain_facts(d.name(), d.XMLDesc(0).encode(), bool(d.isActive()))
                if facts_d.active:
                    from dataclasses import replace

                    facts_d = replace(facts_d, memory=operations.vm_memory(cfg, d.name(), d.UUIDString()))
                doms.append(facts_d)
            except libvirt.libvirtError as e:  # it vanished while we looked: that VM only
                log.info("doctor: skipping a domain: %s", e)
    try:
        isolated = frozenset(read_ledger(cfg).isolation.get("isolated", []))
    except KvmhooksError:
        isolated = frozenset()
    findings = check_host(facts, doms) + check_isolation(facts, doms, isolated)
    for d in doms:
        findings += check_domain(facts, d, cfg, running_vcpus)
    warnings = [f for f in findings if f.severity == "warning"]

    def human() -> str:
        if not findings:
            return "no findings: host and VMs follow the KVM tuning advice kvmhooks knows"
        return "\n\n".join(f"[{f.severity}] {f.subject}: {f.what}\n  why: {f.why}\n  fix: {f.fix}" for f in findings)

    emit(args, [f.__dict__ for f in findings], human)
    return EXIT_FINDING if warnings else EXIT_OK
