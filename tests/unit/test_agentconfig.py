"""Tests of config.ini rendering, read back with configparser and the agent's loader."""

from __future__ import annotations

import configparser
from dataclasses import replace
from pathlib import Path

import pytest
from openchecker_agent.config import load_settings
from openchecker_operator.agentconfig import (
    CA_FILE_NAME,
    CA_PATH,
    CONFIG_FILE_NAME,
    HEALTH_PORT,
    AgentCommand,
    AgentOptions,
    BrokerConnection,
    ConfigRenderError,
    render_config,
    render_config_ini,
)

# Characters that configparser or a shell would treat specially.
AWKWARD_PASSWORD = 'p%a;ss#w[o]rd="x"{y}'

CONNECTION = BrokerConnection(
    host="rabbitmq.default.svc",
    port=5672,
    username="openchecker",
    password=AWKWARD_PASSWORD,
    vhost="/checks",
    heartbeat_seconds=30,
    blocked_connection_timeout_milliseconds=120_000,
)
OPTIONS = AgentOptions(
    queue="opencheck",
    prefetch_count=2,
    handler="openchecker_agent.checks:handle_check_request",
    drain_timeout_seconds=840.0,
    callback_allowed_hosts=("api.example.org", "127.0.0.1"),
    commands=(
        AgentCommand(
            name="clone",
            argv=("git", "clone", "--depth=1", "{project_url}", "{workdir}/src"),
            timeout_seconds=600,
        ),
        AgentCommand(name="scan.v2", argv=("scanner", "--id", "{task_id}", "ünïcode")),
    ),
)


def parse(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(text)
    return parser


def write_config(tmp_path: Path, connection: BrokerConnection, options: AgentOptions) -> Path:
    rendered = render_config(connection, options)
    path = tmp_path / CONFIG_FILE_NAME
    path.write_text(rendered.files[CONFIG_FILE_NAME], encoding="utf-8")
    return path


def test_sections_in_design_order() -> None:
    parser = parse(render_config_ini(CONNECTION, OPTIONS))

    assert parser.sections() == ["RabbitMQ", "Agent", "Command:clone", "Command:scan.v2"]


def test_rabbitmq_section_round_trips() -> None:
    section = parse(render_config_ini(CONNECTION, OPTIONS))["RabbitMQ"]

    assert section["host"] == "rabbitmq.default.svc"
    assert section["port"] == "5672"
    assert section["username"] == "openchecker"
    assert section["password"] == AWKWARD_PASSWORD
    assert section["vhost"] == "/checks"
    assert section["heartbeat_interval_s"] == "30"
    assert section["blocked_connection_timeout_ms"] == "120000"
    assert section["tls"] == "false"
    assert section["tls_ca_file"] == ""
    assert section["tls_verify"] == "true"
    assert section["connection_name"] == ""


def test_agent_section_round_trips() -> None:
    section = parse(render_config_ini(CONNECTION, OPTIONS))["Agent"]

    assert section["queue"] == "opencheck"
    assert section["prefetch_count"] == "2"
    assert section["handler"] == "openchecker_agent.checks:handle_check_request"
    assert section["drain_timeout_s"] == "840"
    assert section["health_port"] == str(HEALTH_PORT)
    assert section["health_bind_address"] == "0.0.0.0"
    assert section["callback_allowed_hosts"] == "api.example.org, 127.0.0.1"


def test_command_sections_round_trip() -> None:
    parser = parse(render_config_ini(CONNECTION, OPTIONS))

    clone = parser["Command:clone"]
    scan = parser["Command:scan.v2"]
    assert clone["argv"] == '["git", "clone", "--depth=1", "{project_url}", "{workdir}/src"]'
    assert clone["timeout_s"] == "600"
    assert scan["timeout_s"] == ""


def test_agent_loader_reads_rendered_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, CONNECTION, OPTIONS)

    settings = load_settings(path, environ={"POD_NAME": "opencheck-agent-7d9f-abcde"})

    assert settings.rabbitmq.host == "rabbitmq.default.svc"
    assert settings.rabbitmq.password.get_secret_value() == AWKWARD_PASSWORD
    assert settings.rabbitmq.vhost == "/checks"
    assert settings.rabbitmq.heartbeat_interval_s == 30
    assert settings.rabbitmq.blocked_connection_timeout_seconds == 120.0
    assert settings.rabbitmq.tls is False
    assert settings.rabbitmq.tls_ca_file is None
    assert settings.rabbitmq.connection_name == "opencheck-agent-7d9f-abcde"
    assert settings.agent.queue == "opencheck"
    assert settings.agent.prefetch_count == 2
    assert settings.agent.drain_timeout_s == 840.0
    assert settings.agent.health_port == HEALTH_PORT
    assert settings.agent.callback_allowed_hosts == ("api.example.org", "127.0.0.1")
    assert settings.commands["clone"].argv == (
        "git",
        "clone",
        "--depth=1",
        "{project_url}",
        "{workdir}/src",
    )
    assert settings.commands["clone"].timeout_s == 600.0
    assert settings.commands["scan.v2"].argv[-1] == "ünïcode"


