"""The consumer: one connection thread that serves I/O and settles what workers finish.

Guarantees, in the words of AMQP 0-9-1:

- manual acks with `basic_qos(prefetch_count=N)`; up to N handlers run at once;
- an ack or nack goes only on the channel the message arrived on, and only
  while that channel is still the open, current one. A result for a delivery
  of a closed channel is dropped, because the broker has already requeued
  the message. A delivery tag of another channel would close this one with
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
from .dispatch import Delivery, Outcome, WorkerPool
from .errors import FatalBrokerError
from .handlers import Handler, HandlerContext, UndecodableMessageError, decode_message
from .metrics import AgentMetrics

logger = logging.getLogger(__name__)

# Maximum time the I/O thread blocks on the socket before it checks the stop
# flag and its timers again; a stop request also wakes it at once.
SOCKET_WAIT_SECONDS = 1.0
# While every prefetch slot is taken, the I/O thread waits for a result on a
# condition variable and serves the socket (heartbeats) this often.
RESULT_WAIT_SECONDS = 0.1


class ChannelLostError(Exception):
    """The consumer's channel was closed by the broker while the connection stayed up."""


class Consumer:
    """Consumes one queue until `request_stop` is called or the broker refuses access.

    `run` is meant for a dedicated thread; `request_stop` and `is_consuming`
    may be called from any thread.
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
        self._connection: pika.BlockingConnection | None = None
        self._channel: Any = None
        self._consumer_tag: str | None = None
        # Deliveries of the current channel not yet acked or nacked.
        self._unsettled: dict[int, Delivery] = {}
        self._connections_opened = 0
        self._pool = WorkerPool(self._prefetch_count, self._execute, self._wake_io)

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
        self._pool.interrupt()
        self._wake_io()

    def run(self) -> None:
        """Consume until stopped; reconnect on every error that retrying can fix.

        Raises FatalBrokerError on an authentication failure or ACCESS_REFUSED.
        """
        try:
            while not self._stop.is_set():
                try:
                    self._run_connection()
                except (pika.exceptions.AMQPError, ChannelLostError, OSError) as error:
                    if is_fatal_connection_error(error):
                        raise FatalBrokerError(_access_error_message(error)) from error
                    self._wait_before_reconnect(error)
        finally:
            self._finish_shutdown()

    # Connection life cycle.

    def _open_connection(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(self._parameters)

    def _run_connection(self) -> None:
        connection = self._connect()
        self._connections_opened += 1
        if self._connections_opened > 1:
            self._metrics.reconnects.inc()
        self._connection = connection
        try:
            self._open_channel(connection)
            logger.info(
                "Connected to %s:%d, vhost %r, as connection %r.",
                self._settings.rabbitmq.host,
                self._settings.rabbitmq.port,
                self._settings.rabbitmq.vhost,
                self._settings.rabbitmq.connection_name,
            )
            self._serve(connection)
            if self._stop.is_set():
                self._drain(connection)
        finally:
            self._drop_connection(connection)

    def _open_channel(self, connection: pika.BlockingConnection) -> None:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=self._prefetch_count)
        channel.add_on_cancel_callback(self._on_cancelled_by_broker)
        self._channel = channel
        self._consumer_tag = None
        self._unsettled.clear()

    def _wait_before_reconnect(self, error: BaseException) -> None:
        delay = self._reconnect_backoff.next_delay()
        logger.warning(
            "Lost the broker connection (%s); reconnecting in %.1f s (attempt %d).",
            _describe(error),
            delay,
            self._reconnect_backoff.attempts,
        )
        self._stop.wait(delay)

    def _drop_connection(self, connection: pika.BlockingConnection) -> None:
        self._consuming.clear()
        self._consumer_tag = None
        self._channel = None
        self._connection = None
        self._unsettled.clear()
        self._pool.reset_wakeups()
        # Deliveries no worker has started are requeued by the broker with
        # the connection, so running them would only duplicate work.
        for delivery in self._pool.abandon_queued():
            self._metrics.in_flight.dec()
            logger.info(
                "Skipped delivery tag %d of the closed connection before it started; "
                "the broker redelivers it.",
                delivery.delivery_tag,
            )
        if connection.is_open:
            try:
                connection.close()
            except (pika.exceptions.AMQPError, OSError) as error:
                # The socket is released either way; a failed close changes nothing.
                logger.debug("Closing the connection failed: %s", _describe(error))

    # Serving one connection.

    def _serve(self, connection: pika.BlockingConnection) -> None:
        next_consume_attempt = 0.0
        while not self._stop.is_set():
            self._check_channel()
            now = time.monotonic()
            if self._consumer_tag is None and now >= next_consume_attempt:
                if self._start_consuming(connection):
                    self._reconnect_backoff.reset()
                    self._queue_backoff.reset()
                else:
                    delay = self._queue_backoff.next_delay()
                    next_consume_attempt = now + delay
                    logger.warning(
                        "Queue %r was not found in vhost %r; checking again in %.1f s.",
                        self._queue,
                        self._settings.rabbitmq.vhost,
                        delay,
                    )
            wait_seconds = SOCKET_WAIT_SECONDS
            if self._consumer_tag is None:
                wait_seconds = max(0.0, min(wait_seconds, next_consume_attempt - now))
            self._pump(connection, wait_seconds)

    def _check_channel(self) -> None:
        # NOTE: RabbitMQ 3.10 has only the node-wide consumer_timeout (30 min
        # by default); a task that keeps its delivery unacked longer gets the channel
        # closed with PRECONDITION_FAILED, lands here, and is redelivered
        # after the reconnect. Per-queue consumer timeouts need RabbitMQ 3.11.15.
        if self._channel is not None and self._channel.is_open:
            return
        # NOTE: BlockingChannel exposes the close reason only as a private
        # attribute; it is read for the log message alone.
        reason = getattr(self._channel, "_closing_reason", None)
        raise ChannelLostError(f"the channel was closed: {reason}")

    def _start_consuming(self, connection: pika.BlockingConnection) -> bool:
        if not self._queue_exists(connection):
            return False
        self._consumer_tag = self._channel.basic_consume(
            queue=self._queue, on_message_callback=self._on_message, auto_ack=False
        )
        self._consuming.set()
        logger.info(
            "Consuming from queue %r with prefetch %d (consumer tag %s).",
            self._queue,
            self._prefetch_count,
            self._consumer_tag,
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

    def _pump(self, connection: pika.BlockingConnection, wait_seconds: float) -> None:
        """Settle finished deliveries and serve the socket for at most `wait_seconds`."""
        self._settle_completed()
        slots_free = len(self._unsettled) < self._prefetch_count
        expects_deliveries = self._consumer_tag is not None and slots_free
        if expects_deliveries or not self._unsettled:
            if self._pool.begin_socket_wait():
                try:
                    connection.process_data_events(time_limit=wait_seconds)
                finally:
                    self._pool.end_socket_wait()
            self._settle_completed()
        else:
            results = self._pool.wait_for_results(min(RESULT_WAIT_SECONDS, wait_seconds))
            self._settle_batch(results)
            if not results:
                connection.process_data_events(time_limit=0)
            # Otherwise the next pass serves the socket: at prefetch 1 the
            # broker sends the next message only after this ack, so it goes first.

    def _drain(self, connection: pika.BlockingConnection) -> None:
        if self._consumer_tag is not None:
            # pika nacks with requeue the deliveries it has buffered but not
            # yet handed to _on_message, so none of them is lost.
            self._channel.basic_cancel(self._consumer_tag)
            self._consumer_tag = None
        self._consuming.clear()
        for delivery in self._pool.abandon_queued():
            self._settle(delivery, Outcome.REQUEUE)
        running = self._pool.busy_count()
        if running:
            logger.info(
                "Stopping: waiting up to %.0f s for %d running task(s).",
                max(0.0, self._stop_deadline - time.monotonic()),
                running,
            )
        while self._pool.busy_count() and time.monotonic() < self._stop_deadline:
            self._check_channel()
            remaining = self._stop_deadline - time.monotonic()
            self._pump(connection, max(0.0, min(SOCKET_WAIT_SECONDS, remaining)))
        self._settle_completed()
        for delivery in self._pool.abandon_running():
            logger.warning(
                "Requeued delivery tag %d: its task did not finish within the drain "
                "timeout of %.0f s.",
                delivery.delivery_tag,
                self._settings.agent.drain_timeout_s,
            )
            self._settle(delivery, Outcome.REQUEUE)
        self._channel.close()
        connection.close()
        logger.info("Stopped consuming and closed the connection.")

    def _finish_shutdown(self) -> None:
        self._consuming.clear()
        if self._stop.is_set() and self._pool.busy_count():
            # No connection is left to settle on, but a running task may still
            # finish its side effects (a callback) before the process exits.
            remaining = max(0.0, self._stop_deadline - time.monotonic())
            self._pool.wait_idle(remaining)
        for delivery in self._pool.take_completed():
            self._settle(delivery, delivery.outcome or Outcome.REQUEUE)
        self._pool.close()

    # Callbacks on the I/O thread.

    def _on_message(
        self,
        channel: Any,
        method: pika.spec.Basic.Deliver,
        properties: pika.spec.BasicProperties,
        body: bytes,
    ) -> None:
        delivery = Delivery(
            channel=channel,
            delivery_tag=method.delivery_tag,
            redelivered=bool(method.redelivered),
            body=body,
            message_id=properties.message_id,
        )
        self._unsettled[delivery.delivery_tag] = delivery
        self._metrics.in_flight.inc()
        self._pool.submit(delivery)

    def _on_cancelled_by_broker(self, method_frame: Any) -> None:
        logger.warning(
            "The broker cancelled consumer %s of queue %r, as it does when the queue is "
            "deleted or its node fails; consuming again once the queue exists.",
            method_frame.method.consumer_tag,
            self._queue,
        )
        self._consumer_tag = None
        self._consuming.clear()

    def _on_woken(self) -> None:
        self._pool.on_woken()

    def _settle_completed(self) -> None:
        self._settle_batch(self._pool.take_completed())

    def _settle_batch(self, results: list[Delivery]) -> None:
        """Settle finished deliveries, folding in-order acks into one `multiple` ack.

        An ack with multiple=True for tag T acknowledges every unsettled
        delivery up to T on the channel, so it is used only for tags below
        the lowest delivery that is still queued, running or not acked.
        """
        acks: list[Delivery] = []
        for delivery in results:
            outcome = delivery.outcome or Outcome.REJECT
            if outcome is Outcome.ACK and self._is_current(delivery):
                acks.append(delivery)
            else:
                self._settle(delivery, outcome)
        if len(acks) < 2:
            for delivery in acks:
                self._settle(delivery, Outcome.ACK)
            return
        acked_tags = {delivery.delivery_tag for delivery in acks}
        lowest_open = min((tag for tag in self._unsettled if tag not in acked_tags), default=None)
        folded = [d for d in acks if lowest_open is None or d.delivery_tag < lowest_open]
        if len(folded) < 2:
            folded = []
        for delivery in acks:
            if delivery not in folded:
                self._settle(delivery, Outcome.ACK)
        if folded:
            highest = max(delivery.delivery_tag for delivery in folded)
            for delivery in folded:
                self._unsettled.pop(delivery.delivery_tag, None)
            self._metrics.in_flight.dec(len(folded))
            self._channel.basic_ack(delivery_tag=highest, multiple=True)

    def _is_current(self, delivery: Delivery) -> bool:
        return delivery.channel is self._channel and bool(delivery.channel.is_open)

    def _settle(self, delivery: Delivery, outcome: Outcome) -> None:
        self._metrics.in_flight.dec()
        channel = delivery.channel
        if channel is not self._channel or not channel.is_open:
            self._metrics.stale_settlements.inc()
            logger.warning(
                "Dropped the %s of delivery tag %d: the channel it arrived on is closed, "
                "so the broker redelivers the message.",
                outcome.value,
                delivery.delivery_tag,
            )
            return
        self._unsettled.pop(delivery.delivery_tag, None)
        if outcome is Outcome.ACK:
            channel.basic_ack(delivery_tag=delivery.delivery_tag)
        elif outcome is Outcome.REJECT:
            channel.basic_nack(delivery_tag=delivery.delivery_tag, requeue=False)
            self._metrics.dead_lettered.inc()
        else:
            channel.basic_nack(delivery_tag=delivery.delivery_tag, requeue=True)
            self._metrics.requeued.inc()

    # Worker threads.

    def _wake_io(self) -> None:
        connection = self._connection
        if connection is None:
            return
        # ConnectionWrongStateError: the connection closed meanwhile, and the
        # I/O thread settles the result once it has reconnected.
        with contextlib.suppress(pika.exceptions.ConnectionWrongStateError):
            connection.add_callback_threadsafe(self._on_woken)

    def _execute(self, delivery: Delivery) -> Outcome:
        started = time.monotonic()
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
            return Outcome.REJECT
        context = HandlerContext(
            settings=self._settings,
            delivery_tag=delivery.delivery_tag,
            redelivered=delivery.redelivered,
            message_id=delivery.message_id,
        )
        try:
            self._handler(message, context)
        except Exception:
            # Any handler failure fails the task: the broker dead-letters it.
            logger.exception(
                "Handler failed on delivery tag %d (message id %s); rejecting it so the "
                "broker dead-letters it.",
                delivery.delivery_tag,
                delivery.message_id,
            )
            self._metrics.failed.inc()
            return Outcome.REJECT
        finally:
            self._metrics.processing_seconds.observe(time.monotonic() - started)
        self._metrics.processed.inc()
        return Outcome.ACK


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
