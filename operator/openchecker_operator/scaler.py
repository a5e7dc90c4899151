"""The poll loop that scales every agent fleet from its queue's figures.

One task serves all resources. Each cycle it picks the resources whose poll
interval has passed, groups them by broker, and reads each broker once. A
single management API request returns the current counts of all queues of
a broker (plus one for consumer counts every CONSUMERS_REFRESH_SECONDS), so
broker requests per cycle grow with brokers, not resources.
For each resource it applies `scaling.decide`, writes the replica count
through the Deployment's scale subresource when it changes, posts a
`Scaled` Event, and merges the figures into the resource's status.

State lives in a `FleetRegistry` kept in kopf's memo: the registered
resources, the Deployments' replica counts as the watch reports them, and
each resource's ScalingState. Nothing survives a restart, and that is
safe: a resource seen for the first time starts its scale-down window at
that moment.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import kopf

from .fleet import FleetSpec
from .kube import RESOURCE_GROUP, RESOURCE_KIND, RESOURCE_VERSION, KubeClient, ObjectReference
from .scaling import Decision, QueueFigures, ScalingPolicy, ScalingState, decide
from .status import figures_status
from .workloads import deployment_name

logger = logging.getLogger(__name__)

ResourceKey = tuple[str, str]
QueueKey = tuple[str, str]

# The loop wakes at least this often to pick up new resources, in seconds.
MAX_SLEEP_SECONDS = 1.0
MIN_SLEEP_SECONDS = 0.05
# Status is rewritten at least this often even when no figure changed, so
# `lastPollTime` stays recent without one API write per resource and poll.
STATUS_REFRESH_SECONDS = 30.0
# Resources handled at once; each may make up to three API calls.
CONCURRENT_RESOURCES = 16
# Seconds between two reads of the consumer counts of one broker, which
# only status shows; the live counts that drive decisions come every poll.
CONSUMERS_REFRESH_SECONDS = 30.0
# How long a count the scaler wrote wins over older counts from the watch.
WRITE_SETTLE_SECONDS = 10.0
# Seconds between two log lines about the same failed read of one broker;
# status.replicas.readFailures counts every failed read.
FAILURE_LOG_INTERVAL_SECONDS = 300.0
SCALED_REASON = "Scaled"
SCALE_FAILED_REASON = "ScaleFailed"


class QueueCounts(Protocol):
    """Counts of one queue in a broker's reply; None when the reply lacks the count."""

    @property
    def ready(self) -> int | None: ...

    @property
    def unacknowledged(self) -> int | None: ...

    @property
    def consumers(self) -> int | None: ...


class QueueFiguresReader(Protocol):
    """A broker's management client, reduced to the one call the scaler needs."""

    def read_queue_figures(self) -> Mapping[QueueKey, QueueCounts]:
        """Return the figures of every queue on the broker, keyed by (vhost, queue name).

        Blocks for one HTTP request, or two when the reader also refreshes
        consumer counts. Raises on any failure of the counts that drive the
        decision.
        """
        ...


class NamedQueueCounts(QueueCounts, Protocol):
    """Counts of one queue with the queue's vhost and name."""

    @property
    def vhost(self) -> str: ...

    @property
    def name(self) -> str: ...


class QueueListingSource(Protocol):
    """The two queue listings of a broker's management client."""

    def list_queue_totals(self) -> Sequence[NamedQueueCounts]:
        """Return current ready and unacknowledged counts of every queue; one request."""
        ...

    def list_queues(self) -> Sequence[NamedQueueCounts]:
        """Return the statistics listing of every queue, with consumers; one request."""
        ...


