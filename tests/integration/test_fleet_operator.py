"""The agent fleet through the operator process: Deployment, config Secret and scaling.

The control plane runs no kubelet and no scheduler, so agent pods are
created but never start. That is enough here: the tests check the
Deployment's replica count, which is what the operator controls.

Each test requests the vhost before the operator, so the operator stops
before its vhost is deleted at teardown.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pika
import pytest
from openchecker_agent.config import load_settings
from openchecker_testenv.broker import Broker
from support import wait_for
from support.resources import create_secret

GROUP = "openchecker.io"
VERSION = "v1alpha1"
PLURAL = "opencheckqueues"
POLL_SECONDS = 1.0
WINDOW_SECONDS = 4.0
# Slack for the API round trips between a decision and the replica count
# the test reads.
SLACK_SECONDS = 1.5


def queue_resource(
    name: str, secret: str, vhost: str, scaling: dict[str, Any] | None = None
) -> dict[str, Any]:
    settings = {
        "minReplicas": 0,
        "maxReplicas": 5,
        "messagesPerReplica": 10,
        "pollIntervalSeconds": POLL_SECONDS,
        "scaleDownStabilizationSeconds": WINDOW_SECONDS,
        **(scaling or {}),
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "OpenCheckQueue",
        "metadata": {"name": name},
        "spec": {
            "queue": {"name": name, "vhost": vhost},
            "connection": {"secretRef": {"name": secret}},
            "agent": {
                "image": "openchecker-agent:0.1.0",
                "terminationGracePeriodSeconds": 120,
                "callbackAllowedHosts": ["api.example.org"],
                "commands": [{"name": "clone", "argv": ["git", "clone", "{project_url}"]}],
            },
            "scaling": settings,
        },
    }


class Cluster:
    """Reads of the test namespace's objects through the admin ApiClient."""

    def __init__(self, api: kubernetes.client.ApiClient, namespace: str) -> None:
        self.namespace = namespace
        self.core = kubernetes.client.CoreV1Api(api)
        self.apps = kubernetes.client.AppsV1Api(api)
        self.custom = kubernetes.client.CustomObjectsApi(api)

    def create(self, body: dict[str, Any]) -> None:
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            name,
            {"spec": spec},
            _content_type="application/merge-patch+json",
        )

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def status(self, name: str) -> dict[str, Any]:
        body = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name
        )
        status: dict[str, Any] = body.get("status") or {}
        return status

    def deployment(self, name: str) -> Any | None:
        try:
            return self.apps.read_namespaced_deployment(f"{name}-agent", self.namespace)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise

    def replicas(self, name: str) -> int | None:
        deployment = self.deployment(name)
        if deployment is None:
            return None
        return int(deployment.spec.replicas or 0)

    def config_secret(self, name: str) -> Any | None:
        try:
            return self.core.read_namespaced_secret(f"{name}-agent-config", self.namespace)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise

    def event_messages(self, reason: str) -> list[str]:
        events = self.core.list_namespaced_event(self.namespace)
        return [event.message or "" for event in events.items if event.reason == reason]


@pytest.fixture
def cluster(kube_api: kubernetes.client.ApiClient, namespace: str) -> Cluster:
    return Cluster(kube_api, namespace)


@pytest.fixture
def channel(broker: Broker, vhost: str) -> Iterator[Any]:
    connection = pika.BlockingConnection(pika.URLParameters(broker.amqp_url(vhost)))
    yield connection.channel()
    connection.close()


def declare_queues(channel: Any, name: str) -> None:
    """Declare the queue and its DLQ with the arguments the operator declares them with.

    The same arguments make the declare idempotent with the operator's own,
    so the test does not depend on which one runs first.
    """
    dead_letter = f"{name}.dlq"
    channel.queue_declare(dead_letter, durable=True, arguments={"x-queue-type": "classic"})
    channel.queue_declare(
        name,
        durable=True,
        arguments={
            "x-queue-type": "classic",
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": dead_letter,
        },
    )


def wait_for_replicas(cluster: Cluster, name: str, count: int, timeout_seconds: float) -> float:
    """Wait until the Deployment has `count` replicas; return the seconds it took."""
    started = time.monotonic()
    wait_for(
        lambda: cluster.replicas(name) == count,
        timeout_seconds,
        interval_seconds=0.05,
        message=f"Deployment {name}-agent did not reach {count} replicas",
    )
    return time.monotonic() - started


def consume_all(channel: Any, queue: str, count: int) -> None:
    for _ in range(count):
        method, _properties, _body = channel.basic_get(queue)
        assert method is not None, f"{queue} ran out of messages early"
        channel.basic_ack(method.delivery_tag)


