"""Samples of the queues and the fleet over time, and the `kubectl get ocq` tables."""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import kubernetes
import requests

from ..broker import Broker, quote_vhost

logger = logging.getLogger(__name__)

SAMPLE_INTERVAL_SECONDS = 1.0
KUBECTL_TIMEOUT_SECONDS = 30


@dataclass(frozen=True)
class QueueFigures:
    """Message counts of one queue from the management API.

    The management API refreshes them every 5 s (RabbitMQ's default
    collect_statistics_interval), so they lag the queue by up to that much.
    """

    ready: int
    unacknowledged: int
    consumers: int


@dataclass(frozen=True)
class Sample:
    """The state at `seconds` after the first publish (negative before it)."""

    seconds: float
    queue: QueueFigures | None
    dead_letter: QueueFigures | None
    desired_replicas: int | None
    running_agents: int


def read_queue_figures(broker: Broker, vhost: str, queue: str) -> QueueFigures | None:
    """Return the queue's figures, or None when it does not exist or has no figures yet.

    Raises requests.RequestException when the management API does not respond.
    """
    url = f"{broker.management_url}/api/queues/{quote_vhost(vhost)}/{quote(queue, safe='')}"
    with broker.management_session() as session:
        response = session.get(url)
    if response.status_code == 404:
        return None
    response.raise_for_status()
    data = response.json()
    if "messages_ready" not in data:
        # A queue declared moments ago has no statistics until the next refresh.
        return None
    return QueueFigures(
        ready=int(data["messages_ready"]),
        unacknowledged=int(data["messages_unacknowledged"]),
        consumers=int(data.get("consumers", 0)),
    )


class ProgressRecorder:
    """Samples every second in a thread; prints `kubectl get ocq` every few seconds."""

    def __init__(
        self,
        *,
        broker: Broker,
        vhost: str,
        queue: str,
        dead_letter_queue: str,
        api_client: kubernetes.client.ApiClient,
        namespace: str,
        deployment: str,
        running_agents: Callable[[], int],
        kubectl: list[str],
        table_interval_seconds: float,
    ) -> None:
        self.broker = broker
        self.vhost = vhost
        self.queue = queue
        self.dead_letter_queue = dead_letter_queue
        self.apps = kubernetes.client.AppsV1Api(api_client)
        self.namespace = namespace
        self.deployment = deployment
        self.running_agents = running_agents
        self.kubectl = kubectl
        self.table_interval_seconds = table_interval_seconds
        self.samples: list[Sample] = []
        self.origin = time.monotonic()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=KUBECTL_TIMEOUT_SECONDS + 5)

    def set_origin(self, origin: float) -> None:
        """Measure sample times from `origin`, a time.monotonic() value."""
        with self._lock:
            self.origin = origin

    def elapsed(self) -> float:
        with self._lock:
            return time.monotonic() - self.origin

    def latest(self) -> Sample | None:
        with self._lock:
            return self.samples[-1] if self.samples else None

    def snapshot(self) -> list[Sample]:
        with self._lock:
            return list(self.samples)

    def print_table(self) -> None:
        """Print `kubectl get ocq` for the demo's namespace, as a user would see it."""
        try:
            result = subprocess.run(
                [*self.kubectl, "get", "ocq", "--namespace", self.namespace],
                capture_output=True,
                text=True,
                timeout=KUBECTL_TIMEOUT_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired:
            # A slow API server delays the table, not the demo.
            print(f"[{self.elapsed():6.1f} s] kubectl get ocq timed out", flush=True)
            return
        text = result.stdout if result.returncode == 0 else result.stderr
        lines = text.rstrip().splitlines() or ["(no output)"]
        print(f"[{self.elapsed():6.1f} s] kubectl get ocq", flush=True)
        for line in lines:
            print(f"    {line}", flush=True)

    def _run(self) -> None:
        next_table = time.monotonic()
        while not self._stopping.is_set():
            self._record_sample()
            if time.monotonic() >= next_table:
                self.print_table()
                next_table = time.monotonic() + self.table_interval_seconds
            self._stopping.wait(SAMPLE_INTERVAL_SECONDS)

    def _record_sample(self) -> None:
        try:
            queue = read_queue_figures(self.broker, self.vhost, self.queue)
            dead_letter = read_queue_figures(self.broker, self.vhost, self.dead_letter_queue)
        except requests.RequestException as error:
            # A missed sample leaves a gap in the plot; the summary counts later.
            logger.warning("Reading queue figures failed: %s", error)
            return
        sample = Sample(
            seconds=self.elapsed(),
            queue=queue,
            dead_letter=dead_letter,
            desired_replicas=self._read_desired_replicas(),
            running_agents=self.running_agents(),
        )
        with self._lock:
            self.samples.append(sample)

    def _read_desired_replicas(self) -> int | None:
        try:
            deployment = self.apps.read_namespaced_deployment(self.deployment, self.namespace)
        except kubernetes.client.ApiException as error:
            if error.status != 404:
                logger.warning(
                    "Reading Deployment %s failed: HTTP %s.", self.deployment, error.status
                )
            return None
        return int(deployment.spec.replicas or 0)


def kubectl_command(kubectl: Path, kubeconfig: Path) -> list[str]:
    """Return the kubectl command line prefix for the administrator's kubeconfig."""
    return [str(kubectl), f"--kubeconfig={kubeconfig}"]
