"""Small file helpers shared by the modules that write JSON next to checkpoints and results."""

from __future__ import annotations

import hashlib
import json
import os


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write `data` as indented JSON to `path` through a temporary file and a rename (no reader sees half a file)."""
    write_text_atomic(path, json.dumps(data, indent=2))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file, fsynced before the rename: no reader sees half a file, and
    a power loss leaves the old file or the new one (without the fsync, some file systems commit the rename first
    and leave an empty file)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> dict:
    """The JSON content of `path`; a `ValueError` naming the file when it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"{os.fspath(path)} is missing or not readable JSON ({error}).") from error


def read_safetensors(path: str | os.PathLike) -> dict:
    """The tensors of safetensors file `path`; a `ValueError` naming the file when it is missing or damaged (a file of
    another format, e.g. a pickle, is refused, never executed)."""
    from safetensors.torch import load_file

    try:
        return load_file(os.fspath(path))
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{os.fspath(path)} is missing or not a readable safetensors file ({error}).") from error


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in blocks of 1 MiB."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
