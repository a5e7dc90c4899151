"""Queue declares over AMQP 0-9-1, with pika's BlockingConnection.

An AMQP connection is bound to one vhost, so the client keeps one
connection and one channel per vhost in use, and reuses them across
reconciles. A connection is reopened only when it was closed: by the
broker, by a missed heartbeat or by a network failure. A channel error
(404 on a passive declare, 406 on a declare with other arguments) closes
only the channel, which is reopened on the same connection.

pika is not thread-safe and kopf runs sync handlers in a thread pool, so
each vhost's connection is used under its own lock.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from ..errors import (
    AccessRefused,
    AuthenticationFailed,
    BrokerError,
    BrokerUnreachable,
    DeclareFailed,
    PreconditionFailed,
)
from ..models import BrokerSettings

logger = logging.getLogger(__name__)

ResultT = TypeVar("ResultT")

# AMQP reply codes (AMQP 0-9-1 specification, section 1.9 constants).
ACCESS_REFUSED = 403
NOT_FOUND = 404
PRECONDITION_FAILED = 406


@dataclass(frozen=True)
class AmqpOptions:
    """Connection settings of the operator's AMQP connections."""

    # The client-provided name the management UI and /api/connections show.
    connection_name: str = "openchecker-operator"
    # The broker closes a connection after missing heartbeats; the client
    # then reopens it on its next use. 0 disables heartbeats.
    heartbeat_seconds: int = 60
    # Seconds allowed for the TCP connect and for the AMQP handshake.
    socket_timeout_seconds: float = 10.0
    stack_timeout_seconds: float = 15.0
    # Seconds a declare may wait while the broker blocks publishers
    # (a memory or disk alarm) before the connection is dropped.
    blocked_connection_timeout_seconds: float = 60.0


class AmqpClient:
    """Declares and passive checks of queues on one broker, one connection per vhost."""

    # NOTE: AMQP binds a connection to one vhost, so the operator keeps one
    # connection per vhost in use on each broker, kept open while it runs.

    def __init__(self, settings: BrokerSettings, options: AmqpOptions | None = None) -> None:
        self.settings = settings
        self.options = options or AmqpOptions()
        self._lock = threading.Lock()
        self._vhosts: dict[str, _VhostConnection] = {}

    def queue_exists(self, vhost: str, name: str) -> bool:
        """Return whether a queue exists, with a passive declare.

        A missing queue makes the broker close the channel with 404; the
        channel is reopened on the next call, and the connection stays.
        """

        def check(channel: BlockingChannel) -> bool:
            try:
                channel.queue_declare(queue=name, passive=True)
            except pika.exceptions.ChannelClosedByBroker as error:
                if error.reply_code == NOT_FOUND:
                    return False
                raise
            return True

        return self._vhost(vhost).run(check)

    def declare_queue(self, vhost: str, name: str, arguments: Mapping[str, Any]) -> None:
        """Declare a durable queue with `arguments`.

        Declaring an existing queue with the same arguments changes nothing.
        Raises PreconditionFailed when it exists with other arguments,
        AccessRefused without the configure permission, DeclareFailed for
        other channel errors, and BrokerUnreachable or AuthenticationFailed
        for connection failures.
        """

        def declare(channel: BlockingChannel) -> None:
            channel.queue_declare(queue=name, durable=True, arguments=dict(arguments))

        self._vhost(vhost).run(declare)

    def open_connections(self) -> int:
        """Return how many of this client's connections are open."""
        with self._lock:
            return sum(1 for vhost in self._vhosts.values() if vhost.is_open())

    def close(self) -> None:
        """Close every connection; errors while closing are logged, not raised."""
        with self._lock:
            vhosts = list(self._vhosts.values())
            self._vhosts.clear()
        for vhost in vhosts:
            vhost.close()

    def _vhost(self, vhost: str) -> _VhostConnection:
        with self._lock:
            connection = self._vhosts.get(vhost)
            if connection is None:
                connection = self._vhosts[vhost] = _VhostConnection(
                    self.settings, self.options, vhost
                )
            return connection


