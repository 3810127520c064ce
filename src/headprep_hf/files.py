"""Small file helpers shared by the modules that write JSON next to checkpoints and results."""

from __future__ import annotations

import json
import os


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write `data` as indented JSON to `path` through a temporary file and a rename (no reader sees half a file)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
