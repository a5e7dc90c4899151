"""Typed models of the OpenCheckQueue spec and of the broker connection Secret.

The API server validates the spec against the CRD schema first. These models
repeat the checks that matter to the operator, so a resource stored before a
schema change, or a test that builds a spec by hand, fails with a readable
message instead of a KeyError deep in a handler. Field names follow Python;
aliases are the spec's camelCase names.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from .errors import SecretInvalid, SpecInvalid

QueueType = Literal["classic", "quorum"]
Overflow = Literal["drop-head", "reject-publish", "reject-publish-dlx"]
DeletionPolicy = Literal["Retain", "Delete"]

DEFAULT_VHOST = "/"
DEFAULT_AMQP_PORT = 5672
DEFAULT_AMQPS_PORT = 5671
DEFAULT_MANAGEMENT_PORT = 15672
DEFAULT_MANAGEMENT_TLS_PORT = 15671
DEAD_LETTER_SUFFIX = ".dlq"
DEFAULT_AGENT_IMAGE = "openchecker-agent:0.1.0"
DEFAULT_HANDLER = "openchecker_agent.checks:handle_check_request"
# The agent stops taking work this long before the pod's grace period ends,
# so a task that is still running can be rejected back to the queue.
DRAIN_MARGIN_SECONDS = 60


class SpecModel(BaseModel):
    """Base of the spec models: camelCase aliases, unknown fields rejected, immutable."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class QueueSpec(SpecModel):
    """The work queue: `spec.queue`."""

    # NOTE: AMQP limits names to 255 bytes; a name of 255 characters with
    # non-ASCII letters passes here and the broker rejects the declare.
    name: str | None = Field(default=None, min_length=1, max_length=255)
    vhost: str | None = Field(default=None, min_length=1)
    type: QueueType = "classic"


class DeadLetterQueueSpec(SpecModel):
    """The dead-letter queue: `spec.deadLetterQueue`."""

    name: str | None = Field(default=None, min_length=1, max_length=255)


class LimitsSpec(SpecModel):
    """Changeable queue limits, applied through the operator's policy: `spec.limits`."""

    message_ttl_milliseconds: int | None = Field(
        default=None, ge=0, alias="messageTTLMilliseconds"
    )
    max_length: int | None = Field(default=None, ge=0)
    max_length_bytes: int | None = Field(default=None, ge=0)
    overflow: Overflow | None = None
    delivery_limit: int | None = Field(default=None, ge=0)
    consumer_timeout_milliseconds: int | None = Field(default=None, ge=0)

    def is_empty(self) -> bool:
        """Return True when no limit is set."""
        return all(value is None for value in self.model_dump().values())


class SecretReference(SpecModel):
    """A Secret in the resource's namespace."""

    name: str = Field(min_length=1)


class TlsSpec(SpecModel):
    """TLS to the broker: `spec.connection.tls`."""

    enabled: bool = False
    ca_secret_key: str | None = Field(default=None, min_length=1)
    verify: bool = True


class ConnectionSpec(SpecModel):
    """Broker address and credentials reference: `spec.connection`."""

    secret_ref: SecretReference
    management_url: str | None = Field(default=None, alias="managementURL")
    tls: TlsSpec = TlsSpec()


class CommandSpec(SpecModel):
    """One command the agent's built-in handler may run: `spec.agent.commands[]`."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    argv: tuple[str, ...] = Field(min_length=1)
    timeout_seconds: float | None = Field(default=None, gt=0)


class AgentSpec(SpecModel):
    """The agent workers' pods and config.ini: `spec.agent`."""

    image: str = Field(default=DEFAULT_AGENT_IMAGE, min_length=1)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    resources: dict[str, Any] = Field(default_factory=dict)
    env: tuple[dict[str, Any], ...] = ()
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()
    termination_grace_period_seconds: int = Field(default=900, ge=1)
    drain_timeout_seconds: int | None = Field(default=None, ge=0)
    prefetch_count: int = Field(default=1, ge=1, le=65535)
    heartbeat_seconds: int = Field(default=60, ge=0)
    blocked_connection_timeout_milliseconds: int = Field(default=300_000, ge=0)
    handler: str = Field(default=DEFAULT_HANDLER, pattern=r"^[\w.]+:[\w.]+$")
    callback_allowed_hosts: tuple[str, ...] = ()
    commands: tuple[CommandSpec, ...] = ()

    @model_validator(mode="after")
    def _check_drain_timeout(self) -> AgentSpec:
        if self.effective_drain_timeout_seconds >= self.termination_grace_period_seconds:
            raise ValueError(
                f"drainTimeoutSeconds {self.effective_drain_timeout_seconds} must be below "
                f"terminationGracePeriodSeconds {self.termination_grace_period_seconds}"
            )
        return self

    @property
    def effective_drain_timeout_seconds(self) -> int:
        """Return drainTimeoutSeconds, or the grace period minus 60 s (at least 0) when unset."""
        if self.drain_timeout_seconds is not None:
            return self.drain_timeout_seconds
        return max(0, self.termination_grace_period_seconds - DRAIN_MARGIN_SECONDS)


