"""Kubernetes API calls of the agent fleet: Secrets, Deployments, scale, Events, status.

The `kubernetes` client blocks, so every call runs in a worker thread and
the methods here are coroutines. API errors become kopf's TemporaryError
(worth a retry: conflicts, throttling, server errors, connection errors)
or PermanentError (the request itself is wrong: rejected, forbidden).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import json
import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import kopf
import kubernetes
import urllib3

from .workloads import TEMPLATE_CHECKSUM_ANNOTATION

logger = logging.getLogger(__name__)

RESOURCE_GROUP = "openchecker.io"
RESOURCE_VERSION = "v1alpha1"
RESOURCE_PLURAL = "opencheckqueues"
RESOURCE_KIND = "OpenCheckQueue"

FIELD_MANAGER = "openchecker-operator"
EVENT_COMPONENT = "openchecker-operator"
# The API server rejects longer Event messages.
EVENT_MESSAGE_MAX_CHARACTERS = 1024
# Delay before a retry of a conflicting or failed write, in seconds.
RETRY_DELAY_SECONDS = 5.0

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"

ResultT = TypeVar("ResultT")


class NotFoundError(kopf.TemporaryError):
    """The object does not exist (HTTP 404); it may appear later."""


@dataclass(frozen=True)
class DeploymentState:
    """The parts of an agent Deployment that the reconciler and the scaler read."""

    name: str
    namespace: str
    spec_replicas: int
    status_replicas: int
    template_checksum: str | None


@dataclass(frozen=True)
class ObjectReference:
    """The object an Event is about."""

    api_version: str
    kind: str
    namespace: str
    name: str
    uid: str


class KubeClient:
    """Asynchronous wrapper of the calls the fleet needs, over one ApiClient."""

    def __init__(self, api_client: kubernetes.client.ApiClient) -> None:
        self.api_client = api_client
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.apps = kubernetes.client.AppsV1Api(api_client)
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.reporting_instance = socket.gethostname()

    async def read_secret_data(self, namespace: str, name: str) -> dict[str, bytes]:
        """Return the decoded `data` of a Secret.

        Raises NotFoundError when the Secret does not exist.
        """
        secret = await self._call(
            f"read Secret {namespace}/{name}",
            self.core.read_namespaced_secret,
            name,
            namespace,
            secret=True,
        )
        return decode_secret_data(secret.data or {})

    async def apply_secret(self, body: Mapping[str, Any]) -> bool:
        """Create the Secret, or replace it when its data or metadata differ.

        Returns True when the API server stored a change.
        """
        metadata = body["metadata"]
        namespace, name = metadata["namespace"], metadata["name"]
        description = f"Secret {namespace}/{name}"
        try:
            current = await self._call(
                f"read {description}",
                self.core.read_namespaced_secret,
                name,
                namespace,
                secret=True,
            )
        except NotFoundError:
            # Absent: create it.
            await self._call(
                f"create {description}",
                self.core.create_namespaced_secret,
                namespace,
                dict(body),
                secret=True,
            )
            return True
        if current.data == body["data"] and _metadata_matches(current, metadata):
            return False
        data: dict[str, str | None] = dict(body["data"])
        for key in current.data or {}:
            # A merge patch deletes a key whose value is null.
            data.setdefault(key, None)
        patch = {
            "metadata": {
                "labels": metadata["labels"],
                "annotations": metadata["annotations"],
                "ownerReferences": metadata["ownerReferences"],
            },
            "data": data,
        }
        await self._call(
            f"patch {description}",
            self.core.patch_namespaced_secret,
            name,
            namespace,
            patch,
            secret=True,
            _content_type=MERGE_PATCH,
        )
        return True

    async def read_deployment(self, namespace: str, name: str) -> DeploymentState | None:
        """Return the Deployment's replica counts and checksum, or None when it is absent."""
        try:
            deployment = await self._call(
                f"read Deployment {namespace}/{name}",
                self.apps.read_namespaced_deployment,
                name,
                namespace,
            )
        except NotFoundError:
            # A missing Deployment is a valid result: the caller creates it.
            return None
        return deployment_state(deployment)

    async def create_deployment(self, body: Mapping[str, Any]) -> DeploymentState:
        """Create the Deployment and return its state."""
        metadata = body["metadata"]
        deployment = await self._call(
            f"create Deployment {metadata['namespace']}/{metadata['name']}",
            self.apps.create_namespaced_deployment,
            metadata["namespace"],
            dict(body),
        )
        return deployment_state(deployment)

    async def patch_deployment(
        self,
        namespace: str,
        name: str,
        json_patch: list[dict[str, Any]],
        metadata_patch: Mapping[str, Any],
    ) -> DeploymentState:
        """Replace the pod template (JSON Patch), then merge the metadata.

        The metadata carries the template checksum, so it is written only
        after the template went through.
        """
        description = f"Deployment {namespace}/{name}"
        await self._call(
            f"patch the template of {description}",
            self.apps.patch_namespaced_deployment,
            name,
            namespace,
            json_patch,
            _content_type=JSON_PATCH,
        )
        deployment = await self._call(
            f"patch the metadata of {description}",
            self.apps.patch_namespaced_deployment,
            name,
            namespace,
            dict(metadata_patch),
            _content_type=MERGE_PATCH,
        )
        return deployment_state(deployment)

    async def scale_deployment(self, namespace: str, name: str, replicas: int) -> int:
        """Set `spec.replicas` through the scale subresource; return the stored value."""
        scale = await self._call(
            f"scale Deployment {namespace}/{name} to {replicas}",
            self.apps.patch_namespaced_deployment_scale,
            name,
            namespace,
            {"spec": {"replicas": replicas}},
            _content_type=MERGE_PATCH,
        )
        return int(scale.spec.replicas or 0) if scale.spec else 0

    async def patch_resource_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> None:
        """Merge `status` into the OpenCheckQueue's status subresource."""
        await self._call(
            f"patch the status of {RESOURCE_KIND} {namespace}/{name}",
            self.custom.patch_namespaced_custom_object_status,
            RESOURCE_GROUP,
            RESOURCE_VERSION,
            namespace,
            RESOURCE_PLURAL,
            name,
            {"status": dict(status)},
            _content_type=MERGE_PATCH,
        )

    async def post_event(
        self, subject: ObjectReference, reason: str, message: str, event_type: str = "Normal"
    ) -> None:
        """Create a core/v1 Event about `subject`, as `kubectl describe` lists them."""
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "metadata": {"generateName": f"{subject.name}.", "namespace": subject.namespace},
            "involvedObject": {
                "apiVersion": subject.api_version,
                "kind": subject.kind,
                "namespace": subject.namespace,
                "name": subject.name,
                "uid": subject.uid,
            },
            "reason": reason,
            "message": message[:EVENT_MESSAGE_MAX_CHARACTERS],
            "type": event_type,
            "source": {"component": EVENT_COMPONENT},
            "reportingComponent": EVENT_COMPONENT,
            "reportingInstance": self.reporting_instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self._call(
            f"post Event {reason} about {subject.kind} {subject.namespace}/{subject.name}",
            self.core.create_namespaced_event,
            subject.namespace,
            body,
        )

    async def _call(
        self,
        action: str,
        function: Callable[..., ResultT],
        *args: Any,
        secret: bool = False,
        **kwargs: Any,
    ) -> ResultT:
        """Run `function` in a thread; with `secret`, errors leave out the server's details."""
        try:
            return await asyncio.to_thread(function, *args, **kwargs)
        except kubernetes.client.ApiException as error:
            # The details of a rejected Secret request could quote Secret data.
            raise translate_api_error(action, error, detailed=not secret) from error
        except (urllib3.exceptions.HTTPError, OSError) as error:
            # The API server is unreachable or the connection broke: retry later.
            raise kopf.TemporaryError(
                f"Failed to {action}: {error}", delay=RETRY_DELAY_SECONDS
            ) from error