@pytest.mark.timeout(150)
def test_fleet_scales_with_backlog(
    broker: Broker,
    vhost: str,
    channel: Any,
    cluster: Cluster,
    broker_secret: str,
    operator_process: Any,
    tmp_path: Path,
) -> None:
    name = "scaled"
    declare_queues(channel, name)
    cluster.create(queue_resource(name, broker_secret, vhost))

    # The fleet exists at minReplicas with a config the agent parses.
    wait_for_replicas(cluster, name, 0, 30)
    secret = wait_for(lambda: cluster.config_secret(name), 10, message="no config Secret")
    config_path = tmp_path / "config.ini"
    config_path.write_bytes(base64.b64decode(secret.data["config.ini"]))
    settings = load_settings(config_path, environ={})
    assert settings.rabbitmq.host == broker.host
    assert settings.rabbitmq.port == broker.amqp_port
    assert settings.rabbitmq.vhost == vhost
    assert settings.rabbitmq.password.get_secret_value() == broker.password
    assert settings.agent.queue == name
    assert settings.agent.drain_timeout_s == 60.0
    assert list(settings.commands) == ["clone"]

    # 40 messages at 10 per replica: 4 replicas within two polls.
    started = time.monotonic()
    for _ in range(40):
        channel.basic_publish("", name, b"{}")
    wait_for_replicas(cluster, name, 4, 2 * POLL_SECONDS + SLACK_SECONDS)
    assert time.monotonic() - started <= 2 * POLL_SECONDS + SLACK_SECONDS

    status = wait_for(
        lambda: (
            cluster.status(name).get("replicas", {}).get("desired") == 4 and cluster.status(name)
        ),
        10,
        message="status.replicas.desired never became 4",
    )
    assert status["messages"]["ready"] == 40
    assert status["replicas"]["lastScaleReason"] == "backlog 40 / 10 per replica"
    assert "lastPollTime" in status
    scaled = cluster.event_messages("Scaled")
    assert any(message.startswith("Scaled from 0 to 4") for message in scaled), scaled

    # Drained: back to 0, but only after the stabilization window.
    consume_all(channel, name, 40)
    emptied = time.monotonic()
    wait_for_replicas(cluster, name, 0, WINDOW_SECONDS + 2 * POLL_SECONDS + SLACK_SECONDS)
    assert time.monotonic() - emptied >= WINDOW_SECONDS - POLL_SECONDS


@pytest.mark.timeout(120)
def test_image_change_keeps_replicas(
    vhost: str,
    channel: Any,
    cluster: Cluster,
    broker_secret: str,
    operator_process: Any,
) -> None:
    name = "rolled"
    declare_queues(channel, name)
    cluster.create(queue_resource(name, broker_secret, vhost, {"minReplicas": 3}))
    wait_for_replicas(cluster, name, 3, 30)

    # Paused, the scaler would not restore a count the template update
    # changed, so any change would stay visible.
    cluster.patch_spec(
        name, {"agent": {"image": "openchecker-agent:0.2.0"}, "scaling": {"paused": True}}
    )

    def template_image() -> str | None:
        deployment = cluster.deployment(name)
        if deployment is None:
            return None
        image: str = deployment.spec.template.spec.containers[0].image
        return image

    deadline = time.monotonic() + 20
    seen: set[int | None] = set()
    while template_image() != "openchecker-agent:0.2.0":
        seen.add(cluster.replicas(name))
        assert time.monotonic() < deadline, "the pod template never got the new image"
        time.sleep(0.1)
    for _ in range(30):
        seen.add(cluster.replicas(name))
        time.sleep(0.1)

    assert seen == {3}


@pytest.mark.timeout(120)
def test_delete_removes_fleet(
    vhost: str,
    channel: Any,
    cluster: Cluster,
    broker_secret: str,
    operator_process: Any,
) -> None:
    name = "removed"
    declare_queues(channel, name)
    cluster.create(queue_resource(name, broker_secret, vhost))
    wait_for(lambda: cluster.deployment(name), 30, message="no Deployment")
    wait_for(lambda: cluster.config_secret(name), 10, message="no config Secret")

    cluster.delete(name)

    # The garbage collector of kube-controller-manager deletes both owned objects.
    wait_for(
        lambda: cluster.deployment(name) is None,
        60,
        message="the Deployment outlived its OpenCheckQueue",
    )
    wait_for(
        lambda: cluster.config_secret(name) is None,
        60,
        message="the config Secret outlived its OpenCheckQueue",
    )


