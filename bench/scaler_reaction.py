"""Measure the time from publishing a backlog to the agent Deployment's new replica count.

Runs the operator as a subprocess for one fresh namespace, creates an
OpenCheckQueue (target 10 messages per replica, 1 s scale-down window), and
for each round publishes 40 messages at a random moment and records:

- publish to replicas: until the Deployment's spec.replicas is 4, as a
  user sees it (poll interval, live queue read, API round trips);
- publish to statistics: until the management API's statistics listing,
  the source of KEDA's scaler in HTTP mode, reports the 40 messages. A
  scaler reading that listing cannot react sooner than this.

Then it purges the queue and waits for the fleet to return to 0. It runs
the rounds for each poll interval given.

Servers: the `make env-up` environment when it runs, else private ones.
Bounded: every wait has a timeout.

    python bench/scaler_reaction.py [--poll-intervals 1,5] [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pika
import requests
from openchecker_testenv.broker import Broker, quote_vhost
from openchecker_testenv.layout import StateLayout, default_state_dir
from openchecker_testenv.session import SessionEnvironment

REPOSITORY = Path(__file__).resolve().parents[1]
CRD_NAME = "opencheckqueues.openchecker.io"
GROUP, VERSION, PLURAL = "openchecker.io", "v1alpha1", "opencheckqueues"
SECRET_NAME = "rabbitmq-connection"
MESSAGES = 40
EXPECTED_REPLICAS = 4
WAIT_TIMEOUT_SECONDS = 60.0
OPERATOR_START_TIMEOUT_SECONDS = 30.0
# RabbitMQ's default collect_statistics_interval, in seconds.
STATISTICS_PERIOD_SECONDS = 5.0
# How often the script checks the broker and the Deployment, in seconds.
PROBE_INTERVAL_SECONDS = 0.02


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--poll-intervals", default="1,5", help="seconds, comma-separated")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per poll interval")
    arguments = parser.parse_args()
    intervals = [float(value) for value in arguments.poll_intervals.split(",")]

    environment = SessionEnvironment(StateLayout(default_state_dir()))
    try:
        control_plane = environment.control_plane()
        broker = environment.broker()
        kubectl = [str(environment.kubectl()), f"--kubeconfig={control_plane.kubeconfig}"]
        run_checked([*kubectl, "apply", "--server-side", "--force-conflicts", "-k", "crds"])
        run_checked([*kubectl, "wait", "--for=condition=Established", f"crd/{CRD_NAME}"])
        api = kubernetes.config.new_client_from_config(config_file=str(control_plane.kubeconfig))
        machine = f"{os.cpu_count()} CPUs, {platform.platform()}"
        print(f"Machine: {machine}, Python {platform.python_version()}", flush=True)
        results = {
            interval: measure(api, broker, control_plane.kubeconfig, interval, arguments.rounds)
            for interval in intervals
        }
        print_table(results)
        api.close()
    finally:
        environment.close()
    return 0


def run_checked(command: list[str]) -> None:
    subprocess.run(command, check=True, capture_output=True, cwd=REPOSITORY)


def measure(
    api: kubernetes.client.ApiClient,
    broker: Broker,
    kubeconfig: Path,
    poll_seconds: float,
    rounds: int,
) -> list[tuple[float, float]]:
    """Return (publish to statistics, statistics to replicas) in seconds, per round."""
    namespace = f"bench-reaction-{uuid.uuid4().hex[:6]}"
    core = kubernetes.client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": namespace}})
    broker.create_vhost(namespace)
    try:
        create_resource(api, broker, namespace, poll_seconds)
        with running_operator(namespace, kubeconfig):
            return [one_round(api, broker, namespace, poll_seconds) for _ in range(rounds)]
    finally:
        core.delete_namespace(namespace)
        broker.delete_vhost(namespace)


def create_resource(
    api: kubernetes.client.ApiClient, broker: Broker, namespace: str, poll_seconds: float
) -> None:
    data = {
        "host": broker.host,
        "port": str(broker.amqp_port),
        "username": broker.username,
        "password": broker.password,
        "management_url": broker.management_url,
    }
    kubernetes.client.CoreV1Api(api).create_namespaced_secret(
        namespace, {"metadata": {"name": SECRET_NAME}, "stringData": data}
    )
    connection = pika.BlockingConnection(pika.URLParameters(broker.amqp_url(namespace)))
    try:
        channel = connection.channel()
        # The arguments the operator declares the queues with, so the two
        # declares agree whichever runs first.
        channel.queue_declare("work.dlq", durable=True, arguments={"x-queue-type": "classic"})
        channel.queue_declare(
            "work",
            durable=True,
            arguments={
                "x-queue-type": "classic",
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": "work.dlq",
            },
        )
    finally:
        connection.close()
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "OpenCheckQueue",
        "metadata": {"name": "work"},
        "spec": {
            "queue": {"name": "work", "vhost": namespace},
            "connection": {"secretRef": {"name": SECRET_NAME}},
            "scaling": {
                "minReplicas": 0,
                "maxReplicas": 10,
                "messagesPerReplica": 10,
                "pollIntervalSeconds": poll_seconds,
                "scaleDownStabilizationSeconds": 1,
            },
        },
    }
    kubernetes.client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body
    )


@contextlib.contextmanager
def running_operator(namespace: str, kubeconfig: Path) -> Iterator[None]:
    """Run the operator for `namespace` until the block ends."""
    environment = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1"}
    with tempfile.NamedTemporaryFile("w+", prefix="operator-", suffix=".log") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "openchecker_operator",
                "--standalone",
                "--namespace",
                namespace,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment,
        )
        try:
            wait(
                lambda: "Operator started" in Path(log.name).read_text(),
                OPERATOR_START_TIMEOUT_SECONDS,
                "the operator did not start",
            )
            yield
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                # kopf's cleanup hung; the bench must not leave it running.
                process.kill()
                process.wait(10)


def one_round(
    api: kubernetes.client.ApiClient, broker: Broker, namespace: str, poll_seconds: float
) -> tuple[float, float]:
    """Return (publish to new replicas, publish to statistics) in seconds."""
    apps = kubernetes.client.AppsV1Api(api)

    def replicas() -> int | None:
        try:
            scale = apps.read_namespaced_deployment_scale("work-agent", namespace)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise
        return int(scale.spec.replicas or 0)

    wait(lambda: replicas() == 0, WAIT_TIMEOUT_SECONDS, "the fleet did not start at 0")
    wait(lambda: ready_count(broker, namespace) == 0, WAIT_TIMEOUT_SECONDS, "queue not empty")
    # A random phase against the poll and statistics timers, so rounds do
    # not all start at the same point of either cycle.
    time.sleep(random.uniform(0, max(poll_seconds, STATISTICS_PERIOD_SECONDS)))
    connection = pika.BlockingConnection(pika.URLParameters(broker.amqp_url(namespace)))
    try:
        channel = connection.channel()
        published = time.monotonic()
        for _ in range(MESSAGES):
            channel.basic_publish("", "work", b"{}")
        scaled = reported = None
        deadline = published + WAIT_TIMEOUT_SECONDS
        while scaled is None or reported is None:
            if time.monotonic() > deadline:
                raise SystemExit("Timed out waiting for the scale-up and the statistics.")
            if scaled is None and replicas() == EXPECTED_REPLICAS:
                scaled = time.monotonic() - published
            if reported is None and ready_count(broker, namespace) == MESSAGES:
                reported = time.monotonic() - published
            time.sleep(PROBE_INTERVAL_SECONDS)
        channel.queue_purge("work")
    finally:
        connection.close()
    return scaled, reported


def ready_count(broker: Broker, vhost: str) -> int | None:
    url = f"{broker.management_url}/api/queues/{quote_vhost(vhost)}/work"
    try:
        with broker.management_session() as session:
            reply: dict[str, Any] = session.get(url).json()
    except (requests.RequestException, ValueError):
        # A failed probe counts as "not yet"; the wait's timeout bounds it.
        return None
    ready = reply.get("messages_ready")
    return ready if isinstance(ready, int) else None


def wait(predicate: Callable[[], bool], timeout_seconds: float, message: str) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"Timed out after {timeout_seconds:.0f} s: {message}.")
        time.sleep(PROBE_INTERVAL_SECONDS)


def print_table(results: dict[float, list[tuple[float, float]]]) -> None:
    print()
    header = (
        f"{'poll s':>6}  {'stat':>6}  {'publish->replicas s':>19}  {'publish->statistics s':>21}"
    )
    print(header)
    print("-" * len(header))
    for interval, rounds in results.items():
        for label, pick in (("min", min), ("median", statistics.median), ("max", max)):
            scaled = pick(first for first, _ in rounds)
            reported = pick(second for _, second in rounds)
            print(f"{interval:>6g}  {label:>6}  {scaled:>19.2f}  {reported:>21.2f}")


if __name__ == "__main__":
    sys.exit(main())
