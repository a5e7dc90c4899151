"""Helpers for OpenCheckQueue tests: manifests, status reads, Events and broker reads."""

from __future__ import annotations

import base64
import contextlib
import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import kubernetes
import pika
import yaml
from openchecker_testenv.broker import Broker

from support import wait_for

GROUP = "openchecker.io"
VERSION = "v1alpha1"
PLURAL = "opencheckqueues"
DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def load_manifest(file_name: str) -> dict[str, Any]:
    """Return one YAML object from tests/data/."""
    loaded = yaml.safe_load((DATA_DIR / file_name).read_text())
    assert isinstance(loaded, dict)
    return loaded


def queue_manifest(name: str, secret_name: str, vhost: str, **spec: Any) -> dict[str, Any]:
    """Return an OpenCheckQueue manifest; `spec` entries override or extend the spec."""
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "OpenCheckQueue",
        "metadata": {"name": name},
        "spec": {
            "queue": {"vhost": vhost},
            "connection": {"secretRef": {"name": secret_name}},
            # The fleet half creates a Deployment for every resource; no
            # scheduler runs in the test environment, so its pods stay
            # pending and cost nothing.
            "scaling": {"maxReplicas": 0},
        },
    }
    for key, value in spec.items():
        current = body["spec"].get(key)
        if isinstance(current, dict) and isinstance(value, dict):
            body["spec"][key] = {**current, **value}
        else:
            body["spec"][key] = copy.deepcopy(value)
    return body


def read_queue_resource(
    kube_api: kubernetes.client.ApiClient, namespace: str, name: str
) -> dict[str, Any]:
    """Return the OpenCheckQueue object as a dict."""
    custom = kubernetes.client.CustomObjectsApi(kube_api)
    result = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    assert isinstance(result, dict)
    return result


def conditions_of(resource: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Return the resource's conditions by type."""
    items = resource.get("status", {}).get("conditions", [])
    return {item["type"]: item for item in items}


def wait_for_condition(
    kube_api: kubernetes.client.ApiClient,
    namespace: str,
    name: str,
    type_: str,
    status: str,
    reason: str | None = None,
    timeout_seconds: float = 60.0,
) -> dict[str, Any]:
    """Wait until a condition has `status` (and `reason`); return the resource."""

    def check() -> dict[str, Any] | None:
        resource = read_queue_resource(kube_api, namespace, name)
        condition = conditions_of(resource).get(type_)
        if condition is None or condition.get("status") != status:
            return None
        if reason is not None and condition.get("reason") != reason:
            return None
        return resource

    expected = f"{type_}={status}" + (f" ({reason})" if reason else "")
    return wait_for(
        check,
        timeout_seconds,
        interval_seconds=0.3,
        message=f"OpenCheckQueue {namespace}/{name} never had {expected}",
    )


def events_of(
    kube_api: kubernetes.client.ApiClient, namespace: str, name: str, reason: str | None = None
) -> list[Any]:
    """Return the Events about one OpenCheckQueue, optionally with one reason."""
    core = kubernetes.client.CoreV1Api(kube_api)
    selector = f"involvedObject.name={name},involvedObject.kind=OpenCheckQueue"
    events = core.list_namespaced_event(namespace, field_selector=selector).items
    return [event for event in events if reason is None or event.reason == reason]


def event_count(
    kube_api: kubernetes.client.ApiClient, namespace: str, name: str, reason: str
) -> int:
    """Return how often Events with `reason` were posted about one resource (counting repeats)."""
    return sum(event.count or 1 for event in events_of(kube_api, namespace, name, reason))


def settled_event_count(
    kube_api: kubernetes.client.ApiClient,
    namespace: str,
    name: str,
    reason: str,
    expected: int,
    timeout_seconds: float = 10,
) -> int:
    """Wait until `expected` Events with `reason` are posted; return the count then.

    kopf posts Events from a background queue, so an Event can arrive after
    the broker change or status patch it reports. The caller asserts the
    returned count, which catches extra Events as well as missing ones.
    """
    # A timeout falls through: the caller's assert shows the count reached.
    with contextlib.suppress(AssertionError):
        wait_for(
            lambda: event_count(kube_api, namespace, name, reason) >= expected,
            timeout_seconds,
            message=f"fewer than {expected} {reason} Events",
        )
    return event_count(kube_api, namespace, name, reason)


def management_get(broker: Broker, path: str) -> Any:
    """GET a management API path; return the decoded JSON, or None for 404."""
    with broker.management_session() as session:
        response = session.get(f"{broker.management_url}{path}")
    if response.status_code == 404:
        return None
    response.raise_for_status()
    return response.json()


def queue_path(vhost: str, name: str) -> str:
    """Return the management API path of a queue, each name percent-encoded."""
    return f"/api/queues/{quote(vhost, safe='')}/{quote(name, safe='')}"


def read_queue(broker: Broker, vhost: str, name: str) -> dict[str, Any] | None:
    """Return a queue from the management API, or None."""
    result = management_get(broker, queue_path(vhost, name))
    return None if result is None else dict(result)


def delete_queue(broker: Broker, vhost: str, name: str) -> None:
    """Delete a queue behind the operator's back; a missing queue is fine."""
    with broker.management_session() as session:
        response = session.delete(f"{broker.management_url}{queue_path(vhost, name)}")
    if response.status_code != 404:
        response.raise_for_status()


def publish(broker: Broker, vhost: str, queue: str, count: int) -> None:
    """Publish `count` persistent messages to a queue through the default exchange."""
    connection = pika.BlockingConnection(pika.URLParameters(broker.amqp_url(vhost)))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for number in range(count):
            channel.basic_publish(
                "",
                queue,
                f"message {number}".encode(),
                pika.BasicProperties(delivery_mode=2),
                mandatory=True,
            )
    finally:
        connection.close()


def declare_queue(
    broker: Broker, vhost: str, queue: str, arguments: Mapping[str, Any] | None = None
) -> None:
    """Declare a durable queue directly, as someone other than the operator would."""
    connection = pika.BlockingConnection(pika.URLParameters(broker.amqp_url(vhost)))
    try:
        connection.channel().queue_declare(queue, durable=True, arguments=dict(arguments or {}))
    finally:
        connection.close()


def operator_connections(broker: Broker, connection_name: str) -> list[dict[str, Any]]:
    """Return the broker's connections whose client-provided name is `connection_name`."""
    connections = management_get(broker, "/api/connections") or []
    return [
        item
        for item in connections
        if (item.get("client_properties") or {}).get("connection_name") == connection_name
    ]


def create_secret(
    kube_api: kubernetes.client.ApiClient, namespace: str, name: str, data: Mapping[str, str]
) -> None:
    """Create an Opaque Secret from text values."""
    encoded = {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}
    body = kubernetes.client.V1Secret(
        metadata=kubernetes.client.V1ObjectMeta(name=name), data=encoded, type="Opaque"
    )
    kubernetes.client.CoreV1Api(kube_api).create_namespaced_secret(namespace, body)


def close_connection(broker: Broker, name: str) -> None:
    """Make the broker close one client connection, as an administrator would."""
    path = f"/api/connections/{quote(name, safe='')}"
    with broker.management_session() as session:
        response = session.delete(f"{broker.management_url}{path}")
    if response.status_code != 404:
        response.raise_for_status()
