"""Reconcile one resource's agent fleet: the config Secret and the Deployment.

The Secret is created or updated whenever the rendered config changes. The
Deployment is created with the scaler's replica count, and afterwards only
its pod template and metadata change; `spec.replicas` belongs to the
scaler.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .agentconfig import AgentOptions, BrokerConnection, RenderedConfig, render_config
from .kube import DeploymentState, KubeClient
from .scaling import ScalingPolicy
from .workloads import (
    AgentPodSettings,
    Owner,
    build_deployment,
    build_metadata_patch,
    build_pod_template,
    build_secret,
    build_template_patch,
    deployment_name,
    template_checksum,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FleetSpec:
    """Everything the fleet of one resource is built from."""

    owner: Owner
    namespace: str
    connection: BrokerConnection
    options: AgentOptions
    pod: AgentPodSettings
    policy: ScalingPolicy


@dataclass(frozen=True)
class FleetResult:
    """Outcome of one reconcile, for logs and Events."""

    secret_changed: bool
    deployment_created: bool
    template_changed: bool
    deployment: DeploymentState
    config_checksum: str


async def reconcile_fleet(
    kube: KubeClient, fleet: FleetSpec, initial_replicas: int | None
) -> FleetResult:
    """Create or update the config Secret and the Deployment of one resource.

    `initial_replicas` is the scaler's current decision; a new Deployment
    starts with it, or with minReplicas when the scaler has none yet.
    Raises ConfigRenderError for values config.ini cannot carry and kopf's
    TemporaryError or PermanentError for API failures.
    """
    config = render_config(fleet.connection, fleet.options)
    secret_changed = await kube.apply_secret(build_secret(fleet.owner, fleet.namespace, config))

    name = deployment_name(fleet.owner.name)
    current = await kube.read_deployment(fleet.namespace, name)
    if current is None:
        replicas = fleet.policy.clamp(
            fleet.policy.min_replicas if initial_replicas is None else initial_replicas
        )
        body = build_deployment(fleet.owner, fleet.namespace, fleet.pod, config, replicas)
        created = await kube.create_deployment(body)
        logger.info("Created Deployment %s/%s with %d replicas.", fleet.namespace, name, replicas)
        return FleetResult(secret_changed, True, False, created, config.checksum)

    if current.template_checksum == expected_template_checksum(fleet, config):
        return FleetResult(secret_changed, False, False, current, config.checksum)
    patched = await kube.patch_deployment(
        fleet.namespace,
        name,
        build_template_patch(fleet.owner.name, fleet.pod, config),
        build_metadata_patch(fleet.owner, fleet.pod, config),
    )
    logger.info("Updated the pod template of Deployment %s/%s.", fleet.namespace, name)
    return FleetResult(secret_changed, False, True, patched, config.checksum)


def expected_template_checksum(fleet: FleetSpec, config: RenderedConfig) -> str:
    """Return the template checksum the Deployment carries when it is up to date."""
    return template_checksum(build_pod_template(fleet.owner.name, fleet.pod, config))
