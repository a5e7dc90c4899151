"""Publishing with confirms: persistent messages, and errors for unroutable ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pika
import pytest
from openchecker_agent.publishing import PublishError, publish_check_request, publish_messages
from openchecker_testenv.broker import Broker
from support_agent import declare_work_queue, open_channel, write_agent_config

pytestmark = pytest.mark.broker

QUEUE = "checks"


@pytest.mark.timeout(30)
def test_publish_check_request_is_persistent(broker: Broker, vhost: str) -> None:
    declare_work_queue(broker, vhost, QUEUE)

    publish_check_request(
        pika.URLParameters(broker.amqp_url(vhost)),
        QUEUE,
        command_list=["clone"],
        project_url="https://example.org/project.git",
        callback_url="http://127.0.0.1/callback",
        task_metadata={"task_id": "abc"},
    )

    connection, channel = open_channel(broker, vhost)
    try:
        method, properties, body = channel.basic_get(QUEUE, auto_ack=True)
    finally:
        connection.close()
    assert method is not None
    assert properties.delivery_mode == 2
    assert properties.content_type == "application/json"
    assert json.loads(body)["task_metadata"] == {"task_id": "abc"}


@pytest.mark.timeout(30)
def test_publish_to_missing_queue_raises(broker: Broker, vhost: str) -> None:
    parameters = pika.URLParameters(broker.amqp_url(vhost))

    with pytest.raises(PublishError, match="returned unroutable"):
        publish_messages(parameters, "no-such-queue", [b"{}"])


@pytest.mark.timeout(60)
def test_publish_cli_publishes_count(tmp_path: Path, broker: Broker, vhost: str) -> None:
    declare_work_queue(broker, vhost, QUEUE)
    config, _name = write_agent_config(tmp_path, broker, vhost, QUEUE)

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "openchecker_agent.publishing",
            "--config",
            str(config),
            "--count",
            "3",
            "--json",
            '{"task_metadata": {"task_id": "x"}}',
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    connection, channel = open_channel(broker, vhost)
    try:
        assert channel.queue_declare(QUEUE, passive=True).method.message_count == 3
    finally:
        connection.close()
