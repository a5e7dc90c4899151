"""Fixtures that run the operator: the CRD, a broker Secret and the operator process.

`start_operator(namespace, env=None, kubeconfig=None)` starts the operator
as a subprocess for one namespace and stops it after the test. At teardown
the log's tail is printed when the test failed, and a traceback in the log
fails a test that passed. `operator_process` is the same for the test's
`namespace` with the admin kubeconfig.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from openchecker_testenv.broker import Broker
from openchecker_testenv.controlplane import ControlPlane
from support import Kubectl
from support.operator import OperatorProcess
from support.resources import create_secret

REPOSITORY = Path(__file__).resolve().parents[2]
CRD_FOLDER = REPOSITORY / "crds"
CRD_NAME = "opencheckqueues.openchecker.io"
BROKER_SECRET_NAME = "rabbitmq-connection"
CRD_ESTABLISHED_TIMEOUT_SECONDS = 30.0
RESOURCE_DELETION_TIMEOUT_SECONDS = 30.0
FORCE_ANNOTATION = "openchecker.io/force-delete"

REPORT_KEY = pytest.StashKey[dict[str, pytest.TestReport]]()

StartOperator = Callable[..., OperatorProcess]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the item, so fixtures know whether the test failed."""
    report: pytest.TestReport = yield
    item.stash.setdefault(REPORT_KEY, {})[report.when] = report
    return report


def test_failed(request: pytest.FixtureRequest) -> bool:
    """Return whether the setup or the call phase of the requesting test failed."""
    reports = request.node.stash.get(REPORT_KEY, {})
    return any(report.failed for report in reports.values())


@pytest.fixture(scope="session")
def opencheckqueue_crd(kubectl: Kubectl) -> str:
    """The OpenCheckQueue CRD from crds/, applied and established; its name."""
    kubectl("apply", "--server-side", "--force-conflicts", "-k", str(CRD_FOLDER))
    kubectl(
        "wait",
        "--for=condition=Established",
        f"crd/{CRD_NAME}",
        f"--timeout={int(CRD_ESTABLISHED_TIMEOUT_SECONDS)}s",
    )
    return CRD_NAME


@pytest.fixture
def broker_secret(namespace: str, broker: Broker, kube_api: kubernetes.client.ApiClient) -> str:
    """A Secret in the test's namespace with the test broker's address and credentials."""
    data = {
        "host": broker.host,
        "port": str(broker.amqp_port),
        "username": broker.username,
        "password": broker.password,
        "management_url": broker.management_url,
    }
    create_secret(kube_api, namespace, BROKER_SECRET_NAME, data)
    return BROKER_SECRET_NAME


@pytest.fixture
def start_operator(
    request: pytest.FixtureRequest,
    control_plane: ControlPlane,
    opencheckqueue_crd: str,
    kubectl: Kubectl,
    tmp_path: Path,
) -> Iterator[StartOperator]:
    """A factory `start_operator(namespace, env=None, kubeconfig=None, **options)`.

    Each call starts an operator subprocess serving `namespace` and returns
    its OperatorProcess; `options` go to OperatorProcess (for example
    `resync_interval_seconds`). Every process is stopped after the test.
    """
    started: list[OperatorProcess] = []

    def start(
        namespace: str,
        env: Mapping[str, str] | None = None,
        kubeconfig: Path | None = None,
        **options: Any,
    ) -> OperatorProcess:
        log_path = tmp_path / f"operator-{len(started) + 1}.log"
        process = OperatorProcess(
            [namespace], kubeconfig or control_plane.kubeconfig, log_path, env=env, **options
        )
        started.append(process)
        process.start()
        return process

    yield start

    for process in started:
        if process.running:
            delete_queue_resources(kubectl, process.namespaces)
    problems = []
    for process in started:
        code = process.stop()
        if test_failed(request):
            print(f"\n--- operator log {process.log_path} (tail) ---\n{process.log_tail()}")
        if process.tracebacks():
            problems.append(f"{process.log_path}:\n" + "\n\n".join(process.tracebacks()[:3]))
        if code not in (0, None, -15):
            problems.append(f"{process.log_path}: the operator exited with code {code}")
    if problems and not test_failed(request):
        pytest.fail("The operator's log shows errors:\n" + "\n".join(problems), pytrace=False)


def delete_queue_resources(kubectl: Kubectl, namespaces: list[str]) -> None:
    """Delete every OpenCheckQueue while the operator still runs, so none keeps a finalizer.

    A resource whose deletion stays blocked (a non-empty queue under
    `Delete`) gets the force annotation, and after the wait its finalizer
    is removed, so the test's namespace can go away.
    """
    for namespace in namespaces:
        kubectl(
            "annotate",
            "ocq",
            "--all",
            "-n",
            namespace,
            f"{FORCE_ANNOTATION}=true",
            "--overwrite",
            check=False,
        )
        kubectl("delete", "ocq", "--all", "-n", namespace, "--wait=false", check=False)
    deadline = time.monotonic() + RESOURCE_DELETION_TIMEOUT_SECONDS
    for namespace in namespaces:
        while time.monotonic() < deadline:
            names = kubectl("get", "ocq", "-n", namespace, "-o", "name", check=False).stdout
            if not names.strip():
                break
            time.sleep(0.3)
        names = kubectl("get", "ocq", "-n", namespace, "-o", "name", check=False).stdout
        for resource in names.split():
            kubectl(
                "patch",
                resource,
                "-n",
                namespace,
                "--type=merge",
                "-p",
                '{"metadata":{"finalizers":null}}',
                check=False,
            )


@pytest.fixture
def operator_process(start_operator: StartOperator, namespace: str) -> OperatorProcess:
    """The operator serving the test's namespace, with the admin kubeconfig."""
    return start_operator(namespace)
