"""The demo's summary figures and its plot."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .progress import Sample

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Summary:
    """Outcome counts of the published messages, each taken from its own source."""

    published: int
    # Distinct task ids whose results reached the callback server.
    processed: int
    # Of those, tasks whose results report a command that exited non-zero.
    failed_commands: int
    # Messages in the dead-letter queue, from the management API.
    dead_lettered: int
    expected_dead_lettered: int
    duplicates: int
    peak_replicas: int
    # Seconds from the first publish until every message was processed or
    # dead-lettered, or None when that never happened.
    drain_seconds: float | None

    @property
    def lost(self) -> int:
        """Messages neither processed nor dead-lettered."""
        return self.published - self.processed - self.dead_lettered

    def problems(self) -> list[str]:
        """Return the run's problems as sentences, or an empty list for a clean run."""
        problems = []
        if self.lost != 0:
            problems.append(f"{self.lost} messages were lost")
        if self.dead_lettered != self.expected_dead_lettered:
            problems.append(
                f"{self.dead_lettered} messages were dead-lettered, "
                f"expected {self.expected_dead_lettered}"
            )
        if self.drain_seconds is None:
            problems.append("the queue did not drain before the timeout")
        return problems

    def format(self) -> str:
        drain = "did not drain" if self.drain_seconds is None else f"{self.drain_seconds:.1f} s"
        rows = [
            ("published", str(self.published), "confirmed by the broker"),
            (
                "processed",
                str(self.processed),
                f"callbacks received, {self.failed_commands} of them for a failed command; "
                f"{self.duplicates} duplicates",
            ),
            (
                "dead-lettered",
                str(self.dead_lettered),
                f"dead-letter queue depth from the management API; "
                f"{self.expected_dead_lettered} expected",
            ),
            ("lost", str(self.lost), "published - processed - dead-lettered"),
            ("peak replicas", str(self.peak_replicas), "highest spec.replicas the scaler set"),
            ("time to drain", drain, "first publish to last message settled"),
        ]
        lines = ["Summary"]
        lines += [f"  {name + ':':15} {value:>8}   ({note})" for name, value, note in rows]
        return "\n".join(lines)


def write_plot(samples: Sequence[Sample], path: Path, title: str) -> None:
    """Write a PNG of ready, unacknowledged and replicas over time to `path`."""
    # Agg renders to files only, so no display is needed.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    seconds = [sample.seconds for sample in samples]
    ready = [sample.queue.ready if sample.queue else None for sample in samples]
    unacknowledged = [sample.queue.unacknowledged if sample.queue else None for sample in samples]
    dead_letter = [sample.dead_letter.ready if sample.dead_letter else None for sample in samples]
    desired = [sample.desired_replicas for sample in samples]
    running = [sample.running_agents for sample in samples]

    figure, (messages_axes, replicas_axes) = pyplot.subplots(
        2, 1, sharex=True, figsize=(9, 6), height_ratios=(2, 1)
    )
    messages_axes.plot(seconds, ready, label="ready")
    messages_axes.plot(seconds, unacknowledged, label="unacknowledged")
    messages_axes.plot(seconds, dead_letter, label="dead-letter queue", linestyle="--")
    # The management API refreshes these figures every 5 s, hence the steps.
    messages_axes.set_ylabel("messages (management API)")
    messages_axes.legend(loc="best")
    messages_axes.set_title(title)
    replicas_axes.step(seconds, desired, where="post", label="spec.replicas (scaler)")
    replicas_axes.step(seconds, running, where="post", label="running agents", linestyle=":")
    replicas_axes.set_ylabel("replicas")
    replicas_axes.set_xlabel("seconds since the first publish")
    replicas_axes.legend(loc="best")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    logger.info("Wrote the plot to %s.", path)
