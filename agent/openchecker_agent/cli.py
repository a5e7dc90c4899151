"""`openchecker-agent`: run the consumer, the health server and the signal handling.

Exit codes: 0 after a clean stop (SIGTERM or SIGINT), 1 when the consumer
crashed, 2 for an invalid configuration, 3 when the broker refused the
credentials or access to the vhost or queue.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from .checks import stop_running_commands
from .config import AgentSettings, load_settings
from .consumer import Consumer
from .errors import ConfigError, FatalBrokerError
from .handlers import Handler, load_handler
from .health import HealthServer
from .metrics import AgentMetrics

logger = logging.getLogger(__name__)

# pika's loggers of the connection workflow; see _configure_logging.
QUIET_PIKA_LOGGERS = (
    "pika.adapters.blocking_connection",
    "pika.adapters.utils.connection_workflow",
    "pika.adapters.utils.io_services_utils",
)

EXIT_OK = 0
EXIT_CRASHED = 1
EXIT_CONFIG_ERROR = 2
EXIT_ACCESS_REFUSED = 3
DEFAULT_CONFIG = Path("/app/config/config.ini")
# How often the main thread checks for a received signal and the consumer's end.
MAIN_LOOP_SECONDS = 0.2


def main(argv: list[str] | None = None) -> int:
    """Run the agent until a signal stops it; return the process exit code."""
    arguments = _parse_arguments(argv)
    _configure_logging(arguments.log_level)
    try:
        settings = load_settings(arguments.config)
        handler = load_handler(settings.agent.handler, source=settings.source)
    except ConfigError as error:
        # One line on stderr is the whole report: the operator's pod events
        # and `kubectl logs` show it as is.
        print(f"openchecker-agent: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    return run_agent(settings, handler)


def run_agent(settings: AgentSettings, handler: Handler) -> int:
    """Run the consumer in its own thread until it stops; return the exit code."""
    metrics = AgentMetrics()
    consumer = Consumer(settings, handler, metrics)
    failure: list[BaseException] = []
    thread = threading.Thread(
        target=_run_consumer, args=(consumer, failure), name="agent-consumer", daemon=True
    )
    health = _start_health_server(settings, consumer, thread, metrics)
    received: list[int] = []
    _install_signal_handlers(received)
    thread.start()
    stop_requested = False
    while thread.is_alive():
        thread.join(MAIN_LOOP_SECONDS)
        if received and not stop_requested:
            logger.info(
                "Received %s; no new messages are taken, running tasks get up to %.0f s.",
                signal.Signals(received[0]).name,
                settings.agent.drain_timeout_s,
            )
            consumer.request_stop()
            stop_requested = True
    if health is not None:
        health.stop()
    killed = stop_running_commands()
    if killed:
        logger.warning("Killed %d command(s) of tasks that were requeued unfinished.", killed)
    return _exit_code(failure)


def _run_consumer(consumer: Consumer, failure: list[BaseException]) -> None:
    try:
        consumer.run()
    except BaseException as error:
        # Reported by the main thread, which turns it into the exit code.
        failure.append(error)


def _exit_code(failure: list[BaseException]) -> int:
    if not failure:
        logger.info("Agent stopped.")
        return EXIT_OK
    error = failure[0]
    if isinstance(error, FatalBrokerError):
        logger.error("Agent stopped: %s", error)
        return EXIT_ACCESS_REFUSED
    logger.error("Agent crashed.", exc_info=error)
    return EXIT_CRASHED


def _start_health_server(
    settings: AgentSettings, consumer: Consumer, thread: threading.Thread, metrics: AgentMetrics
) -> HealthServer | None:
    if settings.agent.health_port == 0:
        return None
    health = HealthServer(
        settings.agent.health_bind_address,
        settings.agent.health_port,
        is_alive=thread.is_alive,
        is_ready=lambda: consumer.is_consuming,
        registry=metrics.registry,
    )
    health.start()
    return health


def _install_signal_handlers(received: list[int]) -> None:
    # The handler only records the signal: the main thread acts on it outside
    # signal context, where taking pika's and the pool's locks is safe.
    def record(signal_number: int, _frame: FrameType | None) -> None:
        received.append(signal_number)

    signal.signal(signal.SIGTERM, record)
    signal.signal(signal.SIGINT, record)


def _parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="openchecker-agent",
        description="Consume check requests from RabbitMQ and run them.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help=f"path of the config.ini file (default: {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help=(
            "the agent's log level (default: INFO); pika logs at WARNING and above, "
            "except for failed connection attempts, which the agent logs itself"
        ),
    )
    return parser.parse_args(argv)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pika logs every connection step at INFO; the agent logs the ones that matter.
    logging.getLogger("pika").setLevel(logging.WARNING)
    # A failed connection attempt makes these log five ERROR lines and a
    # traceback; the agent logs the attempt and its cause in one line instead.
    for name in QUIET_PIKA_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
