"""The queue half's conditions and status fields, built from a reconcile report.

Pure functions: the handlers pass in what a reconcile or a deletion found,
and write the result with kopf's patch.
"""

from __future__ import annotations

from typing import Any, Protocol

from .broker.management import QueueFigures
from .conditions import (
    BROKER_REACHABLE,
    DEAD_LETTER_QUEUE_DECLARED,
    DELETING,
    IN_SYNC,
    QUEUE_DECLARED,
    Condition,
)
from .errors import (
    AuthenticationFailed,
    BrokerError,
    BrokerUnreachable,
    SecretInvalid,
    SecretNotFound,
    SecretUnreadable,
    SpecInvalid,
)
from .queues import QueueState, QueueTarget, ReconcileReport

CONNECTED_REASON = "Connected"
IN_SYNC_REASON = "InSync"
DRIFT_REASON = "ArgumentsDrifted"
LIMIT_UNSUPPORTED_REASON = "LimitUnsupported"
DECLARED_REASON = "Declared"
REDECLARED_REASON = "Redeclared"

# Errors that mean the operator cannot talk to the broker at all.
CONNECTION_ERRORS = (
    BrokerUnreachable,
    AuthenticationFailed,
    SecretNotFound,
    SecretInvalid,
    SecretUnreadable,
)


def success_conditions(report: ReconcileReport, broker_version: str) -> list[Condition]:
    """Return the four queue conditions after a reconcile that finished."""
    target = report.target
    assert report.dead_letter is not None and report.queue is not None
    return [
        Condition.true(BROKER_REACHABLE, CONNECTED_REASON, "The broker answers."),
        declared_condition(DEAD_LETTER_QUEUE_DECLARED, report.dead_letter, target),
        declared_condition(QUEUE_DECLARED, report.queue, target),
        sync_condition(report, broker_version),
    ]


def declared_condition(type_: str, state: QueueState, target: QueueTarget) -> Condition:
    """Return DeadLetterQueueDeclared or QueueDeclared for one queue's outcome.

    A queue found and a queue declared read the same, so an operator
    restart that finds every queue leaves the condition unchanged.
    """
    if state.outcome == "redeclared":
        return Condition.true(
            type_,
            REDECLARED_REASON,
            f"Queue {state.name!r} on vhost {target.vhost!r} was missing on the broker "
            "and was declared again.",
        )
    return Condition.true(
        type_, DECLARED_REASON, f"Queue {state.name!r} exists on vhost {target.vhost!r}."
    )


def sync_condition(report: ReconcileReport, broker_version: str) -> Condition:
    """Return InSync: False with each differing argument, or with a limit the broker lacks."""
    problems = []
    reason = IN_SYNC_REASON
    differences = report.differences
    if differences:
        reason = DRIFT_REASON
        listed = "; ".join(f"{queue!r} {item.describe()}" for queue, item in differences)
        problems.append(
            f"Declared arguments differ from the spec, and the operator leaves the queues "
            f"as they are: {listed}."
        )
    unsupported = report.policy.unsupported if report.policy else ()
    if unsupported:
        reason = reason if differences else LIMIT_UNSUPPORTED_REASON
        problems.append(
            f"RabbitMQ {broker_version or '(unknown version)'} cannot apply "
            f"{', '.join('limits.' + name for name in unsupported)} per queue; the broker-wide "
            "setting applies."
        )
    if problems:
        return Condition.false(IN_SYNC, reason, " ".join(problems))
    policy = report.policy.name if report.policy else None
    limits = f"policy {policy!r} holds the limits" if policy else "no limits are set"
    return Condition.true(IN_SYNC, IN_SYNC_REASON, f"Arguments match the spec; {limits}.")


def error_conditions(report: ReconcileReport | None, error: BrokerError) -> list[Condition]:
    """Return the conditions that a failed reconcile changes; the others keep their values.

    Connection, credential and Secret errors, and any error before the
    broker's first reply, set BrokerReachable. Later errors, such as a
    declare refused for lack of the configure permission (AccessRefused),
    set the condition of the step that failed.
    """
    message = str(error)
    if isinstance(error, CONNECTION_ERRORS) or report is None or not report.broker_reached:
        return [Condition.false(BROKER_REACHABLE, error.reason, message)]
    updates = [Condition.true(BROKER_REACHABLE, CONNECTED_REASON, "The broker answers.")]
    if report.step == "dead-letter queue":
        updates.append(Condition.false(DEAD_LETTER_QUEUE_DECLARED, error.reason, message))
    elif report.step == "queue":
        if report.dead_letter is not None:
            updates.append(
                declared_condition(DEAD_LETTER_QUEUE_DECLARED, report.dead_letter, report.target)
            )
        updates.append(Condition.false(QUEUE_DECLARED, error.reason, message))
    else:
        updates.append(Condition.false(IN_SYNC, error.reason, message))
    return updates


def spec_invalid_condition(error: SpecInvalid) -> Condition:
    """Return InSync False for a spec the operator cannot use."""
    return Condition.false(IN_SYNC, error.reason, str(error))


def deleting_condition(reason: str, message: str) -> Condition:
    """Return Deleting: True while a deletion waits, with why."""
    return Condition.true(DELETING, reason, message)


def queue_status(
    target: QueueTarget,
    policy_name: str | None,
    figures: QueueFigures | None,
    dead_letter_figures: QueueFigures | None,
) -> dict[str, Any]:
    """Return the queue half's status fields; a count the broker did not report is left out."""
    status: dict[str, Any] = {
        "queue": {
            "name": target.queue,
            "vhost": target.vhost,
            "deadLetterQueue": target.dead_letter_queue,
            "policy": policy_name or "",
        }
    }
    status.update(figures_status(figures, dead_letter_figures))
    return status


class QueueCounts(Protocol):
    """The counts of one queue, each None when the broker did not report it."""

    @property
    def ready(self) -> int | None: ...

    @property
    def unacknowledged(self) -> int | None: ...

    @property
    def consumers(self) -> int | None: ...


def figures_status(
    figures: QueueCounts | None, dead_letter_figures: QueueCounts | None
) -> dict[str, Any]:
    """Return the `messages` and `consumers` status fields; unreported counts are left out.

    Both the resync timer and the scaler write these fields, so they build them here alike.
    """
    status: dict[str, Any] = {}
    messages: dict[str, int] = {}
    if figures is not None:
        if figures.ready is not None:
            messages["ready"] = figures.ready
        if figures.unacknowledged is not None:
            messages["unacknowledged"] = figures.unacknowledged
        if figures.consumers is not None:
            status["consumers"] = figures.consumers
    if dead_letter_figures is not None and dead_letter_figures.ready is not None:
        messages["deadLetter"] = dead_letter_figures.ready + (
            dead_letter_figures.unacknowledged or 0
        )
    if messages:
        status["messages"] = messages
    return status
