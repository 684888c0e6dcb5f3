"""Atomic file writes and hashing (torch-free).

Every artefact is written to a temporary file in the destination folder and renamed into place, so
a killed run never leaves a half-written file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and rename the temporary file to ``path`` once it succeeded, with
    the permissions a plain ``open`` would give it (the temporary file is private)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_onnx_graph(path: str | os.PathLike) -> Any:
    """The ``onnx.ModelProto`` in ``path`` without external weight data (enough to inspect the
    graph); a missing or unreadable file is one UserError naming it."""
    import onnx

    from qkd_deploy.errors import UserError

    file = Path(path)
    if not file.is_file():
        raise UserError(f"{path}: no such model file; pass the path of an .onnx model")
    try:
        return onnx.load(str(file), load_external_data=False)
    except Exception as error:  # protobuf DecodeError, OSError, ...
        raise UserError(
            f"{path}: cannot read it as ONNX ({type(error).__name__}: {error}); "
            "pass a valid .onnx model"
        ) from error
