"""Kopf handlers of the agent fleet: the config Secret, the Deployment and the scaler's registry.

- create, update of `spec`, resume, and a timer: render config.ini into
  the `<name>-agent-config` Secret, create or update the `<name>-agent`
  Deployment, and register the resource with the scaler. The timer picks
  up a changed connection Secret (a rotated password) and repairs drift.
- events of OpenCheckQueues: forget deleted resources.
- events of agent Deployments: feed their replica counts to the scaler and
  recreate a Deployment deleted while its resource still exists.

The scaler task itself starts and stops in `handlers/lifecycle.py`.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from .. import fleet as fleet_service
from ..agentconfig import ConfigRenderError
from ..conditions import FLEET_READY, Condition
from ..errors import BrokerError, SecretNotFound, SpecInvalid
from ..kube import (
    RESOURCE_GROUP,
    RESOURCE_KIND,
    RESOURCE_PLURAL,
    RESOURCE_VERSION,
    KubeClient,
    NotFoundError,
)
from ..models import BrokerSettings, OpenCheckQueueSpec, broker_settings_from_secret, parse_spec
from ..scaler import FleetRegistry, ResourceKey, ScaleTarget
from ..workloads import AGENT_NAME, INSTANCE_LABEL, NAME_LABEL, Owner, deployment_name
from .lifecycle import broker_registry, memo_item
from .queues import write_conditions

logger = logging.getLogger(__name__)

# Seconds between two full reconciles of one fleet. Each costs three reads
# (connection Secret, config Secret, Deployment) and no write when nothing
# changed; a rotated broker password reaches the agents within this time.
FLEET_RESYNC_SECONDS = 120.0
FLEET_RESYNC_INITIAL_DELAY_SECONDS = 10.0


@kopf.on.resume(RESOURCE_GROUP, RESOURCE_VERSION, RESOURCE_PLURAL)
@kopf.on.create(RESOURCE_GROUP, RESOURCE_VERSION, RESOURCE_PLURAL)
@kopf.on.update(RESOURCE_GROUP, RESOURCE_VERSION, RESOURCE_PLURAL, field="spec")
async def reconcile_agent_fleet(
    body: kopf.Body,
    spec: kopf.Spec,
    status: kopf.Status,
    patch: kopf.Patch,
    name: str,
    namespace: str | None,
    uid: str,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """Render the agent config and create or update the Deployment of one resource."""
    try:
        await reconcile(body, spec, name, require_namespace(namespace, name), uid, memo)
    except (SpecInvalid, BrokerError) as error:
        write_fleet_ready(body, status, patch, fleet_failed_condition(error))
        raise
    write_fleet_ready(body, status, patch, fleet_ready_condition(name))


@kopf.timer(
    RESOURCE_GROUP,
    RESOURCE_VERSION,
    RESOURCE_PLURAL,
    interval=FLEET_RESYNC_SECONDS,
    initial_delay=FLEET_RESYNC_INITIAL_DELAY_SECONDS,
)
async def resync_agent_fleet(
    body: kopf.Body,
    spec: kopf.Spec,
    status: kopf.Status,
    patch: kopf.Patch,
    name: str,
    namespace: str | None,
    uid: str,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """Reconcile the fleet again, for Secret rotation and drift.

    An invalid spec or connection Secret is logged and written to the
    FleetReady condition, once per interval, instead of failing the timer.
    """
    try:
        await reconcile(body, spec, name, require_namespace(namespace, name), uid, memo)
    except (SpecInvalid, BrokerError) as error:
        logger.warning("Resync of the agent fleet of %s/%s skipped: %s", namespace, name, error)
        write_fleet_ready(body, status, patch, fleet_failed_condition(error))
        return
    write_fleet_ready(body, status, patch, fleet_ready_condition(name))


@kopf.on.event(RESOURCE_GROUP, RESOURCE_VERSION, RESOURCE_PLURAL)
def forget_deleted_resource(
    type: str,
    meta: kopf.Meta,
    name: str,
    namespace: str | None,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """Drop a deleted resource from the scaler; the garbage collector removes its objects.

    While a deletion waits (for its finalizer, or for a foreground deletion
    of its dependents) the scaler keeps scaling, which helps drain the
    queue, but a deleted Deployment is no longer recreated.
    """
    registry = fleet_registry(memo)
    key: ResourceKey = (require_namespace(namespace, name), name)
    if type == "DELETED":
        registry.unregister(key)
        logger.info("Stopped scaling %s/%s: the resource was deleted.", namespace, name)
    elif meta.get("deletionTimestamp") and key in registry.fleets:
        del registry.fleets[key]


@kopf.on.event("apps", "v1", "deployments", labels={NAME_LABEL: AGENT_NAME})
async def track_agent_deployment(
    type: str,
    body: kopf.Body,
    name: str,
    namespace: str | None,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """Record an agent Deployment's replica counts, and recreate it after an early deletion."""
    instance = body.get("metadata", {}).get("labels", {}).get(INSTANCE_LABEL)
    if not instance:
        return
    key: ResourceKey = (require_namespace(namespace, name), instance)
    registry = fleet_registry(memo)
    if type == "DELETED":
        registry.forget_deployment(key)
        await recreate_deployment(key, registry, kube_client(memo))
        return
    spec_replicas = body.get("spec", {}).get("replicas") or 0
    status_replicas = body.get("status", {}).get("replicas") or 0
    registry.observe_deployment(key, int(spec_replicas), int(status_replicas))


