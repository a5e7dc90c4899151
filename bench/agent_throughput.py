"""Measure the agent consumer's throughput against a bare pika consumer.

Both consume the same number of pre-published messages from a fresh queue
with the same connection settings and prefetch count. The bare consumer acks
inline in pika's callback; the agent runs a no-op handler in one of its
threads and acks from the thread holding the connection. Both call the
stopwatch once per message before the ack, where a handler's work happens.
Each consumer is timed from its first message to its last, so connecting
does not count.
The script prints messages per second of each, their ratio (target: 0.9 at
prefetch 1), the thread context switches per message of each, what a thread
wake-up costs here, and the resident memory and CPU use of an idle
`openchecker-agent` process. It compares the two at prefetch 1 with 20 ms
tasks as well. It also runs the bare consumer with a busy wait
of 5 to 40 us before each ack, to show what a later ack costs: the agent's
own work before the ack is such a delay.

Broker: RABBITMQ_URL (amqp://user:password@host:port/vhost), or else the
broker the tests use: the `make env-up` one when it runs, or a private node
started with openchecker_testenv.
Bounded: a fixed number of messages per round and a timeout per round.

    python bench/agent_throughput.py [--messages 5000] [--rounds 9]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pika
from openchecker_agent.config import AgentSettings, load_settings
from openchecker_agent.consumer import Consumer
from openchecker_agent.handlers import HandlerContext
from openchecker_agent.metrics import AgentMetrics

ROUND_TIMEOUT_SECONDS = 120.0
IDLE_SECONDS = 3.0
IDLE_CPU_SECONDS = 20.0
TARGET_RATIO = 0.9
# Tasks a few times shorter than the agent's 50 ms check for a long task:
# the agent must run them without waiting on that check.
SHORT_TASK_SECONDS = 0.02
SHORT_TASK_MESSAGES = 100
# Busy waits added before the bare consumer's ack to show what a later ack costs.
ACK_DELAYS_MICROSECONDS = (5, 10, 20, 40)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5_000, help="messages per round")
    parser.add_argument("--rounds", type=int, default=9, help="rounds per consumer and prefetch")
    arguments = parser.parse_args()
    with _broker_url() as url:
        ratios: dict[int, float] = {}
        for prefetch in (1, 10):
            bare, agent, round_ratios = _compare(
                url, prefetch, arguments.messages, arguments.rounds
            )
            # The median of the per-round ratios: each round pairs the two
            # consumers back to back, so drift in the machine's speed over
            # the run cancels out better than in a ratio of medians.
            ratios[prefetch] = statistics.median(round_ratios)
            print(
                f"prefetch {prefetch:>2}: bare pika {bare.rate:8.0f} msg/s, "
                f"agent {agent.rate:8.0f} msg/s, ratio {ratios[prefetch]:.2f} "
                f"(rounds {min(round_ratios):.2f}-{max(round_ratios):.2f}); "
                f"context switches per message: bare {bare.switches:.2f}, "
                f"agent {agent.switches:.2f}",
                flush=True,
            )
        print(f"ratio at prefetch 1: {ratios[1]:.2f} (target {TARGET_RATIO})", flush=True)
        bare, agent, round_ratios = _compare(
            url, 1, SHORT_TASK_MESSAGES, arguments.rounds, task_seconds=SHORT_TASK_SECONDS
        )
        print(
            f"prefetch  1, {SHORT_TASK_SECONDS * 1000:.0f} ms tasks: bare pika "
            f"{bare.rate:.1f} msg/s, agent {agent.rate:.1f} msg/s, ratio "
            f"{statistics.median(round_ratios):.2f} "
            f"(rounds {min(round_ratios):.2f}-{max(round_ratios):.2f})",
            flush=True,
        )
        delays = _ack_delay_cost(url, arguments.messages, arguments.rounds)
        print(
            "bare pika with a busy wait before each ack, at prefetch 1: "
            + ", ".join(f"{delay} us: ratio {ratio:.2f}" for delay, ratio in delays.items()),
            flush=True,
        )
        print(
            f"a thread wake-up round trip, which no message pays here "
            f"(pure Python, no broker): {_handoff_round_trip_microseconds():.1f} us",
            flush=True,
        )
        rss_kib, cpu_milliseconds = _idle_agent(url)
    print(f"idle agent: RSS {rss_kib / 1024:.1f} MiB, CPU {cpu_milliseconds:.2f} ms per second")
    return 0


# Broker selection.


@contextlib.contextmanager
def _broker_url() -> Iterator[str]:
    url = os.environ.get("RABBITMQ_URL")
    if url:
        yield url
        return
    with _testenv_broker_url() as started:
        yield started


@contextlib.contextmanager
def _testenv_broker_url() -> Iterator[str]:
    # The same source of a broker as the tests: the `make env-up` broker when
    # it runs, else a private node that stops at the end.
    try:
        from openchecker_testenv.layout import StateLayout, default_state_dir
        from openchecker_testenv.session import SessionEnvironment
    except ImportError as error:
        raise SystemExit(
            f"No broker: RABBITMQ_URL is not set and openchecker_testenv is not importable "
            f"({error}). Set RABBITMQ_URL=amqp://user:password@host:port/vhost or run "
            "`make env-up` and `source .local/env`."
        ) from error
    environment = SessionEnvironment(StateLayout(default_state_dir()))
    try:
        yield environment.broker().amqp_url()
    finally:
        environment.close()


# One comparison: bare and agent consumers, alternating, median of rounds.


@dataclass
class Measured:
    """One consumer's median messages per second and context switches per message."""

    rate: float
    switches: float

    @classmethod
    def of(cls, rounds: list[tuple[float, float]]) -> Measured:
        return cls(
            statistics.median(rate for rate, _ in rounds),
            statistics.median(switches for _, switches in rounds),
        )


