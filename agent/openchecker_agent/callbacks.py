"""POST a task's results to its callback URL, with retries and a host allowlist."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from .errors import PermanentTaskError

logger = logging.getLogger(__name__)

# Statuses that mean "try again later". Any other error status is final.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# urllib3 sleeps backoff_factor * 2 ** (retry - 1) seconds between attempts
# (0.5, 1, 2, 4, ... s), capped at its default of 120 s.
BACKOFF_FACTOR_SECONDS = 0.5


class CallbackError(PermanentTaskError):
    """The callback could not be delivered after every attempt."""


def check_callback_url(url: str, allowed_hosts: Iterable[str]) -> str:
    """Return the URL's host when the URL is http(s) and its host is allowed.

    Raises PermanentTaskError otherwise, so a crafted message cannot make the
    agent send results to an arbitrary address.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise PermanentTaskError(
            f"callback_url has scheme {parts.scheme!r}; expected http or https"
        )
    host = (parts.hostname or "").lower()
    allowed = {name.lower() for name in allowed_hosts}
    if not host or host not in allowed:
        raise PermanentTaskError(
            f"callback host {host!r} is not in [Agent] callback_allowed_hosts "
            f"({', '.join(sorted(allowed)) or 'empty'})"
        )
    return host


def post_results(
    url: str,
    payload: Mapping[str, Any],
    *,
    timeout_seconds: float,
    max_attempts: int,
) -> None:
    """POST `payload` as JSON to `url`, retrying connection errors and 429/5xx.

    Redirects are not followed, so the allowlist check of `url` holds for the
    host that receives the results. Raises CallbackError when every attempt
    failed or the response has another non-2xx status.
    """
    host = urlsplit(url).hostname
    retry = Retry(
        total=max_attempts - 1,
        backoff_factor=BACKOFF_FACTOR_SECONDS,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=frozenset({"POST"}),
        redirect=0,
        raise_on_status=False,
        # A Retry-After header could hold a worker for any time it names.
        respect_retry_after_header=False,
    )
    with requests.Session() as session:
        adapter = HTTPAdapter(max_retries=retry)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        try:
            response = session.post(
                url, json=payload, timeout=timeout_seconds, allow_redirects=False
            )
        except requests.RequestException as error:
            # Retries are spent (or the error is not retryable); the task fails.
            raise CallbackError(
                f"callback to host {host!r} failed after {max_attempts} attempt(s): "
                f"{type(error).__name__}"
            ) from error
    if not 200 <= response.status_code < 300:
        raise CallbackError(
            f"callback to host {host!r} returned HTTP {response.status_code} "
            f"after up to {max_attempts} attempt(s)"
        )
    logger.info("Posted results to callback host %r (HTTP %d).", host, response.status_code)
