"""The queue half's decisions: declare, detect drift, apply the policy, delete.

Every function blocks on broker calls; handlers call them from kopf's
thread pool. The operator never deletes or redeclares a queue to repair
drift: a queue that exists with other arguments is reported, not changed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Literal

from .arguments import (
    POLICY_APPLY_TO,
    POLICY_PRIORITY,
    ArgumentDifference,
    compare_arguments,
    dead_letter_queue_arguments,
    plan_policy,
    policy_matches,
    policy_name,
    policy_pattern,
    work_queue_arguments,
)
from .broker.management import QueueFigures
from .broker.registry import BrokerClients
from .errors import BrokerError, PreconditionFailed, QueueNotEmpty
from .models import (
    DEFAULT_VHOST,
    BrokerSettings,
    LimitsSpec,
    OpenCheckQueueSpec,
    QueueType,
)

logger = logging.getLogger(__name__)

FORCE_DELETE_ANNOTATION = "openchecker.io/force-delete"

DeclareOutcome = Literal["exists", "declared", "redeclared"]
Step = Literal["connect", "dead-letter queue", "queue", "policy"]
DeadLetterOutcome = Literal["deleted", "absent", "shared"]


@dataclass(frozen=True)
class QueueTarget:
    """The queues of one resource, with every default resolved."""

    namespace: str
    resource_name: str
    vhost: str
    queue: str
    dead_letter_queue: str
    queue_type: QueueType
    limits: LimitsSpec | None

    @property
    def policy_name(self) -> str:
        """Return the name of the operator's policy for this resource."""
        return policy_name(self.namespace, self.resource_name)

    def describe(self) -> str:
        """Return "queue Q (DLQ D) on vhost V" for messages."""
        return f"queue {self.queue!r} (DLQ {self.dead_letter_queue!r}) on vhost {self.vhost!r}"


def resolve_target(
    namespace: str, resource_name: str, spec: OpenCheckQueueSpec, broker: BrokerSettings
) -> QueueTarget:
    """Return the queues of a resource; the vhost is the spec's, else the Secret's, else "/"."""
    return QueueTarget(
        namespace=namespace,
        resource_name=resource_name,
        vhost=spec.queue.vhost or broker.default_vhost or DEFAULT_VHOST,
        queue=spec.queue_name(resource_name),
        dead_letter_queue=spec.dead_letter_queue_name(resource_name),
        queue_type=spec.queue.type,
        limits=spec.limits,
    )


@dataclass(frozen=True)
class QueueState:
    """One queue after a reconcile."""

    name: str
    outcome: DeclareOutcome
    differences: tuple[ArgumentDifference, ...] = ()
    # None right after a declare: the broker reports counts some seconds later.
    figures: QueueFigures | None = None


@dataclass(frozen=True)
class PolicyState:
    """The operator's policy after a reconcile."""

    # None when no limit is set, so no policy exists.
    name: str | None
    changed: bool
    # spec.limits fields the broker cannot apply, such as consumerTimeoutMilliseconds.
    unsupported: tuple[str, ...] = ()


@dataclass
class ReconcileReport:
    """Record of what a reconcile found and changed, step by step; partial when a step raised."""

    target: QueueTarget
    step: Step = "connect"
    broker_reached: bool = False
    dead_letter: QueueState | None = None
    queue: QueueState | None = None
    policy: PolicyState | None = None

    @property
    def differences(self) -> list[tuple[str, ArgumentDifference]]:
        """Return (queue name, difference) for both queues."""
        found: list[tuple[str, ArgumentDifference]] = []
        for state in (self.dead_letter, self.queue):
            if state is not None:
                found.extend((state.name, difference) for difference in state.differences)
        return found


def reconcile_queues(
    clients: BrokerClients,
    target: QueueTarget,
    report: ReconcileReport,
    dead_letter_declared_before: bool = False,
    queue_declared_before: bool = False,
) -> ReconcileReport:
    """Declare what is missing (the DLQ first), compare what exists, apply the policy.

    `*_declared_before` is True when status shows an earlier declare, which
    makes a missing queue "redeclared". Fills `report` as it goes, so the
    caller sees how far it got when a BrokerError is raised.
    """
    report.step = "dead-letter queue"
    report.dead_letter = ensure_queue(
        clients,
        target.vhost,
        target.dead_letter_queue,
        dead_letter_queue_arguments(target.queue_type),
        target.queue_type,
        dead_letter_declared_before,
        report,
    )
    report.step = "queue"
    report.queue = ensure_queue(
        clients,
        target.vhost,
        target.queue,
        work_queue_arguments(target.queue_type, target.dead_letter_queue),
        target.queue_type,
        queue_declared_before,
        report,
    )
    report.step = "policy"
    report.policy = apply_policy(clients, target)
    refresh_counts(clients, report)
    return report