def _compare(
    url: str, prefetch: int, count: int, rounds: int, task_seconds: float = 0.0
) -> tuple[Measured, Measured, list[float]]:
    """Return both consumers' medians and the agent's ratio in each round."""
    bare: list[tuple[float, float]] = []
    agent: list[tuple[float, float]] = []
    for _ in range(rounds):
        bare.append(_run_round(url, prefetch, count, _consume_bare, task_seconds))
        agent.append(_run_round(url, prefetch, count, _consume_with_agent, task_seconds))
    ratios = [mine[0] / theirs[0] for mine, theirs in zip(agent, bare, strict=True)]
    return Measured.of(bare), Measured.of(agent), ratios


def _run_round(
    url: str,
    prefetch: int,
    count: int,
    consume: Callable[[str, str, int, Stopwatch], None],
    task_seconds: float = 0.0,
) -> tuple[float, float]:
    """Return messages per second and thread context switches per message."""
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True)
        body = json.dumps({"command_list": [], "task_metadata": {"bench": True}}).encode()
        for _ in range(count):
            channel.basic_publish("", queue, body)
        # A passive declare returns only after the broker has taken every
        # publish above, so the consumer starts with a full queue.
        channel.queue_declare(queue, passive=True)
        stopwatch = Stopwatch(count, task_seconds)
        consume(url, queue, prefetch, stopwatch)
        channel.queue_delete(queue)
    finally:
        connection.close()
    if not stopwatch.done.is_set():
        raise SystemExit(
            f"a consumer got {stopwatch.received} of {count} messages "
            f"within {ROUND_TIMEOUT_SECONDS:.0f} s"
        )
    return stopwatch.rate(), stopwatch.switches_per_message()


