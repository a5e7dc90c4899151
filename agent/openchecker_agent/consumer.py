"""The consumer: threads that take turns at one connection and run tasks.

Guarantees, in the words of AMQP 0-9-1:

- manual acks with `basic_qos(prefetch_count=N)`; up to N handlers run at
  once, each in a thread of its own, while another thread serves the socket
  and heartbeats;
- only the thread that holds the connection calls pika (see `dispatch`);
  a thread that finishes a task while another holds the connection hands
  the result over through `add_callback_threadsafe` on the connection the
  message arrived on. At prefetch 1 the task runs inside pika's delivery
  callback instead, and its thread takes the connection back before it
  returns into pika;
- an ack or nack goes only on the channel the message arrived on, and only
  while that channel is still open. A result for a delivery of a closed
  channel is dropped, because the broker has already requeued the message.
  A delivery tag of another channel would close this one with
  PRECONDITION_FAILED "unknown delivery tag";
- a handler exception or an undecodable body ends in `basic_nack(requeue=False)`,
  so the broker dead-letters the message;
- a consumer cancelled by the broker (queue deleted, node failure) consumes
  again once a passive declare finds the queue;
- a lost connection is reopened with capped exponential backoff and jitter;
  ACCESS_REFUSED and authentication failures stop the consumer instead;
- on stop: `basic_cancel`, let running tasks finish until the drain
  deadline, requeue the rest, close.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions

from .amqp import ACCESS_REFUSED, NOT_FOUND, build_connection_parameters, is_fatal_connection_error
from .backoff import Backoff
from .config import AgentSettings
from .dispatch import Completion, Delivery, Outcome, Session, TaskSlots
from .errors import FatalBrokerError
from .handlers import Handler, HandlerContext, UndecodableMessageError, decode_message
from .metrics import AgentMetrics

logger = logging.getLogger(__name__)

# Maximum time the connection's holder blocks on the socket before it checks
# the stop flag and its timers again. A stop request also wakes it at once.
SOCKET_WAIT_SECONDS = 1.0

# How often the next thread in line checks whether the connection is free.
# A thread that leaves it to run a long task is replaced within this time.
# Until then no thread reads the socket, which delays heartbeats and the
# deliveries from a queue that was empty, so it stays far below a heartbeat interval.
VACANCY_CHECK_SECONDS = 0.05

# How long the connection's holder waits on the socket while a task runs
# inside pika's delivery callback. Until that task's thread takes the
# connection back, pika dispatches no callback, so nothing can end the wait
# earlier. The first wait is short and each next one twice as long, up to
# the maximum: this bounds the delay before the ack of a task that outlasted
# VACANCY_CHECK_SECONDS.
HANDBACK_FIRST_CHECK_SECONDS = 0.005
HANDBACK_CHECK_SECONDS = 0.05

# Errors that end a connection's session; the supervisor decides whether to reconnect.
SESSION_ERRORS = (pika.exceptions.AMQPError, OSError)


class ChannelLostError(Exception):
    """The consumer's channel was closed by the broker while the connection stayed up."""


