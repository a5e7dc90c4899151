"""The agent's exit code and stderr for a bad configuration, as a real process."""

from __future__ import annotations

import subprocess
import sys
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
