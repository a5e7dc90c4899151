"""Broker clients by broker identity and settings, shared by every resource.

The registry lives in kopf's memo: the startup handler creates it and the
cleanup handler closes it. Resources on the same broker share its AMQP
connections and its HTTP session, so the operator's connection count grows
with brokers and vhosts, not with resources.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from ..models import BrokerIdentity, BrokerSettings
from .amqp import AmqpClient, AmqpOptions
from .management import BrokerOverview, ManagementClient

logger = logging.getLogger(__name__)


@dataclass
class BrokerClients:
    """The AMQP and management clients of one broker."""

    settings: BrokerSettings
    amqp: AmqpClient
    management: ManagementClient
    _overview: BrokerOverview | None = field(default=None, repr=False)

    @classmethod
    def create(cls, settings: BrokerSettings, amqp_options: AmqpOptions) -> BrokerClients:
        """Create both clients; neither connects before its first call."""
        management = ManagementClient(
            base_url=settings.management_url,
            username=settings.username,
            password=settings.password,
            verify_tls=settings.tls_verify,
            ca_certificate=settings.ca_certificate,
        )
        return cls(settings, AmqpClient(settings, amqp_options), management)

    @property
    def identity(self) -> BrokerIdentity:
        """Return the identity these clients serve."""
        return self.settings.identity

    def overview(self) -> BrokerOverview:
        """Return the broker's version, read once and then kept."""
        if self._overview is None:
            self._overview = self.management.overview()
        return self._overview

    def close(self) -> None:
        """Close both clients."""
        self.amqp.close()
        self.management.close()


class BrokerRegistry:
    """BrokerClients by identity (host, port, username, management URL); thread-safe.

    Each identity keeps the clients of its CLIENTS_PER_IDENTITY most recently
    used sets of settings. Two Secrets may name the same broker and user with
    different passwords, for example a wrong one or one not yet rotated, and
    their resources must not close each other's clients on every reconcile.
    """

    # Two covers a password rotation, while the old and the new Secret are
    # both in use. A third set of settings closes the least recently used.
    CLIENTS_PER_IDENTITY = 2

    def __init__(self, amqp_options: AmqpOptions | None = None) -> None:
        self.amqp_options = amqp_options or AmqpOptions()
        self._lock = threading.Lock()
        self._clients: dict[BrokerIdentity, OrderedDict[BrokerSettings, BrokerClients]] = {}

    def get(self, settings: BrokerSettings) -> BrokerClients:
        """Return the clients of a broker's settings, creating them on first use.

        When an identity gets more than CLIENTS_PER_IDENTITY sets of settings
        (a new password, CA or TLS switch in the Secret), the clients used
        least recently are closed.
        """
        stale = []
        with self._lock:
            by_settings = self._clients.setdefault(settings.identity, OrderedDict())
            clients = by_settings.get(settings)
            if clients is None:
                clients = by_settings[settings] = BrokerClients.create(settings, self.amqp_options)
            by_settings.move_to_end(settings)
            while len(by_settings) > self.CLIENTS_PER_IDENTITY:
                stale.append(by_settings.popitem(last=False)[1])
        for item in stale:
            logger.info(
                "Connection settings of broker %s:%d changed; closing the clients of the "
                "settings used least recently.",
                settings.host,
                settings.port,
            )
            item.close()
        return clients

    def known(self) -> list[BrokerClients]:
        """Return the clients of every broker used so far."""
        with self._lock:
            return [item for group in self._clients.values() for item in group.values()]

    def close(self) -> None:
        """Close every broker's clients."""
        with self._lock:
            clients = [item for group in self._clients.values() for item in group.values()]
            self._clients = {}
        for item in clients:
            item.close()
        logger.info("Closed the clients of %d brokers.", len(clients))
