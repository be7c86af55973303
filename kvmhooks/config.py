"""Host configuration (/etc/kvmhooks/config.toml) and the host paths every adapter is rooted at.

Every host path sits behind a root here, so unit tests run whole hook operations against a fake tree by
pointing ``sysfs_root``/``proc_root``/``state_dir`` elsewhere. A missing file means the defaults below.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path

from kvmhooks.errors import ConfigError
from kvmhooks.units import clip, parse_cpuset, parse_size_kib

DEFAULT_CONFIG = Path("/etc/kvmhooks/config.toml")
# The hook is started by libvirtd with a clean environment; this variable only matters to tests and to
# an admin running the hook by hand against another tree.
CONFIG_ENV = "KVMHOOKS_CONFIG"


@dataclass(frozen=True)
class Config:
    # How long a hook waits for the ledger lock. Hooks hold it for milliseconds; 30 s means something is
    # stuck, and libvirt has no timeout of its own on hooks, so we must have one.
    lock_timeout: float = 30.0
    # How long prepare keeps compacting memory and retrying when the kernel gives fewer pages than asked.
    retry_timeout: float = 10.0
    # Memory per NUMA node that hugepage reservations never take (KiB): keeps the host itself alive.
    host_reserve_kib: int = 1024 * 1024
    # Pools ("node0/2M", "node1/1G") kvmhooks never writes; VMs may still use pages the admin put there.
    leave_alone: frozenset[str] = frozenset()
    # "syslog", a file path, or "stderr" (for running by hand; never stdout).
    log: str = "/var/log/kvmhooks/kvmhooks.log"
    log_level: str = "INFO"
    libvirt_uri: str = "qemu:///system"
    # What kvmhooksd does when a managed VM's pins are changed by hand: "report" (log, kvmhooks status) or
    # "restore" (also put the planned pins back).
    drift: str = "report"
    # kvmhooksd serves its Prometheus metrics here ("127.0.0.1:9765"); empty: not served (kvmhooks metrics).
    metrics_listen: str = ""
    # Host CPUs kvmhooks may hand out for automatic placement (None: all online minus housekeeping).
    cpu_allowed: frozenset[int] | None = None
    cpu_housekeeping: frozenset[int] = frozenset({0})
    # How long the detached worker waits for the domain to be running before giving up.
    worker_timeout: float = 60.0
    # How long a claim made for an incoming migration or restore (the migrate/restore filter) waits for that
    # VM's prepare. libvirt runs prepare right after the filter, so a claim older than this belongs to a
    # migration that failed, went offline or elsewhere: nothing else would ever release it.
    claim_timeout: float = 120.0
    # How long the worker waits for a guest's balloon driver to come up (a guest boots in that time).
    balloon_timeout: float = 120.0
    # The automatic balloon service: seconds between cycles, largest change per cycle, and the host memory
    # use above which guests are squeezed (prior art: Proxmox autoballoon, 80 % / 100 MiB / 10 s).
    balloon_interval: float = 10.0
    balloon_step_kib: int = 100 * 1024
    balloon_host_target: float = 0.80
    sysfs_root: Path = Path("/sys")
    proc_root: Path = Path("/proc")
    # Where host isolation (<kvm:host>) finds the cgroup hierarchies and systemd's runtime directory.
    cgroup_root: Path = Path("/sys/fs/cgroup")
    run_root: Path = Path("/run")
    state_dir: Path = Path("/run/kvmhooks")
    hooks_dir: Path = Path("/etc/libvirt/hooks")
    # Persistent bookkeeping of `kvmhooks annotate` (what it added, so --remove takes exactly that away).
    lib_dir: Path = Path("/var/lib/kvmhooks")

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.json"


_SIMPLE = {"lock_timeout": float, "retry_timeout": float, "worker_timeout": float, "claim_timeout": float,
           "log": str, "log_level": str,
           "balloon_timeout": float, "balloon_interval": float, "balloon_host_target": float,
           "libvirt_uri": str, "sysfs_root": Path, "proc_root": Path, "cgroup_root": Path, "run_root": Path,
           "state_dir": Path, "hooks_dir": Path,
           "lib_dir": Path, "drift": str, "metrics_listen": str}


def load_config(path: Path | None = None) -> Config:
    """Read the TOML config; unknown keys are an error (a typo would otherwise silently do nothing)."""
    if path is None:
        path = Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return Config()
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    return config_from_dict(data, str(path))


def config_from_dict(data: dict[str, object], where: str = "config") -> Config:
    cfg = Config()
    known = {f.name for f in fields(Config)} | {"host_reserve", "cpu", "balloon_step"}
    changes: dict[str, object] = {}
    for key, value in data.items():
        if key not in known or key in ("host_reserve_kib", "cpu_allowed", "cpu_housekeeping",
                                       "balloon_step_kib"):
            raise ConfigError(f"{where}: unknown setting {key!r}")
        try:
            if key in _SIMPLE:
                if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                    raise ValueError("expected a string or number")
                changes[key] = _SIMPLE[key](value)
            elif key in ("host_reserve", "balloon_step"):
                changes[key + "_kib"] = parse_size_kib(str(value))
            elif key == "leave_alone":
                if not isinstance(value, list):
                    raise ValueError("expected a list like ['node0/1G']")
                changes[key] = frozenset(_pool_name(str(v)) for v in value)
            elif key == "cpu":
                if not isinstance(value, dict):
                    raise ValueError("expected a [cpu] table")
                for ck, cv in value.items():
                    if ck == "allowed":
                        changes["cpu_allowed"] = parse_cpuset(str(cv))
                    elif ck == "housekeeping":
                        changes["cpu_housekeeping"] = frozenset() if str(cv).strip() == "" else parse_cpuset(str(cv))
                    else:
                        raise ValueError(f"unknown [cpu] setting {ck!r} (known: allowed, housekeeping)")
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where}: {key}: {e}") from None
    if changes.get("drift", "report") not in ("report", "restore"):
        raise ConfigError(f"{where}: drift: expected 'report' or 'restore', got {clip(str(changes['drift']))}")
    listen = str(changes.get("metrics_listen", ""))
    if listen and not (listen.rpartition(":")[2].isdecimal() and listen.rpartition(":")[0]):
        raise ConfigError(f"{where}: metrics_listen: expected HOST:PORT like 127.0.0.1:9765, got {clip(listen)}")
    return replace(cfg, **changes)  # type: ignore[arg-type]


def _pool_name(text: str) -> str:
    """Normalise "node0/2M" / "node0/2048kB" to the ledger's pool key "node0/2048kB"."""
    node, _, size = text.partition("/")
    if not node.startswith("node") or not node[4:].isdigit():
        raise ValueError(f"bad pool {text!r}: expected nodeN/SIZE like node0/2M")
    kib = parse_size_kib(size.removesuffix("B").removesuffix("b") if size.lower().endswith("kb") else size)
    return pool_key(int(node[4:]), kib)


def pool_key(node: int, size_kib: int) -> str:
    return f"node{node}/{size_kib}kB"


def parse_pool_key(key: str) -> tuple[int, int]:
    """The inverse of :func:`pool_key`: "node1/2048kB" → (1, 2048)."""
    node, _, size = key.partition("/")
    return int(node.removeprefix("node")), int(size.removesuffix("kB"))
