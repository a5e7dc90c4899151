"""Deletion policies: Retain, Delete, a blocked deletion forced by annotation, a shared DLQ."""

from __future__ import annotations

from collections.abc import Callable

import kubernetes
import pytest
from openchecker_testenv.broker import Broker
from support import Kubectl, apply_manifest, wait_for
from support.operator import OperatorProcess
from support.resources import (
    delete_queue,
    event_count,
    management_get,
    publish,
    queue_manifest,
    read_queue,
    wait_for_condition,
)

RESYNC_SECONDS = 2.0
GONE_TIMEOUT_SECONDS = 30.0
FORCE_ANNOTATION = "openchecker.io/force-delete=true"


def wait_gone(kubectl: Kubectl, namespace: str, name: str, timeout: float) -> None:
    wait_for(
        lambda: (
            not kubectl(
                "get", "ocq", name, "-n", namespace, "--ignore-not-found", "-o", "name"
            ).stdout.strip()
        ),
        timeout,
        message=f"OpenCheckQueue {name} was never deleted",
    )


@pytest.mark.timeout(120)
def test_retain_keeps_queues(
    namespace: str,
    vhost: str,
    broker_secret: str,
    broker: Broker,
    start_operator: Callable[..., OperatorProcess],
    kubectl: Kubectl,
    kube_api: kubernetes.client.ApiClient,
) -> None:
    start_operator(namespace, resync_interval_seconds=RESYNC_SECONDS)
    manifest = queue_manifest("kept", broker_secret, vhost, limits={"maxLength": 5})
    apply_manifest(kubectl, manifest, namespace)
    wait_for_condition(kube_api, namespace, "kept", "Ready", "True")

    kubectl("delete", "ocq", "kept", "-n", namespace, "--wait=false")

    wait_gone(kubectl, namespace, "kept", GONE_TIMEOUT_SECONDS)
    assert read_queue(broker, vhost, "kept") is not None
    assert read_queue(broker, vhost, "kept.dlq") is not None
    policy = f"/api/policies/{vhost}/openchecker.{namespace}.kept"
    assert management_get(broker, policy) is not None


@pytest.mark.timeout(120)
def test_delete_removes_empty_queues(
    namespace: str,
    vhost: str,
    broker_secret: str,
    broker: Broker,
    start_operator: Callable[..., OperatorProcess],
    kubectl: Kubectl,
    kube_api: kubernetes.client.ApiClient,
) -> None:
    start_operator(namespace, resync_interval_seconds=RESYNC_SECONDS)
    manifest = queue_manifest(
        "removed", broker_secret, vhost, deletionPolicy="Delete", limits={"maxLength": 5}
    )
    apply_manifest(kubectl, manifest, namespace)
    wait_for_condition(kube_api, namespace, "removed", "Ready", "True")

    kubectl("delete", "ocq", "removed", "-n", namespace, "--wait=false")

    wait_gone(kubectl, namespace, "removed", GONE_TIMEOUT_SECONDS)
    assert read_queue(broker, vhost, "removed") is None
    assert read_queue(broker, vhost, "removed.dlq") is None
    policy = f"/api/policies/{vhost}/openchecker.{namespace}.removed"
    assert management_get(broker, policy) is None


@pytest.mark.timeout(120)
def test_delete_of_missing_queue_succeeds(
    namespace: str,
    vhost: str,
    broker_secret: str,
    broker: Broker,
    start_operator: Callable[..., OperatorProcess],
    kubectl: Kubectl,
    kube_api: kubernetes.client.ApiClient,
) -> None:
    # A long resync interval, so the timer does not declare the queue again
    # between its deletion and the resource's.
    start_operator(namespace, resync_interval_seconds=600)
    manifest = queue_manifest("vanished", broker_secret, vhost, deletionPolicy="Delete")
    apply_manifest(kubectl, manifest, namespace)
    wait_for_condition(kube_api, namespace, "vanished", "Ready", "True")
    delete_queue(broker, vhost, "vanished")
    delete_queue(broker, vhost, "vanished.dlq")

    kubectl("delete", "ocq", "vanished", "-n", namespace, "--wait=false")

    wait_gone(kubectl, namespace, "vanished", GONE_TIMEOUT_SECONDS)


@pytest.mark.timeout(150)
def test_non_empty_queue_blocks_until_forced(
    namespace: str,
    vhost: str,
    broker_secret: str,
    broker: Broker,
    start_operator: Callable[..., OperatorProcess],
    kubectl: Kubectl,
    kube_api: kubernetes.client.ApiClient,
) -> None:
    start_operator(namespace, resync_interval_seconds=RESYNC_SECONDS)
    manifest = queue_manifest("busy", broker_secret, vhost, deletionPolicy="Delete")
    apply_manifest(kubectl, manifest, namespace)
    wait_for_condition(kube_api, namespace, "busy", "Ready", "True")
    publish(broker, vhost, "busy", 2)

    kubectl("delete", "ocq", "busy", "-n", namespace, "--wait=false")

    resource = wait_for_condition(
        kube_api, namespace, "busy", "Deleting", "True", reason="QueueNotEmpty"
    )
    conditions = {item["type"]: item for item in resource["status"]["conditions"]}
    assert "Queue 'busy' on vhost" in conditions["Deleting"]["message"]
    assert 'openchecker.io/force-delete: "true"' in conditions["Deleting"]["message"]
    assert conditions["Ready"]["reason"] == "QueueNotEmpty"
    assert "openchecker.io/queue-cleanup" in resource["metadata"]["finalizers"]
    assert read_queue(broker, vhost, "busy") is not None
    assert event_count(kube_api, namespace, "busy", "QueueNotEmpty") >= 1

    kubectl("annotate", "ocq", "busy", "-n", namespace, FORCE_ANNOTATION)

    wait_gone(kubectl, namespace, "busy", GONE_TIMEOUT_SECONDS)
    assert read_queue(broker, vhost, "busy") is None
    assert read_queue(broker, vhost, "busy.dlq") is None


@pytest.mark.timeout(150)
def test_shared_dead_letter_queue_kept_until_last(
    namespace: str,
    vhost: str,
    broker_secret: str,
    broker: Broker,
    start_operator: Callable[..., OperatorProcess],
    kubectl: Kubectl,
    kube_api: kubernetes.client.ApiClient,
) -> None:
    start_operator(namespace, resync_interval_seconds=RESYNC_SECONDS)
    for name in ("first", "second"):
        manifest = queue_manifest(
            name,
            broker_secret,
            vhost,
            deletionPolicy="Delete",
            deadLetterQueue={"name": "shared.dlq"},
        )
        apply_manifest(kubectl, manifest, namespace)
    wait_for_condition(kube_api, namespace, "first", "Ready", "True")
    wait_for_condition(kube_api, namespace, "second", "Ready", "True")

    kubectl("delete", "ocq", "first", "-n", namespace, "--wait=false")

    wait_gone(kubectl, namespace, "first", GONE_TIMEOUT_SECONDS)
    assert read_queue(broker, vhost, "first") is None
    assert read_queue(broker, vhost, "shared.dlq") is not None
    wait_for(
        lambda: event_count(kube_api, namespace, "first", "DeadLetterQueueShared") == 1,
        10,
        message="no DeadLetterQueueShared Event for the first resource",
    )

    kubectl("delete", "ocq", "second", "-n", namespace, "--wait=false")

    wait_gone(kubectl, namespace, "second", GONE_TIMEOUT_SECONDS)
    assert read_queue(broker, vhost, "second") is None
    assert read_queue(broker, vhost, "shared.dlq") is None
