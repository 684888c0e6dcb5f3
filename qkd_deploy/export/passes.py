"""Graph passes on exported ONNX models, each a small function from model to model.

- ``to_opset17``: TensorRT 8.6 (JetPack 6.0) parses opset <= 17. onnx's version converter alone
  leaves opset-18 Reduce* nodes invalid (axes as an input, ``noop_with_empty_axes``), so this
  pass rewrites them and refuses ops whose opset-18 form it does not know.
  A Split with ``num_outputs`` (opset 18) becomes the opset-13 Split into sizes (an initializer).
- ``pack_int4_weights``: weights of <= 4 bits feeding MatMul/Gemm become INT4 initializers
  behind DequantizeLinear (opset 21); TensorRT takes INT4 only as weight-only GEMM quantization,
  so conv weights stay on their INT8 container.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter

from qkd_deploy.errors import UserError

INT4_OPSET = 21  # INT4 in QuantizeLinear/DequantizeLinear from opset 21 on

# ops whose opset-17 and opset-18 definitions are the same for what the exporter writes
_SAME_IN_17 = {
    "Add",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Clip",
    "Concat",
    "Constant",
    "Conv",
    "DequantizeLinear",
    "Div",
    "Flatten",
    "Gemm",
    "GlobalAveragePool",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "MatMul",
    "MaxPool",
    "Mul",
    "QuantizeLinear",
    "Relu",
    "Reshape",
    "Shape",
    "Sigmoid",
    "Softmax",
    "Squeeze",
    "Sub",
    "Transpose",
    "Unsqueeze",
    "Gather",
}
# Reduce ops whose axes moved from attribute to input in opset 18
_REDUCE_18 = {
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
}


def opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def to_opset17(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph at opset 17, for TensorRT 8.6 (JetPack 6.0)."""
    if opset(model) <= 17:
        return model
    if opset(model) > 18:
        raise UserError(
            f"down-conversion to opset 17 starts from opset 18, not {opset(model)}; "
            "export with opset 18 (INT4 weights need 21 and TensorRT >= 10)"
        )
    unknown = sorted({n.op_type for n in model.graph.node} - _SAME_IN_17 - _REDUCE_18 - {"Split"})
    if unknown:
        raise UserError(
            f"cannot down-convert ops {unknown} to opset 17 (their opset-18 form "
            "differs); deploy with TensorRT >= 10, which reads opset 18"
        )
    model = onnx.ModelProto.FromString(model.SerializeToString())
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in _REDUCE_18:
            _axes_input_to_attribute(node, constants)
        elif node.op_type == "Split":
            _split_sizes_input(model, node)
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = 17
    _drop_unused_initializers(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def _axes_input_to_attribute(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> None:
    attrs = {a.name: a for a in node.attribute}
    noop = attrs.pop("noop_with_empty_axes", None)
    axes_name = node.input[1] if len(node.input) > 1 and node.input[1] else None
    if axes_name is None:
        if noop is not None and noop.i:
            raise UserError(
                f"{node.name}: a Reduce with noop_with_empty_axes=1 has no opset-17 form"
            )
        axes = None
    elif axes_name in constants:
        axes = [int(a) for a in constants[axes_name].reshape(-1)]
    else:
        raise UserError(
            f"{node.name}: reduction axes come from a computed tensor; opset 17 needs them constant"
        )
    del node.input[1:]
    del node.attribute[:]
    node.attribute.extend(attrs.values())
    if axes is not None:
        node.attribute.append(helper.make_attribute("axes", axes))


def _split_sizes_input(model: onnx.ModelProto, node: onnx.NodeProto) -> None:
    """Opset 18's ``num_outputs`` (chunks of ceil(size / n), the last one smaller) as the sizes
    input opset 13 takes; the split axis must have a static size."""
    attrs = {a.name: a for a in node.attribute}
    if "num_outputs" not in attrs:
        return
    parts = attrs["num_outputs"].i
    axis = attrs["axis"].i if "axis" in attrs else 0
    shapes = onnx.shape_inference.infer_shapes(model).graph.value_info
    shape = {v.name: v.type.tensor_type.shape for v in [*shapes, *model.graph.input]}
    dims = shape.get(node.input[0])
    size = dims.dim[axis % len(dims.dim)].dim_value if dims is not None and dims.dim else 0
    if not size:
        raise UserError(
            f"{node.name}: a Split into {parts} parts of a dimension of unknown size has no "
            "opset-17 form; deploy with TensorRT >= 10, which reads opset 18"
        )
    chunk = -(-size // parts)
    sizes = [min(chunk, size - i * chunk) for i in range(parts)]
    name = f"{node.name}_sizes"
    model.graph.initializer.append(numpy_helper.from_array(np.array(sizes, np.int64), name))
    node.input.append(name)
    kept = [a for a in node.attribute if a.name != "num_outputs"]
    del node.attribute[:]
    node.attribute.extend(kept)


def pack_int4_weights(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """Store the named integer weights (values in -8..7) as INT4, at opset 21, where TensorRT
    takes INT4: as the weight input of a MatMul/Gemm, fed by the weight's only DequantizeLinear
    directly or through one Transpose (the weight is then stored transposed and the Transpose
    dropped, as a Linear on an (N, T, C) input exports). Other weights (conv weights, weights
    reshaped or shared on their way) stay on their INT8 container; with none left to pack the
    model is returned unchanged."""
    converted = (
        version_converter.convert_version(model, INT4_OPSET) if opset(model) < INT4_OPSET else model
    )
    consumers = _consumers(converted)
    routes = {name: _gemm_weight_route(name, consumers) for name in sorted(names)}
    routes = {name: route for name, route in routes.items() if route is not None}
    if not routes:
        return model
    model = converted
    initializers = {i.name: i for i in model.graph.initializer}
    for name, (dq, transpose) in routes.items():
        values = numpy_helper.to_array(initializers[name])
        if values.min() < -8 or values.max() > 7:
            raise UserError(
                f"{name} holds values outside the INT4 range -8..7, so it cannot be stored as "
                "INT4; set export.int4_gemm_weights=false"
            )
        if transpose is not None:
            values = _fold_transpose(model, dq, transpose, values)
        initializers[name].CopyFrom(
            helper.make_tensor(
                name, onnx.TensorProto.INT4, values.shape, values.reshape(-1).tolist()
            )
        )
        del dq.input[2:]  # the zero point defaults to 0 and would have to be INT4 too
    _drop_unused_initializers(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def _gemm_weight_route(
    name: str, consumers: dict[str, list[onnx.NodeProto]]
) -> tuple[onnx.NodeProto, onnx.NodeProto | None] | None:
    """(DequantizeLinear, Transpose or None) from weight ``name`` to the MatMul/Gemm weight
    inputs it feeds; None when it is used any other way."""
    users = consumers.get(name, [])
    if len(users) != 1 or users[0].op_type != "DequantizeLinear" or users[0].input[0] != name:
        return None
    dq, transpose = users[0], None
    if any(a.name == "block_size" and a.i for a in dq.attribute):
        return None  # blocked scales would have to be transposed too
    targets = consumers.get(dq.output[0], [])
    if len(targets) == 1 and targets[0].op_type == "Transpose":
        transpose = targets[0]
        targets = consumers.get(transpose.output[0], [])
    weight = (transpose or dq).output[0]
    if not targets or any(
        t.op_type not in ("MatMul", "Gemm") or t.input[1] != weight for t in targets
    ):
        return None
    return dq, transpose


def _fold_transpose(
    model: onnx.ModelProto, dq: onnx.NodeProto, transpose: onnx.NodeProto, values: np.ndarray
) -> np.ndarray:
    """Drop ``transpose`` (DQ -> Transpose): the DQ writes its output from the weight values
    transposed (returned) along the remapped axis. Dequantization is elementwise, so the result
    is the same numbers."""
    perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
    perm = perm or list(reversed(range(values.ndim)))  # the default reverses the dimensions
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % values.ndim
    kept = [a for a in dq.attribute if a.name != "axis"]
    del dq.attribute[:]
    dq.attribute.extend([*kept, helper.make_attribute("axis", perm.index(axis))])
    stale = dq.output[0]
    dq.output[0] = transpose.output[0]
    model.graph.node.remove(transpose)
    kept_info = [v for v in model.graph.value_info if v.name != stale]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept_info)
    return values.transpose(perm)


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