class _VhostConnection:
    """The connection and channel of one vhost, used under a lock."""

    def __init__(self, settings: BrokerSettings, options: AmqpOptions, vhost: str) -> None:
        self.settings = settings
        self.options = options
        self.vhost = vhost
        self.lock = threading.Lock()
        self.connection: pika.BlockingConnection | None = None
        self.channel: BlockingChannel | None = None

    def run(self, operation: Callable[[BlockingChannel], ResultT]) -> ResultT:
        """Run `operation` on the channel, reopening what was closed.

        A reused connection may have died while idle without pika noticing.
        When the operation then fails with a connection error, it runs once
        more on a new connection.
        """
        with self.lock:
            reused = self.connection is not None and self.connection.is_open
            try:
                return self._run_once(operation)
            except BrokerUnreachable:
                if not reused:
                    raise
                logger.info("AMQP connection to vhost %r was lost; reopening it.", self.vhost)
                return self._run_once(operation)

    def is_open(self) -> bool:
        """Return whether the connection is open, as pika last saw it."""
        return self.connection is not None and self.connection.is_open

    def close(self) -> None:
        """Close the connection, if open."""
        with self.lock:
            self._discard(close=True)

    def _run_once(self, operation: Callable[[BlockingChannel], ResultT]) -> ResultT:
        channel = self._channel()
        try:
            return operation(channel)
        except pika.exceptions.ChannelClosedByBroker as error:
            # The broker closed only the channel; the next call opens a new one.
            self.channel = None
            raise channel_error(error, self.vhost) from None
        except pika.exceptions.AMQPChannelError as error:
            self.channel = None
            raise DeclareFailed(
                f"AMQP channel on vhost {self.vhost!r} failed: {error!r}"
            ) from None
        except pika.exceptions.AMQPConnectionError as error:
            self._discard(close=False)
            raise connection_error(error, self.settings, self.vhost) from None

    def _channel(self) -> BlockingChannel:
        if self.connection is not None and self.connection.is_open:
            try:
                # Handles a close or heartbeat the broker sent while the
                # connection sat idle, and sends a heartbeat when one is due.
                self.connection.process_data_events(time_limit=0)
            except pika.exceptions.AMQPConnectionError:
                # The connection died while idle: open a new one below.
                self._discard(close=False)
        if self.connection is None or not self.connection.is_open:
            self.connection = self._open()
            self.channel = None
        if self.channel is None or not self.channel.is_open:
            try:
                self.channel = self.connection.channel()
            except pika.exceptions.AMQPError as error:
                self._discard(close=True)
                raise connection_error(error, self.settings, self.vhost) from None
        return self.channel

    def _open(self) -> pika.BlockingConnection:
        parameters = connection_parameters(self.settings, self.options, self.vhost)
        try:
            connection = pika.BlockingConnection(parameters)
        except pika.exceptions.AMQPError as error:
            raise connection_error(error, self.settings, self.vhost) from None
        logger.info(
            "Opened AMQP connection %r to %s:%d, vhost %r.",
            self.options.connection_name,
            self.settings.host,
            self.settings.port,
            self.vhost,
        )
        return connection

    def _discard(self, close: bool) -> None:
        connection, self.connection, self.channel = self.connection, None, None
        if close and connection is not None and connection.is_open:
            try:
                # Reads a close the broker already sent (for example after
                # the vhost was deleted), so no close frame goes to a socket
                # the broker has reset.
                connection.process_data_events(time_limit=0)
                if connection.is_open:
                    connection.close()
            except pika.exceptions.AMQPError as error:
                # The connection is being dropped anyway; a failed close
                # means the socket is already gone.
                logger.debug("Closing AMQP connection to vhost %r failed: %r", self.vhost, error)


def connection_parameters(
    settings: BrokerSettings, options: AmqpOptions, vhost: str
) -> pika.ConnectionParameters:
    """Return pika's parameters for one vhost of the broker."""
    ssl_options = None
    if settings.tls:
        ssl_options = pika.SSLOptions(tls_context(settings), server_hostname=settings.host)
    return pika.ConnectionParameters(
        host=settings.host,
        port=settings.port,
        virtual_host=vhost,
        credentials=pika.PlainCredentials(settings.username, settings.password),
        ssl_options=ssl_options,
        heartbeat=options.heartbeat_seconds,
        blocked_connection_timeout=options.blocked_connection_timeout_seconds,
        socket_timeout=options.socket_timeout_seconds,
        stack_timeout=options.stack_timeout_seconds,
        connection_attempts=1,
        client_properties={"connection_name": options.connection_name},
    )


def tls_context(settings: BrokerSettings) -> ssl.SSLContext:
    """Return the TLS context for the broker: its CA bundle, or the system's."""
    context = ssl.create_default_context(cadata=settings.ca_certificate)
    if not settings.tls_verify:
        # NOTE: `verify: false` accepts any certificate, which exposes the
        # password to anyone who can intercept the connection.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def channel_error(error: pika.exceptions.ChannelClosedByBroker, vhost: str) -> BrokerError:
    """Translate a channel closed by the broker into the matching BrokerError."""
    text = f"{error.reply_code} {error.reply_text}"
    if error.reply_code == PRECONDITION_FAILED:
        return PreconditionFailed(f"The broker rejected the declare on vhost {vhost!r}: {text}")
    if error.reply_code == ACCESS_REFUSED:
        return AccessRefused(f"The broker refused access on vhost {vhost!r}: {text}")
    return DeclareFailed(f"The broker closed the channel on vhost {vhost!r}: {text}")


def connection_error(error: Exception, settings: BrokerSettings, vhost: str) -> BrokerError:
    """Translate a pika connection failure into the matching BrokerError; no password."""
    address = f"{settings.host}:{settings.port}"
    if isinstance(
        error, pika.exceptions.ProbableAuthenticationError | (pika.exceptions.AuthenticationError)
    ):
        return AuthenticationFailed(
            f"The broker at {address} rejected the login of user {settings.username!r} "
            "(AMQP ACCESS_REFUSED); check the username and password in the Secret"
        )
    if isinstance(error, pika.exceptions.ProbableAccessDeniedError):
        return AccessRefused(
            f"The broker at {address} denied user {settings.username!r} access to vhost "
            f"{vhost!r}: the vhost does not exist or the user has no permission on it"
        )
    return BrokerUnreachable(f"AMQP connection to {address} failed: {describe(error)}")


def describe(error: Exception) -> str:
    """Return a short description of a pika error, which often wraps another one."""
    inner = error.args[0] if error.args else None
    if isinstance(inner, BaseException):
        return f"{type(error).__name__}: {type(inner).__name__}: {inner}"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
