"""A client of the RabbitMQ management HTTP API, over requests.

It reads queues, policies and connections and writes policies, and it
translates HTTP and socket errors into the exceptions of `errors.py`. Every
vhost and object name is percent-encoded in its own path segment, so names
with "/", spaces, "?", "#" or "%" address the right object.

One client serves one broker identity and may be called from several
threads: a lock serialises requests on its requests.Session, which is not
documented as thread-safe.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import requests

from ..errors import (
    AccessRefused,
    AuthenticationFailed,
    BrokerError,
    BrokerRequestFailed,
    BrokerUnreachable,
    PolicyFailed,
    QueueNotEmpty,
)

logger = logging.getLogger(__name__)

# Seconds to wait for the TCP connection, then for the reply. The queue
# listing of a broker with thousands of queues takes longer than one check.
CONNECT_TIMEOUT_SECONDS = 5.0
READ_TIMEOUT_SECONDS = 30.0
# The fields of one queue in the listing: with `columns` the broker sends
# only these, which keeps the reply small on brokers with many queues.
QUEUE_FIGURE_COLUMNS = "name,vhost,messages_ready,messages_unacknowledged,consumers"
# Query of the live queue listing: the broker reads the queues' own
# counters instead of the statistics database, so the counts are current
# rather than up to two collect_statistics_interval periods old (seen on
# RabbitMQ 3.10.8). That listing has no consumer count.
QUEUE_TOTALS_PARAMS = {
    "disable_stats": "true",
    "enable_queue_totals": "true",
    "columns": "name,vhost,messages_ready,messages_unacknowledged",
}
# Maximum length of a broker reason quoted in an exception message.
REASON_MAX_CHARACTERS = 300


@dataclass(frozen=True)
class QueueFigures:
    """Counts of one queue as the management API reported them.

    A count is None when the reply lacks it: the broker sends no counts for
    a queue whose statistics are not collected yet (the first seconds after
    a declare), for a queue on an unavailable node, or when the broker runs
    with statistics disabled. None never means zero.

    NOTE: the counts are as old as the broker's last statistics emission,
    every 5 s by default (`collect_statistics_interval`).
    """

    vhost: str
    name: str
    ready: int | None
    unacknowledged: int | None
    consumers: int | None


@dataclass(frozen=True)
class QueueInfo:
    """One queue's declared properties, policy and counts."""

    vhost: str
    name: str
    type: str
    durable: bool
    arguments: dict[str, Any]
    policy: str | None
    effective_policy_definition: dict[str, Any]
    figures: QueueFigures


@dataclass(frozen=True)
class PolicyInfo:
    """A policy as the broker stores it."""

    vhost: str
    name: str
    pattern: str
    apply_to: str
    priority: int
    definition: dict[str, Any]


@dataclass(frozen=True)
class ConnectionInfo:
    """One client connection; `client_name` is the name the client gave, if any."""

    name: str
    user: str
    vhost: str
    client_name: str | None


@dataclass(frozen=True)
class BrokerOverview:
    """The broker's version, from /api/overview."""

    rabbitmq_version: str
    management_version: str

    @property
    def version_tuple(self) -> tuple[int, ...]:
        """Return the RabbitMQ version as integers, e.g. (3, 10, 8); () when unparsable."""
        numbers = []
        for part in self.rabbitmq_version.split("."):
            digits = "".join(character for character in part if character.isdigit())
            if not digits:
                break
            numbers.append(int(digits))
        return tuple(numbers)