def translate_api_error(
    action: str, error: kubernetes.client.ApiException, detailed: bool = True
) -> Exception:
    """Return the kopf exception for an API error: temporary unless the request was wrong.

    With `detailed`, a rejected request's message includes the API server's
    explanation.
    """
    status = int(error.status or 0)
    message = f"Failed to {action}: HTTP {status} {error.reason or ''}".rstrip()
    if status == 404:
        return NotFoundError(message, delay=RETRY_DELAY_SECONDS)
    if status in (409, 429) or status >= 500 or status == 0:
        return kopf.TemporaryError(message, delay=RETRY_DELAY_SECONDS)
    if detailed:
        message = f"{message}: {_status_message(error)}"
    return kopf.PermanentError(message)


def _status_message(error: kubernetes.client.ApiException) -> str:
    """Return the `message` of the API server's Status reply, which names the rejected field."""
    try:
        reply = json.loads(error.body or "")
    except ValueError:
        # Not a Status object (a proxy's HTML page, say): show its start.
        return (error.body or "")[:200]
    message = reply.get("message") if isinstance(reply, dict) else None
    return str(message)[:500] if message else ""


def decode_secret_data(data: Mapping[str, str | bytes]) -> dict[str, bytes]:
    """Decode the base64 values of a Secret's `data`; a malformed value raises ValueError."""
    decoded: dict[str, bytes] = {}
    for key, value in data.items():
        try:
            decoded[key] = base64.b64decode(value, validate=True)
        except binascii.Error as error:
            # The value itself is secret, so only the key is named.
            raise ValueError(f"Secret key {key!r} is not valid base64") from error
    return decoded


def deployment_state(deployment: Any) -> DeploymentState:
    """Return the DeploymentState of a V1Deployment model."""
    annotations = deployment.metadata.annotations or {}
    status = deployment.status
    return DeploymentState(
        name=deployment.metadata.name,
        namespace=deployment.metadata.namespace,
        spec_replicas=int(deployment.spec.replicas or 0),
        status_replicas=int((status.replicas if status else 0) or 0),
        template_checksum=annotations.get(TEMPLATE_CHECKSUM_ANNOTATION),
    )


def _metadata_matches(current: Any, metadata: Mapping[str, Any]) -> bool:
    annotations = current.metadata.annotations or {}
    labels = current.metadata.labels or {}
    expected_annotations: Mapping[str, str] = metadata["annotations"]
    expected_labels: Mapping[str, str] = metadata["labels"]
    owners = [reference.uid for reference in current.metadata.owner_references or []]
    expected_owners = [reference["uid"] for reference in metadata["ownerReferences"]]
    return (
        all(annotations.get(key) == value for key, value in expected_annotations.items())
        and all(labels.get(key) == value for key, value in expected_labels.items())
        and owners == expected_owners
    )
