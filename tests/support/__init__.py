"""Helpers for tests that run against the local control plane and broker.

Import them as `from support import wait_for, apply_manifest`; tests/conftest.py
puts this folder's parent on sys.path.
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

# Kubernetes object names and vhost names built by `unique_name` stay within
# the 63 characters of a DNS-1123 label.
NAME_PREFIX_MAX = 50


def wait_for(
    predicate: Callable[[], T | None],
    timeout_seconds: float,
    interval_seconds: float = 0.2,
    message: str = "condition not met",
    *,
    ignored_exceptions: tuple[type[BaseException], ...] = (),
) -> T:
    """Call `predicate` until it returns a truthy value, and return that value.

    Raises AssertionError with `message` and the last value returned when
    `timeout_seconds` pass first. Exceptions of the types in
    `ignored_exceptions` count as a falsy result; others propagate at once.
    """
    deadline = time.monotonic() + timeout_seconds
    last: object = None
    while True:
        try:
            value = predicate()
        except ignored_exceptions as error:
            last = error
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"{message} (timed out after {timeout_seconds:.1f} s; last value: {last!r})"
            )
        time.sleep(interval_seconds)


def unique_name(prefix: str) -> str:
    """Return `prefix` made DNS-1123 safe plus a random suffix, e.g. "crd-test-3f9a1c"."""
    slug = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-")[:NAME_PREFIX_MAX].strip("-")
    return f"{slug or 'test'}-{uuid.uuid4().hex[:6]}"


class KubectlError(subprocess.CalledProcessError):
    """kubectl exited with a non-zero code; the message includes its stderr."""

    def __str__(self) -> str:
        command = " ".join(str(part) for part in self.cmd)
        return f"`{command}` failed with exit code {self.returncode}:\n{self.stderr}"


class Kubectl:
    """Runs kubectl with a fixed kubeconfig; called as `kubectl("get", "pods")`."""

    def __init__(self, executable: Path, kubeconfig: Path) -> None:
        self.executable = executable
        self.kubeconfig = kubeconfig

    def __call__(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl with `args` and return its output as text.

        Raises KubectlError, whose message includes stderr, when `check` is
        set and kubectl fails.
        """
        command = [str(self.executable), f"--kubeconfig={self.kubeconfig}", *args]
        result = subprocess.run(
            command, input=input, capture_output=True, text=True, timeout=120, check=False
        )
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, command, result.stdout, result.stderr)
        return result


def apply_manifest(
    kubectl: Callable[..., subprocess.CompletedProcess[str]],
    manifest: str | dict[str, Any] | Sequence[dict[str, Any]],
    namespace: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Apply YAML text, one object as a dict, or a list of dicts with `kubectl apply`.

    With `namespace`, namespaced objects without their own namespace go there.
    """
    if isinstance(manifest, str):
        text = manifest
    elif isinstance(manifest, dict):
        text = yaml.safe_dump(manifest)
    else:
        text = yaml.safe_dump_all(list(manifest))
    args = ["apply", "-f", "-"]
    if namespace is not None:
        args += ["--namespace", namespace]
    return kubectl(*args, input=text)
