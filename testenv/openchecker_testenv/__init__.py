"""Local kube-apiserver, etcd, kube-controller-manager and RabbitMQ for tests and development.

`python -m openchecker_testenv up|down|status` manages the shared environment
in `.local/`; tests/conftest.py turns the same servers into pytest fixtures.
"""

from .broker import Broker
from .controlplane import ControlPlane
from .errors import SetupError

__all__ = ["Broker", "ControlPlane", "SetupError"]
