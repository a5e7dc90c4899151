"""Capped exponential backoff with jitter for reconnects and retries."""

from __future__ import annotations

import random


class Backoff:
    """Delays that double from `initial_seconds` up to `max_seconds`, with jitter.

    Each delay is drawn uniformly from [delay / 2, delay] ("equal jitter"), so
    a fleet of agents that lost the broker at the same moment does not
    reconnect in lockstep. `reset()` starts over from the initial delay.
    """

    def __init__(
        self,
        initial_seconds: float = 1.0,
        max_seconds: float = 30.0,
        *,
        rng: random.Random | None = None,
    ) -> None:
        if initial_seconds <= 0 or max_seconds < initial_seconds:
            raise ValueError(
                f"invalid backoff bounds: initial {initial_seconds} s, max {max_seconds} s; "
                "expected 0 < initial <= max"
            )
        self.initial_seconds = initial_seconds
        self.max_seconds = max_seconds
        self.attempts = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        """Return the next delay in seconds and count one more attempt."""
        ceiling = min(self.max_seconds, self.initial_seconds * 2.0**self.attempts)
        self.attempts += 1
        return self._rng.uniform(ceiling / 2.0, ceiling)

    def reset(self) -> None:
        """Start over from the initial delay, after the operation worked again."""
        self.attempts = 0
