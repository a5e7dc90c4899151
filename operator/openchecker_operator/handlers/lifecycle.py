"""Operator start and stop: kopf settings, shared clients in `memo`, the scaler task.

What the startup handler puts into kopf's memo (every resource handler
gets a shallow copy, so these objects are shared):

- `memo.settings`: OperatorSettings (put there by `__main__`, else read
  from the environment here).
- `memo.brokers`: BrokerRegistry, one BrokerClients per broker identity.
- `memo.api_client`: kubernetes.client.ApiClient for blocking calls from
  sync handlers.
- `memo.kube`: KubeClient, the asynchronous wrapper over the same ApiClient.
- `memo.fleet`: FleetRegistry, the scaler's resources and records.
- `memo.scaler_task`: the asyncio task of the scaler's poll loop.
- `memo.resource_locks`: ResourceLocks, so the reconcile handlers and the
  resync timer of one resource never run their broker steps at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any, TypeVar

import kopf
import kubernetes

from ..broker.amqp import AmqpOptions
from ..broker.registry import BrokerRegistry
from ..kube import KubeClient
from ..scaler import FleetRegistry, Scaler
from ..settings import OperatorSettings

T = TypeVar("T")

logger = logging.getLogger(__name__)

FINALIZER = "openchecker.io/queue-cleanup"
# kopf's own bookkeeping (handler progress, last handled spec) goes into
# annotations with this prefix, because the CRD's status schema has no
# place for kopf's fields.
ANNOTATIONS_PREFIX = "openchecker.io"
# Threads for sync handlers; each handler holds one while it talks to a
# broker, and the per-vhost AMQP lock serialises declares anyway.
SYNC_HANDLER_THREADS = 8


@kopf.on.startup()
async def start_operator(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Configure kopf and create the shared clients and the scaler task."""
    configure_kopf(settings)
    operator_settings = memo.get("settings")
    if not isinstance(operator_settings, OperatorSettings):
        operator_settings = memo["settings"] = OperatorSettings()

    memo["resource_locks"] = ResourceLocks()
    memo["brokers"] = BrokerRegistry(
        AmqpOptions(
            connection_name=operator_settings.connection_name,
            heartbeat_seconds=operator_settings.amqp_heartbeat_seconds,
        )
    )
    api_client = await asyncio.to_thread(create_api_client)
    memo["api_client"] = api_client
    memo["kube"] = KubeClient(api_client)
    memo["fleet"] = FleetRegistry()
    memo["scaler_task"] = asyncio.create_task(
        Scaler(memo["fleet"], memo["kube"]).run(), name="openchecker-scaler"
    )
    logger.info(
        "Operator started: resync every %.1f s, AMQP connection name %r.",
        operator_settings.resync_interval_seconds,
        operator_settings.connection_name,
    )


@kopf.on.cleanup()
async def stop_operator(memo: kopf.Memo, **_: Any) -> None:
    """Stop the scaler and close every broker and API client."""
    task = memo.get("scaler_task")
    if isinstance(task, asyncio.Task):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    brokers = memo.get("brokers")
    if isinstance(brokers, BrokerRegistry):
        await asyncio.to_thread(brokers.close)
    api_client = memo.get("api_client")
    if isinstance(api_client, kubernetes.client.ApiClient):
        await asyncio.to_thread(api_client.close)
    logger.info("Operator cleanup finished.")


class ResourceLocks:
    """One lock per resource uid, created on first use and dropped after the last holder."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextlib.contextmanager
    def hold(self, uid: str) -> Iterator[None]:
        """Hold the lock of resource `uid` for the duration of the block."""
        with self._guard:
            lock, holders = self._locks.get(uid, (threading.Lock(), 0))
            self._locks[uid] = (lock, holders + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, holders = self._locks[uid]
                if holders <= 1:
                    del self._locks[uid]
                else:
                    self._locks[uid] = (lock, holders - 1)


def configure_kopf(settings: kopf.OperatorSettings) -> None:
    """Apply the operator's choices to kopf's settings."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATIONS_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATIONS_PREFIX, key="last-handled-configuration"
    )
    settings.execution.max_workers = SYNC_HANDLER_THREADS
    # Only explicit kopf.info/warn/exception calls become Events; handler
    # log lines stay in the operator's log.
    settings.posting.loggers = False


def create_api_client() -> kubernetes.client.ApiClient:
    """Return an ApiClient from the in-cluster service account, else from the kubeconfig."""
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration
        )
    except kubernetes.config.ConfigException:
        # Not in a pod: use $KUBECONFIG or ~/.kube/config, as kubectl does.
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration
        )
    return kubernetes.client.ApiClient(configuration)


def memo_item(memo: kopf.Memo, key: str, kind: type[T]) -> T:
    """Return the object the startup handler put into `memo` under `key`.

    Raises kopf.TemporaryError while startup has not stored it yet, so the
    handler that asked is retried instead of failing.
    """
    item = memo.get(key)
    if not isinstance(item, kind):
        raise kopf.TemporaryError(
            f"The operator is still starting: no {kind.__name__} in memo yet.", 5
        )
    return item


def broker_registry(memo: kopf.Memo) -> BrokerRegistry:
    return memo_item(memo, "brokers", BrokerRegistry)


def operator_settings(memo: kopf.Memo) -> OperatorSettings:
    return memo_item(memo, "settings", OperatorSettings)


def api_client(memo: kopf.Memo) -> kubernetes.client.ApiClient:
    return memo_item(memo, "api_client", kubernetes.client.ApiClient)


def resource_locks(memo: kopf.Memo) -> ResourceLocks:
    return memo_item(memo, "resource_locks", ResourceLocks)
