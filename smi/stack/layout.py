"""Where the stack keeps its files: logs, data and pid files under the var directory
(``var/`` of the working directory, or ``SMI_VAR_DIR``), downloads under the cache
directory (``~/.cache/smi-pipeline``, or ``SMI_CACHE_DIR``) so they outlive a
``rm -rf var``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    var_dir: Path
    cache_dir: Path

    @classmethod
    def from_env(cls) -> Layout:
        var_dir = Path(os.environ.get("SMI_VAR_DIR", "var")).resolve()
        cache_dir = Path(os.environ.get("SMI_CACHE_DIR", "~/.cache/smi-pipeline")).expanduser().resolve()
        return cls(var_dir, cache_dir)

    @property
    def run_dir(self) -> Path:
        return self.var_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.var_dir / "log"

    def pid_file(self, component: str) -> Path:
        return self.run_dir / f"{component}.pid"

    def log_file(self, component: str) -> Path:
        return self.log_dir / f"{component}.log"

    def data_dir(self, component: str) -> Path:
        return self.var_dir / component
