"""Run a real `openchecker-agent` process against the test broker and inspect the broker.

Queues are declared the way the operator declares them (docs/design.md): a
durable DLQ `<queue>.dlq` first, then the durable work queue dead-lettering
into it through the default exchange. Counts come from passive declares,
which are exact at once; the management API's statistics lag by seconds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pika
from openchecker_testenv.broker import Broker, quote_vhost

TESTS_DIR = Path(__file__).resolve().parent
REPOSITORY_DIR = TESTS_DIR.parent
# Seconds an agent gets to exit after SIGTERM when the test expects no drain.
EXIT_TIMEOUT_SECONDS = 30.0


@dataclass
class AgentProcess:
    """A running agent subprocess, its log file and its settings."""

    process: subprocess.Popen[bytes]
    log_path: Path
    config_path: Path
    connection_name: str
    health_port: int

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def send_signal(self, number: int = signal.SIGTERM) -> None:
        self.process.send_signal(number)

    def wait(self, timeout_seconds: float = EXIT_TIMEOUT_SECONDS) -> int:
        """Wait for the exit code; fail with the agent's log when it does not exit."""
        try:
            return self.process.wait(timeout_seconds)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise AssertionError(
                f"the agent did not exit within {timeout_seconds} s; its log:\n{self.log()}"
            ) from None

    def stop(self) -> int:
        if self.process.poll() is None:
            self.send_signal(signal.SIGTERM)
        return self.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_agent_config(
    folder: Path,
    broker: Broker,
    vhost: str,
    queue: str,
    *,
    handler: str = "support_agent_handlers:sleep_then_succeed",
    prefetch_count: int = 1,
    heartbeat_interval_s: int = 60,
    drain_timeout_s: float = 30,
    health_port: int = 0,
    username: str | None = None,
    password: str | None = None,
    extra: str = "",
) -> tuple[Path, str]:
    """Write a config.ini in the format of docs/design.md; return its path and connection name."""
    connection_name = f"agent-test-{uuid.uuid4().hex[:10]}"
    text = f"""[RabbitMQ]
host = {broker.host}
port = {broker.amqp_port}
username = {username or broker.username}
password = {password or broker.password}
vhost = {vhost}
heartbeat_interval_s = {heartbeat_interval_s}
blocked_connection_timeout_ms = 30000
tls = false
tls_ca_file =
tls_verify = true
connection_name = {connection_name}

[Agent]
queue = {queue}
prefetch_count = {prefetch_count}
handler = {handler}
drain_timeout_s = {drain_timeout_s}
health_port = {health_port}
health_bind_address = 127.0.0.1
callback_allowed_hosts = 127.0.0.1
callback_timeout_s = 5
callback_max_attempts = 3
workdir = {folder / "work"}
{extra}"""
    path = folder / f"config-{connection_name}.ini"
    path.write_text(text, encoding="utf-8")
    return path, connection_name


def start_agent(config_path: Path, connection_name: str, *, health_port: int = 0) -> AgentProcess:
    """Start `python -m openchecker_agent` with tests/ on PYTHONPATH for the test handlers."""
    log_path = config_path.with_suffix(".log")
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS_DIR), *filter(None, [environment.get("PYTHONPATH")])]
    )
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "openchecker_agent", "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment,
            cwd=REPOSITORY_DIR,
        )
    return AgentProcess(process, log_path, config_path, connection_name, health_port)


def open_channel(broker: Broker, vhost: str) -> tuple[pika.BlockingConnection, Any]:
    connection = pika.BlockingConnection(pika.URLParameters(broker.amqp_url(vhost)))
    return connection, connection.channel()


def declare_work_queue(broker: Broker, vhost: str, queue: str) -> None:
    """Declare `<queue>.dlq` and `queue` with the operator's arguments."""
    connection, channel = open_channel(broker, vhost)
    try:
        channel.queue_declare(f"{queue}.dlq", durable=True)
        channel.queue_declare(
            queue,
            durable=True,
            arguments={
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": f"{queue}.dlq",
            },
        )
    finally:
        connection.close()


def publish(broker: Broker, vhost: str, queue: str, body: dict[str, Any] | bytes) -> None:
    """Publish one persistent message and wait for the broker's confirm."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection, channel = open_channel(broker, vhost)
    try:
        channel.confirm_delivery()
        channel.basic_publish(
            "",
            queue,
            data,
            properties=pika.BasicProperties(delivery_mode=2, message_id=uuid.uuid4().hex),
            mandatory=True,
        )
    finally:
        connection.close()


def queue_counts(broker: Broker, vhost: str, queue: str) -> tuple[int, int]:
    """Return (ready messages, consumers) of `queue` from a passive declare."""
    connection, channel = open_channel(broker, vhost)
    try:
        result = channel.queue_declare(queue, passive=True)
        return int(result.method.message_count), int(result.method.consumer_count)
    finally:
        connection.close()


def queue_exists(broker: Broker, vhost: str, queue: str) -> bool:
    connection, channel = open_channel(broker, vhost)
    try:
        channel.queue_declare(queue, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker as error:
        # 404 NOT_FOUND means "no such queue". Any other code is a failure.
        if error.reply_code != 404:
            raise
        return False
    finally:
        if connection.is_open:
            connection.close()


def take_messages(broker: Broker, vhost: str, queue: str) -> list[tuple[dict[str, Any], bytes]]:
    """Remove every ready message from `queue`; return (headers, body) pairs."""
    connection, channel = open_channel(broker, vhost)
    messages: list[tuple[dict[str, Any], bytes]] = []
    try:
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return messages
            messages.append((dict(properties.headers or {}), body))
    finally:
        connection.close()


def connection_names(broker: Broker, client_name: str) -> list[str]:
    """Return the broker's names of the connections whose connection_name is `client_name`."""
    with broker.management_session() as session:
        response = session.get(f"{broker.management_url}/api/connections")
        response.raise_for_status()
        return [
            item["name"]
            for item in response.json()
            if (item.get("client_properties") or {}).get("connection_name") == client_name
        ]


def close_connection(broker: Broker, name: str) -> None:
    """Have the broker close a connection (320 CONNECTION_FORCED) through the management API."""
    with broker.management_session() as session:
        response = session.delete(
            f"{broker.management_url}/api/connections/{quote(name, safe='')}",
            headers={"X-Reason": "closed by an agent test"},
        )
        response.raise_for_status()


def delete_queue(broker: Broker, vhost: str, queue: str) -> None:
    with broker.management_session() as session:
        response = session.delete(
            f"{broker.management_url}/api/queues/{quote_vhost(vhost)}/{quote(queue, safe='')}"
        )
        response.raise_for_status()


def read_records(path: Path) -> list[dict[str, Any]]:
    """Return the JSON lines that the test handlers appended to `path`."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class CallbackServer:
    """An HTTP server on 127.0.0.1 that records every POSTed JSON body."""

    server: ThreadingHTTPServer
    bodies: list[Any] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/callback"


def serve_callbacks() -> Iterator[CallbackServer]:
    """Yield a running CallbackServer; a generator for use as a pytest fixture."""
    bodies: list[Any] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the name http.server dispatches to)
            length = int(self.headers.get("Content-Length", "0"))
            bodies.append(json.loads(self.rfile.read(length)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield CallbackServer(server, bodies)
    finally:
        server.shutdown()
        server.server_close()
