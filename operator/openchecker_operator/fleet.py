"""Reconcile one resource's agent fleet: the config Secret and the Deployment.

The Secret is created or updated whenever the rendered config changes. The
Deployment is created with the scaler's replica count, and afterwards only
its pod template and metadata change; `spec.replicas` belongs to the
scaler.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .agentconfig import (
    AgentCommand,
    AgentOptions,
    BrokerConnection,
    RenderedConfig,
    render_config,
)
from .kube import DeploymentState, KubeClient
from .models import DEFAULT_VHOST, AgentSpec, BrokerSettings, OpenCheckQueueSpec
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


def fleet_spec(
    owner: Owner, namespace: str, spec: OpenCheckQueueSpec, broker: BrokerSettings
) -> FleetSpec:
    """Return the FleetSpec of one resource from its parsed spec and broker settings."""
    return FleetSpec(
        owner=owner,
        namespace=namespace,
        connection=broker_connection(spec, broker),
        options=agent_options(spec, owner.name),
        pod=pod_settings(spec.agent),
        policy=scaling_policy(spec),
    )


def queue_vhost(spec: OpenCheckQueueSpec, broker: BrokerSettings) -> str:
    """Return the queue's vhost: `spec.queue.vhost`, else the Secret's `vhost`, else "/"."""
    return spec.queue.vhost or broker.default_vhost or DEFAULT_VHOST


def broker_connection(spec: OpenCheckQueueSpec, broker: BrokerSettings) -> BrokerConnection:
    """Return the agents' `[RabbitMQ]` settings: the broker's address and `spec.agent`'s timing."""
    return BrokerConnection(
        host=broker.host,
        port=broker.port,
        username=broker.username,
        password=broker.password,
        vhost=queue_vhost(spec, broker),
        heartbeat_seconds=spec.agent.heartbeat_seconds,
        blocked_connection_timeout_milliseconds=spec.agent.blocked_connection_timeout_milliseconds,
        tls=broker.tls,
        tls_verify=broker.tls_verify,
        ca_certificate=broker.ca_certificate,
    )


def agent_options(spec: OpenCheckQueueSpec, resource_name: str) -> AgentOptions:
    """Return the agents' `[Agent]` and `[Command:NAME]` settings."""
    agent = spec.agent
    return AgentOptions(
        queue=spec.queue_name(resource_name),
        prefetch_count=agent.prefetch_count,
        handler=agent.handler,
        drain_timeout_seconds=float(agent.effective_drain_timeout_seconds),
        callback_allowed_hosts=agent.callback_allowed_hosts,
        commands=tuple(
            AgentCommand(
                name=command.name, argv=command.argv, timeout_seconds=command.timeout_seconds
            )
            for command in agent.commands
        ),
    )


def pod_settings(agent: AgentSpec) -> AgentPodSettings:
    """Return the pod settings that pass from `spec.agent` to the Deployment."""
    return AgentPodSettings(
        image=agent.image,
        image_pull_policy=agent.image_pull_policy,
        termination_grace_period_seconds=agent.termination_grace_period_seconds,
        resources=agent.resources,
        env=agent.env,
        node_selector=agent.node_selector,
        tolerations=agent.tolerations,
    )


def scaling_policy(spec: OpenCheckQueueSpec) -> ScalingPolicy:
    """Return the scaling decision's settings from `spec.scaling` and the prefetch count."""
    scaling = spec.scaling
    return ScalingPolicy(
        min_replicas=scaling.min_replicas,
        max_replicas=scaling.max_replicas,
        messages_per_replica=scaling.messages_per_replica,
        activation_messages=scaling.activation_messages,
        scale_down_stabilization_seconds=scaling.scale_down_stabilization_seconds,
        tolerance=scaling.tolerance,
        fallback_replicas=scaling.fallback_replicas,
        failure_threshold=scaling.failure_threshold,
        paused=scaling.paused,
        prefetch_count=spec.agent.prefetch_count,
    )
