"""The scaler loop in-process against the real kube-apiserver and the real broker."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Iterator, Mapping
from typing import Any

import kubernetes
import pika
import pytest
import requests
from openchecker_operator.agentconfig import AgentOptions, BrokerConnection
from openchecker_operator.broker.management import ManagementClient
from openchecker_operator.fleet import FleetSpec, reconcile_fleet
from openchecker_operator.kube import KubeClient
from openchecker_operator.scaler import (
    BrokerFiguresReader,
    FleetRegistry,
    QueueKey,
    Scaler,
    ScaleTarget,
)
from openchecker_operator.scaling import QueueFigures, ScalingPolicy
from openchecker_operator.workloads import AgentPodSettings, Owner
from openchecker_testenv.broker import Broker

POLL_SECONDS = 0.5
WINDOW_SECONDS = 3.0


class CountedReader:
    """The operator's broker reader over its management client, counting HTTP requests."""

    def __init__(self, broker: Broker, management_url: str | None = None) -> None:
        self.client = ManagementClient(
            base_url=management_url or broker.management_url,
            username=broker.username,
            password=broker.password,
        )
        self.reader = BrokerFiguresReader(self.client)
        self.requests = 0
        self.client._session.hooks["response"].append(self._count)

    def _count(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self.requests += 1

    def read_queue_figures(self) -> Mapping[QueueKey, QueueFigures]:
        return self.reader.read_queue_figures()


@pytest.fixture
def channel(broker: Broker, vhost: str) -> Iterator[Any]:
    connection = pika.BlockingConnection(pika.URLParameters(broker.amqp_url(vhost)))
    yield connection.channel()
    connection.close()


def make_owner(kube_api: kubernetes.client.ApiClient, namespace: str, name: str) -> Owner:
    core = kubernetes.client.CoreV1Api(kube_api)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": name}})
    return Owner("v1", "ConfigMap", name, owner.metadata.uid)


def make_fleet(owner: Owner, namespace: str, queue: str, policy: ScalingPolicy) -> FleetSpec:
    return FleetSpec(
        owner=owner,
        namespace=namespace,
        connection=BrokerConnection(host="rabbitmq", port=5672, username="u", password="p"),
        options=AgentOptions(queue=queue),
        pod=AgentPodSettings(image="openchecker-agent:test"),
        policy=policy,
    )


def make_target(
    owner: Owner,
    namespace: str,
    vhost: str,
    queue: str,
    reader: CountedReader,
    policy: ScalingPolicy,
) -> ScaleTarget:
    return ScaleTarget(
        namespace=namespace,
        name=owner.name,
        uid=owner.uid,
        vhost=vhost,
        queue=queue,
        dead_letter_queue=None,
        broker_key="test-broker",
        reader=reader,
        policy=policy,
        poll_interval_seconds=POLL_SECONDS,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def spec_replicas(kube_api: kubernetes.client.ApiClient, namespace: str, name: str) -> int:
    scale = kubernetes.client.AppsV1Api(kube_api).read_namespaced_deployment_scale(
        f"{name}-agent", namespace
    )
    return int(scale.spec.replicas or 0)


def scaled_messages(kube_api: kubernetes.client.ApiClient, namespace: str) -> list[str]:
    events = kubernetes.client.CoreV1Api(kube_api).list_namespaced_event(namespace)
    return [event.message for event in events.items if event.reason == "Scaled"]


async def wait_until(predicate: Any, timeout_seconds: float, message: str) -> float:
    """Await until `predicate()` is true; return the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_seconds:
            raise AssertionError(f"{message} (timed out after {timeout_seconds} s)")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


@pytest.mark.timeout(90)
def test_scaler_follows_backlog(
    kube_api: kubernetes.client.ApiClient,
    namespace: str,
    broker: Broker,
    vhost: str,
    channel: Any,
) -> None:
    queue = "work"
    channel.queue_declare(queue, durable=True)
    policy = ScalingPolicy(
        min_replicas=0,
        max_replicas=5,
        messages_per_replica=10,
        scale_down_stabilization_seconds=WINDOW_SECONDS,
    )
    owner = make_owner(kube_api, namespace, "follow")
    reader = CountedReader(broker)

    async def scenario() -> None:
        kube = KubeClient(kube_api)
        registry = FleetRegistry()
        result = await reconcile_fleet(kube, make_fleet(owner, namespace, queue, policy), None)
        assert result.deployment.spec_replicas == 0
        registry.observe_deployment((namespace, owner.name), 0, 0)
        registry.register(make_target(owner, namespace, vhost, queue, reader, policy))
        task = asyncio.create_task(Scaler(registry, kube).run())
        try:
            for _ in range(40):
                channel.basic_publish("", queue, b"{}")
            took = await wait_until(
                lambda: spec_replicas(kube_api, namespace, owner.name) == 4,
                2 * POLL_SECONDS + 1,
                "replicas did not reach 4 within two poll intervals of the publish",
            )
            assert took <= 2 * POLL_SECONDS + 1

            channel.queue_purge(queue)
            emptied = time.monotonic()
            await wait_until(
                lambda: spec_replicas(kube_api, namespace, owner.name) == 0,
                WINDOW_SECONDS + 5,
                "replicas did not return to 0",
            )
            assert time.monotonic() - emptied >= WINDOW_SECONDS - POLL_SECONDS
            # The scaler posts the Event after the scale; wait for it before the
            # task is cancelled, or the cancel can cut the post short.
            await wait_until(
                lambda: any(
                    message.startswith("Scaled from 4 to 0")
                    for message in scaled_messages(kube_api, namespace)
                ),
                10,
                "no Event for the scale down to 0",
            )
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())

    scaled = scaled_messages(kube_api, namespace)
    assert any(message.startswith("Scaled from 0 to 4: backlog 40") for message in scaled), scaled
    assert any(message.startswith("Scaled from 4 to 0") for message in scaled), scaled


@pytest.mark.timeout(60)
def test_failed_reads_hold_replicas(
    kube_api: kubernetes.client.ApiClient, namespace: str, broker: Broker
) -> None:
    policy = ScalingPolicy(min_replicas=0, scale_down_stabilization_seconds=0.0)
    owner = make_owner(kube_api, namespace, "hold")
    # Nothing listens on a port just released, so every read fails.
    reader = CountedReader(broker, management_url=f"http://127.0.0.1:{free_port()}")

    async def scenario() -> None:
        kube = KubeClient(kube_api)
        registry = FleetRegistry()
        await reconcile_fleet(kube, make_fleet(owner, namespace, "q", policy), None)
        await kube.scale_deployment(namespace, f"{owner.name}-agent", 3)
        registry.observe_deployment((namespace, owner.name), 3, 0)
        registry.register(make_target(owner, namespace, "/", "q", reader, policy))
        scaler = Scaler(registry, kube)
        for _ in range(5):
            report = await scaler.poll_due()
            assert report.broker_failures == 1
            await asyncio.sleep(POLL_SECONDS)

    asyncio.run(scenario())

    assert spec_replicas(kube_api, namespace, owner.name) == 3


@pytest.mark.timeout(60)
def test_failed_reads_logged_once(
    kube_api: kubernetes.client.ApiClient,
    namespace: str,
    broker: Broker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = ScalingPolicy(min_replicas=0)
    owner = make_owner(kube_api, namespace, "quiet")
    reader = CountedReader(broker, management_url=f"http://127.0.0.1:{free_port()}")

    async def scenario() -> None:
        kube = KubeClient(kube_api)
        registry = FleetRegistry()
        await reconcile_fleet(kube, make_fleet(owner, namespace, "q", policy), None)
        registry.register(make_target(owner, namespace, "/", "q", reader, policy))
        scaler = Scaler(registry, kube)
        for _ in range(5):
            await scaler.poll_due()
            await asyncio.sleep(POLL_SECONDS)

    with caplog.at_level(logging.WARNING, logger="openchecker_operator"):
        asyncio.run(scenario())

    failures = [record for record in caplog.records if "Reading queue figures" in record.message]
    assert len(failures) == 1, [record.message for record in failures]


@pytest.mark.timeout(60)
def test_reader_counts_are_live(broker: Broker, vhost: str, channel: Any) -> None:
    channel.queue_declare("live", durable=True)
    for _ in range(40):
        channel.basic_publish("", "live", b"{}")
    # A passive declare returns after the broker has taken the publishes.
    channel.queue_declare("live", passive=True)

    # No wait for the statistics database, which lags by seconds.
    figures = CountedReader(broker).read_queue_figures()[(vhost, "live")]

    assert figures.ready == 40
    assert figures.unacknowledged == 0


@pytest.mark.timeout(60)
def test_reader_reports_consumers(broker: Broker, vhost: str, channel: Any) -> None:
    channel.queue_declare("watched", durable=True)
    channel.basic_consume("watched", lambda *_: None)

    def consumers() -> int | None:
        # A new reader reads the consumer counts at its first read.
        figures = CountedReader(broker).read_queue_figures().get((vhost, "watched"))
        return None if figures is None else figures.consumers

    deadline = time.monotonic() + 20
    while consumers() != 1:
        assert time.monotonic() < deadline, "the consumer count never showed the consumer"
        channel.connection.process_data_events(0.5)


@pytest.mark.timeout(90)
def test_broker_requests_independent_of_resources(
    kube_api: kubernetes.client.ApiClient, namespace: str, broker: Broker, vhost: str
) -> None:
    policy = ScalingPolicy()
    reader = CountedReader(broker)
    registry = FleetRegistry()
    for index in range(20):
        owner = Owner("v1", "ConfigMap", f"resource-{index}", f"uid-{index}")
        registry.register(make_target(owner, namespace, vhost, f"queue-{index}", reader, policy))

    async def two_cycles() -> tuple[int, int]:
        scaler = Scaler(registry, KubeClient(kube_api))
        await scaler.poll(list(registry.targets.values()), time.monotonic())
        first = reader.requests
        await scaler.poll(list(registry.targets.values()), time.monotonic())
        return first, reader.requests - first

    first, second = asyncio.run(two_cycles())

    # The first cycle also reads the consumer counts; later ones only the
    # live counts, until CONSUMERS_REFRESH_SECONDS have passed.
    assert first == 2
    assert second == 1
