"""Verifying a bundle on the device: file hashes, the signature, then the sample images through
ONNX Runtime or a TensorRT engine against the expected logits; the text report of the result;
and what ``qkd-deploy diff BUNDLE`` runs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from qkd_deploy.bench.accuracy import accuracy, parity
from qkd_deploy.data.preprocess import Preprocess
from qkd_deploy.deploy.bundle.extract import extract_bundle
from qkd_deploy.deploy.bundle.files import (
    CONTENTS,
    DAMAGED,
    MANIFEST,
    NUMBER,
    check_labels,
    check_manifest,
    check_result,
    load_npz,
    read_json,
    read_preprocess,
    required_field,
)
from qkd_deploy.deploy.bundle.logits import onnxruntime_logits, tensorrt_logits
from qkd_deploy.deploy.bundle.signing import check_signature
from qkd_deploy.errors import UserError
from qkd_deploy.fileio import sha256_file
from qkd_deploy.runtime.onnxruntime import fused_kernel_inexactness

RUNTIMES = ("onnxruntime", "tensorrt")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")


def verify_bundle(
    bundle: str | os.PathLike,
    runtime: str = "onnxruntime",
    engine: str | os.PathLike | None = None,
    sign_key: bytes | None = None,
) -> dict[str, Any]:
    """Check a bundle folder (or its ``.tar.gz``) on this machine; ``result["passed"]`` says
    whether every check passed. ``engine`` (TensorRT only) defaults to the bundle's
    ``model.<precision>.engine``; with ``sign_key`` the bundle must also be signed with it."""
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime {runtime!r}; choose from {RUNTIMES}")
    if engine is not None and runtime != "tensorrt":
        raise UserError("--engine is a TensorRT engine: use it with --runtime tensorrt")
    bundle = Path(bundle)
    if not bundle.exists():
        raise UserError(f"bundle {bundle} not found; give a bundle folder or its .tar.gz")
    if bundle.is_dir():
        return _verify_folder(bundle, runtime, engine, bundle, sign_key)
    if not bundle.name.endswith(ARCHIVE_SUFFIXES):
        raise UserError(f"{bundle} is neither a bundle folder nor a .tar.gz")
    if runtime == "tensorrt" and engine is None:
        raise UserError(
            f"verifying the archive {bundle} with TensorRT needs --engine PATH (engines are "
            "built on the device, see BUILD.md, and are not part of the archive)"
        )
    with tempfile.TemporaryDirectory(prefix="qkd-bundle-") as tmp:
        folder = extract_bundle(bundle, Path(tmp))
        return _verify_folder(folder, runtime, engine, bundle, sign_key)


def _verify_folder(
    folder: Path,
    runtime: str,
    engine: str | os.PathLike | None,
    shown: Path,
    sign_key: bytes | None,
) -> dict[str, Any]:
    manifest_path = folder / MANIFEST
    hint = "give a folder or archive made by qkd-deploy bundle"
    manifest = check_manifest(read_json(manifest_path, hint), manifest_path)
    problems = _integrity_problems(folder, manifest["files"])
    count = len(manifest["files"])
    checks = [
        check_result(
            "files", not problems, "; ".join(problems) or f"{count} files match {MANIFEST}"
        )
    ]
    signature = check_signature(folder, sign_key)
    checks += [signature] if signature is not None else []
    result: dict[str, Any] = {
        "bundle": str(shown),
        "student": manifest["student"],
        "runtime": runtime,
        "checks": checks,
    }
    if not all(check["passed"] for check in checks):
        return {**result, "passed": False}
    expected = read_json(folder / "expected.json", DAMAGED)
    if runtime == "tensorrt" and expected.get("target") == "onnxruntime":
        raise UserError(
            f"{shown} holds a student exported for ONNX Runtime, which TensorRT rejects (UINT8 "
            "Q/DQ, INT32 biases); verify it without --runtime tensorrt, or bundle a run exported "
            "with --set quant.target=tensorrt"
        )
    return {**result, **_compare(folder, expected, runtime, engine, checks)}


def diff_inputs(folder: str | os.PathLike) -> tuple[Path, np.ndarray]:
    """What ``qkd-deploy diff BUNDLE`` runs on the device: the bundle's model and its sample
    images, preprocessed as ``verify`` does, once every file matches the manifest."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    hint = "give a bundle folder made by qkd-deploy bundle"
    manifest = check_manifest(read_json(manifest_path, hint), manifest_path)
    problems = _integrity_problems(folder, manifest["files"])
    if problems:
        raise UserError(f"{folder}: {'; '.join(problems)}; {DAMAGED}")
    images, _, _ = _read_bundle_sample(folder / "sample.npz")
    spec_path = folder / "preprocess.json"
    preprocess = read_preprocess(read_json(spec_path, DAMAGED), spec_path, DAMAGED)
    return folder / "model.onnx", _apply(preprocess, images, spec_path)


