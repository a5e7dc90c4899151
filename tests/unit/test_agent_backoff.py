"""Reconnect backoff: doubling, the cap, jitter bounds and reset."""

from __future__ import annotations

import random

import pytest
from openchecker_agent.backoff import Backoff


def test_delays_double_up_to_cap() -> None:
    backoff = Backoff(1.0, 8.0, rng=random.Random(1))

    delays = [backoff.next_delay() for _ in range(7)]

    ceilings = [1, 2, 4, 8, 8, 8, 8]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling


def test_reset_starts_over() -> None:
    backoff = Backoff(1.0, 30.0, rng=random.Random(2))
    for _ in range(5):
        backoff.next_delay()

    backoff.reset()

    assert backoff.attempts == 0
    assert backoff.next_delay() <= 1.0


def test_jitter_spreads_delays() -> None:
    delays = {Backoff(4.0, 4.0, rng=random.Random(seed)).next_delay() for seed in range(20)}

    assert len(delays) == 20
    assert min(delays) >= 2.0
    assert max(delays) <= 4.0


@pytest.mark.parametrize(("initial", "maximum"), [(0.0, 1.0), (2.0, 1.0), (-1.0, 5.0)])
def test_invalid_bounds_rejected(initial: float, maximum: float) -> None:
    with pytest.raises(ValueError, match="invalid backoff bounds"):
        Backoff(initial, maximum)
