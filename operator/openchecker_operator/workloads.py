"""Build the bodies of the agent fleet's Secret and Deployment.

Pure functions from settings to Kubernetes object bodies (plain dicts, as
the API takes them). `kube.py` sends them. The Deployment's `spec.replicas`
appears only in the body used to create it: every later change replaces
the pod template and metadata and leaves the count to the scaler.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .agentconfig import CONFIG_DIRECTORY, HEALTH_PORT, RenderedConfig

AGENT_NAME = "openchecker-agent"
CONTAINER_NAME = "agent"
CONFIG_VOLUME_NAME = "agent-config"
HEALTH_PORT_NAME = "health"
POD_NAME_VARIABLE = "POD_NAME"

NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "openchecker-operator"

# On the pod template: a new value rolls the pods, so they read the new file.
CONFIG_CHECKSUM_ANNOTATION = "openchecker.io/config-checksum"
# On the Deployment: the checksum of the template the operator last wrote,
# so an unchanged spec costs no write.
TEMPLATE_CHECKSUM_ANNOTATION = "openchecker.io/template-checksum"

# Probe timing in seconds. Liveness tolerates a busy pod for a minute
# because the agent serves /healthz from its own thread.
PROBE_PERIOD_SECONDS = 10
PROBE_TIMEOUT_SECONDS = 5
LIVENESS_FAILURE_THRESHOLD = 6
READINESS_FAILURE_THRESHOLD = 3


@dataclass(frozen=True)
class Owner:
    """The OpenCheckQueue that owns the fleet's objects."""

    api_version: str
    kind: str
    name: str
    uid: str

    def reference(self) -> dict[str, Any]:
        """Return the ownerReference that lets the garbage collector delete the object."""
        return {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


@dataclass(frozen=True)
class AgentPodSettings:
    """The pod settings of `spec.agent` that pass through to the Deployment."""

    image: str
    image_pull_policy: str = "IfNotPresent"
    termination_grace_period_seconds: int = 900
    resources: Mapping[str, Any] = field(default_factory=dict)
    env: Sequence[Mapping[str, Any]] = ()
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: Sequence[Mapping[str, Any]] = ()


def secret_name(resource_name: str) -> str:
    """Return the name of the Secret that contains the agent's config.ini."""
    return f"{resource_name}-agent-config"


def deployment_name(resource_name: str) -> str:
    """Return the name of the agent Deployment."""
    return f"{resource_name}-agent"


def selector_labels(resource_name: str) -> dict[str, str]:
    """Return the labels that select the fleet's pods; immutable once created."""
    return {NAME_LABEL: AGENT_NAME, INSTANCE_LABEL: resource_name}


def object_labels(resource_name: str) -> dict[str, str]:
    """Return the labels of the fleet's Secret, Deployment and pods."""
    return {**selector_labels(resource_name), MANAGED_BY_LABEL: MANAGED_BY}


def build_secret(owner: Owner, namespace: str, config: RenderedConfig) -> dict[str, Any]:
    """Return the body of the config Secret, with its files base64-encoded in `data`."""
    data = {
        name: base64.b64encode(text.encode("utf-8")).decode("ascii")
        for name, text in sorted(config.files.items())
    }
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": secret_name(owner.name),
            "namespace": namespace,
            "labels": object_labels(owner.name),
            "annotations": {CONFIG_CHECKSUM_ANNOTATION: config.checksum},
            "ownerReferences": [owner.reference()],
        },
        "type": "Opaque",
        "data": data,
    }


def build_deployment(
    owner: Owner,
    namespace: str,
    pod: AgentPodSettings,
    config: RenderedConfig,
    replicas: int,
) -> dict[str, Any]:
    """Return the body that creates the Deployment with `replicas` pods."""
    template = build_pod_template(owner.name, pod, config)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": deployment_name(owner.name),
            "namespace": namespace,
            "labels": object_labels(owner.name),
            "annotations": {TEMPLATE_CHECKSUM_ANNOTATION: template_checksum(template)},
            "ownerReferences": [owner.reference()],
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector_labels(owner.name)},
            "strategy": rolling_update_strategy(),
            "template": template,
        },
    }