def _integrity_problems(folder: Path, files: dict[str, dict[str, Any]]) -> list[str]:
    """Every file the manifest lists, and every file a bundle needs, must match its hash."""
    problems = []
    for name in sorted(set(CONTENTS) | set(files)):
        path = folder / name
        if name not in files:
            problems.append(f"{name}: not listed in {MANIFEST}")
        elif not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(path) != files[name]["sha256"]:
            problems.append(f"{name}: sha256 differs from {MANIFEST} (changed after bundling)")
    return problems


def _compare(
    folder: Path,
    expected: dict[str, Any],
    runtime: str,
    engine: str | os.PathLike | None,
    checks: list[dict[str, Any]],
) -> dict[str, Any]:
    """Run the sample and compare its logits with the expected ones (the graph as written),
    after ``checks`` (files, signature) passed.

    ONNX Runtime runs its fused integer kernels, as a deployment does, where they compute the
    graph up to rounding ties (``onnxruntime_fused`` tolerance): for an ``onnxruntime``-target
    model on a CPU that accumulates in 32 bits. Otherwise it runs the graph as written, which
    still checks model, preprocessing and sample end to end (see ``fused_kernel_inexactness``).
    """
    expected_path = folder / "expected.json"
    _check_summary(expected, expected_path)
    tolerances = required_field(expected, "tolerances", dict, expected_path)
    images, labels, reference = _read_bundle_sample(folder / "sample.npz")
    spec_path = folder / "preprocess.json"
    preprocess = read_preprocess(read_json(spec_path, DAMAGED), spec_path, DAMAGED)
    batch = _apply(preprocess, images, spec_path)
    if runtime == "tensorrt":
        engine = Path(engine) if engine is not None else folder / _engine_file(expected, folder)
        runner_name, logits = "tensorrt", tensorrt_logits(folder, engine, batch)
        tolerance = _tolerance(tolerances, "tensorrt", expected_path)
    else:
        causes = fused_kernel_inexactness(expected.get("target"))
        logits, _ = onnxruntime_logits(folder / "model.onnx", batch, optimize=not causes)
        runner_name = "onnxruntime_cpu"
        if causes:
            runner_name += f" (graph as written; the fused kernels: {'; '.join(causes)})"
            tolerance = _tolerance(tolerances, "onnxruntime", expected_path)
        else:  # a bundle made before the fused kernels had their own is held to the graph's
            key = "onnxruntime_fused" if "onnxruntime_fused" in tolerances else "onnxruntime"
            tolerance = _tolerance(tolerances, key, expected_path)
    if logits.shape != reference.shape:
        raise UserError(
            f"{folder / 'sample.npz'}: expected logits {reference.shape}, but the model gives "
            f"{logits.shape}; {DAMAGED}"
        )
    match = parity(logits, reference)
    n = len(labels)
    agreeing = round(match.agreement * n)
    needed = tolerance["min_agreement"] * n
    checks = [
        *checks,
        check_result(
            "agreement",
            match.agreement >= tolerance["min_agreement"],
            f"{agreeing}/{n} argmax agree with the expected logits (need >= {needed:g}/{n})",
        ),
        check_result(
            "max error",
            match.max_abs_error <= tolerance["max_abs_error"],
            f"{match.max_abs_error:.3g} largest logit difference "
            f"(tolerance {tolerance['max_abs_error']:.3g})",
        ),
    ]
    return {
        "runner": runner_name,
        "engine": str(engine) if runtime == "tensorrt" else None,
        "checks": checks,
        "agreement": match.agreement,
        "max_abs_error": match.max_abs_error,
        "sample_accuracy": accuracy(logits, labels),
        "expected": expected,
        "passed": all(check["passed"] for check in checks),
    }


