"""The operator under the RBAC rules of manifests/, with a ServiceAccount token.

Each test binds the rules of manifests/cluster_role.yaml (or all but one of
them) to a ServiceAccount of its own namespace through a ClusterRole of its
own, so tests never change the installed `openchecker-operator` role. The
operator then runs with a TokenRequest token of that ServiceAccount.

The flow: the queue is declared (Ready condition), the agent Deployment and
its config Secret exist, and the scaler sets the replicas for the backlog.

Tests take `namespace` and `identity` before `start_operator`, so the
operator stops before its ServiceAccount and ClusterRole are deleted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pika
import pytest
import yaml
from openchecker_testenv.broker import Broker
from openchecker_testenv.controlplane import ControlPlane
from support import Kubectl, wait_for
from support.operator import OperatorProcess

REPOSITORY = Path(__file__).resolve().parents[2]
MANIFESTS = REPOSITORY / "manifests"
CLUSTER_ROLE_FILE = MANIFESTS / "cluster_role.yaml"

GROUP = "openchecker.io"
VERSION = "v1alpha1"
PLURAL = "opencheckqueues"
RESOURCE_NAME = "checks"
SERVICE_ACCOUNT = "openchecker-operator"
BACKLOG = 25
MESSAGES_PER_REPLICA = 10
EXPECTED_REPLICAS = math.ceil(BACKLOG / MESSAGES_PER_REPLICA)

# The management API refreshes queue figures every 5 s and the scaler polls
# every second, so a complete flow should take 10 s at most (an estimate).
FLOW_TIMEOUT_SECONDS = 60.0
FORBIDDEN_TIMEOUT_SECONDS = 60.0
# After the first Forbidden, the flow still must not complete within this.
BLOCKED_CHECK_SECONDS = 8.0

# What the operator loses without a rule:
# BLOCKS: part of the flow never happens.
# DEGRADES: the flow completes, and only the Forbidden error in the log
#   shows the missing rule.
# UNENFORCED: the local kube-apiserver does not check the rule (see below).
BLOCKS = "blocks"
DEGRADES = "degrades"
UNENFORCED = "unenforced"
EFFECTS = {
    # kopf's CRD watch only notices CRDs installed or removed at runtime.
    "apiextensions.k8s.io/customresourcedefinitions": DEGRADES,
    # kopf 1.45 retried the forbidden namespace list for about 45 s in a
    # measured run before it fell back to the exact names it was given.
    "/namespaces": BLOCKS,
    f"{GROUP}/opencheckqueues": BLOCKS,
    f"{GROUP}/opencheckqueues/status": BLOCKS,
    # NOTE: only the OwnerReferencesPermissionEnforcement admission plugin
    # checks this rule, and the local kube-apiserver runs without it.
    f"{GROUP}/opencheckqueues/finalizers": UNENFORCED,
    "/secrets": BLOCKS,
    "apps/deployments": BLOCKS,
    "apps/deployments/scale": BLOCKS,
    # Events are informational: kopf and the operator log the failure and go on.
    "/events": DEGRADES,
}
# The operator leaves the API server's details out of failed Secret requests,
# so no Secret data reaches the log; these lines name the Secret instead.
SECRET_FORBIDDEN = re.compile(r"HTTP 403.*Secret|Secret.*HTTP 403")


def load_rules() -> list[dict[str, Any]]:
    """Return the rules of the ClusterRole in manifests/cluster_role.yaml."""
    role = yaml.safe_load(CLUSTER_ROLE_FILE.read_text())
    rules: list[dict[str, Any]] = role["rules"]
    return rules


def rule_id(rule: dict[str, Any]) -> str:
    """Return "group/resource" of a rule with one group and one resource."""
    (group,) = rule["apiGroups"]
    (resource,) = rule["resources"]
    return f"{group}/{resource}"


def forbidden_pattern(rule: dict[str, Any]) -> re.Pattern[str]:
    """Return a pattern of a log line that reports a Forbidden error for the rule's resource."""
    (resource,) = rule["resources"]
    if resource == "secrets":
        return SECRET_FORBIDDEN
    # The API server's message: ... is forbidden: User "..." cannot <verb>
    # resource "<resource>" in API group ...
    return re.compile(rf'forbidden.*cannot \w+ resource \\?"{re.escape(resource)}\\?"')


