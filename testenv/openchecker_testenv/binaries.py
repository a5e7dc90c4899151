"""Find or build etcd, kube-apiserver, kube-controller-manager and kubectl."""

from __future__ import annotations

import collections
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .errors import SetupError
from .layout import find_repository_root

logger = logging.getLogger(__name__)

ASSETS_VARIABLE = "KUBEBUILDER_ASSETS"
BUILD_SCRIPT = Path("hack") / "build-control-plane.sh"


@dataclass(frozen=True)
class ControlPlaneBinaries:
    """Executables of the local control plane."""

    folder: Path
    etcd: Path
    kube_apiserver: Path
    # None when the folder has none; the control plane then runs without
    # garbage collection and workload controllers.
    kube_controller_manager: Path | None

    @classmethod
    def from_folder(cls, folder: Path) -> ControlPlaneBinaries:
        controller_manager = folder / "kube-controller-manager"
        return cls(
            folder=folder,
            etcd=folder / "etcd",
            kube_apiserver=folder / "kube-apiserver",
            kube_controller_manager=controller_manager if controller_manager.is_file() else None,
        )


def _contains_required_binaries(folder: Path) -> bool:
    return (folder / "etcd").is_file() and (folder / "kube-apiserver").is_file()


def resolve_binaries(build_log: Path | None = None) -> ControlPlaneBinaries:
    """Return the control plane binaries from $KUBEBUILDER_ASSETS or from a build.

    Without KUBEBUILDER_ASSETS this runs hack/build-control-plane.sh, which
    returns at once when its cache is filled and builds for minutes otherwise.
    The build output goes to `build_log` when given, else to stderr.
    Raises SetupError when KUBEBUILDER_ASSETS lacks a binary or the build fails.
    """
    assets = os.environ.get(ASSETS_VARIABLE)
    if assets:
        folder = Path(assets).resolve()
        if not _contains_required_binaries(folder):
            raise SetupError(
                f"{ASSETS_VARIABLE}={assets} does not contain both etcd and kube-apiserver. "
                f"Point it at a folder that has them, or unset it to build them with "
                f"{BUILD_SCRIPT}."
            )
        logger.info("Using control plane binaries from %s=%s.", ASSETS_VARIABLE, folder)
    else:
        folder = build_binaries(build_log)
    binaries = ControlPlaneBinaries.from_folder(folder)
    if binaries.kube_controller_manager is None:
        logger.warning(
            "%s has no kube-controller-manager, so the control plane runs without it: "
            "garbage collection, ReplicaSets and namespace deletion will not work.",
            folder,
        )
    return binaries


def build_binaries(build_log: Path | None = None) -> Path:
    """Run the build script and return the folder it prints on its last line."""
    root = find_repository_root()
    if root is None:
        raise SetupError(
            f"{BUILD_SCRIPT} was not found because openchecker_testenv is not running from "
            f"a checkout. Set {ASSETS_VARIABLE} to a folder containing etcd, kube-apiserver "
            "and kube-controller-manager."
        )
    script = root / BUILD_SCRIPT
    logger.info("Running %s, which builds what is not cached (minutes on a first run).", script)
    if build_log is not None:
        build_log.parent.mkdir(parents=True, exist_ok=True)
        with build_log.open("a") as output:
            code, stdout, tail = _run_and_echo(script, output)
    else:
        code, stdout, tail = _run_and_echo(script, sys.stderr)
    if code != 0:
        where = f"\nThe full output is in {build_log}." if build_log is not None else ""
        raise SetupError(f"{script} failed with exit code {code}. Its last lines:\n{tail}{where}")
    lines = stdout.strip().splitlines()
    folder = Path(lines[-1]) if lines else None
    if folder is None or not _contains_required_binaries(folder):
        raise SetupError(
            f"{script} succeeded but its last line {lines[-1:]} is not a folder containing "
            "etcd and kube-apiserver."
        )
    return folder


def _run_and_echo(script: Path, output: TextIO) -> tuple[int, str, str]:
    """Run `script`, copy its stderr to `output` as it comes, and return the exit
    code, the whole stdout and the last 20 lines of stderr."""
    tail: collections.deque[str] = collections.deque(maxlen=20)
    process = subprocess.Popen(
        ["bash", str(script)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None and process.stdout is not None
    for line in process.stderr:
        output.write(line)
        output.flush()
        tail.append(line.rstrip("\n"))
    stdout = process.stdout.read()
    return process.wait(), stdout, "\n".join(tail)


def find_kubectl(binaries_folder: Path | None = None) -> Path:
    """Return the kubectl on PATH, else the one the build script put next to the
    other binaries."""
    on_path = shutil.which("kubectl")
    if on_path is not None:
        return Path(on_path)
    if binaries_folder is not None and (binaries_folder / "kubectl").is_file():
        return binaries_folder / "kubectl"
    raise SetupError(
        "kubectl is not on PATH. Install it, or run `make binaries` with no kubectl on "
        "PATH so that the build script builds one."
    )
