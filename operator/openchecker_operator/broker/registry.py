"""One set of broker clients per broker identity, shared by every resource.

The registry lives in kopf's memo: the startup handler creates it and the
cleanup handler closes it. Resources on the same broker share its AMQP
connections and its HTTP session, so the operator's connection count grows
with brokers and vhosts, not with resources.
"""

from __future__ import annotations

import logging
import threading
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
    """BrokerClients by identity (host, port, username, management URL); thread-safe."""

    def __init__(self, amqp_options: AmqpOptions | None = None) -> None:
        self.amqp_options = amqp_options or AmqpOptions()
        self._lock = threading.Lock()
        self._clients: dict[BrokerIdentity, BrokerClients] = {}

    def get(self, settings: BrokerSettings) -> BrokerClients:
        """Return the clients of a broker, creating them on first use.

        When the settings of a known identity changed (a new password, CA or
        TLS switch in the Secret), the old clients are closed and replaced.
        """
        stale = None
        with self._lock:
            clients = self._clients.get(settings.identity)
            if clients is not None and clients.settings != settings:
                stale, clients = clients, None
            if clients is None:
                clients = BrokerClients.create(settings, self.amqp_options)
                self._clients[settings.identity] = clients
        if stale is not None:
            logger.info(
                "Connection settings of broker %s:%d changed; reopening its clients.",
                settings.host,
                settings.port,
            )
            stale.close()
        return clients

    def known(self) -> list[BrokerClients]:
        """Return the clients of every broker used so far."""
        with self._lock:
            return list(self._clients.values())

    def close(self) -> None:
        """Close every broker's clients."""
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for item in clients:
            item.close()
        logger.info("Closed the clients of %d brokers.", len(clients))
