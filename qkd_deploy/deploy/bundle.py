"""Deploy bundles: `qkd-deploy bundle RUN_DIR` and `qkd-deploy verify BUNDLE` (torch-free).

A bundle is one student of a run packed for the device: the Q/DQ ONNX model, its labels and
preprocessing, the numbers it must reproduce (expected logits of a few raw test images), the
engine build recipe and a manifest with the sha256 of every file. It is written as a folder and
as a ``.tar.gz`` of that folder. ``verify`` runs on the device without torch: it checks the
hashes, preprocesses the sample images with numpy, runs them through ONNX Runtime or a TensorRT
engine built there, and compares the logits with the expected ones.

The hashes show that a bundle is intact, not who made it. ``bundle --sign-key FILE`` signs it:
``signature.json`` holds an HMAC-SHA256 of ``manifest.json`` under the user's key, and the
manifest holds the sha256 of every file, so ``verify --sign-key FILE`` rejects any edit (looser
tolerances, other expected logits, another model) made without the key, even with the hashes
regenerated. A bundle, like a run directory, from elsewhere is to be trusted like code: its model
is parsed by ONNX Runtime and TensorRT.

Reading a bundle never trusts it: an archive member that the manifest does not list, or that is
larger than listed, is refused before anything is written, as is an archive over
``MAX_BUNDLE_BYTES``; a damaged ``manifest.json``, ``expected.json``, ``preprocess.json`` or
``sample.npz`` is one UserError naming the file.

``qkd-deploy diff BUNDLE`` runs on the device from what a bundle holds (``diff_inputs``): the
model, and the sample images preprocessed as ``verify`` does them.

Imports stdlib, numpy, onnx and onnxruntime only; TensorRT is imported when an engine is run.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import io
import json
import math
import os
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import onnx

from qkd_deploy.bench.accuracy import accuracy, parity
from qkd_deploy.bench.report import BUNDLED, load_report
from qkd_deploy.data.preprocess import Preprocess
from qkd_deploy.deploy.engine import (
    TRT8_MAX_OPSET,
    EngineBuildOptions,
    ModelInput,
    read_model_input,
    trtexec_command,
)
from qkd_deploy.errors import UserError
from qkd_deploy.fileio import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    sha256_file,
)
from qkd_deploy.rundir import library_versions
from qkd_deploy.runtime.onnxruntime import fused_kernel_inexactness

FORMAT = "qkd-deploy-bundle/1"
MANIFEST = "manifest.json"
SIGNATURE = "signature.json"  # only in a signed bundle; it cannot list itself in the manifest
SIGNATURE_ALGORITHM = "HMAC-SHA256"
# every file of a bundle except the manifest, which lists them, and the optional signature
CONTENTS = (
    "model.onnx",
    "labels.json",
    "preprocess.json",
    "expected.json",
    "sample.npz",
    "BUILD.md",
)
RUNTIMES = ("onnxruntime", "tensorrt")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
# Reading limits. A bundle is one self-contained .onnx (protobuf caps it at 2 GiB) and small files.
MAX_BUNDLE_BYTES = 3 * 2**30  # all members of an archive together
MAX_MEMBERS = 32  # a bundle archive has a folder and 8 files
MAX_SMALL_FILE_BYTES = 2**20  # manifest.json, signature.json, expected.json, a key file
MAX_SAMPLE_BYTES = 64 * 2**20  # sample.npz's arrays: 16 images, their labels and logits
MIN_KEY_BYTES = 16
DAMAGED = "the bundle is damaged or was edited; make it again with qkd-deploy bundle"
NUMBER = (int, float)

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


# --- making a bundle -------------------------------------------------------------------------


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
            atomic_write_json(staging / SIGNATURE, _signature(staging / MANIFEST, sign_key))
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
    images, labels = _read_sample(run_dir / "sample_batch.npz", model)
    preprocess = _preprocess(report["preprocess"], run_dir / "report.json", "write it again")
    logits, output_name = _onnxruntime_logits(
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
    sample = _load_npz(path, ("images", "labels"), fix)
    images, labels = sample["images"], sample["labels"]
    if images.dtype != np.uint8 or images.shape[1:] != model.chw:
        raise UserError(
            f"{path}: images are {images.dtype} {images.shape}, but the model takes uint8 "
            f"(N, {', '.join(map(str, model.chw))}) before preprocessing"
        )
    _check_labels(labels, len(images), path, fix)
    return images, labels


def _check_labels(labels: np.ndarray, count: int, path: Path, fix: str) -> None:
    if labels.shape != (count,) or labels.dtype.kind not in "iu":
        raise UserError(
            f"{path}: labels are {labels.dtype} {labels.shape}, not {count} integers; {fix}"
        )


def _load_npz(path: Path, names: tuple[str, ...], fix: str) -> dict[str, np.ndarray]:
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


def _preprocess(spec: Any, file: Path, fix: str) -> Preprocess:
    try:
        return Preprocess.from_dict(spec)
    except (UserError, TypeError, ValueError) as error:
        raise UserError(f"{file}: {error}; {fix}") from None


def _onnxruntime_logits(
    model_path: Path, batch: np.ndarray, optimize: bool = True
) -> tuple[np.ndarray, str]:
    """Logits of ``batch`` and the output name, from ONNX Runtime on the CPU; ``optimize=False``
    runs the graph as written (the expected logits, independent of this CPU's kernels)."""
    from qkd_deploy.runtime.onnxruntime import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(model_path, optimize=optimize)
    try:
        return runner.run(batch), runner.session.get_outputs()[0].name
    finally:
        runner.close()


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


def build_recipe(expected: dict[str, Any], model: ModelInput, signed: bool = False) -> str:
    """BUILD.md: how to run the model on the device (a TensorRT engine, or ONNX Runtime for an
    ``onnxruntime``-target export, which TensorRT rejects), verify the bundle and, when it is
    ``signed``, authenticate it."""
    if expected["target"] == "onnxruntime":
        packages, steps = "numpy, onnx and onnxruntime", _onnxruntime_steps(model)
    else:
        packages = (
            "numpy, onnx and onnxruntime, and TensorRT's Python package (JetPack: "
            "python3-libnvinfer) with\ncuda-python for the engine"
        )
        steps = _tensorrt_steps(expected, model)
    accuracy_onnx = 100 * expected["accuracy_onnx"]
    return f"""# Deploy {expected["student"]} on the device

W{expected["w_bits"]}A{expected["a_bits"]} student ({expected["method"]}, target \
{expected["target"]}): {accuracy_onnx:.2f} % accuracy in ONNX Runtime on the \
{expected["dataset"]} test split ({expected["test_samples"]} images).

Nothing here needs torch. Install qkd-deploy without its training dependencies
(`pip install --no-deps qkd-deploy` or `pip install --no-deps .` in its source tree) next to
{packages}. Run the commands below in this folder.

{steps}
`verify` checks the sha256 of every file against `manifest.json`, runs the images of
`sample.npz` after the preprocessing of `preprocess.json`, and compares the logits with the
expected ones (tolerances in `expected.json`). Exit code 0 when everything passes, 1 otherwise.

{_trust_note(signed)}
"""


def _trust_note(signed: bool) -> str:
    """Which checks authenticate the bundle, not only show it intact."""
    trust = (
        "Trust a bundle (or a run directory) from elsewhere as you would trust code: ONNX "
        "Runtime and TensorRT parse its model."
    )
    if not signed:
        return (
            "## Authenticity\n\nThis bundle is not signed: the hashes show that it is intact, "
            "not who made it (anyone can edit `expected.json` or the model and write new "
            "hashes). `qkd-deploy bundle RUN --sign-key KEY` signs a bundle. " + trust
        )
    return (
        "## Authenticity\n\nThis bundle is signed: `signature.json` holds an HMAC-SHA256 of "
        "`manifest.json`, which holds every file's sha256, under the key it was made with.\n\n"
        "```bash\nqkd-deploy verify . --sign-key KEY    # also authenticates the bundle\n```\n\n"
        "With the key, an edit made without it fails `verify`, even with the hashes written "
        "again. Without `--sign-key`, `verify` checks integrity only and says the bundle was "
        "not authenticated. Keep the key secret and bring it to the device yourself, not in the "
        "bundle. " + trust
    )


def _onnxruntime_steps(model: ModelInput) -> str:
    shape = ", ".join(map(str, model.chw))
    return f"""## 1. Run it with ONNX Runtime (CPU)

This student was exported for ONNX Runtime (`quant.target=onnxruntime`): UINT8 activations
and INT32 biases, which ONNX Runtime runs as fused integer kernels. TensorRT rejects this model
(no UINT8 Q/DQ, no INT32 bias DequantizeLinear), so there is no engine to build: for TensorRT,
export the student with `quant.target=tensorrt`
(`python -m qkd_deploy.train_and_export ... --set quant.target=tensorrt`) and bundle that run.

```python
import onnxruntime as ort

session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
# batch: float32 (N, {shape}), uint8 images after preprocess.json: (pixels / 255 - mean) / std
logits = session.run(None, {{"{model.name}": batch}})[0]
```

Latency on this device: `qkd-deploy bench model.onnx`.

## 2. Verify

```bash
qkd-deploy verify .    # ONNX Runtime (CPU): logits within expected.json's tolerances
```
"""


def _tensorrt_steps(expected: dict[str, Any], model: ModelInput) -> str:
    precision, engine = expected["engine"]["precision"], expected["engine"]["file"]
    options = EngineBuildOptions(precision=precision)
    trtexec = trtexec_command("model.onnx", engine, options, model.name, model.chw)
    return f"""## 1. Build the engine (TensorRT >= 10)

```bash
qkd-deploy build-engine model.onnx --precision {precision} --out {engine}
```

This writes `{engine}` and its sidecar `{engine}.json` (TensorRT version, GPU,
hashes), which `verify` reads. The same engine with trtexec (no sidecar, so for timing only):

```bash
{trtexec}
```

{_tensorrt8_note(precision, model)}

## 2. Verify

```bash
qkd-deploy verify .    # ONNX Runtime (CPU): logits equal up to 1e-4
qkd-deploy verify . --engine {engine}    # TensorRT: argmax agreement >= 15/16
```
"""


def _tensorrt8_note(precision: str, model: ModelInput) -> str:
    heading = "## TensorRT 8.6 (JetPack 6.0)\n\n"
    if precision == "int4":
        return heading + "This model has INT4 weights, which need TensorRT >= 10."
    if model.opset > TRT8_MAX_OPSET:
        return heading + (
            f"TensorRT 8.6 parses ONNX opset <= {TRT8_MAX_OPSET}, and this model is opset "
            f"{model.opset}: on the training machine, export the finished run again at opset "
            f"{TRT8_MAX_OPSET} without retraining\n(`qkd-deploy export RUN --opset "
            f"{TRT8_MAX_OPSET} --out RUN-opset{TRT8_MAX_OPSET}`) and bundle that copy."
        )
    options = EngineBuildOptions(precision=precision, strongly_typed=False)
    engine = f"model.{precision}.engine"
    trtexec = trtexec_command("model.onnx", engine, options, model.name, model.chw)
    return heading + (
        "`qkd-deploy build-engine` detects TensorRT 8.6 and uses the INT8 builder flag; with "
        f"trtexec:\n\n```bash\n{trtexec}\n```"
    )


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


# --- signing ---------------------------------------------------------------------------------


def read_sign_key(path: str | os.PathLike) -> bytes:
    """The bytes of a key file for ``--sign-key`` (at least ``MIN_KEY_BYTES``; any bytes, e.g.
    ``head -c 32 /dev/urandom > bundle.key``)."""
    path = Path(path)
    make = f"make one with: head -c 32 /dev/urandom > {path}"
    if not path.is_file():
        raise UserError(f"--sign-key {path}: no such file; {make}")
    size = path.stat().st_size
    if size > MAX_SMALL_FILE_BYTES:
        raise UserError(f"--sign-key {path} is {size} bytes; a key file holds a few bytes")
    key = path.read_bytes()
    if len(key) < MIN_KEY_BYTES:
        raise UserError(
            f"--sign-key {path} holds {len(key)} bytes, fewer than {MIN_KEY_BYTES}; {make}"
        )
    return key


def _mac(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def _key_id(key: bytes) -> str:
    """A short name for the key (not the key): tells two keys apart in messages."""
    return _mac(key, b"qkd-deploy bundle key id")[:16]


def _signature(manifest: Path, key: bytes) -> dict[str, str]:
    return {
        "algorithm": SIGNATURE_ALGORITHM,
        "signed_file": MANIFEST,
        "key_id": _key_id(key),
        "hmac": _mac(key, manifest.read_bytes()),
    }


def _signature_check(folder: Path, key: bytes | None) -> dict[str, Any] | None:
    """The ``signature`` check: None for an unsigned bundle verified without a key; a passed
    note for a signed one verified without a key (not authenticated); with a key, passed only
    when ``signature.json`` holds the HMAC of this ``manifest.json`` under it."""
    path = folder / SIGNATURE
    if key is None:
        if not path.exists():
            return None
        return _check(
            "signature",
            True,
            f"signed, but not authenticated: give --sign-key KEY to check {SIGNATURE}",
        )
    if not path.is_file():
        return _check("signature", False, f"not signed (no {SIGNATURE}): not authenticated")
    try:
        signature = _read_json(path, DAMAGED)
        algorithm = _field(signature, "algorithm", str, path)
        expected_mac = _field(signature, "hmac", str, path)
    except UserError as error:
        return _check("signature", False, f"unreadable: {error}")
    if algorithm != SIGNATURE_ALGORITHM:
        return _check(
            "signature", False, f"{algorithm!r} signature; {SIGNATURE_ALGORITHM} expected"
        )
    mac = _mac(key, (folder / MANIFEST).read_bytes())
    if not hmac.compare_digest(expected_mac.encode("utf-8"), mac.encode("ascii")):
        key_note = ""
        if signature.get("key_id") not in (None, _key_id(key)):
            key_note = f" (signed with key id {signature['key_id']}, --sign-key is {_key_id(key)})"
        return _check(
            "signature",
            False,
            f"HMAC of {MANIFEST} does not match{key_note}: the bundle was changed after it was "
            "signed, or signed with another key; do not deploy it",
        )
    return _check("signature", True, f"{SIGNATURE_ALGORITHM} of {MANIFEST}: authenticated")


# --- verifying a bundle ----------------------------------------------------------------------


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


def extract_bundle(archive: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Extract a bundle archive into ``destination`` and return its folder.

    Only regular files and folders under one top folder are accepted, so no member can land
    outside ``destination`` (absolute paths, ``..``, links and devices are refused). Nothing is
    written before every header was read (at most ``MAX_MEMBERS`` members, ``MAX_BUNDLE_BYTES``
    in all) and every file is the manifest, the signature or a file the manifest lists, no
    larger than listed.
    """
    archive, destination = Path(archive), Path(destination)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = _read_headers(tar, archive)
            top = _top_folder(members, archive)
            files = _files_in(members, top, archive)
            _refuse_unlisted(tar, files, archive)
            for name, member in files.items():
                _extract_file(tar, member, destination / top / name)
    except (tarfile.TarError, EOFError, zlib.error) as error:
        raise UserError(f"{archive}: cannot read it as a .tar.gz bundle ({error})") from None
    except OSError as error:
        if error.errno is not None:  # the disk or permissions, not the archive's content
            raise
        raise UserError(f"{archive}: cannot read it as a .tar.gz bundle ({error})") from None
    return destination / top


def _read_headers(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    """Every member's header, refusing the archive as soon as it has too many or too large."""
    members: list[tarfile.TarInfo] = []
    total = 0
    while (member := tar.next()) is not None:
        members.append(member)
        total += member.size
        if len(members) > MAX_MEMBERS:
            raise UserError(
                f"{archive}: more than {MAX_MEMBERS} members; a bundle archive holds one folder "
                f"of {len(CONTENTS) + 2} files at most"
            )
        if total > MAX_BUNDLE_BYTES:
            raise UserError(
                f"{archive}: its members hold more than {MAX_BUNDLE_BYTES} bytes, more than any "
                "bundle (one .onnx of at most 2 GiB and small files); refusing it"
            )
    return members


def _top_folder(members: list[tarfile.TarInfo], archive: Path) -> str:
    """The bundle's folder in the archive: its one top folder, or ``.`` when the archive holds
    the files themselves (``tar czf b.tgz -C bundle_x .``)."""
    paths = []
    for member in members:
        path = PurePosixPath(member.name)
        if path.is_absolute() or ".." in path.parts or not (member.isfile() or member.isdir()):
            raise UserError(
                f"{archive}: refusing member {member.name!r} (absolute path, '..', link or "
                "device); a bundle holds plain files in one folder"
            )
        if path.parts:  # not the archive's root itself ("./")
            paths.append((path, member))
    if paths and all(len(path.parts) == 1 and member.isfile() for path, member in paths):
        return "."
    tops = {path.parts[0] for path, _ in paths}
    if len(tops) != 1:
        raise UserError(f"{archive}: a bundle archive holds one folder, found {sorted(tops)}")
    return tops.pop()


def _files_in(
    members: list[tarfile.TarInfo], top: str, archive: Path
) -> dict[str, tarfile.TarInfo]:
    """The archive's files by name in the bundle folder, which holds no subfolders."""
    files: dict[str, tarfile.TarInfo] = {}
    for member in (m for m in members if m.isfile()):
        parts = PurePosixPath(member.name).parts
        name = parts if top == "." else parts[1:]
        if len(name) != 1:
            raise UserError(
                f"{archive}: refusing member {member.name!r}; a bundle's files lie directly in "
                "its folder"
            )
        if name[0] in files:
            raise UserError(f"{archive}: member {member.name!r} appears twice; refusing it")
        files[name[0]] = member
    return files


def _refuse_unlisted(
    tar: tarfile.TarFile, files: dict[str, tarfile.TarInfo], archive: Path
) -> None:
    """Every file must be one the archive's manifest lists, at most as large as listed (the
    manifest and the signature: at most ``MAX_SMALL_FILE_BYTES``)."""
    member = files.get(MANIFEST)
    if member is None:
        raise UserError(f"{archive} holds no {MANIFEST}; give an archive made by qkd-deploy bundle")
    if member.size > MAX_SMALL_FILE_BYTES:
        raise UserError(f"{archive}: its {MANIFEST} is {member.size} bytes; {DAMAGED}")
    where = Path(f"{archive}: {MANIFEST}")
    manifest = _check_manifest(_parse_json(tar.extractfile(member).read(), where, DAMAGED), where)
    limits = {name: entry["bytes"] for name, entry in manifest["files"].items()}
    limits |= {MANIFEST: MAX_SMALL_FILE_BYTES, SIGNATURE: MAX_SMALL_FILE_BYTES}
    for name, member in files.items():
        if name not in limits:
            raise UserError(
                f"{archive}: refusing member {member.name!r}, which {MANIFEST} does not list; "
                f"{DAMAGED}"
            )
        if member.size > limits[name]:
            raise UserError(
                f"{archive}: refusing member {member.name!r} of {member.size} bytes, "
                f"{MANIFEST} lists {limits[name]}; {DAMAGED}"
            )


def _extract_file(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tar.extractfile(member) as source, open(target, "wb") as sink:
        shutil.copyfileobj(source, sink)


def _verify_folder(
    folder: Path,
    runtime: str,
    engine: str | os.PathLike | None,
    shown: Path,
    sign_key: bytes | None,
) -> dict[str, Any]:
    manifest_path = folder / MANIFEST
    hint = "give a folder or archive made by qkd-deploy bundle"
    manifest = _check_manifest(_read_json(manifest_path, hint), manifest_path)
    problems = _integrity_problems(folder, manifest["files"])
    count = len(manifest["files"])
    checks = [
        _check("files", not problems, "; ".join(problems) or f"{count} files match {MANIFEST}")
    ]
    signature = _signature_check(folder, sign_key)
    checks += [signature] if signature is not None else []
    result: dict[str, Any] = {
        "bundle": str(shown),
        "student": manifest["student"],
        "runtime": runtime,
        "checks": checks,
    }
    if not all(check["passed"] for check in checks):
        return {**result, "passed": False}
    expected = _read_json(folder / "expected.json", DAMAGED)
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
    manifest = _check_manifest(_read_json(manifest_path, hint), manifest_path)
    problems = _integrity_problems(folder, manifest["files"])
    if problems:
        raise UserError(f"{folder}: {'; '.join(problems)}; {DAMAGED}")
    images, _, _ = _read_bundle_sample(folder / "sample.npz")
    spec_path = folder / "preprocess.json"
    preprocess = _preprocess(_read_json(spec_path, DAMAGED), spec_path, DAMAGED)
    return folder / "model.onnx", _apply(preprocess, images, spec_path)


def _check_manifest(manifest: dict[str, Any], where: Path) -> dict[str, Any]:
    """The manifest's format, student and file list (plain names, each with its sha256 and size)."""
    if manifest.get("format") != FORMAT:
        raise UserError(f"{where}: not a {FORMAT} manifest; {DAMAGED}")
    _field(manifest, "student", str, where)
    files = _field(manifest, "files", dict, where)
    for name, entry in files.items():
        if name in ("", ".", "..") or PurePosixPath(name).name != name or "\\" in name:
            raise UserError(f"{where}: lists {name!r}, which is not a file name; {DAMAGED}")
        _field(entry if isinstance(entry, dict) else {}, "sha256", str, Path(f"{where}: {name}"))
        size = _field(entry, "bytes", int, Path(f"{where}: {name}"))
        if size < 0:
            raise UserError(f"{where}: {name} has {size} bytes; {DAMAGED}")
    return manifest


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
    tolerances = _field(expected, "tolerances", dict, expected_path)
    images, labels, reference = _read_bundle_sample(folder / "sample.npz")
    spec_path = folder / "preprocess.json"
    preprocess = _preprocess(_read_json(spec_path, DAMAGED), spec_path, DAMAGED)
    batch = _apply(preprocess, images, spec_path)
    if runtime == "tensorrt":
        engine = Path(engine) if engine is not None else folder / _engine_file(expected, folder)
        runner_name, logits = "tensorrt", _tensorrt_logits(folder, engine, batch)
        tolerance = _tolerance(tolerances, "tensorrt", expected_path)
    else:
        causes = fused_kernel_inexactness(expected.get("target"))
        logits, _ = _onnxruntime_logits(folder / "model.onnx", batch, optimize=not causes)
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
        _check(
            "agreement",
            match.agreement >= tolerance["min_agreement"],
            f"{agreeing}/{n} argmax agree with the expected logits (need >= {needed:g}/{n})",
        ),
        _check(
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
    _field(_field(expected, "sample", dict, path), "accuracy", NUMBER, Path(f"{path}: sample"))
    _field(expected, "accuracy_onnx", NUMBER, path)
    _field(expected, "dataset", str, path)


def _read_bundle_sample(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """sample.npz: uint8 NCHW images, their labels and the expected logits (N, classes)."""
    sample = _load_npz(path, ("images", "labels", "logits"), DAMAGED)
    images, labels, logits = sample["images"], sample["labels"], sample["logits"]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise UserError(
            f"{path}: images are {images.dtype} {images.shape}, not uint8 NCHW; {DAMAGED}"
        )
    _check_labels(labels, len(images), path, DAMAGED)
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
    engine = _field(expected, "engine", dict, path)
    name = _field(engine, "file", str, Path(f"{path}: engine"))
    if PurePosixPath(name).name != name or name in ("", ".", ".."):
        raise UserError(f"{path}: engine file {name!r} is not a file name; {DAMAGED}")
    return name


def _tolerance(tolerances: dict[str, Any], key: str, path: Path) -> dict[str, float]:
    where = Path(f"{path}: tolerances")
    tolerance = _field(tolerances, key, dict, where)
    where = Path(f"{where}.{key}")
    return {
        name: _field(tolerance, name, NUMBER, where) for name in ("max_abs_error", "min_agreement")
    }


def _tensorrt_logits(folder: Path, engine: Path, batch: np.ndarray) -> np.ndarray:
    """Logits from the engine, after making sure it was built from this bundle's model."""
    from qkd_deploy.runtime.base import run_in_batches
    from qkd_deploy.runtime.engine_info import read_sidecar
    from qkd_deploy.runtime.tensorrt import TensorRTRunner

    if not engine.is_file():
        raise UserError(
            f"TensorRT engine {engine} not found; build it in the bundle folder as BUILD.md "
            "says (qkd-deploy build-engine model.onnx ...) or pass --engine PATH"
        )
    sidecar = read_sidecar(engine)
    if sidecar["onnx_sha256"] != sha256_file(folder / "model.onnx"):
        raise UserError(
            f"{engine} was built from another model than this bundle's model.onnx (sha256 in "
            f"its sidecar differs); build it again: qkd-deploy build-engine model.onnx"
        )
    runner = TensorRTRunner(engine)
    try:
        return run_in_batches(runner, batch, int(sidecar["input_shapes"]["max"][0]))
    finally:
        runner.close()


def _check(name: str, passed: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "passed": bool(passed), "detail": detail}


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


def _read_json(path: Path, hint: str) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path} not found; {hint}")
    size = path.stat().st_size
    if size > MAX_SMALL_FILE_BYTES:
        raise UserError(f"{path} is {size} bytes, too large for a bundle's JSON file; {hint}")
    return _parse_json(path.read_bytes(), path, hint)


def _parse_json(data: bytes, path: Path, hint: str) -> dict[str, Any]:
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); {hint}") from None
    if not isinstance(parsed, dict):
        raise UserError(f"{path} is not a JSON object; {hint}")
    return parsed


def _field(data: dict[str, Any], key: str, kind: Any, where: Path) -> Any:
    """``data[key]``, which must be there and of ``kind`` (a bool is not a number)."""
    if key not in data:
        raise UserError(f"{where} lacks {key!r}; {DAMAGED}")
    value = data[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, NUMBER)):
        shown = json.dumps(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise UserError(f"{where}: {key} is {shown}, of the wrong type; {DAMAGED}")
    return value


# --- commands --------------------------------------------------------------------------------


def main_bundle(argv: list[str]) -> int:
    """`qkd-deploy bundle RUN_DIR [--out DIR] [--student NAME] [--sign-key FILE]`."""
    parser = argparse.ArgumentParser(
        prog="qkd-deploy bundle",
        description="Pack one student of a run for the device: model, preprocessing, labels, "
        "expected outputs, build recipe and hashes (a folder and a .tar.gz of it).",
    )
    parser.add_argument("run_dir", help="a finished run directory (with report.json)")
    parser.add_argument("--out", help="bundle folder (default: RUN_DIR/bundle_<student>)")
    parser.add_argument("--student", help="student name in report.json (default: fewest bits)")
    parser.add_argument(
        "--sign-key",
        metavar="FILE",
        help="sign the bundle (HMAC-SHA256 of its manifest) with the bytes of FILE, a secret of "
        f"at least {MIN_KEY_BYTES} bytes (head -c 32 /dev/urandom > FILE); verify --sign-key "
        "FILE authenticates it",
    )
    args = parser.parse_args(argv)
    key = read_sign_key(args.sign_key) if args.sign_key else None
    bundle = make_bundle(args.run_dir, args.out, args.student, sign_key=key)
    signed = " (signed)" if key is not None else ""
    print(
        f"wrote {bundle.directory} and {bundle.archive}{signed} (student {bundle.student}); on "
        f"the device follow {bundle.directory.name}/BUILD.md, then run 'qkd-deploy verify .' there"
    )
    return 0


def main_verify(argv: list[str]) -> int:
    """`qkd-deploy verify BUNDLE`: 0 when every check passes, 1 otherwise."""
    parser = argparse.ArgumentParser(
        prog="qkd-deploy verify",
        description="Check a deploy bundle on this machine: file hashes (and with --sign-key its "
        "signature), then the sample images through ONNX Runtime or a TensorRT engine against "
        "the expected logits.",
    )
    parser.add_argument("bundle", help="bundle folder or its .tar.gz")
    parser.add_argument(
        "--runtime", choices=RUNTIMES, help="default: tensorrt with --engine, else onnxruntime"
    )
    parser.add_argument(
        "--engine",
        help="TensorRT engine built from the bundle's model.onnx by qkd-deploy build-engine "
        "(default with --runtime tensorrt: the bundle's model.<precision>.engine)",
    )
    parser.add_argument(
        "--sign-key",
        metavar="FILE",
        help="the key the bundle was signed with (bundle --sign-key): it must be signed with it",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    runtime = args.runtime or ("tensorrt" if args.engine else "onnxruntime")
    key = read_sign_key(args.sign_key) if args.sign_key else None
    result = verify_bundle(args.bundle, runtime, args.engine, sign_key=key)
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 0 if result["passed"] else 1
