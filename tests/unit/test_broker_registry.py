"""The registry of broker clients: sharing, replacement and closing, without a broker."""

from __future__ import annotations

from dataclasses import replace

from openchecker_operator.broker.registry import BrokerRegistry
from openchecker_operator.models import BrokerSettings

SETTINGS = BrokerSettings(
    host="rabbitmq.example.org",
    port=5672,
    username="openchecker",
    password="first",
    management_url="http://rabbitmq.example.org:15672",
)


def test_same_settings_share_clients() -> None:
    registry = BrokerRegistry()

    assert registry.get(SETTINGS) is registry.get(replace(SETTINGS))


def test_two_passwords_keep_their_clients() -> None:
    # Two Secrets name the same broker and user, one with a wrong password:
    # each resource's reconcile must not close the other's clients.
    registry = BrokerRegistry()
    right = registry.get(SETTINGS)
    wrong = registry.get(replace(SETTINGS, password="wrong"))

    assert registry.get(SETTINGS) is right
    assert registry.get(replace(SETTINGS, password="wrong")) is wrong
    assert right.settings.password == "first"
    assert wrong.settings.password == "wrong"


def test_rotated_passwords_close_oldest_clients() -> None:
    registry = BrokerRegistry()
    first = registry.get(SETTINGS)
    for password in ("second", "third", "fourth"):
        registry.get(replace(SETTINGS, password=password))

    known = registry.known()
    assert first not in known
    assert len(known) == BrokerRegistry.CLIENTS_PER_IDENTITY
