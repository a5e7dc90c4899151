"""A queue that exists with other arguments is reported as drift and left alone."""

from __future__ import annotations

import time
from collections.abc import Callable

import kubernetes
import pytest
from openchecker_testenv.broker import Broker
from support import Kubectl, apply_manifest, wait_for
from support.operator import OperatorProcess
from support.resources import (
    declare_queue,
    event_count,
    publish,
    queue_manifest,
    read_queue,
    read_queue_resource,
    wait_for_condition,
)

RESYNC_SECONDS = 1.0
OBSERVED_RESYNCS = 5


@pytest.mark.timeout(120)
def test_conflicting_queue_reported_as_drift(
    namespace: str,
    vhost: str,
    broker_secret: str,
    broker: Broker,
    start_operator: Callable[..., OperatorProcess],
    kubectl: Kubectl,
    kube_api: kubernetes.client.ApiClient,
) -> None:
    # Someone declared the work queue first, without dead-lettering and
    # with a length limit as an argument, and put a message into it.
    declare_queue(broker, vhost, "drifted", {"x-max-length": 5})
    publish(broker, vhost, "drifted", 1)
    operator = start_operator(namespace, resync_interval_seconds=RESYNC_SECONDS)

    apply_manifest(kubectl, queue_manifest("drifted", broker_secret, vhost), namespace)

    resource = wait_for_condition(
        kube_api, namespace, "drifted", "InSync", "False", reason="ArgumentsDrifted"
    )
    conditions = {item["type"]: item for item in resource["status"]["conditions"]}
    message = conditions["InSync"]["message"]
    assert "'drifted' x-dead-letter-exchange: expected \"\", found unset" in message
    assert "'drifted' x-dead-letter-routing-key: expected \"drifted.dlq\", found unset" in message
    assert "'drifted' x-max-length: expected unset, found 5" in message
    assert conditions["Ready"]["status"] == "False"
    assert conditions["Ready"]["reason"] == "ArgumentsDrifted"
    assert conditions["QueueDeclared"]["status"] == "True"
    assert conditions["DeadLetterQueueDeclared"]["status"] == "True"
    assert conditions["BrokerReachable"]["status"] == "True"

    # Several resyncs later: the same steady state, no retries, no restarts.
    offset = operator.log_size()
    transition = conditions["InSync"]["lastTransitionTime"]
    time.sleep(RESYNC_SECONDS * OBSERVED_RESYNCS)
    later = read_queue_resource(kube_api, namespace, "drifted")
    later_conditions = {item["type"]: item for item in later["status"]["conditions"]}
    assert later_conditions["InSync"]["lastTransitionTime"] == transition
    assert operator.running
    assert operator.count(r"failed", offset) == 0, operator.log_text(offset)
    assert operator.count(r"Timer 'resync_queue' succeeded", offset) >= OBSERVED_RESYNCS - 2
    assert event_count(kube_api, namespace, "drifted", "ArgumentsDrifted") == 1
    assert event_count(kube_api, namespace, "drifted", "Declared") == 1

    # The queue is untouched, and status still gets its counts.
    queue = read_queue(broker, vhost, "drifted")
    assert queue is not None
    assert queue["arguments"] == {"x-max-length": 5}
    wait_for(
        lambda: (
            read_queue_resource(kube_api, namespace, "drifted")["status"]
            .get("messages", {})
            .get("ready")
            == 1
        ),
        15,
        message="status never showed the drifted queue's message",
    )