class ScalingSpec(SpecModel):
    """Scaling settings of the agent fleet: `spec.scaling`."""

    min_replicas: int = Field(default=0, ge=0)
    max_replicas: int = Field(default=10, ge=0)
    messages_per_replica: int = Field(default=10, gt=0)
    activation_messages: int = Field(default=0, ge=0)
    poll_interval_seconds: float = Field(default=5, gt=0)
    scale_down_stabilization_seconds: float = Field(default=300, ge=0)
    tolerance: float = Field(default=0.1, ge=0, lt=1)
    fallback_replicas: int | None = Field(default=None, ge=0)
    failure_threshold: int = Field(default=3, ge=1)
    paused: bool = False

    @model_validator(mode="after")
    def _check_bounds(self) -> ScalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"minReplicas {self.min_replicas} must not exceed maxReplicas {self.max_replicas}"
            )
        if self.fallback_replicas is not None and self.fallback_replicas > self.max_replicas:
            raise ValueError(
                f"fallbackReplicas {self.fallback_replicas} must not exceed "
                f"maxReplicas {self.max_replicas}"
            )
        return self


class OpenCheckQueueSpec(SpecModel):
    """The whole spec of an OpenCheckQueue."""

    queue: QueueSpec = QueueSpec()
    dead_letter_queue: DeadLetterQueueSpec = DeadLetterQueueSpec()
    limits: LimitsSpec | None = None
    connection: ConnectionSpec
    deletion_policy: DeletionPolicy = "Retain"
    agent: AgentSpec = AgentSpec()
    scaling: ScalingSpec = ScalingSpec()

    @model_validator(mode="after")
    def _check_queue_type_limits(self) -> OpenCheckQueueSpec:
        limits = self.limits
        if limits is None or self.queue.type == "quorum":
            return self
        if limits.delivery_limit is not None:
            raise ValueError("limits.deliveryLimit needs queue.type quorum")
        return self

    @model_validator(mode="after")
    def _check_quorum_overflow(self) -> OpenCheckQueueSpec:
        limits = self.limits
        if self.queue.type == "quorum" and limits and limits.overflow == "reject-publish-dlx":
            raise ValueError("limits.overflow reject-publish-dlx needs queue.type classic")
        return self

    def queue_name(self, resource_name: str) -> str:
        """Return the work queue's name: `spec.queue.name`, else the resource's name."""
        return self.queue.name or resource_name

    def dead_letter_queue_name(self, resource_name: str) -> str:
        """Return the DLQ's name: `spec.deadLetterQueue.name`, else "<queue name>.dlq"."""
        return self.dead_letter_queue.name or self.queue_name(resource_name) + DEAD_LETTER_SUFFIX


def parse_spec(spec: Mapping[str, Any]) -> OpenCheckQueueSpec:
    """Validate a resource's spec; raise SpecInvalid naming each invalid field."""
    try:
        return OpenCheckQueueSpec.model_validate(dict(spec))
    except ValidationError as error:
        raise SpecInvalid(f"The spec is invalid: {describe_validation_error(error)}") from None


def describe_validation_error(error: ValidationError) -> str:
    """Return pydantic's errors as "field.path: message; ..." without input values."""
    parts = []
    for item in error.errors(include_input=False, include_url=False):
        location = ".".join(str(part) for part in item["loc"])
        parts.append(f"{location}: {item['msg']}" if location else item["msg"])
    return "; ".join(parts)


@dataclass(frozen=True)
class BrokerIdentity:
    """Key under which resources share broker clients; never includes the password."""

    host: str
    port: int
    username: str
    management_url: str


