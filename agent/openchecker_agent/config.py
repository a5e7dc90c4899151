"""Load and validate the agent's config.ini into typed settings.

The format is the one in docs/design.md, which the operator renders into the
agent's Secret. Every key can be overridden by an environment variable
`OPENCHECKER_<SECTION>_<KEY>` in upper case. For a `[Command:NAME]` section
the section part is `COMMAND_<NAME>`, with every character other than a
letter or digit replaced by `_`.

Any problem raises ConfigError with one line that names the source (file or
environment variable), the section, the key and the expected form.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from .errors import ConfigError

RABBITMQ_SECTION = "RabbitMQ"
AGENT_SECTION = "Agent"
COMMAND_SECTION_PREFIX = "Command:"
ENV_PREFIX = "OPENCHECKER_"

# The only placeholders a command's argv may contain. They are replaced inside
# single arguments and never split or passed through a shell.
PLACEHOLDERS = ("project_url", "workdir", "task_id")
PLACEHOLDER_PATTERN = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
COMMAND_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")
HANDLER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$"

# Values that are never quoted in an error message.
SECRET_KEYS = frozenset({"password"})

ModelT = TypeVar("ModelT", bound=BaseModel)


class RabbitMQSettings(BaseModel):
    """The `[RabbitMQ]` section: where the broker is and how to connect."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(min_length=1, description="a host name or IP address")
    port: int = Field(5672, ge=1, le=65535, description="an integer from 1 to 65535")
    username: str = Field(min_length=1, description="the broker user name")
    password: SecretStr = Field(description="the broker user's password, not empty")
    vhost: str = Field("/", min_length=1, description="a virtual host name such as /")
    heartbeat_interval_s: int = Field(
        60, ge=0, description="a whole number of seconds >= 0 (0 disables heartbeats)"
    )
    blocked_connection_timeout_ms: int = Field(
        300_000, ge=0, description="a whole number of milliseconds >= 0 (0 disables it)"
    )
    tls: bool = Field(False, description="true or false")
    tls_ca_file: Path | None = Field(None, description="a path to a PEM CA bundle, or empty")
    tls_verify: bool = Field(True, description="true or false")
    connection_name: str = Field("", description="a name shown in the management UI")

    @field_validator("password")
    @classmethod
    def _reject_empty_password(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value():
            raise ValueError("the password is empty")
        return value

    @property
    def blocked_connection_timeout_seconds(self) -> float | None:
        """Return the blocked-connection timeout in seconds, as pika expects, or None."""
        if self.blocked_connection_timeout_ms == 0:
            return None
        return self.blocked_connection_timeout_ms / 1000.0


class AgentSection(BaseModel):
    """The `[Agent]` section: what to consume and how to run tasks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    queue: str = Field(min_length=1, description="the name of the work queue")
    prefetch_count: int = Field(1, ge=1, le=65535, description="an integer from 1 to 65535")
    handler: str = Field(
        "openchecker_agent.checks:handle_check_request",
        pattern=HANDLER_PATTERN,
        description="package.module:function",
    )
    drain_timeout_s: float = Field(
        840.0, ge=0, description="a number of seconds >= 0 to let running tasks finish"
    )
    health_port: int = Field(
        8080, ge=0, le=65535, description="a TCP port from 0 to 65535 (0 disables it)"
    )
    health_bind_address: str = Field(
        "0.0.0.0", min_length=1, description="an IP address to bind the health server to"
    )
    callback_allowed_hosts: tuple[str, ...] = Field(
        (), description="a comma-separated list of host names"
    )
    callback_timeout_s: float = Field(30.0, gt=0, description="a number of seconds > 0")
    callback_max_attempts: int = Field(5, ge=1, le=100, description="an integer from 1 to 100")
    workdir: Path = Field(
        Path("/tmp/openchecker"), description="a directory for the tasks' working folders"
    )

    @field_validator("callback_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(host.strip().lower() for host in value.split(",") if host.strip())
        return value


class CommandSettings(BaseModel):
    """One `[Command:NAME]` section: a command the built-in handler may run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    argv: tuple[str, ...] = Field(
        description='a JSON list of strings, such as ["git", "clone", "{project_url}"]'
    )
    timeout_s: float = Field(600.0, gt=0, description="a number of seconds > 0")

    @field_validator("argv", mode="before")
    @classmethod
    def _decode_argv(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                # Re-raised as a validation error so the message names the key.
                raise ValueError(f"not valid JSON ({error.msg})") from error
        return value

    @field_validator("argv")
    @classmethod
    def _check_argv(cls, argv: tuple[str, ...]) -> tuple[str, ...]:
        if not argv:
            raise ValueError("the list is empty")
        for argument in argv:
            for name in PLACEHOLDER_PATTERN.findall(argument):
                if name not in PLACEHOLDERS:
                    raise ValueError(f"unknown placeholder {{{name}}}")
        return argv


class AgentSettings(BaseModel):
    """All settings of one agent process."""

    model_config = ConfigDict(frozen=True)

    source: str
    rabbitmq: RabbitMQSettings
    agent: AgentSection
    commands: dict[str, CommandSettings]


def load_settings(path: Path, environ: Mapping[str, str] | None = None) -> AgentSettings:
    """Read the INI file at `path`, apply environment overrides and validate.

    Raises ConfigError with a one-line message on the first problem found.
    """
    environ = os.environ if environ is None else environ
    parser = _read_ini(path)
    sections = _collect_sections(parser, path)
    values, origins = _apply_overrides(sections, environ, path)

    rabbitmq_values = values[RABBITMQ_SECTION]
    if not rabbitmq_values.get("connection_name"):
        rabbitmq_values["connection_name"] = environ.get("POD_NAME") or socket.gethostname()

    rabbitmq = _validate(RabbitMQSettings, path, RABBITMQ_SECTION, values, origins)
    agent = _validate(AgentSection, path, AGENT_SECTION, values, origins)
    commands: dict[str, CommandSettings] = {}
    for section in values:
        if section.startswith(COMMAND_SECTION_PREFIX):
            name = section[len(COMMAND_SECTION_PREFIX) :]
            values[section]["name"] = name
            commands[name] = _validate(CommandSettings, path, section, values, origins)
    return AgentSettings(source=str(path), rabbitmq=rabbitmq, agent=agent, commands=commands)


def _read_ini(path: Path) -> configparser.ConfigParser:
    # No interpolation: a `%` in a password must stay a `%`.
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with path.open(encoding="utf-8") as stream:
            parser.read_file(stream)
    except OSError as error:
        # Unreadable or missing file: the agent cannot start without it.
        raise ConfigError(
            f"{path}: cannot read the config file ({error.strerror or error}); "
            "expected a readable INI file with [RabbitMQ] and [Agent] sections"
        ) from error
    except (configparser.Error, UnicodeDecodeError) as error:
        # A syntax error; configparser's messages span lines, so they are joined.
        detail = " ".join(str(error).split())
        raise ConfigError(
            f"{path}: not a valid INI file ({detail}); "
            "expected [Section] headers followed by `key = value` lines"
        ) from error
    return parser


def _collect_sections(parser: configparser.ConfigParser, path: Path) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {RABBITMQ_SECTION: {}, AGENT_SECTION: {}}
    for section in parser.sections():
        canonical = _canonical_section(section, path)
        sections.setdefault(canonical, {})
        for key, value in parser.items(section):
            # An empty value means "not set", as the operator renders optional keys.
            if value.strip():
                sections[canonical][key] = value.strip()
    for required in (RABBITMQ_SECTION, AGENT_SECTION):
        if not parser.has_section(required) and not any(
            name.lower() == required.lower() for name in parser.sections()
        ):
            raise ConfigError(f"{path}: missing section [{required}]; expected [{required}]")
    return sections


def _canonical_section(section: str, path: Path) -> str:
    lowered = section.lower()
    if lowered == RABBITMQ_SECTION.lower():
        return RABBITMQ_SECTION
    if lowered == AGENT_SECTION.lower():
        return AGENT_SECTION
    if lowered.startswith(COMMAND_SECTION_PREFIX.lower()):
        name = section[len(COMMAND_SECTION_PREFIX) :].strip()
        if not COMMAND_NAME_PATTERN.match(name):
            raise ConfigError(
                f"{path}: [{section}]: invalid command name {name!r}; "
                "expected [Command:NAME] with NAME made of letters, digits, '.', '_' or '-'"
            )
        return COMMAND_SECTION_PREFIX + name
    raise ConfigError(
        f"{path}: [{section}]: unknown section; expected [RabbitMQ], [Agent] or [Command:NAME]"
    )


def environment_variable(section: str, key: str) -> str:
    """Return the name of the environment variable that overrides `[section] key`."""
    section_part = re.sub(r"[^A-Za-z0-9]", "_", section.replace(":", "_"))
    return f"{ENV_PREFIX}{section_part}_{key}".upper()


def _apply_overrides(
    sections: dict[str, dict[str, str]], environ: Mapping[str, str], path: Path
) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, str], str]]:
    known_keys: dict[str, tuple[str, ...]] = {
        RABBITMQ_SECTION: tuple(RabbitMQSettings.model_fields),
        AGENT_SECTION: tuple(AgentSection.model_fields),
    }
    command_keys = tuple(key for key in CommandSettings.model_fields if key != "name")
    values: dict[str, dict[str, Any]] = {}
    origins: dict[tuple[str, str], str] = {}
    for section, entries in sections.items():
        values[section] = dict(entries)
        for key in entries:
            origins[(section, key)] = f"{path} [{section}] {key}"
        keys = known_keys.get(section, command_keys)
        for key in keys:
            variable = environment_variable(section, key)
            override = environ.get(variable)
            if override is None:
                continue
            origins[(section, key)] = f"environment variable {variable} ([{section}] {key})"
            if override.strip():
                values[section][key] = override.strip()
            else:
                # An empty override unsets the key, like an empty value in the file.
                values[section].pop(key, None)
    for section, entries in values.items():
        for key in entries:
            origins.setdefault((section, key), f"{path} [{section}] {key}")
    return values, origins


