"""Making a bundle: one student of a run with its labels, preprocessing, expected outputs and
tolerances, its recipe and manifest, written as a folder and a ``.tar.gz`` of it; and removing
the bundles a new export made stale."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qkd_deploy.bench.accuracy import accuracy
from qkd_deploy.bench.report import BUNDLED, load_report
from qkd_deploy.deploy.bundle.files import (
    CONTENTS,
    FORMAT,
    MANIFEST,
    SIGNATURE,
    check_labels,
    load_npz,
    read_preprocess,
)
from qkd_deploy.deploy.bundle.logits import onnxruntime_logits
from qkd_deploy.deploy.bundle.recipe import build_recipe
from qkd_deploy.deploy.bundle.signing import sign_manifest
from qkd_deploy.deploy.engine import ModelInput, read_model_input
from qkd_deploy.errors import UserError
from qkd_deploy.fileio import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    sha256_file,
)
from qkd_deploy.rundir import SAMPLE_BATCH, library_versions

# ONNX Runtime on the device runs the same graph on the CPU: its integer Q/DQ arithmetic is
# exact (with 32-bit accumulation: ARM, x86 with VNNI), only float summation order may differ
# between CPUs.
ONNXRUNTIME_TOLERANCE = {"max_abs_error": 1e-4, "min_agreement": 1.0}
# Its fused integer kernels (run for an ``onnxruntime``-target model where they accumulate in 32
# bits) compute convs and GEMMs exactly, but QLinearAdd requantizes in its own float order, so
# an element on a rounding tie can land one step away (measured: 0.012 % of one Add's outputs
# in a tiny resnet8 W4A8, 0.004 on logits of at most 0.72). Allow 2 % of the largest |expected
# logit| and one flip in the 16 sample images (a judgement, as for TensorRT).
ONNXRUNTIME_FUSED_RELATIVE_ERROR = 0.02
# TensorRT fuses each DQ -> Conv -> Q chain into an INT8 kernel with its own requantization
# (scale products in another order, other kernels on each GPU), so an activation lying on a
# rounding boundary can land one quantization step away, and that error travels to the logits.
# A close call between two classes may then flip: allow one flip in the 16 sample images, and a
# logit error of 10 % of the largest |expected logit| (a judgement; not measured on a device).
TENSORRT_RELATIVE_ERROR = 0.1
TENSORRT_MIN_AGREEMENT = 15 / 16


@dataclass(frozen=True)
class Bundle:
    """What ``make_bundle`` wrote."""

    directory: Path
    archive: Path
    student: str


def select_student(report: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    """The student called ``name``, or by default the one with the fewest bits (w + a; the first
    of equals)."""
    students = report["students"]
    if not students:
        raise UserError("report.json lists no students; finish the run before bundling it")
    if name is None:
        return min(students, key=lambda s: s["w_bits"] + s["a_bits"])
    for student in students:
        if student["name"] == name:
            return student
    by_bits = [s for s in students if f"w{s['w_bits']}a{s['a_bits']}" == name.lower()]
    if len(by_bits) == 1:  # its bit-width, as --bits names it
        return by_bits[0]
    valid = ", ".join(s["name"] for s in students)
    raise UserError(f"report.json has no student {name!r}; valid --student names: {valid}")


def remove_stale_bundles(run_dir: str | os.PathLike) -> list[Path]:
    """Remove the bundles in ``run_dir`` (``bundle_*`` and their archives) whose model is no
    longer the run's exported model of their student, e.g. after ``qkd-deploy export --opset
    17``; the removed folders. Such a bundle would still pass ``verify``."""
    run_dir = Path(run_dir)
    report = _read_report(run_dir)
    current = {s["name"]: run_dir / s["onnx_path"] for s in report["students"]}
    stale = []
    for folder in sorted(p for p in run_dir.glob("bundle_*") if p.is_dir()):
        try:
            student = json.loads((folder / "expected.json").read_text())["student"]
            bundled = sha256_file(folder / "model.onnx")
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a bundle this run made
        model = current.get(student)
        if model is None or not model.is_file() or sha256_file(model) != bundled:
            shutil.rmtree(folder)
            archive_path(folder).unlink(missing_ok=True)
            stale.append(folder)
    return stale


def archive_path(directory: str | os.PathLike) -> Path:
    """``bundle_x`` -> ``bundle_x.tar.gz`` (next to the folder)."""
    directory = Path(directory)
    return directory.with_name(directory.name + ".tar.gz")


def make_bundle(
    run_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    student: str | None = None,
    sign_key: bytes | None = None,
) -> Bundle:
    """Write the bundle of one student of ``run_dir`` to ``out`` (default
    ``RUN_DIR/bundle_<student>``) and ``out.tar.gz``; signed with ``sign_key`` when given
    (``read_sign_key``).

    The folder is filled under a temporary name and renamed into place when complete; the archive
    is written atomically after it. An existing non-empty ``out`` (or archive) is never touched.
    """
    run_dir = Path(run_dir)
    report = _read_report(run_dir)
    entry = select_student(report, student)
    out = Path(out) if out is not None else run_dir / f"bundle_{entry['name']}"
    archive = archive_path(out)
    _refuse_existing(out, archive)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_contents(staging, run_dir, report, entry, signed=sign_key is not None)
        if sign_key is not None:
            atomic_write_json(staging / SIGNATURE, sign_manifest(staging / MANIFEST, sign_key))
        _make_readable(staging)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    atomic_write(archive, lambda tmp: _write_archive(out, tmp))
    return Bundle(out, archive, entry["name"])


def _read_report(run_dir: Path) -> dict[str, Any]:
    return load_report(run_dir / "report.json", BUNDLED)


def _refuse_existing(out: Path, archive: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; pass another --out or delete it")
    if archive.exists():
        raise UserError(f"{archive} already exists; pass another --out or delete it")


def _write_contents(
    folder: Path, run_dir: Path, report: dict[str, Any], entry: dict[str, Any], signed: bool
) -> None:
    """Every file of the bundle, then the manifest."""
    source = run_dir / entry["onnx_path"]
    if not source.is_file():
        raise UserError(f"{source} not found: the run of student {entry['name']} is incomplete")
    model_path = folder / "model.onnx"
    shutil.copyfile(source, model_path)
    model = read_model_input(model_path)
    images, labels = _read_sample(run_dir / SAMPLE_BATCH, model)
    preprocess = read_preprocess(report["preprocess"], run_dir / "report.json", "write it again")
    logits, output_name = onnxruntime_logits(
        model_path, preprocess.apply_numpy(images), optimize=False
    )
    precision = "int4" if _has_int4_weights(model_path) else "int8"

    atomic_write_json(folder / "labels.json", list(report["class_names"]))
    atomic_write_json(
        folder / "preprocess.json",
        {
            **preprocess.to_dict(),
            "formula": "(pixels / 255 - mean) / std, per channel, float32",
            "input_shape": list(model.chw),
            "input_name": model.name,
            "output_name": output_name,
        },
    )
    expected = _expected(report, entry, logits, labels, precision)
    atomic_write_json(folder / "expected.json", expected)
    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=labels, logits=logits)
    atomic_write_bytes(folder / "sample.npz", buffer.getvalue())
    atomic_write_text(folder / "BUILD.md", build_recipe(expected, model, signed))
    versions = library_versions()
    atomic_write_json(
        folder / MANIFEST,
        {
            "format": FORMAT,
            "qkd_deploy_version": versions.get("qkd-deploy"),
            "versions": versions,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "student": entry["name"],
            "source": {"run_dir": str(run_dir.resolve()), "onnx_path": entry["onnx_path"]},
            "files": {name: _file_entry(folder / name) for name in CONTENTS},
        },
    )


def _file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _read_sample(path: Path, model: ModelInput) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise UserError(f"{path} not found: the run is incomplete or was made by an older version")
    fix = "the run's sample is damaged; export the run again (qkd-deploy export RUN_DIR)"
    sample = load_npz(path, ("images", "labels"), fix)
    images, labels = sample["images"], sample["labels"]
    if images.dtype != np.uint8 or images.shape[1:] != model.chw:
        raise UserError(
            f"{path}: images are {images.dtype} {images.shape}, but the model takes uint8 "
            f"(N, {', '.join(map(str, model.chw))}) before preprocessing"
        )
    check_labels(labels, len(images), path, fix)
    return images, labels


def _has_int4_weights(model_path: Path) -> bool:
    graph = onnx.load(str(model_path)).graph
    return any(init.data_type == onnx.TensorProto.INT4 for init in graph.initializer)


def _expected(
    report: dict[str, Any],
    entry: dict[str, Any],
    logits: np.ndarray,
    labels: np.ndarray,
    precision: str,
) -> dict[str, Any]:
    return {
        "student": entry["name"],
        "arch": entry.get("arch"),
        "method": entry["method"],
        "w_bits": entry["w_bits"],
        "a_bits": entry["a_bits"],
        "target": report.get("target"),
        "dataset": report["dataset"],
        "test_samples": report.get("test_samples"),
        "accuracy_onnx": entry["accuracy_onnx"],
        "accuracy_torch": entry["accuracy_torch"],
        "onnx_agreement": entry["onnx_agreement"],
        "sample": {"images": len(labels), "accuracy": accuracy(logits, labels)},
        "engine": None  # TensorRT rejects an onnxruntime-target model: no engine to build
        if report.get("target") == "onnxruntime"
        else {"precision": precision, "file": f"model.{precision}.engine"},
        "tolerances": {
            "onnxruntime": ONNXRUNTIME_TOLERANCE,
            "onnxruntime_fused": {
                "max_abs_error": max(
                    ONNXRUNTIME_TOLERANCE["max_abs_error"],
                    ONNXRUNTIME_FUSED_RELATIVE_ERROR * float(np.abs(logits).max()),
                ),
                "min_agreement": TENSORRT_MIN_AGREEMENT,
            },
            "tensorrt": {
                "max_abs_error": TENSORRT_RELATIVE_ERROR * float(np.abs(logits).max()),
                "min_agreement": TENSORRT_MIN_AGREEMENT,
            },
        },
    }


def _bundle_files(folder: Path) -> list[str]:
    """The files of a bundle folder: its contents, the manifest and, when signed, the signature."""
    signed = [SIGNATURE] if (folder / SIGNATURE).is_file() else []
    return [*CONTENTS, MANIFEST, *signed]


def _make_readable(folder: Path) -> None:
    """rwxr-xr-x / rw-r--r--, as in the archive (temporary files are created private)."""
    folder.chmod(0o755)
    for name in _bundle_files(folder):
        (folder / name).chmod(0o644)


def _write_archive(directory: Path, tmp: str) -> None:
    with tarfile.open(tmp, "w:gz") as tar:
        for name in _bundle_files(directory):
            tar.add(directory / name, arcname=f"{directory.name}/{name}", filter=_anonymous)
    os.chmod(tmp, 0o644)


def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """No user or group names of the machine that made the bundle."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info
