"""`kvmhooks balloond` and `kvmhooks demo`."""

from __future__ import annotations

import argparse
import sys

from kvmhooks.cli.exit import EXIT_OK
from kvmhooks.config import Config


def cmd_demo(args: argparse.Namespace, cfg: Config) -> int:
    from kvmhooks.cli.demo import run_demo

    return run_demo(cfg, keep=args.keep, uri=args.uri or cfg.libvirt_uri)


def cmd_balloond(args: argparse.Namespace, cfg: Config) -> int:
    from dataclasses import replace

    from kvmhooks.balloond import run
    from kvmhooks.log import setup_logging

    setup_logging("stderr" if args.foreground_log else cfg.log, cfg.log_level, "balloond")
    if args.interval:
        cfg = replace(cfg, balloon_interval=args.interval)
    return run(cfg, once=args.once)


def cmd_metrics(args: argparse.Namespace, cfg: Config) -> int:
    """The Prometheus exposition of the host's state now (pools, reservations, pins, failures): to stdout,
    or as a node_exporter textfile written atomically (for cron). To stdout it is kvmhooksd's own (its
    counters and durations too) when the agent answers on its unix socket."""
    from kvmhooks.metrics import render, state_registry, write_textfile

    reg = state_registry(cfg)
    if args.textfile:
        write_textfile(reg, args.textfile)
        return EXIT_OK
    from kvmhooks.agent import metrics_socket_path
    from kvmhooks.metrics import fetch_unix

    served = fetch_unix(metrics_socket_path(cfg))
    sys.stdout.write(served.decode() if served is not None else render(reg).decode())
    return EXIT_OK


def cmd_agent(args: argparse.Namespace, cfg: Config) -> int:
    """kvmhooksd in the foreground (a systemd unit where systemd runs; demo.sh and the tests start it so)."""
    import signal

    from kvmhooks.agent import Agent
    from kvmhooks.log import setup_logging

    setup_logging("stderr" if args.foreground_log else cfg.log, cfg.log_level, "agent")
    agent = Agent(cfg)
    signal.signal(signal.SIGTERM, lambda *_: agent.stop.set())
    signal.signal(signal.SIGINT, lambda *_: agent.stop.set())
    return agent.run()