@dataclass(frozen=True)
class BrokerSettings:
    """Everything needed to connect to one broker, from the Secret and `spec.connection`."""

    host: str
    port: int
    username: str
    password: str = field(repr=False)
    management_url: str
    tls: bool = False
    tls_verify: bool = True
    # PEM text of the CA bundle from the Secret, when `tls.caSecretKey` names one.
    ca_certificate: str | None = field(default=None, repr=False)
    # The Secret's `vhost` key: used only when `spec.queue.vhost` is not set.
    default_vhost: str | None = None

    @property
    def identity(self) -> BrokerIdentity:
        """Return the key under which the registry keeps this broker's clients."""
        return BrokerIdentity(self.host, self.port, self.username, self.management_url)


SECRET_REQUIRED_KEYS = ("host", "username", "password")


def broker_settings_from_secret(
    data: Mapping[str, bytes], connection: ConnectionSpec, secret_name: str
) -> BrokerSettings:
    """Build BrokerSettings from a Secret's decoded data and `spec.connection`.

    Raises SecretInvalid naming the missing or invalid key; values are never quoted.
    """
    text = {key: _decode_text(secret_name, key, data[key]) for key in _read_keys(data, connection)}
    missing = [key for key in SECRET_REQUIRED_KEYS if not text.get(key, "").strip()]
    if missing:
        raise SecretInvalid(f"Secret {secret_name} lacks the keys: {', '.join(missing)}")

    host = text["host"].strip()
    tls = connection.tls.enabled
    port = _port(secret_name, text.get("port", "").strip(), tls)
    management_url = _management_url(connection, text, host, tls, secret_name)
    ca_certificate = None
    if connection.tls.ca_secret_key is not None:
        ca_certificate = text.get(connection.tls.ca_secret_key)
        if not ca_certificate:
            raise SecretInvalid(
                f"Secret {secret_name} lacks the CA key {connection.tls.ca_secret_key} "
                "named by spec.connection.tls.caSecretKey"
            )
    return BrokerSettings(
        host=host,
        port=port,
        username=text["username"].strip(),
        password=text["password"],
        management_url=management_url,
        tls=tls,
        tls_verify=connection.tls.verify,
        ca_certificate=ca_certificate,
        default_vhost=text.get("vhost", "").strip() or None,
    )


def decode_secret_data(
    secret_name: str, data: Mapping[str, str | bytes] | None
) -> dict[str, bytes]:
    """Decode a Secret's base64 `data` map; raise SecretInvalid naming a key that fails."""
    decoded = {}
    for key, value in (data or {}).items():
        try:
            decoded[key] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            # The API server stores valid base64, so this is a hand-made body;
            # naming the key is enough to find it.
            raise SecretInvalid(f"Secret {secret_name} key {key} is not base64") from None
    return decoded


def _read_keys(data: Mapping[str, bytes], connection: ConnectionSpec) -> list[str]:
    # Only the keys the operator uses must be text: the Secret may hold others.
    used_keys = {*SECRET_REQUIRED_KEYS, "port", "vhost", "management_url"}
    if connection.tls.ca_secret_key is not None:
        used_keys.add(connection.tls.ca_secret_key)
    return [key for key in data if key in used_keys]


def _decode_text(secret_name: str, key: str, value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        # The message names the key but never shows the bytes, which may be a password.
        raise SecretInvalid(f"Secret {secret_name} key {key} is not UTF-8 text") from None


def _port(secret_name: str, value: str, tls: bool) -> int:
    if not value:
        return DEFAULT_AMQPS_PORT if tls else DEFAULT_AMQP_PORT
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise SecretInvalid(f"Secret {secret_name} key port is not a port number (1-65535)")
    return int(value)


def _management_url(
    connection: ConnectionSpec, text: Mapping[str, str], host: str, tls: bool, secret_name: str
) -> str:
    url = connection.management_url or text.get("management_url", "").strip()
    if not url:
        if tls:
            url = f"https://{_bracket_ipv6(host)}:{DEFAULT_MANAGEMENT_TLS_PORT}"
        else:
            url = f"http://{_bracket_ipv6(host)}:{DEFAULT_MANAGEMENT_PORT}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        source = (
            "spec.connection.managementURL"
            if connection.management_url
            else f"Secret {secret_name} key management_url"
        )
        raise SecretInvalid(f"{source} is not an http(s) URL with a host")
    if parts.username or parts.password:
        # A URL with credentials would end up in logs and status; the
        # credentials belong in the username and password keys.
        raise SecretInvalid("The management URL must not contain credentials")
    return url.rstrip("/")


def _bracket_ipv6(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
