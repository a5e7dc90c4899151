"""The objects and messages the demo creates: broker Secret, OpenCheckQueue, check requests."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

from ..broker import Broker
from .options import DemoOptions

RESOURCE_NAME = "demo"
QUEUE_NAME = "checks"
DEAD_LETTER_QUEUE_NAME = "checks.dlq"
SECRET_NAME = "demo-rabbitmq"
# The host the agents post results to; it is the only one they may use.
CALLBACK_HOST = "127.0.0.1"
AGENT_IMAGE = "openchecker-agent:0.1.0"

WORK_COMMAND = "analyze"
FAILING_COMMAND = "fail"
UNKNOWN_COMMAND = "no-such-command"


class Outcome(enum.Enum):
    """The expected fate of a published check request."""

    # The agent runs it and posts the results.
    PROCESSED = "processed"
    # The agent runs it, a command exits non-zero, and it posts the results.
    COMMAND_FAILS = "command fails"
    # The agent rejects it without running anything; the broker dead-letters it.
    DEAD_LETTERED = "dead-lettered"


@dataclass(frozen=True)
class PlannedMessage:
    """One message to publish and what should become of it."""

    body: bytes
    outcome: Outcome
    reason: str


def build_broker_secret(broker: Broker) -> dict[str, Any]:
    """Return the connection Secret, in the RabbitMQ Cluster Operator's key layout."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET_NAME},
        "type": "Opaque",
        "stringData": {
            "host": broker.host,
            "port": str(broker.amqp_port),
            "username": broker.username,
            "password": broker.password,
            "management_url": broker.management_url,
        },
    }


def build_queue_resource(options: DemoOptions, vhost: str) -> dict[str, Any]:
    """Return the OpenCheckQueue with short poll and stabilization times, so the demo is quick."""
    return {
        "apiVersion": "openchecker.io/v1alpha1",
        "kind": "OpenCheckQueue",
        "metadata": {"name": RESOURCE_NAME},
        "spec": {
            "queue": {"name": QUEUE_NAME, "vhost": vhost, "type": "classic"},
            "deadLetterQueue": {"name": DEAD_LETTER_QUEUE_NAME},
            "connection": {"secretRef": {"name": SECRET_NAME}},
            # Retain: the demo deletes its vhost, and with it both queues, itself.
            "deletionPolicy": "Retain",
            "agent": {
                "image": AGENT_IMAGE,
                "terminationGracePeriodSeconds": 60,
                "drainTimeoutSeconds": 30,
                "prefetchCount": 1,
                "heartbeatSeconds": 30,
                "callbackAllowedHosts": [CALLBACK_HOST],
                "commands": [
                    {
                        "name": WORK_COMMAND,
                        "argv": ["sleep", f"{options.task_seconds:g}"],
                        "timeoutSeconds": 60,
                    },
                    {"name": FAILING_COMMAND, "argv": ["false"], "timeoutSeconds": 10},
                ],
            },
            "scaling": {
                "minReplicas": 0,
                "maxReplicas": options.max_replicas,
                "messagesPerReplica": options.messages_per_replica,
                "pollIntervalSeconds": options.poll_interval_seconds,
                "scaleDownStabilizationSeconds": options.scale_down_stabilization_seconds,
            },
        },
    }


def plan_messages(count: int, callback_url: str) -> list[PlannedMessage]:
    """Return `count` check requests; in every ten, one is invalid JSON, one names an
    unknown command and one runs a command that fails."""
    return [_plan_message(index, callback_url) for index in range(count)]


def _plan_message(index: int, callback_url: str) -> PlannedMessage:
    task_id = f"demo-{index:04d}"
    kind = index % 10
    if kind == 4:
        # Cut off in the middle, so it does not parse as JSON.
        return PlannedMessage(
            b'{"command_list": ["analyze"], "project_url": ',
            Outcome.DEAD_LETTERED,
            "invalid JSON",
        )
    if kind == 9:
        body = _check_request(task_id, [UNKNOWN_COMMAND], callback_url)
        return PlannedMessage(body, Outcome.DEAD_LETTERED, "unknown command")
    if kind == 6:
        body = _check_request(task_id, [FAILING_COMMAND], callback_url)
        return PlannedMessage(body, Outcome.COMMAND_FAILS, "command exits 1")
    body = _check_request(task_id, [WORK_COMMAND], callback_url)
    return PlannedMessage(body, Outcome.PROCESSED, "valid")


def _check_request(task_id: str, commands: list[str], callback_url: str) -> bytes:
    request = {
        "command_list": commands,
        "project_url": f"https://example.org/projects/{task_id}.git",
        "callback_url": f"{callback_url}/{task_id}",
        "task_metadata": {"task_id": task_id},
    }
    return json.dumps(request).encode("utf-8")
