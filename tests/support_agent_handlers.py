"""Handlers that the agent's integration tests load into a real agent process.

The agent imports them as `support_agent_handlers:NAME` with the tests folder
on PYTHONPATH. Each handler appends one JSON line per call to the file named
by the message's `record_file`, so a test can count deliveries and see the
`redelivered` flag from outside the process.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

from openchecker_agent.handlers import HandlerContext


def _record(message: Mapping[str, Any], context: HandlerContext, event: str) -> None:
    record_file = message.get("record_file")
    if not record_file:
        return
    line = json.dumps(
        {
            "event": event,
            "id": message.get("id"),
            "delivery_tag": context.delivery_tag,
            "redelivered": context.redelivered,
            "pid": os.getpid(),
            "time": time.time(),
        }
    )
    with open(record_file, "a", encoding="utf-8") as stream:
        stream.write(line + "\n")


def sleep_then_succeed(message: Mapping[str, Any], context: HandlerContext) -> None:
    """Record the start, sleep `sleep_seconds`, record the end."""
    _record(message, context, "start")
    time.sleep(float(message.get("sleep_seconds", 0)))
    _record(message, context, "end")


def always_fail(message: Mapping[str, Any], context: HandlerContext) -> None:
    """Record the call, then raise so the message is dead-lettered."""
    _record(message, context, "start")
    raise RuntimeError(f"this test handler always fails (message id {message.get('id')})")


def fail_when_asked(message: Mapping[str, Any], context: HandlerContext) -> None:
    """Raise when the message has `"fail": true`, call sys.exit with `"exit": true`."""
    _record(message, context, "start")
    if message.get("fail"):
        raise RuntimeError(f"failure requested by message {message.get('id')}")
    if message.get("exit"):
        sys.exit(f"exit requested by message {message.get('id')}")


def do_nothing(message: Mapping[str, Any], context: HandlerContext) -> None:
    """Succeed at once; the throughput benchmark's handler."""
