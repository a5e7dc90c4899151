"""The resync timer declares queues deleted out of band and reuses one AMQP connection."""

from __future__ import annotations

from collections.abc import Callable

import kubernetes
import pytest
from openchecker_testenv.broker import Broker
from support import Kubectl, apply_manifest, wait_for
from support.operator import OperatorProcess
from support.resources import (
    close_connection,
    delete_queue,
    event_count,
    operator_connections,
    queue_manifest,
    read_queue,
    wait_for_condition,
)

RESYNC_SECONDS = 0.5
DELETIONS = 20
MAX_CONNECTIONS = 2


@pytest.mark.timeout(240)
def test_deleted_queue_redeclared_on_one_connection(
    namespace: str,
    vhost: str,
    broker_secret: str,
    broker: Broker,
    start_operator: Callable[..., OperatorProcess],
    kubectl: Kubectl,
    kube_api: kubernetes.client.ApiClient,
) -> None:
    # A connection name of its own, so the count ignores other operators
    # on the shared test broker.
    connection_name = f"openchecker-operator-{namespace}"
    operator = start_operator(
        namespace,
        env={"OPENCHECKER_OPERATOR_CONNECTION_NAME": connection_name},
        resync_interval_seconds=RESYNC_SECONDS,
    )
    apply_manifest(kubectl, queue_manifest("resync", broker_secret, vhost), namespace)
    wait_for_condition(kube_api, namespace, "resync", "Ready", "True")

    max_connections_seen = 0
    for _ in range(DELETIONS):
        delete_queue(broker, vhost, "resync")
        wait_for(
            lambda: read_queue(broker, vhost, "resync") is not None,
            10,
            message="the deleted queue was not declared again",
        )
        max_connections_seen = max(
            max_connections_seen, len(operator_connections(broker, connection_name))
        )

    assert operator.running
    assert operator.count(r"Opened AMQP connection") <= MAX_CONNECTIONS
    assert max_connections_seen <= MAX_CONNECTIONS
    # The management API lists a connection a few seconds after it opens.
    listed = wait_for(
        lambda: operator_connections(broker, connection_name),
        15,
        message="the operator's connection never appeared in /api/connections",
    )
    assert len(listed) <= MAX_CONNECTIONS
    wait_for(
        lambda: event_count(kube_api, namespace, "resync", "Redeclared") >= DELETIONS,
        10,
        message="fewer Redeclared Events than deletions",
    )
    assert event_count(kube_api, namespace, "resync", "Redeclared") == DELETIONS
    resource = wait_for_condition(kube_api, namespace, "resync", "Ready", "True")
    queue = read_queue(broker, vhost, "resync")
    assert queue is not None
    assert queue["arguments"]["x-dead-letter-routing-key"] == "resync.dlq"
    assert resource["status"]["observedGeneration"] == 1


@pytest.mark.timeout(120)
def test_closed_connection_reopened_once(
    namespace: str,
    vhost: str,
    broker_secret: str,
    broker: Broker,
    start_operator: Callable[..., OperatorProcess],
    kubectl: Kubectl,
    kube_api: kubernetes.client.ApiClient,
) -> None:
    connection_name = f"openchecker-operator-{namespace}"
    operator = start_operator(
        namespace,
        env={"OPENCHECKER_OPERATOR_CONNECTION_NAME": connection_name},
        resync_interval_seconds=RESYNC_SECONDS,
    )
    apply_manifest(kubectl, queue_manifest("closed", broker_secret, vhost), namespace)
    wait_for_condition(kube_api, namespace, "closed", "Ready", "True")
    listed = wait_for(
        lambda: operator_connections(broker, connection_name),
        15,
        message="the operator's connection never appeared in /api/connections",
    )
    assert len(listed) == 1

    # The broker closes the connection, as it does for a node restart or
    # an administrator; then the queue disappears too.
    close_connection(broker, listed[0]["name"])
    delete_queue(broker, vhost, "closed")

    wait_for(
        lambda: read_queue(broker, vhost, "closed") is not None,
        15,
        message="the queue was not declared again after the connection was closed",
    )
    assert operator.count(r"Opened AMQP connection") == 2
    reopened = wait_for(
        lambda: [
            item
            for item in operator_connections(broker, connection_name)
            if item["name"] != listed[0]["name"]
        ],
        15,
        message="no new connection appeared",
    )
    assert len(reopened) == 1
    # The closed connection leaves the listing with the next stats emission.
    wait_for(
        lambda: len(operator_connections(broker, connection_name)) == 1,
        15,
        message="the operator has more than one connection after the reopen",
    )
    wait_for_condition(kube_api, namespace, "closed", "Ready", "True")
