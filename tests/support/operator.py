"""The operator as a real subprocess, for integration tests.

`OperatorProcess` runs `python -m openchecker_operator --standalone
--namespace NS` with KUBECONFIG set, appends its output to a log file,
and can stop and restart it. Tests read the log to count events such as
declares, and the fixtures check it for tracebacks.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

# The operator logs this line once its startup handler has run; the
# resource watches start right after it.
STARTED_PATTERN = re.compile(r"Operator started: resync every")
TRACEBACK_MARKER = "Traceback (most recent call last):"
# Seconds the operator gets to exit after SIGTERM before SIGKILL.
STOP_TIMEOUT_SECONDS = 20.0
START_TIMEOUT_SECONDS = 30.0
# Short enough that tests of the resync timer finish quickly, long enough
# that a test of several resources does not keep both cores busy.
DEFAULT_RESYNC_INTERVAL_SECONDS = 2.0


class OperatorStartError(AssertionError):
    """The operator exited or did not report its start in time; the message has its log."""


class OperatorProcess:
    """One operator subprocess serving the given namespaces."""

    def __init__(
        self,
        namespaces: Sequence[str],
        kubeconfig: Path,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        resync_interval_seconds: float = DEFAULT_RESYNC_INTERVAL_SECONDS,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.namespaces = list(namespaces)
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.extra_args = list(extra_args)
        self.env = {
            "OPENCHECKER_OPERATOR_RESYNC_INTERVAL_SECONDS": str(resync_interval_seconds),
            "OPENCHECKER_OPERATOR_RESYNC_INITIAL_DELAY_SECONDS": "1",
            **(env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def command(self) -> list[str]:
        """Return the operator's command line."""
        namespace_args = [arg for name in self.namespaces for arg in ("--namespace", name)]
        return [
            sys.executable,
            "-m",
            "openchecker_operator",
            "--standalone",
            *namespace_args,
            *self.extra_args,
        ]

    def start(self, wait: bool = True) -> None:
        """Start the operator; with `wait`, block until it logs its start.

        Raises OperatorStartError, with the log, when it exits or takes
        longer than START_TIMEOUT_SECONDS.
        """
        if self.running:
            raise RuntimeError("The operator process is already running.")
        environment = {**os.environ, "KUBECONFIG": str(self.kubeconfig), **self.env}
        environment["PYTHONUNBUFFERED"] = "1"
        offset = self.log_size()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"=== operator start {self.starts + 1}: {' '.join(self.command)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                start_new_session=True,
            )
        self.starts += 1
        if wait:
            self.wait_started(offset)

    def wait_started(self, offset: int = 0) -> None:
        """Wait until the log after `offset` shows the startup line."""
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if STARTED_PATTERN.search(self.log_text(offset)):
                return
            if not self.running:
                raise OperatorStartError(
                    f"The operator exited with code {self.returncode} at start:\n{self.log_tail()}"
                )
            time.sleep(0.1)
        raise OperatorStartError(
            f"The operator did not log its start within {START_TIMEOUT_SECONDS} s:\n"
            f"{self.log_tail()}"
        )

    def stop(self, timeout_seconds: float = STOP_TIMEOUT_SECONDS) -> int | None:
        """Stop the operator with SIGTERM, then SIGKILL; return its exit code."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_seconds)
            except subprocess.TimeoutExpired:
                # kopf did not finish its cleanup in time; the test still
                # needs the process gone before the next start.
                process.kill()
                process.wait(10)
        return process.returncode

    def restart(self) -> None:
        """Stop the operator and start it again with the same settings."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        """True while the subprocess runs."""
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit code, or None while running or before the first start."""
        return None if self.process is None else self.process.poll()

    def log_size(self) -> int:
        """Return the log's size in bytes; an offset for `log_text`."""
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_text(self, offset: int = 0) -> str:
        """Return the log from byte `offset` on."""
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return log.read().decode("utf-8", errors="replace")

    def log_tail(self, lines: int = 80) -> str:
        """Return the last `lines` lines of the log."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def count(self, pattern: str, offset: int = 0) -> int:
        """Return how many log lines after `offset` match the regular expression."""
        compiled = re.compile(pattern)
        return sum(1 for line in self.log_text(offset).splitlines() if compiled.search(line))

    def tracebacks(self) -> list[str]:
        """Return each traceback in the log, with the lines that follow it."""
        lines = self.log_text().splitlines()
        return [
            "\n".join(lines[index : index + 30])
            for index, line in enumerate(lines)
            if TRACEBACK_MARKER in line
        ]
