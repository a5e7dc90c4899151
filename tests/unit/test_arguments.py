"""Spec to queue arguments, policy definition and drift comparison: pure functions."""

from __future__ import annotations

import re

import pytest
from openchecker_operator.arguments import (
    ArgumentDifference,
    compare_arguments,
    dead_letter_queue_arguments,
    plan_policy,
    policy_matches,
    policy_name,
    policy_pattern,
    supports_consumer_timeout,
    work_queue_arguments,
)
from openchecker_operator.models import LimitsSpec


def test_dead_letter_arguments_carry_type() -> None:
    assert dead_letter_queue_arguments("quorum") == {"x-queue-type": "quorum"}


def test_work_queue_arguments_dead_letter_to_dlq() -> None:
    arguments = work_queue_arguments("classic", "dead_letters")

    assert arguments == {
        "x-queue-type": "classic",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "dead_letters",
    }


def test_policy_name_joins_namespace_and_name() -> None:
    assert policy_name("team-a", "opencheck") == "openchecker.team-a.opencheck"


@pytest.mark.parametrize(
    "queue_name",
    ["opencheck", "a.b", "checks/ one?two#three", "A+B*(c)[d]{e}|f^g$h\\i", "päckchen.ü"],
)
def test_policy_pattern_matches_only_the_name(queue_name: str) -> None:
    pattern = re.compile(policy_pattern(queue_name))

    assert pattern.fullmatch(queue_name)
    assert not pattern.fullmatch(queue_name + "x")
    assert not pattern.fullmatch("x" + queue_name)


def test_policy_pattern_escapes_dot() -> None:
    pattern = re.compile(policy_pattern("a.b"))

    assert not pattern.fullmatch("aXb")


def test_plan_policy_without_limits_is_empty() -> None:
    assert plan_policy(None).empty
    assert plan_policy(LimitsSpec()).empty


def test_plan_policy_maps_every_limit() -> None:
    limits = LimitsSpec.model_validate(
        {
            "messageTTLMilliseconds": 3_600_000,
            "maxLength": 10_000,
            "maxLengthBytes": 0,
            "overflow": "reject-publish",
            "deliveryLimit": 5,
            "consumerTimeoutMilliseconds": 1_800_000,
        }
    )

    plan = plan_policy(limits, (3, 13, 7))

    assert plan.definition == {
        "message-ttl": 3_600_000,
        "max-length": 10_000,
        "max-length-bytes": 0,
        "overflow": "reject-publish",
        "delivery-limit": 5,
        "consumer-timeout": 1_800_000,
    }
    assert plan.unsupported == ()


def test_plan_policy_keeps_zero_values() -> None:
    plan = plan_policy(LimitsSpec.model_validate({"messageTTLMilliseconds": 0}))

    assert plan.definition == {"message-ttl": 0}


def test_plan_policy_drops_consumer_timeout_on_310() -> None:
    limits = LimitsSpec.model_validate(
        {"messageTTLMilliseconds": 1000, "consumerTimeoutMilliseconds": 60_000}
    )

    plan = plan_policy(limits, (3, 10, 8))

    assert plan.definition == {"message-ttl": 1000}
    assert plan.unsupported == ("consumerTimeoutMilliseconds",)


def test_consumer_timeout_support_by_version() -> None:
    assert not supports_consumer_timeout((3, 10, 8))
    assert not supports_consumer_timeout((3, 11, 14))
    assert supports_consumer_timeout((3, 11, 15))
    assert supports_consumer_timeout((4, 0))
    assert supports_consumer_timeout(())


def test_compare_arguments_equal_has_no_difference() -> None:
    expected = work_queue_arguments("classic", "q.dlq")

    assert compare_arguments(expected, dict(expected), "classic", "classic", True) == []


def test_compare_arguments_classic_without_type_argument() -> None:
    expected = dead_letter_queue_arguments("classic")

    assert compare_arguments(expected, {}, "classic", "classic", True) == []


def test_compare_arguments_lists_each_difference() -> None:
    expected = work_queue_arguments("quorum", "q.dlq")
    actual = {"x-queue-type": "classic", "x-dead-letter-routing-key": "other", "x-max-length": 5}

    differences = compare_arguments(expected, actual, "quorum", "classic", False)

    assert ArgumentDifference("x-queue-type", "quorum", "classic") in differences
    assert ArgumentDifference("durable", True, False) in differences
    assert ArgumentDifference("x-dead-letter-exchange", "", None) in differences
    assert ArgumentDifference("x-dead-letter-routing-key", "q.dlq", "other") in differences
    assert ArgumentDifference("x-max-length", None, 5) in differences
    assert len(differences) == 5


def test_difference_describe_shows_both_values() -> None:
    text = ArgumentDifference("x-dead-letter-routing-key", "q.dlq", None).describe()

    assert text == 'x-dead-letter-routing-key: expected "q.dlq", found unset'


def test_policy_matches_needs_every_field() -> None:
    definition = {"message-ttl": 1000}

    assert policy_matches("^q$", definition, 100, "queues", "^q$", definition)
    assert not policy_matches("^q$", {"message-ttl": 5}, 100, "queues", "^q$", definition)
    assert not policy_matches("^q$", definition, 0, "queues", "^q$", definition)
    assert not policy_matches("^q$", definition, 100, "all", "^q$", definition)
    assert not policy_matches("^r$", definition, 100, "queues", "^q$", definition)
