"""`make demo` in short: the demo process end to end against the session's servers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from openchecker_testenv.broker import Broker
from openchecker_testenv.controlplane import ControlPlane
from openchecker_testenv.layout import STATE_DIR_VARIABLE

MESSAGES = 20
# In every ten messages the demo publishes one invalid JSON body and one
# request for an unknown command, both dead-lettered.
EXPECTED_DEAD_LETTERED = 4
DEMO_TIMEOUT_SECONDS = 240
# Seconds the demo gets after SIGTERM to stop its agents and its operator.
STOP_TIMEOUT_SECONDS = 60


def summary_figure(output: str, name: str) -> int:
    """Return the number on the summary line `name:` of the demo's output."""
    match = re.search(rf"^\s+{re.escape(name)}:\s+(-?\d+)\b", output, re.MULTILINE)
    assert match is not None, f"no {name!r} line in the demo's summary:\n{output}"
    return int(match.group(1))


def run_demo(command: list[str], environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the demo; on timeout stop it with SIGTERM, so it stops its agents and operator."""
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=DEMO_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.terminate()
            stdout, stderr = process.communicate(timeout=STOP_TIMEOUT_SECONDS)
            pytest.fail(
                f"The demo did not finish within {DEMO_TIMEOUT_SECONDS} s:\n{stdout}{stderr}"
            )
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.timeout(DEMO_TIMEOUT_SECONDS + STOP_TIMEOUT_SECONDS + 30)
def test_short_demo_loses_nothing(
    control_plane: ControlPlane,
    broker: Broker,
    namespace: str,
    vhost: str,
    tmp_path: Path,
) -> None:
    plot = tmp_path / "demo.png"
    command = [
        sys.executable,
        "-m",
        "openchecker_testenv.demo",
        f"--messages={MESSAGES}",
        "--task-seconds=0.5",
        "--max-replicas=3",
        "--messages-per-replica=5",
        "--scale-down-stabilization-seconds=4",
        "--table-interval-seconds=10",
        f"--timeout-seconds={DEMO_TIMEOUT_SECONDS - 60}",
        f"--plot={plot}",
        f"--kubeconfig={control_plane.kubeconfig}",
        f"--rabbitmq-url={broker.amqp_url()}",
        f"--management-url={broker.management_url}",
        f"--namespace={namespace}",
        f"--vhost={vhost}",
    ]
    # The demo keeps its logs and the agents' config.ini under the state folder.
    environment = {**os.environ, STATE_DIR_VARIABLE: str(tmp_path / "state")}
    result = run_demo(command, environment)
    output = result.stdout + result.stderr

    assert result.returncode == 0, output
    assert summary_figure(result.stdout, "lost") == 0
    assert summary_figure(result.stdout, "published") == MESSAGES
    assert summary_figure(result.stdout, "dead-lettered") == EXPECTED_DEAD_LETTERED
    assert summary_figure(result.stdout, "processed") == MESSAGES - EXPECTED_DEAD_LETTERED
    assert summary_figure(result.stdout, "peak replicas") >= 1
    assert plot.stat().st_size > 0
    # The test broker's password may be a common word such as "guest", so
    # the check looks for it in the forms a leak would take.
    assert f":{broker.password}@" not in output
    assert f"password = {broker.password}" not in output
