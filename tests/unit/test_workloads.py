"""Tests of the agent Secret and Deployment bodies built by openchecker_operator.workloads."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from typing import Any

from openchecker_operator.agentconfig import (
    HEALTH_PORT,
    AgentOptions,
    BrokerConnection,
    render_config,
)
from openchecker_operator.workloads import (
    CONFIG_CHECKSUM_ANNOTATION,
    TEMPLATE_CHECKSUM_ANNOTATION,
    AgentPodSettings,
    Owner,
    build_deployment,
    build_metadata_patch,
    build_pod_template,
    build_secret,
    build_template_patch,
    template_checksum,
)

OWNER = Owner(
    api_version="openchecker.io/v1alpha1", kind="OpenCheckQueue", name="opencheck", uid="uid-1"
)
NAMESPACE = "checks"
CONNECTION = BrokerConnection(host="rabbitmq", port=5672, username="user", password="secret")
CONFIG = render_config(CONNECTION, AgentOptions(queue="opencheck"))
POD = AgentPodSettings(
    image="registry.example.org/openchecker-agent:0.1.0",
    image_pull_policy="Always",
    termination_grace_period_seconds=900,
    resources={"requests": {"cpu": "100m"}, "limits": {"memory": "512Mi"}},
    env=({"name": "LOG_LEVEL", "value": "debug"},),
    node_selector={"pool": "workers"},
    tolerations=({"key": "dedicated", "operator": "Equal", "value": "checks"},),
)


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


def test_names_and_labels() -> None:
    deployment = build_deployment(OWNER, NAMESPACE, POD, CONFIG, replicas=0)
    secret = build_secret(OWNER, NAMESPACE, CONFIG)

    assert deployment["metadata"]["name"] == "opencheck-agent"
    assert deployment["metadata"]["namespace"] == NAMESPACE
    assert secret["metadata"]["name"] == "opencheck-agent-config"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "openchecker-agent"
    assert labels["app.kubernetes.io/instance"] == "opencheck"
    assert deployment["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "openchecker-agent",
        "app.kubernetes.io/instance": "opencheck",
    }


def test_owner_reference_is_controller() -> None:
    for body in (
        build_deployment(OWNER, NAMESPACE, POD, CONFIG, replicas=0),
        build_secret(OWNER, NAMESPACE, CONFIG),
    ):
        references = body["metadata"]["ownerReferences"]
        assert references == [
            {
                "apiVersion": "openchecker.io/v1alpha1",
                "kind": "OpenCheckQueue",
                "name": "opencheck",
                "uid": "uid-1",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]


def test_secret_holds_rendered_config() -> None:
    secret = build_secret(OWNER, NAMESPACE, CONFIG)

    decoded = base64.b64decode(secret["data"]["config.ini"]).decode("utf-8")
    assert decoded == CONFIG.files["config.ini"]
    assert secret["type"] == "Opaque"


def test_deployment_create_sets_replicas() -> None:
    deployment = build_deployment(OWNER, NAMESPACE, POD, CONFIG, replicas=3)

    assert deployment["spec"]["replicas"] == 3


def test_config_checksum_on_template() -> None:
    deployment = build_deployment(OWNER, NAMESPACE, POD, CONFIG, replicas=0)

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations[CONFIG_CHECKSUM_ANNOTATION] == CONFIG.checksum


def test_config_change_changes_template() -> None:
    rotated = render_config(
        replace(CONNECTION, password="rotated"), AgentOptions(queue="opencheck")
    )

    before = build_pod_template("opencheck", POD, CONFIG)
    after = build_pod_template("opencheck", POD, rotated)

    assert template_checksum(before) != template_checksum(after)


def test_config_mounted_with_sub_path() -> None:
    deployment = build_deployment(OWNER, NAMESPACE, POD, CONFIG, replicas=0)

    assert container(deployment)["volumeMounts"] == [
        {
            "name": "agent-config",
            "mountPath": "/app/config/config.ini",
            "subPath": "config.ini",
            "readOnly": True,
        }
    ]
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert volumes == [
        {"name": "agent-config", "secret": {"secretName": "opencheck-agent-config"}}
    ]


def test_ca_bundle_mounted_when_present() -> None:
    with_ca = render_config(
        replace(CONNECTION, tls=True, ca_certificate="PEM\n"), AgentOptions(queue="opencheck")
    )

    deployment = build_deployment(OWNER, NAMESPACE, POD, with_ca, replicas=0)

    mounts = {
        mount["mountPath"]: mount["subPath"] for mount in container(deployment)["volumeMounts"]
    }
    assert mounts == {"/app/config/ca.crt": "ca.crt", "/app/config/config.ini": "config.ini"}


def test_pod_name_from_downward_api() -> None:
    env = container(build_deployment(OWNER, NAMESPACE, POD, CONFIG, replicas=0))["env"]

    assert env[0] == {
        "name": "POD_NAME",
        "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}},
    }
    assert env[1:] == [{"name": "LOG_LEVEL", "value": "debug"}]


def test_spec_pod_name_replaces_downward_api() -> None:
    pod = replace(POD, env=({"name": "POD_NAME", "value": "fixed"},))

    env = container(build_deployment(OWNER, NAMESPACE, pod, CONFIG, replicas=0))["env"]

    assert env == [{"name": "POD_NAME", "value": "fixed"}]


def test_pod_settings_pass_through() -> None:
    deployment = build_deployment(OWNER, NAMESPACE, POD, CONFIG, replicas=0)
    pod_spec = deployment["spec"]["template"]["spec"]
    agent = container(deployment)

    assert agent["image"] == "registry.example.org/openchecker-agent:0.1.0"
    assert agent["imagePullPolicy"] == "Always"
    assert agent["resources"] == {"requests": {"cpu": "100m"}, "limits": {"memory": "512Mi"}}
    assert pod_spec["nodeSelector"] == {"pool": "workers"}
    assert pod_spec["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "checks"}
    ]
    assert pod_spec["terminationGracePeriodSeconds"] == 900
    assert pod_spec["automountServiceAccountToken"] is False


def test_optional_pod_settings_omitted() -> None:
    pod = AgentPodSettings(image="agent:1")

    deployment = build_deployment(OWNER, NAMESPACE, pod, CONFIG, replicas=0)
    pod_spec = deployment["spec"]["template"]["spec"]

    assert "nodeSelector" not in pod_spec
    assert "tolerations" not in pod_spec
    assert "resources" not in container(deployment)


def test_probes_use_health_port() -> None:
    agent = container(build_deployment(OWNER, NAMESPACE, POD, CONFIG, replicas=0))

    assert agent["ports"] == [{"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"}]
    assert agent["livenessProbe"]["httpGet"] == {
        "path": "/healthz",
        "port": "health",
        "scheme": "HTTP",
    }
    assert agent["readinessProbe"]["httpGet"] == {
        "path": "/readyz",
        "port": "health",
        "scheme": "HTTP",
    }


def test_template_patch_leaves_replicas() -> None:
    patch = build_template_patch("opencheck", POD, CONFIG)

    paths = [operation["path"] for operation in patch]
    assert paths == ["/spec/template", "/spec/strategy"]
    assert "replicas" not in json.dumps(patch)


def test_metadata_patch_names_template_checksum() -> None:
    patch = build_metadata_patch(OWNER, POD, CONFIG)
    template = build_pod_template("opencheck", POD, CONFIG)

    annotations = patch["metadata"]["annotations"]
    assert annotations == {TEMPLATE_CHECKSUM_ANNOTATION: template_checksum(template)}
    assert "spec" not in patch


def test_template_checksum_matches_deployment_annotation() -> None:
    deployment = build_deployment(OWNER, NAMESPACE, POD, CONFIG, replicas=0)

    annotation = deployment["metadata"]["annotations"][TEMPLATE_CHECKSUM_ANNOTATION]
    assert annotation == template_checksum(deployment["spec"]["template"])


def test_image_change_changes_template_checksum() -> None:
    before = build_pod_template("opencheck", POD, CONFIG)
    after = build_pod_template("opencheck", replace(POD, image="agent:2"), CONFIG)

    assert template_checksum(before) != template_checksum(after)


def test_rollout_keeps_workers_available() -> None:
    deployment = build_deployment(OWNER, NAMESPACE, POD, CONFIG, replicas=0)

    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }


def test_builders_copy_inputs() -> None:
    env = [{"name": "A", "value": "1"}]
    pod = replace(POD, env=env)

    deployment = build_deployment(OWNER, NAMESPACE, pod, CONFIG, replicas=0)
    container(deployment)["env"][1]["value"] = "changed"

    assert env == [{"name": "A", "value": "1"}]
