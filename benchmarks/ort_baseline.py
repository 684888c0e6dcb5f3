"""The baseline every benchmark compares with: ONNX Runtime's own ``quantize_static`` of a float
ONNX model, with its CPU defaults (QDQ format, UINT8 activations, INT8 per-channel weights).

On an x86 CPU without VNNI it sets ``reduce_range`` (7-bit weights), ONNX Runtime's advice for
such CPUs, whose 8-bit kernels otherwise saturate (the INT8 Fashion-MNIST student lost 3.8
points to it on this project's AVX2-only machine)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from qkd_deploy.runtime.onnxruntime import int8_kernels_may_saturate

CALIBRATION_METHODS = {
    "MinMax": CalibrationMethod.MinMax,
    "Entropy": CalibrationMethod.Entropy,
    "Percentile": CalibrationMethod.Percentile,
}


class _Batches(CalibrationDataReader):
    """Calibration batches of equal size (the histogram calibrators stack them)."""

    def __init__(self, images: np.ndarray, input_name: str, batch: int) -> None:
        full = len(images) - len(images) % batch or len(images)
        self._batches = iter([{input_name: images[i : i + batch]} for i in range(0, full, batch)])

    def get_next(self):
        return next(self._batches, None)


def ort_quantize_static(
    float_model: Path,
    out: Path,
    images: np.ndarray,
    input_name: str,
    method: str = "MinMax",
    batch: int = 64,
) -> Path:
    """``float_model`` quantized by ONNX Runtime, calibrated on ``images`` with ``method`` (a key
    of ``CALIBRATION_METHODS``); written to ``out``."""
    quantize_static(
        str(float_model),
        str(out),
        _Batches(images, input_name, batch),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CALIBRATION_METHODS[method],
        reduce_range=int8_kernels_may_saturate(),
    )
    return out
