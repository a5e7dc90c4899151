"""Command-line options of the demo."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..layout import find_repository_root


def default_plot_path() -> Path:
    """Return docs/demo.png in the checkout, else demo.png in the current folder."""
    root = find_repository_root()
    return root / "docs" / "demo.png" if root is not None else Path("demo.png")


@dataclass(frozen=True)
class DemoOptions:
    """Settings of one demo run: the messages, the scaling, and the servers to use."""

    messages: int
    # Seconds each successful check request keeps an agent busy.
    task_seconds: float
    max_replicas: int
    messages_per_replica: int
    poll_interval_seconds: int
    scale_down_stabilization_seconds: int
    # Seconds between two printed `kubectl get ocq` tables.
    table_interval_seconds: float
    timeout_seconds: float
    plot_path: Path
    # An existing environment: all three set, or none (then the demo uses
    # the `make env-up` environment and starts it when it is not running).
    kubeconfig: Path | None
    rabbitmq_url: str | None
    management_url: str | None
    # An existing namespace and vhost; by default the demo creates its own.
    namespace: str | None
    vhost: str | None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m openchecker_testenv.demo",
        description="Run the operator, a batch of check requests and local agents end to "
        "end on this machine, then print a summary.",
    )
    parser.add_argument(
        "--messages", type=int, default=60, help="check requests to publish (default: 60)"
    )

    parser.add_argument(
        "--task-seconds",
        type=float,
        default=2.0,
        help="seconds each successful check request runs (default: 2)",
    )

    parser.add_argument(
        "--max-replicas", type=int, default=6, help="spec.scaling.maxReplicas (default: 6)"
    )
    parser.add_argument(
        "--messages-per-replica",
        type=int,
        default=8,
        help="spec.scaling.messagesPerReplica (default: 8)",
    )
    parser.add_argument(
        "--poll-interval-seconds",
        type=int,
        default=2,
        help="spec.scaling.pollIntervalSeconds (default: 2)",
    )
    parser.add_argument(
        "--scale-down-stabilization-seconds",
        type=int,
        default=10,
        help="spec.scaling.scaleDownStabilizationSeconds (default: 10)",
    )

    parser.add_argument(
        "--table-interval-seconds",
        type=float,
        default=5.0,
        help="seconds between two printed `kubectl get ocq` tables (default: 5)",
    )
    parser.add_argument(
        "--timeout-seconds",
        type=float,
        default=600.0,
        help="give up when the queue has not drained and scaled down by then (default: 600)",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="where to write the PNG plot (default: docs/demo.png in the checkout)",
    )

    environment = parser.add_argument_group(
        "existing environment",
        "Use these servers instead of the `make env-up` environment; give all three.",
    )
    environment.add_argument("--kubeconfig", type=Path, help="an administrator's kubeconfig")
    environment.add_argument("--rabbitmq-url", help="amqp://user:password@host:port/")
    environment.add_argument("--management-url", help="http://host:port of the management API")
    parser.add_argument("--namespace", help="an existing namespace (default: create one)")
    parser.add_argument("--vhost", help="an existing vhost (default: create one)")
    return parser


def parse_options(argv: Sequence[str] | None = None) -> DemoOptions:
    """Parse and check the command line; exits with a usage message when it is invalid."""
    parser = build_parser()
    arguments = parser.parse_args(argv)
    environment = (arguments.kubeconfig, arguments.rabbitmq_url, arguments.management_url)
    if any(value is not None for value in environment) and None in environment:
        parser.error("--kubeconfig, --rabbitmq-url and --management-url go together")
    if arguments.messages < 1:
        parser.error(f"--messages must be at least 1, got {arguments.messages}")
    if arguments.max_replicas < 1:
        parser.error(f"--max-replicas must be at least 1, got {arguments.max_replicas}")
    if arguments.messages_per_replica < 1:
        parser.error(
            f"--messages-per-replica must be at least 1, got {arguments.messages_per_replica}"
        )
    return DemoOptions(
        messages=arguments.messages,
        task_seconds=arguments.task_seconds,
        max_replicas=arguments.max_replicas,
        messages_per_replica=arguments.messages_per_replica,
        poll_interval_seconds=arguments.poll_interval_seconds,
        scale_down_stabilization_seconds=arguments.scale_down_stabilization_seconds,
        table_interval_seconds=arguments.table_interval_seconds,
        timeout_seconds=arguments.timeout_seconds,
        plot_path=arguments.plot or default_plot_path(),
        kubeconfig=arguments.kubeconfig,
        rabbitmq_url=arguments.rabbitmq_url,
        management_url=arguments.management_url,
        namespace=arguments.namespace,
        vhost=arguments.vhost,
    )
