"""The built-in check handler in a real agent: no shell, allowed callback hosts only."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from openchecker_testenv.broker import Broker
from support import wait_for
from support_agent import (
    AgentProcess,
    CallbackServer,
    declare_work_queue,
    publish,
    queue_counts,
    serve_callbacks,
    start_agent,
    take_messages,
    write_agent_config,
)

pytestmark = pytest.mark.broker

QUEUE = "checks"
DLQ = f"{QUEUE}.dlq"
# Writes its arguments after the first one, as JSON, to the file named by the first.
RECORD_ARGS = "import json, sys; open(sys.argv[1], 'w').write(json.dumps(sys.argv[2:]))"


@pytest.fixture
def callbacks() -> Iterator[CallbackServer]:
    yield from serve_callbacks()


@pytest.fixture
def agent(tmp_path: Path, broker: Broker, vhost: str) -> Iterator[AgentProcess]:
    """An agent with the built-in handler and one command that records its argv."""
    args_file = tmp_path / "args.json"
    argv = [sys.executable, "-c", RECORD_ARGS, str(args_file), "{project_url}", "{task_id}"]
    commands = textwrap.dedent(
        f"""
        [Command:record]
        argv = {json.dumps(argv)}
        timeout_s = 30
        """
    )
    declare_work_queue(broker, vhost, QUEUE)
    config, name = write_agent_config(
        tmp_path,
        broker,
        vhost,
        QUEUE,
        handler="openchecker_agent.checks:handle_check_request",
        extra=commands,
    )
    process = start_agent(config, name)
    wait_for(
        lambda: queue_counts(broker, vhost, QUEUE)[1] == 1 or process.process.poll() is not None,
        timeout_seconds=20,
        message="the agent did not start consuming",
    )
    assert process.process.poll() is None, f"the agent exited early; its log:\n{process.log()}"
    yield process
    if process.process.poll() is None:
        process.process.kill()
        process.process.wait(10)


def check_request(
    callback_url: str, project_url: str, command: str = "record"
) -> dict[str, object]:
    return {
        "command_list": [command],
        "project_url": project_url,
        "callback_url": callback_url,
        "task_metadata": {"task_id": "task-1"},
    }


@pytest.mark.timeout(60)
def test_crafted_project_url_runs_nothing(
    agent: AgentProcess,
    callbacks: CallbackServer,
    tmp_path: Path,
    broker: Broker,
    vhost: str,
) -> None:
    marker = tmp_path / "marker"
    project_url = (
        f"https://example.org/x.git; touch {marker}; $(touch {marker}) `touch {marker}`"
        f"\ntouch {marker} && touch {marker} | touch {marker} '\"{{workdir}}"
    )
    publish(broker, vhost, QUEUE, check_request(callbacks.url, project_url))

    wait_for(
        lambda: callbacks.bodies,
        timeout_seconds=20,
        message=f"no callback arrived; agent log:\n{agent.log()}",
    )
    arguments = json.loads((tmp_path / "args.json").read_text())
    assert arguments == [project_url, "task-1"]
    assert not marker.exists()
    result = callbacks.bodies[0]["results"][0]
    assert result["command"] == "record"
    assert result["exit_code"] == 0
    assert callbacks.bodies[0]["task_metadata"] == {"task_id": "task-1"}
    wait_for(
        lambda: queue_counts(broker, vhost, QUEUE) == (0, 1),
        timeout_seconds=10,
        message="the check request was not acked",
    )
    assert agent.stop() == 0


@pytest.mark.timeout(60)
def test_option_like_project_url_is_dead_lettered(
    agent: AgentProcess, callbacks: CallbackServer, tmp_path: Path, broker: Broker, vhost: str
) -> None:
    publish(broker, vhost, QUEUE, check_request(callbacks.url, "--upload-pack=touch /tmp/x"))

    wait_for(
        lambda: queue_counts(broker, vhost, DLQ)[0] == 1,
        timeout_seconds=15,
        message=f"the request was not dead-lettered; agent log:\n{agent.log()}",
    )
    assert not (tmp_path / "args.json").exists()
    assert callbacks.bodies == []
    assert agent.stop() == 0


@pytest.mark.timeout(60)
def test_unknown_command_and_host_are_dead_lettered(
    agent: AgentProcess, callbacks: CallbackServer, tmp_path: Path, broker: Broker, vhost: str
) -> None:
    project_url = "https://example.org/project.git"
    publish(broker, vhost, QUEUE, check_request(callbacks.url, project_url, command="rm"))
    elsewhere = callbacks.url.replace("127.0.0.1", "localhost")
    publish(broker, vhost, QUEUE, check_request(elsewhere, project_url))

    wait_for(
        lambda: queue_counts(broker, vhost, DLQ)[0] == 2,
        timeout_seconds=15,
        message=f"the requests were not dead-lettered; agent log:\n{agent.log()}",
    )
    dead = take_messages(broker, vhost, DLQ)
    assert [headers["x-death"][0]["reason"] for headers, _body in dead] == [
        "rejected",
        "rejected",
    ]
    assert not (tmp_path / "args.json").exists()
    assert callbacks.bodies == []
    log = agent.log()
    assert "unknown command 'rm'" in log
    assert "callback host 'localhost' is not in [Agent] callback_allowed_hosts" in log
    assert agent.stop() == 0


def process_running(pid: int) -> bool:
    """Return whether `pid` is a live process; a zombie counts as ended."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.timeout(90)
def test_drain_timeout_stops_running_command(
    tmp_path: Path, broker: Broker, vhost: str, callbacks: CallbackServer
) -> None:
    pid_file = tmp_path / "command.pid"
    write_pid_then_sleep = (
        "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)"
    )
    argv = [sys.executable, "-c", write_pid_then_sleep, str(pid_file)]
    commands = f"[Command:slow]\nargv = {json.dumps(argv)}\ntimeout_s = 120\n"
    declare_work_queue(broker, vhost, QUEUE)
    config, name = write_agent_config(
        tmp_path,
        broker,
        vhost,
        QUEUE,
        handler="openchecker_agent.checks:handle_check_request",
        drain_timeout_s=1,
        extra=commands,
    )
    agent = start_agent(config, name)
    request = check_request(callbacks.url, "https://example.org/p.git", "slow")
    publish(broker, vhost, QUEUE, request)
    wait_for(
        lambda: pid_file.exists() and pid_file.read_text(),
        30,
        message="the command never started",
    )
    pid = int(pid_file.read_text())

    agent.send_signal()
    exit_code = agent.wait()

    assert exit_code == 0, agent.log()
    # The task went back to the queue, so the command must not keep running
    # beside the agent that takes the message next.
    wait_for(lambda: not process_running(pid), 5, message=f"command process {pid} still runs")
    assert queue_counts(broker, vhost, QUEUE)[0] == 1
    assert callbacks.bodies == []
