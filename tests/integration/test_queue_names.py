"""Queue and vhost names with "/", spaces, "?", "#", dots and capitals work end to end."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import kubernetes
import pytest
from openchecker_testenv.broker import Broker
from support import Kubectl, apply_manifest, wait_for
from support.operator import OperatorProcess
from support.resources import (
    delete_queue,
    management_get,
    publish,
    queue_manifest,
    read_queue,
    read_queue_resource,
    wait_for_condition,
)

RESYNC_SECONDS = 1.0
QUEUE_NAME = "Checks/Nightly run?part#1.v2"
DEAD_LETTER_NAME = "Checks/Nightly run?part#1.v2.dlq"


@pytest.fixture
def odd_vhost(broker: Broker) -> Iterator[str]:
    """A vhost whose name needs percent-encoding in every management URL."""
    name = f"Team/A b?c#d.E-{uuid.uuid4().hex[:6]}"
    broker.create_vhost(name)
    yield name
    broker.delete_vhost(name)


@pytest.mark.timeout(150)
def test_special_names_end_to_end(
    namespace: str,
    odd_vhost: str,
    broker_secret: str,
    broker: Broker,
    start_operator: Callable[..., OperatorProcess],
    kubectl: Kubectl,
    kube_api: kubernetes.client.ApiClient,
) -> None:
    start_operator(namespace, resync_interval_seconds=RESYNC_SECONDS)
    manifest = queue_manifest(
        "odd",
        broker_secret,
        odd_vhost,
        queue={"name": QUEUE_NAME},
        limits={"messageTTLMilliseconds": 90000},
        deletionPolicy="Delete",
    )
    apply_manifest(kubectl, manifest, namespace)

    resource = wait_for_condition(kube_api, namespace, "odd", "Ready", "True")
    assert resource["status"]["queue"]["name"] == QUEUE_NAME
    assert resource["status"]["queue"]["vhost"] == odd_vhost
    assert resource["status"]["queue"]["deadLetterQueue"] == DEAD_LETTER_NAME
    work = read_queue(broker, odd_vhost, QUEUE_NAME)
    assert work is not None
    assert work["name"] == QUEUE_NAME
    assert work["vhost"] == odd_vhost
    assert work["arguments"]["x-dead-letter-routing-key"] == DEAD_LETTER_NAME
    assert read_queue(broker, odd_vhost, DEAD_LETTER_NAME) is not None
    # No queue named after a prefix of the name: the "?" and "#" stayed
    # inside the path segment.
    names = [item["name"] for item in management_get(broker, "/api/queues") or []]
    assert "Checks/Nightly run" not in names

    # The policy pattern matches the name literally.
    wait_for(
        lambda: (
            (read_queue(broker, odd_vhost, QUEUE_NAME) or {}).get("effective_policy_definition")
            == {"message-ttl": 90000}
        ),
        15,
        message="the policy never applied to the queue with the special name",
    )

    # Counts come back to status through the same encoded names.
    publish(broker, odd_vhost, QUEUE_NAME, 3)
    wait_for(
        lambda: (
            read_queue_resource(kube_api, namespace, "odd")["status"]
            .get("messages", {})
            .get("ready")
            == 3
        ),
        15,
        message="status never showed the 3 messages",
    )

    # A deletion behind the operator's back is repaired.
    delete_queue(broker, odd_vhost, QUEUE_NAME)
    wait_for(
        lambda: read_queue(broker, odd_vhost, QUEUE_NAME) is not None,
        10,
        message="the queue with the special name was not declared again",
    )

    kubectl("delete", "ocq", "odd", "-n", namespace, "--wait=false")
    wait_for(
        lambda: (
            read_queue(broker, odd_vhost, QUEUE_NAME) is None
            and read_queue(broker, odd_vhost, DEAD_LETTER_NAME) is None
        ),
        30,
        message="the queues with special names were not deleted",
    )
