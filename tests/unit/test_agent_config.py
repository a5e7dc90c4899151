"""config.ini parsing and validation: the design's format, overrides and one-line errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from openchecker_agent.amqp import build_connection_parameters
from openchecker_agent.config import environment_variable, load_settings
from openchecker_agent.consumer import Consumer
from openchecker_agent.errors import ConfigError
from openchecker_agent.metrics import AgentMetrics

# The example of docs/design.md, as the operator renders it.
DESIGN_EXAMPLE = textwrap.dedent(
    """\
    [RabbitMQ]
    host = rabbitmq.default.svc
    port = 5672
    username = openchecker
    password = s3cret%value
    vhost = /
    heartbeat_interval_s = 60
    blocked_connection_timeout_ms = 300000
    tls = false
    tls_ca_file =
    tls_verify = true
    connection_name =

    [Agent]
    queue = opencheck
    prefetch_count = 1
    handler = openchecker_agent.checks:handle_check_request
    drain_timeout_s = 840
    health_port = 8080
    health_bind_address = 0.0.0.0
    callback_allowed_hosts = api.example.org, 127.0.0.1
    callback_timeout_s = 30
    callback_max_attempts = 5
    workdir = /tmp/openchecker

    [Command:clone]
    argv = ["git", "clone", "--depth=1", "{project_url}", "{workdir}/src"]
    timeout_s = 600
    """
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.ini"
    path.write_text(text)
    return path


def replace_line(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new)


def test_design_example_parses(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, DESIGN_EXAMPLE), environ={"POD_NAME": "agent-0"})

    assert settings.rabbitmq.host == "rabbitmq.default.svc"
    assert settings.rabbitmq.password.get_secret_value() == "s3cret%value"
    assert settings.rabbitmq.tls_ca_file is None
    assert settings.rabbitmq.connection_name == "agent-0"
    assert settings.agent.callback_allowed_hosts == ("api.example.org", "127.0.0.1")
    assert settings.agent.drain_timeout_s == 840
    assert settings.commands["clone"].argv[3] == "{project_url}"
    assert settings.commands["clone"].timeout_s == 600


def test_blocked_timeout_reaches_pika_in_seconds(tmp_path: Path) -> None:
    text = replace_line(
        DESIGN_EXAMPLE,
        "blocked_connection_timeout_ms = 300000",
        "blocked_connection_timeout_ms = 30000",
    )
    settings = load_settings(write(tmp_path, text), environ={})

    parameters = Consumer(settings, lambda _message, _context: None, AgentMetrics()).parameters

    assert parameters.blocked_connection_timeout == 30.0
    assert parameters.heartbeat == 60
    assert parameters.credentials.password == "s3cret%value"


def test_zero_blocked_timeout_disables_it(tmp_path: Path) -> None:
    text = replace_line(
        DESIGN_EXAMPLE,
        "blocked_connection_timeout_ms = 300000",
        "blocked_connection_timeout_ms = 0",
    )
    settings = load_settings(write(tmp_path, text), environ={})

    assert build_connection_parameters(settings.rabbitmq).blocked_connection_timeout is None


def test_connection_name_falls_back(tmp_path: Path) -> None:
    path = write(tmp_path, DESIGN_EXAMPLE)

    from_pod = load_settings(path, environ={"POD_NAME": "agent-7"})
    explicit = load_settings(path, environ={"OPENCHECKER_RABBITMQ_CONNECTION_NAME": "mine"})

    assert from_pod.rabbitmq.connection_name == "agent-7"
    assert explicit.rabbitmq.connection_name == "mine"
    parameters = build_connection_parameters(explicit.rabbitmq)
    assert parameters.client_properties == {"connection_name": "mine"}


def test_environment_overrides_file(tmp_path: Path) -> None:
    environ = {
        "OPENCHECKER_RABBITMQ_PASSWORD": "from-env",
        "OPENCHECKER_AGENT_PREFETCH_COUNT": "4",
        "OPENCHECKER_COMMAND_CLONE_TIMEOUT_S": "5",
    }

    settings = load_settings(write(tmp_path, DESIGN_EXAMPLE), environ=environ)

    assert settings.rabbitmq.password.get_secret_value() == "from-env"
    assert settings.agent.prefetch_count == 4
    assert settings.commands["clone"].timeout_s == 5


def test_environment_variable_names() -> None:
    assert environment_variable("RabbitMQ", "password") == "OPENCHECKER_RABBITMQ_PASSWORD"
    assert environment_variable("Command:run-scan", "argv") == "OPENCHECKER_COMMAND_RUN_SCAN_ARGV"


def test_defaults_fill_optional_keys(tmp_path: Path) -> None:
    text = "[RabbitMQ]\nhost = h\nusername = u\npassword = p\n[Agent]\nqueue = q\n"

    settings = load_settings(write(tmp_path, text), environ={})

    assert settings.rabbitmq.port == 5672
    assert settings.rabbitmq.vhost == "/"
    assert settings.agent.prefetch_count == 1
    assert settings.agent.handler == "openchecker_agent.checks:handle_check_request"
    assert settings.agent.callback_allowed_hosts == ()
    assert settings.commands == {}


# Each case: (old line, new line, text the one-line error must contain).
BAD_VALUES = [
    ("port = 5672", "port = http", "[RabbitMQ] port: invalid value 'http'"),
    ("port = 5672", "port = 70000", "expected an integer from 1 to 65535"),
    ("host = rabbitmq.default.svc", "host =", "[RabbitMQ] host: missing"),
    ("tls = false", "tls = maybe", "[RabbitMQ] tls: invalid value 'maybe'"),
    ("heartbeat_interval_s = 60", "heartbeat_interval_s = -1", "heartbeat_interval_s"),
    ("prefetch_count = 1", "prefetch_count = 0", "[Agent] prefetch_count: invalid value '0'"),
    ("handler = openchecker_agent.checks:handle_check_request", "handler = nocolon",
     "expected package.module:function"),
    ("drain_timeout_s = 840", "drain_timeout_s = soon", "[Agent] drain_timeout_s"),
    ("queue = opencheck", "queue =", "[Agent] queue: missing"),
    ("queue = opencheck", "queue = opencheck\nqueues = typo", "[Agent] queues: unknown key"),
    ('argv = ["git", "clone", "--depth=1", "{project_url}", "{workdir}/src"]',
     "argv = git clone", "[Command:clone] argv: invalid value 'git clone' (not valid JSON"),
    ('argv = ["git", "clone", "--depth=1", "{project_url}", "{workdir}/src"]',
     'argv = ["git", "{repo}"]', "unknown placeholder {repo}"),
    ('argv = ["git", "clone", "--depth=1", "{project_url}", "{workdir}/src"]',
     "argv = []", "the list is empty"),
    ("timeout_s = 600", "timeout_s = 0", "[Command:clone] timeout_s"),
]  # fmt: skip


@pytest.mark.parametrize(("old", "new", "expected"), BAD_VALUES)
def test_invalid_value_gives_one_line(tmp_path: Path, old: str, new: str, expected: str) -> None:
    path = write(tmp_path, replace_line(DESIGN_EXAMPLE, old, new))

    with pytest.raises(ConfigError) as raised:
        load_settings(path, environ={})

    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    assert expected in message
    assert "expected" in message


def test_empty_password_is_missing_without_value(tmp_path: Path) -> None:
    path = write(tmp_path, DESIGN_EXAMPLE)

    with pytest.raises(ConfigError) as raised:
        load_settings(path, environ={"OPENCHECKER_RABBITMQ_PASSWORD": ""})

    message = str(raised.value)
    assert message.startswith("environment variable OPENCHECKER_RABBITMQ_PASSWORD")
    assert "([RabbitMQ] password): missing" in message


def test_override_error_names_variable(tmp_path: Path) -> None:
    path = write(tmp_path, DESIGN_EXAMPLE)

    with pytest.raises(ConfigError) as raised:
        load_settings(path, environ={"OPENCHECKER_AGENT_HEALTH_PORT": "eighty"})

    assert str(raised.value).startswith(
        "environment variable OPENCHECKER_AGENT_HEALTH_PORT ([Agent] health_port): "
        "invalid value 'eighty'"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[Agent]\nqueue = q\n", "missing section [RabbitMQ]"),
        ("[RabbitMQ]\nhost = h\nusername = u\npassword = p\n", "missing section [Agent]"),
        (DESIGN_EXAMPLE + "[Extra]\nkey = 1\n", "[Extra]: unknown section"),
        (DESIGN_EXAMPLE + "[Command:bad name]\nargv = []\n", "invalid command name"),
        ("host = h\n", "not a valid INI file"),
        (DESIGN_EXAMPLE + "[Agent]\nqueue = again\n", "not a valid INI file"),
    ],
)
def test_invalid_structure_gives_one_line(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)

    with pytest.raises(ConfigError) as raised:
        load_settings(path, environ={})

    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    assert expected in message


def test_missing_file_gives_one_line(tmp_path: Path) -> None:
    path = tmp_path / "absent.ini"

    with pytest.raises(ConfigError) as raised:
        load_settings(path, environ={})

    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: cannot read the config file")


def test_password_never_in_errors(tmp_path: Path) -> None:
    text = replace_line(DESIGN_EXAMPLE, "port = 5672", "port = x")
    path = write(tmp_path, text)

    with pytest.raises(ConfigError) as raised:
        load_settings(path, environ={})

    assert "s3cret" not in str(raised.value)


def test_operator_rendered_config_parses(tmp_path: Path) -> None:
    from openchecker_operator.agentconfig import (
        AgentCommand,
        AgentOptions,
        BrokerConnection,
        render_config_ini,
    )

    text = render_config_ini(
        BrokerConnection(host="rabbitmq", port=5671, username="u", password="p;#%", tls=True),
        AgentOptions(
            queue="opencheck",
            prefetch_count=2,
            callback_allowed_hosts=("api.example.org",),
            commands=(AgentCommand("clone", ("git", "clone", "{project_url}"), 60),),
        ),
        ca_path="/app/config/ca.crt",
    )

    settings = load_settings(write(tmp_path, text), environ={"POD_NAME": "agent-1"})

    assert settings.rabbitmq.password.get_secret_value() == "p;#%"
    assert settings.rabbitmq.tls is True
    assert settings.rabbitmq.tls_ca_file == Path("/app/config/ca.crt")
    assert settings.rabbitmq.connection_name == "agent-1"
    assert settings.agent.prefetch_count == 2
    assert settings.agent.callback_max_attempts == 5
    assert settings.commands["clone"].argv == ("git", "clone", "{project_url}")
