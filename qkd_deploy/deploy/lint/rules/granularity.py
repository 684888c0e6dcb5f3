"""Granularity and weight rules: per-tensor activations, per-channel weight axes and scale
shapes, block and INT4 quantization, float weights quantized in the graph.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from onnx import TensorProto

from qkd_deploy.deploy.lint.graph import DQ_OP, GEMM_OPS, Q_OP, Graph
from qkd_deploy.deploy.lint.qdq import (
    FOUR_BIT_TYPES,
    axis_before,
    axis_of,
    dequantized_uses,
    expected_weight_axis,
    fed_by_q,
    granularity_of,
    quant_type,
    quantizes_constant,
    type_name,
    weight_uses,
)
from qkd_deploy.deploy.lint.registry import Hit, lint_rule


@lint_rule(
    "QDQ-ACTIVATION-PER-CHANNEL",
    "error",
    "activations are quantized per tensor (scalar scale)",
    "TRT-EQ 8.6: Per-Tensor and Per-Channel Quantization; OTRT importer",
    "quantize activations per tensor; per-channel and block scales are for weights",
)
def _activation_per_channel(g: Graph) -> Iterator[Hit]:
    for node in g.qdq:
        granularity = None if fed_by_q(g, node) else granularity_of(g, node)
        if granularity in ("channel", "block") and not quantizes_constant(g, node):
            yield Hit(node.label, f"{granularity} quantization of activation {node.input(0)!r}")


@lint_rule(
    "QDQ-WEIGHT-AXIS",
    "error",
    "per-channel weight scales run along the output-channel axis: "
    "Conv 0, ConvTranspose 1, Gemm 0 (transB=1) else 1, MatMul last",
    "TRT-EQ 8.6: Per-Tensor and Per-Channel Quantization; TRT-EQ: ONNX Support (Gemm)",
    "quantize the weight per output channel",
)
def _weight_axis(g: Graph) -> Iterator[Hit]:
    for node in g.qdq:
        if node.op != DQ_OP or granularity_of(g, node) != "channel":
            continue
        axis = axis_of(g, node)
        for consumer, transposes in weight_uses(g, node.output):
            expected = expected_weight_axis(g, consumer)
            if transposes is None or expected is None:
                continue  # unknown: a layout change on the way, or the weight's rank
            expected = axis_before(g, transposes, expected)
            if None not in (axis, expected) and axis != expected:
                via = ", ".join(repr(t.label) for t in transposes)
                yield Hit(
                    node.label,
                    f"axis {axis} on the weight of {consumer.op} {consumer.label!r}, whose "
                    f"output-channel axis is {expected}"
                    + (f" ahead of Transpose {via}" if via else ""),
                    fix=f"quantize the weight per output channel: axis={expected}",
                )


@lint_rule(
    "QDQ-SCALE-SHAPE",
    "error",
    "a per-channel scale has one coefficient per channel",
    "TRT-OPS: scale; OTRT importer: 'The number of scales is not equal to the number of output "
    "channels'",
    "give one scale per element of the quantization axis",
)
def _scale_shape(g: Graph) -> Iterator[Hit]:
    for node in g.qdq:
        shape, scales, axis = g.shape(node.input(0)), g.shape(node.input(1)), axis_of(g, node)
        if granularity_of(g, node) != "channel" or not shape or not scales or axis is None:
            continue
        if not 0 <= axis < len(shape):
            given = node.int_attr("axis", 1)
            yield Hit(node.label, f"axis {given} is out of range for rank {len(shape)}")
        elif None not in (shape[axis], scales[0]) and shape[axis] != scales[0]:
            yield Hit(node.label, f"{scales[0]} scales for {shape[axis]} channels on axis {axis}")


@lint_rule(
    "QDQ-BLOCK",
    "error",
    "block quantization only for INT4 weights, one blocked dimension, a positive block_size",
    "TRT-OPS 10.0-10.3: Quantize/Dequantize 'block quantization (supported for kINT4 only)'; "
    "OTRT importer: 'Only a single blocking dimension is allowed'; ONNX: block_size",
    "use per-channel INT8, or INT4 blocks along one axis of a GEMM weight",
)
def _block(g: Graph) -> Iterator[Hit]:
    for node in g.qdq:
        block_size = node.int_attr("block_size", 0)
        if block_size is not None and block_size < 0:
            yield Hit(node.label, f"block_size {block_size} is negative")
        if fed_by_q(g, node) or granularity_of(g, node) != "block":
            continue
        dtype = quant_type(g, node)
        if dtype != TensorProto.INT4:
            name = type_name(dtype) if dtype else "unknown-type"
            yield Hit(
                node.label,
                f"block quantization of {name}: TensorRT 10.0-10.3 (JetPack "
                "6.x) block-quantizes INT4 weights only",
            )
        shape, scales = g.shape(node.input(0)), g.shape(node.input(1))
        if shape and scales and len(shape) == len(scales):
            blocked = [i for i, (d, s) in enumerate(zip(shape, scales, strict=True)) if d != s]
            if len(blocked) > 1:
                yield Hit(node.label, f"blocks along axes {blocked}: one blocked axis allowed")


@lint_rule(
    "QDQ-INT4",
    "error",
    "INT4 is weight-only quantization of MatMul/Gemm weights (not "
    "activations, not Conv), with an even element count",
    "TRT-QT: Supported Data Types 'INT4 ... weight-only quantization', Weight-Only "
    "Quantization; OTRT importer: 4-bit packing",
    "keep INT4 for MatMul/Gemm weights; use INT8 elsewhere",
)
def _int4(g: Graph) -> Iterator[Hit]:
    for node in g.qdq:
        if fed_by_q(g, node) or quant_type(g, node) not in FOUR_BIT_TYPES:
            continue
        shape = g.shape(node.input(0))
        if not quantizes_constant(g, node):
            yield Hit(node.label, f"INT4 on activation {node.input(0)!r}: INT4 is weight-only")
        elif any(c.op not in GEMM_OPS for c, _ in dequantized_uses(g, node)):
            yield Hit(
                node.label,
                "INT4 weights feed a non-GEMM op: TensorRT's INT4 weight-only "
                "quantization covers MatMul/Gemm",
                fix="store Conv weights in an INT8 container",
            )
        if shape and None not in shape and int(np.prod(shape)) % 2:
            yield Hit(
                node.label,
                f"INT4 tensor {shape} has an odd number of elements",
                fix="pad the weight to an even element count",
            )


@lint_rule(
    "QDQ-WEIGHT-FLOAT",
    "warning",
    "a float weight quantized by a Q in the graph",
    "TRT-EQ: Quantized Weights; DESIGN: Export rules",
    "store weights as INT8 initializers with DequantizeLinear only (smaller file, no Q on "
    "constants)",
)
def _weight_float(g: Graph) -> Iterator[Hit]:
    for node in g.qdq:
        if node.op == Q_OP and g.is_constant(node.input(0)):
            yield Hit(node.label, f"QuantizeLinear on constant float weight {node.input(0)!r}")
