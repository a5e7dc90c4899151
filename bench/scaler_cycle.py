"""Measure the scaler's cost per poll cycle with 1, 10, 100 and 1,000 resources on one broker.

For each size the script creates that many real OpenCheckQueue resources,
their queues on the broker, and their config Secrets and Deployments (with
the operator's own reconcile code), in a fresh namespace and vhost. It then
drives the operator's Scaler in this process against the real API server and
broker, and measures three kinds of poll cycle:

- first: every resource is new, so every status is written;
- idle: nothing changed, so only the broker is read;
- burst: every queue got one message, so every fleet scales from 0 to 1,
  with a scale write, a Scaled Event and a status write per resource.

Per cycle it reports broker requests (counted with a response hook on the
management client's requests session), Kubernetes API requests, wall time
and the CPU time of this process (all threads, so the API and broker calls
are included). Broker requests per cycle must not grow with the resources.

Servers: the `make env-up` environment when it runs, else private ones
started with openchecker_testenv. Each size cleans up its namespace and
vhost. Bounded: each wait has a timeout, and sizes run one after another.

    python bench/scaler_cycle.py [--sizes 1,10,100,1000] [--idle-cycles 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import kubernetes
import pika
import requests
from openchecker_operator import fleet as fleet_service
from openchecker_operator.broker.registry import BrokerRegistry
from openchecker_operator.kube import (
    RESOURCE_GROUP,
    RESOURCE_KIND,
    RESOURCE_PLURAL,
    RESOURCE_VERSION,
    KubeClient,
)
from openchecker_operator.models import broker_settings_from_secret, parse_spec
from openchecker_operator.scaler import CycleReport, FleetRegistry, Scaler, ScaleTarget
from openchecker_operator.workloads import Owner
from openchecker_testenv.broker import Broker
from openchecker_testenv.layout import StateLayout, default_state_dir
from openchecker_testenv.session import SessionEnvironment

REPOSITORY = Path(__file__).resolve().parents[1]
CRD_NAME = "opencheckqueues.openchecker.io"
SECRET_NAME = "rabbitmq-connection"
# Concurrent API calls while creating the objects of one size.
SETUP_THREADS = 8
# Seconds to wait for the broker's statistics to show every queue's message.
STATISTICS_TIMEOUT_SECONDS = 60.0
NAMESPACE_PREFIX = "bench-scaler"

ResultT = TypeVar("ResultT")


@dataclass
class CycleCost:
    """The cost of one poll cycle."""

    broker_requests: int
    api_requests: int
    wall_seconds: float
    cpu_seconds: float
    report: CycleReport


class CountingKubeClient(KubeClient):
    """A KubeClient that counts the API requests it sends."""

    def __init__(self, api_client: kubernetes.client.ApiClient) -> None:
        super().__init__(api_client)
        self.requests = 0

    async def _call(
        self, action: str, function: Callable[..., ResultT], *args: Any, **kwargs: Any
    ) -> ResultT:
        self.requests += 1
        return await super()._call(action, function, *args, **kwargs)


class RequestCounter:
    """A requests response hook that counts the responses of one session."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self.count += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default="1,10,100,1000", help="resource counts, comma-separated"
    )
    parser.add_argument("--idle-cycles", type=int, default=5, help="idle cycles per size")
    arguments = parser.parse_args()
    sizes = [int(size) for size in arguments.sizes.split(",")]

    environment = SessionEnvironment(StateLayout(default_state_dir()))
    try:
        control_plane = environment.control_plane()
        broker = environment.broker()
        kubectl = environment.kubectl()
        apply_crd(kubectl, control_plane.kubeconfig)
        api = kubernetes.config.new_client_from_config(config_file=str(control_plane.kubeconfig))
        machine = f"{os.cpu_count()} CPUs, {platform.platform()}"
        print(f"Machine: {machine}, Python {platform.python_version()}")
        print(f"Broker: RabbitMQ at {broker.management_url}; API server: {control_plane.server}")
        rows = []
        for size in sizes:
            started = time.monotonic()
            rows.append((size, asyncio.run(measure(api, broker, size, arguments.idle_cycles))))
            print(f"size {size}: measured in {time.monotonic() - started:.0f} s", flush=True)
        print_table(rows)
        api.close()
    finally:
        environment.close()
    return 0


