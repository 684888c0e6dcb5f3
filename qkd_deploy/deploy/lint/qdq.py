"""Q/DQ node helpers the rules share: the quantized types, a Q/DQ's type, granularity, axis and
scales, the weights it feeds, the opset it needs, and whether a stored tensor's data fits.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from qkd_deploy.deploy.lint.graph import DQ_OP, PASS_THROUGH, Q_OP, WEIGHTED, Graph, Node

FP8_OK = TensorProto.FLOAT8E4M3FN
FP4 = getattr(TensorProto, "FLOAT4E2M1", -1)
FP8_TYPES = {
    TensorProto.FLOAT8E4M3FN,
    TensorProto.FLOAT8E4M3FNUZ,
    TensorProto.FLOAT8E5M2,
    TensorProto.FLOAT8E5M2FNUZ,
}
FOUR_BIT_TYPES = {TensorProto.INT4, TensorProto.UINT4}
PACKED_4_BIT = {*FOUR_BIT_TYPES, FP4}
SCALE_TYPES_TRT10 = {TensorProto.FLOAT16, TensorProto.BFLOAT16}


def type_name(dtype: int) -> str:
    """``INT8``, ..., or ``data type 79`` for a number ONNX does not define."""
    try:
        return TensorProto.DataType.Name(dtype)
    except ValueError:
        return f"data type {dtype}"


def stored_data_problem(tensor: TensorProto) -> str | None:
    """What is wrong with an inline tensor's data for its dims and type; None when it fits,
    when it is external, or when its type is not one onnx knows (MODEL-CHECKER reports that)."""
    dims = list(tensor.dims)
    if tensor.data_location == TensorProto.EXTERNAL or tensor.data_type == TensorProto.STRING:
        return None
    if any(d < 0 for d in dims):
        return f"negative dimension in {dims}"
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:  # undefined or unknown data type
        return None
    count = math.prod(dims)
    if tensor.HasField("raw_data"):
        bits = 4 if tensor.data_type in PACKED_4_BIT else 8 * itemsize
        needed, stored = (count * bits + 7) // 8, len(tensor.raw_data)
        if stored != needed:
            name = type_name(tensor.data_type)
            return f"{stored} bytes of raw data, but {dims} {name} takes {needed}"
        return None
    try:
        numpy_helper.to_array(tensor)
    except Exception as error:
        return f"its {type_name(tensor.data_type)} data does not fit dims {dims} ({error})"
    return None


def as_numbers(value: np.ndarray | None) -> np.ndarray | None:
    """A constant's values as float64; None when unknown or not numbers (strings, ...)."""
    if value is None or value.dtype.kind not in "biuf":
        return None
    return value.astype(np.float64)


def quant_type(g: Graph, node: Node) -> int | None:
    """The quantized element type as TensorRT sees it (the parser's default is INT8)."""
    if node.op == DQ_OP:
        source = g.behind(node.input(0), Q_OP)
        if source is not None:
            return quant_type(g, source)
        return g.elem_type(node.input(0)) or g.elem_type(node.input(2))
    output_dtype = node.int_attr("output_dtype", 0)
    if output_dtype:
        return output_dtype
    return g.elem_type(node.input(2)) if node.input(2) else TensorProto.INT8


def fed_by_q(g: Graph, node: Node) -> bool:
    """A DequantizeLinear of a QuantizeLinear: its type and granularity are checked at the Q."""
    return node.op == DQ_OP and g.behind(node.input(0), Q_OP) is not None


def shared_with_q(g: Graph, node: Node, index: int) -> bool:
    """A DQ whose scale (1) or zero point (2) is the very tensor of its Q: reported at the Q."""
    source = g.behind(node.input(0), Q_OP) if node.op == DQ_OP else None
    return source is not None and source.input(index) == node.input(index)


def dequantized_uses(g: Graph, node: Node) -> list[tuple[Node, int]]:
    """Consumers of the dequantized values of a DQ, or of the DQs that follow a Q."""
    if node.op == DQ_OP:
        return list(g.ahead(node.output))
    return [use for dq, _ in g.ahead(node.output) if dq.op == DQ_OP for use in g.ahead(dq.output)]


