"""The scaling decision: how many agent replicas a queue's backlog needs.

A pure function of the queue figures, the policy from `spec.scaling`, the
current replica count and a small per-resource state with the recent
recommendations. The poll loop in `scaler.py` applies the result.

The rules, in order of precedence:

1. `paused` freezes the replica count.
2. A failed read, or figures without the ready count, never scales down.
   After `failureThreshold` consecutive failures the count rises to
   `fallbackReplicas` when that is set.
3. The recommendation is ceil(backlog / messagesPerReplica), where the
   backlog is ready plus unacknowledged messages, clamped to
   [minReplicas, maxReplicas]. From 0 replicas it stays 0 while the backlog
   is at most `activationMessages`. With replicas running, a load ratio
   within `tolerance` of 1 keeps the current count, as the HPA does.
4. Scaling up happens at once. Scaling down takes the highest
   recommendation of the last `scaleDownStabilizationSeconds`.
5. The count never drops below the replicas that hold unacknowledged
   messages, ceil(unacknowledged / prefetchCount), so a scale-down never
   requests more pods to stop than are idle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

# Recommendations kept per resource, whatever the window: at a 1 s poll
# interval this covers a 1 h window, and it bounds memory per resource.
MAX_RECOMMENDATIONS = 3600


@dataclass(frozen=True)
class ScalingPolicy:
    """The scaling settings of one resource, from `spec.scaling` and `spec.agent`."""

    min_replicas: int = 0
    max_replicas: int = 10
    messages_per_replica: int = 10
    activation_messages: int = 0
    scale_down_stabilization_seconds: float = 300.0
    tolerance: float = 0.1
    fallback_replicas: int | None = None
    failure_threshold: int = 3
    paused: bool = False
    prefetch_count: int = 1

    def __post_init__(self) -> None:
        if self.min_replicas < 0:
            raise ValueError(f"minReplicas {self.min_replicas} is negative; expected >= 0")
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"maxReplicas {self.max_replicas} is below minReplicas {self.min_replicas}"
            )
        if self.messages_per_replica <= 0:
            raise ValueError(
                f"messagesPerReplica {self.messages_per_replica} is not positive; expected > 0"
            )
        if self.prefetch_count <= 0:
            raise ValueError(f"prefetchCount {self.prefetch_count} is not positive; expected > 0")
        if self.failure_threshold <= 0:
            raise ValueError(
                f"failureThreshold {self.failure_threshold} is not positive; expected > 0"
            )

    def clamp(self, replicas: int) -> int:
        """Return `replicas` limited to [min_replicas, max_replicas]."""
        return max(self.min_replicas, min(self.max_replicas, replicas))


@dataclass(frozen=True)
class QueueFigures:
    """Counts of one queue as the broker reported them; None when absent.

    The management API gives all three. A passive queue.declare over AMQP
    gives only `ready` and `consumers`.
    """

    ready: int | None
    unacknowledged: int | None
    consumers: int | None

    @property
    def usable(self) -> bool:
        """True when the figures can support a decision, scaling down included."""
        if self.ready is None:
            return False
        return self.unacknowledged is not None or self.consumers is not None

    def in_flight(self, prefetch_count: int) -> int:
        """Return the messages delivered and not yet acknowledged, or an upper bound.

        Without the unacknowledged count, every consumer is assumed to hold
        a full prefetch window.
        """
        if self.unacknowledged is not None:
            return self.unacknowledged
        return (self.consumers or 0) * prefetch_count

    def describe(self) -> str:
        """Return the figures as "ready R, unacknowledged U, consumers C"."""
        return (
            f"ready {_show(self.ready)}, unacknowledged {_show(self.unacknowledged)}, "
            f"consumers {_show(self.consumers)}"
        )


def _show(value: int | None) -> str:
    return "unknown" if value is None else str(value)


@dataclass(frozen=True)
class Recommendation:
    """A replica count recommended at a time in seconds of a monotonic clock."""

    time_seconds: float
    replicas: int


@dataclass(frozen=True)
class ScalingState:
    """Per-resource memory of the decision between polls."""

    recommendations: tuple[Recommendation, ...] = field(default_factory=tuple)
    consecutive_failures: int = 0

    @classmethod
    def starting(cls, now_seconds: float, current_replicas: int) -> ScalingState:
        """Return the state of a resource first seen at `now_seconds`.

        The current count counts as recommended now, so the first scale-down
        waits one full window: after an operator restart the window starts
        from the restart.
        """
        return cls(recommendations=(Recommendation(now_seconds, current_replicas),))


@dataclass(frozen=True)
class Decision:
    """The replica count to apply and the reason, as written to the Event and status."""

    desired: int
    reason: str
    recommendation: int | None = None

    def changes(self, current_replicas: int) -> bool:
        """True when applying the decision changes the replica count."""
        return self.desired != current_replicas


def decide(
    policy: ScalingPolicy,
    figures: QueueFigures | None,
    current_replicas: int,
    state: ScalingState,
    now_seconds: float,
) -> tuple[Decision, ScalingState]:
    """Return the replica count for one poll and the state for the next one.

    `figures` is None when the broker could not be read. `now_seconds` comes
    from a monotonic clock. The function has no side effects.
    """
    if policy.paused:
        decision = Decision(current_replicas, "scaling is paused")
        return decision, _remember(state, policy, now_seconds, current_replicas)
    if figures is None or not figures.usable:
        return _hold_after_failure(policy, figures, current_replicas, state, now_seconds)

    recommendation, explanation = recommend(policy, figures, current_replicas)
    state = _remember(state, policy, now_seconds, recommendation)
    state = replace(state, consecutive_failures=0)
    if recommendation >= current_replicas:
        return Decision(recommendation, explanation, recommendation), state

    stabilized = max(entry.replicas for entry in state.recommendations)
    desired = min(current_replicas, stabilized)
    if desired > recommendation:
        explanation = (
            f"{explanation}; holding {desired} (highest recommendation of the last "
            f"{policy.scale_down_stabilization_seconds:g} s)"
        )
    busy = min(current_replicas, busy_replicas(policy, figures))
    if busy > desired:
        desired = busy
        explanation = f"{explanation}; holding {busy} replicas busy with unacknowledged messages"
    return Decision(desired, explanation, recommendation), state


def recommend(
    policy: ScalingPolicy, figures: QueueFigures, current_replicas: int
) -> tuple[int, str]:
    """Return the replica count the backlog needs now, before stabilization."""
    in_flight = figures.in_flight(policy.prefetch_count)
    backlog = (figures.ready or 0) + in_flight
    target = policy.messages_per_replica
    if current_replicas == 0 and backlog <= policy.activation_messages:
        replicas = 0
        explanation = f"backlog {backlog} <= activation {policy.activation_messages}"
    elif current_replicas > 0 and _within_tolerance(policy, backlog, current_replicas):
        replicas = current_replicas
        explanation = f"backlog {backlog} / {target} per replica is within tolerance of {replicas}"
    else:
        replicas = math.ceil(backlog / target)
        explanation = f"backlog {backlog} / {target} per replica"

    clamped = policy.clamp(replicas)
    if clamped > replicas:
        explanation = f"{explanation}; raised to minReplicas {clamped}"
    elif clamped < replicas:
        explanation = f"{explanation}; capped at maxReplicas {clamped}"
    return clamped, explanation


def busy_replicas(policy: ScalingPolicy, figures: QueueFigures) -> int:
    """Return how many replicas may hold unacknowledged messages right now."""
    return math.ceil(figures.in_flight(policy.prefetch_count) / policy.prefetch_count)


def _within_tolerance(policy: ScalingPolicy, backlog: int, current_replicas: int) -> bool:
    ratio = backlog / (current_replicas * policy.messages_per_replica)
    return abs(ratio - 1.0) <= policy.tolerance


def _hold_after_failure(
    policy: ScalingPolicy,
    figures: QueueFigures | None,
    current_replicas: int,
    state: ScalingState,
    now_seconds: float,
) -> tuple[Decision, ScalingState]:
    failures = state.consecutive_failures + 1
    problem = "broker read failed" if figures is None else "queue counts missing"
    desired = current_replicas
    explanation = f"{problem} ({failures} in a row); holding {current_replicas}"
    fallback = policy.fallback_replicas
    if fallback is not None and failures >= policy.failure_threshold:
        fallback = policy.clamp(fallback)
        # NOTE: the fallback only ever raises the count. A failed read carries
        # no figures about the backlog, so lowering it could stop busy workers.
        if fallback > current_replicas:
            desired = fallback
            explanation = f"{problem} ({failures} in a row); fallback to {fallback}"
    state = replace(state, consecutive_failures=failures)
    # The held count is remembered, so a scale-down after the broker comes
    # back waits one window.
    return Decision(desired, explanation), _remember(state, policy, now_seconds, desired)


def _remember(
    state: ScalingState, policy: ScalingPolicy, now_seconds: float, replicas: int
) -> ScalingState:
    """Add a recommendation and drop those older than the stabilization window."""
    window_start_seconds = now_seconds - policy.scale_down_stabilization_seconds
    recent = [
        entry for entry in state.recommendations if entry.time_seconds > window_start_seconds
    ]
    recent.append(Recommendation(now_seconds, replicas))
    return replace(state, recommendations=tuple(recent[-MAX_RECOMMENDATIONS:]))
