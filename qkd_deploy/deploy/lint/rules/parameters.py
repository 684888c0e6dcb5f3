"""Q/DQ parameter rules: the scale (constant, value, type), the quantized type, the zero point."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from onnx import TensorProto

from qkd_deploy.deploy.lint.graph import Q_OP, Graph
from qkd_deploy.deploy.lint.qdq import (
    FP4,
    FP8_OK,
    SCALE_TYPES_TRT10,
    as_numbers,
    fed_by_q,
    quant_type,
    shared_with_q,
    type_name,
)
from qkd_deploy.deploy.lint.registry import Hit, lint_rule


@lint_rule(
    "QDQ-SCALE-CONSTANT",
    "error",
    "the Q/DQ scale must be a build-time constant",
    "TRT-OPS: Quantize/Dequantize, input 'scale'",
    "store the scale as an initializer and constant-fold the graph "
    "(polygraphy surgeon sanitize --fold-constants)",
)
def _scale_constant(g: Graph) -> Iterator[Hit]:
    for node in g.qdq:
        if shared_with_q(g, node, 1):
            continue
        if not node.input(1) or not g.is_constant(node.input(1)):
            yield Hit(node.label, f"scale {node.input(1)!r} is computed at run time")


@lint_rule(
    "QDQ-SCALE-VALUE",
    "error",
    "every scale coefficient must be finite and > 0",
    "TRT-OPS: scale; OTRT importer: 'Scale coefficients must all be positive'",
    "recalibrate; clamp scales to a small positive minimum (a zero range gives scale 0)",
)
def _scale_value(g: Graph) -> Iterator[Hit]:
    for node in g.qdq:
        values = None if shared_with_q(g, node, 1) else as_numbers(g.value(node.input(1)))
        if values is None:  # unknown, or not numbers: QDQ-SCALE-DTYPE reports the type
            continue
        if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values <= 0):
            smallest = values.min() if values.size else "none"
            yield Hit(
                node.label,
                f"scale {node.input(1)!r} is empty, zero, negative or not finite (min {smallest})",
            )


@lint_rule(
    "QDQ-SCALE-DTYPE",
    "error",
    "scales are FP32 (FP16/BF16 only on TensorRT 10: warning)",
    "TRT-OPS: Quantize/Dequantize data types, 8.6 and 10.x",
    "store scales as FP32",
)
def _scale_dtype(g: Graph) -> Iterator[Hit]:
    for node in g.qdq:
        dtype = None if shared_with_q(g, node, 1) else g.elem_type(node.input(1))
        if dtype in SCALE_TYPES_TRT10:
            yield Hit(
                node.label,
                f"{type_name(dtype)} scale: TensorRT 8.6 (JetPack 6.0) takes FP32 scales only",
                severity="warning",
            )
        elif dtype not in (None, TensorProto.FLOAT):
            yield Hit(
                node.label, f"{type_name(dtype)} scale: TensorRT takes FP32 (FP16/BF16 on 10.x)"
            )


_DTYPE_HITS: dict[int, tuple[str, str, str]] = {  # dtype -> severity, message, fix
    TensorProto.UINT8: (
        "error",
        "UINT8 Q/DQ: TensorRT quantizes to signed INT8 (UINT8 only as network I/O or on DLA)",
        "export with target tensorrt / signed symmetric (INT8, zero point 0; ONNX Runtime: "
        "activation_type=QuantType.QInt8 with ActivationSymmetric=True)",
    ),
    TensorProto.INT32: (
        "error",
        "INT32 DequantizeLinear (quantized bias): TensorRT rejects it ('only activation "
        "types allowed as input to this layer')",
        "keep the bias float, TensorRT folds it into the INT8 kernel (ONNX Runtime: extra_options "
        "QuantizeBias=False)",
    ),
    FP8_OK: (
        "info",
        "FP8 needs TensorRT's FP8 path and an FP8 GPU (Ada/Hopper or newer; not Jetson Orin)",
        "use INT8 for Jetson targets",
    ),
    FP4: (
        "info",
        "FP4 needs TensorRT 10 and a Blackwell GPU (not Jetson Orin)",
        "use INT8 for Jetson targets",
    ),
}


@lint_rule(
    "QDQ-DTYPE",
    "error",
    "Q/DQ types: INT8, INT4 (weights), FP8E4M3, FP4E2M1 (info: not on "
    "Jetson Orin); UINT8, INT32 (bias) and others are errors",
    "OTRT: operators.md DequantizeLinear 'INT8, FP8, FP4, INT4', 'UINT8 is only supported as "
    "network input or output'; TRT-QT: Supported Data Types",
    "quantize to signed INT8",
)
def _dtype(g: Graph) -> Iterator[Hit]:
    for node in g.qdq:
        dtype = None if fed_by_q(g, node) else quant_type(g, node)  # a pair: checked at its Q
        if dtype in (None, TensorProto.INT8, TensorProto.INT4):
            continue
        name = type_name(dtype)
        default = ("error", f"{name} Q/DQ: TensorRT quantizes to INT8, INT4, FP8 or FP4", None)
        severity, message, fix = _DTYPE_HITS.get(dtype, default)
        yield Hit(node.label, message, severity, fix)


@lint_rule(
    "QDQ-ZERO-POINT",
    "error",
    "zero point absent or constant zeros (symmetric only)",
    "TRT-OPS: zero_point; OTRT: operators.md 'zero_point must be zero'",
    "quantize symmetrically with zero point 0 (qkd-deploy export --target tensorrt; ONNX "
    "Runtime: extra_options ActivationSymmetric=True, WeightSymmetric=True)",
)
def _zero_point(g: Graph) -> Iterator[Hit]:
    for node in g.qdq:
        zero_point = node.input(2)
        if not zero_point or shared_with_q(g, node, 2):
            continue
        if not g.is_constant(zero_point):
            yield Hit(node.label, f"zero point {zero_point!r} is not a constant")
            continue
        value = as_numbers(g.value(zero_point))
        flat = value.ravel() if value is not None else np.zeros(0)
        nonzero = flat[flat != 0]
        if nonzero.size:
            yield Hit(
                node.label, f"zero point {zero_point!r} is non-zero ({nonzero[0]:g}): asymmetric"
            )


@lint_rule(
    "QDQ-IMPLICIT-UINT8",
    "warning",
    "a Q without zero point or output_dtype is UINT8 in ONNX "
    "(ONNX Runtime clamps negatives to 0) but INT8 in TensorRT",
    "ONNX: QuantizeLinear y_zero_point default uint8; OTRT importer: default INT8",
    "add an INT8 zero point of 0 so both runtimes quantize to signed INT8",
)
def _implicit_uint8(g: Graph) -> Iterator[Hit]:
    for node in g.qdq:
        if node.op == Q_OP and not node.input(2) and not node.attr("output_dtype", 0):
            yield Hit(node.label, "no zero point: UINT8 in ONNX Runtime, INT8 in TensorRT")
