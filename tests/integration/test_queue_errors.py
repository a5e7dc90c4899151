"""A missing Secret, wrong credentials and an unreachable broker become conditions."""

from __future__ import annotations

import json
import re
import socket
import uuid
from collections.abc import Callable

import kubernetes
import pytest
from openchecker_testenv.broker import Broker
from support import Kubectl, apply_manifest, wait_for
from support.operator import OperatorProcess
from support.resources import (
    create_secret,
    events_of,
    queue_manifest,
    read_queue,
    wait_for_condition,
)

RESYNC_SECONDS = 1.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def broker_data(broker: Broker, **overrides: str) -> dict[str, str]:
    data = {
        "host": broker.host,
        "port": str(broker.amqp_port),
        "username": broker.username,
        "password": broker.password,
        "management_url": broker.management_url,
    }
    data.update(overrides)
    return data


@pytest.mark.timeout(120)
def test_missing_secret_then_created(
    namespace: str,
    vhost: str,
    broker: Broker,
    start_operator: Callable[..., OperatorProcess],
    kubectl: Kubectl,
    kube_api: kubernetes.client.ApiClient,
) -> None:
    start_operator(namespace, resync_interval_seconds=RESYNC_SECONDS)
    apply_manifest(kubectl, queue_manifest("nosecret", "later", vhost), namespace)

    resource = wait_for_condition(
        kube_api, namespace, "nosecret", "BrokerReachable", "False", reason="SecretNotFound"
    )
    conditions = {item["type"]: item for item in resource["status"]["conditions"]}
    assert (
        f"Secret {namespace}/later named by spec.connection.secretRef does not exist"
        in (conditions["BrokerReachable"]["message"])
    )
    assert conditions["Ready"]["reason"] == "SecretNotFound"

    create_secret(kube_api, namespace, "later", broker_data(broker))

    wait_for_condition(kube_api, namespace, "nosecret", "Ready", "True", timeout_seconds=30)
    assert read_queue(broker, vhost, "nosecret") is not None


@pytest.mark.timeout(60)
def test_handler_failure_log_names_resource(
    namespace: str,
    vhost: str,
    start_operator: Callable[..., OperatorProcess],
    kubectl: Kubectl,
) -> None:
    operator = start_operator(namespace, resync_interval_seconds=RESYNC_SECONDS)
    apply_manifest(kubectl, queue_manifest("unnamed", "absent", vhost), namespace)

    # kopf's own lines, such as a failed handler, name the resource only in
    # a prefix, and without it the log cannot tell which resource failed.
    wait_for(
        lambda: operator.count(
            re.escape(f"[{namespace}/unnamed] Handler 'create_queue' failed temporarily")
        ),
        30,
        message=f"no prefixed handler failure in the log:\n{operator.log_tail()}",
    )


@pytest.mark.timeout(120)
def test_wrong_password_never_shown(
    namespace: str,
    vhost: str,
    broker: Broker,
    start_operator: Callable[..., OperatorProcess],
    kubectl: Kubectl,
    kube_api: kubernetes.client.ApiClient,
) -> None:
    wrong_password = f"wrong-{uuid.uuid4().hex}"
    create_secret(kube_api, namespace, "badcreds", broker_data(broker, password=wrong_password))
    operator = start_operator(namespace, resync_interval_seconds=RESYNC_SECONDS)
    apply_manifest(kubectl, queue_manifest("badcreds", "badcreds", vhost), namespace)

    resource = wait_for_condition(
        kube_api,
        namespace,
        "badcreds",
        "BrokerReachable",
        "False",
        reason="AuthenticationFailed",
    )
    conditions = {item["type"]: item for item in resource["status"]["conditions"]}
    message = conditions["BrokerReachable"]["message"]
    assert f"rejected the login of user {broker.username!r}" in message
    assert conditions["Ready"]["reason"] == "AuthenticationFailed"

    events = events_of(kube_api, namespace, "badcreds")
    assert any(event.reason == "AuthenticationFailed" for event in events)
    assert wrong_password not in json.dumps(resource)
    assert all(wrong_password not in (event.message or "") for event in events)
    assert wrong_password not in operator.log_text()
    assert read_queue(broker, vhost, "badcreds") is None


@pytest.mark.timeout(120)
def test_unreachable_broker_condition(
    namespace: str,
    vhost: str,
    broker: Broker,
    start_operator: Callable[..., OperatorProcess],
    kubectl: Kubectl,
    kube_api: kubernetes.client.ApiClient,
) -> None:
    closed_port = free_port()
    data = broker_data(
        broker, port=str(closed_port), management_url=f"http://127.0.0.1:{closed_port}"
    )
    create_secret(kube_api, namespace, "nobroker", data)
    operator = start_operator(namespace, resync_interval_seconds=RESYNC_SECONDS)
    apply_manifest(kubectl, queue_manifest("nobroker", "nobroker", vhost), namespace)

    resource = wait_for_condition(
        kube_api, namespace, "nobroker", "BrokerReachable", "False", reason="BrokerUnreachable"
    )
    conditions = {item["type"]: item for item in resource["status"]["conditions"]}
    assert (
        f"The management API at http://127.0.0.1:{closed_port} is unreachable"
        in (conditions["BrokerReachable"]["message"])
    )
    assert operator.running
