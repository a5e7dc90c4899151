"""Write kubeconfig files, and read the credentials out of one."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import yaml

from .errors import SetupError
from .files import write_private_text

CONTEXT_NAME = "openchecker-local"


def _encode(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _write(path: Path, server: str, ca_file: Path, user: dict[str, str]) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": CONTEXT_NAME,
                "cluster": {"server": server, "certificate-authority-data": _encode(ca_file)},
            }
        ],
        "users": [{"name": CONTEXT_NAME, "user": user}],
        "contexts": [
            {"name": CONTEXT_NAME, "context": {"cluster": CONTEXT_NAME, "user": CONTEXT_NAME}}
        ],
        "current-context": CONTEXT_NAME,
    }
    write_private_text(path, yaml.safe_dump(config, sort_keys=False))
    return path


def write_certificate_kubeconfig(
    path: Path, *, server: str, ca_file: Path, cert_file: Path, key_file: Path
) -> Path:
    """Write a self-contained kubeconfig that authenticates with a client certificate."""
    user = {"client-certificate-data": _encode(cert_file), "client-key-data": _encode(key_file)}
    return _write(path, server, ca_file, user)


def write_token_kubeconfig(path: Path, *, server: str, ca_file: Path, token: str) -> Path:
    """Write a self-contained kubeconfig that authenticates with a bearer token."""
    return _write(path, server, ca_file, {"token": token})


def extract_credentials(kubeconfig: Path, folder: Path) -> tuple[str, Path, Path, Path]:
    """Write the current context's CA, client certificate and key into `folder`.

    Returns the server URL and the three file paths. Only embedded `*-data`
    fields are supported, which is what K3s writes.
    """
    config: dict[str, Any] = yaml.safe_load(kubeconfig.read_text())
    try:
        context_name = config["current-context"]
        context = _named(config["contexts"], context_name)["context"]
        cluster = _named(config["clusters"], context["cluster"])["cluster"]
        user = _named(config["users"], context["user"])["user"]
        fields = {
            "ca.crt": cluster["certificate-authority-data"],
            "client.crt": user["client-certificate-data"],
            "client.key": user["client-key-data"],
        }
        server = str(cluster["server"])
    except (KeyError, TypeError) as error:
        raise SetupError(
            f"{kubeconfig} has no embedded CA, client certificate or key ({error!r}); "
            "only kubeconfigs with *-data fields are supported."
        ) from error
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in fields.items():
        path = folder / name
        path.write_bytes(base64.b64decode(data))
        paths.append(path)
    return server, paths[0], paths[1], paths[2]


def _named(entries: list[dict[str, Any]], name: str) -> dict[str, Any]:
    for entry in entries:
        if entry.get("name") == name:
            return entry
    raise KeyError(name)
