"""The local environment provides a real API server, controllers and broker."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import kubernetes
import pika
import pytest
from openchecker_testenv.broker import Broker, quote_vhost
from openchecker_testenv.controlplane import ControlPlane
from support import Kubectl, KubectlError, apply_manifest, unique_name, wait_for

pytestmark = pytest.mark.timeout(120)


def test_readyz_returns_ok(control_plane: ControlPlane, kubectl: Kubectl) -> None:
    with control_plane.api_session() as session:
        response = session.get(f"{control_plane.server}/readyz", timeout=10)
    assert response.status_code == 200
    assert response.text == "ok"
    assert kubectl("get", "--raw", "/readyz").stdout == "ok"


def test_kubeconfig_points_at_server(control_plane: ControlPlane, kubectl: Kubectl) -> None:
    server = kubectl("config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.server}")
    assert server.stdout == control_plane.server
    assert control_plane.server.startswith("https://127.0.0.1:")


def _widget_crd(group: str) -> dict[str, Any]:
    spec_schema = {
        "type": "object",
        "required": ["size"],
        "properties": {
            "size": {"type": "integer", "minimum": 1},
            "color": {"type": "string", "enum": ["red", "blue"]},
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {"spec": spec_schema},
                        }
                    },
                }
            ],
        },
    }


def test_crd_schema_rejects_invalid_object(kubectl: Kubectl, namespace: str) -> None:
    # A group of its own, so that parallel runs never share the CRD.
    group = f"{unique_name('crd')}.testenv.openchecker.io"
    apply_manifest(kubectl, _widget_crd(group))
    try:
        kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/widgets.{group}")
        valid = {
            "apiVersion": f"{group}/v1",
            "kind": "Widget",
            "metadata": {"name": "valid"},
            "spec": {"size": 3, "color": "red"},
        }
        apply_manifest(kubectl, valid, namespace=namespace)

        invalid = {**valid, "metadata": {"name": "invalid"}, "spec": {"size": 0, "color": "green"}}
        with pytest.raises(KubectlError) as raised:
            apply_manifest(kubectl, invalid, namespace=namespace)
        message = raised.value.stderr
        assert "is invalid" in message
        assert "spec.size" in message
        assert "spec.color" in message
    finally:
        kubectl("delete", "crd", f"widgets.{group}", "--wait=false")


def test_service_account_without_role_is_forbidden(
    control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    kubeconfig = control_plane.service_account_kubeconfig(
        namespace, "no-role", tmp_path / "no-role.kubeconfig"
    )
    client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    with client:
        apps = kubernetes.client.AppsV1Api(client)
        with pytest.raises(kubernetes.client.ApiException) as raised:
            apps.list_namespaced_deployment(namespace)
    # 403, not 401: the token authenticates, and RBAC denies the request.
    assert raised.value.status == 403
    body = json.loads(raised.value.body)
    assert body["reason"] == "Forbidden"
    assert f"system:serviceaccount:{namespace}:no-role" in body["message"]


def test_service_account_with_role_can_list(
    control_plane: ControlPlane,
    kubectl: Kubectl,
    namespace: str,
    tmp_path: Path,
) -> None:
    kubeconfig = control_plane.service_account_kubeconfig(
        namespace, "reader", tmp_path / "reader.kubeconfig"
    )
    kubectl(
        "create",
        "role",
        "deployment-reader",
        "--verb=list",
        "--resource=deployments",
        f"--namespace={namespace}",
    )
    kubectl(
        "create",
        "rolebinding",
        "deployment-reader",
        "--role=deployment-reader",
        f"--serviceaccount={namespace}:reader",
        f"--namespace={namespace}",
    )
    client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    with client:
        apps = kubernetes.client.AppsV1Api(client)
        # The RBAC authorizer reads roles from an informer cache, which lags
        # the write by a moment.
        deployments = wait_for(
            lambda: apps.list_namespaced_deployment(namespace),
            timeout_seconds=10,
            message="the Role never allowed listing Deployments",
            ignored_exceptions=(kubernetes.client.ApiException,),
        )
    assert deployments.items == []


def test_kubectl_create_token_returns_jwt(kubectl: Kubectl, namespace: str) -> None:
    kubectl("create", "serviceaccount", "token-test", f"--namespace={namespace}")
    token = kubectl("create", "token", "token-test", f"--namespace={namespace}").stdout.strip()
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["sub"] == f"system:serviceaccount:{namespace}:token-test"
    assert signature


def _deployment(name: str) -> kubernetes.client.V1Deployment:
    labels = {"app": name}
    container = kubernetes.client.V1Container(name="main", image="busybox:1.36")
    return kubernetes.client.V1Deployment(
        metadata=kubernetes.client.V1ObjectMeta(name=name),
        spec=kubernetes.client.V1DeploymentSpec(
            replicas=1,
            selector=kubernetes.client.V1LabelSelector(match_labels=labels),
            template=kubernetes.client.V1PodTemplateSpec(
                metadata=kubernetes.client.V1ObjectMeta(labels=labels),
                spec=kubernetes.client.V1PodSpec(containers=[container]),
            ),
        ),
    )


def _owned_replica_sets(
    apps: kubernetes.client.AppsV1Api, namespace: str, owner_uid: str
) -> list[Any]:
    replica_sets = apps.list_namespaced_replica_set(namespace).items
    return [
        replica_set
        for replica_set in replica_sets
        if any(ref.uid == owner_uid for ref in replica_set.metadata.owner_references or [])
    ]


def test_deployment_gets_replica_set(
    kube_api: kubernetes.client.ApiClient, namespace: str
) -> None:
    apps = kubernetes.client.AppsV1Api(kube_api)
    deployment = apps.create_namespaced_deployment(namespace, _deployment("web"))
    replica_sets = wait_for(
        lambda: _owned_replica_sets(apps, namespace, deployment.metadata.uid),
        timeout_seconds=60,
        message="kube-controller-manager created no ReplicaSet for the Deployment",
    )
    assert len(replica_sets) == 1
    assert replica_sets[0].spec.replicas == 1


def test_garbage_collector_deletes_replica_set(
    kube_api: kubernetes.client.ApiClient, namespace: str
) -> None:
    apps = kubernetes.client.AppsV1Api(kube_api)
    deployment = apps.create_namespaced_deployment(namespace, _deployment("collected"))
    uid = deployment.metadata.uid
    wait_for(
        lambda: _owned_replica_sets(apps, namespace, uid),
        timeout_seconds=60,
        message="kube-controller-manager created no ReplicaSet for the Deployment",
    )
    apps.delete_namespaced_deployment("collected", namespace, propagation_policy="Background")
    wait_for(
        lambda: not _owned_replica_sets(apps, namespace, uid),
        timeout_seconds=60,
        message="the garbage collector left the ReplicaSet of a deleted Deployment",
    )


def test_amqp_round_trip(broker: Broker, vhost: str) -> None:
    queue = unique_name("round-trip")
    connection = pika.BlockingConnection(pika.URLParameters(broker.amqp_url(vhost)))
    try:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True)
        channel.basic_publish("", queue, b"hello", pika.BasicProperties(delivery_mode=2))
        method, _properties, body = _get_one(channel, queue)
        assert body == b"hello"
        assert method.routing_key == queue
    finally:
        connection.close()


def _get_one(channel: Any, queue: str) -> tuple[Any, Any, bytes]:
    def fetch() -> tuple[Any, Any, bytes] | None:
        # basic_get returns (None, None, None) while the queue is empty.
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        return (method, properties, body) if method is not None else None

    return wait_for(fetch, timeout_seconds=10, message=f"no message arrived on queue {queue}")


def test_management_api_sees_queue(broker: Broker, vhost: str) -> None:
    queue = unique_name("managed")
    connection = pika.BlockingConnection(pika.URLParameters(broker.amqp_url(vhost)))
    try:
        connection.channel().queue_declare(queue, durable=True)
    finally:
        connection.close()

    vhost_path = quote_vhost(vhost)
    with broker.management_session() as session:
        response = session.get(f"{broker.management_url}/api/queues/{vhost_path}/{queue}")
        assert response.status_code == 200
        assert response.json()["name"] == queue
        assert response.json()["durable"] is True

        permissions = session.get(
            f"{broker.management_url}/api/permissions/{vhost_path}/{broker.username}"
        )
        assert permissions.status_code == 200
        assert permissions.json()["configure"] == ".*"


def test_default_vhost_url_is_percent_encoded(broker: Broker) -> None:
    assert broker.amqp_url().endswith("/%2F")
    assert not broker.management_url.endswith("/")
    connection = pika.BlockingConnection(pika.URLParameters(broker.amqp_url()))
    try:
        assert connection.is_open
    finally:
        connection.close()
