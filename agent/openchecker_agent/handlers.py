"""The handler interface and the loading of `package.module:function` handlers."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from .config import AgentSettings
from .errors import ConfigError


class HandlerContext(NamedTuple):
    """The settings and delivery identity a handler receives beside the message.

    A named tuple, not a frozen dataclass, because the consumer builds one
    per message before the ack: a named tuple is built in a third of the time.
    """

    settings: AgentSettings
    delivery_tag: int
    redelivered: bool
    message_id: str | None


# A handler returns normally when the task succeeded; any exception means the
# task failed, and the message is dead-lettered.
Handler = Callable[[Mapping[str, Any], HandlerContext], object]


_DECODER = json.JSONDecoder()


class UndecodableMessageError(ValueError):
    """The message body is not a UTF-8 JSON object."""


def decode_message(body: bytes) -> dict[str, Any]:
    """Decode a message body into a dict.

    Raises UndecodableMessageError when the body is not UTF-8 JSON or not a
    JSON object.
    """
    try:
        text = body.decode("utf-8")
        # raw_decode skips json.loads's two whitespace searches, which take
        # about half its time on a small message. A body it cannot take
        # whole (whitespace around it, or invalid) goes through json.loads,
        # which returns the same object or raises the usual error.
        try:
            message, end = _DECODER.raw_decode(text)
        except ValueError:
            end = -1
        if end != len(text):
            message = json.loads(text)
    except (ValueError, RecursionError) as error:
        # ValueError covers invalid UTF-8, invalid JSON and integers past
        # Python's digit limit; RecursionError, arrays or objects nested
        # too deep. All mean the body is not a document the agent can run.
        raise UndecodableMessageError(f"the body is not UTF-8 JSON ({error})") from error
    if not isinstance(message, dict):
        raise UndecodableMessageError(
            f"the body is JSON {type(message).__name__}, not a JSON object"
        )
    return message


def load_handler(reference: str, *, source: str = "config.ini") -> Handler:
    """Import the handler named `package.module:function`.

    Raises ConfigError when the module cannot be imported or has no such
    callable, so a wrong handler stops the agent at start (exit code 2).
    """
    module_name, _, function_name = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        # A handler that does not import is a configuration error, not a crash.
        raise ConfigError(
            f"{source} [Agent] handler: cannot import module {module_name!r} ({error}); "
            "expected package.module:function importable by the agent"
        ) from error
    handler = getattr(module, function_name, None)
    if not callable(handler):
        raise ConfigError(
            f"{source} [Agent] handler: module {module_name!r} has no function "
            f"{function_name!r}; "
            "expected package.module:function importable by the agent"
        )
    return handler  # type: ignore[no-any-return]
