"""Publish check requests: persistent, mandatory, with publisher confirms.

`openchecker-publish --config config.ini --count N --json '{...}'` publishes
N copies of one body to the queue named in the config's `[Agent] queue`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

from .amqp import build_connection_parameters
from .config import load_settings
from .errors import AgentError, ConfigError

logger = logging.getLogger(__name__)

CONTENT_TYPE = "application/json"
PERSISTENT = 2  # AMQP delivery_mode: written to disk by a durable queue


class PublishError(AgentError):
    """The broker did not take a message: it nacked it, or no queue was bound."""


def publish_messages(
    parameters: pika.ConnectionParameters,
    queue: str,
    bodies: Iterable[bytes],
    *,
    content_type: str = CONTENT_TYPE,
) -> int:
    """Publish each body to `queue` through the default exchange; return the count.

    Every publish waits for the broker's confirm. Raises PublishError when a
    message is returned as unroutable (the queue does not exist) or nacked,
    after the messages before it were confirmed. pika's connection errors
    pass through.
    """
    connection = pika.BlockingConnection(parameters)
    published = 0
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for body in bodies:
            properties = pika.BasicProperties(
                delivery_mode=PERSISTENT,
                content_type=content_type,
                message_id=uuid.uuid4().hex,
            )
            try:
                channel.basic_publish(
                    exchange="",
                    routing_key=queue,
                    body=body,
                    properties=properties,
                    mandatory=True,
                )
            except pika.exceptions.UnroutableError as error:
                raise PublishError(
                    f"message {published + 1} was returned unroutable: queue {queue!r} "
                    "does not exist in this vhost"
                ) from error
            except pika.exceptions.NackError as error:
                raise PublishError(
                    f"the broker nacked message {published + 1} for queue {queue!r} "
                    "(for example a full queue with overflow reject-publish)"
                ) from error
            published += 1
    finally:
        if connection.is_open:
            connection.close()
    return published


def publish_check_request(
    parameters: pika.ConnectionParameters,
    queue: str,
    *,
    command_list: list[str],
    project_url: str,
    callback_url: str,
    task_metadata: Mapping[str, Any],
) -> None:
    """Publish one check request in the format that `handle_check_request` reads."""
    body = {
        "command_list": command_list,
        "project_url": project_url,
        "callback_url": callback_url,
        "task_metadata": dict(task_metadata),
    }
    publish_messages(parameters, queue, [json.dumps(body).encode("utf-8")])


def main(argv: list[str] | None = None) -> int:
    """Publish from the command line; return 0, 1 when publishing failed, 2 on bad input."""
    arguments = _parse_arguments(argv)
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    # pika logs a returned message with the start of its body at WARNING.
    logging.getLogger("pika").setLevel(logging.ERROR)
    try:
        settings = load_settings(arguments.config)
        body = _read_body(arguments)
    except ConfigError as error:
        print(f"openchecker-publish: {error}", file=sys.stderr)
        return 2
    queue = arguments.queue or settings.agent.queue
    parameters = build_connection_parameters(settings.rabbitmq)
    try:
        count = publish_messages(parameters, queue, (body for _ in range(arguments.count)))
    except (PublishError, pika.exceptions.AMQPError) as error:
        print(f"openchecker-publish: publishing to {queue!r} failed: {error}", file=sys.stderr)
        return 1
    logger.info("Published %d message(s) to queue %r, each confirmed.", count, queue)
    return 0


def _read_body(arguments: argparse.Namespace) -> bytes:
    if arguments.json is not None:
        text = str(arguments.json)
        source = "--json"
    else:
        path = Path(arguments.body_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            # Reported as bad input, like a bad config.
            raise ConfigError(f"--body-file {path}: cannot read it ({error})") from error
        source = f"--body-file {path}"
    try:
        json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{source}: not valid JSON ({error.msg}); expected a JSON object"
        ) from error
    return text.encode("utf-8")


def _parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="openchecker-publish",
        description="Publish persistent, confirmed messages to the agent's queue.",
    )
    parser.add_argument(
        "--config", type=Path, required=True, help="path of the agent's config.ini"
    )
    parser.add_argument("--queue", help="queue to publish to (default: [Agent] queue)")
    parser.add_argument(
        "--count", type=int, default=1, help="number of copies of the body to publish (default: 1)"
    )
    body = parser.add_mutually_exclusive_group(required=True)
    body.add_argument("--json", help="the message body, a JSON document")
    body.add_argument("--body-file", help="a file holding the message body, a JSON document")
    arguments = parser.parse_args(argv)
    if arguments.count < 1:
        parser.error("--count must be at least 1")
    return arguments


if __name__ == "__main__":
    sys.exit(main())
