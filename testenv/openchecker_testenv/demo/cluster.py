"""The demo's servers and Kubernetes objects: environment, RBAC, namespace, resource."""

from __future__ import annotations

import logging
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import kubernetes
import yaml

from .. import environment
from ..binaries import find_kubectl
from ..broker import Broker
from ..controlplane import ControlPlane
from ..errors import SetupError
from ..kubeconfig import extract_credentials
from ..layout import StateLayout, default_state_dir
from .options import DemoOptions

logger = logging.getLogger(__name__)

# The operator's identity as manifests/ installs it.
OPERATOR_NAMESPACE = "openchecker-system"
OPERATOR_SERVICE_ACCOUNT = "openchecker-operator"
CRD_NAME = "opencheckqueues.openchecker.io"
API_GROUP = "openchecker.io"
API_VERSION = "v1alpha1"
PLURAL = "opencheckqueues"
KUBECTL_TIMEOUT_SECONDS = 120


class DemoError(Exception):
    """A failed demo step. The message names the step and where to look."""


@dataclass(frozen=True)
class DemoEnvironment:
    """The control plane and broker the demo runs against."""

    control_plane: ControlPlane
    broker: Broker
    kubectl: Path
    # The environment `make env-up` would manage, when the demo started it
    # and so stops it at the end. None for a running or an external one.
    started_layout: StateLayout | None


def open_environment(options: DemoOptions, folder: Path) -> DemoEnvironment:
    """Return the servers named by the options, else the `make env-up` environment.

    Starts the latter when it is not running, which on a fresh machine
    builds the control plane and installs RabbitMQ first.
    """
    if options.kubeconfig is not None and options.rabbitmq_url is not None:
        server, ca_file, cert_file, key_file = extract_credentials(
            options.kubeconfig, folder / "admin"
        )
        control_plane = ControlPlane(server, options.kubeconfig, ca_file, cert_file, key_file)
        broker = Broker.from_urls(options.rabbitmq_url, options.management_url)
        return DemoEnvironment(control_plane, broker, find_kubectl(), None)
    layout = StateLayout(default_state_dir())
    running = environment.find_running(layout)
    if running is not None:
        print(f"Reusing the running environment in {layout.root}.", flush=True)
        return DemoEnvironment(running.control_plane, running.broker, running.kubectl(), None)
    print(
        "Starting the local control plane and RabbitMQ (the first run builds the control "
        "plane and installs RabbitMQ, which takes minutes) ...",
        flush=True,
    )
    state = environment.up(layout)
    # NOTE: another `make env-up` that finishes between find_running and up
    # would make this run stop an environment it did not start.
    return DemoEnvironment(state.control_plane, state.broker, state.kubectl(), layout)


def kubectl_run(
    demo: DemoEnvironment, *args: str, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run kubectl as the administrator, and raise DemoError with its stderr when it fails."""
    command = [str(demo.kubectl), f"--kubeconfig={demo.control_plane.kubeconfig}", *args]
    result = subprocess.run(
        command,
        input=input,
        capture_output=True,
        text=True,
        timeout=KUBECTL_TIMEOUT_SECONDS,
        check=False,
    )
    if result.returncode != 0:
        raise DemoError(f"`kubectl {' '.join(args)}` failed: {result.stderr.strip()}")
    return result


def render_manifests(demo: DemoEnvironment, manifests: Path) -> list[dict[str, Any]]:
    """Return the objects of `kubectl kustomize manifests/`."""
    text = kubectl_run(demo, "kustomize", str(manifests)).stdout
    return [document for document in yaml.safe_load_all(text) if document]


def install_manifests(demo: DemoEnvironment, manifests: Path) -> list[str]:
    """Apply manifests/ except the operator Deployment, and return the objects as kind/name.

    The operator runs here as a local process instead, because no container
    runtime can run its pod.
    """
    objects = [item for item in render_manifests(demo, manifests) if item["kind"] != "Deployment"]
    kubectl_run(demo, "apply", "--filename=-", input=yaml.safe_dump_all(objects))
    kubectl_run(demo, "wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    return [f"{item['kind']}/{item['metadata']['name']}" for item in objects]


def write_operator_kubeconfig(demo: DemoEnvironment, path: Path) -> Path:
    """Write a kubeconfig with a TokenRequest token of the operator's ServiceAccount."""
    try:
        return demo.control_plane.service_account_kubeconfig(
            OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT, path, expiration_seconds=3600
        )
    except SetupError as error:
        raise DemoError(str(error)) from error


def create_namespace(api_client: kubernetes.client.ApiClient, name: str) -> None:
    core = kubernetes.client.CoreV1Api(api_client)
    body = kubernetes.client.V1Namespace(metadata=kubernetes.client.V1ObjectMeta(name=name))
    core.create_namespace(body)


def delete_namespace(api_client: kubernetes.client.ApiClient, name: str) -> None:
    """Delete the namespace without waiting. A namespace already gone is fine."""
    try:
        kubernetes.client.CoreV1Api(api_client).delete_namespace(name)
    except kubernetes.client.ApiException as error:
        if error.status != 404:
            raise


def apply_objects(demo: DemoEnvironment, namespace: str, objects: list[dict[str, Any]]) -> None:
    kubectl_run(
        demo,
        "apply",
        f"--namespace={namespace}",
        "--filename=-",
        input=yaml.safe_dump_all(objects),
    )


def read_resource(
    api_client: kubernetes.client.ApiClient, namespace: str, name: str
) -> dict[str, Any] | None:
    """Return the OpenCheckQueue as a dict, or None when it does not exist."""
    custom = kubernetes.client.CustomObjectsApi(api_client)
    try:
        resource = cast(
            dict[str, Any],
            custom.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name),
        )
    except kubernetes.client.ApiException as error:
        if error.status == 404:
            return None
        raise
    return resource


def ready_condition(resource: dict[str, Any] | None) -> dict[str, Any] | None:
    """Return the resource's `Ready` condition, or None when it has none yet."""
    conditions = ((resource or {}).get("status") or {}).get("conditions") or []
    for condition in conditions:
        if condition.get("type") == "Ready":
            return dict(condition)
    return None


def wait_for_ready_condition(
    api_client: kubernetes.client.ApiClient,
    namespace: str,
    name: str,
    timeout_seconds: float,
) -> None:
    """Wait for the resource's Ready condition to be True, or raise DemoError on timeout."""
    deadline = time.monotonic() + timeout_seconds
    condition = None
    while time.monotonic() < deadline:
        condition = ready_condition(read_resource(api_client, namespace, name))
        if condition is not None and condition.get("status") == "True":
            return
        time.sleep(0.5)
    raise DemoError(
        f"OpenCheckQueue {namespace}/{name} was not Ready after {timeout_seconds:.0f} s; "
        f"its Ready condition is {condition!r}"
    )


def delete_resource(
    api_client: kubernetes.client.ApiClient,
    namespace: str,
    name: str,
    timeout_seconds: float,
) -> bool:
    """Delete the resource and wait until the operator removed its finalizer.

    Returns False when it still exists after `timeout_seconds`.
    """
    custom = kubernetes.client.CustomObjectsApi(api_client)
    try:
        custom.delete_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)
    except kubernetes.client.ApiException as error:
        if error.status == 404:
            return True
        raise
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if read_resource(api_client, namespace, name) is None:
            return True
        time.sleep(0.5)
    return False