@pytest.mark.timeout(150)
def test_restart_keeps_replicas_for_window(
    vhost: str,
    channel: Any,
    cluster: Cluster,
    broker_secret: str,
    operator_process: Any,
) -> None:
    name = "restarted"
    window = 8.0
    declare_queues(channel, name)
    cluster.create(
        queue_resource(name, broker_secret, vhost, {"scaleDownStabilizationSeconds": window})
    )
    wait_for_replicas(cluster, name, 0, 30)
    for _ in range(40):
        channel.basic_publish("", name, b"{}")
    wait_for_replicas(cluster, name, 4, 2 * POLL_SECONDS + SLACK_SECONDS)

    # Drained while the operator is down: the new process has no
    # history, so it must treat the current 4 as a fresh recommendation.
    operator_process.stop()
    consume_all(channel, name, 40)
    operator_process.start()
    restarted = time.monotonic()

    counts: set[int | None] = set()
    while time.monotonic() - restarted < window - 2 * POLL_SECONDS:
        counts.add(cluster.replicas(name))
        time.sleep(0.1)
    assert counts == {4}
    wait_for_replicas(cluster, name, 0, window + 2 * POLL_SECONDS + SLACK_SECONDS)


@pytest.mark.timeout(120)
def test_deleted_deployment_is_recreated(
    vhost: str,
    channel: Any,
    cluster: Cluster,
    broker_secret: str,
    operator_process: Any,
) -> None:
    name = "recreated"
    declare_queues(channel, name)
    cluster.create(queue_resource(name, broker_secret, vhost, {"minReplicas": 2}))
    wait_for_replicas(cluster, name, 2, 30)
    first = cluster.deployment(name)
    assert first is not None

    cluster.apps.delete_namespaced_deployment(f"{name}-agent", cluster.namespace)

    def replacement() -> Any | None:
        deployment = cluster.deployment(name)
        if deployment is None or deployment.metadata.uid == first.metadata.uid:
            return None
        return deployment

    second = wait_for(replacement, 30, message="the deleted Deployment was not created again")
    assert second.spec.replicas == 2
    owners = second.metadata.owner_references
    assert [(owner.kind, owner.name, owner.controller) for owner in owners] == [
        ("OpenCheckQueue", name, True)
    ]


@pytest.mark.timeout(90)
def test_wrong_password_reads_no_figures(
    broker: Broker,
    vhost: str,
    channel: Any,
    cluster: Cluster,
    broker_secret: str,
    kube_api: kubernetes.client.ApiClient,
    namespace: str,
    operator_process: Any,
) -> None:
    # The same broker and user as broker_secret, with a wrong password.
    wrong_secret = "wrong-password"
    create_secret(
        kube_api,
        namespace,
        wrong_secret,
        {
            "host": broker.host,
            "port": str(broker.amqp_port),
            "username": broker.username,
            "password": f"not-{broker.password}",
            "management_url": broker.management_url,
        },
    )
    declare_queues(channel, "trusted")
    declare_queues(channel, "untrusted")
    for _ in range(30):
        channel.basic_publish("", "untrusted", b"{}")

    # Created together, both resources are polled in the same scaler cycles.
    cluster.create(queue_resource("trusted", broker_secret, vhost))
    cluster.create(queue_resource("untrusted", wrong_secret, vhost))
    wait_for(
        lambda: "lastPollTime" in cluster.status("trusted"),
        30,
        message="the scaler never polled the resource with the right password",
    )
    time.sleep(3 * POLL_SECONDS + SLACK_SECONDS)

    trusted = cluster.status("trusted")
    untrusted = cluster.status("untrusted")
    assert trusted["replicas"]["readFailures"] == 0
    assert "messages" not in untrusted
    assert untrusted.get("replicas", {}).get("desired", 0) == 0
    assert cluster.replicas("untrusted") == 0


def condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for item in status.get("conditions") or []:
        if item.get("type") == type_:
            return dict(item)
    return None


@pytest.mark.timeout(90)
def test_fleet_ready_condition_reports_fleet(
    vhost: str,
    channel: Any,
    cluster: Cluster,
    broker_secret: str,
    operator_process: Any,
) -> None:
    declare_queues(channel, "healthy")
    cluster.create(queue_resource("healthy", broker_secret, vhost))
    cluster.create(queue_resource("orphan", "no-such-secret", vhost))

    healthy = wait_for(
        lambda: condition(cluster.status("healthy"), "FleetReady"),
        30,
        message="FleetReady was never written for a working fleet",
    )
    assert healthy["status"] == "True"
    assert healthy["reason"] == "FleetReconciled"
    ready = wait_for(
        lambda: condition(cluster.status("healthy"), "Ready"),
        30,
        message="Ready was never written",
    )
    assert ready["status"] == "True"

    orphan = wait_for(
        lambda: condition(cluster.status("orphan"), "FleetReady"),
        30,
        message="FleetReady was never written for a fleet without its Secret",
    )
    assert orphan["status"] == "False"
    assert orphan["reason"] == "SecretNotFound"
    orphan_ready = condition(cluster.status("orphan"), "Ready")
    assert orphan_ready is not None
    assert orphan_ready["status"] == "False"
    assert cluster.deployment("orphan") is None
