"""Fixtures for a real kube-apiserver and a real RabbitMQ broker.

A session reuses the environment of `make env-up` (state in .local/) when all
its servers run and respond, and leaves it running. Otherwise it starts
private servers in a temporary folder and stops them at the end. A test that
needs a server which cannot be started fails with the reason and how to
start one; it is never skipped.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from openchecker_testenv.binaries import ControlPlaneBinaries
from openchecker_testenv.broker import Broker
from openchecker_testenv.controlplane import ControlPlane
from openchecker_testenv.errors import SetupError
from openchecker_testenv.layout import StateLayout, default_state_dir
from openchecker_testenv.session import START_HINT, SessionEnvironment

# `from support import ...` works whether or not tests/ is a package.
TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from support import Kubectl, unique_name  # noqa: E402

logger = logging.getLogger(__name__)

SESSION_KEY = pytest.StashKey[SessionEnvironment]()
CONTROL_PLANE_FIXTURES = {
    "control_plane",
    "control_plane_binaries",
    "kube_api",
    "namespace",
    "kubectl",
}
BROKER_FIXTURES = {"broker", "vhost"}


def pytest_configure(config: pytest.Config) -> None:
    config.stash[SESSION_KEY] = SessionEnvironment(StateLayout(default_state_dir()))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build binaries and install RabbitMQ before the first test starts its timeout.

    Runs only when a collected test uses a server fixture, so unit test runs
    never build anything.
    """
    used: set[str] = set()
    for item in session.items:
        used.update(getattr(item, "fixturenames", ()))
    wants_control_plane = bool(used & CONTROL_PLANE_FIXTURES)
    wants_broker = bool(used & BROKER_FIXTURES)
    if not (wants_control_plane or wants_broker):
        return
    environment = session.config.stash[SESSION_KEY]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if environment.shared() is not None:
        _report(
            reporter,
            f"reusing the environment of `make env-up` in {environment.shared_layout.root}",
        )
        return
    _report(
        reporter, "no `make env-up` environment is running; this session starts its own servers"
    )
    environment.prepare(control_plane=wants_control_plane, broker=wants_broker)


def _report(reporter: Any, text: str) -> None:
    logger.info("openchecker testenv: %s", text)
    if reporter is not None:
        reporter.write_line(f"openchecker testenv: {text}")


def pytest_unconfigure(config: pytest.Config) -> None:
    environment = config.stash.get(SESSION_KEY, None)
    if environment is not None:
        environment.close()


def _require(description: str, error: SetupError) -> None:
    pytest.fail(f"No {description} for this test: {error}\n\n{START_HINT}", pytrace=False)


@pytest.fixture(scope="session")
def testenv_session(pytestconfig: pytest.Config) -> Iterator[SessionEnvironment]:
    """The session's servers; private ones stop when the session ends."""
    environment = pytestconfig.stash[SESSION_KEY]
    yield environment
    environment.close()


@pytest.fixture(scope="session")
def control_plane(testenv_session: SessionEnvironment) -> ControlPlane:
    """A running kube-apiserver: `.kubeconfig` (admin), `.server`, and
    `.service_account_kubeconfig(namespace, name, path)`."""
    try:
        return testenv_session.control_plane()
    except SetupError as error:
        _require("control plane", error)
        raise


@pytest.fixture(scope="session")
def control_plane_binaries(testenv_session: SessionEnvironment) -> ControlPlaneBinaries:
    """The etcd, kube-apiserver and kube-controller-manager executables, built if needed."""
    try:
        return testenv_session.binaries()
    except SetupError as error:
        _require("control plane binaries", error)
        raise


@pytest.fixture(scope="session")
def kube_api(control_plane: ControlPlane) -> Iterator[kubernetes.client.ApiClient]:
    """A kubernetes.client.ApiClient authenticated as the administrator."""
    client = kubernetes.config.new_client_from_config(config_file=str(control_plane.kubeconfig))
    yield client
    client.close()


@pytest.fixture(scope="session")
def kubectl(testenv_session: SessionEnvironment, control_plane: ControlPlane) -> Kubectl:
    """`kubectl(*args, input=None, check=True)` bound to the admin kubeconfig."""
    try:
        executable = testenv_session.kubectl()
    except SetupError as error:
        _require("kubectl", error)
        raise
    return Kubectl(executable, control_plane.kubeconfig)


@pytest.fixture
def namespace(
    request: pytest.FixtureRequest, kube_api: kubernetes.client.ApiClient
) -> Iterator[str]:
    """A new namespace named after the test; deleted after it without waiting."""
    core = kubernetes.client.CoreV1Api(kube_api)
    name = unique_name(request.node.name)
    metadata = kubernetes.client.V1ObjectMeta(name=name)
    core.create_namespace(kubernetes.client.V1Namespace(metadata=metadata))
    yield name
    try:
        core.delete_namespace(name)
    except kubernetes.client.ApiException as error:
        # A test may delete its namespace itself.
        if error.status != 404:
            raise


@pytest.fixture(scope="session")
def broker(testenv_session: SessionEnvironment) -> Broker:
    """A running RabbitMQ broker: `.host`, `.amqp_port`, `.management_url`,
    `.username`, `.password`, `.amqp_url(vhost)` and `.management_session()`."""
    try:
        return testenv_session.broker()
    except SetupError as error:
        _require("RabbitMQ broker", error)
        raise


@pytest.fixture
def vhost(request: pytest.FixtureRequest, broker: Broker) -> Iterator[str]:
    """A new vhost named after the test, with full permissions for the broker user."""
    name = unique_name(request.node.name)
    broker.create_vhost(name)
    yield name
    broker.delete_vhost(name)
