"""Live tuning of a running domain through libvirt-python. Called from the detached worker only."""

from __future__ import annotations

from typing import Any

from kvmhooks.config import Config
from kvmhooks.log import VMLog


def apply_started(conn: Any, dom: Any, cfg: Config, vlog: VMLog) -> dict[str, Any]:
    """Apply the live part of the plan; returns what was applied (recorded in the ledger)."""
    return {"state": "running", "id": dom.ID()}