class Stopwatch:
    """A timer of one consumer, from its first message to its last one.

    Connecting and registering the consumer fall outside the time, so the
    rate is each consumer's steady rate, whatever its start costs. It is
    safe to call from the consumer's threads, and its lock costs both
    consumers the same.
    """

    def __init__(self, count: int, task_seconds: float = 0.0) -> None:
        self.count = count
        self.task_seconds = task_seconds
        self.received = 0
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._first = 0.0
        self._last = 0.0
        self._switches_at_first = 0
        self._switches_at_last = 0

    def message(self) -> None:
        """Count one message; the consumer calls it once per message, as it handles it."""
        with self._lock:
            self.received += 1
            if self.received == 1:
                self._switches_at_first = _context_switches()
                self._first = time.perf_counter()
            elif self.received == self.count:
                self._last = time.perf_counter()
                self._switches_at_last = _context_switches()
                self.done.set()

    def handle(self) -> None:
        """Count one message, then sleep for the round's task time, as a handler would."""
        self.message()
        if self.task_seconds:
            time.sleep(self.task_seconds)

    def rate(self) -> float:
        return (self.count - 1) / (self._last - self._first)

    def switches_per_message(self) -> float:
        return (self._switches_at_last - self._switches_at_first) / (self.count - 1)


def _context_switches() -> int:
    """Voluntary and involuntary context switches of this process's live threads.

    Read at the first and at the last message, while the consumer's threads
    all run, so the difference covers every thread that consumed.
    """
    total = 0
    for status in Path("/proc/self/task").glob("*/status"):
        with contextlib.suppress(FileNotFoundError):
            for line in status.read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                    total += int(line.split()[1])
    return total


def _ack_delay_cost(url: str, count: int, rounds: int) -> dict[int, float]:
    """Return the median ratio of bare pika with a busy wait before each ack, by wait in us.

    This shows what a delay between receiving a message and acking it costs
    at prefetch 1 on this machine and broker, the delay the agent's own
    work adds.
    """
    plain: list[float] = []
    delayed: dict[int, list[float]] = {delay: [] for delay in ACK_DELAYS_MICROSECONDS}
    for _ in range(rounds):
        plain.append(_run_round(url, 1, count, _consume_bare)[0])
        for delay, rates in delayed.items():
            consume = functools.partial(_consume_bare, ack_delay_microseconds=delay)
            rates.append(_run_round(url, 1, count, consume)[0])
    return {
        delay: statistics.median(rate / base for rate, base in zip(rates, plain, strict=True))
        for delay, rates in delayed.items()
    }


def _consume_bare(
    url: str, queue: str, prefetch: int, stopwatch: Stopwatch, ack_delay_microseconds: int = 0
) -> None:
    connection = pika.BlockingConnection(_parameters(url))
    delay_seconds = ack_delay_microseconds / 1e6
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=prefetch)

        def on_message(
            channel: Any, method: Any, _properties: pika.BasicProperties, _body: bytes
        ) -> None:
            stopwatch.handle()
            if delay_seconds:
                # A busy wait, not a sleep: the thread stays on its core, as
                # the agent's own work before the ack does.
                until = time.perf_counter() + delay_seconds
                while time.perf_counter() < until:
                    pass
            channel.basic_ack(method.delivery_tag)

        channel.basic_consume(queue, on_message)
        deadline = time.monotonic() + ROUND_TIMEOUT_SECONDS
        while not stopwatch.done.is_set() and time.monotonic() < deadline:
            connection.process_data_events(time_limit=1.0)
    finally:
        connection.close()


def _consume_with_agent(url: str, queue: str, prefetch: int, stopwatch: Stopwatch) -> None:
    def handle(_message: Mapping[str, Any], _context: HandlerContext) -> None:
        stopwatch.handle()

    consumer = Consumer(_agent_settings(url, queue, prefetch), handle, AgentMetrics())
    thread = threading.Thread(target=consumer.run, name="bench-agent", daemon=True)
    thread.start()
    # The last handler call ends the time; its ack follows within
    # microseconds, which is noise next to thousands of messages.
    stopwatch.done.wait(ROUND_TIMEOUT_SECONDS)
    consumer.request_stop()
    thread.join(30)


