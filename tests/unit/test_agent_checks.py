"""The built-in check handler's pure parts and its run against a local callback server."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from openchecker_agent.callbacks import check_callback_url
from openchecker_agent.checks import build_argv, handle_check_request, parse_check_request
from openchecker_agent.config import load_settings
from openchecker_agent.errors import PermanentTaskError
from openchecker_agent.handlers import HandlerContext
from support_agent import CallbackServer, serve_callbacks

VALUES = {"project_url": "https://example.org/p.git", "workdir": "/w", "task_id": "t1"}


@pytest.fixture
def callbacks() -> Iterator[CallbackServer]:
    yield from serve_callbacks()


def test_build_argv_substitutes_inside_arguments() -> None:
    argv = build_argv(("git", "clone", "{project_url}", "{workdir}/src", "--id={task_id}"), VALUES)

    assert argv == ["git", "clone", "https://example.org/p.git", "/w/src", "--id=t1"]


def test_build_argv_does_not_expand_values_again() -> None:
    values = {**VALUES, "project_url": "{workdir} {task_id}; rm -rf /"}

    argv = build_argv(("tool", "{project_url}"), values)

    assert argv == ["tool", "{workdir} {task_id}; rm -rf /"]


def test_parse_check_request_names_bad_field() -> None:
    message = {
        "command_list": "clone",
        "project_url": "u",
        "callback_url": "http://h/",
        "task_metadata": {},
    }

    with pytest.raises(PermanentTaskError, match="command_list"):
        parse_check_request(message)


def test_parse_check_request_requires_metadata_object() -> None:
    message = {
        "command_list": ["clone"],
        "project_url": "u",
        "callback_url": "http://h/",
        "task_metadata": [1],
    }

    with pytest.raises(PermanentTaskError, match="task_metadata"):
        parse_check_request(message)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://evil.example/cb", "not in \\[Agent\\] callback_allowed_hosts"),
        ("ftp://api.example.org/cb", "scheme 'ftp'"),
        ("http://api.example.org.evil.example/cb", "not in"),
        ("http:///nohost", "not in"),
    ],
)
def test_callback_url_outside_allowlist_rejected(url: str, expected: str) -> None:
    with pytest.raises(PermanentTaskError, match=expected):
        check_callback_url(url, ["api.example.org"])


def test_callback_url_host_is_case_insensitive() -> None:
    assert check_callback_url("https://API.Example.org:8443/cb", ["api.example.org"]) == (
        "api.example.org"
    )


def context_for(tmp_path: Path, argv: list[str]) -> HandlerContext:
    slow_argv = [sys.executable, "-c", "import time; time.sleep(30)"]
    config = tmp_path / "config.ini"
    config.write_text(
        "[RabbitMQ]\nhost = h\nusername = u\npassword = p\n"
        f"[Agent]\nqueue = q\ncallback_allowed_hosts = 127.0.0.1\nworkdir = {tmp_path / 'w'}\n"
        "callback_max_attempts = 2\ncallback_timeout_s = 5\n"
        f"[Command:echo]\nargv = {json.dumps(argv)}\ntimeout_s = 10\n"
        f"[Command:slow]\nargv = {json.dumps(slow_argv)}\n"
        "timeout_s = 0.5\n"
    )
    settings = load_settings(config, environ={"OPENCHECKER_RABBITMQ_PASSWORD": "p"})
    return HandlerContext(settings=settings, delivery_tag=1, redelivered=False, message_id=None)


def test_handler_posts_results(tmp_path: Path, callbacks: CallbackServer) -> None:
    script = "import os, sys; print(sys.argv[1]); print(os.environ.get('OPENCHECKER_SECRET'))"
    context = context_for(tmp_path, [sys.executable, "-c", script, "{project_url}"])
    message = {
        "command_list": ["echo", "slow"],
        "project_url": "https://example.org/a b.git",
        "callback_url": callbacks.url,
        "task_metadata": {"task_id": "t-1", "extra": 2},
    }

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OPENCHECKER_SECRET", "hidden")
        handle_check_request(message, context)

    assert len(callbacks.bodies) == 1
    body = callbacks.bodies[0]
    assert body["task_metadata"] == {"task_id": "t-1", "extra": 2}
    echo, slow = body["results"]
    assert echo["exit_code"] == 0
    assert echo["stdout"] == "https://example.org/a b.git\nNone\n"
    assert slow["timed_out"] is True
    assert slow["exit_code"] is None
    assert list((tmp_path / "w").iterdir()) == []


def test_handler_rejects_unknown_command(tmp_path: Path, callbacks: CallbackServer) -> None:
    context = context_for(tmp_path, ["true"])
    message = {
        "command_list": ["echo", "rm"],
        "project_url": "https://example.org/p.git",
        "callback_url": callbacks.url,
        "task_metadata": {"task_id": "t-1"},
    }

    with pytest.raises(PermanentTaskError, match="unknown command 'rm'"):
        handle_check_request(message, context)
    assert callbacks.bodies == []


def test_handler_rejects_missing_task_id(tmp_path: Path, callbacks: CallbackServer) -> None:
    context = context_for(tmp_path, ["true"])
    message = {
        "command_list": ["echo"],
        "project_url": "https://example.org/p.git",
        "callback_url": callbacks.url,
        "task_metadata": {"task_id": "../../etc"},
    }

    with pytest.raises(PermanentTaskError, match="task_id"):
        handle_check_request(message, context)
