"""Local agent processes that stand in for the pods of the agent Deployment.

This machine runs no kubelet and no container runtime, so the Deployment's
pods are created but never run. The fleet here reads the Deployment's
`spec.replicas`, which the operator's scaler writes, and keeps that many
`openchecker-agent` processes running, each with the config.ini that the
operator rendered into the Secret `<name>-agent-config`. It scales down the
way Kubernetes stops a pod: SIGTERM, after which the agent drains.
"""

from __future__ import annotations

import base64
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import kubernetes

from ..files import write_private_text

logger = logging.getLogger(__name__)

CONFIG_KEY = "config.ini"
# Seconds between two reads of the Deployment: a pod starts in about as long.
FOLLOW_INTERVAL_SECONDS = 0.5


@dataclass
class AgentProcess:
    """One agent process, `draining` once it received SIGTERM."""

    name: str
    popen: subprocess.Popen[bytes]
    log_file: Path
    draining: bool = False


class LocalAgentFleet:
    """Keeps `spec.replicas` of Deployment `deployment` in `namespace` as local processes."""

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        namespace: str,
        deployment: str,
        config_secret: str,
        folder: Path,
    ) -> None:
        self.apps = kubernetes.client.AppsV1Api(api_client)
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.namespace = namespace
        self.deployment = deployment
        self.config_secret = config_secret
        self.folder = folder
        self._lock = threading.Lock()
        self._agents: list[AgentProcess] = []
        self._started_total = 0
        self._peak_running = 0
        self._problems: list[str] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="agent-fleet", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def running_count(self) -> int:
        """Return the agents that run and were not asked to stop."""
        with self._lock:
            return sum(1 for agent in self._agents if not agent.draining)

    def process_count(self) -> int:
        """Return every agent process that has not exited, draining ones included."""
        with self._lock:
            return len(self._agents)

    def peak_running(self) -> int:
        with self._lock:
            return self._peak_running

    def problems(self) -> list[str]:
        """Return agent exits that were not asked for or not clean, as messages."""
        with self._lock:
            return list(self._problems)

    def stop(self, grace_seconds: float) -> None:
        """Stop following, send SIGTERM to every agent, and kill those still running after
        `grace_seconds`."""
        self._stopping.set()
        self._thread.join(timeout=10)
        with self._lock:
            agents = list(self._agents)
        for agent in agents:
            if not agent.draining:
                self._terminate(agent)
        deadline = time.monotonic() + grace_seconds
        for agent in agents:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                agent.popen.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                self._note_problem(f"{agent.name} did not exit within {grace_seconds:.0f} s")
                # The agent's session also contains the commands it runs.
                os.killpg(agent.popen.pid, signal.SIGKILL)
                agent.popen.wait(timeout=5)
        self._reap()

    def _follow(self) -> None:
        while not self._stopping.wait(FOLLOW_INTERVAL_SECONDS):
            self._reap()
            try:
                desired = self._read_desired_replicas()
                self._converge(desired)
            except kubernetes.client.ApiException as error:
                # The API server may be busy for a moment, so the next round retries.
                logger.warning(
                    "Reading %s/%s failed: HTTP %s %s.",
                    self.namespace,
                    self.deployment,
                    error.status,
                    error.reason,
                )

    def _read_desired_replicas(self) -> int:
        try:
            deployment = self.apps.read_namespaced_deployment(self.deployment, self.namespace)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                # Not created yet, or deleted with its OpenCheckQueue: no agents.
                return 0
            raise
        return int(deployment.spec.replicas or 0)

    def _converge(self, desired: int) -> None:
        with self._lock:
            active = [agent for agent in self._agents if not agent.draining]
        if len(active) < desired:
            config_file = self._write_config()
            for _ in range(desired - len(active)):
                self._launch(config_file)
        for agent in reversed(active[desired:]):
            logger.info("Scaling down: stopping agent %s with SIGTERM.", agent.name)
            self._terminate(agent)

    def _write_config(self) -> Path:
        """Copy config.ini from the operator's Secret into a file only this user can read."""
        secret = self.core.read_namespaced_secret(self.config_secret, self.namespace)
        text = base64.b64decode((secret.data or {})[CONFIG_KEY]).decode("utf-8")
        path = self.folder / CONFIG_KEY
        write_private_text(path, text)
        return path

    def _launch(self, config_file: Path) -> None:
        with self._lock:
            self._started_total += 1
            name = f"{self.deployment}-local-{self._started_total}"
        log_file = self.folder / "logs" / f"{name}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "openchecker_agent", "--config", str(config_file)]
        with log_file.open("wb") as log:
            popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._agent_environment(name),
                start_new_session=True,
            )
        logger.info("Started agent %s (pid %d).", name, popen.pid)
        with self._lock:
            self._agents.append(AgentProcess(name, popen, log_file))
            running = sum(1 for agent in self._agents if not agent.draining)
            self._peak_running = max(self._peak_running, running)

    def _agent_environment(self, name: str) -> dict[str, str]:
        environment = dict(os.environ)
        # The downward API sets POD_NAME in a pod; the agent names its AMQP
        # connection after it.
        environment["POD_NAME"] = name
        # Pods each have their own network namespace, but local processes
        # would collide on the rendered port 8080. The demo does not probe
        # the agents, so their health server stays off.
        environment["OPENCHECKER_AGENT_HEALTH_PORT"] = "0"
        environment["OPENCHECKER_AGENT_WORKDIR"] = str(self.folder / "work" / name)
        return environment

    def _terminate(self, agent: AgentProcess) -> None:
        agent.draining = True
        if agent.popen.poll() is None:
            # Like the kubelet, signal only the agent, which stops its commands itself.
            agent.popen.send_signal(signal.SIGTERM)

    def _reap(self) -> None:
        with self._lock:
            agents = list(self._agents)
        for agent in agents:
            code = agent.popen.poll()
            if code is None:
                continue
            if not agent.draining:
                self._note_problem(
                    f"agent {agent.name} exited with code {code} unasked; see {agent.log_file}"
                )
            elif code != 0:
                self._note_problem(
                    f"agent {agent.name} exited with code {code} after SIGTERM; "
                    f"see {agent.log_file}"
                )
            else:
                logger.info("Agent %s drained and exited.", agent.name)
            with self._lock:
                self._agents.remove(agent)

    def _note_problem(self, message: str) -> None:
        logger.error("%s", message)
        with self._lock:
            self._problems.append(message)
