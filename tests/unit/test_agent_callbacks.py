"""Callback delivery against a local HTTP server: retries, final failures, no redirects."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from openchecker_agent.callbacks import CallbackError, post_results


class ScriptedServer:
    """Responds to each POST with the next status of a script, then 204."""

    def __init__(self, statuses: list[int], headers: dict[str, str] | None = None) -> None:
        self.statuses = list(statuses)
        self.calls = 0
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the name http.server dispatches to)
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                scripted.calls += 1
                status = scripted.statuses.pop(0) if scripted.statuses else 204
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/cb"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def make_server() -> Iterator[type[ScriptedServer]]:
    servers: list[ScriptedServer] = []

    class Tracked(ScriptedServer):
        def __init__(self, statuses: list[int], headers: dict[str, str] | None = None) -> None:
            super().__init__(statuses, headers)
            servers.append(self)

    yield Tracked
    for server in servers:
        server.close()


@pytest.mark.timeout(30)
def test_retries_server_errors(make_server: type[ScriptedServer]) -> None:
    server = make_server([503, 502])

    post_results(server.url, {"ok": True}, timeout_seconds=5, max_attempts=3)

    assert server.calls == 3


@pytest.mark.timeout(30)
def test_gives_up_after_max_attempts(make_server: type[ScriptedServer]) -> None:
    server = make_server([500, 500, 500])

    with pytest.raises(CallbackError, match="HTTP 500"):
        post_results(server.url, {}, timeout_seconds=5, max_attempts=2)
    assert server.calls == 2


@pytest.mark.timeout(30)
def test_client_error_is_final(make_server: type[ScriptedServer]) -> None:
    server = make_server([400])

    with pytest.raises(CallbackError, match="HTTP 400"):
        post_results(server.url, {}, timeout_seconds=5, max_attempts=3)
    assert server.calls == 1


@pytest.mark.timeout(30)
def test_redirect_not_followed(make_server: type[ScriptedServer]) -> None:
    server = make_server([302], headers={"Location": "http://127.0.0.2:9/elsewhere"})

    with pytest.raises(CallbackError, match="HTTP 302"):
        post_results(server.url, {}, timeout_seconds=5, max_attempts=3)
    assert server.calls == 1


@pytest.mark.timeout(30)
def test_connection_refused_fails() -> None:
    with pytest.raises(CallbackError, match="failed after 2 attempt"):
        post_results("http://127.0.0.1:9/cb", {}, timeout_seconds=2, max_attempts=2)
