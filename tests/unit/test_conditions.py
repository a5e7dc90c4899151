"""Condition merging, the Ready summary, and the queue half's conditions from a report."""

from __future__ import annotations

from openchecker_operator.arguments import ArgumentDifference
from openchecker_operator.broker.management import QueueFigures
from openchecker_operator.conditions import (
    BROKER_REACHABLE,
    DEAD_LETTER_QUEUE_DECLARED,
    DELETING,
    FLEET_READY,
    IN_SYNC,
    QUEUE_DECLARED,
    READY,
    Condition,
    find_condition,
    merge_conditions,
)
from openchecker_operator.errors import (
    AuthenticationFailed,
    BrokerUnreachable,
    DeclareFailed,
    PolicyFailed,
)
from openchecker_operator.queues import PolicyState, QueueState, QueueTarget, ReconcileReport
from openchecker_operator.status import error_conditions, queue_status, success_conditions

EARLIER = "2026-01-01T00:00:00Z"
LATER = "2026-01-01T00:05:00Z"
TARGET = QueueTarget("team", "opencheck", "/", "opencheck", "opencheck.dlq", "classic", None)


def all_true() -> list[Condition]:
    return [
        Condition.true(type_, "Fine", "fine")
        for type_ in (BROKER_REACHABLE, DEAD_LETTER_QUEUE_DECLARED, QUEUE_DECLARED, IN_SYNC)
    ]


def finished_report(**changes: object) -> ReconcileReport:
    report = ReconcileReport(TARGET, step="policy", broker_reached=True)
    report.dead_letter = QueueState("opencheck.dlq", "exists")
    report.queue = QueueState("opencheck", "exists")
    report.policy = PolicyState(None, False)
    for key, value in changes.items():
        setattr(report, key, value)
    return report


def test_ready_true_when_all_true() -> None:
    merged = merge_conditions([], all_true(), generation=2, now=EARLIER)

    ready = find_condition(merged, READY)
    assert ready is not None
    assert ready["status"] == "True"
    assert ready["reason"] == "QueueReady"
    assert ready["observedGeneration"] == 2
    assert [item["type"] for item in merged][0] == READY


def test_ready_unknown_until_all_known() -> None:
    merged = merge_conditions([], all_true()[:2], generation=1, now=EARLIER)

    ready = find_condition(merged, READY)
    assert ready is not None
    assert ready["status"] == "Unknown"


def test_ready_takes_first_false_reason() -> None:
    updates = [*all_true(), Condition.false(IN_SYNC, "ArgumentsDrifted", "differs")]

    merged = merge_conditions([], updates, generation=1, now=EARLIER)

    ready = find_condition(merged, READY)
    assert ready is not None
    assert ready["status"] == "False"
    assert ready["reason"] == "ArgumentsDrifted"
    assert "differs" in ready["message"]


def test_ready_false_beats_unknown() -> None:
    updates = [Condition.false(IN_SYNC, "SpecInvalid", "bad spec")]

    merged = merge_conditions([], updates, generation=1, now=EARLIER)

    ready = find_condition(merged, READY)
    assert ready is not None
    assert ready["status"] == "False"
    assert ready["reason"] == "SpecInvalid"
    assert "bad spec" in ready["message"]


def test_ready_false_on_fleet_failure() -> None:
    updates = [*all_true(), Condition.false(FLEET_READY, "SpecInvalid", "no config")]

    merged = merge_conditions([], updates, generation=1, now=EARLIER)

    ready = find_condition(merged, READY)
    assert ready is not None
    assert ready["status"] == "False"
    assert ready["reason"] == "SpecInvalid"
    assert ready["message"].startswith("FleetReady:")


def test_transition_time_kept_while_status_same() -> None:
    first = merge_conditions([], all_true(), generation=1, now=EARLIER)
    changed_message = [Condition.true(IN_SYNC, "InSync", "another message")]

    second = merge_conditions(first, changed_message, generation=2, now=LATER)

    in_sync = find_condition(second, IN_SYNC)
    assert in_sync is not None
    assert in_sync["lastTransitionTime"] == EARLIER
    assert in_sync["message"] == "another message"
    assert in_sync["observedGeneration"] == 2


def test_transition_time_moves_on_status_change() -> None:
    first = merge_conditions([], all_true(), generation=1, now=EARLIER)

    second = merge_conditions(
        first, [Condition.false(BROKER_REACHABLE, "BrokerUnreachable", "down")], 1, now=LATER
    )

    reachable = find_condition(second, BROKER_REACHABLE)
    ready = find_condition(second, READY)
    queue = find_condition(second, QUEUE_DECLARED)
    assert reachable is not None
    assert ready is not None
    assert queue is not None
    assert reachable["lastTransitionTime"] == LATER
    assert ready["lastTransitionTime"] == LATER
    assert queue["lastTransitionTime"] == EARLIER


def test_other_half_conditions_are_kept() -> None:
    fleet = {"type": FLEET_READY, "status": "False", "reason": "Rolling", "message": "m"}

    merged = merge_conditions([fleet], all_true(), generation=1, now=EARLIER)

    assert find_condition(merged, FLEET_READY) == fleet
    ready = find_condition(merged, READY)
    assert ready is not None
    assert ready["reason"] == "Rolling"


