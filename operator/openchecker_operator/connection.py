"""Resolve a resource's broker connection: read its Secret, build BrokerSettings.

Blocking: call it from sync handlers (kopf runs them in threads) or
through asyncio.to_thread.
"""

from __future__ import annotations

import kubernetes
import urllib3

from .errors import AccessRefused, SecretNotFound, SecretUnreadable
from .models import BrokerSettings, OpenCheckQueueSpec, broker_settings_from_secret
from .models import decode_secret_data as decode_data

# Seconds to wait for the API server when reading a Secret.
SECRET_READ_TIMEOUT_SECONDS = 10.0


def read_broker_settings(
    api_client: kubernetes.client.ApiClient, namespace: str, spec: OpenCheckQueueSpec
) -> BrokerSettings:
    """Return the broker settings of a resource from its connection Secret.

    Raises SecretNotFound, SecretInvalid, AccessRefused (the operator may
    not read the Secret) or SecretUnreadable for other API failures.
    """
    name = spec.connection.secret_ref.name
    core = kubernetes.client.CoreV1Api(api_client)
    try:
        secret = core.read_namespaced_secret(
            name, namespace, _request_timeout=SECRET_READ_TIMEOUT_SECONDS
        )
    except kubernetes.client.ApiException as error:
        if error.status == 404:
            raise SecretNotFound(
                f"Secret {namespace}/{name} named by spec.connection.secretRef does not exist"
            ) from None
        if error.status == 403:
            raise AccessRefused(
                f"The operator may not read Secret {namespace}/{name} (HTTP 403); "
                "check the operator's RBAC"
            ) from None
        raise SecretUnreadable(
            f"Reading Secret {namespace}/{name} failed with HTTP {error.status}"
        ) from None
    except urllib3.exceptions.HTTPError as error:
        raise SecretUnreadable(
            f"Reading Secret {namespace}/{name} failed: {type(error).__name__}"
        ) from None
    data = decode_data(name, secret.data)
    return broker_settings_from_secret(data, spec.connection, name)
