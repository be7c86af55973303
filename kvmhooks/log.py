"""Logging for hooks and workers: never stdout (it is libvirt's XML channel for migrate/restore)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

_FORMAT = "%(asctime)s kvmhooks[%(process)d] %(levelname)s %(message)s"


def setup_logging(target: str, level: str = "INFO", tag: str = "") -> None:
    """Send logs to syslog, a file, or stderr; falls back to syslog, then to nothing, never to stdout."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    handler: logging.Handler
    fmt = _FORMAT.replace("%(levelname)s", f"{tag} %(levelname)s" if tag else "%(levelname)s")
    if target == "stderr":
        handler = logging.StreamHandler(sys.stderr)
    elif target == "syslog":
        handler = _syslog()
        fmt = "kvmhooks[%(process)d]: " + (f"{tag} " if tag else "") + "%(levelname)s %(message)s"
    else:
        try:
            Path(target).parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            handler = logging.FileHandler(target)
            os.chmod(target, 0o640)
        except OSError:
            handler = _syslog()
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)


def _syslog() -> logging.Handler:
    import logging.handlers  # here, not at the top: it pulls in socket and pickle, which a file log never needs

    if os.path.exists("/dev/log"):
        try:
            return logging.handlers.SysLogHandler("/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        except OSError:
            pass
    return logging.NullHandler()


class VMLog(logging.LoggerAdapter[logging.Logger]):
    """A logger whose every line names the VM and its UUID."""

    def __init__(self, name: str, uuid: str, logger: logging.Logger | None = None):
        super().__init__(logger or logging.getLogger("kvmhooks"), {"vm": name, "uuid": uuid})

    def process(self, msg: object, kwargs: dict[str, object]) -> tuple[str, dict[str, object]]:  # type: ignore[override]
        assert self.extra is not None
        return f"VM {self.extra['vm']!r} ({self.extra['uuid']}): {msg}", kwargs
