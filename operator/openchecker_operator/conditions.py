"""Status conditions: build them, merge them into the current list, derive Ready.

Both halves of the operator write conditions into one list, each its own
types. `merge_conditions` keeps the types it is not given, keeps
`lastTransitionTime` while a condition's status stays the same, and
recomputes `Ready` from the others.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

ConditionStatus = Literal["True", "False", "Unknown"]

READY = "Ready"
BROKER_REACHABLE = "BrokerReachable"
DEAD_LETTER_QUEUE_DECLARED = "DeadLetterQueueDeclared"
QUEUE_DECLARED = "QueueDeclared"
IN_SYNC = "InSync"
FLEET_READY = "FleetReady"
DELETING = "Deleting"

# The conditions Ready summarises, in the order they are checked; the
# first one that is False gives Ready its reason. FleetReady counts
# only once the fleet half has written it.
QUEUE_CONDITIONS = (BROKER_REACHABLE, DEAD_LETTER_QUEUE_DECLARED, QUEUE_DECLARED, IN_SYNC)
ORDER = (READY, *QUEUE_CONDITIONS, FLEET_READY, DELETING)

READY_REASON = "QueueReady"
READY_MESSAGE = "Both queues are declared and match the spec."
PENDING_REASON = "Reconciling"


@dataclass(frozen=True)
class Condition:
    """One condition as the operator decides it, before timestamps are added."""

    type: str
    status: ConditionStatus
    reason: str
    message: str

    @classmethod
    def true(cls, type_: str, reason: str, message: str) -> Condition:
        """Return a condition with status "True"."""
        return cls(type_, "True", reason, message)

    @classmethod
    def false(cls, type_: str, reason: str, message: str) -> Condition:
        """Return a condition with status "False"."""
        return cls(type_, "False", reason, message)


def now_timestamp() -> str:
    """Return the current UTC time in the RFC 3339 form Kubernetes uses."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_conditions(
    current: Sequence[Mapping[str, Any]] | None,
    updates: Iterable[Condition],
    generation: int | None,
    now: str | None = None,
    remove: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Return `current` with `updates` applied, `remove` types dropped and Ready recomputed.

    A condition's `lastTransitionTime` changes only when its status changes.
    """
    now = now or now_timestamp()
    by_type = {str(item.get("type")): dict(item) for item in current or () if item.get("type")}
    for type_ in remove:
        by_type.pop(type_, None)
    for condition in updates:
        by_type[condition.type] = _apply(by_type.get(condition.type), condition, generation, now)
    ready = ready_condition(by_type)
    by_type[READY] = _apply(by_type.get(READY), ready, generation, now)
    return sorted(by_type.values(), key=_order)


def ready_condition(conditions: Mapping[str, Mapping[str, Any]]) -> Condition:
    """Return Ready: True when every summarised condition is True, else why not.

    While a deletion waits (Deleting is True), Ready is False with its reason.
    """
    deleting = conditions.get(DELETING)
    if deleting is not None and deleting.get("status") == "True":
        return Condition.false(
            READY, str(deleting.get("reason") or DELETING), str(deleting.get("message", ""))
        )
    required = list(QUEUE_CONDITIONS)
    if FLEET_READY in conditions:
        required.append(FLEET_READY)
    # A known failure outranks a condition not written yet: an invalid spec
    # leaves the declare conditions unknown, and Ready must name the spec.
    for type_ in required:
        condition = conditions.get(type_)
        if condition is not None and condition.get("status") == "False":
            return Condition.false(
                READY,
                str(condition.get("reason") or PENDING_REASON),
                f"{type_}: {condition.get('message', '')}".strip(),
            )
    for type_ in required:
        condition = conditions.get(type_)
        if condition is None or condition.get("status") != "True":
            return Condition(READY, "Unknown", PENDING_REASON, f"{type_} is not known yet.")
    return Condition.true(READY, READY_REASON, READY_MESSAGE)


def find_condition(
    conditions: Sequence[Mapping[str, Any]] | None, type_: str
) -> Mapping[str, Any] | None:
    """Return the condition of `type_` in a status list, or None."""
    for condition in conditions or ():
        if condition.get("type") == type_:
            return condition
    return None


def is_true(conditions: Sequence[Mapping[str, Any]] | None, type_: str) -> bool:
    """Return whether the condition of `type_` exists with status "True"."""
    condition = find_condition(conditions, type_)
    return condition is not None and condition.get("status") == "True"


def _apply(
    existing: Mapping[str, Any] | None, condition: Condition, generation: int | None, now: str
) -> dict[str, Any]:
    changed = existing is None or existing.get("status") != condition.status
    transition = now if changed or existing is None else existing.get("lastTransitionTime", now)
    result: dict[str, Any] = {
        "type": condition.type,
        "status": condition.status,
        "reason": condition.reason,
        "message": condition.message,
        "lastTransitionTime": transition,
    }
    if generation is not None:
        result["observedGeneration"] = generation
    return result


def _order(condition: Mapping[str, Any]) -> tuple[int, str]:
    type_ = str(condition.get("type"))
    return (ORDER.index(type_) if type_ in ORDER else len(ORDER), type_)
