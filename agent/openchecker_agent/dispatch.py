"""Hand deliveries to a fixed pool of worker threads and hand results back.

The connection's thread (the I/O thread) owns pika: only it may send acks.
Workers run handlers and append finished deliveries to a completion queue.
The I/O thread waits in one of two ways, and a worker wakes it the cheap way
for each:

- on the socket, inside `process_data_events`, while it expects more
  deliveries: a worker wakes it with `add_callback_threadsafe`, at most once
  until the I/O thread has run that callback (later results ride along);
- on the result queue, while every prefetch slot is taken and the broker
  sends nothing but heartbeats: a worker wakes it by putting the result,
  which costs far less than a write to pika's wake-up pipe plus a trip
  through its loop.

Both hand-offs use `queue.SimpleQueue`, whose blocking get and put are
implemented in C: at prefetch 1 every message crosses two threads, so each
hand-off's cost shows up directly in the throughput.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


class Outcome(enum.Enum):
    """The settlement of a finished delivery with the broker."""

    ACK = "ack"
    # basic.nack with requeue=False: the broker dead-letters the message.
    REJECT = "reject"
    # basic.nack with requeue=True: the message goes back to the queue.
    REQUEUE = "requeue"


class DeliveryState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    # Returned to the broker (requeued) at shutdown; a late result is dropped.
    ABANDONED = "abandoned"


@dataclass(eq=False, slots=True)
class Delivery:
    """One message received on one channel, from its arrival to its ack or nack."""

    channel: Any  # pika BlockingChannel; acks for it go on this channel only
    delivery_tag: int
    redelivered: bool
    body: bytes
    message_id: str | None = None
    state: DeliveryState = DeliveryState.QUEUED
    outcome: Outcome | None = None


# Put on the work queue once per worker to make it exit.
_STOP_WORKER = None
# How often wait_idle checks whether the last running task has finished.
IDLE_POLL_SECONDS = 0.05


class WorkerPool:
    """A fixed number of worker threads that run `execute` on each delivery.

    `wake_io` is called from a worker, outside the pool's lock, when the I/O
    thread is waiting on the socket and must be woken to settle a result.
    """

    def __init__(
        self,
        size: int,
        execute: Callable[[Delivery], Outcome],
        wake_io: Callable[[], None],
    ) -> None:
        self._execute = execute
        self._wake_io = wake_io
        # Guards the delivery states, the two sets and the wake-up flags.
        self._lock = threading.Lock()
        self._work: queue.SimpleQueue[Delivery | None] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[Delivery | None] = queue.SimpleQueue()
        self._queued: set[Delivery] = set()
        self._running: set[Delivery] = set()
        self._io_waits_on_socket = False
        self._wake_pending = False
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work_loop, name=f"agent-worker-{index}", daemon=True)
            for index in range(size)
        ]
        for thread in self._threads:
            thread.start()

    # Worker side.

    def _work_loop(self) -> None:
        while True:
            delivery = self._work.get()
            if delivery is _STOP_WORKER:
                return
            with self._lock:
                self._queued.discard(delivery)
                if delivery.state is DeliveryState.ABANDONED:
                    continue
                delivery.state = DeliveryState.RUNNING
                self._running.add(delivery)
            outcome = self._execute(delivery)
            self._finish(delivery, outcome)

    def _finish(self, delivery: Delivery, outcome: Outcome) -> None:
        with self._lock:
            self._running.discard(delivery)
            if delivery.state is DeliveryState.ABANDONED:
                # Already requeued at shutdown: the broker owns the message again.
                return
            delivery.state = DeliveryState.DONE
            delivery.outcome = outcome
            # Put under the lock, so begin_socket_wait either finds the result
            # or has set the flag that makes this worker wake the I/O thread.
            self._results.put(delivery)
            wake = self._io_waits_on_socket and not self._wake_pending
            if wake:
                self._wake_pending = True
        if wake:
            self._wake_io()

    # I/O thread side.

    def submit(self, delivery: Delivery) -> None:
        """Queue a delivery for the next free worker."""
        with self._lock:
            self._queued.add(delivery)
        self._work.put(delivery)

    def take_completed(self) -> list[Delivery]:
        """Remove and return the deliveries whose handler has finished."""
        completed: list[Delivery] = []
        while True:
            try:
                delivery = self._results.get_nowait()
            except queue.Empty:
                # Nothing more has finished.
                return completed
            if delivery is not None:
                completed.append(delivery)

    def begin_socket_wait(self) -> bool:
        """Mark the I/O thread as about to block on the socket.

        Returns False, without marking, when results are already waiting: the
        caller settles them first instead of blocking.
        """
        with self._lock:
            if not self._results.empty():
                return False
            self._io_waits_on_socket = True
            return True

    def end_socket_wait(self) -> None:
        with self._lock:
            self._io_waits_on_socket = False

    def on_woken(self) -> None:
        """Record that the wake-up callback ran, so the next result schedules a new one."""
        with self._lock:
            self._wake_pending = False

    def reset_wakeups(self) -> None:
        """Forget a wake-up scheduled on a connection that no longer exists."""
        with self._lock:
            self._wake_pending = False
            self._io_waits_on_socket = False

    def wait_for_results(self, timeout_seconds: float) -> list[Delivery]:
        """Block until a result is waiting or the timeout passes; return the results.

        Returns an empty list on timeout or when `interrupt` ended the wait.
        """
        try:
            first = self._results.get(timeout=timeout_seconds)
        except queue.Empty:
            # Timed out: the caller serves the socket and waits again.
            return []
        rest = self.take_completed()
        return rest if first is None else [first, *rest]

    def interrupt(self) -> None:
        """Wake the I/O thread from `wait_for_result`, for example to stop."""
        self._results.put(None)

    def abandon_queued(self) -> list[Delivery]:
        """Mark the deliveries no worker has started as abandoned and return them."""
        with self._lock:
            abandoned = list(self._queued)
            for delivery in abandoned:
                delivery.state = DeliveryState.ABANDONED
            self._queued.clear()
            return abandoned

    def abandon_running(self) -> list[Delivery]:
        """Mark the deliveries still in a handler as abandoned and return them.

        Their handlers keep running (a thread cannot be stopped), but their
        results are dropped.
        """
        with self._lock:
            abandoned = list(self._running)
            for delivery in abandoned:
                delivery.state = DeliveryState.ABANDONED
            self._running.clear()
            return abandoned

    def busy_count(self) -> int:
        """Return the number of deliveries queued or running."""
        with self._lock:
            return len(self._queued) + len(self._running)

    def wait_idle(self, timeout_seconds: float) -> bool:
        """Wait until no delivery is queued or running; return True if that happened."""
        deadline = time.monotonic() + timeout_seconds
        while self.busy_count():
            if time.monotonic() >= deadline:
                return False
            time.sleep(IDLE_POLL_SECONDS)
        return True

    def close(self) -> None:
        """Let the workers exit once the queue is empty; running handlers finish on their own."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for _ in self._threads:
            self._work.put(_STOP_WORKER)