def _validate(
    model: type[ModelT],
    path: Path,
    section: str,
    values: dict[str, dict[str, Any]],
    origins: dict[tuple[str, str], str],
) -> ModelT:
    try:
        return model.model_validate(values[section])
    except ValidationError as error:
        raise ConfigError(_describe_error(model, path, section, error, values, origins)) from None


def _describe_error(
    model: type[BaseModel],
    path: Path,
    section: str,
    error: ValidationError,
    values: dict[str, dict[str, Any]],
    origins: dict[tuple[str, str], str],
) -> str:
    first = error.errors()[0]
    key = str(first["loc"][0]) if first["loc"] else ""
    where = origins.get((section, key), f"{path} [{section}] {key}")
    field = model.model_fields.get(key)
    if first["type"] == "extra_forbidden" or field is None:
        allowed = ", ".join(name for name in model.model_fields if name != "name")
        return f"{where}: unknown key; expected one of: {allowed}"
    expected = field.description or "a valid value"
    if first["type"] == "missing":
        return f"{where}: missing; expected {expected}"
    reason = str(first["msg"]).removeprefix("Value error, ")
    if key in SECRET_KEYS:
        return f"{where}: invalid value ({reason}); expected {expected}"
    value = values[section].get(key)
    return f"{where}: invalid value {value!r} ({reason}); expected {expected}"