@dataclass
class ManagementClient:
    """Calls of the management API of one broker, authenticated with basic auth."""

    base_url: str
    username: str
    password: str = field(repr=False)
    verify_tls: bool = True
    ca_certificate: str | None = field(default=None, repr=False)
    timeout_seconds: tuple[float, float] = (CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS)

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        self._lock = threading.Lock()
        self._ca_file: str | None = None
        self._session = requests.Session()
        self._session.auth = (self.username, self.password)
        self._session.headers["Accept"] = "application/json"
        self._session.verify = self._verify_setting()

    def close(self) -> None:
        """Close pooled HTTP connections and remove the CA bundle file."""
        with self._lock:
            self._session.close()
            if self._ca_file is not None:
                os.unlink(self._ca_file)
                self._ca_file = None

    # Reads.

    def overview(self) -> BrokerOverview:
        """Return the broker's version."""
        body = self._request(
            "GET", "/api/overview", params={"columns": "rabbitmq_version,management_version"}
        )
        return BrokerOverview(
            rabbitmq_version=str(body.get("rabbitmq_version", "")),
            management_version=str(body.get("management_version", "")),
        )

    def list_queues(self, vhost: str | None = None) -> list[QueueFigures]:
        """Return the counts of every queue on the broker, or of one vhost, in one request."""
        path = "/api/queues" if vhost is None else f"/api/queues/{encode(vhost)}"
        body = self._request("GET", path, params={"columns": QUEUE_FIGURE_COLUMNS})
        if not isinstance(body, list):
            raise BrokerRequestFailed(f"GET {path} returned {type(body).__name__}, not a list")
        return [queue_figures(item) for item in body if isinstance(item, dict)]

    def list_queue_totals(self, vhost: str | None = None) -> list[QueueFigures]:
        """Return the current ready and unacknowledged counts of every queue, in one request.

        With `vhost`, only the queues of that vhost. `consumers` is always
        None: this listing skips the statistics database, which contains the
        consumer counts. A broker that ignores the query parameters returns
        the statistics listing instead.
        """
        path = "/api/queues" if vhost is None else f"/api/queues/{encode(vhost)}"
        body = self._request("GET", path, params=QUEUE_TOTALS_PARAMS)
        if not isinstance(body, list):
            raise BrokerRequestFailed(f"GET {path} returned {type(body).__name__}, not a list")
        return [queue_figures(item) for item in body if isinstance(item, dict)]

    def read_queue_figures(self) -> dict[tuple[str, str], QueueFigures]:
        """Return `list_queues()` keyed by (vhost, queue name)."""
        return {(figures.vhost, figures.name): figures for figures in self.list_queues()}

    def get_queue(self, vhost: str, name: str) -> QueueInfo | None:
        """Return one queue, or None when it does not exist (or the vhost does not)."""
        body = self._request("GET", queue_path(vhost, name), missing_ok=True)
        if body is None:
            return None
        return QueueInfo(
            vhost=str(body.get("vhost", vhost)),
            name=str(body.get("name", name)),
            type=str(body.get("type", "classic")),
            durable=bool(body.get("durable", False)),
            arguments=dict(body.get("arguments") or {}),
            policy=body.get("policy") or None,
            effective_policy_definition=dict(body.get("effective_policy_definition") or {}),
            figures=queue_figures(body, vhost, name),
        )

    def get_policy(self, vhost: str, name: str) -> PolicyInfo | None:
        """Return one policy, or None when it does not exist."""
        body = self._request("GET", policy_path(vhost, name), missing_ok=True)
        if body is None:
            return None
        return PolicyInfo(
            vhost=str(body.get("vhost", vhost)),
            name=str(body.get("name", name)),
            pattern=str(body.get("pattern", "")),
            apply_to=str(body.get("apply-to", "")),
            priority=int(body.get("priority", 0)),
            definition=dict(body.get("definition") or {}),
        )

    def list_connections(self) -> list[ConnectionInfo]:
        """Return every client connection to the broker."""
        body = self._request(
            "GET", "/api/connections", params={"columns": "name,user,vhost,client_properties"}
        )
        connections = []
        for item in body if isinstance(body, list) else []:
            properties = item.get("client_properties") or {}
            connections.append(
                ConnectionInfo(
                    name=str(item.get("name", "")),
                    user=str(item.get("user", "")),
                    vhost=str(item.get("vhost", "")),
                    client_name=properties.get("connection_name"),
                )
            )
        return connections

    # Writes.

    def put_policy(
        self,
        vhost: str,
        name: str,
        pattern: str,
        definition: Mapping[str, Any],
        priority: int,
        apply_to: str = "queues",
    ) -> None:
        """Create or replace a policy; raise PolicyFailed with the broker's reason on 400."""
        body = {
            "pattern": pattern,
            "definition": dict(definition),
            "priority": priority,
            "apply-to": apply_to,
        }
        self._request("PUT", policy_path(vhost, name), json=body, rejected=PolicyFailed)

    def delete_policy(self, vhost: str, name: str) -> bool:
        """Delete a policy; return False when it did not exist."""
        return self._request("DELETE", policy_path(vhost, name), missing_ok=True) is not None

    def delete_queue(self, vhost: str, name: str, if_empty: bool = False) -> bool:
        """Delete a queue; return False when it did not exist.

        With `if_empty`, the broker deletes only an empty queue, and a queue
        with messages raises QueueNotEmpty.
        """
        params = {"if-empty": "true"} if if_empty else None
        result = self._request(
            "DELETE",
            queue_path(vhost, name),
            params=params,
            missing_ok=True,
            rejected=QueueNotEmpty,
        )
        return result is not None

    def put_vhost(self, vhost: str) -> None:
        """Create a vhost; a vhost that exists is left as it is."""
        self._request("PUT", f"/api/vhosts/{encode(vhost)}")

    # Plumbing.

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        missing_ok: bool = False,
        rejected: type[BrokerError] = BrokerRequestFailed,
    ) -> Any:
        """Send one request; return the decoded JSON body, {} for an empty one.

        Returns None for HTTP 404 when `missing_ok`. Raises `rejected` for
        HTTP 400, and the matching BrokerError for every other failure.
        """
        url = self.base_url + path
        try:
            with self._lock:
                response = self._session.request(
                    method, url, params=params, json=json, timeout=self.timeout_seconds
                )
        except requests.exceptions.SSLError as error:
            # Certificate problems do not heal by themselves, but the Secret
            # may be fixed: retry like any other unreachable broker.
            raise BrokerUnreachable(
                f"TLS to the management API at {self.base_url} failed: {error}"
            ) from None
        except (requests.ConnectionError, requests.Timeout) as error:
            raise BrokerUnreachable(
                f"The management API at {self.base_url} is unreachable: {type(error).__name__}"
            ) from None
        return self._decode(method, path, response, missing_ok, rejected)

    def _decode(
        self,
        method: str,
        path: str,
        response: requests.Response,
        missing_ok: bool,
        rejected: type[BrokerError],
    ) -> Any:
        status = response.status_code
        if status == 404 and missing_ok:
            return None
        if status == 401:
            raise AuthenticationFailed(
                f"The management API at {self.base_url} rejected the login of user "
                f"{self.username!r} (HTTP 401); check the username and password in the Secret"
            )
        if status == 403:
            raise AccessRefused(
                f"User {self.username!r} may not {method} {path} (HTTP 403): "
                f"{broker_reason(response)}"
            )
        if status == 400:
            raise rejected(f"{method} {path} was rejected (HTTP 400): {broker_reason(response)}")
        if status >= 300:
            raise BrokerRequestFailed(
                f"{method} {path} failed with HTTP {status}: {broker_reason(response)}"
            )
        if not response.content:
            return {}
        try:
            return response.json()
        except ValueError:
            # A proxy in front of the broker may return HTML.
            raise BrokerRequestFailed(
                f"{method} {path} returned a body that is not JSON"
            ) from None

    def _verify_setting(self) -> bool | str:
        if not self.verify_tls:
            return False
        if self.ca_certificate is None:
            return True
        # requests reads a CA bundle only from a file.
        handle, self._ca_file = tempfile.mkstemp(prefix="openchecker-ca-", suffix=".pem")
        with os.fdopen(handle, "w") as ca_file:
            ca_file.write(self.ca_certificate)
        return self._ca_file