def quantizes_constant(g: Graph, node: Node) -> bool:
    """Whether the quantized data is a weight (a constant), through the Q of a Q/DQ pair."""
    source = g.behind(node.input(0), Q_OP) if node.op == DQ_OP else None
    return g.is_constant((node if source is None else source).input(0))


def granularity_of(g: Graph, node: Node) -> str | None:
    """'tensor', 'channel' or 'block' from the scale's shape (None when unknown)."""
    if node.int_attr("block_size", 0):
        return "block"
    shape = g.shape(node.input(1))
    if shape is None:
        return None
    if len(shape) >= 2:
        return "block"
    size = int(np.prod([d or 0 for d in shape])) if shape else 1
    return "channel" if len(shape) == 1 and size != 1 else "tensor"


def axis_of(g: Graph, node: Node) -> int | None:
    """The ``axis`` attribute, made non-negative with the input's rank (it may still lie
    outside the rank); None when unknown or not an INT."""
    axis = node.int_attr("axis", 1)
    shape = g.shape(node.input(0))
    if axis is None or axis >= 0:
        return axis
    return axis + len(shape) if shape is not None else None


def expected_weight_axis(g: Graph, consumer: Node) -> int | None:
    """The output-channel axis of a weight [TRT-EQ 8.6: Per-Tensor and Per-Channel Quantization;
    ONNX Support (Gemm: axis 0 with transB=1 as PyTorch exports it, axis 1 without)]."""
    if consumer.op == "Conv":
        return 0
    if consumer.op == "ConvTranspose":
        return 1
    if consumer.op == "Gemm":
        return 0 if consumer.int_attr("transB", 0) else 1
    shape = g.shape(consumer.input(1))
    return len(shape) - 1 if shape else None


def weight_uses(
    g: Graph, name: str, seen: frozenset[int] = frozenset()
) -> Iterator[tuple[Node, list[Node] | None]]:
    """Weighted ops that take ``name`` as their weight input, looking forward through
    pass-through ops (once each), each with the Transposes on the way; None instead when another
    op there changes the layout (Reshape, Flatten, ...), so the weight's axes are not followed."""
    for node in g.consumers_of(name):
        if node.op not in PASS_THROUGH:
            if WEIGHTED.get(node.op) is not None and node.input(WEIGHTED[node.op]) == name:
                yield node, []
            continue
        if node.index in seen:
            continue
        for use, transposes in weight_uses(g, node.output, seen | {node.index}):
            if node.op == "Transpose" and transposes is not None:
                transposes = [node, *transposes]
            elif node.op != "Identity":
                transposes = None
            yield use, transposes


def axis_before(g: Graph, transposes: list[Node], axis: int) -> int | None:
    """``axis`` of the tensor after ``transposes`` as an axis of the tensor before them."""
    for transpose in reversed(transposes):
        perm = transpose.ints_attr("perm")
        if perm is None:  # the default reverses the dimensions (or a malformed perm)
            shape = g.shape(transpose.input(0))
            perm = list(reversed(range(len(shape)))) if shape is not None else None
        if perm is None or not 0 <= axis < len(perm):
            return None
        axis = perm[axis]
    return axis


def scales_equal(a: np.ndarray | None, b: np.ndarray | None) -> bool | None:
    if a is None or b is None:
        return None
    try:
        return bool(np.array_equal(*np.broadcast_arrays(a, b)))
    except ValueError:  # shapes that do not broadcast
        return False


def min_opset(g: Graph, node: Node) -> tuple[int, str]:
    """The lowest default-domain opset that defines this Q/DQ [ONNX: QuantizeLinear versions]."""
    dtype = quant_type(g, node)
    needs = [(10, "QuantizeLinear/DequantizeLinear")]
    if granularity_of(g, node) == "channel":
        needs.append((13, "per-axis quantization (the axis attribute)"))
    if dtype in FP8_TYPES:
        needs.append((19, "FP8 quantization"))
    if dtype in FOUR_BIT_TYPES or dtype in (TensorProto.INT16, TensorProto.UINT16):
        needs.append((21, f"{type_name(dtype)} quantization"))
    if granularity_of(g, node) == "block":
        needs.append((21, "block quantization"))
    if dtype == FP4:
        needs.append((23, "FP4 quantization"))
    return max(needs)