def forbidden_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if re.search(r"(?i)forbidden|HTTP 403", line)]


RULES = load_rules()


class OperatorIdentity:
    """ClusterRoles bound to a ServiceAccount of the test namespace, deleted by `delete`."""

    def __init__(
        self,
        api: kubernetes.client.ApiClient,
        control_plane: ControlPlane,
        namespace: str,
        folder: Path,
    ) -> None:
        self.rbac = kubernetes.client.RbacAuthorizationV1Api(api)
        self.control_plane = control_plane
        self.namespace = namespace
        self.folder = folder
        self.created: list[str] = []

    def kubeconfig(self, rules: list[dict[str, Any]]) -> Path:
        """Bind `rules` to the namespace's operator ServiceAccount and return its kubeconfig."""
        name = f"{self.namespace}-operator"
        self.rbac.create_cluster_role(
            {"metadata": {"name": name}, "rules": rules},
        )
        self.created.append(name)
        self.rbac.create_cluster_role_binding(
            {
                "metadata": {"name": name},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": name,
                },
                "subjects": [
                    {
                        "kind": "ServiceAccount",
                        "name": SERVICE_ACCOUNT,
                        "namespace": self.namespace,
                    }
                ],
            }
        )
        return self.control_plane.service_account_kubeconfig(
            self.namespace, SERVICE_ACCOUNT, self.folder / "operator.kubeconfig"
        )

    def delete(self) -> None:
        for name in self.created:
            for delete in (self.rbac.delete_cluster_role_binding, self.rbac.delete_cluster_role):
                try:
                    delete(name)
                except kubernetes.client.ApiException as error:
                    # Gone already: a failed create leaves only one of the two.
                    if error.status != 404:
                        raise


@pytest.fixture
def identity(
    kube_api: kubernetes.client.ApiClient,
    control_plane: ControlPlane,
    namespace: str,
    tmp_path: Path,
) -> Iterator[OperatorIdentity]:
    identity = OperatorIdentity(kube_api, control_plane, namespace, tmp_path)
    yield identity
    identity.delete()


class Flow:
    """The resource, its backlog, and reads of what the operator made of them."""

    def __init__(self, api: kubernetes.client.ApiClient, namespace: str) -> None:
        self.namespace = namespace
        self.core = kubernetes.client.CoreV1Api(api)
        self.apps = kubernetes.client.AppsV1Api(api)
        self.custom = kubernetes.client.CustomObjectsApi(api)

    def create_resource(self, secret: str, vhost: str) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "OpenCheckQueue",
            "metadata": {"name": RESOURCE_NAME},
            "spec": {
                "queue": {"name": RESOURCE_NAME, "vhost": vhost},
                "connection": {"secretRef": {"name": secret}},
                "agent": {
                    "image": "openchecker-agent:0.1.0",
                    "callbackAllowedHosts": ["api.example.org"],
                    "commands": [{"name": "clone", "argv": ["git", "clone", "{project_url}"]}],
                },
                "scaling": {
                    "minReplicas": 0,
                    "maxReplicas": 5,
                    "messagesPerReplica": MESSAGES_PER_REPLICA,
                    "pollIntervalSeconds": 1,
                },
            },
        }
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)

    def state(self) -> dict[str, Any]:
        """Return which steps of the flow happened."""
        resource = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, RESOURCE_NAME
        )
        conditions = (resource.get("status") or {}).get("conditions") or []
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
        deployment = self._read(self.apps.read_namespaced_deployment, f"{RESOURCE_NAME}-agent")
        secret = self._read(self.core.read_namespaced_secret, f"{RESOURCE_NAME}-agent-config")
        return {
            "queue declared (Ready)": ready,
            "Deployment created": deployment is not None,
            "config Secret created": secret is not None,
            "replicas": None if deployment is None else deployment.spec.replicas,
        }

    def complete(self) -> bool:
        state = self.state()
        return bool(
            state["queue declared (Ready)"]
            and state["Deployment created"]
            and state["config Secret created"]
            and state["replicas"] == EXPECTED_REPLICAS
        )

    def _read(self, read: Callable[[str, str], Any], name: str) -> Any | None:
        try:
            return read(name, self.namespace)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise


