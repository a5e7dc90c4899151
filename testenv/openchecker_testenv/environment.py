"""The shared development environment behind `make env-up` and `make env-down`.

`up` starts the control plane and the broker, then writes into the state
folder: `kubeconfig`, a shell-sourceable `env`, `state.json` (read by test
sessions to reuse the servers), and a record per process under `pids/`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shlex
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .binaries import ControlPlaneBinaries, find_kubectl, resolve_binaries
from .broker import AMQP_URL_VARIABLE, MANAGEMENT_URL_VARIABLE, Broker
from .controlplane import ControlPlane, LocalControlPlane
from .errors import SetupError
from .files import write_private_text
from .layout import StateLayout
from .processes import ProcessRecord, stop_recorded_processes
from .rabbitmq import LocalRabbitMQ, ensure_rabbitmq_installed

logger = logging.getLogger(__name__)

# Written to the env file next to RABBITMQ_URL when `up` started the broker
# itself. A shell that sourced an old env file still has RABBITMQ_URL pointing
# at that broker after `down`, and this marker keeps the next `up` from taking
# it for an external broker.
LOCAL_BROKER_MARKER = "OPENCHECKER_TESTENV_LOCAL_RABBITMQ_URL"

# Stale processes of a crashed run are stopped with this grace period.
STOP_GRACE_SECONDS = 10.0


@dataclass(frozen=True)
class EnvironmentState:
    """A running environment as stored in `state.json`."""

    control_plane: ControlPlane
    broker: Broker
    # False when the broker came from RABBITMQ_URL and `down` leaves it alone.
    broker_owned: bool
    binaries_folder: Path

    def kubectl(self) -> Path:
        return find_kubectl(self.binaries_folder)

    def to_dict(self) -> dict[str, Any]:
        return {
            "control_plane": self.control_plane.to_dict(),
            "broker": self.broker.to_dict(),
            "broker_owned": self.broker_owned,
            "binaries_folder": str(self.binaries_folder),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EnvironmentState:
        return cls(
            control_plane=ControlPlane.from_dict(data["control_plane"]),
            broker=Broker.from_dict(data["broker"]),
            broker_owned=bool(data["broker_owned"]),
            binaries_folder=Path(data["binaries_folder"]),
        )


def broker_from_environment() -> Broker | None:
    """Return the broker named by RABBITMQ_URL, or None when none is set.

    RABBITMQ_URL exported from an env file for the broker that `up` started
    itself is ignored, because that broker stops with `down`.
    """
    url = os.environ.get(AMQP_URL_VARIABLE)
    if not url:
        return None
    if url == os.environ.get(LOCAL_BROKER_MARKER):
        logger.info(
            "Ignoring %s: it was exported from an env file for a broker that env-up "
            "started, not for an external one.",
            AMQP_URL_VARIABLE,
        )
        return None
    return Broker.from_urls(url, os.environ.get(MANAGEMENT_URL_VARIABLE))


def check_external_broker(broker: Broker) -> Broker:
    """Raise SetupError when the broker from RABBITMQ_URL does not respond."""
    if not broker.is_ready(timeout_seconds=5.0):
        raise SetupError(
            f"The broker from {AMQP_URL_VARIABLE} does not respond: GET "
            f"{broker.management_url}/api/overview as user {broker.username!r} failed. "
            f"Start that broker, set {MANAGEMENT_URL_VARIABLE} if its management API is "
            f"elsewhere, or unset {AMQP_URL_VARIABLE} to start a local one."
        )
    logger.info("Using the external broker at %s:%d.", broker.host, broker.amqp_port)
    return broker


@contextlib.contextmanager
def _locked(layout: StateLayout) -> Iterator[None]:
    """Hold the state folder's lock, so that two `up` or `down` never interleave."""
    layout.root.mkdir(parents=True, exist_ok=True)
    with layout.lock_file.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def load_state(layout: StateLayout) -> EnvironmentState | None:
    try:
        return EnvironmentState.from_dict(json.loads(layout.state_file.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as error:
        logger.warning("Ignoring unreadable %s: %s.", layout.state_file, error)
        return None


def load_process_records(layout: StateLayout) -> list[ProcessRecord]:
    records = []
    for path in sorted(layout.pids.glob("*.json")):
        record = ProcessRecord.load(path)
        if record is not None:
            records.append(record)
    return records


def find_running(layout: StateLayout) -> EnvironmentState | None:
    """Return the environment of `layout` when all its servers run and respond."""
    state = load_state(layout)
    if state is None:
        return None
    records = load_process_records(layout)
    if not records or not all(record.is_running() for record in records):
        return None
    if not state.control_plane.is_ready():
        return None
    if not state.broker.is_ready():
        return None
    return state


def up(layout: StateLayout) -> EnvironmentState:
    """Start the environment, or return it when it already runs and responds.

    Processes left by a crashed run are stopped first. On any failure
    everything started here is stopped again before SetupError propagates.
    """
    with _locked(layout):
        running = find_running(layout)
        if running is not None:
            logger.info("The environment in %s is already running.", layout.root)
            return running
        _clean_up(layout)

        binaries = resolve_binaries()
        external_broker = broker_from_environment()
        if external_broker is None:
            # Fails before any server starts when RabbitMQ cannot be installed.
            ensure_rabbitmq_installed()
        else:
            check_external_broker(external_broker)

        control_plane, broker = _start_servers(layout, binaries, external_broker)
        state = EnvironmentState(
            control_plane=control_plane,
            broker=broker,
            broker_owned=external_broker is None,
            binaries_folder=binaries.folder,
        )
        write_private_text(layout.state_file, json.dumps(state.to_dict(), indent=2) + "\n")
        write_private_text(layout.env_file, format_env_file(state))
        return state


def _start_servers(
    layout: StateLayout, binaries: ControlPlaneBinaries, external_broker: Broker | None
) -> tuple[ControlPlane, Broker]:
    local_control_plane = LocalControlPlane(layout, binaries)
    local_broker = LocalRabbitMQ(layout)
    # The two boot in parallel: the broker takes about 5 s, the control plane
    # about 2 s, and each mostly waits.
    with ThreadPoolExecutor(max_workers=1) as pool:
        broker_future = pool.submit(
            lambda: external_broker if external_broker is not None else local_broker.start()
        )
        errors: list[BaseException] = []
        try:
            control_plane = local_control_plane.start()
        except BaseException as error:
            errors.append(error)
        try:
            broker = broker_future.result()
        except BaseException as error:
            errors.append(error)
    if errors:
        local_control_plane.stop()
        local_broker.stop()
        # LocalControlPlane wrote it when the API server became ready, so it
        # would now point at a stopped server.
        layout.kubeconfig.unlink(missing_ok=True)
        for other_error in errors[1:]:
            logger.error("The other server failed to start as well: %s", other_error)
        raise errors[0]
    return control_plane, broker


def _clean_up(layout: StateLayout) -> None:
    """Stop what a crashed or partly failed run left behind and forget its state."""
    stop_recorded_processes(layout.pids, STOP_GRACE_SECONDS)
    for path in (layout.state_file, layout.env_file, layout.kubeconfig):
        path.unlink(missing_ok=True)


def down(layout: StateLayout) -> None:
    """Stop every process the environment recorded; an external broker keeps running."""
    with _locked(layout):
        _clean_up(layout)
    logger.info("The environment in %s is stopped.", layout.root)


def format_env_file(state: EnvironmentState) -> str:
    """Return the shell-sourceable variables that point clients at `state`."""
    broker = state.broker
    variables = {
        "KUBECONFIG": str(state.control_plane.kubeconfig),
        AMQP_URL_VARIABLE: broker.amqp_url(),
        MANAGEMENT_URL_VARIABLE: broker.management_url,
        "RABBITMQ_USERNAME": broker.username,
        "RABBITMQ_PASSWORD": broker.password,
        "RABBITMQ_HOST": broker.host,
        "RABBITMQ_PORT": str(broker.amqp_port),
    }
    if state.broker_owned:
        variables[LOCAL_BROKER_MARKER] = broker.amqp_url()
    lines = ["# Written by `python -m openchecker_testenv up`; load with `source`."]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in variables.items()]
    return "\n".join(lines) + "\n"


def describe_status(layout: StateLayout) -> tuple[bool, list[str]]:
    """Return whether the environment is healthy, and one line per component."""
    lines = []
    records = load_process_records(layout)
    for record in records:
        running = "running" if record.is_running() else "not running"
        lines.append(f"{record.name}: {running} (pid {record.pid}, log {record.log_file})")
    state = load_state(layout)
    if state is None:
        lines.append(f"No environment recorded in {layout.state_file}.")
        return False, lines
    api_ready = state.control_plane.is_ready()
    broker_ready = state.broker.is_ready()
    lines.append(
        f"kube-apiserver {state.control_plane.server}: {'ready' if api_ready else 'not ready'}"
    )
    lines.append(
        f"RabbitMQ {state.broker.host}:{state.broker.amqp_port}, management "
        f"{state.broker.management_url}: {'ready' if broker_ready else 'not ready'}"
    )
    lines.append(f"Load the variables with: source {layout.env_file}")
    healthy = api_ready and broker_ready and all(record.is_running() for record in records)
    return healthy, lines
