"""Process groups of the local servers and their records in the state folder.

Each server starts in a new session, so its process group contains the server,
any wrapper script and the children they start. A record stores the leader's
pid together with its start time as the kernel reports it, so a later run can
stop servers left behind by a crashed run without touching an unrelated
process that reused the pid.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import PortInUseError, SetupError
from .ports import is_address_in_use

logger = logging.getLogger(__name__)

PROC = Path("/proc")
RECORD_SUFFIX = ".json"
# How often wait_until_ready reads the logs of starting servers for a port
# conflict.
LOG_SCAN_INTERVAL_SECONDS = 1.0


@dataclass(frozen=True)
class ProcessStat:
    """The fields of /proc/<pid>/stat that identify and group a process."""

    pid: int
    state: str
    parent_pid: int
    group_id: int
    start_ticks: int


def read_process_stat(pid: int) -> ProcessStat | None:
    """Return the stat fields of a process, or None when it does not exist."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name in brackets may contain spaces and parentheses, so the
    # fixed fields are counted from the last closing bracket: state is field
    # 3, ppid 4, pgrp 5 and starttime 22 in proc(5).
    fields = text[text.rindex(")") + 2 :].split()
    return ProcessStat(
        pid=pid,
        state=fields[0],
        parent_pid=int(fields[1]),
        group_id=int(fields[2]),
        start_ticks=int(fields[19]),
    )


def list_processes() -> list[ProcessStat]:
    """Return the stat fields of every process visible in /proc."""
    stats = []
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            stat = read_process_stat(int(entry.name))
            if stat is not None:
                stats.append(stat)
    return stats


def is_same_process_alive(pid: int, start_ticks: int) -> bool:
    """Return whether `pid` still runs the process that started at `start_ticks`.

    A zombie counts as exited because it no longer runs or listens on a port.
    """
    stat = read_process_stat(pid)
    return stat is not None and stat.start_ticks == start_ticks and stat.state != "Z"


