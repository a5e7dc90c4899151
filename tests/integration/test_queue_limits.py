"""Limit changes reach the existing queue through the operator's policy, without a redeclare."""

from __future__ import annotations

from collections.abc import Callable

import kubernetes
import pytest
from openchecker_testenv.broker import Broker
from support import Kubectl, apply_manifest, wait_for
from support.operator import OperatorProcess
from support.resources import (
    event_count,
    management_get,
    publish,
    queue_manifest,
    read_queue,
    settled_event_count,
    wait_for_condition,
)

RESYNC_SECONDS = 2.0
# The broker's stats emission interval plus margin: queue details such as
# the effective policy and counts refresh at this pace in RabbitMQ 3.10.
BROKER_REFRESH_SECONDS = 15.0


def effective_policy(broker: Broker, vhost: str, queue: str) -> dict[str, object]:
    return dict((read_queue(broker, vhost, queue) or {}).get("effective_policy_definition") or {})


@pytest.mark.timeout(150)
def test_ttl_change_updates_policy_live(
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
        "limits", broker_secret, vhost, limits={"messageTTLMilliseconds": 60000}
    )
    apply_manifest(kubectl, manifest, namespace)
    wait_for_condition(kube_api, namespace, "limits", "Ready", "True")
    publish(broker, vhost, "limits", 3)
    wait_for(
        lambda: effective_policy(broker, vhost, "limits") == {"message-ttl": 60000},
        BROKER_REFRESH_SECONDS,
        message="the first TTL never became effective",
    )

    manifest["spec"]["limits"] = {"messageTTLMilliseconds": 120000, "maxLength": 50}
    apply_manifest(kubectl, manifest, namespace)

    wait_for(
        lambda: (
            effective_policy(broker, vhost, "limits") == {"message-ttl": 120000, "max-length": 50}
        ),
        BROKER_REFRESH_SECONDS,
        message="the changed limits never became effective",
    )
    # Same queue: its messages are still there, and nothing was declared again.
    wait_for(
        lambda: (read_queue(broker, vhost, "limits") or {}).get("messages") == 3,
        BROKER_REFRESH_SECONDS,
        message="the queue lost its messages",
    )
    assert settled_event_count(kube_api, namespace, "limits", "Declared", 2) == 2
    assert event_count(kube_api, namespace, "limits", "Redeclared") == 0
    assert settled_event_count(kube_api, namespace, "limits", "PolicyApplied", 2) == 2
    policy = management_get(broker, f"/api/policies/{vhost}/openchecker.{namespace}.limits")
    assert policy["definition"] == {"message-ttl": 120000, "max-length": 50}
    assert policy["pattern"] == "^limits$"
    assert policy["priority"] == 100
    assert policy["apply-to"] == "queues"


@pytest.mark.timeout(120)
def test_removing_limits_deletes_policy(
    namespace: str,
    vhost: str,
    broker_secret: str,
    broker: Broker,
    start_operator: Callable[..., OperatorProcess],
    kubectl: Kubectl,
    kube_api: kubernetes.client.ApiClient,
) -> None:
    start_operator(namespace, resync_interval_seconds=RESYNC_SECONDS)
    manifest = queue_manifest("nolimits", broker_secret, vhost, limits={"maxLength": 5})
    apply_manifest(kubectl, manifest, namespace)
    wait_for_condition(kube_api, namespace, "nolimits", "Ready", "True")
    policy_path = f"/api/policies/{vhost}/openchecker.{namespace}.nolimits"
    assert management_get(broker, policy_path) is not None

    del manifest["spec"]["limits"]
    apply_manifest(kubectl, manifest, namespace)

    wait_for(
        lambda: management_get(broker, policy_path) is None,
        30,
        message="the policy stayed after all limits were removed",
    )
    assert settled_event_count(kube_api, namespace, "nolimits", "PolicyDeleted", 1) == 1


@pytest.mark.timeout(120)
def test_consumer_timeout_reported_unsupported(
    namespace: str,
    vhost: str,
    broker_secret: str,
    broker: Broker,
    start_operator: Callable[..., OperatorProcess],
    kubectl: Kubectl,
    kube_api: kubernetes.client.ApiClient,
) -> None:
    version = management_get(broker, "/api/overview")["rabbitmq_version"]
    if tuple(int(part) for part in version.split(".")[:3]) >= (3, 11, 15):
        pytest.fail(
            f"RabbitMQ {version} supports consumer-timeout; this test covers older brokers "
            "and needs a version check of the policy instead"
        )
    start_operator(namespace, resync_interval_seconds=RESYNC_SECONDS)
    limits = {"messageTTLMilliseconds": 1000, "consumerTimeoutMilliseconds": 60000}
    apply_manifest(
        kubectl, queue_manifest("timeout", broker_secret, vhost, limits=limits), namespace
    )

    resource = wait_for_condition(
        kube_api, namespace, "timeout", "InSync", "False", reason="LimitUnsupported"
    )

    conditions = {item["type"]: item for item in resource["status"]["conditions"]}
    assert (
        f"RabbitMQ {version} cannot apply limits.consumerTimeoutMilliseconds"
        in (conditions["InSync"]["message"])
    )
    assert conditions["QueueDeclared"]["status"] == "True"
    wait_for(
        lambda: effective_policy(broker, vhost, "timeout") == {"message-ttl": 1000},
        BROKER_REFRESH_SECONDS,
        message="the supported limits were not applied",
    )
