"""Exceptions of the operator's broker and Secret clients.

Each class subclasses kopf's TemporaryError (kopf retries the handler after
`delay` seconds) or PermanentError (kopf stops retrying until the resource
changes), so the retry meaning travels with the type. Each also carries the
condition `reason` that the status shows for it. Messages never contain a
password.
"""

from __future__ import annotations

from typing import ClassVar

import kopf

# Retry delays in seconds. Handlers grow them with `backoff_delay`.
DEFAULT_DELAY_SECONDS = 10.0
CREDENTIALS_DELAY_SECONDS = 60.0
MAX_DELAY_SECONDS = 300.0


class BrokerError(kopf.TemporaryError):
    """A broker or Secret failure that a later retry may not see."""

    reason: ClassVar[str] = "BrokerError"
    default_delay: ClassVar[float] = DEFAULT_DELAY_SECONDS

    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message, delay=self.default_delay if delay is None else delay)


class BrokerUnreachable(BrokerError):
    """The broker refused the TCP connection, timed out or dropped it."""

    reason = "BrokerUnreachable"


class BrokerRequestFailed(BrokerError):
    """The broker returned an unexpected error, such as HTTP 500."""

    reason = "BrokerRequestFailed"


class AuthenticationFailed(BrokerError):
    """The broker rejected the username or password (HTTP 401, AMQP 403 at login)."""

    reason = "AuthenticationFailed"
    default_delay = CREDENTIALS_DELAY_SECONDS


class AccessRefused(BrokerError):
    """The user lacks a permission on the vhost or the object (HTTP 403, AMQP 403)."""

    reason = "AccessRefused"
    default_delay = CREDENTIALS_DELAY_SECONDS


class SecretNotFound(BrokerError):
    """The connection Secret named by `spec.connection.secretRef` does not exist."""

    reason = "SecretNotFound"


class SecretInvalid(BrokerError):
    """The connection Secret lacks a key or contains a value that cannot be used."""

    reason = "SecretInvalid"
    default_delay = CREDENTIALS_DELAY_SECONDS


class SecretUnreadable(BrokerError):
    """The API server failed to return the connection Secret (not a 404 or 403)."""

    reason = "SecretUnreadable"


class DeclareFailed(BrokerError):
    """The broker rejected a queue.declare for a reason other than drift."""

    reason = "DeclareFailed"


class PreconditionFailed(BrokerError):
    """The queue exists with other arguments (AMQP 406 PRECONDITION_FAILED)."""

    reason = "ArgumentsDrifted"


class PolicyFailed(BrokerError):
    """The management API rejected the operator's policy for a queue."""

    reason = "PolicyFailed"


class QueueNotEmpty(BrokerError):
    """A queue to delete is not empty, and deletion is not forced."""

    reason = "QueueNotEmpty"
    default_delay = 30.0


class SpecInvalid(kopf.PermanentError):
    """The resource's spec fails validation that the API server did not enforce."""

    reason: ClassVar[str] = "SpecInvalid"


def backoff_delay(error: BrokerError, retry: int) -> float:
    """Return the error's delay doubled once per earlier retry, capped at MAX_DELAY_SECONDS.

    `retry` is kopf's count of earlier attempts of the handler (0 on the first).
    """
    base = error.delay if error.delay is not None else DEFAULT_DELAY_SECONDS
    return float(min(MAX_DELAY_SECONDS, base * 2 ** min(retry, 10)))
