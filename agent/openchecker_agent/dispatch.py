"""Deliveries, and the state the consumer's threads share about one connection.

The consumer's threads take turns at the connection (the leader/followers
pattern). One thread at a time holds it: only that thread calls pika, serves
the socket and heartbeats, and sends acks. The others run tasks or wait for
a turn. The thread that receives a delivery leaves the connection and runs
the task itself, so a delivery never waits for another thread to wake up.
When the task ends, its thread takes the connection back if it is still
free and settles the delivery; otherwise it leaves the result here and
wakes the holder with `add_callback_threadsafe` on the delivery's own
connection.

At prefetch 1 the broker sends the next message only after the ack, so any
thread hand-off adds directly to each message's round trip: waking a
sleeping thread on another core costs about a fifth of a bare pika message
here. With turns, a short task costs no wake-up at all. At prefetch 1 the
task even runs inside pika's delivery callback (see
`Consumer._run_in_callback`).
"""

from __future__ import annotations

import enum
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any


class Outcome(enum.Enum):
    """The settlement of a finished delivery with the broker."""

    ACK = "ack"
    # basic.nack with requeue=False: the broker dead-letters the message.
    REJECT = "reject"
    # basic.nack with requeue=True: the message goes back to the queue.
    REQUEUE = "requeue"


class DeliveryState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    # Returned to the broker (requeued) at shutdown; a late result is dropped.
    ABANDONED = "abandoned"


class Completion(enum.Enum):
    """A finished task's result: recorded for settlement, or dropped and why."""

    # Waiting in the session's results for the connection's holder to settle.
    RECORDED = "recorded"
    # Requeued at shutdown before the task ended; the result is dropped.
    ABANDONED = "abandoned"
    # The connection closed before the task ended; the broker requeued the message.
    SESSION_ENDED = "session-ended"


@dataclass(eq=False, slots=True)
class Delivery:
    """One message received on one channel, from its arrival to its ack or nack."""

    channel: Any  # pika BlockingChannel; acks for it go on this channel only
    delivery_tag: int
    redelivered: bool
    body: bytes
    message_id: str | None = None
    state: DeliveryState = DeliveryState.PENDING
    outcome: Outcome | None = None
    # How long the handler ran; set when its result is recorded.
    seconds: float | None = None


