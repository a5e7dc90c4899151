"""Small file helpers."""

import os
from pathlib import Path


def write_private_text(path: Path, text: str) -> None:
    """Write a file that only its owner may read, because it contains keys or passwords."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
    # os.open applies the mode only when it creates the file.
    path.chmod(0o600)
