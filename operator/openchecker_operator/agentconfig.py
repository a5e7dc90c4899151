"""Render the agent's config.ini, in the format fixed by docs/design.md.

The text goes into the `<name>-agent-config` Secret, and its SHA-256 into
the pod template, so the output must be byte-for-byte stable for the same
input: keys come in a fixed order and commands in spec order.

The agent reads the file with `configparser` and no interpolation, strips
values and treats an empty value as "not set". A value therefore cannot
keep surrounding whitespace or span lines. Such values are rejected here
with the source named, and a password is never quoted in the message.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

CONFIG_FILE_NAME = "config.ini"
CA_FILE_NAME = "ca.crt"
CONFIG_DIRECTORY = "/app/config"
CONFIG_PATH = f"{CONFIG_DIRECTORY}/{CONFIG_FILE_NAME}"
CA_PATH = f"{CONFIG_DIRECTORY}/{CA_FILE_NAME}"

# The agent's health and metrics server. The Deployment's probes use the
# same port, so it is fixed here rather than taken from the spec.
HEALTH_PORT = 8080
HEALTH_BIND_ADDRESS = "0.0.0.0"

# The agent accepts these characters in a [Command:NAME] section name.
COMMAND_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")


class ConfigRenderError(ValueError):
    """A spec or Secret value that config.ini cannot carry; the message names the key."""


@dataclass(frozen=True)
class BrokerConnection:
    """Broker address and credentials of the agents: the `[RabbitMQ]` section."""

    host: str
    port: int
    username: str
    password: str = field(repr=False)
    vhost: str = "/"
    heartbeat_seconds: int = 60
    blocked_connection_timeout_milliseconds: int = 300_000
    tls: bool = False
    tls_verify: bool = True
    # PEM text of the CA bundle; rendered as a file next to config.ini.
    ca_certificate: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class AgentCommand:
    """One command the built-in handler may run: a `[Command:NAME]` section."""

    name: str
    argv: tuple[str, ...]
    timeout_seconds: float | None = None


@dataclass(frozen=True)
class AgentOptions:
    """Queue and task settings of the agent: the `[Agent]` section."""

    queue: str
    prefetch_count: int = 1
    handler: str = "openchecker_agent.checks:handle_check_request"
    drain_timeout_seconds: float = 840.0
    callback_allowed_hosts: tuple[str, ...] = ()
    commands: tuple[AgentCommand, ...] = ()


@dataclass(frozen=True)
class RenderedConfig:
    """The files of the agent's config Secret and their checksum."""

    files: dict[str, str]
    checksum: str


def render_config(connection: BrokerConnection, options: AgentOptions) -> RenderedConfig:
    """Render config.ini (and ca.crt when a CA bundle is given).

    Raises ConfigRenderError when a value cannot be written to the file.
    """
    ca_path = CA_PATH if connection.ca_certificate else None
    text = render_config_ini(connection, options, ca_path)
    files = {CONFIG_FILE_NAME: text}
    if connection.ca_certificate:
        files[CA_FILE_NAME] = connection.ca_certificate
    return RenderedConfig(files=files, checksum=checksum(files))


def render_config_ini(
    connection: BrokerConnection, options: AgentOptions, ca_path: str | None = None
) -> str:
    """Return the text of config.ini; `ca_path` is where the agent finds the CA bundle."""
    sections = [
        _section("RabbitMQ", _rabbitmq_entries(connection, ca_path)),
        _section("Agent", _agent_entries(options)),
    ]
    seen: set[str] = set()
    for command in options.commands:
        if command.name in seen:
            raise ConfigRenderError(
                f"spec.agent.commands: duplicate command name {command.name!r}"
            )
        seen.add(command.name)
        sections.append(_section(f"Command:{command.name}", _command_entries(command)))
    return "\n".join(sections)


def checksum(files: dict[str, str]) -> str:
    """Return the SHA-256 hex digest over file names and contents, in name order."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode("utf-8") + b"\0")
        digest.update(files[name].encode("utf-8") + b"\0")
    return digest.hexdigest()


def _rabbitmq_entries(connection: BrokerConnection, ca_path: str | None) -> list[tuple[str, str]]:
    return [
        ("host", _required("connection Secret key host", connection.host)),
        ("port", str(connection.port)),
        ("username", _required("connection Secret key username", connection.username)),
        (
            "password",
            _required("connection Secret key password", connection.password, secret=True),
        ),
        ("vhost", _required("spec.queue.vhost", connection.vhost)),
        ("heartbeat_interval_s", str(connection.heartbeat_seconds)),
        (
            "blocked_connection_timeout_ms",
            str(connection.blocked_connection_timeout_milliseconds),
        ),
        ("tls", _boolean(connection.tls)),
        ("tls_ca_file", ca_path or ""),
        ("tls_verify", _boolean(connection.tls_verify)),
        # Empty: the agent uses $POD_NAME, which the Deployment sets.
        ("connection_name", ""),
    ]


def _agent_entries(options: AgentOptions) -> list[tuple[str, str]]:
    hosts = [
        _required("spec.agent.callbackAllowedHosts", host)
        for host in options.callback_allowed_hosts
    ]
    for host in hosts:
        if "," in host:
            raise ConfigRenderError(
                f"spec.agent.callbackAllowedHosts: host name {host!r} contains a comma; "
                "expected one host name per list item"
            )
    return [
        ("queue", _required("spec.queue.name", options.queue)),
        ("prefetch_count", str(options.prefetch_count)),
        ("handler", _required("spec.agent.handler", options.handler)),
        ("drain_timeout_s", _number(options.drain_timeout_seconds)),
        ("health_port", str(HEALTH_PORT)),
        ("health_bind_address", HEALTH_BIND_ADDRESS),
        ("callback_allowed_hosts", ", ".join(hosts)),
        # Empty values keep the agent's defaults, which the spec does not expose.
        ("callback_timeout_s", ""),
        ("callback_max_attempts", ""),
        ("workdir", ""),
    ]


def _command_entries(command: AgentCommand) -> list[tuple[str, str]]:
    if not COMMAND_NAME_PATTERN.match(command.name):
        raise ConfigRenderError(
            f"spec.agent.commands: invalid command name {command.name!r}; "
            "expected letters, digits, '.', '_' or '-'"
        )
    if not command.argv:
        raise ConfigRenderError(f"spec.agent.commands[{command.name}].argv: the list is empty")
    timeout = "" if command.timeout_seconds is None else _number(command.timeout_seconds)
    # JSON with ASCII escapes keeps every argument on one line.
    return [("argv", json.dumps(list(command.argv))), ("timeout_s", timeout)]


def _section(name: str, entries: Iterable[tuple[str, str]]) -> str:
    lines = [f"[{name}]"]
    lines.extend(f"{key} = {value}".rstrip() for key, value in entries)
    return "\n".join(lines) + "\n"


def _required(source: str, value: str, *, secret: bool = False) -> str:
    quoted = "the value" if secret else repr(value)
    if not value:
        raise ConfigRenderError(f"{source}: missing; expected a non-empty value")
    if any(character in value for character in "\r\n\0"):
        raise ConfigRenderError(
            f"{source}: {quoted} contains a line break or NUL; expected a single line"
        )
    if value != value.strip():
        raise ConfigRenderError(
            f"{source}: {quoted} starts or ends with whitespace, which config.ini would strip; "
            "remove the whitespace"
        )
    return value


def _boolean(value: bool) -> str:
    return "true" if value else "false"


def _number(value: float) -> str:
    """Return whole numbers without a fraction, so 840.0 renders as 840."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))
