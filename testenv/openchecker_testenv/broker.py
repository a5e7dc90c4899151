"""How to reach a RabbitMQ broker, and vhost helpers on its management API."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import requests

from .errors import SetupError

logger = logging.getLogger(__name__)

AMQP_URL_VARIABLE = "RABBITMQ_URL"
MANAGEMENT_URL_VARIABLE = "RABBITMQ_MANAGEMENT_URL"

# Management API calls made by these helpers and by sessions from
# `management_session` time out after this many seconds unless the caller
# passes `timeout`.
MANAGEMENT_TIMEOUT_SECONDS = 10.0

FULL_PERMISSIONS = {"configure": ".*", "write": ".*", "read": ".*"}


class _TimeoutSession(requests.Session):
    """A session whose requests time out unless the caller sets `timeout`."""

    def request(
        self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any
    ) -> requests.Response:
        kwargs.setdefault("timeout", MANAGEMENT_TIMEOUT_SECONDS)
        return super().request(method, url, *args, **kwargs)


def quote_vhost(vhost: str) -> str:
    """Percent-encode a vhost name for a URL path: "/" becomes "%2F"."""
    return quote(vhost, safe="")


@dataclass(frozen=True)
class Broker:
    """Address and credentials of a RabbitMQ broker with the management plugin."""

    host: str
    amqp_port: int
    # Base URL of the management HTTP API, without a trailing slash.
    management_url: str
    username: str
    password: str
    # amqps:// instead of amqp:// in `amqp_url`.
    tls: bool = False

    def amqp_url(self, vhost: str = "/") -> str:
        """Return an AMQP URI for `vhost`, as pika.URLParameters and agents read it."""
        scheme = "amqps" if self.tls else "amqp"
        credentials = f"{quote(self.username, safe='')}:{quote(self.password, safe='')}"
        return f"{scheme}://{credentials}@{self.host}:{self.amqp_port}/{quote_vhost(vhost)}"

    def management_session(self) -> requests.Session:
        """Return a requests session with the broker user's basic auth.

        Requests time out after MANAGEMENT_TIMEOUT_SECONDS unless the caller
        passes `timeout`.
        """
        session = _TimeoutSession()
        session.auth = (self.username, self.password)
        return session

    def is_ready(self, timeout_seconds: float = 2.0) -> bool:
        """Return whether the management API accepts the credentials."""
        try:
            with self.management_session() as session:
                response = session.get(
                    f"{self.management_url}/api/overview", timeout=timeout_seconds
                )
        except requests.RequestException:
            return False
        return response.status_code == 200

    def create_vhost(self, vhost: str) -> None:
        """Create `vhost` and give the broker user full permissions on it."""
        path = quote_vhost(vhost)
        with self.management_session() as session:
            response = session.put(f"{self.management_url}/api/vhosts/{path}")
            _raise_for_status(response, f"creating vhost {vhost!r}")
            response = session.put(
                f"{self.management_url}/api/permissions/{path}/{quote(self.username, safe='')}",
                json=FULL_PERMISSIONS,
            )
            _raise_for_status(response, f"granting {self.username!r} access to vhost {vhost!r}")

    def delete_vhost(self, vhost: str) -> None:
        """Delete `vhost` with its queues; a vhost that does not exist is ignored."""
        with self.management_session() as session:
            response = session.delete(f"{self.management_url}/api/vhosts/{quote_vhost(vhost)}")
        if response.status_code != 404:
            _raise_for_status(response, f"deleting vhost {vhost!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Broker:
        return cls(
            host=str(data["host"]),
            amqp_port=int(data["amqp_port"]),
            management_url=str(data["management_url"]),
            username=str(data["username"]),
            password=str(data["password"]),
            tls=bool(data.get("tls", False)),
        )

    @classmethod
    def from_urls(cls, amqp_url: str, management_url: str | None = None) -> Broker:
        """Build a broker from an amqp:// or amqps:// URI like RABBITMQ_URL.

        Without `management_url` the management API is assumed on the AMQP
        host at port 15672 (http) or 15671 (https with amqps), the RabbitMQ
        defaults. The URI's vhost is ignored because every helper takes one.
        Raises SetupError for a URI that is not amqp:// or amqps://.
        """
        parts = urlsplit(amqp_url)
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise SetupError(
                f"{AMQP_URL_VARIABLE} must look like amqp://user:password@host:5672/vhost, "
                f"got scheme {parts.scheme!r} and host {parts.hostname!r}."
            )
        tls = parts.scheme == "amqps"
        host = parts.hostname
        if management_url is None:
            management_url = f"https://{host}:15671" if tls else f"http://{host}:15672"
        return cls(
            host=host,
            amqp_port=parts.port or (5671 if tls else 5672),
            management_url=management_url.rstrip("/"),
            username=unquote(parts.username or "guest"),
            password=unquote(parts.password or "guest"),
            tls=tls,
        )


def _raise_for_status(response: requests.Response, action: str) -> None:
    if response.status_code >= 400:
        raise SetupError(
            f"RabbitMQ management API failed {action}: HTTP {response.status_code} "
            f"{response.text.strip()}"
        )
