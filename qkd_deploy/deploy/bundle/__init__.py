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

The modules: ``make`` (a bundle from a run), ``recipe`` (BUILD.md), ``signing``, ``extract``
(reading an archive safely), ``verify`` (and ``diff_inputs``), ``logits`` (running the model),
``files`` (the names, limits and readers they share) and ``cli`` (the two commands). Their
public names are imported here; a reading limit is read in the module that defines it
(``files.MAX_SAMPLE_BYTES``, ``extract.MAX_BUNDLE_BYTES``), so change it there.
"""

from qkd_deploy.deploy.bundle.cli import main_bundle, main_verify
from qkd_deploy.deploy.bundle.extract import MAX_BUNDLE_BYTES, MAX_MEMBERS, extract_bundle
from qkd_deploy.deploy.bundle.files import (
    CONTENTS,
    DAMAGED,
    FORMAT,
    MANIFEST,
    MAX_SAMPLE_BYTES,
    MAX_SMALL_FILE_BYTES,
    NUMBER,
    SIGNATURE,
)
from qkd_deploy.deploy.bundle.make import (
    ONNXRUNTIME_FUSED_RELATIVE_ERROR,
    ONNXRUNTIME_TOLERANCE,
    TENSORRT_MIN_AGREEMENT,
    TENSORRT_RELATIVE_ERROR,
    Bundle,
    archive_path,
    make_bundle,
    remove_stale_bundles,
    select_student,
)
from qkd_deploy.deploy.bundle.recipe import build_recipe
from qkd_deploy.deploy.bundle.signing import MIN_KEY_BYTES, SIGNATURE_ALGORITHM, read_sign_key
from qkd_deploy.deploy.bundle.verify import (
    ARCHIVE_SUFFIXES,
    RUNTIMES,
    diff_inputs,
    format_result,
    verify_bundle,
)

__all__ = [
    "ARCHIVE_SUFFIXES",
    "CONTENTS",
    "DAMAGED",
    "FORMAT",
    "MANIFEST",
    "MAX_BUNDLE_BYTES",
    "MAX_MEMBERS",
    "MAX_SAMPLE_BYTES",
    "MAX_SMALL_FILE_BYTES",
    "MIN_KEY_BYTES",
    "NUMBER",
    "ONNXRUNTIME_FUSED_RELATIVE_ERROR",
    "ONNXRUNTIME_TOLERANCE",
    "RUNTIMES",
    "SIGNATURE",
    "SIGNATURE_ALGORITHM",
    "TENSORRT_MIN_AGREEMENT",
    "TENSORRT_RELATIVE_ERROR",
    "Bundle",
    "archive_path",
    "build_recipe",
    "diff_inputs",
    "extract_bundle",
    "format_result",
    "main_bundle",
    "main_verify",
    "make_bundle",
    "read_sign_key",
    "remove_stale_bundles",
    "select_student",
    "verify_bundle",
]
