"""A local RabbitMQ node from Debian's rabbitmq-server package.

The node gets its own name, data, log and configuration under the state
folder, its own epmd, and listens on 127.0.0.1 only, so it runs next to a
system-wide RabbitMQ and next to the nodes of other test sessions.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from .broker import Broker
from .errors import PortInUseError, SetupError
from .layout import StateLayout
from .ports import LOOPBACK, is_port_open, reserve_free_ports
from .processes import ManagedProcess, wait_until_ready

logger = logging.getLogger(__name__)

# The package's real scripts. The /usr/sbin names are wrappers that switch to
# the rabbitmq user and use the system-wide node's folders.
RABBITMQ_SCRIPTS = Path("/usr/lib/rabbitmq/bin")
DEBIAN_PACKAGE = "rabbitmq-server"
# The default user of a fresh node; RabbitMQ accepts it only from localhost.
DEFAULT_USERNAME = "guest"
DEFAULT_PASSWORD = "guest"

PORT_ATTEMPTS = 3
# The node boots in about 5 s on a 2-core machine; this bounds a slow boot.
READY_TIMEOUT_SECONDS = 90.0
# A clean stop takes about 6 s. The data is deleted at the next start anyway,
# so a slower stop is cut short with SIGKILL.
STOP_GRACE_SECONDS = 10.0


def ensure_rabbitmq_installed() -> None:
    """Install Debian's rabbitmq-server with apt-get when it is missing.

    Raises SetupError when it is missing and this process cannot install it
    (not root, or no apt-get), or when apt-get fails.
    """
    if (RABBITMQ_SCRIPTS / "rabbitmq-server").exists():
        return
    hint = (
        f"Install it with `sudo apt-get install {DEBIAN_PACKAGE}`, or set RABBITMQ_URL "
        "to a running broker (amqp://user:password@host:port/vhost)."
    )
    if os.geteuid() != 0:
        raise SetupError(f"RabbitMQ is not installed and this user is not root. {hint}")
    if shutil.which("apt-get") is None:
        raise SetupError(f"RabbitMQ is not installed and apt-get was not found. {hint}")
    # NOTE: on a host that runs systemd, the package also starts the
    # system-wide service on the default ports. The node started here is
    # separate from it.
    logger.info("Installing %s with apt-get.", DEBIAN_PACKAGE)
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    commands = [
        ["apt-get", "update"],
        ["apt-get", "install", "--yes", "--no-install-recommends", DEBIAN_PACKAGE],
    ]
    for command in commands:
        result = subprocess.run(
            command, env=environment, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            output = "\n".join((result.stdout + result.stderr).splitlines()[-20:])
            raise SetupError(
                f"`{' '.join(command)}` failed with exit code {result.returncode}:\n"
                f"{output}\n{hint}"
            )
    if not (RABBITMQ_SCRIPTS / "rabbitmq-server").exists():
        raise SetupError(
            f"apt-get installed {DEBIAN_PACKAGE}, but {RABBITMQ_SCRIPTS}/rabbitmq-server "
            "does not exist; this layout is not supported. Set RABBITMQ_URL instead."
        )


def _find_epmd() -> Path:
    on_path = shutil.which("epmd")
    if on_path is not None:
        return Path(on_path)
    for candidate in sorted(Path("/usr/lib/erlang").glob("erts-*/bin/epmd")):
        return candidate
    raise SetupError(
        "epmd (the Erlang port mapper) was not found. Reinstall the erlang-base package."
    )


class LocalRabbitMQ:
    """Starts and stops one RabbitMQ node with the management plugin."""

    def __init__(self, layout: StateLayout, *, extra_config: str = "") -> None:
        self.layout = layout
        self.folder = layout.rabbitmq
        # Appended to rabbitmq.conf; lets tests break the configuration on
        # purpose.
        self.extra_config = extra_config
        digest = hashlib.sha1(str(layout.root).encode()).hexdigest()[:8]
        self.node_name = f"openchecker-{digest}@localhost"
        self.processes: list[ManagedProcess] = []

    @property
    def node_log(self) -> Path:
        return self.folder / "log" / f"{self.node_name}.log"

    def start(self) -> Broker:
        """Start epmd and the node, and wait until the AMQP listener runs.

        Raises SetupError, with the tail of the node's log and after stopping
        what it started, when the node exits or is not ready in time.
        """
        ensure_rabbitmq_installed()
        started = time.monotonic()
        try:
            self._prepare_folders()
            for attempt in range(1, PORT_ATTEMPTS + 1):
                try:
                    broker = self._start_once()
                    break
                except PortInUseError as error:
                    self.stop(grace_seconds=0)
                    if attempt == PORT_ATTEMPTS:
                        raise SetupError(
                            f"RabbitMQ failed to bind a free port {PORT_ATTEMPTS} times in a "
                            f"row; another program is taking ports fast. The last failure:\n"
                            f"{error}"
                        ) from error
                    logger.warning(
                        "A RabbitMQ port was taken by another process; retrying on other "
                        "ports (attempt %d of %d).",
                        attempt + 1,
                        PORT_ATTEMPTS,
                    )
        except BaseException:
            # A node that failed to start has nothing worth a clean shutdown.
            self.stop(grace_seconds=0)
            raise
        logger.info(
            "RabbitMQ node %s ready at %s after %.1f s.",
            self.node_name,
            broker.management_url,
            time.monotonic() - started,
        )
        return broker

    def stop(self, grace_seconds: float | None = None) -> None:
        """Stop the node, then epmd; safe to call more than once.

        `grace_seconds` overrides the grace period between SIGTERM and SIGKILL.
        """
        errors = []
        while self.processes:
            process = self.processes.pop()
            try:
                process.stop(grace_seconds)
            except SetupError as error:
                errors.append(str(error))
        if errors:
            raise SetupError("\n".join(errors))

    def _prepare_folders(self) -> None:
        (self.folder / "home").mkdir(parents=True, exist_ok=True)
        # Replaces /etc/rabbitmq/rabbitmq-env.conf, which belongs to the
        # system-wide node.
        (self.folder / "rabbitmq-env.conf").write_text("")
        enabled_plugins = self.folder / "enabled_plugins"
        if "rabbitmq_management" not in _read_text(enabled_plugins):
            self._run_cli(
                ["rabbitmq-plugins", "enable", "--offline", "rabbitmq_management"],
                self._environment(amqp_port=0, dist_port=0, epmd_port=0),
            )

    def _reset_node_folders(self) -> None:
        # A fresh database at every start, so nothing from a crashed run or an
        # earlier session changes what tests see. A fresh log, so a failed
        # attempt's errors are not read as this attempt's.
        for name in ("data", "log"):
            shutil.rmtree(self.folder / name, ignore_errors=True)
            (self.folder / name).mkdir(parents=True)
        (self.folder / "erl_crash.dump").unlink(missing_ok=True)

    def _start_once(self) -> Broker:
        self._reset_node_folders()
        amqp_port, management_port, dist_port, epmd_port = reserve_free_ports(4)
        self._write_config(amqp_port, management_port)
        environment = self._environment(amqp_port, dist_port, epmd_port)

        # Started before the node so that the node does not start a detached
        # epmd of its own, which would outlive it.
        epmd = self._launch(
            "epmd",
            [str(_find_epmd()), "-address", LOOPBACK, "-port", str(epmd_port)],
            environment,
            stop_grace_seconds=5.0,
        )
        with _epmd_port_conflict_as_port_in_use(epmd, epmd_port):
            wait_until_ready(
                "epmd", lambda: is_port_open(epmd_port), processes=[epmd], timeout_seconds=10
            )

        server = self._launch(
            "rabbitmq-server",
            [str(RABBITMQ_SCRIPTS / "rabbitmq-server")],
            environment,
            stop_grace_seconds=STOP_GRACE_SECONDS,
        )
        broker = Broker(
            host=LOOPBACK,
            amqp_port=amqp_port,
            management_url=f"http://{LOOPBACK}:{management_port}",
            username=DEFAULT_USERNAME,
            password=DEFAULT_PASSWORD,
        )
        with _epmd_port_conflict_as_port_in_use(epmd, epmd_port):
            wait_until_ready(
                f"RabbitMQ node {self.node_name}",
                lambda: _is_amqp_listener_running(broker),
                processes=[epmd, server],
                timeout_seconds=READY_TIMEOUT_SECONDS,
                extra_logs=[self.node_log],
                interval_seconds=0.25,
            )
        return broker

    def _write_config(self, amqp_port: int, management_port: int) -> None:
        lines = [
            f"listeners.tcp.default = {LOOPBACK}:{amqp_port}",
            f"management.tcp.ip = {LOOPBACK}",
            f"management.tcp.port = {management_port}",
            "log.console = false",
            "log.file.level = info",
            self.extra_config,
        ]
        (self.folder / "rabbitmq.conf").write_text("\n".join(lines) + "\n")

    def _environment(self, amqp_port: int, dist_port: int, epmd_port: int) -> dict[str, str]:
        folder = self.folder
        # Keeps the Erlang distribution listener of the node and of the CLI
        # tools on loopback.
        loopback_distribution = "-kernel inet_dist_use_interface {127,0,0,1}"
        environment = {
            **os.environ,
            # The Erlang cookie is created in $HOME.
            "HOME": str(folder / "home"),
            "RABBITMQ_NODENAME": self.node_name,
            "RABBITMQ_CONF_ENV_FILE": str(folder / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(folder / "data"),
            "RABBITMQ_LOG_BASE": str(folder / "log"),
            "RABBITMQ_NODE_IP_ADDRESS": LOOPBACK,
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": loopback_distribution,
            "RABBITMQ_CTL_ERL_ARGS": loopback_distribution,
            "ERL_EPMD_ADDRESS": LOOPBACK,
        }
        if amqp_port:
            environment["RABBITMQ_NODE_PORT"] = str(amqp_port)
        if dist_port:
            environment["RABBITMQ_DIST_PORT"] = str(dist_port)
        if epmd_port:
            environment["ERL_EPMD_PORT"] = str(epmd_port)
        return environment

    def _launch(
        self,
        name: str,
        command: list[str],
        environment: dict[str, str],
        *,
        stop_grace_seconds: float,
    ) -> ManagedProcess:
        process = ManagedProcess(
            name,
            command,
            log_file=self.layout.logs / f"{name}.log",
            record_folder=self.layout.pids,
            env=environment,
            cwd=self.folder,
            stop_grace_seconds=stop_grace_seconds,
        )
        self.processes.append(process)
        process.start()
        return process

    def _run_cli(self, command: list[str], environment: dict[str, str]) -> None:
        executable = str(RABBITMQ_SCRIPTS / command[0])
        result = subprocess.run(
            [executable, *command[1:]],
            env=environment,
            cwd=self.folder,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise SetupError(
                f"`{' '.join(command)}` failed with exit code {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )


@contextlib.contextmanager
def _epmd_port_conflict_as_port_in_use(epmd: ManagedProcess, port: int) -> Iterator[None]:
    """Turn epmd's silent exit on a taken port into PortInUseError.

    epmd exits with code 0 and no message when its port is taken, because it
    takes the other listener for an epmd that already runs.
    """
    try:
        yield
    except PortInUseError:
        raise
    except SetupError as error:
        if epmd.exit_code() == 0:
            raise PortInUseError(f"epmd exited at once, so port {port} is taken.") from error
        raise


def _is_amqp_listener_running(broker: Broker) -> bool:
    """Return whether the node reports its AMQP listener on `broker.amqp_port`.

    The management API responds before the AMQP listener starts, and a plain
    connect would also succeed against another process holding the port.
    """
    try:
        with broker.management_session() as session:
            response = session.get(f"{broker.management_url}/api/overview", timeout=1.0)
        if response.status_code != 200:
            return False
        listeners = response.json().get("listeners", [])
    except (requests.RequestException, ValueError):
        return False
    return any(
        listener.get("protocol") == "amqp" and listener.get("port") == broker.amqp_port
        for listener in listeners
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""