def refresh_counts(clients: BrokerClients, report: ReconcileReport) -> None:
    """Replace the queues' ready and unacknowledged counts with live ones.

    The counts of `get_queue` come from the broker's statistics database
    and lag by up to one statistics interval, while the scaler writes live
    counts into the same status fields. Consumers still come from the
    statistics. A failed read keeps the statistics counts.
    """
    try:
        totals = clients.management.list_queue_totals(report.target.vhost)
    except BrokerError as error:
        # The counts are a report, not a step of the reconcile: log and go on.
        logger.warning("Reading live counts of vhost %r failed: %s", report.target.vhost, error)
        return
    live = {figures.name: figures for figures in totals}
    report.dead_letter = _with_live_counts(report.dead_letter, live)
    report.queue = _with_live_counts(report.queue, live)


def _with_live_counts(
    state: QueueState | None, live: dict[str, QueueFigures]
) -> QueueState | None:
    if state is None or state.name not in live:
        return state
    counts = live[state.name]
    consumers = state.figures.consumers if state.figures else None
    figures = replace(counts, consumers=consumers)
    return replace(state, figures=figures)


def ensure_queue(
    clients: BrokerClients,
    vhost: str,
    name: str,
    arguments: dict[str, object],
    queue_type: QueueType,
    declared_before: bool,
    report: ReconcileReport,
) -> QueueState:
    """Declare a queue that does not exist; compare one that does with `arguments`."""
    info = clients.management.get_queue(vhost, name)
    report.broker_reached = True
    if info is None:
        try:
            clients.amqp.declare_queue(vhost, name, arguments)
        except PreconditionFailed:
            # Someone created the queue between the read and the declare,
            # with other arguments: read it again and report the drift.
            logger.info("Queue %r on vhost %r appeared with other arguments.", name, vhost)
            info = clients.management.get_queue(vhost, name)
            if info is None:
                raise
        else:
            return QueueState(name, "redeclared" if declared_before else "declared")
    differences = compare_arguments(arguments, info.arguments, queue_type, info.type, info.durable)
    return QueueState(name, "exists", tuple(differences), info.figures)


def apply_policy(clients: BrokerClients, target: QueueTarget) -> PolicyState:
    """Create, update or delete the operator's policy so it contains the spec's limits."""
    plan = plan_policy(target.limits, clients.overview().version_tuple)
    name = target.policy_name
    management = clients.management
    if plan.empty:
        removed = management.delete_policy(target.vhost, name)
        if removed:
            logger.info("Deleted policy %r on vhost %r: no limits left.", name, target.vhost)
        return PolicyState(None, removed, plan.unsupported)

    pattern = policy_pattern(target.queue)
    current = management.get_policy(target.vhost, name)
    if current is not None and policy_matches(
        current.pattern,
        current.definition,
        current.priority,
        current.apply_to,
        pattern,
        plan.definition,
    ):
        return PolicyState(name, False, plan.unsupported)
    management.put_policy(
        target.vhost, name, pattern, plan.definition, POLICY_PRIORITY, POLICY_APPLY_TO
    )
    logger.info("Applied policy %r on vhost %r: %s.", name, target.vhost, plan.definition)
    return PolicyState(name, True, plan.unsupported)


def read_figures(
    clients: BrokerClients, target: QueueTarget
) -> tuple[QueueFigures | None, QueueFigures | None]:
    """Return the current counts of the work queue and the DLQ; None for a missing queue."""
    queue = clients.management.get_queue(target.vhost, target.queue)
    dead_letter = clients.management.get_queue(target.vhost, target.dead_letter_queue)
    return (
        None if queue is None else queue.figures,
        None if dead_letter is None else dead_letter.figures,
    )


@dataclass
class DeletionResult:
    """Outcome of a deletion: which queues and policy were removed."""

    queue_deleted: bool = False
    dead_letter: DeadLetterOutcome = "absent"
    policy_deleted: bool = False
    # Names of the other resources that use the DLQ, when it was kept.
    dead_letter_users: list[str] = field(default_factory=list)


def delete_queues(
    clients: BrokerClients,
    target: QueueTarget,
    force: bool,
    dead_letter_users: list[str],
) -> DeletionResult:
    """Delete the work queue, the policy, and the DLQ unless others use it.

    Without `force`, the broker deletes only empty queues, and a queue with
    messages raises QueueNotEmpty; the deletion can be retried, because a
    queue already gone counts as deleted.
    """
    result = DeletionResult(dead_letter_users=list(dead_letter_users))
    result.queue_deleted = _delete_queue(clients, target.vhost, target.queue, force)
    result.policy_deleted = clients.management.delete_policy(target.vhost, target.policy_name)
    if dead_letter_users:
        result.dead_letter = "shared"
        return result
    deleted = _delete_queue(clients, target.vhost, target.dead_letter_queue, force)
    result.dead_letter = "deleted" if deleted else "absent"
    return result


def _delete_queue(clients: BrokerClients, vhost: str, name: str, force: bool) -> bool:
    try:
        return clients.management.delete_queue(vhost, name, if_empty=not force)
    except QueueNotEmpty:
        raise QueueNotEmpty(
            f"Queue {name!r} on vhost {vhost!r} is not empty, so it was not deleted; "
            f'consume or purge them, or set the annotation {FORCE_DELETE_ANNOTATION}: "true"'
        ) from None
