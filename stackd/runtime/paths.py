"""Where a stack's host resources live: state under /run/stackd/<project>, logs under /var/log/stackd."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEFAULT_LOG_ROOT", "DEFAULT_STATE_ROOT", "StackPaths", "short_hash"]

DEFAULT_STATE_ROOT = Path(os.environ.get("STACKD_STATE_DIR", "/run/stackd"))
DEFAULT_LOG_ROOT = Path(os.environ.get("STACKD_LOG_DIR", "/var/log/stackd"))


def short_hash(*parts: str, length: int = 8) -> str:
    """A short, stable hex name for kernel objects with tight name limits (interfaces: 15 bytes)."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:length]


@dataclass(frozen=True, slots=True)
class StackPaths:
    """The directories of one project; nothing here creates them."""

    project: str
    state_root: Path = DEFAULT_STATE_ROOT
    log_root: Path = DEFAULT_LOG_ROOT

    @property
    def state(self) -> Path:
        return self.state_root / self.project

    @property
    def logs(self) -> Path:
        return self.log_root / self.project

    def service(self, service: str) -> Path:
        """The service's own state: its writable layer, work dir and root mount point."""
        return self.state / "services" / service

    def upper(self, service: str) -> Path:
        return self.service(service) / "upper"

    def work(self, service: str) -> Path:
        return self.service(service) / "work"

    def root(self, service: str) -> Path:
        return self.service(service) / "root"
