"""Running a bundle's model on a batch: ONNX Runtime on the CPU (the expected logits, and
``verify``) and a TensorRT engine built from it (``verify --runtime tensorrt``); the runtimes are
imported when a model is run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qkd_deploy.errors import UserError
from qkd_deploy.fileio import sha256_file


def onnxruntime_logits(
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


def tensorrt_logits(folder: Path, engine: Path, batch: np.ndarray) -> np.ndarray:
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
