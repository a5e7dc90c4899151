"""Command line: `python -m openchecker_testenv up|down|status|binaries`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from . import environment
from .binaries import resolve_binaries
from .errors import SetupError
from .layout import STATE_DIR_VARIABLE, StateLayout, default_state_dir

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m openchecker_testenv",
        description="Run a local kube-apiserver, etcd, kube-controller-manager and RabbitMQ "
        "for development and tests.",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help=f"folder for kubeconfig, env, logs and pid records "
        f"(default: ${STATE_DIR_VARIABLE}, else .local in the checkout)",
    )
    parser.add_argument("--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="start everything, or keep it when already running")
    commands.add_parser("down", help="stop everything that up started")
    commands.add_parser("status", help="show each server; exit code 1 when one is down")
    commands.add_parser(
        "binaries", help="build or find etcd, kube-apiserver and kube-controller-manager"
    )
    return parser


def _exit_on_sigterm(signal_number: int, frame: FrameType | None) -> None:
    # SystemExit unwinds like Ctrl-C, so a half-finished `up` stops what it
    # started instead of leaving it to the next run's cleanup.
    logger.error("Received SIGTERM; exiting.")
    raise SystemExit(128 + signal_number)


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    arguments = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if arguments.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    layout = StateLayout((arguments.state_dir or default_state_dir()).resolve())
    try:
        return _run(arguments.command, layout)
    except SetupError as error:
        logger.error("%s", error)
        return 1
    except KeyboardInterrupt:
        logger.error("Interrupted; run `python -m openchecker_testenv down` if servers remain.")
        return 130


def _run(command: str, layout: StateLayout) -> int:
    if command == "up":
        state = environment.up(layout)
        print(f"kube-apiserver: {state.control_plane.server}")
        print(f"RabbitMQ management: {state.broker.management_url}")
        print(f"kubeconfig: {state.control_plane.kubeconfig}")
        print(f"Load the variables with: source {layout.env_file}")
        return 0
    if command == "down":
        environment.down(layout)
        return 0
    if command == "status":
        healthy, lines = environment.describe_status(layout)
        print("\n".join(lines))
        return 0 if healthy else 1
    if command == "binaries":
        print(resolve_binaries().folder)
        return 0
    raise AssertionError(f"unknown command {command!r}")


if __name__ == "__main__":
    sys.exit(main())
