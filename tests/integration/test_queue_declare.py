"""The operator declares both queues with exact arguments and reports counts in status."""

from __future__ import annotations

import re
import time

import kubernetes
import pytest
from openchecker_testenv.broker import Broker
from support import Kubectl, apply_manifest, wait_for
from support.operator import OperatorProcess
from support.resources import (
    load_manifest,
    publish,
    read_queue,
    read_queue_resource,
    settled_event_count,
    wait_for_condition,
)

RESYNC_SECONDS = 3.0
# RabbitMQ 3.10 refreshes queue counts in the management API every 5 s
# (collect_statistics_interval), so a count reaches status at most one
# stats interval plus one resync interval after it changed.
BROKER_STATS_SECONDS = 5.0


def apply_sample(kubectl: Kubectl, namespace: str, vhost: str, secret: str) -> dict[str, object]:
    manifest = load_manifest("opencheckqueue.yaml")
    manifest["spec"]["queue"]["vhost"] = vhost
    manifest["spec"]["connection"]["secretRef"]["name"] = secret
    apply_manifest(kubectl, manifest, namespace)
    return manifest


@pytest.mark.timeout(120)
def test_sample_declares_both_queues(
    namespace: str,
    vhost: str,
    broker_secret: str,
    start_operator: object,
    broker: Broker,
    kubectl: Kubectl,
    kube_api: kubernetes.client.ApiClient,
) -> None:
    start_operator(namespace, resync_interval_seconds=RESYNC_SECONDS)  # type: ignore[operator]
    apply_sample(kubectl, namespace, vhost, broker_secret)

    resource = wait_for_condition(kube_api, namespace, "opencheck", "Ready", "True")

    dead_letters = read_queue(broker, vhost, "dead_letters")
    work = read_queue(broker, vhost, "opencheck")
    assert dead_letters is not None, "the DLQ was not declared"
    assert work is not None, "the work queue was not declared"
    assert dead_letters["arguments"] == {"x-queue-type": "classic"}
    assert dead_letters["durable"] is True
    assert work["arguments"] == {
        "x-queue-type": "classic",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "dead_letters",
    }
    assert work["durable"] is True
    assert resource["status"]["queue"] == {
        "name": "opencheck",
        "vhost": vhost,
        "deadLetterQueue": "dead_letters",
        "policy": f"openchecker.{namespace}.opencheck",
    }
    assert settled_event_count(kube_api, namespace, "opencheck", "Declared", 2) == 2

    # The policy carries the limits; the broker shows them as effective
    # once its next stats emission has run.
    expected_policy = {
        "message-ttl": 3600000,
        "max-length": 10000,
        "overflow": "reject-publish",
    }
    wait_for(
        lambda: (
            (read_queue(broker, vhost, "opencheck") or {}).get("effective_policy_definition")
            == expected_policy
        ),
        BROKER_STATS_SECONDS * 3,
        message="the work queue never showed the operator's policy",
    )


@pytest.mark.timeout(120)
def test_get_shows_printer_columns(
    namespace: str,
    vhost: str,
    broker_secret: str,
    start_operator: object,
    kubectl: Kubectl,
    kube_api: kubernetes.client.ApiClient,
) -> None:
    start_operator(namespace, resync_interval_seconds=RESYNC_SECONDS)  # type: ignore[operator]
    apply_sample(kubectl, namespace, vhost, broker_secret)
    wait_for_condition(kube_api, namespace, "opencheck", "Ready", "True")

    def columns() -> dict[str, str] | None:
        lines = kubectl("get", "ocq", "-n", namespace).stdout.splitlines()
        values = table_row(lines[0], lines[1])
        return values if values.get("READY") not in ("", "<none>") else None

    row = wait_for(columns, 30, message="kubectl get ocq never showed the counts")
    assert list(row) == [
        "NAME",
        "QUEUE",
        "READY",
        "UNACKED",
        "CONSUMERS",
        "DLQ",
        "REPLICAS",
        "DESIRED",
        "STATUS",
        "AGE",
    ]
    assert row["NAME"] == "opencheck"
    assert row["QUEUE"] == "opencheck"
    assert row["READY"] == "0"
    assert row["STATUS"] == "QueueReady"


def table_row(header: str, row: str) -> dict[str, str]:
    """Split a kubectl table row at the header's column starts; empty cells stay empty."""
    starts = [match.start() for match in re.finditer(r"\S+", header)]
    ends = [*starts[1:], None]
    names = header.split()
    return {
        name: row[start:end].strip() for name, start, end in zip(names, starts, ends, strict=True)
    }


@pytest.mark.timeout(120)
def test_published_messages_reach_status(
    namespace: str,
    vhost: str,
    broker_secret: str,
    start_operator: object,
    broker: Broker,
    kubectl: Kubectl,
    kube_api: kubernetes.client.ApiClient,
) -> None:
    operator: OperatorProcess = start_operator(  # type: ignore[operator]
        namespace, resync_interval_seconds=RESYNC_SECONDS
    )
    manifest = load_manifest("opencheckqueue.yaml")
    manifest["spec"]["queue"]["vhost"] = vhost
    manifest["spec"]["connection"]["secretRef"]["name"] = broker_secret
    # The scaler writes counts too; polling once an hour leaves the resync
    # timer as the only writer, which is what this test measures.
    manifest["spec"]["scaling"]["pollIntervalSeconds"] = 3600
    apply_manifest(kubectl, manifest, namespace)
    wait_for_condition(kube_api, namespace, "opencheck", "Ready", "True")

    published = time.monotonic()
    publish(broker, vhost, "opencheck", 7)

    def ready_count() -> bool:
        status = read_queue_resource(kube_api, namespace, "opencheck").get("status", {})
        return status.get("messages", {}).get("ready") == 7

    wait_for(
        ready_count,
        RESYNC_SECONDS + BROKER_STATS_SECONDS + 2,
        message="status never showed ready 7 within one resync and one stats interval",
    )
    elapsed = time.monotonic() - published
    print(f"ready 7 reached status {elapsed:.1f} s after publishing")
    assert operator.running
