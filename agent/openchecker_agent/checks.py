"""The built-in handler: run the configured commands of a check request and post results.

A check request names commands from `[Command:NAME]` sections. Each command
is an argv template in which `{project_url}`, `{workdir}` and `{task_id}`
are replaced inside single arguments. The argv goes to the program without
a shell, so a crafted `project_url` stays one argument.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .callbacks import check_callback_url, post_results
from .config import PLACEHOLDER_PATTERN, CommandSettings
from .errors import PermanentTaskError
from .handlers import HandlerContext

logger = logging.getLogger(__name__)

# Keeps the callback body bounded however much a command prints; the end of
# the output is kept because errors and summaries come last.
MAX_OUTPUT_CHARACTERS = 64 * 1024
# Environment variables with this prefix hold the agent's settings, such as
# the broker password, and are not passed to commands.
SECRET_ENV_PREFIX = "OPENCHECKER_"
TASK_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class CheckRequest(BaseModel):
    """The JSON body of a check request message."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    command_list: list[str] = Field(min_length=1)
    project_url: str = Field(min_length=1)
    callback_url: str = Field(min_length=1)
    task_metadata: dict[str, Any]


def handle_check_request(message: Mapping[str, Any], context: HandlerContext) -> None:
    """Run the request's commands in a fresh working folder and POST the results.

    Raises PermanentTaskError (the message is dead-lettered) for an invalid
    request, an unknown command, a callback host that is not allowed, or a
    callback that failed after every attempt.
    """
    request = parse_check_request(message)
    settings = context.settings
    commands = [_find_command(name, settings.commands) for name in request.command_list]
    _check_project_url(request.project_url)
    callback_host = check_callback_url(request.callback_url, settings.agent.callback_allowed_hosts)
    task_id = _task_id(request)
    logger.info(
        "Running task %s: commands %s, results to host %r.",
        task_id,
        ", ".join(request.command_list),
        callback_host,
    )
    results = _run_commands(commands, request, task_id, Path(settings.agent.workdir))
    payload = {
        "task_metadata": request.task_metadata,
        "project_url": request.project_url,
        "results": results,
    }
    post_results(
        request.callback_url,
        payload,
        timeout_seconds=settings.agent.callback_timeout_s,
        max_attempts=settings.agent.callback_max_attempts,
    )


def parse_check_request(message: Mapping[str, Any]) -> CheckRequest:
    """Validate a decoded message; raise PermanentTaskError naming the first bad field."""
    try:
        return CheckRequest.model_validate(message)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "message"
        raise PermanentTaskError(f"invalid check request: {field}: {first['msg']}") from None


def build_argv(template: tuple[str, ...], values: Mapping[str, str]) -> list[str]:
    """Replace placeholders inside each argument, in one pass.

    A value that itself contains `{workdir}` or similar is not expanded again,
    and no value is ever split into several arguments.
    """

    def replace(match: re.Match[str]) -> str:
        return values.get(match.group(1), match.group(0))

    return [PLACEHOLDER_PATTERN.sub(replace, argument) for argument in template]


def _find_command(name: str, commands: Mapping[str, CommandSettings]) -> CommandSettings:
    command = commands.get(name)
    if command is None:
        known = ", ".join(sorted(commands)) or "none"
        raise PermanentTaskError(
            f"unknown command {name!r}; this agent runs only its configured commands ({known})"
        )
    return command


def _check_project_url(project_url: str) -> None:
    # A leading '-' would reach programs such as git as an option
    # (--upload-pack=... runs a command), so it is rejected outright.
    if project_url.startswith("-"):
        raise PermanentTaskError("project_url starts with '-', which a program reads as an option")
    if "\x00" in project_url:
        raise PermanentTaskError("project_url contains a NUL character")


def _task_id(request: CheckRequest) -> str:
    task_id = str(request.task_metadata.get("task_id", ""))
    if not TASK_ID_PATTERN.match(task_id):
        raise PermanentTaskError(
            "task_metadata.task_id is missing or invalid; expected 1 to 128 letters, "
            "digits, '.', '_', ':' or '-'"
        )
    return task_id


