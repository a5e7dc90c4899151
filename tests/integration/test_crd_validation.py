"""The API server enforces the CRD's schema and CEL rules with readable messages."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import yaml
from support import Kubectl, KubectlError, apply_manifest
from support.resources import queue_manifest


def rejected(
    kubectl: Kubectl, namespace: str, manifest: dict[str, Any], dry_run: bool = True
) -> str:
    """Apply a manifest that must be rejected; return kubectl's error output."""
    args = ["--dry-run=server"] if dry_run else []
    result = kubectl(
        "apply", "-n", namespace, *args, "-f", "-", input=yaml.safe_dump(manifest), check=False
    )
    assert result.returncode != 0, f"the API server accepted {manifest['spec']}"
    return result.stderr


def base(**spec: Any) -> dict[str, Any]:
    return queue_manifest("probe", "rabbitmq", "/", **spec)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            {"limits": {"messageTTLMilliseconds": -1}},
            "spec.limits.messageTTLMilliseconds in body should be greater than or equal to 0",
        ),
        (
            {"limits": {"maxLength": -5}},
            "spec.limits.maxLength in body should be greater than or equal to 0",
        ),
        (
            {"limits": {"deliveryLimit": 5}},
            "limits.deliveryLimit needs queue.type quorum",
        ),
        (
            {"queue": {"type": "quorum"}, "limits": {"overflow": "reject-publish-dlx"}},
            "limits.overflow reject-publish-dlx needs queue.type classic",
        ),
        ({"queue": {"name": "amq.gen"}}, 'queue names starting with "amq." are reserved'),
        (
            {"queue": {"name": "same"}, "deadLetterQueue": {"name": "same"}},
            "spec.deadLetterQueue.name must differ from the work queue's name",
        ),
        (
            {"scaling": {"minReplicas": 3, "maxReplicas": 2}},
            "scaling.minReplicas must not exceed scaling.maxReplicas",
        ),
        (
            {"scaling": {"messagesPerReplica": 0}},
            "scaling.messagesPerReplica must be greater than 0",
        ),
        (
            {"scaling": {"maxReplicas": 2, "fallbackReplicas": 3}},
            "scaling.fallbackReplicas must not exceed scaling.maxReplicas",
        ),
        (
            {"agent": {"terminationGracePeriodSeconds": 30, "drainTimeoutSeconds": 30}},
            "agent.drainTimeoutSeconds must be less than agent.terminationGracePeriodSeconds",
        ),
        (
            # An integer below a fractional minimum passes the OpenAPI check of
            # kube-apiserver 1.36, so a CEL rule has to reject it.
            {"scaling": {"pollIntervalSeconds": 0}},
            "scaling.pollIntervalSeconds must be at least 0.5",
        ),
        # The agent compares each entry with the callback URL's host name, so an
        # entry with a port or scheme never matches, and a comma stops the
        # operator from rendering config.ini.
        (
            {"agent": {"callbackAllowedHosts": ["api.example.org:8443"]}},
            "callbackAllowedHosts entries must be host names or IP addresses",
        ),
        (
            {"agent": {"callbackAllowedHosts": ["https://api.example.org"]}},
            "callbackAllowedHosts entries must be host names or IP addresses",
        ),
        (
            {"agent": {"callbackAllowedHosts": ["a.example.org,b.example.org"]}},
            "callbackAllowedHosts entries must be host names or IP addresses",
        ),
        ({"queue": {"type": "stream"}}, 'Unsupported value: "stream"'),
        ({"deletionPolicy": "Purge"}, 'Unsupported value: "Purge"'),
    ],
)
def test_invalid_spec_rejected(
    kubectl: Kubectl, namespace: str, opencheckqueue_crd: str, spec: Any, expected: str
) -> None:
    message = rejected(kubectl, namespace, base(**spec))

    assert expected in message


