"""The TensorRT engine sidecar ``<engine>.json``: what an engine was built with, and the check
that refuses an engine on a device it was not built for (torch-free, TensorRT-free).

TensorRT engines are not portable between GPUs or TensorRT versions (TensorRT Developer Guide,
"Engine Compatibility"), so ``qkd-deploy build-engine`` records the TensorRT version, GPU and
compute capability next to the engine, and the runner compares them before deserialising.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from qkd_deploy.errors import UserError
from qkd_deploy.fileio import atomic_write_json

REQUIRED_KEYS = (
    "tensorrt_version",
    "gpu_name",
    "compute_capability",
    "precision",
    "input_name",
    "input_shapes",
    "onnx_sha256",
    "engine_sha256",
    "created",
)
REBUILD = "rebuild the engine on this device: qkd-deploy build-engine MODEL.onnx --out ENGINE"


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    """``model.engine`` -> ``model.engine.json`` (appended, so two engines never share one)."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def write_sidecar(engine_path: str | os.PathLike, info: dict[str, Any]) -> dict[str, Any]:
    """Write ``info`` atomically as the engine's sidecar (``created`` defaults to now, UTC)."""
    record = dict(info)
    record.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise ValueError(f"engine sidecar is missing {missing}")
    atomic_write_json(sidecar_path(engine_path), record)
    return record


def read_sidecar(engine_path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of ``engine_path``; a missing, unreadable or incomplete one is a UserError."""
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise UserError(
            f"{path} not found: an engine without its sidecar cannot be checked against this "
            f"device; {REBUILD}"
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read engine sidecar {path} ({error}); {REBUILD}") from None
    if not isinstance(record, dict):
        raise UserError(f"engine sidecar {path} is not a JSON object; {REBUILD}")
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise UserError(f"engine sidecar {path} lacks {missing}; {REBUILD}")
    return record


def check_compatible(
    sidecar: dict[str, Any],
    *,
    tensorrt_version: str,
    compute_capability: str,
    engine_sha256: str,
) -> None:
    """Raise one UserError listing every mismatch between the sidecar and this device/file.

    TensorRT versions are compared on major.minor.patch (``10.3.0.26`` equals ``10.3.0``).
    """
    mismatches = []
    built, here = str(sidecar["tensorrt_version"]), str(tensorrt_version)
    if _release(built) != _release(here):
        mismatches.append(f"TensorRT version {built} (engine) vs {here} (installed)")
    built, here = str(sidecar["compute_capability"]), str(compute_capability)
    if built != here:
        gpu = sidecar.get("gpu_name", "?")
        mismatches.append(
            f"compute capability {built} (engine, built on {gpu}) vs {here} (this GPU)"
        )
    built, here = str(sidecar["engine_sha256"]), str(engine_sha256)
    if built != here:
        mismatches.append(
            f"engine sha256 {built[:12]}... (sidecar) vs {here[:12]}... (file): the engine file "
            f"was replaced or damaged after it was built"
        )
    if mismatches:
        raise UserError(
            "the TensorRT engine does not match this device: "
            + "; ".join(mismatches)
            + ". TensorRT engines are not portable between GPUs or TensorRT versions; "
            + REBUILD
        )


def _release(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:3])
