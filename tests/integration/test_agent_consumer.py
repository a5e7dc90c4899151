"""The agent as a real process against the real broker: acks, reconnects, drain, DLQ."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from openchecker_testenv.broker import Broker
from support import wait_for
from support_agent import (
    AgentProcess,
    close_connection,
    connection_names,
    declare_work_queue,
    delete_queue,
    free_port,
    publish,
    queue_counts,
    queue_exists,
    read_records,
    start_agent,
    take_messages,
    write_agent_config,
)

pytestmark = pytest.mark.broker

QUEUE = "checks"
DLQ = f"{QUEUE}.dlq"


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    """Agents started by a test; any still running at its end is stopped."""
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        if agent.process.poll() is None:
            agent.process.kill()
            agent.process.wait(10)


def run_agent(
    agents: list[AgentProcess],
    tmp_path: Path,
    broker: Broker,
    vhost: str,
    **options: object,
) -> AgentProcess:
    """Declare the queues, start an agent and wait until it consumes."""
    declare_work_queue(broker, vhost, QUEUE)
    config, name = write_agent_config(tmp_path, broker, vhost, QUEUE, **options)  # type: ignore[arg-type]
    agent = start_agent(config, name)
    agents.append(agent)
    wait_for(
        lambda: queue_counts(broker, vhost, QUEUE)[1] == 1 or agent.process.poll() is not None,
        timeout_seconds=20,
        message="the agent did not start consuming",
    )
    assert agent.process.poll() is None, f"the agent exited early; its log:\n{agent.log()}"
    return agent


def wait_for_record(
    path: Path, event: str, count: int, agent: AgentProcess, timeout_seconds: float = 20
) -> list[dict[str, object]]:
    def enough() -> list[dict[str, object]] | None:
        records = [record for record in read_records(path) if record["event"] == event]
        return records if len(records) >= count else None

    return wait_for(
        enough,
        timeout_seconds=timeout_seconds,
        message=f"fewer than {count} '{event}' records; agent log:\n{agent.log()}",
    )


@pytest.mark.timeout(60)
def test_long_task_survives_short_heartbeat(
    agents: list[AgentProcess], tmp_path: Path, broker: Broker, vhost: str
) -> None:
    records = tmp_path / "records.jsonl"
    agent = run_agent(agents, tmp_path, broker, vhost, heartbeat_interval_s=2)
    publish(broker, vhost, QUEUE, {"id": 1, "sleep_seconds": 8, "record_file": str(records)})

    wait_for_record(records, "end", 1, agent, timeout_seconds=30)
    wait_for(
        lambda: queue_counts(broker, vhost, QUEUE) == (0, 1),
        timeout_seconds=10,
        message="the message was not acked after the task ended",
    )
    # Another thread served the connection during the long task; the next
    # message must still be received and run.
    publish(broker, vhost, QUEUE, {"id": 2, "record_file": str(records)})
    wait_for_record(records, "end", 2, agent, timeout_seconds=10)
    assert agent.stop() == 0
    assert queue_counts(broker, vhost, QUEUE) == (0, 0)
    starts = [record for record in read_records(records) if record["event"] == "start"]
    assert len(starts) == 2
    assert starts[0]["redelivered"] is False
    assert "Lost the broker connection" not in agent.log()


@pytest.mark.timeout(90)
def test_broker_closed_connection_redelivers_once(
    agents: list[AgentProcess], tmp_path: Path, broker: Broker, vhost: str
) -> None:
    records = tmp_path / "records.jsonl"
    port = free_port()
    agent = run_agent(agents, tmp_path, broker, vhost, health_port=port)
    # The management API lists a new connection only after its next
    # statistics update, a few seconds later, so it is looked up first.
    names = wait_for(
        lambda: connection_names(broker, agent.connection_name),
        timeout_seconds=20,
        message="the agent's connection is not listed by the management API",
    )
    publish(broker, vhost, QUEUE, {"id": 1, "sleep_seconds": 4, "record_file": str(records)})
    wait_for_record(records, "start", 1, agent)

    close_connection(broker, names[0])

    wait_for_record(records, "end", 2, agent, timeout_seconds=40)
    wait_for(
        lambda: queue_counts(broker, vhost, QUEUE) == (0, 1),
        timeout_seconds=15,
        message=f"the redelivered message was not acked; agent log:\n{agent.log()}",
    )
    # The first delivery's ack was dropped, not left in flight.
    metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert "openchecker_agent_messages_in_flight 0.0" in metrics
    assert "openchecker_agent_stale_settlements_total 1.0" in metrics
    assert "openchecker_agent_messages_processed_total 1.0" in metrics
    assert agent.stop() == 0
    assert queue_counts(broker, vhost, QUEUE) == (0, 0)
    starts = [record for record in read_records(records) if record["event"] == "start"]
    assert [record["redelivered"] for record in starts] == [False, True]
    log = agent.log()
    assert "CONNECTION_FORCED" in log
    assert "Dropped the ack of delivery tag 1" in log
    assert "unknown delivery tag" not in log
    assert "PRECONDITION_FAILED" not in log


@pytest.mark.timeout(60)
def test_sigterm_lets_running_task_finish(
    agents: list[AgentProcess], tmp_path: Path, broker: Broker, vhost: str
) -> None:
    records = tmp_path / "records.jsonl"
    agent = run_agent(agents, tmp_path, broker, vhost, drain_timeout_s=30)
    publish(broker, vhost, QUEUE, {"id": 1, "sleep_seconds": 3, "record_file": str(records)})
    wait_for_record(records, "start", 1, agent)

    agent.send_signal(signal.SIGTERM)

    assert agent.wait() == 0
    assert [record["event"] for record in read_records(records)] == ["start", "end"]
    assert queue_counts(broker, vhost, QUEUE) == (0, 0)


@pytest.mark.timeout(60)
def test_sigterm_past_drain_timeout_requeues(
    agents: list[AgentProcess], tmp_path: Path, broker: Broker, vhost: str
) -> None:
    records = tmp_path / "records.jsonl"
    agent = run_agent(agents, tmp_path, broker, vhost, drain_timeout_s=1)
    publish(broker, vhost, QUEUE, {"id": 1, "sleep_seconds": 8, "record_file": str(records)})
    wait_for_record(records, "start", 1, agent)

    started = time.monotonic()
    agent.send_signal(signal.SIGTERM)

    assert agent.wait() == 0
    assert time.monotonic() - started < 6
    assert queue_counts(broker, vhost, QUEUE) == (1, 0)
    assert "Requeued delivery tag 1" in agent.log()


@pytest.mark.timeout(60)
def test_failures_are_dead_lettered(
    agents: list[AgentProcess], tmp_path: Path, broker: Broker, vhost: str
) -> None:
    records = tmp_path / "records.jsonl"
    agent = run_agent(
        agents, tmp_path, broker, vhost, handler="support_agent_handlers:fail_when_asked"
    )
    # Too deeply nested for Python's JSON decoder, which raises RecursionError.
    nested = b"[" * 100_000
    publish(broker, vhost, QUEUE, {"id": 1, "fail": True, "record_file": str(records)})
    publish(broker, vhost, QUEUE, b"this is not JSON {")
    publish(broker, vhost, QUEUE, nested)
    publish(broker, vhost, QUEUE, {"id": 4, "exit": True, "record_file": str(records)})
    publish(broker, vhost, QUEUE, {"id": 5, "record_file": str(records)})

    wait_for(
        lambda: queue_counts(broker, vhost, DLQ)[0] == 4,
        timeout_seconds=15,
        message=f"the DLQ did not get all four failures; agent log:\n{agent.log()}",
    )
    wait_for_record(records, "start", 3, agent)
    assert queue_counts(broker, vhost, QUEUE) == (0, 1)
    dead = take_messages(broker, vhost, DLQ)
    reasons = [headers["x-death"][0]["reason"] for headers, _body in dead]
    assert reasons == ["rejected"] * 4
    assert [body for _headers, body in dead][1:3] == [b"this is not JSON {", nested]
    log = agent.log()
    assert "Handler failed on delivery tag 1" in log
    assert "Rejected delivery tag 2" in log
    assert "Rejected delivery tag 3" in log
    assert "Handler failed on delivery tag 4" in log
    assert agent.stop() == 0


@pytest.mark.timeout(90)
def test_consumes_again_after_queue_recreated(
    agents: list[AgentProcess], tmp_path: Path, broker: Broker, vhost: str
) -> None:
    records = tmp_path / "records.jsonl"
    agent = run_agent(agents, tmp_path, broker, vhost)

    delete_queue(broker, vhost, QUEUE)
    wait_for(
        lambda: "The broker cancelled consumer" in agent.log(),
        timeout_seconds=10,
        message="the agent did not notice the consumer cancel",
    )
    time.sleep(2)  # the agent checks for the missing queue a few times meanwhile
    assert not queue_exists(broker, vhost, QUEUE)
    declare_work_queue(broker, vhost, QUEUE)

    wait_for(
        lambda: queue_counts(broker, vhost, QUEUE)[1] == 1,
        timeout_seconds=30,
        message=f"the consumer did not come back; agent log:\n{agent.log()}",
    )
    publish(broker, vhost, QUEUE, {"id": 1, "record_file": str(records)})
    wait_for_record(records, "end", 1, agent)
    assert agent.process.poll() is None
    assert "was not found in vhost" in agent.log()
    assert agent.stop() == 0


@pytest.mark.timeout(120)
# Prefetch 1 runs each task inside pika's delivery callback; prefetch 2 does not.
@pytest.mark.parametrize("prefetch", [1, 2])
def test_old_tasks_keep_heartbeats_alive(
    agents: list[AgentProcess], tmp_path: Path, broker: Broker, vhost: str, prefetch: int
) -> None:
    # The tasks of the closed connection keep running, and the broker
    # redelivers their messages on the next one. The redeliveries must wait
    # for those tasks: otherwise every thread is in a task, none reads the
    # socket, and the broker closes the connection for missed heartbeats.
    records = tmp_path / "records.jsonl"
    agent = run_agent(
        agents, tmp_path, broker, vhost, prefetch_count=prefetch, heartbeat_interval_s=2
    )
    names = wait_for(
        lambda: connection_names(broker, agent.connection_name),
        timeout_seconds=20,
        message="the agent's connection is not listed by the management API",
    )
    for index in range(prefetch):
        publish(
            broker, vhost, QUEUE, {"id": index, "sleep_seconds": 8, "record_file": str(records)}
        )
    wait_for_record(records, "start", prefetch, agent)

    close_connection(broker, names[0])

    wait_for_record(records, "end", 2 * prefetch, agent, timeout_seconds=60)
    wait_for(
        lambda: queue_counts(broker, vhost, QUEUE) == (0, 1),
        timeout_seconds=15,
        message=f"the redelivered messages were not acked; agent log:\n{agent.log()}",
    )
    assert agent.stop() == 0
    log = agent.log()
    assert log.count("Lost the broker connection") == 1, log
    running = 0
    for record in sorted(read_records(records), key=lambda item: float(item["time"])):
        running += 1 if record["event"] == "start" else -1
        assert running <= prefetch, "more tasks ran at once than the prefetch count"


@pytest.mark.timeout(60)
def test_prefetch_runs_tasks_concurrently(
    agents: list[AgentProcess], tmp_path: Path, broker: Broker, vhost: str
) -> None:
    records = tmp_path / "records.jsonl"
    agent = run_agent(agents, tmp_path, broker, vhost, prefetch_count=3)
    for index in range(4):
        publish(
            broker, vhost, QUEUE, {"id": index, "sleep_seconds": 2, "record_file": str(records)}
        )

    wait_for_record(records, "end", 4, agent, timeout_seconds=30)
    events = [record["event"] for record in read_records(records)]
    # Three tasks start before any ends; the fourth waits for a free slot.
    assert events[:3] == ["start", "start", "start"]
    assert events.index("end") == 3
    assert agent.stop() == 0
    assert queue_counts(broker, vhost, QUEUE) == (0, 0)


@pytest.mark.timeout(60)
def test_new_message_starts_beside_long_task(
    agents: list[AgentProcess], tmp_path: Path, broker: Broker, vhost: str
) -> None:
    # The thread that received the long task runs it; another thread must
    # take over the connection to receive and start the second message.
    records = tmp_path / "records.jsonl"
    agent = run_agent(agents, tmp_path, broker, vhost, prefetch_count=2)
    publish(broker, vhost, QUEUE, {"id": "long", "sleep_seconds": 8, "record_file": str(records)})
    wait_for_record(records, "start", 1, agent)
    published = time.time()
    publish(broker, vhost, QUEUE, {"id": "short", "record_file": str(records)})

    ends = wait_for_record(records, "end", 1, agent)
    assert ends[0]["id"] == "short"
    assert float(ends[0]["time"]) - published < 3
    wait_for_record(records, "end", 2, agent, timeout_seconds=30)
    assert agent.stop() == 0
    assert queue_counts(broker, vhost, QUEUE) == (0, 0)


@pytest.mark.timeout(60)
def test_health_endpoints_and_metrics(
    agents: list[AgentProcess], tmp_path: Path, broker: Broker, vhost: str
) -> None:
    port = free_port()
    records = tmp_path / "records.jsonl"
    agent = run_agent(
        agents,
        tmp_path,
        broker,
        vhost,
        handler="support_agent_handlers:fail_when_asked",
        health_port=port,
    )
    base = f"http://127.0.0.1:{port}"
    publish(broker, vhost, QUEUE, {"id": 1, "record_file": str(records)})
    publish(broker, vhost, QUEUE, {"id": 2, "fail": True, "record_file": str(records)})
    wait_for(
        lambda: queue_counts(broker, vhost, DLQ)[0] == 1,
        timeout_seconds=15,
        message="the failing message did not reach the DLQ",
    )

    assert requests.get(f"{base}/healthz", timeout=5).status_code == 200
    assert requests.get(f"{base}/readyz", timeout=5).status_code == 200
    metrics = requests.get(f"{base}/metrics", timeout=5).text
    assert "openchecker_agent_messages_processed_total 1.0" in metrics
    assert "openchecker_agent_messages_failed_total 1.0" in metrics
    assert "openchecker_agent_messages_dead_lettered_total 1.0" in metrics
    assert "openchecker_agent_messages_in_flight 0.0" in metrics
    assert "openchecker_agent_processing_seconds_count 2.0" in metrics
    assert broker.password not in metrics

    delete_queue(broker, vhost, QUEUE)
    wait_for(
        lambda: requests.get(f"{base}/readyz", timeout=5).status_code == 503,
        timeout_seconds=10,
        message="/readyz stayed ready without a consumer",
    )
    assert requests.get(f"{base}/healthz", timeout=5).status_code == 200
    assert agent.stop() == 0
