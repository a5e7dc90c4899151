"""Exceptions of the agent, each mapped to one outcome of a message or the process."""

from __future__ import annotations


class AgentError(Exception):
    """Base class of the agent's own errors."""


class ConfigError(AgentError):
    """The configuration is missing, unreadable or invalid.

    The message is one line that names the file or environment variable, the
    section, the key and the expected form. The agent exits with code 2.
    """


class FatalBrokerError(AgentError):
    """The broker rejected the agent in a way that retrying cannot fix.

    Authentication failures and ACCESS_REFUSED (403) are fatal: the agent
    stops with a non-zero exit code instead of reconnecting forever.
    """


class PermanentTaskError(AgentError):
    """A task that can never succeed, whatever the number of attempts.

    Handlers raise it (or any other exception) to have the message
    dead-lettered. Its message states the reason in the agent's log.
    """
