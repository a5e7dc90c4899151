"""Kopf handlers of the queue half: reconcile, resync timer, deletion, and the DLQ index.

The handlers are sync functions: kopf runs them in its thread pool, where
the blocking pika and requests calls are allowed. They validate the spec,
resolve the broker, call `queues.py`, and write conditions and figures
with kopf's `patch`. They return nothing, because kopf would store a
returned value in status.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kopf

from .. import queues
from ..broker.registry import BrokerClients
from ..conditions import (
    DEAD_LETTER_QUEUE_DECLARED,
    IN_SYNC,
    QUEUE_DECLARED,
    Condition,
    find_condition,
    is_true,
    merge_conditions,
    now_timestamp,
)
from ..connection import read_broker_settings
from ..errors import BrokerError, SpecInvalid, backoff_delay
from ..models import parse_spec
from ..queues import FORCE_DELETE_ANNOTATION, QueueState, QueueTarget, ReconcileReport
from ..settings import OperatorSettings
from ..status import (
    deleting_condition,
    error_conditions,
    queue_status,
    spec_invalid_condition,
    success_conditions,
)
from .lifecycle import api_client, broker_registry, resource_locks

logger = logging.getLogger(__name__)

GROUP = "openchecker.io"
VERSION = "v1alpha1"
PLURAL = "opencheckqueues"

# Read once at import, because kopf fixes a timer's interval when the
# handler is registered. `__main__` validates the same environment first.
SETTINGS = OperatorSettings()
# Seconds between retries of a blocked deletion: short, so that the force
# annotation takes effect soon after it is set.
DELETION_RETRY_SECONDS = 10.0


@dataclass(frozen=True)
class DeadLetterUser:
    """One OpenCheckQueue in the DLQ index, with what is needed to find its broker."""

    namespace: str
    name: str
    uid: str
    spec: Mapping[str, Any]


@kopf.index(GROUP, VERSION, PLURAL)
def dead_letter_queue_index(
    name: str, namespace: str | None, uid: str, spec: kopf.Spec, **_: Any
) -> dict[str, DeadLetterUser]:
    """Index every OpenCheckQueue by the name of its dead-letter queue."""
    dead_letter = spec.get("deadLetterQueue", {}).get("name")
    if not dead_letter:
        queue = spec.get("queue", {}).get("name") or name
        dead_letter = f"{queue}.dlq"
    return {str(dead_letter): DeadLetterUser(namespace or "", name, uid, dict(spec))}


@kopf.on.resume(GROUP, VERSION, PLURAL)
def resume_queue(**kwargs: Any) -> None:
    """Compare the queues with the spec after an operator start; declare only what is missing."""
    _reconcile(reconcile_kind="resume", **kwargs)


@kopf.on.create(GROUP, VERSION, PLURAL)
def create_queue(**kwargs: Any) -> None:
    """Declare the queues of a new resource."""
    _reconcile(reconcile_kind="create", **kwargs)


@kopf.on.update(GROUP, VERSION, PLURAL)
def update_queue(**kwargs: Any) -> None:
    """Apply a changed spec: new limits go into the policy, live."""
    _reconcile(reconcile_kind="update", **kwargs)


@kopf.timer(
    GROUP,
    VERSION,
    PLURAL,
    interval=SETTINGS.resync_interval_seconds,
    initial_delay=SETTINGS.resync_initial_delay_seconds,
)
def resync_queue(meta: kopf.Meta, **kwargs: Any) -> None:
    """Re-check the queues: declare a queue deleted behind the operator's back, refresh counts.

    Failures are written to the conditions and not raised, so the next
    tick, one interval later, is the retry.
    """
    if meta.get("deletionTimestamp"):
        return
    _reconcile(reconcile_kind="resync", meta=meta, **kwargs)


def _reconcile(
    reconcile_kind: str,
    body: kopf.Body,
    spec: kopf.Spec,
    meta: kopf.Meta,
    name: str,
    namespace: str,
    uid: str,
    status: kopf.Status,
    patch: kopf.Patch,
    memo: kopf.Memo,
    retry: int = 0,
    **_: Any,
) -> None:
    current = list(status.get("conditions") or [])
    generation = meta.get("generation")
    report: ReconcileReport | None = None
    try:
        model = parse_spec(spec)
        settings = read_broker_settings(api_client(memo), namespace, model)
        target = queues.resolve_target(namespace, name, model, settings)
        report = ReconcileReport(target)
        clients = broker_registry(memo).get(settings)
        with resource_locks(memo).hold(uid):
            queues.reconcile_queues(
                clients,
                target,
                report,
                dead_letter_declared_before=is_true(current, DEAD_LETTER_QUEUE_DECLARED),
                queue_declared_before=is_true(current, QUEUE_DECLARED),
            )
            version = clients.overview().rabbitmq_version
    except SpecInvalid as error:
        condition = spec_invalid_condition(error)
        write_conditions(patch, current, [condition], generation)
        if _changed(current, condition):
            kopf.warn(body, reason=error.reason, message=str(error))
        if reconcile_kind == "resync":
            return
        raise
    except BrokerError as error:
        conditions = error_conditions(report, error)
        write_conditions(patch, current, conditions, generation)
        _report_failure(body, reconcile_kind, current, conditions, error, name, namespace)
        if reconcile_kind == "resync":
            return
        error.delay = backoff_delay(error, retry)
        raise

    _write_success(body, patch, current, report, version, generation)


def _write_success(
    body: kopf.Body,
    patch: kopf.Patch,
    current: list[Mapping[str, Any]],
    report: ReconcileReport,
    broker_version: str,
    generation: int | None,
) -> None:
    """Post the Events of a finished reconcile and write its conditions and figures."""
    _post_declare_events(body, report)
    conditions = success_conditions(report, broker_version)
    _post_change_events(body, current, conditions, report)
    write_conditions(patch, current, conditions, generation)
    policy = report.policy.name if report.policy else None
    queue_figures = report.queue.figures if report.queue else None
    dead_letter_figures = report.dead_letter.figures if report.dead_letter else None
    patch.status.update(queue_status(report.target, policy, queue_figures, dead_letter_figures))
    patch.status["lastResyncTime"] = now_timestamp()


@kopf.on.delete(GROUP, VERSION, PLURAL)
def delete_queue(
    body: kopf.Body,
    spec: kopf.Spec,
    meta: kopf.Meta,
    name: str,
    namespace: str | None,
    uid: str,
    status: kopf.Status,
    patch: kopf.Patch,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    """Apply the deletion policy; keep the finalizer while a queue to delete is not empty."""
    index: kopf.Index[str, DeadLetterUser] = kwargs["dead_letter_queue_index"]
    namespace = namespace or ""
    current = list(status.get("conditions") or [])
    generation = meta.get("generation")
    try:
        model = parse_spec(spec)
    except SpecInvalid as error:
        # Without a valid spec the operator cannot know which queues are its
        # own, so it removes none of them and lets the resource go.
        kopf.warn(body, reason=error.reason, message=f"Queues left on the broker: {error}")
        return
    if model.deletion_policy == "Retain":
        logger.info("%s/%s deleted; its queues are retained.", namespace, name)
        return

    force = meta.get("annotations", {}).get(FORCE_DELETE_ANNOTATION) == "true"
    try:
        settings = read_broker_settings(api_client(memo), namespace, model)
        target = queues.resolve_target(namespace, name, model, settings)
        clients = broker_registry(memo).get(settings)
        users = _other_dead_letter_users(memo, target, clients, uid, index)
        with resource_locks(memo).hold(uid):
            result = queues.delete_queues(clients, target, force, users)
    except BrokerError as error:
        condition = deleting_condition(error.reason, str(error))
        write_conditions(patch, current, [condition], generation)
        if _changed(current, condition):
            kopf.warn(body, reason=error.reason, message=str(error))
        error.delay = DELETION_RETRY_SECONDS
        raise
    _post_deletion_events(body, target, result, force)


def _other_dead_letter_users(
    memo: kopf.Memo,
    target: QueueTarget,
    clients: BrokerClients,
    uid: str,
    index: kopf.Index[str, DeadLetterUser],
) -> list[str]:
    """Return "namespace/name" of the other resources whose DLQ is this one's.

    A resource whose Secret cannot be read counts as a user, so that a
    doubt keeps the DLQ. NOTE: the index holds only the namespaces this
    operator serves; a resource elsewhere that shares the DLQ is not seen.
    """
    users = []
    for user in index.get(target.dead_letter_queue, []):
        if user.uid == uid:
            continue
        try:
            model = parse_spec(user.spec)
            settings = read_broker_settings(api_client(memo), user.namespace, model)
        except (BrokerError, SpecInvalid) as error:
            # The other resource may well use this broker; keep the DLQ.
            logger.info("Counting %s/%s as a DLQ user: %s", user.namespace, user.name, error)
            users.append(f"{user.namespace}/{user.name}")
            continue
        other = queues.resolve_target(user.namespace, user.name, model, settings)
        if settings.identity == clients.identity and other.vhost == target.vhost:
            users.append(f"{user.namespace}/{user.name}")
    return sorted(users)


def write_conditions(
    patch: kopf.Patch,
    current: list[Mapping[str, Any]],
    updates: list[Condition],
    generation: int | None,
) -> None:
    """Merge `updates` into the conditions of the status patch, with Ready recomputed."""
    # Another handler of the same cycle may have written conditions into
    # the patch already; build on those, so neither loses the other's.
    # NOTE: the timer and a handler send separate merge patches of the whole
    # list, so one may overwrite a condition the other just wrote. The next
    # resync writes it again.
    base = patch.status.get("conditions") or current
    patch.status["conditions"] = merge_conditions(base, updates, generation)
    if generation is not None:
        patch.status["observedGeneration"] = generation


def _changed(current: list[Mapping[str, Any]], condition: Condition) -> bool:
    previous = find_condition(current, condition.type)
    return previous is None or (
        previous.get("status"),
        previous.get("reason"),
        previous.get("message"),
    ) != (condition.status, condition.reason, condition.message)


def _report_failure(
    body: kopf.Body,
    reconcile_kind: str,
    current: list[Mapping[str, Any]],
    conditions: list[Condition],
    error: BrokerError,
    name: str,
    namespace: str,
) -> None:
    """Log a failure and post a Warning Event, on the resync timer only when it is new."""
    new = any(
        _changed(current, condition) for condition in conditions if condition.status != "True"
    )
    if reconcile_kind == "resync" and not new:
        logger.debug("%s/%s: resync failed again: %s", namespace, name, error)
        return
    logger.warning("%s/%s: %s failed: %s", namespace, name, reconcile_kind, error)
    kopf.warn(body, reason=error.reason, message=str(error))


def _post_declare_events(body: kopf.Body, report: ReconcileReport) -> None:
    target = report.target
    for state in (report.dead_letter, report.queue):
        if state is None or state.outcome == "exists":
            continue
        _post_declare_event(body, target, state)
    policy = report.policy
    if policy is not None and policy.changed:
        if policy.name:
            kopf.info(
                body,
                reason="PolicyApplied",
                message=f"Applied policy {policy.name!r} with the limits to queue "
                f"{target.queue!r} on vhost {target.vhost!r}.",
            )
        else:
            kopf.info(
                body,
                reason="PolicyDeleted",
                message=f"Deleted policy {target.policy_name!r}: no limits are set.",
            )


def _post_declare_event(body: kopf.Body, target: QueueTarget, state: QueueState) -> None:
    where = f"queue {state.name!r} on vhost {target.vhost!r}"
    if state.outcome == "redeclared":
        message = f"Declared {where} again: it was missing on the broker."
        kopf.warn(body, reason="Redeclared", message=message)
    else:
        kopf.info(body, reason="Declared", message=f"Declared {where}.")
    logger.info("%s/%s: %s", target.namespace, target.resource_name, f"declared {where}")


def _post_change_events(
    body: kopf.Body,
    current: list[Mapping[str, Any]],
    conditions: list[Condition],
    report: ReconcileReport,
) -> None:
    """Post a Warning Event when InSync turns False or its message changes."""
    for condition in conditions:
        if (
            condition.type == IN_SYNC
            and condition.status != "True"
            and _changed(current, condition)
        ):
            kopf.warn(body, reason=condition.reason, message=condition.message)
            logger.warning(
                "%s/%s: %s",
                report.target.namespace,
                report.target.resource_name,
                condition.message,
            )


def _post_deletion_events(
    body: kopf.Body, target: QueueTarget, result: queues.DeletionResult, force: bool
) -> None:
    forced = " (forced)" if force else ""
    queue_message = "was deleted" if result.queue_deleted else "was already gone"
    kopf.info(
        body,
        reason="Deleted",
        message=f"Queue {target.queue!r} on vhost {target.vhost!r} {queue_message}{forced}.",
    )
    if result.dead_letter == "shared":
        kopf.info(
            body,
            reason="DeadLetterQueueShared",
            message=f"Kept DLQ {target.dead_letter_queue!r}: "
            f"{', '.join(result.dead_letter_users)} also use it.",
        )
    elif result.dead_letter == "deleted":
        kopf.info(
            body,
            reason="Deleted",
            message=f"DLQ {target.dead_letter_queue!r} on vhost {target.vhost!r} was deleted"
            f"{forced}.",
        )
    logger.info(
        "%s/%s: deleted %s; DLQ %s.",
        target.namespace,
        target.resource_name,
        target.describe(),
        result.dead_letter,
    )
