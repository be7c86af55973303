"""The ``kvmhooks`` command: see and steer what the hook does.

Exit codes: 0 ok, 1 a finding or a failure, 2 usage. Human tables by default, ``--json`` for scripts.
Talks to libvirt through libvirt-python (never by running virsh), and reads the same ledger and topology
code the hook uses. This package (with hook and worker) is where exceptions become exit codes: one module
per command group, and one place that renders (:mod:`kvmhooks.cli.render`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from kvmhooks import __version__
from kvmhooks.cli.edit import cmd_annotate
from kvmhooks.cli.exit import EXIT_FINDING
from kvmhooks.cli.host import cmd_doctor, cmd_host
from kvmhooks.cli.plan import cmd_plan, cmd_validate
from kvmhooks.cli.reconcile import cmd_reconcile
from kvmhooks.cli.services import cmd_agent, cmd_balloond, cmd_demo, cmd_metrics
from kvmhooks.cli.status import cmd_status
from kvmhooks.config import load_config
from kvmhooks.errors import KvmhooksError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmhooks", description="See and steer kvmhooks, the libvirt hook that tunes "
                                "annotated KVM guests at start.",
                                epilog="exit codes: 0 ok, 1 a finding or a failure, 2 usage")
    p.add_argument("--version", action="version", version=f"kvmhooks {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--config", type=Path, help="host config (default /etc/kvmhooks/config.toml)")
    common.add_argument("--uri", help="libvirt URI (default from config: qemu:///system)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("status", parents=[common], help="what each annotated VM holds and has applied")
    s.add_argument("domains", nargs="*", metavar="DOM")
    s.set_defaults(func=cmd_status)
    for name, fn, hlp in (("plan", cmd_plan, "dry run: every action the hook would take for a VM"),
                          ("validate", cmd_validate, "check a VM's annotation against the contract and this host")):
        s = sub.add_parser(name, parents=[common], help=hlp)
        s.add_argument("domain", nargs="?", metavar="DOM")
        s.add_argument("--xml", metavar="FILE", help="a domain XML file instead of a defined domain")
        s.set_defaults(func=fn)
        if name == "plan":
            s.add_argument("--incoming", metavar="FILE", help="dry run of the migrate/restore filter on this host "
                           "for a VM's migratable XML (virsh dumpxml --migratable on the source)")
    s = sub.add_parser("annotate", parents=[common], help="write the annotation (and what it needs) into a domain")
    s.add_argument("domain", metavar="DOM")
    s.add_argument("--hugepages", metavar="SIZE", choices=["2M", "1G", "auto"], help="2M, 1G or auto")
    s.add_argument("--cpu", metavar="POLICY", choices=["dedicated", "shared"], help="dedicated or shared")
    s.add_argument("--pin", metavar="auto|LIST", help="auto (dedicated placement) or host CPUs for vCPU 0,1,...")
    s.add_argument("--balloon", metavar="TARGET", help="balloon target: a size (768M) or a percentage (75%%)")
    s.add_argument("--qmp", action="store_true", help="add the dedicated QMP socket kvmhooks drives the balloon over")
    s.add_argument("--free-page-reporting", action="store_true",
                   help="turn on <memballoon freePageReporting='on'> (not for hugepage-backed or VFIO VMs)")
    s.add_argument("--virtio-mem", metavar="SIZE", help="add a virtio-mem device of SIZE (and <maxMemory>, a guest "
                   "NUMA cell, an auto policy) that balloond resizes")
    s.add_argument("--dry-run", action="store_true", help="show the diff, change nothing")
    s.add_argument("--live", action="store_true",
                   help="also change the running VM's annotation (kvmhooksd re-tunes it within a second)")
    s.add_argument("--remove", action="store_true", help="remove the annotation and what annotate added")
    s.set_defaults(func=cmd_annotate)
    s = sub.add_parser("reconcile", parents=[common], help="repair the ledger and pools against running VMs")
    s.add_argument("--dry-run", action="store_true")
    s.set_defaults(func=cmd_reconcile)
    s = sub.add_parser("host", parents=[common], help="topology, pools, mounts and hook state")
    s.set_defaults(func=cmd_host)
    s = sub.add_parser("doctor", parents=[common], help="KVM tuning advice for this host and its VMs (reads only)")
    s.add_argument("domains", nargs="*", metavar="DOM")
    s.set_defaults(func=cmd_doctor)
    s = sub.add_parser("balloond", parents=[common],
                       help="the automatic balloon service alone (the agent runs it too: run one of them)")
    s.add_argument("--once", action="store_true", help="one cycle, then exit")
    s.add_argument("--interval", type=float, help="seconds between cycles (default from config: 10)")
    s.add_argument("--log-stderr", dest="foreground_log", action="store_true", help="log to stderr")
    s.set_defaults(func=cmd_balloond)
    s = sub.add_parser("agent", parents=[common], help="kvmhooksd, the resident agent (runs in the foreground): "
                       "fast post-start tuning, live re-tuning on annotation changes, the automatic balloon")
    s.add_argument("--log-stderr", dest="foreground_log", action="store_true", help="log to stderr")
    s.set_defaults(func=cmd_agent)
    s = sub.add_parser("metrics", parents=[common], help="Prometheus metrics of pools, reservations, pins, failures")
    s.add_argument("--textfile", metavar="PATH", help="write a node_exporter textfile (PATH ending in .prom)")
    s.set_defaults(func=cmd_metrics)
    s = sub.add_parser("demo", parents=[common], help="boot an annotated tiny TCG guest and show the tuning land")
    s.add_argument("--keep", action="store_true", help="keep the demo VM defined and running")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config)
        return int(args.func(args, cfg))
    except KvmhooksError as e:
        print(f"kvmhooks: {e}", file=sys.stderr)
        return EXIT_FINDING
    except PermissionError as e:
        print(f"kvmhooks: permission denied: {e.filename or e}: run as root", file=sys.stderr)
        return EXIT_FINDING
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
