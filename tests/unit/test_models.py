"""Validation of the spec models and of the connection Secret."""

from __future__ import annotations

from typing import Any

import pytest
from openchecker_operator.errors import SecretInvalid, SpecInvalid
from openchecker_operator.models import (
    ConnectionSpec,
    OpenCheckQueueSpec,
    broker_settings_from_secret,
    decode_secret_data,
    parse_spec,
)

PASSWORD = "s3cr3t-p@ss"
CONNECTION = {"secretRef": {"name": "rabbitmq"}}


def spec(**fields: Any) -> dict[str, Any]:
    return {"connection": CONNECTION, **fields}


def secret(**overrides: str) -> dict[str, bytes]:
    values = {"host": "rabbitmq.default.svc", "username": "openchecker", "password": PASSWORD}
    values.update(overrides)
    return {key: value.encode() for key, value in values.items()}


def test_minimal_spec_gets_defaults() -> None:
    parsed = parse_spec(spec())

    assert parsed.queue.type == "classic"
    assert parsed.deletion_policy == "Retain"
    assert parsed.limits is None
    assert parsed.queue_name("opencheck") == "opencheck"
    assert parsed.dead_letter_queue_name("opencheck") == "opencheck.dlq"
    assert parsed.scaling.max_replicas == 10
    assert parsed.agent.effective_drain_timeout_seconds == 840


def test_dead_letter_name_follows_queue_name() -> None:
    parsed = parse_spec(spec(queue={"name": "checks/a b"}))

    assert parsed.dead_letter_queue_name("ignored") == "checks/a b.dlq"


def test_full_spec_reads_camel_case() -> None:
    parsed = parse_spec(
        spec(
            queue={"name": "opencheck", "vhost": "/", "type": "quorum"},
            deadLetterQueue={"name": "dead_letters"},
            limits={"messageTTLMilliseconds": 5, "deliveryLimit": 3, "overflow": "drop-head"},
            connection={
                "secretRef": {"name": "s"},
                "managementURL": "http://rabbitmq:15672",
                "tls": {"enabled": True, "caSecretKey": "ca.crt", "verify": False},
            },
            deletionPolicy="Delete",
            agent={"terminationGracePeriodSeconds": 120, "drainTimeoutSeconds": 100},
            scaling={"minReplicas": 1, "maxReplicas": 3, "fallbackReplicas": 2},
        )
    )

    assert parsed.limits is not None
    assert parsed.limits.message_ttl_milliseconds == 5
    assert parsed.connection.management_url == "http://rabbitmq:15672"
    assert parsed.connection.tls.ca_secret_key == "ca.crt"
    assert parsed.dead_letter_queue_name("x") == "dead_letters"
    assert parsed.agent.effective_drain_timeout_seconds == 100


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"limits": {"messageTTLMilliseconds": -1}}, "greater than or equal to 0"),
        ({"limits": {"deliveryLimit": 5}}, "deliveryLimit needs queue.type quorum"),
        (
            {"queue": {"type": "quorum"}, "limits": {"overflow": "reject-publish-dlx"}},
            "reject-publish-dlx needs queue.type classic",
        ),
        ({"queue": {"type": "stream"}}, "queue.type"),
        ({"scaling": {"minReplicas": 3, "maxReplicas": 2}}, "must not exceed maxReplicas"),
        ({"scaling": {"messagesPerReplica": 0}}, "greater than 0"),
        ({"scaling": {"fallbackReplicas": 11}}, "fallbackReplicas 11 must not exceed"),
        (
            {"agent": {"terminationGracePeriodSeconds": 60, "drainTimeoutSeconds": 60}},
            "must be below terminationGracePeriodSeconds",
        ),
        ({"unknownField": 1}, "unknownField"),
    ],
)
def test_invalid_spec_names_the_problem(fields: dict[str, Any], expected: str) -> None:
    with pytest.raises(SpecInvalid) as caught:
        parse_spec(spec(**fields))

    assert expected in str(caught.value)


def test_missing_connection_is_invalid() -> None:
    with pytest.raises(SpecInvalid, match="connection"):
        parse_spec({})


def test_secret_settings_with_defaults() -> None:
    connection = ConnectionSpec.model_validate(CONNECTION)

    settings = broker_settings_from_secret(secret(), connection, "rabbitmq")

    assert settings.host == "rabbitmq.default.svc"
    assert settings.port == 5672
    assert settings.management_url == "http://rabbitmq.default.svc:15672"
    assert settings.default_vhost is None
    assert PASSWORD not in repr(settings)


def test_secret_settings_with_tls_defaults() -> None:
    connection = ConnectionSpec.model_validate(
        {"secretRef": {"name": "s"}, "tls": {"enabled": True}}
    )

    settings = broker_settings_from_secret(secret(), connection, "s")

    assert settings.port == 5671
    assert settings.management_url == "https://rabbitmq.default.svc:15671"


def test_management_url_order() -> None:
    from_secret = ConnectionSpec.model_validate(CONNECTION)
    from_spec = ConnectionSpec.model_validate(
        {**CONNECTION, "managementURL": "http://spec:15672/"}
    )
    data = secret(management_url="http://secret:15672", vhost="team", port="5673")

    assert broker_settings_from_secret(data, from_secret, "s").management_url == (
        "http://secret:15672"
    )
    assert broker_settings_from_secret(data, from_spec, "s").management_url == "http://spec:15672"
    assert broker_settings_from_secret(data, from_secret, "s").default_vhost == "team"
    assert broker_settings_from_secret(data, from_secret, "s").port == 5673


def test_identity_ignores_password() -> None:
    connection = ConnectionSpec.model_validate(CONNECTION)
    first = broker_settings_from_secret(secret(), connection, "s")
    second = broker_settings_from_secret(secret(password="other"), connection, "s")

    assert first.identity == second.identity
    assert first != second


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (secret(host=""), "lacks the keys: host"),
        ({"host": b"h"}, "lacks the keys: username, password"),
        (secret(port="amqp"), "port is not a port number"),
        (secret(port="70000"), "port is not a port number"),
        (secret(management_url="ftp://x"), "is not an http(s) URL"),
        (secret(management_url=f"http://u:{PASSWORD}@x"), "must not contain credentials"),
        ({**secret(), "username": b"\xff"}, "key username is not UTF-8"),
    ],
)
def test_invalid_secret_names_the_key(data: dict[str, bytes], expected: str) -> None:
    connection = ConnectionSpec.model_validate(CONNECTION)

    with pytest.raises(SecretInvalid) as caught:
        broker_settings_from_secret(data, connection, "rabbitmq")

    assert expected in str(caught.value)
    assert PASSWORD not in str(caught.value)


def test_missing_ca_key_is_invalid() -> None:
    connection = ConnectionSpec.model_validate(
        {"secretRef": {"name": "s"}, "tls": {"enabled": True, "caSecretKey": "ca.crt"}}
    )

    with pytest.raises(SecretInvalid, match="lacks the CA key ca.crt"):
        broker_settings_from_secret(secret(), connection, "s")


def test_decode_secret_data_rejects_bad_base64() -> None:
    assert decode_secret_data("s", {"host": "aG9zdA=="}) == {"host": b"host"}
    with pytest.raises(SecretInvalid, match="key host is not base64"):
        decode_secret_data("s", {"host": "not base64!"})


def test_spec_model_is_frozen() -> None:
    parsed = OpenCheckQueueSpec.model_validate(spec())

    with pytest.raises(ValueError, match="frozen"):
        parsed.deletion_policy = "Delete"  # type: ignore[misc]