def test_missing_connection_rejected(
    kubectl: Kubectl, namespace: str, opencheckqueue_crd: str
) -> None:
    manifest = base()
    del manifest["spec"]["connection"]

    assert "spec.connection: Required value" in rejected(kubectl, namespace, manifest)


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        (
            {"queue": {"name": "a"}},
            {"queue": {"name": "b"}},
            "spec.queue.name cannot change after creation",
        ),
        (
            {},
            {"queue": {"name": "renamed"}},
            "spec.queue.name cannot change after creation",
        ),
        (
            {"queue": {"vhost": "/"}},
            {"queue": {"vhost": "other"}},
            "spec.queue.vhost cannot change",
        ),
        (
            {"queue": {"type": "classic"}},
            {"queue": {"type": "quorum"}},
            "queue.type cannot change: RabbitMQ cannot convert an existing queue",
        ),
        (
            {"deadLetterQueue": {"name": "dead"}},
            {"deadLetterQueue": {"name": "other"}},
            "spec.deadLetterQueue.name cannot change after creation",
        ),
    ],
)
def test_immutable_fields_rejected(
    kubectl: Kubectl,
    namespace: str,
    opencheckqueue_crd: str,
    first: dict[str, Any],
    second: dict[str, Any],
    expected: str,
) -> None:
    apply_manifest(kubectl, base(**first), namespace)

    message = rejected(kubectl, namespace, base(**second), dry_run=False)

    assert expected in message


def test_default_dead_letter_name_may_be_written_out(
    kubectl: Kubectl, namespace: str, opencheckqueue_crd: str
) -> None:
    apply_manifest(kubectl, base(queue={"name": "work"}), namespace)

    apply_manifest(
        kubectl, base(queue={"name": "work"}, deadLetterQueue={"name": "work.dlq"}), namespace
    )


@pytest.mark.parametrize("host", ["api.example.org", "192.0.2.10", "::1", "fd00::1:8443"])
def test_callback_host_accepted(
    kubectl: Kubectl, namespace: str, opencheckqueue_crd: str, host: str
) -> None:
    result = kubectl(
        "apply",
        "-n",
        namespace,
        "--dry-run=server",
        "-f",
        "-",
        input=yaml.safe_dump(base(agent={"callbackAllowedHosts": [host]})),
        check=False,
    )

    assert result.returncode == 0, result.stderr


def test_limits_change_accepted(kubectl: Kubectl, namespace: str, opencheckqueue_crd: str) -> None:
    apply_manifest(kubectl, base(limits={"messageTTLMilliseconds": 1000}), namespace)

    apply_manifest(kubectl, base(limits={"messageTTLMilliseconds": 5000}), namespace)


def test_defaults_filled_in(kubectl: Kubectl, namespace: str, opencheckqueue_crd: str) -> None:
    apply_manifest(kubectl, base(), namespace)

    stored = json.loads(kubectl("get", "ocq", "probe", "-n", namespace, "-o", "json").stdout)
    spec = stored["spec"]
    assert spec["queue"]["type"] == "classic"
    assert spec["deletionPolicy"] == "Retain"
    assert spec["connection"]["tls"] == {"enabled": False, "verify": True}
    assert spec["agent"]["prefetchCount"] == 1
    assert spec["scaling"]["messagesPerReplica"] == 10


def test_explain_shows_descriptions(kubectl: Kubectl, opencheckqueue_crd: str) -> None:
    def explain(path: str) -> str:
        # Discovery may lag the CRD's creation by a moment.
        for _ in range(20):
            result = kubectl("explain", path, check=False)
            if result.returncode == 0:
                return result.stdout
            time.sleep(0.5)
        raise KubectlError(result.returncode, ["kubectl", "explain", path], "", result.stderr)

    queue = explain("ocq.spec.queue")
    assert "The work queue that publishers send check requests to." in queue
    assert "Queue name on the broker; defaults to the resource's name." in queue
    assert "Cannot change" in queue
    assert "enum: classic, quorum" in queue

    # The README promises explain shows each default; kubectl does not print
    # the schema's default keyword, so the description carries it.
    assert "Defaults to 10." in explain("ocq.spec.scaling.maxReplicas")
    assert "Defaults to 5." in explain("ocq.spec.scaling.pollIntervalSeconds")
    assert "Defaults to classic." in queue

    limits = explain("ocq.spec.limits.messageTTLMilliseconds")
    assert "Milliseconds a message may wait in the work queue" in limits
