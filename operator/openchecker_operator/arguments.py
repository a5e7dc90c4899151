"""Queue arguments and the limits policy, as pure functions of the spec.

Declared arguments are fixed when a queue is created: RabbitMQ rejects a
redeclare with other values (406 PRECONDITION_FAILED). The limits a user
may change later therefore go into a policy, which the broker applies to
the existing queue at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .models import LimitsSpec, QueueType

# NOTE: RabbitMQ applies only the highest-priority policy that matches a
# queue, so a user policy above 100 on the same queue hides these limits,
# and two resources with the same queue name on one vhost write two
# policies of equal priority for it.
POLICY_PRIORITY = 100
POLICY_APPLY_TO = "queues"
POLICY_PREFIX = "openchecker"

QUEUE_TYPE_ARGUMENT = "x-queue-type"
DEAD_LETTER_EXCHANGE_ARGUMENT = "x-dead-letter-exchange"
DEAD_LETTER_ROUTING_KEY_ARGUMENT = "x-dead-letter-routing-key"
# The default exchange routes by queue name, so dead-lettering to it with
# the DLQ's name as routing key needs no exchange or binding.
DEFAULT_EXCHANGE = ""

CONSUMER_TIMEOUT_KEY = "consumer-timeout"
# NOTE: RabbitMQ accepts the consumer-timeout policy key from 3.11.15 on,
# as its consumer documentation states; 3.10.8 rejects it as "not
# recognised policy settings" (checked against the local broker). On older
# brokers the key is left out and reported as unsupported.
CONSUMER_TIMEOUT_MIN_VERSION = (3, 11, 15)

# Spec field (Python name) to policy key, in the order they appear in
# messages.
POLICY_KEYS = {
    "message_ttl_milliseconds": "message-ttl",
    "max_length": "max-length",
    "max_length_bytes": "max-length-bytes",
    "overflow": "overflow",
    "delivery_limit": "delivery-limit",
    "consumer_timeout_milliseconds": CONSUMER_TIMEOUT_KEY,
}
SPEC_FIELD_NAMES = {
    "message_ttl_milliseconds": "messageTTLMilliseconds",
    "max_length": "maxLength",
    "max_length_bytes": "maxLengthBytes",
    "overflow": "overflow",
    "delivery_limit": "deliveryLimit",
    "consumer_timeout_milliseconds": "consumerTimeoutMilliseconds",
}


@dataclass(frozen=True)
class PolicyPlan:
    """The policy definition for a queue's limits, and the limits the broker cannot take."""

    definition: dict[str, Any]
    # spec.limits field names, such as "consumerTimeoutMilliseconds".
    unsupported: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        """True when no policy is needed."""
        return not self.definition


@dataclass(frozen=True)
class ArgumentDifference:
    """One declared argument whose value on the broker differs from the spec's."""

    key: str
    expected: Any
    actual: Any

    def describe(self) -> str:
        """Return "key: expected E, found A", with "unset" for a missing value."""
        return f"{self.key}: expected {_show(self.expected)}, found {_show(self.actual)}"


def dead_letter_queue_arguments(queue_type: QueueType) -> dict[str, Any]:
    """Return the declared arguments of the dead-letter queue."""
    return {QUEUE_TYPE_ARGUMENT: queue_type}


def work_queue_arguments(queue_type: QueueType, dead_letter_queue: str) -> dict[str, Any]:
    """Return the declared arguments of the work queue, which dead-letters to the DLQ."""
    return {
        QUEUE_TYPE_ARGUMENT: queue_type,
        DEAD_LETTER_EXCHANGE_ARGUMENT: DEFAULT_EXCHANGE,
        DEAD_LETTER_ROUTING_KEY_ARGUMENT: dead_letter_queue,
    }


def policy_name(namespace: str, resource_name: str) -> str:
    """Return the name of the operator's policy for one resource."""
    return f"{POLICY_PREFIX}.{namespace}.{resource_name}"


def policy_pattern(queue_name: str) -> str:
    """Return a regular expression that matches exactly `queue_name`.

    RabbitMQ matches policy patterns with PCRE-compatible regular
    expressions, where a backslash before any ASCII character other than a
    letter or digit stands for that character. Escaping every such
    character keeps names with dots, "?", "#", "/" or spaces literal.
    """
    escaped = "".join(
        "\\" + character
        if character.isascii() and not character.isalnum() and character != "_"
        else character
        for character in queue_name
    )
    return f"^{escaped}$"


def plan_policy(limits: LimitsSpec | None, broker_version: tuple[int, ...] = ()) -> PolicyPlan:
    """Return the policy definition for `limits` on a broker of `broker_version`.

    An empty version means unknown, and every key is included.
    """
    if limits is None:
        return PolicyPlan({})
    values = limits.model_dump()
    definition: dict[str, Any] = {}
    unsupported = []
    for field_name, key in POLICY_KEYS.items():
        value = values.get(field_name)
        if value is None:
            continue
        if key == CONSUMER_TIMEOUT_KEY and not supports_consumer_timeout(broker_version):
            unsupported.append(SPEC_FIELD_NAMES[field_name])
            continue
        definition[key] = value
    return PolicyPlan(definition, tuple(unsupported))


def supports_consumer_timeout(broker_version: tuple[int, ...]) -> bool:
    """Return whether a broker of this version accepts the consumer-timeout policy key."""
    return not broker_version or broker_version >= CONSUMER_TIMEOUT_MIN_VERSION


def compare_arguments(
    expected: Mapping[str, Any],
    actual: Mapping[str, Any],
    expected_type: QueueType,
    actual_type: str,
    durable: bool,
) -> list[ArgumentDifference]:
    """Return the declared properties of an existing queue that differ from the spec.

    The queue type is compared as the broker reports it, because a classic
    queue declared without `x-queue-type` is still a classic queue. Any
    other argument counts, including ones the spec does not set.
    """
    differences = []
    if actual_type != expected_type:
        differences.append(ArgumentDifference(QUEUE_TYPE_ARGUMENT, expected_type, actual_type))
    if not durable:
        differences.append(ArgumentDifference("durable", True, False))
    keys = sorted((set(expected) | set(actual)) - {QUEUE_TYPE_ARGUMENT})
    for key in keys:
        if expected.get(key, _UNSET) != actual.get(key, _UNSET):
            differences.append(ArgumentDifference(key, expected.get(key), actual.get(key)))
    return differences


def policy_matches(
    current_pattern: str,
    current_definition: Mapping[str, Any],
    current_priority: int,
    current_apply_to: str,
    pattern: str,
    definition: Mapping[str, Any],
) -> bool:
    """Return whether a stored policy already equals the expected one."""
    return (
        current_pattern == pattern
        and dict(current_definition) == dict(definition)
        and current_priority == POLICY_PRIORITY
        and current_apply_to == POLICY_APPLY_TO
    )


class _Unset:
    def __repr__(self) -> str:
        return "unset"


_UNSET = _Unset()


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value).lower() if isinstance(value, bool) else str(value)