def declare_backlog(broker: Broker, vhost: str) -> None:
    """Declare the queues as the operator would, and publish BACKLOG messages.

    Declaring first lets the backlog wait in the queue even when a missing
    rule keeps the operator from declaring it.
    """
    dead_letter = f"{RESOURCE_NAME}.dlq"
    connection = pika.BlockingConnection(pika.URLParameters(broker.amqp_url(vhost)))
    try:
        channel = connection.channel()
        channel.queue_declare(dead_letter, durable=True, arguments={"x-queue-type": "classic"})
        channel.queue_declare(
            RESOURCE_NAME,
            durable=True,
            arguments={
                "x-queue-type": "classic",
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": dead_letter,
            },
        )
        for index in range(BACKLOG):
            channel.basic_publish("", RESOURCE_NAME, f'{{"index": {index}}}'.encode())
    finally:
        connection.close()


@pytest.fixture
def flow(
    kube_api: kubernetes.client.ApiClient,
    namespace: str,
    broker: Broker,
    vhost: str,
    broker_secret: str,
) -> Flow:
    declare_backlog(broker, vhost)
    flow = Flow(kube_api, namespace)
    flow.create_resource(broker_secret, vhost)
    return flow


def start_with_rules(
    start_operator: Callable[..., OperatorProcess],
    identity: OperatorIdentity,
    namespace: str,
    rules: list[dict[str, Any]],
) -> OperatorProcess:
    kubeconfig = identity.kubeconfig(rules)
    return start_operator(namespace, kubeconfig=kubeconfig)


def test_rules_all_classified() -> None:
    ids = [rule_id(rule) for rule in RULES]
    assert sorted(ids) == sorted(EFFECTS), "every rule needs an entry in EFFECTS"


@pytest.mark.timeout(60)
def test_manifests_pass_server_dry_run(kubectl: Kubectl) -> None:
    rendered = list(yaml.safe_load_all(kubectl("kustomize", str(MANIFESTS)).stdout))
    kinds = sorted(item["kind"] for item in rendered if item)
    assert kinds == [
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "Deployment",
        "Namespace",
        "ServiceAccount",
    ]
    role = next(item for item in rendered if item and item["kind"] == "ClusterRole")
    assert role["rules"] == RULES
    # A server-side dry run creates nothing, so the namespaced objects need
    # their namespace to exist already.
    kubectl("apply", "--filename", str(MANIFESTS / "namespace.yaml"))
    result = kubectl("apply", "--kustomize", str(MANIFESTS), "--dry-run=server")
    assert "deployment.apps/openchecker-operator" in result.stdout


@pytest.mark.timeout(120)
def test_flow_completes_with_manifest_rules(
    namespace: str,
    identity: OperatorIdentity,
    flow: Flow,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    operator = start_with_rules(start_operator, identity, namespace, RULES)
    wait_for(
        flow.complete,
        FLOW_TIMEOUT_SECONDS,
        interval_seconds=0.5,
        message=f"the flow did not complete; state {flow.state()}",
    )
    assert forbidden_lines(operator.log_text()) == []


@pytest.mark.timeout(150)
@pytest.mark.parametrize("removed", RULES, ids=[rule_id(rule) for rule in RULES])
def test_operator_without_rule(
    removed: dict[str, Any],
    namespace: str,
    identity: OperatorIdentity,
    flow: Flow,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    effect = EFFECTS[rule_id(removed)]
    rules = [rule for rule in RULES if rule is not removed]
    operator = start_with_rules(start_operator, identity, namespace, rules)

    if effect == UNENFORCED:
        wait_for(flow.complete, FLOW_TIMEOUT_SECONDS, interval_seconds=0.5)
        assert forbidden_lines(operator.log_text()) == []
        return

    pattern = forbidden_pattern(removed)
    wait_for(
        lambda: pattern.search(operator.log_text()),
        FORBIDDEN_TIMEOUT_SECONDS,
        interval_seconds=0.5,
        message=f"no Forbidden error for {rule_id(removed)} in {operator.log_path}",
    )
    if effect == DEGRADES:
        wait_for(
            flow.complete,
            FLOW_TIMEOUT_SECONDS,
            interval_seconds=0.5,
            message=f"the flow did not complete; state {flow.state()}",
        )
        return
    with pytest.raises(AssertionError):
        wait_for(flow.complete, BLOCKED_CHECK_SECONDS, interval_seconds=0.5)