def _parameters(url: str) -> pika.ConnectionParameters:
    # The same parameters the agent builds, so both sides differ only in
    # what the agent does around each message.
    return Consumer(
        _agent_settings(url, "unused", 1), lambda _m, _c: None, AgentMetrics()
    ).parameters


def _agent_settings(url: str, queue: str, prefetch: int) -> AgentSettings:
    parsed = urlparse(url)
    vhost = unquote(parsed.path[1:]) if len(parsed.path) > 1 else "/"
    config = (
        "[RabbitMQ]\n"
        f"host = {parsed.hostname}\nport = {parsed.port or 5672}\n"
        f"username = {unquote(parsed.username or 'guest')}\n"
        f"password = {unquote(parsed.password or 'guest')}\n"
        f"vhost = {vhost}\nheartbeat_interval_s = 60\nconnection_name = agent-bench\n"
        "[Agent]\n"
        f"queue = {queue}\nprefetch_count = {prefetch}\nhealth_port = 0\n"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".ini", delete=False) as stream:
        stream.write(config)
    try:
        return load_settings(Path(stream.name), environ={})
    finally:
        os.unlink(stream.name)


def _handoff_round_trip_microseconds(rounds: int = 20_000) -> float:
    """Time a message going to another thread and back, as each delivery does.

    This is the floor under the agent's extra cost per message at prefetch 1,
    set by how fast the OS wakes a sleeping thread (slower across cores).
    """
    to_worker: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    to_caller: queue.SimpleQueue[int] = queue.SimpleQueue()

    def echo() -> None:
        while (item := to_worker.get()) is not None:
            to_caller.put(item)

    worker = threading.Thread(target=echo, daemon=True)
    worker.start()
    started = time.perf_counter()
    for index in range(rounds):
        to_worker.put(index)
        to_caller.get()
    elapsed = time.perf_counter() - started
    to_worker.put(None)
    worker.join()
    return elapsed / rounds * 1e6


# Idle memory of a real agent process.


def _idle_agent(url: str) -> tuple[int, float]:
    """Return an idle agent's resident memory in KiB and its CPU milliseconds per second.

    The agent starts, connects and settles for IDLE_SECONDS; its CPU time
    is then measured over IDLE_CPU_SECONDS of an empty queue.
    """
    queue = f"bench-idle-{uuid.uuid4().hex[:8]}"
    settings = _agent_settings(url, queue, 1)
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.queue_declare(queue, durable=True)
    with tempfile.TemporaryDirectory(prefix="agent-bench-") as folder:
        config = Path(folder) / "config.ini"
        config.write_text(_render(settings, "openchecker_agent.checks:handle_check_request"))
        agent = subprocess.Popen(
            [sys.executable, "-m", "openchecker_agent", "--config", str(config)],
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(IDLE_SECONDS)
            cpu_before = _cpu_seconds(agent.pid)
            time.sleep(IDLE_CPU_SECONDS)
            cpu_milliseconds = (_cpu_seconds(agent.pid) - cpu_before) * 1000 / IDLE_CPU_SECONDS
            status = Path(f"/proc/{agent.pid}/status").read_text()
        finally:
            agent.terminate()
            agent.wait(30)
    channel.queue_delete(queue)
    connection.close()
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]), cpu_milliseconds
    raise SystemExit("VmRSS not found in /proc/PID/status")


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process, from /proc/PID/stat."""
    # The fields after the command name, which is in parentheses and may hold spaces.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _render(settings: AgentSettings, handler: str) -> str:
    rabbitmq = settings.rabbitmq
    return (
        "[RabbitMQ]\n"
        f"host = {rabbitmq.host}\nport = {rabbitmq.port}\nusername = {rabbitmq.username}\n"
        f"password = {rabbitmq.password.get_secret_value()}\nvhost = {rabbitmq.vhost}\n"
        "[Agent]\n"
        f"queue = {settings.agent.queue}\nhandler = {handler}\nhealth_port = 0\n"
    )


if __name__ == "__main__":
    sys.exit(main())
