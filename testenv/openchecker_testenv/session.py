"""The servers of one test session, reused from `make env-up` or started privately.

Choice, per server and in this order:

1. The environment in the shared state folder (`.local`) when every server
   there runs and responds. It is left running at the end of the session.
2. For the broker only: RABBITMQ_URL.
3. A private server in a temporary folder, stopped at the end of the
   session: in Docker containers (K3s, RabbitMQ) when a Docker engine
   responds, else from the local binaries. OPENCHECKER_TESTENV_BACKEND=local
   or =docker overrides that choice.

A failed start is remembered, so every later test fails at once with the same
message instead of waiting for another start.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .binaries import ControlPlaneBinaries, find_kubectl, resolve_binaries
from .broker import Broker
from .containers import ContainerEnvironment, is_docker_engine_available
from .controlplane import ControlPlane, LocalControlPlane
from .environment import EnvironmentState, broker_from_environment, check_external_broker
from .environment import find_running as find_running_environment
from .errors import SetupError
from .layout import StateLayout
from .processes import ProcessRecord, read_process_stat, stop_recorded_processes
from .rabbitmq import LocalRabbitMQ, ensure_rabbitmq_installed

logger = logging.getLogger(__name__)

T = TypeVar("T")

BACKEND_VARIABLE = "OPENCHECKER_TESTENV_BACKEND"
LOCAL = "local"
DOCKER = "docker"

# Private state folders are temporary folders with this prefix, containing an
# `owner.json` record of the process that created them.
PRIVATE_FOLDER_PREFIX = "openchecker-testenv-"
OWNER_NAME = "owner"

START_HINT = (
    "To share one environment between test runs, start it with `make env-up` "
    "(logs in .local/logs) and check it with `python -m openchecker_testenv status`."
)


def choose_backend() -> str:
    """Return "local" or "docker" for private servers, and log why."""
    configured = os.environ.get(BACKEND_VARIABLE)
    if configured:
        if configured not in (LOCAL, DOCKER):
            raise SetupError(
                f"{BACKEND_VARIABLE}={configured!r} is invalid; use {LOCAL!r} or {DOCKER!r}."
            )
        logger.info("Using the %s backend, as %s requests.", configured, BACKEND_VARIABLE)
        return configured
    if is_docker_engine_available():
        logger.info(
            "A Docker engine responds, so private servers run in containers. Set %s=%s "
            "to use the local binaries instead.",
            BACKEND_VARIABLE,
            LOCAL,
        )
        return DOCKER
    logger.info("No Docker engine responds, so private servers run from local binaries.")
    return LOCAL


def create_private_folder() -> Path:
    """Create a temporary state folder owned by this process.

    First stops the servers of sessions whose process died without cleaning
    up, for example when pytest was killed.
    """
    sweep_abandoned_private_folders(Path(tempfile.gettempdir()))
    folder = Path(tempfile.mkdtemp(prefix=PRIVATE_FOLDER_PREFIX))
    stat = read_process_stat(os.getpid())
    # This process is running, so /proc has its entry.
    assert stat is not None
    owner = ProcessRecord(OWNER_NAME, os.getpid(), stat.start_ticks, sys.argv, "")
    owner.save(folder)
    return folder


def sweep_abandoned_private_folders(parent: Path) -> None:
    """Stop the servers in every private folder under `parent` whose owner is gone,
    and delete the folder."""
    for folder in sorted(parent.glob(f"{PRIVATE_FOLDER_PREFIX}*")):
        owner_file = folder / f"{OWNER_NAME}.json"
        if not owner_file.is_file():
            continue
        owner = ProcessRecord.load(owner_file)
        if owner is not None and owner.is_running():
            continue
        logger.warning("Stopping the servers of an interrupted test session in %s.", folder)
        try:
            # Their data is thrown away with the folder.
            stop_recorded_processes(StateLayout(folder).pids, grace_seconds=0)
        except SetupError as error:
            logger.error("Could not clean up %s: %s", folder, error)
            continue
        shutil.rmtree(folder, ignore_errors=True)


class SessionEnvironment:
    """The control plane and the broker of one test session, started on first use."""

    def __init__(self, shared_layout: StateLayout) -> None:
        self.shared_layout = shared_layout
        self._shared: EnvironmentState | None = None
        self._shared_checked = False
        self._backend: str | None = None
        self._private_folder: Path | None = None
        self._binaries: ControlPlaneBinaries | None = None
        self._local_control_plane: LocalControlPlane | None = None
        self._local_broker: LocalRabbitMQ | None = None
        self._containers: ContainerEnvironment | None = None
        self._control_plane: ControlPlane | None = None
        self._broker: Broker | None = None
        self._errors: dict[str, SetupError] = {}

    def shared(self) -> EnvironmentState | None:
        """Return the running `make env-up` environment; checked once per session."""
        if not self._shared_checked:
            self._shared_checked = True
            self._shared = find_running_environment(self.shared_layout)
            if self._shared is not None:
                logger.info(
                    "Reusing the environment from `make env-up` in %s; it keeps running "
                    "after the tests.",
                    self.shared_layout.root,
                )
            else:
                logger.info("No running environment in %s.", self.shared_layout.root)
        return self._shared

    def prepare(self, *, control_plane: bool, broker: bool) -> None:
        """Build binaries and install RabbitMQ ahead of the first test.

        Both can take minutes on a fresh machine, longer than a test's
        timeout. Errors are remembered and raised by `control_plane()` or
        `broker()`.
        """
        if self.shared() is not None:
            return
        try:
            if self.backend() == DOCKER:
                return
        except SetupError as error:
            self._errors["control plane"] = self._errors["broker"] = error
            return
        if control_plane:
            try:
                self.binaries()
            except SetupError as error:
                self._errors["control plane"] = error
        if broker:
            try:
                if broker_from_environment() is None:
                    ensure_rabbitmq_installed()
            except SetupError as error:
                self._errors["broker"] = error

    def backend(self) -> str:
        if self._backend is None:
            self._backend = choose_backend()
        return self._backend

    def binaries(self) -> ControlPlaneBinaries:
        if self._binaries is None:
            log = self.private_folder() / "logs" / "build.log"
            self._binaries = resolve_binaries(build_log=log)
        return self._binaries

    def kubectl(self) -> Path:
        shared = self.shared()
        if shared is not None:
            return shared.kubectl()
        if self.backend() == LOCAL:
            return find_kubectl(self.binaries().folder)
        return find_kubectl()

    def private_folder(self) -> Path:
        if self._private_folder is None:
            self._private_folder = create_private_folder()
            logger.info(
                "Private servers of this session keep their files in %s.", self._private_folder
            )
        return self._private_folder

    def control_plane(self) -> ControlPlane:
        """Return the session's control plane, starting a private one if needed.

        Raises SetupError, the same one on every call, when none can be had.
        """
        if self._control_plane is None:
            self._control_plane = self._remembering("control plane", self._get_control_plane)
        return self._control_plane

    def broker(self) -> Broker:
        """Return the session's broker, starting a private one if needed."""
        if self._broker is None:
            self._broker = self._remembering("broker", self._get_broker)
        return self._broker

    def close(self) -> None:
        """Stop the private servers; shared ones keep running."""
        errors = []
        for stop in self._stoppers():
            try:
                stop()
            except SetupError as error:
                errors.append(str(error))
        if self._private_folder is not None and not errors:
            shutil.rmtree(self._private_folder, ignore_errors=True)
        if errors:
            raise SetupError("\n".join(errors))

    def _stoppers(self) -> list[Callable[[], None]]:
        stoppers: list[Callable[[], None]] = []
        if self._local_broker is not None:
            stoppers.append(self._local_broker.stop)
        if self._local_control_plane is not None:
            stoppers.append(self._local_control_plane.stop)
        if self._containers is not None:
            stoppers.append(self._containers.stop)
        return stoppers

    def _remembering(self, key: str, get: Callable[[], T]) -> T:
        if key in self._errors:
            raise self._errors[key]
        try:
            return get()
        except SetupError as error:
            self._errors[key] = error
            raise

    def _get_control_plane(self) -> ControlPlane:
        shared = self.shared()
        if shared is not None:
            return shared.control_plane
        if self.backend() == DOCKER:
            return self._container_environment().start_control_plane()
        layout = StateLayout(self.private_folder())
        logger.info("Starting a private control plane for this session.")
        self._local_control_plane = LocalControlPlane(layout, self.binaries())
        return self._local_control_plane.start()

    def _get_broker(self) -> Broker:
        shared = self.shared()
        if shared is not None:
            return shared.broker
        external = broker_from_environment()
        if external is not None:
            return check_external_broker(external)
        if self.backend() == DOCKER:
            return self._container_environment().start_broker()
        logger.info("Starting a private RabbitMQ node for this session.")
        self._local_broker = LocalRabbitMQ(StateLayout(self.private_folder()))
        return self._local_broker.start()

    def _container_environment(self) -> ContainerEnvironment:
        if self._containers is None:
            self._containers = ContainerEnvironment(self.private_folder())
        return self._containers
