"""Paths of the environment's files: the repository checkout and the state folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Overrides the state folder of `python -m openchecker_testenv` and of the
# environment that test sessions look for to reuse.
STATE_DIR_VARIABLE = "OPENCHECKER_TESTENV_STATE_DIR"


def find_repository_root() -> Path | None:
    """Return the checkout this package runs from, or None for an installed copy."""
    root = Path(__file__).resolve().parents[2]
    if (root / "hack" / "build-control-plane.sh").is_file():
        return root
    return None


def default_state_dir() -> Path:
    """Return $OPENCHECKER_TESTENV_STATE_DIR, else `.local` in the checkout or the
    current folder."""
    configured = os.environ.get(STATE_DIR_VARIABLE)
    if configured:
        return Path(configured).resolve()
    root = find_repository_root()
    return (root if root is not None else Path.cwd()) / ".local"


@dataclass(frozen=True)
class StateLayout:
    """The files of one environment under its state folder."""

    root: Path

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig (client certificate in group system:masters)."""
        return self.root / "kubeconfig"

    @property
    def env_file(self) -> Path:
        """Shell-sourceable KUBECONFIG and RABBITMQ_* variables."""
        return self.root / "env"

    @property
    def state_file(self) -> Path:
        """JSON description of the running servers, read to reuse them."""
        return self.root / "state.json"

    @property
    def lock_file(self) -> Path:
        return self.root / "lock"

    @property
    def pids(self) -> Path:
        return self.root / "pids"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def etcd_data(self) -> Path:
        return self.root / "etcd"

    @property
    def rabbitmq(self) -> Path:
        return self.root / "rabbitmq"