def apply_crd(kubectl: Path, kubeconfig: Path) -> None:
    base = [str(kubectl), f"--kubeconfig={kubeconfig}"]
    crds = str(REPOSITORY / "crds")
    subprocess.run(
        [*base, "apply", "--server-side", "--force-conflicts", "-k", crds],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [*base, "wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=30s"],
        check=True,
        capture_output=True,
    )


async def measure(
    api: kubernetes.client.ApiClient, broker: Broker, size: int, idle_cycles: int
) -> dict[str, CycleCost]:
    """Set up `size` resources, measure the three kinds of cycle, clean up."""
    name = f"{NAMESPACE_PREFIX}-{size}-{uuid.uuid4().hex[:6]}"
    core = kubernetes.client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name}})
    broker.create_vhost(name)
    brokers = BrokerRegistry()
    try:
        queues = [f"queue-{index}" for index in range(size)]
        declare_queues(broker, name, queues)
        # New queues have no counts until the broker's next statistics
        # emission; until then every cycle would count a failed read.
        wait_for_statistics(broker, name, size, ready=0)
        kube = CountingKubeClient(api)
        registry, counter = await create_fleets(api, kube, brokers, broker, name, queues)
        scaler = Scaler(registry, kube)

        costs = {"first": await run_cycle(scaler, kube, counter)}
        idle = [await run_cycle(scaler, kube, counter) for _ in range(idle_cycles)]
        costs["idle"] = median_cost(idle)
        publish_one_each(broker, name, queues)
        wait_for_statistics(broker, name, size, ready=1)
        costs["burst"] = await run_cycle(scaler, kube, counter)
        scaled = costs["burst"].report.scaled
        if scaled != size:
            print(f"warning: the burst cycle scaled {scaled} of {size} fleets", file=sys.stderr)
        return costs
    finally:
        brokers.close()
        core.delete_namespace(name)
        broker.delete_vhost(name)


async def create_fleets(
    api: kubernetes.client.ApiClient,
    kube: KubeClient,
    brokers: BrokerRegistry,
    broker: Broker,
    namespace: str,
    queues: list[str],
) -> tuple[FleetRegistry, RequestCounter]:
    """Create the Secret, the resources and their fleets; return the scaler's registry."""
    custom = kubernetes.client.CustomObjectsApi(api)
    core = kubernetes.client.CoreV1Api(api)
    data = {
        "host": broker.host,
        "port": str(broker.amqp_port),
        "username": broker.username,
        "password": broker.password,
        "management_url": broker.management_url,
    }
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": SECRET_NAME}, "stringData": data}
    )

    def create(queue: str) -> dict[str, Any]:
        body = resource_body(queue, namespace)
        created: dict[str, Any] = custom.create_namespaced_custom_object(
            RESOURCE_GROUP, RESOURCE_VERSION, namespace, RESOURCE_PLURAL, body
        )
        return created

    with ThreadPoolExecutor(SETUP_THREADS) as pool:
        resources = list(pool.map(create, queues))

    secret = await kube.read_secret_data(namespace, SECRET_NAME)
    registry = FleetRegistry()
    counter = RequestCounter()
    limit = asyncio.Semaphore(SETUP_THREADS)

    async def build(resource: dict[str, Any]) -> None:
        metadata = resource["metadata"]
        spec = parse_spec(resource["spec"])
        settings = broker_settings_from_secret(secret, spec.connection, SECRET_NAME)
        clients = brokers.get(settings)
        owner = Owner(
            f"{RESOURCE_GROUP}/{RESOURCE_VERSION}",
            RESOURCE_KIND,
            metadata["name"],
            metadata["uid"],
        )
        fleet = fleet_service.fleet_spec(owner, namespace, spec, settings)
        async with limit:
            result = await fleet_service.reconcile_fleet(kube, fleet, None)
        registry.observe_deployment((namespace, owner.name), result.deployment.spec_replicas, 0)
        registry.register(
            ScaleTarget(
                namespace=namespace,
                name=owner.name,
                uid=owner.uid,
                vhost=fleet.connection.vhost,
                queue=fleet.options.queue,
                dead_letter_queue=None,
                broker_key=settings.identity,
                reader=registry.reader_for(settings.identity, clients.management),
                policy=fleet.policy,
                poll_interval_seconds=spec.scaling.poll_interval_seconds,
            ),
            fleet,
        )

    await asyncio.gather(*(build(resource) for resource in resources))
    for clients in brokers.known():
        # The hook on the management client's own session counts every request.
        clients.management._session.hooks["response"].append(counter)
    return registry, counter