class TaskSlots:
    """The number of tasks that may run at once, across all connections.

    The limit is the prefetch count. Tasks of a lost connection keep running
    beside the deliveries of the next one, and hold their slots until they
    end: so at most the prefetch count of the agent's threads are in tasks,
    and one is always free to serve the connection and its heartbeats.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        # One token per free slot. A deque's append and pop are atomic, so
        # taking and giving back a slot needs no lock.
        self._free: deque[None] = deque([None] * limit)

    def try_take(self) -> bool:
        try:
            self._free.pop()
        except IndexError:
            return False
        return True

    def give_back(self) -> None:
        self._free.append(None)

    @property
    def in_use(self) -> int:
        return self._limit - len(self._free)


class Session:
    """What the threads share about one open connection and its channel.

    `connection`, `channel`, `consumer_tag`, `next_consume_attempt`,
    `unsettled` and the pending deliveries belong to whichever thread holds
    the connection, so the methods that take no lock are for that thread
    alone. The results and each delivery's state after it starts are
    guarded by a lock, because a thread that finishes a task changes them
    without holding the connection.
    """

    def __init__(self, connection: Any, channel: Any) -> None:
        self.connection = connection
        self.channel = channel
        self.consumer_tag: str | None = None
        self.next_consume_attempt = 0.0
        # Deliveries of this channel not yet acked or nacked, by delivery
        # tag: pending, running, and finished but not settled.
        self.unsettled: dict[int, Delivery] = {}
        # Set when the threads must stop using the connection: the consumer
        # is stopping, or a pika call failed (then `error` records the failure).
        self.closing = threading.Event()
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._pending: deque[Delivery] = deque()
        self._results: list[Delivery] = []
        self._wake_scheduled = False
        self._ended = False

    def receive(self, delivery: Delivery) -> None:
        """Record a delivery that no thread has started yet; the caller holds the connection."""
        self.unsettled[delivery.delivery_tag] = delivery
        self._pending.append(delivery)

    def start_in_callback(self, delivery: Delivery) -> None:
        """Record a delivery that the caller starts now; it holds the connection and a slot."""
        self.unsettled[delivery.delivery_tag] = delivery
        delivery.state = DeliveryState.RUNNING

    def start_next(self, slots: TaskSlots) -> Delivery | None:
        """Take the oldest pending delivery for the calling thread to run.

        The caller holds the connection. Returns None when none is pending
        or no task slot is free; a returned delivery holds a slot, which the
        caller gives back when the task ends.
        """
        if not self._pending or not slots.try_take():
            return None
        delivery = self._pending.popleft()
        # No lock: until this thread runs the task, no other thread looks
        # at the delivery's state.
        delivery.state = DeliveryState.RUNNING
        return delivery

    def has_pending(self) -> bool:
        """Return True if a delivery waits to start, read without the lock.

        Exact for the thread that holds the connection, because only that
        thread adds deliveries; a hint for any other thread.
        """
        return bool(self._pending)

    def has_results(self) -> bool:
        """Return True if a result waits for settlement, read without the lock (a hint)."""
        return bool(self._results)

    def complete(self, delivery: Delivery, outcome: Outcome, seconds: float | None) -> Completion:
        """Record a finished task's outcome and run time; return what the caller does next."""
        with self._lock:
            completion = self._finish(delivery, outcome, seconds)
            if completion is Completion.RECORDED:
                self._results.append(delivery)
            return completion

    def complete_holding(
        self, delivery: Delivery, outcome: Outcome, seconds: float | None
    ) -> tuple[Completion, list[Delivery]]:
        """Record a finished task for a caller that holds the connection.

        When no delivery waits to start, a recorded result is returned at once
        with every other result not yet settled, for the caller to settle.
        Otherwise the list is empty: a recorded result then waits, so that the
        caller starts the waiting deliveries first and their acks fold into one.
        """
        with self._lock:
            completion = self._finish(delivery, outcome, seconds)
            if completion is not Completion.RECORDED:
                return completion, []
            if self._pending:
                self._results.append(delivery)
                return completion, []
            results, self._results = self._results, []
            results.append(delivery)
            return completion, results

    def _finish(self, delivery: Delivery, outcome: Outcome, seconds: float | None) -> Completion:
        if delivery.state is DeliveryState.ABANDONED:
            # Already requeued at shutdown: the broker owns the message again.
            return Completion.ABANDONED
        delivery.state = DeliveryState.DONE
        delivery.outcome = outcome
        delivery.seconds = seconds
        if self._ended:
            return Completion.SESSION_ENDED
        return Completion.RECORDED

    def end(self) -> list[Delivery]:
        """Mark the session over once its connection is closed; return what is left unsettled.

        The caller holds the connection. The returned deliveries are those no
        task runs any more: results not settled yet, and those whose ack or
        nack failed with the connection. A task that completes later gets
        `Completion.SESSION_ENDED`. Nothing can settle any of them now, and
        the broker has requeued their messages.
        """
        with self._lock:
            self._ended = True
            self._results = []
            left = [
                delivery
                for delivery in self.unsettled.values()
                if delivery.state is not DeliveryState.RUNNING
            ]
            self.unsettled.clear()
            return left

    def take_results(self) -> list[Delivery]:
        """Remove and return the finished deliveries not yet settled."""
        with self._lock:
            results, self._results = self._results, []
            return results

    def claim_wake(self) -> bool:
        """Return True if the caller must wake the connection's holder.

        At most one wake-up is outstanding at a time: results that arrive
        before it runs are settled by it.
        """
        with self._lock:
            if self._wake_scheduled:
                return False
            self._wake_scheduled = True
            return True

    def take_results_when_woken(self) -> list[Delivery]:
        """Like `take_results`, run by the wake-up; later results schedule a new one."""
        with self._lock:
            self._wake_scheduled = False
            results, self._results = self._results, []
            return results

    def abandon_pending(self) -> list[Delivery]:
        """Mark the deliveries no thread has started as abandoned and return them.

        The caller holds the connection.
        """
        abandoned = list(self._pending)
        self._pending.clear()
        for delivery in abandoned:
            delivery.state = DeliveryState.ABANDONED
        return abandoned

    def abandon_running(self) -> list[Delivery]:
        """Mark the deliveries still in a handler as abandoned and return them.

        The caller holds the connection. Their handlers keep running (a
        thread cannot be stopped), but their results are dropped.
        """
        with self._lock:
            abandoned = self._running_locked()
            for delivery in abandoned:
                delivery.state = DeliveryState.ABANDONED
                delivery.outcome = Outcome.REQUEUE
            return abandoned

    def busy_count(self) -> int:
        """Return the number of deliveries pending, running or finished but not settled.

        The caller holds the connection.
        """
        return len(self.unsettled)

    def running_count(self) -> int:
        """Return the number of deliveries in a handler; the caller holds the connection."""
        with self._lock:
            return len(self._running_locked())

    def _running_locked(self) -> list[Delivery]:
        return [
            delivery
            for delivery in self.unsettled.values()
            if delivery.state is DeliveryState.RUNNING
        ]
