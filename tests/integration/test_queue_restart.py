"""Restarting the operator changes nothing: no declares, no errors, the same status."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import kubernetes
import pytest
from openchecker_testenv.broker import Broker
from support import Kubectl, apply_manifest, wait_for
from support.operator import OperatorProcess
from support.resources import (
    event_count,
    queue_manifest,
    read_queue,
    read_queue_resource,
    wait_for_condition,
)

RESYNC_SECONDS = 1.0
SETTLE_SECONDS = 4.0
QUEUE_CONDITIONS = (
    "Ready",
    "BrokerReachable",
    "DeadLetterQueueDeclared",
    "QueueDeclared",
    "InSync",
)


def queue_conditions(resource: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        item["type"]: item
        for item in resource["status"]["conditions"]
        if item["type"] in QUEUE_CONDITIONS
    }


@pytest.mark.timeout(150)
def test_restart_changes_nothing(
    namespace: str,
    vhost: str,
    broker_secret: str,
    broker: Broker,
    start_operator: Callable[..., OperatorProcess],
    kubectl: Kubectl,
    kube_api: kubernetes.client.ApiClient,
) -> None:
    operator = start_operator(namespace, resync_interval_seconds=RESYNC_SECONDS)
    manifest = queue_manifest(
        "restart", broker_secret, vhost, limits={"messageTTLMilliseconds": 60000}
    )
    apply_manifest(kubectl, manifest, namespace)
    wait_for_condition(kube_api, namespace, "restart", "Ready", "True")
    time.sleep(SETTLE_SECONDS)
    before = read_queue_resource(kube_api, namespace, "restart")
    declared_before = event_count(kube_api, namespace, "restart", "Declared")
    policy_before = event_count(kube_api, namespace, "restart", "PolicyApplied")
    queue_before = read_queue(broker, vhost, "restart")
    assert declared_before == 2

    offset = operator.log_size()
    operator.restart()
    # The resume handler runs at start, then the timer ticks a few times.
    wait_for(
        lambda: operator.count(r"Handler 'resume_queue' succeeded", offset) >= 1,
        30,
        message="the resume handler never succeeded after the restart",
    )
    time.sleep(SETTLE_SECONDS)

    after = read_queue_resource(kube_api, namespace, "restart")
    assert queue_conditions(after) == queue_conditions(before)
    assert after["status"]["queue"] == before["status"]["queue"]
    assert after["status"]["observedGeneration"] == before["status"]["observedGeneration"]
    assert event_count(kube_api, namespace, "restart", "Declared") == declared_before
    assert event_count(kube_api, namespace, "restart", "Redeclared") == 0
    assert event_count(kube_api, namespace, "restart", "PolicyApplied") == policy_before
    assert operator.count(r"declared queue", offset) == 0
    assert operator.count(r"Applied policy", offset) == 0
    assert operator.count(r"\[(ERROR|WARNING) ", offset) == 0, operator.log_text(offset)
    queue_after = read_queue(broker, vhost, "restart")
    assert queue_after is not None and queue_before is not None
    assert queue_after["arguments"] == queue_before["arguments"]
