"""K3s and RabbitMQ in Docker containers, for machines with a Docker engine.

NOTE: this path was written against testcontainers 4.15 but never run,
because the machine it was developed on has no Docker engine. The local
binaries are the tested path; set OPENCHECKER_TESTENV_BACKEND=local to use
them even where Docker runs.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from .broker import Broker
from .controlplane import ControlPlane
from .errors import SetupError
from .kubeconfig import extract_credentials

logger = logging.getLogger(__name__)

K3S_IMAGE_VARIABLE = "OPENCHECKER_TESTENV_K3S_IMAGE"
RABBITMQ_IMAGE_VARIABLE = "OPENCHECKER_TESTENV_RABBITMQ_IMAGE"
# The Kubernetes release of hack/versions.env. NOTE: the tag was not pulled
# here; override it with OPENCHECKER_TESTENV_K3S_IMAGE if it does not exist.
DEFAULT_K3S_IMAGE = "rancher/k3s:v1.36.3-k3s1"
DEFAULT_RABBITMQ_IMAGE = "rabbitmq:3.13-management"
AMQP_PORT = 5672
MANAGEMENT_PORT = 15672
MANAGEMENT_READY_TIMEOUT_SECONDS = 60.0


def is_docker_engine_available() -> bool:
    """Return whether `docker info` succeeds, which means a Docker engine responds."""
    if shutil.which("docker") is None:
        return False
    try:
        result = subprocess.run(["docker", "info"], capture_output=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


class ContainerEnvironment:
    """Starts K3s and RabbitMQ containers and removes them on `stop`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._containers: list[Any] = []

    def start_control_plane(self) -> ControlPlane:
        try:
            from testcontainers.community.k3s import K3SContainer
        except ImportError:
            from testcontainers.k3s import K3SContainer

        image = os.environ.get(K3S_IMAGE_VARIABLE, DEFAULT_K3S_IMAGE)
        logger.info("Starting a K3s container from %s.", image)
        container = K3SContainer(image=image)
        self._containers.append(container)
        container.start()
        kubeconfig = self.folder / "kubeconfig"
        kubeconfig.parent.mkdir(parents=True, exist_ok=True)
        kubeconfig.write_text(container.config_yaml())
        server, ca_file, cert_file, key_file = extract_credentials(kubeconfig, self.folder / "pki")
        return ControlPlane(
            server=server,
            kubeconfig=kubeconfig,
            ca_file=ca_file,
            client_cert_file=cert_file,
            client_key_file=key_file,
        )

    def start_broker(self) -> Broker:
        try:
            from testcontainers.community.rabbitmq import RabbitMqContainer
        except ImportError:
            from testcontainers.rabbitmq import RabbitMqContainer

        image = os.environ.get(RABBITMQ_IMAGE_VARIABLE, DEFAULT_RABBITMQ_IMAGE)
        logger.info("Starting a RabbitMQ container from %s.", image)
        container = RabbitMqContainer(image=image)
        container.with_exposed_ports(MANAGEMENT_PORT)
        self._containers.append(container)
        # Returns once AMQP accepts connections; the management plugin may
        # need a few more seconds.
        container.start()
        host = container.get_container_host_ip()
        broker = Broker(
            host=host,
            amqp_port=int(container.get_exposed_port(AMQP_PORT)),
            management_url=f"http://{host}:{container.get_exposed_port(MANAGEMENT_PORT)}",
            username=container.username,
            password=container.password,
        )
        deadline = time.monotonic() + MANAGEMENT_READY_TIMEOUT_SECONDS
        while not broker.is_ready():
            if time.monotonic() > deadline:
                raise SetupError(
                    f"The RabbitMQ container's management API at {broker.management_url} "
                    f"did not respond within {MANAGEMENT_READY_TIMEOUT_SECONDS:.0f} s."
                )
            time.sleep(0.5)
        return broker

    def stop(self) -> None:
        while self._containers:
            container = self._containers.pop()
            container.stop()