def test_agent_loader_applies_defaults_for_empty_values(tmp_path: Path) -> None:
    options = AgentOptions(queue="minimal")
    path = write_config(tmp_path, CONNECTION, options)

    settings = load_settings(path, environ={})

    assert settings.agent.callback_allowed_hosts == ()
    assert settings.agent.callback_timeout_s == 30.0
    assert settings.agent.callback_max_attempts == 5
    assert settings.agent.workdir == Path("/tmp/openchecker")
    assert settings.commands == {}


def test_tls_with_ca_adds_file(tmp_path: Path) -> None:
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    connection = replace(CONNECTION, port=5671, tls=True, tls_verify=False, ca_certificate=pem)

    rendered = render_config(connection, OPTIONS)
    section = parse(rendered.files[CONFIG_FILE_NAME])["RabbitMQ"]

    assert rendered.files[CA_FILE_NAME] == pem
    assert section["tls"] == "true"
    assert section["tls_verify"] == "false"
    assert section["tls_ca_file"] == CA_PATH


def test_tls_without_ca_has_no_file() -> None:
    rendered = render_config(replace(CONNECTION, tls=True), OPTIONS)

    assert set(rendered.files) == {CONFIG_FILE_NAME}


def test_render_is_stable() -> None:
    first = render_config(CONNECTION, OPTIONS)
    second = render_config(CONNECTION, OPTIONS)

    assert first.files == second.files
    assert first.checksum == second.checksum
    assert len(first.checksum) == 64


def test_checksum_changes_with_password() -> None:
    first = render_config(CONNECTION, OPTIONS)
    second = render_config(replace(CONNECTION, password="rotated"), OPTIONS)

    assert first.checksum != second.checksum


def test_checksum_changes_with_ca() -> None:
    first = render_config(replace(CONNECTION, ca_certificate="A\n"), OPTIONS)
    second = render_config(replace(CONNECTION, ca_certificate="B\n"), OPTIONS)

    assert first.checksum != second.checksum


@pytest.mark.parametrize(
    "password", ["two\nlines", "carriage\rreturn", " leading", "trailing ", "nul\0byte"]
)
def test_unsafe_password_rejected_without_value(password: str) -> None:
    with pytest.raises(ConfigRenderError) as raised:
        render_config_ini(replace(CONNECTION, password=password), OPTIONS)

    message = str(raised.value)
    assert message.startswith("connection Secret key password:")
    assert password.strip() not in message


def test_empty_password_rejected() -> None:
    with pytest.raises(ConfigRenderError, match="connection Secret key password: missing"):
        render_config_ini(replace(CONNECTION, password=""), OPTIONS)


def test_multiline_host_rejected_with_value() -> None:
    with pytest.raises(ConfigRenderError, match=r"key host: 'a\\nb' contains a line break"):
        render_config_ini(replace(CONNECTION, host="a\nb"), OPTIONS)


def test_duplicate_command_rejected() -> None:
    command = AgentCommand(name="clone", argv=("true",))
    options = replace(OPTIONS, commands=(command, command))

    with pytest.raises(ConfigRenderError, match="duplicate command name 'clone'"):
        render_config_ini(CONNECTION, options)


def test_invalid_command_name_rejected() -> None:
    options = replace(OPTIONS, commands=(AgentCommand(name="has space", argv=("true",)),))

    with pytest.raises(ConfigRenderError, match="invalid command name 'has space'"):
        render_config_ini(CONNECTION, options)


def test_empty_argv_rejected() -> None:
    options = replace(OPTIONS, commands=(AgentCommand(name="noop", argv=()),))

    with pytest.raises(ConfigRenderError, match=r"commands\[noop\].argv: the list is empty"):
        render_config_ini(CONNECTION, options)


def test_callback_host_with_comma_rejected() -> None:
    options = replace(OPTIONS, callback_allowed_hosts=("a.example,b.example",))

    with pytest.raises(ConfigRenderError, match="contains a comma"):
        render_config_ini(CONNECTION, options)


def test_repr_hides_password() -> None:
    assert AWKWARD_PASSWORD not in repr(CONNECTION)
