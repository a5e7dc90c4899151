"""The agent's exit code and stderr for a bad configuration, as a real process."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

EXIT_CONFIG_ERROR = 2


def run_agent(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "openchecker_agent", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[RabbitMQ]\nhost = h\nusername = u\npassword = p\nport = x\n[Agent]\nqueue = q\n",
         "[RabbitMQ] port: invalid value 'x'"),
        ("[RabbitMQ]\nhost = h\nusername = u\npassword = p\n[Agent]\nqueue = q\n"
         "handler = missing_module_for_test:run\n",
         "[Agent] handler: cannot import module 'missing_module_for_test'"),
    ],
)  # fmt: skip
def test_bad_config_exits_2_with_one_line(tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "config.ini"
    config.write_text(text)

    result = run_agent(config)

    assert result.returncode == EXIT_CONFIG_ERROR
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"openchecker-agent: {config}")
    assert expected in lines[0]


@pytest.mark.timeout(60)
def test_missing_config_exits_2(tmp_path: Path) -> None:
    result = run_agent(tmp_path / "absent.ini")

    assert result.returncode == EXIT_CONFIG_ERROR
    assert "cannot read the config file" in result.stderr


def closed_loopback_port() -> int:
    """Return a loopback port that nothing listens on, as far as a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.mark.timeout(60)
def test_unreachable_broker_logs_one_line_per_attempt(tmp_path: Path) -> None:
    config = tmp_path / "config.ini"
    config.write_text(
        f"[RabbitMQ]\nhost = 127.0.0.1\nport = {closed_loopback_port()}\n"
        "username = u\npassword = p\n[Agent]\nqueue = q\nhealth_port = 0\n"
    )

    with subprocess.Popen(
        [sys.executable, "-m", "openchecker_agent", "--config", str(config)],
        stderr=subprocess.PIPE,
        text=True,
    ) as agent:
        time.sleep(3)
        agent.send_signal(signal.SIGTERM)
        _, stderr = agent.communicate(timeout=30)

    lines = stderr.strip().splitlines()
    attempts = [line for line in lines if "reconnecting in" in line]
    assert attempts, stderr
    assert "Traceback" not in stderr
    assert "Connection refused" in attempts[0]
    assert "pika" not in stderr
    assert len(lines) <= len(attempts) + 3, stderr
