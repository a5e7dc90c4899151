"""Table tests of the scaling decision in openchecker_operator.scaling."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from openchecker_operator.scaling import (
    Decision,
    QueueFigures,
    ScalingPolicy,
    ScalingState,
    decide,
)

WINDOW_SECONDS = 300.0


def policy(**overrides: object) -> ScalingPolicy:
    settings: dict[str, object] = {
        "min_replicas": 0,
        "max_replicas": 10,
        "messages_per_replica": 10,
        "scale_down_stabilization_seconds": WINDOW_SECONDS,
        "tolerance": 0.1,
    }
    settings.update(overrides)
    return ScalingPolicy(**settings)  # type: ignore[arg-type]


def figures(
    ready: int | None, unacknowledged: int | None = 0, consumers: int | None = 0
) -> QueueFigures:
    return QueueFigures(ready=ready, unacknowledged=unacknowledged, consumers=consumers)


def decide_once(scaling: ScalingPolicy, observed: QueueFigures | None, current: int) -> Decision:
    """Decide with a history that contains only `current`, one window ago."""
    state = ScalingState.starting(0.0, current)
    decision, _ = decide(scaling, observed, current, state, WINDOW_SECONDS + 1)
    return decision


@dataclass(frozen=True)
class Case:
    name: str
    scaling: ScalingPolicy
    observed: QueueFigures | None
    current: int
    expected: int


CASES = [
    Case("backlog 40 target 10", policy(), figures(40), 0, 4),
    Case("backlog 40 from 1", policy(), figures(40), 1, 4),
    Case("one unacknowledged keeps one", policy(), figures(0, 1, 1), 1, 1),
    Case("ready 1 unacknowledged 1 target 1", policy(messages_per_replica=1), figures(1, 1), 1, 2),
    Case("max clamps", policy(max_replicas=5), figures(1000), 2, 5),
    Case("min raises", policy(min_replicas=2), figures(0), 2, 2),
    Case("min raises from zero", policy(min_replicas=2), figures(0), 0, 2),
    Case("activation holds zero", policy(activation_messages=5), figures(5), 0, 0),
    Case("activation exceeded", policy(activation_messages=5), figures(6), 0, 1),
    Case("activation ignored when running", policy(activation_messages=5), figures(3), 1, 1),
    Case("zero backlog from zero", policy(), figures(0), 0, 0),
    Case("within tolerance holds", policy(), figures(42), 4, 4),
    Case("outside tolerance scales", policy(), figures(45), 4, 5),
    Case("tolerance zero scales", policy(tolerance=0.0), figures(41), 4, 5),
    Case("busy replicas not stopped", policy(), figures(0, 3, 3), 3, 3),
    Case("busy with prefetch 2", policy(prefetch_count=2), figures(0, 3, 2), 4, 2),
    Case("amqp figures keep consumers", policy(), figures(0, None, 2), 3, 2),
    Case("amqp figures count consumers", policy(), figures(30, None, 0), 0, 3),
    Case("failed read holds", policy(), None, 3, 3),
    Case("missing counts hold", policy(), figures(None, None, None), 3, 3),
    Case("missing unacknowledged and consumers hold", policy(), figures(5, None, None), 3, 3),
    Case("paused freezes up", policy(paused=True), figures(1000), 2, 2),
    Case("paused freezes down", policy(paused=True), figures(0), 2, 2),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_decide_table(case: Case) -> None:
    decision = decide_once(case.scaling, case.observed, case.current)

    assert decision.desired == case.expected, decision.reason


def test_reason_names_backlog_and_target() -> None:
    decision = decide_once(policy(), figures(40), 0)

    assert decision.reason == "backlog 40 / 10 per replica"


def test_scale_down_waits_for_window() -> None:
    scaling = policy()
    state = ScalingState.starting(0.0, 0)
    decision, state = decide(scaling, figures(40), 0, state, 1.0)
    assert decision.desired == 4

    # The queue empties: nothing changes until the window since the last
    # recommendation of 4 has passed.
    current = decision.desired
    for now in range(2, int(WINDOW_SECONDS) + 1, 5):
        decision, state = decide(scaling, figures(0), current, state, float(now))
        assert decision.desired == 4, f"scaled down at {now} s: {decision.reason}"

    decision, state = decide(scaling, figures(0), current, state, WINDOW_SECONDS + 2.0)
    assert decision.desired == 0, decision.reason


def test_emptied_queue_reaches_min_after_window() -> None:
    scaling = policy(min_replicas=1)
    state = ScalingState.starting(0.0, 5)

    decision, state = decide(scaling, figures(0), 5, state, 10.0)
    assert decision.desired == 5
    decision, state = decide(scaling, figures(0), 5, state, WINDOW_SECONDS + 1.0)
    assert decision.desired == 1, decision.reason


def test_jumping_input_does_not_flap() -> None:
    scaling = policy()
    state = ScalingState.starting(0.0, 0)
    current = 0
    applied: list[int] = []
    backlogs = [50, 0, 40, 0, 50, 10, 0, 45, 0, 50]
    for step, backlog in enumerate(backlogs, start=1):
        decision, state = decide(scaling, figures(backlog), current, state, step * 10.0)
        current = decision.desired
        applied.append(current)

    # One step up to 5 at the first poll, then no change inside the window.
    assert applied == [5] * len(backlogs)


def test_scale_down_takes_highest_recommendation_in_window() -> None:
    scaling = policy()
    state = ScalingState.starting(0.0, 8)
    _, state = decide(scaling, figures(60), 8, state, 100.0)
    _, state = decide(scaling, figures(30), 8, state, 200.0)

    # At 350 s the start recommendation (0 s) has left the window; 6 (at
    # 100 s) is the highest one left.
    decision, state = decide(scaling, figures(0), 8, state, 350.0)
    assert decision.desired == 6, decision.reason
    decision, state = decide(scaling, figures(0), 6, state, 450.0)
    assert decision.desired == 3, decision.reason
    decision, state = decide(scaling, figures(0), 3, state, 550.0)
    assert decision.desired == 0, decision.reason


def test_restart_starts_window_from_restart() -> None:
    scaling = policy()
    state = ScalingState.starting(1000.0, 4)

    decision, state = decide(scaling, figures(0), 4, state, 1001.0)
    assert decision.desired == 4
    decision, state = decide(scaling, figures(0), 4, state, 1000.0 + WINDOW_SECONDS + 1)
    assert decision.desired == 0


def test_failed_reads_reach_fallback_after_threshold() -> None:
    scaling = policy(fallback_replicas=2, failure_threshold=3)
    state = ScalingState.starting(0.0, 0)

    first, state = decide(scaling, None, 0, state, 1.0)
    second, state = decide(scaling, None, 0, state, 2.0)
    third, state = decide(scaling, None, 0, state, 3.0)

    assert first.desired == 0
    assert second.desired == 0
    assert third.desired == 2, third.reason
    assert state.consecutive_failures == 3


def test_fallback_never_lowers_replicas() -> None:
    scaling = policy(fallback_replicas=2, failure_threshold=1)
    state = ScalingState.starting(0.0, 6)

    decision, _ = decide(scaling, None, 6, state, WINDOW_SECONDS + 1)

    assert decision.desired == 6, decision.reason


def test_failed_reads_without_fallback_hold() -> None:
    scaling = policy(failure_threshold=1)
    state = ScalingState.starting(0.0, 3)
    for now in range(1, 10):
        decision, state = decide(scaling, None, 3, state, WINDOW_SECONDS + now)
        assert decision.desired == 3, decision.reason


def test_successful_read_resets_failures() -> None:
    scaling = policy(fallback_replicas=2, failure_threshold=2)
    state = ScalingState.starting(0.0, 0)
    _, state = decide(scaling, None, 0, state, 1.0)
    _, state = decide(scaling, figures(0), 0, state, 2.0)
    decision, state = decide(scaling, None, 0, state, 3.0)

    assert decision.desired == 0, decision.reason
    assert state.consecutive_failures == 1


def test_recovery_after_fallback_waits_for_window() -> None:
    scaling = policy(fallback_replicas=2, failure_threshold=1)
    state = ScalingState.starting(0.0, 0)
    decision, state = decide(scaling, None, 0, state, 1.0)
    assert decision.desired == 2

    decision, state = decide(scaling, figures(0), 2, state, 2.0)
    assert decision.desired == 2, decision.reason
    decision, state = decide(scaling, figures(0), 2, state, WINDOW_SECONDS + 2.0)
    assert decision.desired == 0, decision.reason


def test_paused_then_resumed_waits_for_window() -> None:
    state = ScalingState.starting(0.0, 4)
    _, state = decide(policy(paused=True), figures(0), 4, state, WINDOW_SECONDS + 10.0)

    decision, _ = decide(policy(), figures(0), 4, state, WINDOW_SECONDS + 20.0)

    assert decision.desired == 4, decision.reason


def test_zero_window_scales_down_at_once() -> None:
    scaling = policy(scale_down_stabilization_seconds=0.0)
    state = ScalingState.starting(0.0, 4)

    decision, _ = decide(scaling, figures(0), 4, state, 0.5)

    assert decision.desired == 0, decision.reason


def test_history_is_bounded() -> None:
    scaling = policy(scale_down_stabilization_seconds=1e9)
    state = ScalingState.starting(0.0, 0)
    for now in range(5000):
        _, state = decide(scaling, figures(0), 0, state, float(now))

    assert len(state.recommendations) <= 3600


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"min_replicas": -1}, "minReplicas -1"),
        ({"min_replicas": 3, "max_replicas": 2}, "maxReplicas 2 is below minReplicas 3"),
        ({"messages_per_replica": 0}, "messagesPerReplica 0"),
        ({"prefetch_count": 0}, "prefetchCount 0"),
        ({"failure_threshold": 0}, "failureThreshold 0"),
    ],
)
def test_policy_rejects_invalid_settings(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        policy(**overrides)