@dataclass(frozen=True)
class ProcessRecord:
    """A started server as written to `<state>/pids/<name>.json`."""

    name: str
    pid: int
    start_ticks: int
    command: list[str]
    log_file: str

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.name}{RECORD_SUFFIX}"
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> ProcessRecord | None:
        """Read a record; return None for a file that is not a valid record."""
        try:
            data = json.loads(path.read_text())
            return cls(
                name=str(data["name"]),
                pid=int(data["pid"]),
                start_ticks=int(data["start_ticks"]),
                command=[str(part) for part in data["command"]],
                log_file=str(data["log_file"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            # A record cut short by a crash while it was written is treated
            # like a missing one; the caller deletes the file.
            logger.warning("Ignoring unreadable process record %s: %s.", path, error)
            return None

    def is_running(self) -> bool:
        return is_same_process_alive(self.pid, self.start_ticks)

    def find_tree(self) -> dict[int, int]:
        """Return pid -> start ticks of the group's members and their descendants.

        POSIX forbids reusing a pid while a process group with that id exists,
        so when another process has the leader's pid, the group is gone. Members
        started before the leader cannot belong to it either. Descendants are
        included because some children (Erlang's port helpers) move to a
        process group of their own.
        """
        stats = list_processes()
        for stat in stats:
            if stat.pid == self.pid and stat.start_ticks != self.start_ticks:
                return {}
        processes = [stat for stat in stats if stat.start_ticks >= self.start_ticks]
        tree = {stat.pid: stat.start_ticks for stat in processes if stat.group_id == self.pid}
        grew = True
        while grew:
            grew = False
            for stat in processes:
                if stat.pid not in tree and stat.parent_pid in tree:
                    tree[stat.pid] = stat.start_ticks
                    grew = True
        return tree


def stop_record(record: ProcessRecord, grace_seconds: float) -> None:
    """Stop every process of a record: SIGTERM, then SIGKILL after `grace_seconds`.

    A grace period of 0 sends SIGKILL at once, for servers whose data is
    thrown away. Raises SetupError when a process is still alive 5 seconds
    after SIGKILL.
    """
    tree = record.find_tree()
    if not tree:
        return
    if grace_seconds <= 0:
        logger.info("Killing %s (pid %d).", record.name, record.pid)
        alive = tree
    else:
        logger.info("Stopping %s (pid %d).", record.name, record.pid)
        # Only the leader gets SIGTERM, as a service manager would send it:
        # wrapper scripts pass it on, and servers stop their own helpers.
        _signal_all({record.pid: record.start_ticks}, signal.SIGTERM)
        alive = _wait_for_exit(tree, grace_seconds)
        if alive:
            logger.warning(
                "%s (pid %d) did not stop within %.0f s of SIGTERM; sending SIGKILL.",
                record.name,
                record.pid,
                grace_seconds,
            )
    if alive:
        _signal_all(alive, signal.SIGKILL)
        alive = _wait_for_exit(alive, 5.0)
    if alive:
        raise SetupError(
            f"Could not stop {record.name}: pids {sorted(alive)} survived SIGKILL. "
            "Check them with `ps` and stop them by hand."
        )


def _signal_all(tree: Mapping[int, int], signal_number: signal.Signals) -> None:
    for pid, start_ticks in tree.items():
        if not is_same_process_alive(pid, start_ticks):
            continue
        # It may exit between the check and the signal, which is the goal.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal_number)


def _wait_for_exit(tree: Mapping[int, int], timeout_seconds: float) -> dict[int, int]:
    deadline = time.monotonic() + timeout_seconds
    while True:
        alive = {pid: ticks for pid, ticks in tree.items() if is_same_process_alive(pid, ticks)}
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def stop_recorded_processes(folder: Path, grace_seconds: float) -> None:
    """Stop every process recorded in `folder` and delete the records.

    Used by `down` and to clean up after a crashed run: a record of a process
    that already exited is only deleted.
    """
    if not folder.is_dir():
        return
    records: list[tuple[ProcessRecord, Path]] = []
    for path in folder.glob(f"*{RECORD_SUFFIX}"):
        record = ProcessRecord.load(path)
        if record is None:
            path.unlink()
        else:
            records.append((record, path))
    # Newest first, the reverse of the start order: kube-apiserver waits for
    # etcd while it shuts down, so etcd must go last.
    records.sort(key=lambda item: item[0].start_ticks, reverse=True)
    for record, path in records:
        if record.find_tree():
            stop_record(record, grace_seconds)
        else:
            logger.info(
                "Removing the record of %s (pid %d), which is no longer running.",
                record.name,
                record.pid,
            )
        path.unlink()


def read_log_excerpt(path: Path, max_tail_lines: int = 25, max_error_lines: int = 8) -> str:
    """Return the first lines that mention an error and the last lines of a log.

    The first error is usually the cause; the lines after it (crash reports,
    shutdown messages) can push it out of a plain tail.
    """
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"({path} does not exist)"
    tail_start = max(0, len(lines) - max_tail_lines)
    errors = [line for line in lines[:tail_start] if "error" in line.lower()]
    excerpt = errors[:max_error_lines]
    if excerpt:
        excerpt.append("[...]")
    return "\n".join(excerpt + lines[tail_start:])


class ManagedProcess:
    """A server started in its own session with its output in a log file."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        *,
        log_file: Path,
        record_folder: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stop_grace_seconds: float = 10.0,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.log_file = log_file
        self.record_folder = record_folder
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.stop_grace_seconds = stop_grace_seconds
        self._popen: subprocess.Popen[bytes] | None = None
        self._record: ProcessRecord | None = None
        self._record_path: Path | None = None

    def start(self) -> None:
        """Start the process and record it.

        A process still running under the same record, left by a run that
        crashed, is stopped first so that its record is never lost.
        """
        record_path = self.record_folder / f"{self.name}{RECORD_SUFFIX}"
        if record_path.exists():
            earlier = ProcessRecord.load(record_path)
            if earlier is not None and earlier.find_tree():
                logger.warning(
                    "%s from an earlier run (pid %d) is still running; stopping it.",
                    self.name,
                    earlier.pid,
                )
                stop_record(earlier, self.stop_grace_seconds)
            record_path.unlink()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        logger.debug("Starting %s: %s", self.name, " ".join(self.command))
        # Each start gets a fresh log, so the tail shown on failure is this run's.
        with self.log_file.open("wb") as log:
            try:
                self._popen = subprocess.Popen(
                    self.command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    cwd=self.cwd,
                    start_new_session=True,
                )
            except OSError as error:
                raise SetupError(f"Could not run {self.command[0]}: {error}.") from error
        stat = read_process_stat(self._popen.pid)
        # The child cannot have been reaped yet because this process has not
        # waited for it.
        assert stat is not None
        self._record = ProcessRecord(
            name=self.name,
            pid=self._popen.pid,
            start_ticks=stat.start_ticks,
            command=self.command,
            log_file=str(self.log_file),
        )
        self._record_path = self._record.save(self.record_folder)

    @property
    def pid(self) -> int:
        return self._require_popen().pid

    def exit_code(self) -> int | None:
        """Return the exit code, or None while the process runs."""
        return self._require_popen().poll()

    def stop(self, grace_seconds: float | None = None) -> None:
        """Stop the process group and delete the record; a no-op when not started.

        `grace_seconds` overrides the grace period between SIGTERM and SIGKILL.
        """
        if self._record is not None:
            grace = self.stop_grace_seconds if grace_seconds is None else grace_seconds
            stop_record(self._record, grace)
        if self._popen is not None:
            # Reap the direct child so that no zombie remains in this process.
            self._popen.wait(timeout=5)
        if self._record_path is not None:
            self._record_path.unlink(missing_ok=True)
        self._record = None
        self._record_path = None

    def check_running(self, extra_logs: Sequence[Path] = ()) -> None:
        """Raise SetupError, with the log tail, when the process has exited."""
        code = self.exit_code()
        if code is None:
            return
        logs = self.format_logs(extra_logs)
        message = f"{self.name} exited with code {code} before it was ready.\n{logs}"
        if is_address_in_use(logs):
            raise PortInUseError(message)
        raise SetupError(message)

    def format_logs(self, extra_logs: Sequence[Path] = ()) -> str:
        parts = []
        for path in [self.log_file, *extra_logs]:
            parts.append(f"--- {path} (first errors and last lines) ---\n{read_log_excerpt(path)}")
        return "\n".join(parts)

    def _require_popen(self) -> subprocess.Popen[bytes]:
        if self._popen is None:
            raise RuntimeError(f"{self.name} has not been started")
        return self._popen


def wait_until_ready(
    description: str,
    check: Callable[[], bool],
    *,
    processes: Sequence[ManagedProcess],
    timeout_seconds: float,
    extra_logs: Sequence[Path] = (),
    interval_seconds: float = 0.1,
) -> float:
    """Poll `check` until it returns True; return the seconds it took.

    Raises SetupError (PortInUseError for a busy port) with the log tail when
    one of `processes` exits first or the timeout passes.
    """
    started = time.monotonic()
    deadline = started + timeout_seconds
    next_log_scan = started + LOG_SCAN_INTERVAL_SECONDS
    while True:
        for process in processes:
            process.check_running(extra_logs)
        if check():
            return time.monotonic() - started
        if time.monotonic() >= next_log_scan:
            next_log_scan += LOG_SCAN_INTERVAL_SECONDS
            # RabbitMQ keeps running for seconds after a listener failed to
            # bind, so the log shows the conflict long before the exit.
            logs = "\n".join(process.format_logs(extra_logs) for process in processes)
            if is_address_in_use(logs):
                raise PortInUseError(f"{description} failed to bind a port.\n{logs}")
        if time.monotonic() >= deadline:
            logs = "\n".join(process.format_logs(extra_logs) for process in processes)
            message = f"{description} was not ready after {timeout_seconds:.0f} s.\n{logs}"
            if is_address_in_use(logs):
                raise PortInUseError(message)
            raise SetupError(message)
        time.sleep(interval_seconds)