class Consumer:
    """Consumes one queue until `request_stop` is called or the broker refuses access.

    `run` is meant for a dedicated thread, the supervisor: it opens each
    connection, hands it to prefetch + 1 member threads, and takes it back to
    drain or reconnect. `request_stop` and `is_consuming` may be called from
    any thread.
    """

    def __init__(
        self,
        settings: AgentSettings,
        handler: Handler,
        metrics: AgentMetrics,
        *,
        reconnect_backoff: Backoff | None = None,
        queue_backoff: Backoff | None = None,
        connect: Callable[[], pika.BlockingConnection] | None = None,
    ) -> None:
        self._settings = settings
        self._queue = settings.agent.queue
        self._prefetch_count = settings.agent.prefetch_count
        self._handler = handler
        self._metrics = metrics
        self._parameters = build_connection_parameters(settings.rabbitmq)
        self._connect = connect or self._open_connection
        self._reconnect_backoff = reconnect_backoff or Backoff(1.0, 30.0)
        self._queue_backoff = queue_backoff or Backoff(0.5, 10.0)
        self._stop = threading.Event()
        self._stop_deadline = float("inf")
        self._consuming = threading.Event()
        # Held by the one thread that may call pika at a time.
        self._connection_turn = threading.Lock()
        # Threads waiting for the connection: the next in line waits on
        # `_front`, the others on `_line` for its place; one lock guards both.
        line_lock = threading.Lock()
        self._line = threading.Condition(line_lock)
        self._front = threading.Condition(line_lock)
        self._next_in_line_waiting = False
        self._next_in_line_parked = False
        # How often member threads have released the connection.
        self._departures = 0
        # Set when the supervisor must act: a stop request or a failed session.
        self._attention = threading.Event()
        # Guards the published session and the shutdown flag.
        self._sessions = threading.Condition()
        self._session: Session | None = None
        self._shutting_down = False
        self._members: list[threading.Thread] = []
        self._task_slots = TaskSlots(self._prefetch_count)
        self._connections_opened = 0
        # The in-flight gauge is computed from these counts when metrics are
        # scraped, so no metric lock is taken before an ack. Only the thread
        # holding the connection changes the first two. Other threads also
        # drop results, so the third is changed under a lock.
        self._received = 0
        self._settled = 0
        self._dropped = 0
        self._dropped_lock = threading.Lock()
        # At prefetch 1 a task runs inside pika's delivery callback, so its
        # ack is sent before the callback returns (see _run_in_callback).
        self._tasks_in_callbacks_enabled = self._prefetch_count == 1
        # Tasks running inside a callback; changed only by the connection's holder.
        self._tasks_in_callbacks = 0
        # Threads of such tasks waiting to take the connection back; guarded by `_line`.
        self._handbacks_waiting = 0
        metrics.in_flight.set_function(self._count_in_flight)

    @property
    def parameters(self) -> pika.ConnectionParameters:
        """The pika parameters every connection of this consumer uses."""
        return self._parameters

    @property
    def is_consuming(self) -> bool:
        """True while a consumer is registered with the broker."""
        return self._consuming.is_set()

    def request_stop(self) -> None:
        """Stop taking messages and start the drain; safe from any thread, idempotent."""
        if self._stop.is_set():
            return
        self._stop_deadline = time.monotonic() + self._settings.agent.drain_timeout_s
        self._stop.set()
        self._attention.set()
        self._release_line()
        with self._sessions:
            session = self._session
        if session is not None:
            # The holder then notices the stop and gives the connection back.
            self._wake_holder(session)

    def run(self) -> None:
        """Consume until stopped; reconnect on every error that retrying can fix.

        Raises FatalBrokerError on an authentication failure or ACCESS_REFUSED.
        """
        self._start_members()
        try:
            while not self._stop.is_set():
                try:
                    self._run_connection()
                except (*SESSION_ERRORS, ChannelLostError) as error:
                    if is_fatal_connection_error(error):
                        raise FatalBrokerError(_access_error_message(error)) from error
                    if self._stop.is_set():
                        logger.warning(
                            "Lost the broker connection while stopping (%s); the broker "
                            "requeues every message not acked yet.",
                            _describe(error),
                        )
                        break
                    self._wait_before_reconnect(error)
        finally:
            self._finish_shutdown()

    # The supervisor: one connection's life cycle.

    def _open_connection(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(self._parameters)

    def _start_members(self) -> None:
        # One thread more than the prefetch count: with every prefetched
        # message in a task, one thread is still free to hold the connection.
        self._members = [
            threading.Thread(target=self._member_loop, name=f"agent-worker-{index}", daemon=True)
            for index in range(self._prefetch_count + 1)
        ]
        for thread in self._members:
            thread.start()

    def _run_connection(self) -> None:
        connection = self._connect()
        self._connections_opened += 1
        if self._connections_opened > 1:
            self._metrics.reconnects.inc()
        self._connection_turn.acquire()
        session: Session | None = None
        try:
            session = self._open_session(connection)
            logger.info(
                "Connected to %s:%d, vhost %r, as connection %r.",
                self._settings.rabbitmq.host,
                self._settings.rabbitmq.port,
                self._settings.rabbitmq.vhost,
                self._settings.rabbitmq.connection_name,
            )
            # Released before publishing, so a member thread that finds the
            # session also finds the connection free.
            self._connection_turn.release()
            self._publish(session)
            try:
                while not (self._stop.is_set() or session.closing.is_set()):
                    self._attention.wait()
                    # Both flags are set before the event, so a set that
                    # this clear swallows is seen by the check above.
                    self._attention.clear()
            finally:
                # Taken back once the holder notices the stop or the failure.
                self._connection_turn.acquire()
            session.closing.set()
            self._release_line()
            if session.error is not None:
                raise session.error
            self._drain(session)
        finally:
            self._drop_connection(connection, session)
            self._connection_turn.release()

    def _open_session(self, connection: pika.BlockingConnection) -> Session:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=self._prefetch_count)
        session = Session(connection, channel)
        channel.add_on_cancel_callback(functools.partial(self._on_cancelled_by_broker, session))
        return session

    def _publish(self, session: Session | None) -> None:
        with self._sessions:
            self._session = session
            self._sessions.notify_all()

    def _wait_before_reconnect(self, error: BaseException) -> None:
        delay = self._reconnect_backoff.next_delay()
        logger.warning(
            "Lost the broker connection (%s); reconnecting in %.1f s (attempt %d).",
            _describe(error),
            delay,
            self._reconnect_backoff.attempts,
        )
        self._stop.wait(delay)

    def _drop_connection(
        self, connection: pika.BlockingConnection, session: Session | None
    ) -> None:
        """Close the connection and forget its session; the caller holds the connection."""
        self._consuming.clear()
        self._publish(None)
        if session is not None:
            session.closing.set()
            self._release_line()
            # Deliveries no thread has started are requeued by the broker with
            # the connection, so running them would only duplicate work.
            for delivery in session.abandon_pending():
                del session.unsettled[delivery.delivery_tag]
                self._count_dropped()
                logger.info(
                    "Skipped delivery tag %d of the closed connection before it started; "
                    "the broker redelivers it.",
                    delivery.delivery_tag,
                )
        if connection.is_open:
            try:
                connection.close()
            except SESSION_ERRORS as error:
                # The socket is released either way; a failed close changes nothing.
                logger.debug("Closing the connection failed: %s", _describe(error))
        if session is not None:
            for delivery in session.end():
                self._drop_result(delivery)

    def _drain(self, session: Session) -> None:
        channel = session.channel
        if session.consumer_tag is not None:
            # pika nacks with requeue the deliveries it has buffered but not
            # yet handed to _on_message, so none of them is lost.
            channel.basic_cancel(session.consumer_tag)
            session.consumer_tag = None
        self._consuming.clear()
        for delivery in session.abandon_pending():
            self._settle(session, delivery, Outcome.REQUEUE)
        running = session.running_count()
        if running:
            logger.info(
                "Stopping: waiting up to %.0f s for %d running task(s).",
                max(0.0, self._stop_deadline - time.monotonic()),
                running,
            )
        while True:
            self._settle_batch(session, session.take_results())
            remaining = self._stop_deadline - time.monotonic()
            if not session.busy_count() or remaining <= 0:
                break
            self._check_channel(session)
            wait_seconds = min(SOCKET_WAIT_SECONDS, remaining)
            if self._tasks_in_callbacks:
                # Only the time limit ends this wait (see HANDBACK_CHECK_SECONDS).
                wait_seconds = min(wait_seconds, HANDBACK_CHECK_SECONDS)
            session.connection.process_data_events(time_limit=wait_seconds)
        for delivery in session.abandon_running():
            logger.warning(
                "Requeued delivery tag %d: its task did not finish within the drain "
                "timeout of %.0f s.",
                delivery.delivery_tag,
                self._settings.agent.drain_timeout_s,
            )
            self._settle(session, delivery, Outcome.REQUEUE)
        channel.close()
        session.connection.close()
        logger.info("Stopped consuming and closed the connection.")

    def _finish_shutdown(self) -> None:
        self._consuming.clear()
        with self._sessions:
            self._shutting_down = True
            self._sessions.notify_all()
        if self._stop.is_set():
            # No connection is left to settle on, but a running task may still
            # finish its side effects (a callback) before the process exits.
            for thread in self._members:
                thread.join(max(0.0, self._stop_deadline - time.monotonic()))

    # The member threads: turns at the connection, and tasks.

    def _member_loop(self) -> None:
        session: Session | None = None
        while (session := self._next_session(session)) is not None:
            try:
                self._take_turns(session)
            except Exception as error:
                # A defect, not a broker error: end the session so the
                # supervisor reports it instead of the thread dying silently.
                logger.exception("A consumer thread failed.")
                self._fail(session, error)

    def _next_session(self, previous: Session | None) -> Session | None:
        """Wait for a session this thread has not left yet; None once shutting down."""
        with self._sessions:
            while not self._shutting_down:
                session = self._session
                if session is not None and session is not previous:
                    return session
                self._sessions.wait()
            return None

    def _take_turns(self, session: Session) -> None:
        holding = False
        finished: list[Delivery] = []
        while True:
            if not holding and not self._wait_for_turn(session):
                return
            holding = False
            try:
                delivery = self._lead(session, finished)
            finally:
                self._leave_connection(session)
            finished = []
            if delivery is None:
                if self._stop.is_set() or session.closing.is_set():
                    return
                # The connection went back to a task that ran inside a
                # callback; this thread waits for its next turn.
                continue
            try:
                outcome, seconds = self._execute(delivery)
            finally:
                self._task_slots.give_back()
            holding, finished = self._report(session, delivery, outcome, seconds)

    def _wait_for_turn(self, session: Session) -> bool:
        """Wait until this thread holds the connection; False once the session is closing.

        One thread, the next in line, checks every VACANCY_CHECK_SECONDS
        whether the connection is free; the others wait for its place.
        Leaving the connection to run a task wakes no thread: a short task ends
        before the next check, and its thread takes the connection straight
        back. (Waking a thread at each departure would cost each message a
        futex wake-up and, once that thread runs, time on the GIL.)

        When the holder has not left the connection since the last check,
        the queue is quiet: the next in line stops checking (it parks) until
        a thread leaves the connection, so an idle agent wakes no thread.

        A task that runs inside a callback is taken over only once it has
        run through a whole check. Most such tasks are short, and a thread
        that took over would keep the task's thread waiting to return into
        pika (see HANDBACK_CHECK_SECONDS).
        """
        with self._line:
            while self._next_in_line_waiting:
                if self._stop.is_set() or session.closing.is_set():
                    return False
                self._line.wait()
            self._next_in_line_waiting = True
            try:
                departures_seen = self._departures
                park = False
                # True once no thread has left the connection since the
                # previous check, so a free connection has been free as long.
                vacancy_checked = False
                while not (self._stop.is_set() or session.closing.is_set()):
                    if (vacancy_checked or not self._tasks_in_callbacks) and self._try_take_turn():
                        return True
                    if park:
                        self._next_in_line_parked = True
                        # Looked at again after announcing the park, because
                        # a thread leaving the connection reads the flag
                        # without the lock (see _leave_connection). A thread
                        # that left for a task inside a callback counts that
                        # task before it leaves: such a vacancy is fresh, so
                        # it is neither taken nor parked on.
                        if self._tasks_in_callbacks:
                            self._next_in_line_parked = False
                            self._front.wait(VACANCY_CHECK_SECONDS)
                        elif self._try_take_turn():
                            self._next_in_line_parked = False
                            return True
                        else:
                            self._front.wait()
                            self._next_in_line_parked = False
                    else:
                        self._front.wait(VACANCY_CHECK_SECONDS)
                    park = self._departures == departures_seen
                    vacancy_checked = park
                    departures_seen = self._departures
                return False
            finally:
                self._next_in_line_waiting = False
                self._line.notify()

    def _try_take_turn(self) -> bool:
        """Take the connection if it is free and no task waits to take it back.

        The caller holds `_line`.
        """
        if self._handbacks_waiting:
            return False
        return self._connection_turn.acquire(blocking=False)

    def _leave_connection(self, session: Session) -> None:
        """Release the connection; wake the next in line if it parked or work waits.

        Every release of a member thread goes through here, so a parked
        thread never sleeps while the connection is free. The flags are read
        without the lock, which takes it off each message's path. That is
        safe because the GIL runs these steps in order: the next in line sets
        `_next_in_line_parked` and then tries the connection once more before
        it waits, and this thread releases the connection and then reads the
        flag. So either that last try succeeds, or this read finds the flag
        set, and the notify below, which waits for the lock, reaches it.
        """
        self._connection_turn.release()
        # Without the lock, two threads leaving at once may count one
        # departure. The next in line uses the count only to see whether any
        # thread left.
        self._departures += 1
        if self._next_in_line_parked or session.has_pending():
            # Parked, it would not look again; and a delivery waiting to
            # start should start in parallel with this thread's task.
            with self._line:
                self._front.notify()

    def _lead(self, session: Session, finished: list[Delivery]) -> Delivery | None:
        """Serve the connection until a delivery is ready to run; None when the session ends.

        The caller holds the connection. It first settles `finished`, the
        results it took with the connection. Other results are settled only
        when no delivery waits to start, that is right before waiting on the
        socket: the acks of a batch of short tasks then fold into one.
        """
        handback_check = HANDBACK_FIRST_CHECK_SECONDS
        try:
            self._settle_batch(session, finished)
            while True:
                if self._stop.is_set() or session.closing.is_set():
                    return None
                if self._handbacks_waiting:
                    # A task that ran inside a callback waits to take the
                    # connection back, and returns from pika with it.
                    return None
                # has_pending is exact here, so an empty session costs no lock.
                if session.has_pending():
                    delivery = session.start_next(self._task_slots)
                    if delivery is not None:
                        return delivery
                if session.has_results():
                    self._settle_batch(session, session.take_results())
                self._check_channel(session)
                wait_seconds = self._ensure_consuming(session)
                if self._tasks_in_callbacks:
                    wait_seconds = min(wait_seconds, handback_check)
                    handback_check = min(2 * handback_check, HANDBACK_CHECK_SECONDS)
                session.connection.process_data_events(time_limit=wait_seconds)
        except (*SESSION_ERRORS, ChannelLostError, FatalBrokerError) as error:
            self._fail(session, error)
            return None

    def _report(
        self, session: Session, delivery: Delivery, outcome: Outcome, seconds: float | None
    ) -> tuple[bool, list[Delivery]]:
        """Hand a finished task's outcome to the connection.

        Returns whether the caller now holds the connection, and if it does,
        the results it settles before anything else.
        """
        if self._connection_turn.acquire(blocking=False):
            # The connection is free: this thread settles the result itself.
            completion, results = session.complete_holding(delivery, outcome, seconds)
            if completion is Completion.RECORDED:
                return True, results
            self._leave_connection(session)
        else:
            completion = session.complete(delivery, outcome, seconds)
            if completion is Completion.RECORDED:
                self._wake_to_settle(session)
                return False, []
        self._forget_result(delivery, completion, seconds)
        return False, []

    def _forget_result(
        self, delivery: Delivery, completion: Completion, seconds: float | None
    ) -> None:
        """Account for a result that is never settled.

        Its message was requeued at shutdown, or its connection has closed.
        """
        if completion is Completion.ABANDONED:
            self._observe_run_time(seconds)
        else:
            self._drop_result(delivery)
        # The task's slot is free: the current connection may have a
        # delivery that waits for one.
        with self._sessions:
            current = self._session
        if current is not None and current.has_pending():
            self._wake_holder(current)

    def _wake_to_settle(self, session: Session) -> None:
        """Make the connection's holder settle the recorded results, unless a wake-up is due."""
        if session.claim_wake():
            # ConnectionWrongStateError: the connection has closed, and the
            # supervisor drops the result when it ends the session.
            with contextlib.suppress(pika.exceptions.ConnectionWrongStateError):
                session.connection.add_callback_threadsafe(
                    functools.partial(self._on_woken, session)
                )

    @staticmethod
    def _wake_holder(session: Session) -> None:
        """End the wait on the socket of whichever thread holds the session's connection."""
        # ConnectionWrongStateError: the connection has closed, and no thread waits on it.
        with contextlib.suppress(pika.exceptions.ConnectionWrongStateError):
            session.connection.add_callback_threadsafe(_do_nothing)

    def _fail(self, session: Session, error: BaseException) -> None:
        if session.error is None:
            session.error = error
        session.closing.set()
        self._consuming.clear()
        self._attention.set()
        self._release_line()

    def _release_line(self) -> None:
        """Let the threads waiting for a place in line see a stop or a closing session."""
        with self._line:
            self._line.notify_all()
            self._front.notify_all()

    def _check_channel(self, session: Session) -> None:
        # NOTE: RabbitMQ 3.10 has only the node-wide consumer_timeout (30 min
        # by default); a task that keeps its delivery unacked longer gets the channel
        # closed with PRECONDITION_FAILED, lands here, and is redelivered
        # after the reconnect. Per-queue consumer timeouts need RabbitMQ 3.11.15.
        if session.channel.is_open:
            return
        # NOTE: BlockingChannel exposes the close reason only as a private
        # attribute; it is read for the log message alone.
        reason = getattr(session.channel, "_closing_reason", None)
        raise ChannelLostError(f"the channel was closed: {reason}")

    def _ensure_consuming(self, session: Session) -> float:
        """Register the consumer when due; return how long to wait on the socket."""
        if session.consumer_tag is not None:
            return SOCKET_WAIT_SECONDS
        now = time.monotonic()
        if now >= session.next_consume_attempt:
            if self._start_consuming(session):
                self._reconnect_backoff.reset()
                self._queue_backoff.reset()
                return SOCKET_WAIT_SECONDS
            delay = self._queue_backoff.next_delay()
            session.next_consume_attempt = now + delay
            logger.warning(
                "Queue %r was not found in vhost %r; checking again in %.1f s.",
                self._queue,
                self._settings.rabbitmq.vhost,
                delay,
            )
        return max(0.0, min(SOCKET_WAIT_SECONDS, session.next_consume_attempt - now))

    def _start_consuming(self, session: Session) -> bool:
        if not self._queue_exists(session.connection):
            return False
        session.consumer_tag = session.channel.basic_consume(
            queue=self._queue,
            on_message_callback=functools.partial(self._on_message, session),
            auto_ack=False,
        )
        self._consuming.set()
        logger.info(
            "Consuming from queue %r with prefetch %d (consumer tag %s).",
            self._queue,
            self._prefetch_count,
            session.consumer_tag,
        )
        return True

    def _queue_exists(self, connection: pika.BlockingConnection) -> bool:
        # A passive declare of a missing queue closes its channel with 404, so
        # it runs on a short-lived channel of its own: the consumer's channel,
        # and the acks still owed on it, stay intact.
        probe = connection.channel()
        try:
            probe.queue_declare(queue=self._queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as error:
            # The broker closed only the probe channel, and its reply code gives the reason.
            if error.reply_code == NOT_FOUND:
                return False
            if error.reply_code == ACCESS_REFUSED:
                raise FatalBrokerError(_access_error_message(error)) from error
            raise
        probe.close()
        return True

    # Callbacks, run by the connection's holder inside process_data_events.

    def _on_message(
        self,
        session: Session,
        channel: Any,
        method: pika.spec.Basic.Deliver,
        properties: pika.spec.BasicProperties,
        body: bytes,
    ) -> None:
        # Positional arguments, because keyword arguments cost measurably
        # before the ack.
        delivery = Delivery(
            channel, method.delivery_tag, bool(method.redelivered), body, properties.message_id
        )
        self._received += 1
        if (
            self._tasks_in_callbacks_enabled
            and not session.has_pending()
            and not (self._stop.is_set() or session.closing.is_set())
            and self._task_slots.try_take()
        ):
            session.start_in_callback(delivery)
            self._run_in_callback(session, delivery)
        else:
            session.receive(delivery)

    def _run_in_callback(self, session: Session, delivery: Delivery) -> None:
        """Run a task inside pika's delivery callback and settle it before returning.

        At prefetch 1 the broker sends the next message only after the ack,
        and returning out of pika's dispatch before the ack cost about 0.05
        of the throughput ratio to a bare pika consumer that acks inside its
        callback (bench/agent_throughput.py). So the thread that receives a
        message runs it right here and acks it before pika's dispatch goes on.

        The thread leaves the connection for the task, so that the next in
        line can serve the socket and heartbeats if the task is long. pika
        dispatches no callback while this one runs, whichever thread calls
        it: only I/O is served. That is why this runs only at prefetch 1,
        where no other delivery can arrive meanwhile. Before returning into
        pika the thread takes the connection back, waiting for it if needed.
        """
        # NOTE: a consumer cancel sent by the broker during the task is
        # dispatched only after this callback returns, so until the task ends
        # is_consuming (and /readyz) still reports a consumer.
        self._tasks_in_callbacks += 1
        self._leave_connection(session)
        # The outcome if _execute fails with a defect of the agent itself.
        outcome: Outcome = Outcome.REJECT
        seconds: float | None = None
        try:
            outcome, seconds = self._execute(delivery)
        finally:
            self._task_slots.give_back()
            completion, results = self._take_connection_back(session, delivery, outcome, seconds)
            self._tasks_in_callbacks -= 1
        if completion is Completion.RECORDED:
            self._settle_batch(session, results)
        else:
            self._forget_result(delivery, completion, seconds)

    def _take_connection_back(
        self, session: Session, delivery: Delivery, outcome: Outcome, seconds: float | None
    ) -> tuple[Completion, list[Delivery]]:
        """Hold the connection again after a task run inside a callback, and record its result.

        Returns the completion and, when it is recorded, the results to settle now.
        """
        if self._connection_turn.acquire(blocking=False):
            return session.complete_holding(delivery, outcome, seconds)
        # Another thread serves the connection, or the supervisor drains or
        # closes it. The result is recorded first, so that thread may settle
        # it. A holder in _lead gives the connection back once it finds this
        # thread waiting; the supervisor releases it when it is done.
        completion = session.complete(delivery, outcome, seconds)
        with self._line:
            self._handbacks_waiting += 1
        try:
            self._connection_turn.acquire()
        finally:
            with self._line:
                self._handbacks_waiting -= 1
        if completion is not Completion.RECORDED:
            return completion, []
        return completion, session.take_results()

    def _on_cancelled_by_broker(self, session: Session, method_frame: Any) -> None:
        logger.warning(
            "The broker cancelled consumer %s of queue %r, as it does when the queue is "
            "deleted or its node fails; consuming again once the queue exists.",
            method_frame.method.consumer_tag,
            self._queue,
        )
        session.consumer_tag = None
        self._consuming.clear()

    def _on_woken(self, session: Session) -> None:
        self._settle_batch(session, session.take_results_when_woken())

    # Settlement, by the connection's holder.

    def _settle_batch(self, session: Session, results: list[Delivery]) -> None:
        """Settle finished deliveries, folding in-order acks into one `multiple` ack.

        An ack with multiple=True for tag T acknowledges every unsettled
        delivery up to T on the channel, so it is used only for tags below
        the lowest delivery that is still pending, running or not acked.
        """
        if len(results) < 2:
            for delivery in results:
                self._settle(session, delivery, delivery.outcome or Outcome.REJECT)
            return
        acks: list[Delivery] = []
        for delivery in results:
            outcome = delivery.outcome or Outcome.REJECT
            if outcome is Outcome.ACK and self._is_current(session, delivery):
                acks.append(delivery)
            else:
                self._settle(session, delivery, outcome)
        if len(acks) < 2:
            for delivery in acks:
                self._settle(session, delivery, Outcome.ACK)
            return
        acked_tags = {delivery.delivery_tag for delivery in acks}
        lowest_open = min(
            (tag for tag in session.unsettled if tag not in acked_tags), default=None
        )
        folded = [d for d in acks if lowest_open is None or d.delivery_tag < lowest_open]
        if len(folded) < 2:
            folded = []
        for delivery in acks:
            if delivery not in folded:
                self._settle(session, delivery, Outcome.ACK)
        if folded:
            highest = max(delivery.delivery_tag for delivery in folded)
            session.channel.basic_ack(delivery_tag=highest, multiple=True)
            for delivery in folded:
                del session.unsettled[delivery.delivery_tag]
                self._observe_run_time(delivery.seconds)
            self._settled += len(folded)
            self._metrics.processed.inc(len(folded))

    @staticmethod
    def _is_current(session: Session, delivery: Delivery) -> bool:
        return delivery.channel is session.channel and bool(delivery.channel.is_open)

    def _settle(self, session: Session, delivery: Delivery, outcome: Outcome) -> None:
        """Ack or nack one delivery of the session's channel, or drop it if the channel closed.

        The delivery leaves `session.unsettled` only once the ack or nack is
        sent: if sending fails, the session's end finds and drops it.
        """
        if not self._is_current(session, delivery):
            del session.unsettled[delivery.delivery_tag]
            self._drop_result(delivery, outcome)
            return
        channel = delivery.channel
        tag = delivery.delivery_tag
        # The metrics are counted after the ack or nack is sent, because at
        # prefetch 1 the broker sends the next message only after it.
        if outcome is Outcome.ACK:
            channel.basic_ack(delivery_tag=tag)
            self._metrics.processed.inc()
        elif outcome is Outcome.REJECT:
            channel.basic_nack(delivery_tag=tag, requeue=False)
            self._metrics.dead_lettered.inc()
        else:
            channel.basic_nack(delivery_tag=tag, requeue=True)
            self._metrics.requeued.inc()
        del session.unsettled[tag]
        self._settled += 1
        self._observe_run_time(delivery.seconds)

    def _observe_run_time(self, seconds: float | None) -> None:
        # None: the handler never ran (an undecodable body, or a delivery
        # requeued before it started).
        if seconds is not None:
            self._metrics.processing_seconds.observe(seconds)

    def _count_in_flight(self) -> int:
        with self._dropped_lock:
            return self._received - self._settled - self._dropped

    def _count_dropped(self) -> None:
        with self._dropped_lock:
            self._dropped += 1

    def _drop_result(self, delivery: Delivery, outcome: Outcome | None = None) -> None:
        """Drop the result of a delivery whose channel has closed; the broker requeued it."""
        self._count_dropped()
        self._metrics.stale_settlements.inc()
        self._observe_run_time(delivery.seconds)
        logger.warning(
            "Dropped the %s of delivery tag %d: the channel it arrived on is closed, "
            "so the broker redelivers the message.",
            (outcome or delivery.outcome or Outcome.REJECT).value,
            delivery.delivery_tag,
        )

    # Tasks.

    def _execute(self, delivery: Delivery) -> tuple[Outcome, float | None]:
        """Run the handler; return the outcome and the handler's run time, None if it never ran."""
        try:
            message = decode_message(delivery.body)
        except UndecodableMessageError as error:
            logger.error(
                "Rejected delivery tag %d (message id %s), so the broker dead-letters it: %s.",
                delivery.delivery_tag,
                delivery.message_id,
                error,
            )
            self._metrics.failed.inc()
            return Outcome.REJECT, None
        # Positional arguments, in field order, for the same reason as in _on_message.
        context = HandlerContext(
            self._settings, delivery.delivery_tag, delivery.redelivered, delivery.message_id
        )
        started = time.monotonic()
        try:
            self._handler(message, context)
        except BaseException:
            # Any handler failure fails the task: the broker dead-letters it.
            # That includes SystemExit from a handler calling sys.exit(),
            # which would otherwise end this thread with the delivery unsettled.
            logger.exception(
                "Handler failed on delivery tag %d (message id %s); rejecting it so the "
                "broker dead-letters it.",
                delivery.delivery_tag,
                delivery.message_id,
            )
            self._metrics.failed.inc()
            return Outcome.REJECT, time.monotonic() - started
        return Outcome.ACK, time.monotonic() - started


def _describe(error: BaseException) -> str:
    text = str(error)
    if not text:
        # pika's connection errors print as an empty string and keep their
        # cause, such as a refused TCP connection, as the first argument
        # (AMQPConnectionError) or in `exception` (the connection workflow's errors).
        cause = getattr(error, "exception", None)
        if cause is None and error.args:
            cause = error.args[0]
        if isinstance(cause, BaseException):
            return _describe(cause)
    return f"{type(error).__name__}: {text}"


def _access_error_message(error: BaseException) -> str:
    return (
        f"The broker refused access ({_describe(error)}); check the username, password "
        "and the user's permissions on the vhost and queue."
    )


def _do_nothing() -> None:
    """A callback whose only effect is to end the connection holder's wait on the socket."""