def _run_commands(
    commands: list[CommandSettings], request: CheckRequest, task_id: str, workdir_root: Path
) -> list[dict[str, Any]]:
    workdir_root.mkdir(parents=True, exist_ok=True)
    # A fresh folder per task: concurrent tasks (prefetch > 1) and a
    # redelivered task never see each other's files.
    workdir = Path(tempfile.mkdtemp(prefix="task-", dir=workdir_root))
    try:
        values = {
            "project_url": request.project_url,
            "workdir": str(workdir),
            "task_id": task_id,
        }
        return [_run_command(command, values, workdir) for command in commands]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class TaskAbandonedError(RuntimeError):
    """The agent stopped and killed the task's command; the message was requeued."""


class RunningCommands:
    """Command processes of the built-in handler that have not exited yet; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._processes: set[subprocess.Popen[bytes]] = set()
        # Set by kill_all: a killed command's task must not post results.
        self.stopped = threading.Event()

    def add(self, process: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._processes.add(process)
        # A command that started while kill_all ran is killed here instead.
        if self.stopped.is_set():
            _kill_process_group(process)

    def discard(self, process: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._processes.discard(process)

    def kill_all(self) -> int:
        """Kill the process group of every running command; return how many were running."""
        self.stopped.set()
        with self._lock:
            processes = list(self._processes)
        for process in processes:
            _kill_process_group(process)
        return len(processes)


# The handler is a plain function called from worker threads, so the agent's
# stop reaches its commands through this module-level registry.
RUNNING_COMMANDS = RunningCommands()


def stop_running_commands() -> int:
    """Kill the commands of tasks still running, such as those past the drain timeout.

    Returns how many commands were running. Their tasks were requeued, so a
    command left running would work beside the agent that takes the message
    next.
    """
    return RUNNING_COMMANDS.kill_all()


def _kill_process_group(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        # Reaped already: its process group id may belong to another process now.
        return
    # ProcessLookupError: the group has exited already.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _run_command(
    command: CommandSettings, values: Mapping[str, str], workdir: Path
) -> dict[str, Any]:
    argv = build_argv(command.argv, values)
    result: dict[str, Any] = {
        "command": command.name,
        "exit_code": None,
        "timed_out": False,
        "stdout": "",
        "stderr": "",
        "error": None,
    }
    started = time.monotonic()
    try:
        # A session of its own makes the program and its children one process
        # group, which a timeout or the agent's stop kills as a whole.
        process = subprocess.Popen(
            argv,
            cwd=workdir,
            env=_command_environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as error:
        # The program is missing or not executable: a configuration problem
        # that the results report instead of failing the whole task.
        result["error"] = f"cannot run {argv[0]!r}: {error.strerror or error}"
    else:
        RUNNING_COMMANDS.add(process)
        try:
            stdout, stderr = process.communicate(timeout=command.timeout_s)
        except subprocess.TimeoutExpired:
            # What the program printed before the kill is kept.
            _kill_process_group(process)
            stdout, stderr = process.communicate()
            result.update(timed_out=True, stdout=_tail(stdout), stderr=_tail(stderr))
            result["error"] = f"timed out after {command.timeout_s:g} s"
        else:
            result.update(exit_code=process.returncode, stdout=_tail(stdout), stderr=_tail(stderr))
        finally:
            RUNNING_COMMANDS.discard(process)
        if RUNNING_COMMANDS.stopped.is_set():
            raise TaskAbandonedError(
                f"command {command.name} was killed because the agent stopped"
            )
    result["duration_seconds"] = round(time.monotonic() - started, 3)
    logger.info(
        "Command %s finished: exit code %s, %.1f s%s.",
        command.name,
        result["exit_code"],
        result["duration_seconds"],
        ", timed out" if result["timed_out"] else "",
    )
    return result


def _command_environment() -> dict[str, str]:
    return {
        name: value
        for name, value in os.environ.items()
        if not name.upper().startswith(SECRET_ENV_PREFIX)
    }


def _tail(output: bytes | str | None) -> str:
    if output is None:
        return ""
    text = output.decode("utf-8", errors="replace") if isinstance(output, bytes) else output
    return text[-MAX_OUTPUT_CHARACTERS:]