def encode(name: str) -> str:
    """Return a vhost or object name percent-encoded as one URL path segment ("/" is %2F)."""
    return quote(name, safe="")


def queue_path(vhost: str, name: str) -> str:
    """Return the management API path of one queue."""
    return f"/api/queues/{encode(vhost)}/{encode(name)}"


def policy_path(vhost: str, name: str) -> str:
    """Return the management API path of one policy."""
    return f"/api/policies/{encode(vhost)}/{encode(name)}"


def queue_figures(item: Mapping[str, Any], vhost: str = "", name: str = "") -> QueueFigures:
    """Build QueueFigures from one queue of a reply; an absent or non-integer count is None."""
    return QueueFigures(
        vhost=str(item.get("vhost", vhost)),
        name=str(item.get("name", name)),
        ready=_count(item.get("messages_ready")),
        unacknowledged=_count(item.get("messages_unacknowledged")),
        consumers=_count(item.get("consumers")),
    )


def broker_reason(response: requests.Response) -> str:
    """Return the `reason` of a management API error reply, shortened, or its status text."""
    try:
        body = response.json()
    except ValueError:
        # Not every error reply is JSON, e.g. one from a proxy.
        body = None
    reason = body.get("reason") if isinstance(body, dict) else None
    text = str(reason or response.reason or "no reason given").strip()
    return text[:REASON_MAX_CHARACTERS]


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value