def _check_summary(expected: dict[str, Any], path: Path) -> None:
    """What ``format_result`` shows from expected.json."""
    required_field(
        required_field(expected, "sample", dict, path), "accuracy", NUMBER, Path(f"{path}: sample")
    )
    required_field(expected, "accuracy_onnx", NUMBER, path)
    required_field(expected, "dataset", str, path)


def _read_bundle_sample(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """sample.npz: uint8 NCHW images, their labels and the expected logits (N, classes)."""
    sample = load_npz(path, ("images", "labels", "logits"), DAMAGED)
    images, labels, logits = sample["images"], sample["labels"], sample["logits"]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise UserError(
            f"{path}: images are {images.dtype} {images.shape}, not uint8 NCHW; {DAMAGED}"
        )
    check_labels(labels, len(images), path, DAMAGED)
    if logits.dtype.kind != "f" or logits.ndim != 2 or len(logits) != len(images):
        raise UserError(
            f"{path}: logits are {logits.dtype} {logits.shape}, not one float row per image; "
            f"{DAMAGED}"
        )
    return images, labels, logits


def _apply(preprocess: Preprocess, images: np.ndarray, spec_path: Path) -> np.ndarray:
    try:
        return preprocess.apply_numpy(images)
    except UserError as error:
        raise UserError(f"{spec_path} does not fit sample.npz: {error}; {DAMAGED}") from None


def _engine_file(expected: dict[str, Any], folder: Path) -> str:
    """expected.json's engine file name (a name in the bundle folder)."""
    path = folder / "expected.json"
    engine = required_field(expected, "engine", dict, path)
    name = required_field(engine, "file", str, Path(f"{path}: engine"))
    if PurePosixPath(name).name != name or name in ("", ".", ".."):
        raise UserError(f"{path}: engine file {name!r} is not a file name; {DAMAGED}")
    return name


def _tolerance(tolerances: dict[str, Any], key: str, path: Path) -> dict[str, float]:
    where = Path(f"{path}: tolerances")
    tolerance = required_field(tolerances, key, dict, where)
    where = Path(f"{where}.{key}")
    return {
        name: required_field(tolerance, name, NUMBER, where)
        for name in ("max_abs_error", "min_agreement")
    }


def format_result(result: dict[str, Any]) -> str:
    """The short text report of ``verify_bundle``."""
    runner = result.get("runner", result["runtime"])
    lines = [f"verify {result['bundle']} ({result['student']}) with {runner}"]
    for check in result["checks"]:
        status = "ok  " if check["passed"] else "FAIL"
        lines.append(f"  {status}  {check['name']:<10} {check['detail']}")
    if "expected" in result:
        expected = result["expected"]
        lines.append(
            f"        {'accuracy':<10} {100 * result['sample_accuracy']:.1f} % on the sample "
            f"labels (expected {100 * expected['sample']['accuracy']:.1f} %; "
            f"{100 * expected['accuracy_onnx']:.2f} % on the {expected['dataset']} test split)"
        )
    else:
        lines.append("        model not run: a check above failed")
    lines.append("PASS" if result["passed"] else "FAIL")
    return "\n".join(lines)