def build_template_patch(
    resource_name: str, pod: AgentPodSettings, config: RenderedConfig
) -> list[dict[str, Any]]:
    """Return a JSON Patch that replaces the pod template and leaves `spec.replicas` alone.

    A JSON Patch `replace` of the whole template also removes fields that
    the spec no longer sets, which a merge patch would keep.
    """
    template = build_pod_template(resource_name, pod, config)
    return [
        {"op": "replace", "path": "/spec/template", "value": template},
        {"op": "replace", "path": "/spec/strategy", "value": rolling_update_strategy()},
    ]


def build_metadata_patch(
    owner: Owner, pod: AgentPodSettings, config: RenderedConfig
) -> dict[str, Any]:
    """Return a merge patch of the Deployment's labels, annotations and owner.

    A merge patch changes only the keys it names, so the annotations of
    the Deployment controller stay.
    """
    template = build_pod_template(owner.name, pod, config)
    return {
        "metadata": {
            "labels": object_labels(owner.name),
            "annotations": {TEMPLATE_CHECKSUM_ANNOTATION: template_checksum(template)},
            "ownerReferences": [owner.reference()],
        }
    }


def rolling_update_strategy() -> dict[str, Any]:
    """Return the rollout strategy: a new pod starts before an old one stops.

    No pod is taken away before its replacement is ready, so a rollout never
    drops the ready workers below the replica count.
    """
    return {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


def build_pod_template(
    resource_name: str, pod: AgentPodSettings, config: RenderedConfig
) -> dict[str, Any]:
    """Return the pod template of the agent Deployment."""
    spec: dict[str, Any] = {
        # The agent never calls the Kubernetes API.
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": pod.termination_grace_period_seconds,
        "containers": [_agent_container(pod, config)],
        "volumes": [
            {
                "name": CONFIG_VOLUME_NAME,
                "secret": {"secretName": secret_name(resource_name)},
            }
        ],
    }
    if pod.node_selector:
        spec["nodeSelector"] = dict(sorted(pod.node_selector.items()))
    if pod.tolerations:
        spec["tolerations"] = [copy.deepcopy(dict(toleration)) for toleration in pod.tolerations]
    return {
        "metadata": {
            "labels": object_labels(resource_name),
            "annotations": {CONFIG_CHECKSUM_ANNOTATION: config.checksum},
        },
        "spec": spec,
    }


def _agent_container(pod: AgentPodSettings, config: RenderedConfig) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": pod.image,
        "imagePullPolicy": pod.image_pull_policy,
        "env": _environment(pod.env),
        "ports": [{"name": HEALTH_PORT_NAME, "containerPort": HEALTH_PORT, "protocol": "TCP"}],
        # One subPath mount per file keeps the rest of /app/config from the image.
        # A subPath file never updates in place: the checksum annotation rolls
        # the pods instead.
        "volumeMounts": [
            {
                "name": CONFIG_VOLUME_NAME,
                "mountPath": f"{CONFIG_DIRECTORY}/{file_name}",
                "subPath": file_name,
                "readOnly": True,
            }
            for file_name in sorted(config.files)
        ],
        "livenessProbe": _probe("/healthz", LIVENESS_FAILURE_THRESHOLD),
        "readinessProbe": _probe("/readyz", READINESS_FAILURE_THRESHOLD),
    }
    if pod.resources:
        container["resources"] = copy.deepcopy(dict(pod.resources))
    return container


def _environment(user_env: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return POD_NAME from the downward API followed by the spec's variables.

    A spec variable named POD_NAME replaces the downward API one, because
    Kubernetes lets the later of two duplicates win and warns about it.
    """
    variables = [copy.deepcopy(dict(variable)) for variable in user_env]
    if any(variable.get("name") == POD_NAME_VARIABLE for variable in variables):
        return variables
    pod_name = {
        "name": POD_NAME_VARIABLE,
        "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}},
    }
    return [pod_name, *variables]


def _probe(path: str, failure_threshold: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": HEALTH_PORT_NAME, "scheme": "HTTP"},
        "periodSeconds": PROBE_PERIOD_SECONDS,
        "timeoutSeconds": PROBE_TIMEOUT_SECONDS,
        "failureThreshold": failure_threshold,
    }


def template_checksum(template: Mapping[str, Any]) -> str:
    """Return the SHA-256 of the template as canonical JSON."""
    text = json.dumps(template, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