def test_deleting_makes_ready_false_and_can_be_removed() -> None:
    blocked = [*all_true(), Condition.true(DELETING, "QueueNotEmpty", "3 messages")]
    merged = merge_conditions([], blocked, generation=1, now=EARLIER)

    ready = find_condition(merged, READY)
    assert ready is not None
    assert ready["reason"] == "QueueNotEmpty"

    cleared = merge_conditions(merged, [], generation=1, now=LATER, remove=[DELETING])
    assert find_condition(cleared, DELETING) is None


def test_success_conditions_all_true() -> None:
    conditions = success_conditions(finished_report(), "3.10.8")

    assert all(condition.status == "True" for condition in conditions)
    assert [condition.type for condition in conditions] == [
        BROKER_REACHABLE,
        DEAD_LETTER_QUEUE_DECLARED,
        QUEUE_DECLARED,
        IN_SYNC,
    ]


def test_found_and_declared_read_the_same() -> None:
    found = success_conditions(finished_report(), "3.10.8")
    declared = success_conditions(
        finished_report(
            dead_letter=QueueState("opencheck.dlq", "declared"),
            queue=QueueState("opencheck", "declared"),
        ),
        "3.10.8",
    )

    assert found == declared


def test_redeclared_has_its_reason() -> None:
    report = finished_report(queue=QueueState("opencheck", "redeclared"))

    queue = success_conditions(report, "3.10.8")[2]

    assert queue.reason == "Redeclared"


def test_drift_lists_keys_and_values() -> None:
    difference = ArgumentDifference("x-dead-letter-routing-key", "opencheck.dlq", None)
    report = finished_report(queue=QueueState("opencheck", "exists", (difference,)))

    in_sync = success_conditions(report, "3.10.8")[3]

    assert in_sync.status == "False"
    assert in_sync.reason == "ArgumentsDrifted"
    assert 'x-dead-letter-routing-key: expected "opencheck.dlq", found unset' in in_sync.message


def test_unsupported_limit_names_version() -> None:
    report = finished_report(policy=PolicyState("p", True, ("consumerTimeoutMilliseconds",)))

    in_sync = success_conditions(report, "3.10.8")[3]

    assert in_sync.status == "False"
    assert in_sync.reason == "LimitUnsupported"
    assert "RabbitMQ 3.10.8" in in_sync.message
    assert "limits.consumerTimeoutMilliseconds" in in_sync.message


def test_connection_error_sets_broker_reachable() -> None:
    error = BrokerUnreachable("AMQP connection to rabbitmq:5672 failed")

    conditions = error_conditions(ReconcileReport(TARGET), error)

    assert conditions == [Condition.false(BROKER_REACHABLE, "BrokerUnreachable", str(error))]


def test_authentication_error_after_reads() -> None:
    report = ReconcileReport(TARGET, step="queue", broker_reached=True)

    conditions = error_conditions(report, AuthenticationFailed("login rejected"))

    assert conditions == [
        Condition.false(BROKER_REACHABLE, "AuthenticationFailed", "login rejected")
    ]


def test_declare_error_sets_step_condition() -> None:
    report = ReconcileReport(TARGET, step="queue", broker_reached=True)
    report.dead_letter = QueueState("opencheck.dlq", "exists")

    conditions = error_conditions(report, DeclareFailed("channel closed"))

    by_type = {condition.type: condition for condition in conditions}
    assert by_type[BROKER_REACHABLE].status == "True"
    assert by_type[DEAD_LETTER_QUEUE_DECLARED].status == "True"
    assert by_type[QUEUE_DECLARED].status == "False"
    assert by_type[QUEUE_DECLARED].reason == "DeclareFailed"


def test_policy_error_sets_in_sync() -> None:
    report = ReconcileReport(TARGET, step="policy", broker_reached=True)

    conditions = error_conditions(report, PolicyFailed("rejected"))

    assert conditions[-1] == Condition.false(IN_SYNC, "PolicyFailed", "rejected")


def test_queue_status_leaves_out_unknown_counts() -> None:
    figures = QueueFigures("/", "opencheck", ready=7, unacknowledged=None, consumers=None)
    dead_letter = QueueFigures(
        "/", "opencheck.dlq", ready=None, unacknowledged=None, consumers=None
    )

    status = queue_status(TARGET, None, figures, dead_letter)

    assert status["messages"] == {"ready": 7}
    assert "consumers" not in status
    assert status["queue"] == {
        "name": "opencheck",
        "vhost": "/",
        "deadLetterQueue": "opencheck.dlq",
        "policy": "",
    }


def test_queue_status_counts_dead_letters() -> None:
    figures = QueueFigures("/", "opencheck", ready=0, unacknowledged=1, consumers=2)
    dead_letter = QueueFigures("/", "opencheck.dlq", ready=3, unacknowledged=1, consumers=0)

    status = queue_status(TARGET, "p", figures, dead_letter)

    assert status["messages"] == {"ready": 0, "unacknowledged": 1, "deadLetter": 4}
    assert status["consumers"] == 2
