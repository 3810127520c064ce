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


# A cache entry (a pretrained source model, a converted dataset) is built in a temporary folder, gets this manifest
# last and is then renamed into place; before every reuse its files are checked against it. Without it, a damaged
# entry was used as it was: one flipped bit in a cached source model's weights, or in a converted molecule's atom type
# (a valid type still), trained on without a word.
CACHE_MANIFEST = "headprep_cache_manifest.json"


def write_cache_manifest(folder: str | os.PathLike) -> None:
    """Record the size and sha256 of every file under `folder` in its `CACHE_MANIFEST` (call it last)."""
    root = os.fspath(folder)
    files = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, root).replace(os.sep, "/")
            if relative != CACHE_MANIFEST:
                files[relative] = {"size": os.path.getsize(path), "sha256": file_sha256(path)}
    write_json(os.path.join(root, CACHE_MANIFEST), {"format": 1, "files": dict(sorted(files.items()))})


def cache_entry_problem(folder: str | os.PathLike) -> str | None:
    """None when every file `folder`'s manifest lists is there with its size and sha256; else what is wrong, naming
    the file (an entry without a manifest was interrupted before it was complete, or written by a version before
    entries were checked)."""
    root = os.fspath(folder)
    path = os.path.join(root, CACHE_MANIFEST)
    if not os.path.isfile(path):
        return f"{root} has no {CACHE_MANIFEST} (incomplete, or written by an earlier headprep_hf version)"
    try:
        files = read_json(path)["files"]
        entries = [(name, int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        return f"{path} is not a readable manifest ({error})"
    for name, size, sha in entries:
        file = os.path.join(root, *name.split("/"))
        try:
            if not os.path.isfile(file):
                return f"{file} is missing"
            if os.path.getsize(file) != size:
                return f"{file} has {os.path.getsize(file)} bytes where {size} were written"
            if file_sha256(file) != sha:
                return f"{file} differs from what was written (sha256)"
        except OSError as error:  # (another process moved the entry aside while it was read)
            return f"{file} could not be read ({error})"
    return None