def resource_body(queue: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{RESOURCE_GROUP}/{RESOURCE_VERSION}",
        "kind": RESOURCE_KIND,
        "metadata": {"name": queue},
        "spec": {
            "queue": {"name": queue, "vhost": namespace},
            "connection": {"secretRef": {"name": SECRET_NAME}},
            "scaling": {"minReplicas": 0, "maxReplicas": 1, "messagesPerReplica": 10},
        },
    }


async def run_cycle(
    scaler: Scaler, kube: CountingKubeClient, counter: RequestCounter
) -> CycleCost:
    """Poll every resource once and return what it cost."""
    broker_before, api_before = counter.count, kube.requests
    cpu_before, wall_before = time.process_time(), time.monotonic()
    targets = list(scaler.registry.targets.values())
    report = await scaler.poll(targets, time.monotonic())
    return CycleCost(
        broker_requests=counter.count - broker_before,
        api_requests=kube.requests - api_before,
        wall_seconds=time.monotonic() - wall_before,
        cpu_seconds=time.process_time() - cpu_before,
        report=report,
    )


def median_cost(costs: list[CycleCost]) -> CycleCost:
    return CycleCost(
        broker_requests=int(statistics.median(cost.broker_requests for cost in costs)),
        api_requests=int(statistics.median(cost.api_requests for cost in costs)),
        wall_seconds=statistics.median(cost.wall_seconds for cost in costs),
        cpu_seconds=statistics.median(cost.cpu_seconds for cost in costs),
        report=costs[-1].report,
    )


def declare_queues(broker: Broker, vhost: str, queues: list[str]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(broker.amqp_url(vhost)))
    try:
        channel = connection.channel()
        for queue in queues:
            channel.queue_declare(queue, durable=True)
    finally:
        connection.close()


def publish_one_each(broker: Broker, vhost: str, queues: list[str]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(broker.amqp_url(vhost)))
    try:
        channel = connection.channel()
        for queue in queues:
            channel.basic_publish("", queue, b"{}")
    finally:
        connection.close()


def wait_for_statistics(broker: Broker, vhost: str, size: int, ready: int) -> None:
    """Wait until the management API reports `ready` messages in every queue."""
    deadline = time.monotonic() + STATISTICS_TIMEOUT_SECONDS
    url = f"{broker.management_url}/api/queues/{requests.utils.quote(vhost, safe='')}"
    with broker.management_session() as session:
        while time.monotonic() < deadline:
            reply = session.get(url, params={"columns": "name,messages_ready"}).json()
            if sum(1 for queue in reply if queue.get("messages_ready") == ready) == size:
                return
            time.sleep(0.5)
    raise SystemExit(
        f"The broker did not report {ready} ready messages in each of the {size} queues "
        f"of vhost {vhost} within {STATISTICS_TIMEOUT_SECONDS:.0f} s."
    )


def print_table(rows: list[tuple[int, dict[str, CycleCost]]]) -> None:
    print()
    header = (
        f"{'resources':>9}  {'cycle':<6}  {'broker req':>10}  {'API req':>8}  "
        f"{'wall ms':>8}  {'CPU ms':>8}  {'CPU ms/resource':>15}"
    )
    print(header)
    print("-" * len(header))
    for size, costs in rows:
        for kind in ("first", "idle", "burst"):
            cost = costs[kind]
            print(
                f"{size:>9}  {kind:<6}  {cost.broker_requests:>10}  {cost.api_requests:>8}  "
                f"{cost.wall_seconds * 1000:>8.1f}  {cost.cpu_seconds * 1000:>8.1f}  "
                f"{cost.cpu_seconds * 1000 / size:>15.3f}"
            )


if __name__ == "__main__":
    sys.exit(main())