class BrokerFiguresReader:
    """The scaler's reader of one broker: live counts, consumer counts refreshed less often.

    Each read sends one request for the live ready and unacknowledged
    counts of every queue. The consumer counts exist only in the broker's
    statistics listing, which costs the broker more and lags by seconds
    anyway. So that listing is read at most every CONSUMERS_REFRESH_SECONDS,
    and its counts are reused in between.
    """

    def __init__(
        self, source: QueueListingSource, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.source = source
        self.monotonic = monotonic
        self.consumers: dict[QueueKey, int | None] = {}
        self.consumers_read_seconds = float("-inf")

    def read_queue_figures(self) -> dict[QueueKey, QueueFigures]:
        """Return the figures of every queue, keyed by (vhost, queue name).

        Raises what the live listing raises; a failed consumer listing only
        keeps the previous consumer counts.
        """
        totals = self.source.list_queue_totals()
        now = self.monotonic()
        if now - self.consumers_read_seconds >= CONSUMERS_REFRESH_SECONDS:
            self._refresh_consumers(now)
        return {
            (item.vhost, item.name): QueueFigures(
                ready=item.ready,
                unacknowledged=item.unacknowledged,
                consumers=self.consumers.get((item.vhost, item.name)),
            )
            for item in totals
        }

    def _refresh_consumers(self, now: float) -> None:
        try:
            listing = self.source.list_queues()
        except Exception as error:
            # Consumer counts are only shown in status; the live counts that
            # drive the decision were read, so this read is retried later.
            logger.warning("Reading consumer counts failed; keeping the previous ones: %s", error)
            return
        self.consumers = {(item.vhost, item.name): item.consumers for item in listing}
        self.consumers_read_seconds = now


@dataclass(frozen=True)
class ScaleTarget:
    """One OpenCheckQueue, reduced to the fields the scaler uses."""

    namespace: str
    name: str
    uid: str
    vhost: str
    queue: str
    dead_letter_queue: str | None
    broker_key: Hashable
    reader: QueueFiguresReader = field(compare=False, repr=False)
    policy: ScalingPolicy
    poll_interval_seconds: float

    @property
    def key(self) -> ResourceKey:
        """Return (namespace, name)."""
        return (self.namespace, self.name)


@dataclass
class DeploymentReplicas:
    """The replica counts of an agent Deployment: spec (requested) and status (existing).

    `written_spec` is a count the scaler wrote that the watch has not
    reported yet, with the time of the write in monotonic seconds.
    """

    spec: int
    status: int
    written_spec: int | None = None
    written_seconds: float = 0.0


@dataclass
class ResourceProgress:
    """The scaler's memory of one resource between polls."""

    # None until the resource's Deployment is known, because the window
    # starts from the replica count the Deployment has then.
    state: ScalingState | None = None
    next_poll_seconds: float = 0.0
    last_decision: Decision | None = None
    last_status: dict[str, Any] | None = None
    last_status_write_seconds: float = float("-inf")
    last_scale_time: str | None = None
    last_scale_reason: str | None = None


@dataclass
class FleetRegistry:
    """Resources to scale and the scaler's records of them; kept in kopf's memo."""

    targets: dict[ResourceKey, ScaleTarget] = field(default_factory=dict)
    deployments: dict[ResourceKey, DeploymentReplicas] = field(default_factory=dict)
    progress: dict[ResourceKey, ResourceProgress] = field(default_factory=dict)
    # The last FleetSpec of each resource, to recreate a deleted Deployment.
    fleets: dict[ResourceKey, FleetSpec] = field(default_factory=dict)
    readers: dict[Hashable, BrokerFiguresReader] = field(default_factory=dict)

    def reader_for(self, broker_key: Hashable, source: QueueListingSource) -> BrokerFiguresReader:
        """Return the reader of a broker, shared by its resources; a new one for a new client."""
        reader = self.readers.get(broker_key)
        if reader is None or reader.source is not source:
            reader = self.readers[broker_key] = BrokerFiguresReader(source)
        return reader

    def register(self, target: ScaleTarget, fleet: FleetSpec | None = None) -> None:
        """Add or update a resource; a changed poll interval applies from the next poll.

        Drops the readers that no resource uses any more, such as the reader
        of a password that the Secret no longer contains.
        """
        self.targets[target.key] = target
        if fleet is not None:
            self.fleets[target.key] = fleet
        used = {item.broker_key for item in self.targets.values()}
        for broker_key in [key for key in self.readers if key not in used]:
            del self.readers[broker_key]

    def unregister(self, key: ResourceKey) -> None:
        """Forget a deleted resource."""
        self.targets.pop(key, None)
        self.progress.pop(key, None)
        self.fleets.pop(key, None)

    def observe_deployment(
        self, key: ResourceKey, spec: int, status: int, now_seconds: float | None = None
    ) -> None:
        """Record the replica counts of a resource's Deployment, as the watch reports them.

        Until the watch reports a count the scaler wrote, or for at most
        WRITE_SETTLE_SECONDS, an older spec count from the watch is ignored:
        a late event must not make the scaler write the same change again.
        """
        now_seconds = time.monotonic() if now_seconds is None else now_seconds
        known = self.deployments.get(key)
        if known is None:
            self.deployments[key] = DeploymentReplicas(spec=spec, status=status)
            return
        known.status = status
        settling = now_seconds - known.written_seconds < WRITE_SETTLE_SECONDS
        if known.written_spec is not None and spec != known.written_spec and settling:
            return
        known.spec = spec
        known.written_spec = None

    def record_scale(self, key: ResourceKey, spec: int, now_seconds: float) -> None:
        """Record a replica count the scaler wrote, before the watch reports it."""
        known = self.deployments.get(key)
        if known is None:
            known = self.deployments[key] = DeploymentReplicas(spec=spec, status=0)
        known.spec = spec
        known.written_spec = spec
        known.written_seconds = now_seconds

    def forget_deployment(self, key: ResourceKey) -> None:
        """Forget a deleted Deployment."""
        self.deployments.pop(key, None)

    def desired_replicas(self, key: ResourceKey) -> int | None:
        """Return the replica count last decided for a resource, or None before the first."""
        progress = self.progress.get(key)
        if progress is None or progress.last_decision is None:
            return None
        return progress.last_decision.desired


@dataclass
class CycleReport:
    """Counters of one poll cycle; the bench reads them."""

    brokers_read: int = 0
    broker_failures: int = 0
    resources_decided: int = 0
    scaled: int = 0
    status_writes: int = 0


@dataclass
class ReadFailure:
    """Failed reads in a row of one broker with the same error, for rate-limited logging."""

    message: str
    logged_seconds: float
    count: int = 0


class Scaler:
    """The poll loop over a FleetRegistry."""

    def __init__(
        self,
        registry: FleetRegistry,
        kube: KubeClient,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.kube = kube
        self.monotonic = monotonic
        self.limit = asyncio.Semaphore(CONCURRENT_RESOURCES)
        self.read_failures: dict[Hashable, ReadFailure] = {}

    async def run(self) -> None:
        """Poll until cancelled; a failing cycle is logged and the loop goes on."""
        logger.info("Scaler started.")
        try:
            while True:
                try:
                    await self.poll_due()
                except Exception:
                    # One bad cycle must not stop scaling for every resource.
                    logger.exception("Scaler cycle failed; the next cycle retries.")
                await asyncio.sleep(self._sleep_seconds())
        finally:
            logger.info("Scaler stopped.")

    async def poll_due(self) -> CycleReport:
        """Poll the resources whose interval has passed; return what the cycle did."""
        now = self.monotonic()
        due = [
            target
            for target in self.registry.targets.values()
            if self._progress(target, now).next_poll_seconds <= now
        ]
        return await self.poll(due, now)

    async def poll(self, targets: list[ScaleTarget], now: float) -> CycleReport:
        """Read each broker of `targets` once, then decide and apply for every target."""
        report = CycleReport()
        by_broker: dict[Hashable, list[ScaleTarget]] = {}
        for target in targets:
            by_broker.setdefault(target.broker_key, []).append(target)
            self._progress(target, now).next_poll_seconds = now + target.poll_interval_seconds

        readings = await asyncio.gather(
            *(self._read_broker(group[0]) for group in by_broker.values())
        )
        report.brokers_read = len(readings)
        report.broker_failures = sum(1 for reading in readings if reading is None)

        work = []
        for group, reading in zip(by_broker.values(), readings, strict=True):
            for target in group:
                work.append(self._apply_limited(target, reading, now, report))
        await asyncio.gather(*work)
        return report

    async def _read_broker(self, target: ScaleTarget) -> Mapping[QueueKey, QueueCounts] | None:
        try:
            reading = await asyncio.to_thread(target.reader.read_queue_figures)
        except Exception as error:
            # Any failure counts as a failed read for every queue of this
            # broker: the decision keeps their replica counts.
            self._log_read_failure(target, str(error))
            return None
        failure = self.read_failures.pop(target.broker_key, None)
        if failure is not None:
            logger.info(
                "Reading queue figures from the broker of %s/%s works again after %d failed "
                "reads.",
                target.namespace,
                target.name,
                failure.count,
            )
        return reading

    def _log_read_failure(self, target: ScaleTarget, message: str) -> None:
        """Log the first failed read of a broker and each new error.

        A repeated error is logged again every FAILURE_LOG_INTERVAL_SECONDS.
        """
        now = self.monotonic()
        failure = self.read_failures.get(target.broker_key)
        if failure is None or failure.message != message:
            failure = self.read_failures[target.broker_key] = ReadFailure(message, now)
        failure.count += 1
        if failure.count > 1 and now - failure.logged_seconds < FAILURE_LOG_INTERVAL_SECONDS:
            return
        failure.logged_seconds = now
        logger.warning(
            "Reading queue figures from the broker of %s/%s failed (%d in a row): %s",
            target.namespace,
            target.name,
            failure.count,
            message,
        )

    async def _apply_limited(
        self,
        target: ScaleTarget,
        reading: Mapping[QueueKey, QueueCounts] | None,
        now: float,
        report: CycleReport,
    ) -> None:
        async with self.limit:
            try:
                await self.apply(target, reading, now, report)
            except kopf.TemporaryError as error:
                # The API server failed or conflicted; the next poll retries.
                logger.warning("Scaling %s/%s failed: %s", target.namespace, target.name, error)
            except kopf.PermanentError as error:
                # The API server rejected a write; retrying the same write
                # next poll will show the error again in the log.
                logger.error("Scaling %s/%s failed: %s", target.namespace, target.name, error)

    async def apply(
        self,
        target: ScaleTarget,
        reading: Mapping[QueueKey, QueueCounts] | None,
        now: float,
        report: CycleReport,
    ) -> None:
        """Decide for one resource, scale when needed and write its status."""
        figures = _figures(reading, target.vhost, target.queue)
        dead_letter = None
        if target.dead_letter_queue:
            dead_letter = _figures(reading, target.vhost, target.dead_letter_queue)

        progress = self._progress(target, now)
        replicas = self.registry.deployments.get(target.key)
        if replicas is None:
            # The Deployment is not created, or the watch has not reported
            # it yet: there is nothing to scale, but the figures are news.
            await self._write_status(target, progress, figures, dead_letter, None, now, report)
            return

        if progress.state is None:
            progress.state = ScalingState.starting(now, replicas.spec)
        decision, progress.state = decide(
            target.policy, figures, replicas.spec, progress.state, now
        )
        progress.last_decision = decision
        report.resources_decided += 1
        if decision.changes(replicas.spec):
            await self._scale(target, progress, decision, replicas, figures, now)
            report.scaled += 1
        await self._write_status(target, progress, figures, dead_letter, replicas, now, report)

    async def _scale(
        self,
        target: ScaleTarget,
        progress: ResourceProgress,
        decision: Decision,
        replicas: DeploymentReplicas,
        figures: QueueFigures | None,
        now: float,
    ) -> None:
        before = replicas.spec
        name = deployment_name(target.name)
        stored = await self.kube.scale_deployment(target.namespace, name, decision.desired)
        self.registry.record_scale(target.key, stored, now)
        progress.last_scale_time = _timestamp()
        progress.last_scale_reason = decision.reason
        figures_text = "unknown" if figures is None else figures.describe()
        message = f"Scaled from {before} to {stored}: {decision.reason} ({figures_text})"
        logger.info("%s/%s: %s", target.namespace, target.name, message)
        await self._post_event(target, SCALED_REASON, message)

    async def _post_event(self, target: ScaleTarget, reason: str, message: str) -> None:
        subject = ObjectReference(
            api_version=f"{RESOURCE_GROUP}/{RESOURCE_VERSION}",
            kind=RESOURCE_KIND,
            namespace=target.namespace,
            name=target.name,
            uid=target.uid,
        )
        try:
            await self.kube.post_event(subject, reason, message)
        except (kopf.TemporaryError, kopf.PermanentError) as error:
            # The scale itself went through; a lost Event is logged, not retried.
            logger.warning(
                "Posting the %s Event of %s/%s failed: %s",
                reason,
                target.namespace,
                target.name,
                error,
            )

    async def _write_status(
        self,
        target: ScaleTarget,
        progress: ResourceProgress,
        figures: QueueFigures | None,
        dead_letter: QueueFigures | None,
        replicas: DeploymentReplicas | None,
        now: float,
        report: CycleReport,
    ) -> None:
        status = build_status(progress, figures, dead_letter, replicas)
        stale = now - progress.last_status_write_seconds >= STATUS_REFRESH_SECONDS
        if status == progress.last_status and not stale:
            return
        written = dict(status)
        if figures is not None and figures.usable:
            written["lastPollTime"] = _timestamp()
        await self.kube.patch_resource_status(target.namespace, target.name, written)
        progress.last_status = status
        progress.last_status_write_seconds = now
        report.status_writes += 1

    def _progress(self, target: ScaleTarget, now: float) -> ResourceProgress:
        progress = self.registry.progress.get(target.key)
        if progress is None:
            progress = self.registry.progress[target.key] = ResourceProgress(next_poll_seconds=now)
        return progress

    def _sleep_seconds(self) -> float:
        now = self.monotonic()
        upcoming = [
            progress.next_poll_seconds
            for key, progress in self.registry.progress.items()
            if key in self.registry.targets
        ]
        if len(upcoming) < len(self.registry.targets):
            # A resource has never been polled: poll it soon.
            return MIN_SLEEP_SECONDS
        if not upcoming:
            return MAX_SLEEP_SECONDS
        return min(MAX_SLEEP_SECONDS, max(MIN_SLEEP_SECONDS, min(upcoming) - now))


def build_status(
    progress: ResourceProgress,
    figures: QueueFigures | None,
    dead_letter: QueueFigures | None,
    replicas: DeploymentReplicas | None,
) -> dict[str, Any]:
    """Return the status fields the scaler owns; unknown figures are left out."""
    status = figures_status(figures, dead_letter)

    failures = progress.state.consecutive_failures if progress.state else 0
    replica_status: dict[str, Any] = {"readFailures": failures}
    if replicas is not None:
        replica_status["current"] = replicas.status
        decision = progress.last_decision
        replica_status["desired"] = decision.desired if decision else replicas.spec
    if progress.last_scale_time is not None:
        replica_status["lastScaleTime"] = progress.last_scale_time
        replica_status["lastScaleReason"] = progress.last_scale_reason
    status["replicas"] = replica_status
    return status


def _figures(
    reading: Mapping[QueueKey, QueueCounts] | None, vhost: str, queue: str
) -> QueueFigures | None:
    """Return one queue's figures from a broker reply; None when the read failed.

    A queue missing from the reply gets figures without counts, which the
    decision treats like a reply without count fields.
    """
    if reading is None:
        return None
    counts = reading.get((vhost, queue))
    if counts is None:
        return QueueFigures(ready=None, unacknowledged=None, consumers=None)
    return QueueFigures(
        ready=counts.ready, unacknowledged=counts.unacknowledged, consumers=counts.consumers
    )


def _timestamp() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
