"""A loopback HTTP server that receives the agents' result callbacks and counts them."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
RESULTS_PATH = "/results"
# Result bodies carry at most 64 KiB of output per command; this bounds a
# request from anything else that finds the port.
MAX_BODY_BYTES = 4 * 1024 * 1024


@dataclass
class ResultCounts:
    """Results received so far, by task id."""

    task_ids: set[str] = field(default_factory=set)
    # Callbacks for a task id already seen: a redelivered message that ran twice.
    duplicates: int = 0
    # Tasks whose results report a command that did not exit with 0.
    failed_command_task_ids: set[str] = field(default_factory=set)
    rejected_requests: int = 0


class ResultServer:
    """Counts POST /results/<task_id> requests on 127.0.0.1 and a free port."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = ResultCounts()
        self._server = ThreadingHTTPServer((LOOPBACK, 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="result-server", daemon=True
        )

    @property
    def url(self) -> str:
        """Base URL of the results endpoint. Agents post to `<url>/<task_id>`."""
        return f"http://{LOOPBACK}:{self._server.server_address[1]}{RESULTS_PATH}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def processed_count(self) -> int:
        """Return how many distinct tasks posted results."""
        with self._lock:
            return len(self._counts.task_ids)

    def snapshot(self) -> ResultCounts:
        """Return a copy of the counts."""
        with self._lock:
            return ResultCounts(
                task_ids=set(self._counts.task_ids),
                duplicates=self._counts.duplicates,
                failed_command_task_ids=set(self._counts.failed_command_task_ids),
                rejected_requests=self._counts.rejected_requests,
            )

    def record(self, task_id: str, payload: dict[str, Any]) -> None:
        with self._lock:
            if task_id in self._counts.task_ids:
                self._counts.duplicates += 1
                logger.warning("Received results for task %s a second time.", task_id)
            self._counts.task_ids.add(task_id)
            if any(result.get("exit_code") != 0 for result in payload.get("results", [])):
                self._counts.failed_command_task_ids.add(task_id)

    def record_rejected(self) -> None:
        with self._lock:
            self._counts.rejected_requests += 1

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class ResultHandler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the name http.server looks up
                status = server.handle_post(self)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                # One line per callback would bury the progress tables.
                logger.debug("Result server: " + format, *args)

        return ResultHandler

    def handle_post(self, request: BaseHTTPRequestHandler) -> HTTPStatus:
        """Record one callback and return the HTTP status to respond with."""
        prefix = f"{RESULTS_PATH}/"
        task_id = request.path[len(prefix) :] if request.path.startswith(prefix) else ""
        length = int(request.headers.get("Content-Length") or 0)
        if not task_id or length > MAX_BODY_BYTES:
            self.record_rejected()
            return HTTPStatus.BAD_REQUEST
        try:
            payload = json.loads(request.rfile.read(length))
        except ValueError:
            # Agents always post JSON; anything else is counted, not processed.
            self.record_rejected()
            return HTTPStatus.BAD_REQUEST
        if not isinstance(payload, dict):
            self.record_rejected()
            return HTTPStatus.BAD_REQUEST
        self.record(task_id, payload)
        return HTTPStatus.OK