async def reconcile(
    body: kopf.Body, spec: kopf.Spec, name: str, namespace: str, uid: str, memo: kopf.Memo
) -> None:
    """Reconcile one fleet and register the resource with the scaler.

    Raises kopf's TemporaryError when the connection Secret or the API
    server fails, and PermanentError for a spec or Secret the fleet cannot
    be built from.
    """
    parsed = parse_spec(spec)
    kube = kube_client(memo)
    registry = fleet_registry(memo)
    key: ResourceKey = (namespace, name)

    broker = await read_broker_settings(kube, namespace, parsed)
    owner = Owner(
        api_version=f"{RESOURCE_GROUP}/{RESOURCE_VERSION}", kind=RESOURCE_KIND, name=name, uid=uid
    )
    fleet = fleet_service.fleet_spec(owner, namespace, parsed, broker)
    clients = broker_registry(memo).get(broker)
    target = ScaleTarget(
        namespace=namespace,
        name=name,
        uid=uid,
        vhost=fleet.connection.vhost,
        queue=fleet.options.queue,
        dead_letter_queue=parsed.dead_letter_queue_name(name),
        # The whole settings, password included: resources share a read only
        # when their credentials match, so a wrong password never gets figures.
        broker_key=broker,
        reader=registry.reader_for(broker, clients.management),
        policy=fleet.policy,
        poll_interval_seconds=parsed.scaling.poll_interval_seconds,
    )
    try:
        result = await fleet_service.reconcile_fleet(kube, fleet, registry.desired_replicas(key))
    except ConfigRenderError as error:
        # The message names the field and never quotes a password.
        raise SpecInvalid(f"The agent config cannot be rendered: {error}") from None
    registry.register(target, fleet)
    registry.observe_deployment(
        key, result.deployment.spec_replicas, result.deployment.status_replicas
    )
    report_changes(body, result)


async def read_broker_settings(
    kube: KubeClient, namespace: str, spec: OpenCheckQueueSpec
) -> BrokerSettings:
    """Read the connection Secret and return the BrokerSettings it describes."""
    secret_name = spec.connection.secret_ref.name
    try:
        data = await kube.read_secret_data(namespace, secret_name)
    except NotFoundError:
        raise SecretNotFound(
            f"Secret {namespace}/{secret_name} named by spec.connection.secretRef does not exist"
        ) from None
    return broker_settings_from_secret(data, spec.connection, secret_name)


async def recreate_deployment(key: ResourceKey, registry: FleetRegistry, kube: KubeClient) -> None:
    """Create the Deployment again when its resource is still registered.

    A resource being deleted leaves `registry.fleets` as soon as its
    deletion starts, so this does not fight the garbage collector.
    """
    fleet = registry.fleets.get(key)
    if fleet is None:
        return
    logger.warning(
        "Deployment of %s/%s was deleted while the resource exists; creating it again.", *key
    )
    try:
        result = await fleet_service.reconcile_fleet(kube, fleet, registry.desired_replicas(key))
    except (kopf.TemporaryError, kopf.PermanentError, ConfigRenderError) as error:
        # The timer's next reconcile creates it; until then the scaler skips it.
        logger.error("Recreating the Deployment of %s/%s failed: %s", *key, error)
        return
    registry.observe_deployment(
        key, result.deployment.spec_replicas, result.deployment.status_replicas
    )


def report_changes(body: kopf.Body, result: fleet_service.FleetResult) -> None:
    """Post an Event for each object the reconcile created or changed."""
    deployment = result.deployment
    if result.deployment_created:
        kopf.info(
            body,
            reason="FleetCreated",
            message=f"Created Deployment {deployment.name} with "
            f"{deployment.spec_replicas} replicas and its config Secret.",
        )
    elif result.template_changed:
        kopf.info(
            body,
            reason="FleetUpdated",
            message=f"Updated the pod template of Deployment {deployment.name}; "
            f"replicas stay at {deployment.spec_replicas}.",
        )
    elif result.secret_changed:
        kopf.info(body, reason="FleetUpdated", message="Updated the agent config Secret.")


def fleet_ready_condition(name: str) -> Condition:
    return Condition.true(
        FLEET_READY,
        "FleetReconciled",
        f"Deployment {deployment_name(name)} and its config Secret match the spec.",
    )


def fleet_failed_condition(error: SpecInvalid | BrokerError) -> Condition:
    # Both error kinds carry a reason and a message that never quote a password.
    return Condition.false(FLEET_READY, error.reason, str(error))


def write_fleet_ready(
    body: kopf.Body, status: kopf.Status, patch: kopf.Patch, condition: Condition
) -> None:
    """Write FleetReady into the status patch, keeping the queue half's conditions."""
    current = list(status.get("conditions") or [])
    generation = body.get("metadata", {}).get("generation")
    write_conditions(patch, current, [condition], generation)


def require_namespace(namespace: str | None, name: str) -> str:
    """Return the namespace of a namespaced object; kopf passes None only for cluster objects."""
    if namespace is None:
        raise kopf.PermanentError(f"{name} has no namespace; OpenCheckQueue is namespaced")
    return namespace


def fleet_registry(memo: kopf.Memo) -> FleetRegistry:
    return memo_item(memo, "fleet", FleetRegistry)


def kube_client(memo: kopf.Memo) -> KubeClient:
    return memo_item(memo, "kube", KubeClient)
