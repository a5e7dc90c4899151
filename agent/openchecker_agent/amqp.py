"""Build pika connection parameters and classify broker errors."""

from __future__ import annotations

import ssl

import pika
import pika.exceptions

from .config import RabbitMQSettings

# Bounds one TCP connect plus the AMQP handshake, so a broker that accepts
# the socket but never replies is retried instead of hanging the agent.
SOCKET_TIMEOUT_SECONDS = 10.0
# RabbitMQ's reply codes (AMQP 0-9-1 constants) that the agent treats apart.
CONNECTION_FORCED = 320
ACCESS_REFUSED = 403
NOT_FOUND = 404


def build_connection_parameters(settings: RabbitMQSettings) -> pika.ConnectionParameters:
    """Return the pika parameters for one connection to the configured broker.

    `blocked_connection_timeout_ms` is converted to the seconds that pika's
    `blocked_connection_timeout` expects. One connection attempt per call:
    the consumer retries with its own backoff.
    """
    credentials = pika.PlainCredentials(
        settings.username,
        settings.password.get_secret_value(),
        # pika would otherwise blank the password after the first connect,
        # which breaks every reconnect with the same parameters.
        erase_on_connect=False,
    )
    ssl_options = _ssl_options(settings) if settings.tls else None
    return pika.ConnectionParameters(
        host=settings.host,
        port=settings.port,
        virtual_host=settings.vhost,
        credentials=credentials,
        heartbeat=settings.heartbeat_interval_s,
        blocked_connection_timeout=settings.blocked_connection_timeout_seconds,
        ssl_options=ssl_options,
        client_properties={"connection_name": settings.connection_name},
        connection_attempts=1,
        socket_timeout=SOCKET_TIMEOUT_SECONDS,
    )


def _ssl_options(settings: RabbitMQSettings) -> pika.SSLOptions:
    cafile = str(settings.tls_ca_file) if settings.tls_ca_file is not None else None
    context = ssl.create_default_context(cafile=cafile)
    if not settings.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return pika.SSLOptions(context, server_hostname=settings.host)


def is_fatal_connection_error(error: BaseException) -> bool:
    """Return True when reconnecting cannot help: bad credentials or access refused."""
    if isinstance(
        error,
        pika.exceptions.ProbableAuthenticationError
        | pika.exceptions.ProbableAccessDeniedError
        | pika.exceptions.AuthenticationError,
    ):
        return True
    if isinstance(error, pika.exceptions.ConnectionClosedByBroker | pika.exceptions.ChannelClosed):
        return bool(error.reply_code == ACCESS_REFUSED)
    return False
