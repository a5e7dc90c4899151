"""Command line entry point: `python -m openchecker_operator` or `openchecker-operator`."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

import kopf
from pydantic import ValidationError

from .settings import OperatorSettings

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the operator's command-line options."""
    parser = argparse.ArgumentParser(
        prog="openchecker-operator",
        description="Run the operator of OpenCheckQueue resources. Options override the "
        "OPENCHECKER_OPERATOR_* environment variables of the same name.",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        dest="namespaces",
        metavar="NAMESPACE",
        help="serve resources in this namespace; repeat for several (glob patterns allowed)",
    )
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true", default=None, help="serve every namespace"
    )
    parser.add_argument(
        "--standalone",
        action="store_true",
        default=None,
        help="run without peering with other operator instances",
    )
    parser.add_argument(
        "--liveness",
        dest="liveness_endpoint",
        metavar="URL",
        help="serve kopf's liveness probe at this URL, e.g. http://0.0.0.0:8080/healthz",
    )
    parser.add_argument(
        "--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level"
    )
    return parser


def load_settings(argv: Sequence[str] | None = None) -> OperatorSettings:
    """Return the settings from the environment, overridden by command-line options.

    Exits with status 2 and a message for invalid options or environment values.
    """
    parser = build_parser()
    arguments = parser.parse_args(argv)
    overrides = {key: value for key, value in vars(arguments).items() if value is not None}
    if "namespaces" in overrides:
        overrides["namespaces"] = tuple(overrides["namespaces"])
        overrides["all_namespaces"] = False
    elif overrides.get("all_namespaces"):
        overrides["namespaces"] = ()
    try:
        settings = OperatorSettings(**overrides)
    except ValidationError as error:
        parser.error(f"invalid settings: {error}")
    if not settings.namespaces and not settings.all_namespaces:
        parser.error("give --namespace (repeatable) or --all-namespaces")
    return settings


def main(argv: Sequence[str] | None = None) -> None:
    """Set up logging and run the operator until it is stopped."""
    settings = load_settings(argv)
    # log_prefix puts "[namespace/name]" before kopf's per-resource lines, such
    # as "Handler 'create_queue' failed temporarily", which name no resource.
    kopf.configure(
        verbose=settings.log_level == "DEBUG",
        quiet=settings.log_level in ("WARNING", "ERROR"),
        log_prefix=True,
    )
    logging.getLogger().setLevel(settings.log_level)
    # pika logs every channel and socket step at INFO; the operator logs
    # its own connection opens and failures.
    logging.getLogger("pika").setLevel(max(logging.WARNING, logging.getLogger().level))
    logger.info(
        "Starting openchecker-operator for %s.",
        "all namespaces" if settings.all_namespaces else ", ".join(settings.namespaces),
    )

    # Importing the handlers registers them with kopf's default registry.
    from . import handlers  # noqa: F401

    kopf.run(
        standalone=settings.standalone,
        clusterwide=settings.all_namespaces,
        namespaces=settings.namespaces,
        liveness_endpoint=settings.liveness_endpoint,
        memo=kopf.Memo(settings=settings),
    )
    logger.info("openchecker-operator stopped.")


if __name__ == "__main__":
    main()
