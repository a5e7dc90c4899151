"""Measure how long a warm `make env-up` takes until the servers are ready.

"Warm" means the binaries are already built and RabbitMQ is installed; both
are set up once before the first measurement. Each run starts servers in a
fresh temporary state folder, so the shared `.local` environment is never
touched. Three figures per run, in seconds:

- control plane: etcd, kube-apiserver and kube-controller-manager started
  until /readyz returns ok;
- broker: epmd and RabbitMQ started until the AMQP listener runs;
- env-up: both at once, as `python -m openchecker_testenv up` starts them,
  until both are ready and kubeconfig and env are written.

Usage: python bench/env_up.py [--runs N]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from openchecker_testenv import environment
from openchecker_testenv.binaries import ASSETS_VARIABLE, ControlPlaneBinaries, resolve_binaries
from openchecker_testenv.broker import AMQP_URL_VARIABLE
from openchecker_testenv.controlplane import LocalControlPlane
from openchecker_testenv.layout import StateLayout
from openchecker_testenv.rabbitmq import LocalRabbitMQ, ensure_rabbitmq_installed

COLUMNS = ("control plane", "broker", "env-up")


def time_control_plane(folder: Path, binaries: ControlPlaneBinaries) -> float:
    local = LocalControlPlane(StateLayout(folder), binaries)
    started = time.monotonic()
    try:
        local.start()
        return time.monotonic() - started
    finally:
        local.stop()


def time_broker(folder: Path) -> float:
    local = LocalRabbitMQ(StateLayout(folder))
    started = time.monotonic()
    try:
        local.start()
        return time.monotonic() - started
    finally:
        local.stop()


def time_env_up(folder: Path) -> float:
    layout = StateLayout(folder)
    started = time.monotonic()
    try:
        environment.up(layout)
        return time.monotonic() - started
    finally:
        environment.down(layout)


def run_once(binaries: ControlPlaneBinaries) -> tuple[float, float, float]:
    measurements: list[Callable[[Path], float]] = [
        lambda folder: time_control_plane(folder, binaries),
        time_broker,
        time_env_up,
    ]
    seconds = []
    for measure in measurements:
        with tempfile.TemporaryDirectory(prefix="openchecker-bench-") as folder:
            seconds.append(measure(Path(folder)))
    return seconds[0], seconds[1], seconds[2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="number of runs (default: 3)")
    parser.add_argument("--verbose", action="store_true", help="show the environment's logs")
    arguments = parser.parse_args()
    if arguments.runs < 1:
        parser.error(f"--runs must be at least 1, got {arguments.runs}")
    logging.basicConfig(level=logging.INFO if arguments.verbose else logging.WARNING)

    # The benchmark always measures the local broker, never an external one.
    os.environ.pop(AMQP_URL_VARIABLE, None)
    binaries = resolve_binaries()
    # `up` reads the binaries from here, so it does not rerun the build script
    # inside the measured time.
    os.environ[ASSETS_VARIABLE] = str(binaries.folder)
    ensure_rabbitmq_installed()

    machine = f"{os.cpu_count()} CPUs, {platform.platform()}"
    print(f"Machine: {machine}, Python {platform.python_version()}")
    print(f"Binaries: {binaries.folder}")
    print(f"{'run':>6}  " + "  ".join(f"{column + ' (s)':>17}" for column in COLUMNS))
    results: list[tuple[float, float, float]] = []
    for run in range(1, arguments.runs + 1):
        result = run_once(binaries)
        results.append(result)
        print(f"{run:>6}  " + "  ".join(f"{value:>17.1f}" for value in result), flush=True)

    for label, pick in (("median", statistics.median), ("max", max)):
        values = [pick([result[index] for result in results]) for index in range(len(COLUMNS))]
        print(f"{label:>6}  " + "  ".join(f"{value:>17.1f}" for value in values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
