"""What the bundle modules share: a bundle's file names, the limits of its small files and its
sample, and the readers that check a bundle's JSON and ``.npz`` files (one UserError naming the
file when one is damaged)."""

from __future__ import annotations

import json
import math
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from qkd_deploy.data.preprocess import Preprocess
from qkd_deploy.errors import UserError

FORMAT = "qkd-deploy-bundle/1"
MANIFEST = "manifest.json"
SIGNATURE = "signature.json"  # only in a signed bundle; it cannot list itself in the manifest
# every file of a bundle except the manifest, which lists them, and the optional signature
CONTENTS = (
    "model.onnx",
    "labels.json",
    "preprocess.json",
    "expected.json",
    "sample.npz",
    "BUILD.md",
)
# Reading limits of single files (an archive's: extract.py).
MAX_SMALL_FILE_BYTES = 2**20  # manifest.json, signature.json, expected.json, a key file
MAX_SAMPLE_BYTES = 64 * 2**20  # sample.npz's arrays: 16 images, their labels and logits
DAMAGED = "the bundle is damaged or was edited; make it again with qkd-deploy bundle"
NUMBER = (int, float)


def read_json(path: Path, hint: str) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path} not found; {hint}")
    size = path.stat().st_size
    if size > MAX_SMALL_FILE_BYTES:
        raise UserError(f"{path} is {size} bytes, too large for a bundle's JSON file; {hint}")
    return parse_json(path.read_bytes(), path, hint)


def parse_json(data: bytes, path: Path, hint: str) -> dict[str, Any]:
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); {hint}") from None
    if not isinstance(parsed, dict):
        raise UserError(f"{path} is not a JSON object; {hint}")
    return parsed


def required_field(data: dict[str, Any], key: str, kind: Any, where: Path) -> Any:
    """``data[key]``, which must be there and of ``kind`` (a bool is not a number)."""
    if key not in data:
        raise UserError(f"{where} lacks {key!r}; {DAMAGED}")
    value = data[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, NUMBER)):
        shown = json.dumps(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise UserError(f"{where}: {key} is {shown}, of the wrong type; {DAMAGED}")
    return value


def check_manifest(manifest: dict[str, Any], where: Path) -> dict[str, Any]:
    """The manifest's format, student and file list (plain names, each with its sha256 and size)."""
    if manifest.get("format") != FORMAT:
        raise UserError(f"{where}: not a {FORMAT} manifest; {DAMAGED}")
    required_field(manifest, "student", str, where)
    files = required_field(manifest, "files", dict, where)
    for name, entry in files.items():
        if name in ("", ".", "..") or PurePosixPath(name).name != name or "\\" in name:
            raise UserError(f"{where}: lists {name!r}, which is not a file name; {DAMAGED}")
        required_field(
            entry if isinstance(entry, dict) else {}, "sha256", str, Path(f"{where}: {name}")
        )
        size = required_field(entry, "bytes", int, Path(f"{where}: {name}"))
        if size < 0:
            raise UserError(f"{where}: {name} has {size} bytes; {DAMAGED}")
    return manifest


def load_npz(path: Path, names: tuple[str, ...], fix: str) -> dict[str, np.ndarray]:
    """The arrays ``names`` of an ``.npz`` without pickles, each checked before it is allocated:
    at most ``MAX_SAMPLE_BYTES`` and no larger than its header says; anything else is one
    UserError naming the file and ``fix``."""
    size = path.stat().st_size
    if size > MAX_SAMPLE_BYTES:
        raise UserError(f"{path} is {size} bytes, more than a sample holds; {fix}")
    try:
        with zipfile.ZipFile(path) as archive:
            stored = {info.filename: info for info in archive.infolist()}
            for name in names:
                info = stored.get(f"{name}.npy")
                if info is None:
                    raise UserError(f"{path} holds no array {name!r}; {fix}")
                _check_npy_header(archive, info, path, fix)
        with np.load(path, allow_pickle=False) as sample:
            return {name: sample[name] for name in names}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error) as error:
        raise UserError(f"{path} is not an .npz of plain arrays ({error}); {fix}") from None


def _check_npy_header(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, fix: str
) -> None:
    """The member's shape and dtype fit the bytes it stores (numpy allocates what the header
    says before it reads), and hold no Python objects."""
    if info.file_size > MAX_SAMPLE_BYTES:
        raise UserError(f"{path}: {info.filename} is {info.file_size} bytes, too large; {fix}")
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(version)
        if read_header is None:
            raise UserError(f"{path}: {info.filename} has .npy version {version}; {fix}")
        shape, _, dtype = read_header(member)
    if dtype.hasobject or math.prod(shape) * dtype.itemsize > info.file_size:
        raise UserError(
            f"{path}: {info.filename} declares {dtype} {shape}, more than it stores or Python "
            f"objects; {fix}"
        )


def check_labels(labels: np.ndarray, count: int, path: Path, fix: str) -> None:
    if labels.shape != (count,) or labels.dtype.kind not in "iu":
        raise UserError(
            f"{path}: labels are {labels.dtype} {labels.shape}, not {count} integers; {fix}"
        )


def read_preprocess(spec: Any, file: Path, fix: str) -> Preprocess:
    try:
        return Preprocess.from_dict(spec)
    except (UserError, TypeError, ValueError) as error:
        raise UserError(f"{file}: {error}; {fix}") from None


def check_result(name: str, passed: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "passed": bool(passed), "detail": detail}
