"""The health and metrics HTTP server: /healthz, /readyz and /metrics."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

logger = logging.getLogger(__name__)


class HealthServer:
    """Serves liveness, readiness and metrics on one port in a daemon thread.

    `is_alive` backs /healthz (liveness) and `is_ready` backs /readyz; each
    returns 200 when true and 503 otherwise.
    """

    def __init__(
        self,
        bind_address: str,
        port: int,
        *,
        is_alive: Callable[[], bool],
        is_ready: Callable[[], bool],
        registry: CollectorRegistry,
    ) -> None:
        handler = _make_request_handler(is_alive, is_ready, registry)
        self._server = ThreadingHTTPServer((bind_address, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="agent-health", daemon=True
        )

    @property
    def port(self) -> int:
        """The bound port, useful when 0 asked the kernel for a free one."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()
        logger.info("Health server listening on %s:%d.", self._server.server_address[0], self.port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _make_request_handler(
    is_alive: Callable[[], bool],
    is_ready: Callable[[], bool],
    registry: CollectorRegistry,
) -> type[BaseHTTPRequestHandler]:
    class RequestHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the name http.server dispatches to)
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                self._send_status(is_alive(), "alive", "consumer thread stopped")
            elif path == "/readyz":
                self._send_status(is_ready(), "ready", "not consuming")
            elif path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            else:
                self._send(404, b"not found\n", "text/plain; charset=utf-8")

        def _send_status(self, healthy: bool, good: str, bad: str) -> None:
            if healthy:
                self._send(200, f"{good}\n".encode(), "text/plain; charset=utf-8")
            else:
                self._send(503, f"{bad}\n".encode(), "text/plain; charset=utf-8")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            # Probes hit these paths every few seconds; logging each would
            # drown the agent's own log.
            return

    return RequestHandler
