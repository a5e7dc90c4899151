"""Prometheus metrics of one agent process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Check requests run from seconds (a no-op) to many minutes (a clone and a
# scan), so the buckets span 10 ms to 1 hour.
PROCESSING_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600)


class AgentMetrics:
    """The agent's counters, each registered in a registry of its own.

    A registry per instance keeps tests that build several consumers in one
    process from colliding in the global default registry.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.processed = Counter(
            "openchecker_agent_messages_processed",
            "Messages whose handler succeeded and that were acknowledged.",
            registry=self.registry,
        )
        self.failed = Counter(
            "openchecker_agent_messages_failed",
            "Messages whose handler raised or whose body could not be decoded.",
            registry=self.registry,
        )
        self.dead_lettered = Counter(
            "openchecker_agent_messages_dead_lettered",
            "Messages rejected without requeue, so the broker dead-letters them.",
            registry=self.registry,
        )
        self.requeued = Counter(
            "openchecker_agent_messages_requeued",
            "Messages returned to the queue at shutdown because they did not finish in time.",
            registry=self.registry,
        )
        self.stale_settlements = Counter(
            "openchecker_agent_stale_settlements",
            "Acks and nacks dropped because their channel had closed; "
            "the broker redelivers those messages.",
            registry=self.registry,
        )
        self.reconnects = Counter(
            "openchecker_agent_reconnects",
            "Connection attempts after the first one.",
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "openchecker_agent_messages_in_flight",
            "Messages received and not yet acknowledged or rejected.",
            registry=self.registry,
        )
        self.processing_seconds = Histogram(
            "openchecker_agent_processing_seconds",
            "Run time of the handler, from its call to its return or exception.",
            buckets=PROCESSING_BUCKETS,
            registry=self.registry,
        )
