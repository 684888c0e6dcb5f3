"""ONNX Runtime runner (torch-free)."""

from __future__ import annotations

import contextlib
import io
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

from qkd_deploy.errors import UserError
from qkd_deploy.targets import Target

_PREFERRED_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)


class OnnxRuntimeRunner:
    """Runs an ONNX classifier in ONNX Runtime.

    ``providers`` defaults to CPU only, which is what accuracy and parity checks want; pass
    ``"auto"`` to use the CUDA / TensorRT execution providers when this onnxruntime build has them.
    ``threads`` sets intra-op threads (0 lets ONNX Runtime choose). ``optimize=False`` turns off
    ONNX Runtime's graph rewrites and runs the Q/DQ graph exactly as written. With them, ONNX
    Runtime fuses Q/DQ into integer kernels: it re-quantizes float biases to INT32 (exact only
    for ``onnxruntime``-target exports, whose biases already sit on that grid), and on x86 CPUs
    without VNNI its 8-bit kernels can saturate (see ``int8_kernels_may_saturate``).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        providers: str | list[str] = "cpu",
        threads: int = 0,
        optimize: bool = True,
    ) -> None:
        import onnxruntime as ort

        model_path = Path(model_path)
        if not model_path.is_file():
            raise UserError(
                f"ONNX model not found: {model_path}. Pass the path of an exported .onnx"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        if not optimize:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.providers = _resolve_providers(providers, ort.get_available_providers())
        self.model_path = model_path
        self.session = _load(ort, model_path, options, self.providers)
        model_input = _image_input(self.session, model_path)
        self.input_name = model_input.name
        self.input_shape = _sample_shape(model_input.shape, model_path)
        self.name = "onnxruntime_" + self.providers[0].replace("ExecutionProvider", "").lower()

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        try:
            return self.session.run(None, {self.input_name: batch})[0]
        except onnxruntime_errors() as error:
            raise UserError(
                f"{self.model_path}: ONNX Runtime failed to run it on a float32 batch of shape "
                f"{batch.shape} ({_first_line(error)}); check the model with qkd-deploy lint "
                f"{self.model_path}"
            ) from None

    def close(self) -> None:
        self.session = None


def onnxruntime_errors() -> tuple[type[Exception], ...]:
    """The exception types of ONNX Runtime's native module, which it raises for a model it
    cannot load or run (InvalidProtobuf, InvalidGraph, Fail, ...)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as native

    kinds = vars(native).values()
    return tuple(k for k in kinds if isinstance(k, type) and issubclass(k, Exception))


def _load(ort: Any, model_path: Path, options: Any, providers: list[str]) -> Any:
    """An InferenceSession; a file ONNX Runtime cannot load is one UserError naming it. What its
    Python wrapper prints to stdout (a provider it fell back from) goes to stderr."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            session = ort.InferenceSession(str(model_path), options, providers=providers)
    except (*onnxruntime_errors(), UnicodeDecodeError) as error:  # a name that is not UTF-8
        raise UserError(
            f"{model_path}: ONNX Runtime cannot load it ({_first_line(error)}); pass a valid "
            f".onnx model (qkd-deploy lint {model_path} says what is wrong with this one)"
        ) from None
    sys.stderr.write(printed.getvalue())
    return session


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _image_input(session: Any, model_path: Path) -> Any:
    """The model's first input, which must be a float32 tensor with a batch dimension."""
    inputs = session.get_inputs()
    if not inputs:
        raise UserError(f"{model_path} has no inputs; give a classifier that takes images")
    model_input = inputs[0]
    if model_input.type != "tensor(float)" or not model_input.shape:
        raise UserError(
            f"{model_path}: input {model_input.name!r} is {model_input.type} of shape "
            f"{model_input.shape}; qkd-deploy runs classifiers on float32 (N, C, H, W) images"
        )
    return model_input


def _sample_shape(shape: list, model_path: Path) -> tuple[int, ...]:
    """The input's shape without the batch dimension, which must be fixed (only N may vary)."""
    sample = shape[1:]
    if not all(isinstance(d, int) for d in sample):
        raise UserError(
            f"{model_path}: input shape {shape} has symbolic dimensions besides the batch; "
            f"export with a fixed image size"
        )
    return tuple(sample)


def _resolve_providers(providers: str | list[str], available: list[str]) -> list[str]:
    """``"cpu"``, ``"auto"`` (the preferred ones this build has), or provider names: one, a
    comma-separated string or a list, in order of preference."""
    if providers == "cpu":
        return ["CPUExecutionProvider"]
    if providers == "auto":
        return [p for p in _PREFERRED_PROVIDERS if p in available]
    if isinstance(providers, str):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    missing = [p for p in providers if p not in available]
    if missing or not providers:
        raise UserError(
            f"ONNX Runtime providers {', '.join(missing) or '(none given)'}: not in this "
            f"onnxruntime build, which has {', '.join(available)} (or pass cpu or auto). Install "
            "onnxruntime-gpu for the GPU ones."
        )
    return list(providers)


_X86 = ("x86_64", "amd64", "i386", "i686", "x86")
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def int8_kernels_may_saturate(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """Whether ONNX Runtime's fused 8-bit kernels may differ from the Q/DQ graph on this CPU.

    On x86 without VNNI, ONNX Runtime multiplies UINT8 activations by INT8 weights with
    VPMADDUBSW, which adds two neighbouring products in 16 bits and saturates at 32767: two
    products of 255 x 127 do. VNNI CPUs (and ARM, e.g. a Jetson) accumulate in 32 bits and are
    exact, and so is TensorRT. An x86 CPU whose flags cannot be read counts as saturating.
    """
    if platform.machine().lower() not in _X86:
        return False
    try:
        flags = Path(cpuinfo).read_text()
    except OSError:
        return True
    return not any(flag in flags.split() for flag in _VNNI_FLAGS)


def fused_kernel_inexactness(target: Target | str | None) -> list[str]:
    """Why ONNX Runtime's fused CPU integer kernels may compute an exported Q/DQ graph other
    than as written; empty when they compute it up to rounding ties (an ``onnxruntime``-target
    model on a 32-bit-accumulating CPU: convs and GEMMs exactly, but QLinearAdd requantizes in
    its own float order, so an element on a tie can land one step away)."""
    causes = []
    if target != Target.ONNXRUNTIME:
        causes.append(
            "they round this TensorRT model's float biases to INT32 (for ONNX Runtime on the "
            "CPU export with quant.target=onnxruntime)"
        )
    if int8_kernels_may_saturate():
        causes.append("this x86 CPU has no VNNI, and their 8-bit products saturate here")
    return causes
