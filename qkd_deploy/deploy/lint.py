"""`qkd-deploy lint MODEL.onnx`: check Q/DQ ONNX models against TensorRT's explicit quantization.

Torch-free (stdlib, numpy, onnx), so it runs on a Jetson and on models qkd-deploy did not make
(e.g. ONNX Runtime's ``quantize_static`` output). Each rule is one small function registered with
its severity, documentation source and default fix (``RULES`` lists them); every finding names the
node, the rule and the fix. Only the top-level graph is checked; weights stored as external data
are never read (the rules need their dims, not their values).

Sources, cited per rule as [KEY: section]:
  TRT-EQ   TensorRT Developer Guide, "Explicit Quantization" (8.6 and 10.x): sections "Quantized
           Weights", "ONNX Support", "TensorRT Processing of Q/DQ Networks", "Q/DQ Layer-Placement
           Recommendations"; 8.6 "Per-Tensor and Per-Channel Quantization".
  TRT-QT   TensorRT Developer Guide, "Working with Quantized Types" (10.x): supported types, INT4
           weight-only quantization, block quantization.
  TRT-OPS  TensorRT operator reference "Quantize" / "Dequantize" (IQuantizeLayer /
           IDequantizeLayer API docs): scale, zero point, types, granularity.
  TRT-DYN  TensorRT Developer Guide, "Working with Dynamic Shapes": "Optimization Profiles",
           "Restrictions for Dynamic Shapes".
  OTRT     onnx-tensorrt docs/operators.md (QuantizeLinear/DequantizeLinear rows, type notes,
           max opset per release) and its QuantizeLinear/DequantizeLinear importer checks.
  ONNX     ONNX operator specs QuantizeLinear/DequantizeLinear (opsets 10, 13, 19, 21, 23).
  DESIGN   this project's export rules (not TensorRT's).

The linter never raises on a malformed model: ONNX's checker (full, with shape inference) runs
first and what it rejects is an error; every rule reads attributes by their declared type, walks
the graph without following cycles, and a rule that still fails is reported as an error of that
rule instead of a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, numpy_helper

from qkd_deploy.bench.layer_precision import LayerPrecision, format_table, layer_precision
from qkd_deploy.errors import UserError
from qkd_deploy.export import layer_record
from qkd_deploy.fileio import load_onnx_graph

SEVERITIES = ("error", "warning", "info")
Q_OP, DQ_OP = "QuantizeLinear", "DequantizeLinear"

# Weighted ops and the input index of their weight [TRT-EQ: Q/DQ Layer-Placement Recommendations].
WEIGHTED = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
GEMM_OPS = ("Gemm", "MatMul")
# Data-movement ops that commute with Q/DQ: TensorRT propagates DQ forward and Q backward through
# them [TRT-EQ: TensorRT Processing of Q/DQ Networks], so a DQ behind them still quantizes the op.
PASS_THROUGH = {
    "Identity",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Transpose",
    "MaxPool",
    "Slice",
}
# Pre-quantized (QOperator) ops TensorRT cannot import [TRT-EQ: ONNX Support; OTRT operators.md].
QOPERATOR_OPS = {"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "QGemm"}

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
TRT86_MAX_OPSET = 17
MAX_ONNX_BYTES = 2**31 - 1  # protobuf cannot parse a larger message: no valid .onnx is larger


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" | "warning" | "info"
    rule: str  # short stable id, e.g. "QDQ-ZERO-POINT"
    node: str  # node name (or op_type#index if unnamed) or tensor name
    message: str  # what is wrong
    fix: str  # how to fix it


def _text(value: str | bytes) -> str:
    """A string field as text: protobuf hands over bytes that are not valid UTF-8."""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


class _Hit(NamedTuple):
    node: str
    message: str
    severity: str | None = None  # None: the rule's severity
    fix: str | None = None  # None: the rule's fix


@dataclass(frozen=True, eq=False)
class _Node:
    index: int
    proto: onnx.NodeProto

    @property
    def op(self) -> str:
        return _text(self.proto.op_type)

    @property
    def inputs(self) -> list[str]:
        return list(self.proto.input)

    @property
    def output(self) -> str:
        return self.proto.output[0] if self.proto.output else ""

    @property
    def label(self) -> str:
        return self.proto.name or f"{self.op}#{self.index}"

    def input(self, i: int) -> str:
        return self.proto.input[i] if i < len(self.proto.input) else ""

    def attr(self, name: str, default: object = None) -> object:
        """The attribute's value; ``default`` when it is absent, None when its type is not one
        ONNX defines (the checker reports that)."""
        attribute = self._attribute(name)
        if attribute is None:
            return default
        try:
            return onnx.helper.get_attribute_value(attribute)
        except ValueError:
            return None

    def int_attr(self, name: str, default: int | None = None) -> int | None:
        """An INT attribute's value; ``default`` when absent, None when it is not an INT."""
        attribute = self._attribute(name)
        if attribute is None:
            return default
        return attribute.i if attribute.type == AttributeProto.INT else None

    def ints_attr(self, name: str) -> list[int] | None:
        """An INTS attribute's values; None when absent or not INTS."""
        attribute = self._attribute(name)
        ok = attribute is not None and attribute.type == AttributeProto.INTS
        return list(attribute.ints) if ok else None

    def _attribute(self, name: str) -> AttributeProto | None:
        return next((a for a in self.proto.attribute if a.name == name), None)


class _Graph:
    """Producers, consumers, constants, types and shapes of one (top-level) graph."""

    def __init__(self, model: onnx.ModelProto, path: Path | None = None) -> None:
        self.model = model
        self.path = path  # the file, when linting one: external data resolves next to it
        self.graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.nodes = [_Node(i, proto) for i, proto in enumerate(self.graph.node)]
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.inputs = [i for i in self.graph.input if i.name not in self.initializers]
        self.producer = {out: n for n in self.nodes for out in n.proto.output if out}
        self.consumers: dict[str, list[_Node]] = {}
        for node in self.nodes:
            for name in node.inputs:
                self.consumers.setdefault(name, []).append(node)
        self._values: dict[str, np.ndarray | None] = {}
        self.record = layer_record.read(model)  # the exporter's: node -> torch module

    @property
    def name(self) -> str:
        return self.graph.name or "graph"

    @cached_property
    def qdq(self) -> list[_Node]:
        return [n for n in self.nodes if n.op in (Q_OP, DQ_OP)]

    @cached_property
    def constants(self) -> set[str]:
        """Initializers, Constant outputs and outputs of ops whose inputs are all constant."""
        known = set(self.initializers)
        for node in self.nodes:  # ONNX requires topological order
            given = [i for i in node.inputs if i]
            if node.op == "Constant" or (given and all(i in known for i in given)):
                known.update(o for o in node.proto.output if o)
        return known

    @cached_property
    def value_infos(self) -> dict[str, onnx.TypeProto]:
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model, strict_mode=False).graph
        except Exception:  # shape inference is best effort (custom ops, > 2 GB protos)
            inferred = self.graph
        infos = [*inferred.value_info, *inferred.input, *inferred.output]
        return {v.name: v.type for v in infos if v.type.HasField("tensor_type")}

    def is_constant(self, name: str) -> bool:
        return name in self.constants

    def consumers_of(self, name: str) -> list[_Node]:
        return self.consumers.get(name, [])

    def elem_type(self, name: str) -> int | None:
        if name in self.initializers:
            return self.initializers[name].data_type
        tensor = self._constant_attr_tensor(name)
        if tensor is not None:
            return tensor.data_type
        info = self.value_infos.get(name)
        return (info.tensor_type.elem_type or None) if info is not None else None

    def shape(self, name: str) -> tuple[int | None, ...] | None:
        if name in self.initializers:
            return tuple(self.initializers[name].dims)
        value = self.value(name)
        if value is not None:
            return value.shape
        info = self.value_infos.get(name)
        if info is None or not info.tensor_type.HasField("shape"):
            return None
        return tuple(
            d.dim_value if d.HasField("dim_value") else None for d in info.tensor_type.shape.dim
        )

    def value(self, name: str) -> np.ndarray | None:
        """The constant's value, when stored inline (initializer, Constant, Identity of those)."""
        if name not in self._values:
            self._values[name] = self._read_value(name)
        return self._values[name]

    def _read_value(self, name: str) -> np.ndarray | None:
        tensor = self.initializers.get(name)
        if tensor is None:
            tensor = self._constant_attr_tensor(name)
        if tensor is not None:
            if tensor.data_location == TensorProto.EXTERNAL:
                return None
            try:
                return numpy_helper.to_array(tensor)
            except Exception:  # exotic dtype numpy cannot hold
                return None
        node = self.producer.get(name)
        if node is not None and node.op == "Constant":
            values = (
                node.attr(a) for a in ("value_float", "value_floats", "value_int", "value_ints")
            )
            value = next((v for v in values if v is not None), None)
            return None if value is None else np.asarray(value)
        if node is not None and node.op == "Identity":
            return self.value(node.input(0))
        return None

    def _constant_attr_tensor(self, name: str) -> TensorProto | None:
        node = self.producer.get(name)
        if node is None or node.op != "Constant":
            return None
        tensor = node.attr("value")
        return tensor if isinstance(tensor, TensorProto) else None

    def behind(self, name: str, op: str) -> _Node | None:
        """The ``op`` node producing ``name``, looking back through pass-through ops."""
        node = self.skip_pass_through(self.producer.get(name))
        return node if node is not None and node.op == op else None

    def skip_pass_through(self, node: _Node | None) -> _Node | None:
        """The first producer at or behind ``node`` that is not a pass-through op (None at a
        graph input, or in a cycle of pass-through ops, which only a malformed graph has)."""
        seen = set()
        while node is not None and node.op in PASS_THROUGH and node.index not in seen:
            seen.add(node.index)
            node = self.producer.get(node.input(0))
        return None if node is not None and node.index in seen else node

    def ahead(self, name: str, seen: frozenset[int] = frozenset()) -> Iterator[tuple[_Node, int]]:
        """(consumer, input index) pairs of ``name``, looking forward through pass-through ops
        (once each: a malformed graph may loop)."""
        for node in self.consumers_of(name):
            if node.op in PASS_THROUGH:
                if node.index not in seen:
                    yield from self.ahead(node.output, seen | {node.index})
                continue
            yield from ((node, i) for i, inp in enumerate(node.inputs) if inp == name)

    def is_quantized(self, name: str) -> bool:
        return self.behind(name, DQ_OP) is not None

    def module(self, node: _Node) -> str | None:
        """The torch module the exporter recorded for ``node``."""
        return self.record.get(node.proto.name, {}).get("module")

    def float_on_purpose(self, node_label: str) -> bool:
        """Whether the exporter recorded this node as a layer left in float on purpose."""
        return self.record.get(node_label, {}).get("float") is True


# ---- Q/DQ node helpers -------------------------------------------------------------------------


def _type_name(dtype: int) -> str:
    """``INT8``, ..., or ``data type 79`` for a number ONNX does not define."""
    try:
        return TensorProto.DataType.Name(dtype)
    except ValueError:
        return f"data type {dtype}"


def _stored_data_problem(tensor: TensorProto) -> str | None:
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
            name = _type_name(tensor.data_type)
            return f"{stored} bytes of raw data, but {dims} {name} takes {needed}"
        return None
    try:
        numpy_helper.to_array(tensor)
    except Exception as error:
        return f"its {_type_name(tensor.data_type)} data does not fit dims {dims} ({error})"
    return None


def _numbers(value: np.ndarray | None) -> np.ndarray | None:
    """A constant's values as float64; None when unknown or not numbers (strings, ...)."""
    if value is None or value.dtype.kind not in "biuf":
        return None
    return value.astype(np.float64)


def _quant_type(g: _Graph, node: _Node) -> int | None:
    """The quantized element type as TensorRT sees it (the parser's default is INT8)."""
    if node.op == DQ_OP:
        source = g.behind(node.input(0), Q_OP)
        if source is not None:
            return _quant_type(g, source)
        return g.elem_type(node.input(0)) or g.elem_type(node.input(2))
    output_dtype = node.int_attr("output_dtype", 0)
    if output_dtype:
        return output_dtype
    return g.elem_type(node.input(2)) if node.input(2) else TensorProto.INT8


def _fed_by_q(g: _Graph, node: _Node) -> bool:
    """A DequantizeLinear of a QuantizeLinear: its type and granularity are checked at the Q."""
    return node.op == DQ_OP and g.behind(node.input(0), Q_OP) is not None


def _shared_with_q(g: _Graph, node: _Node, index: int) -> bool:
    """A DQ whose scale (1) or zero point (2) is the very tensor of its Q: reported at the Q."""
    source = g.behind(node.input(0), Q_OP) if node.op == DQ_OP else None
    return source is not None and source.input(index) == node.input(index)


def _dequantized_uses(g: _Graph, node: _Node) -> list[tuple[_Node, int]]:
    """Consumers of the dequantized values of a DQ, or of the DQs that follow a Q."""
    if node.op == DQ_OP:
        return list(g.ahead(node.output))
    return [use for dq, _ in g.ahead(node.output) if dq.op == DQ_OP for use in g.ahead(dq.output)]


def _quantizes_constant(g: _Graph, node: _Node) -> bool:
    """Whether the quantized data is a weight (a constant), through the Q of a Q/DQ pair."""
    source = g.behind(node.input(0), Q_OP) if node.op == DQ_OP else None
    return g.is_constant((node if source is None else source).input(0))


def _granularity(g: _Graph, node: _Node) -> str | None:
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


def _axis(g: _Graph, node: _Node) -> int | None:
    """The ``axis`` attribute, made non-negative with the input's rank (it may still lie
    outside the rank); None when unknown or not an INT."""
    axis = node.int_attr("axis", 1)
    shape = g.shape(node.input(0))
    if axis is None or axis >= 0:
        return axis
    return axis + len(shape) if shape is not None else None


def _expected_weight_axis(g: _Graph, consumer: _Node) -> int | None:
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


def _weight_uses(
    g: _Graph, name: str, seen: frozenset[int] = frozenset()
) -> Iterator[tuple[_Node, list[_Node] | None]]:
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
        for use, transposes in _weight_uses(g, node.output, seen | {node.index}):
            if node.op == "Transpose" and transposes is not None:
                transposes = [node, *transposes]
            elif node.op != "Identity":
                transposes = None
            yield use, transposes


def _axis_before(g: _Graph, transposes: list[_Node], axis: int) -> int | None:
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


def _scales_equal(a: np.ndarray | None, b: np.ndarray | None) -> bool | None:
    if a is None or b is None:
        return None
    try:
        return bool(np.array_equal(*np.broadcast_arrays(a, b)))
    except ValueError:  # shapes that do not broadcast
        return False


def _min_opset(g: _Graph, node: _Node) -> tuple[int, str]:
    """The lowest default-domain opset that defines this Q/DQ [ONNX: QuantizeLinear versions]."""
    dtype = _quant_type(g, node)
    needs = [(10, "QuantizeLinear/DequantizeLinear")]
    if _granularity(g, node) == "channel":
        needs.append((13, "per-axis quantization (the axis attribute)"))
    if dtype in FP8_TYPES:
        needs.append((19, "FP8 quantization"))
    if dtype in FOUR_BIT_TYPES or dtype in (TensorProto.INT16, TensorProto.UINT16):
        needs.append((21, f"{_type_name(dtype)} quantization"))
    if _granularity(g, node) == "block":
        needs.append((21, "block quantization"))
    if dtype == FP4:
        needs.append((23, "FP4 quantization"))
    return max(needs)


# ---- rule registry -----------------------------------------------------------------------------

Check = Callable[[_Graph], Iterator[_Hit]]


@dataclass(frozen=True)
class _Rule:
    severity: str
    fix: str
    check: Check


RULES: dict[str, str] = {}  # rule id -> "severity: what it checks [source]"
INTERNAL_RULE = "LINT-INTERNAL"  # a rule that raised: reported as an error, never a traceback
_REGISTRY: dict[str, _Rule] = {}


def _rule(
    rule_id: str, severity: str, summary: str, source: str, fix: str
) -> Callable[[Check], Check]:
    """Register a check; its hits default to this severity and fix."""

    def register(check: Check) -> Check:
        RULES[rule_id] = f"{severity}: {summary} [{source}]"
        _REGISTRY[rule_id] = _Rule(severity, fix, check)
        return check

    return register


# ---- model-level rules -------------------------------------------------------------------------


@_rule(
    "MODEL-CHECKER",
    "error",
    "onnx.checker rejects the model (full check: types and shapes inferred, strictly)",
    "ONNX: onnx.checker.check_model(full_check=True)",
    "re-export the model; run onnx.checker.check_model(model, full_check=True) for the details",
)
def _checker(g: _Graph) -> Iterator[_Hit]:
    try:
        onnx.checker.check_model(str(g.path) if g.path else g.model, full_check=True)
    except Exception as error:  # ValidationError, InferenceError, ValueError, ...: all rejections
        lines = str(error).strip().splitlines() or [type(error).__name__]
        yield _Hit(g.name, f"onnx.checker: {lines[0]}")


@_rule(
    "MODEL-GRAPH-IO",
    "error",
    "the graph lists its outputs, and every graph input and output has a defined element type",
    "TensorRT network validation: 'Network must have at least one output'; ONNX Runtime refuses "
    "an undefined one ('Invalid tensor data type 0')",
    "export the model again: its image input and logits output as typed graph input and output",
)
def _graph_io(g: _Graph) -> Iterator[_Hit]:
    if not g.graph.output:
        yield _Hit(g.name, "the graph lists no outputs: it computes nothing a runtime can return")
    for value in [*g.inputs, *g.graph.output]:
        if not value.type.HasField("tensor_type"):
            continue  # sequences and maps: not a classifier's, not checked here
        elem_type = value.type.tensor_type.elem_type
        if elem_type == TensorProto.UNDEFINED or _type_name(elem_type).startswith("data type"):
            yield _Hit(value.name, f"graph input or output of undefined type ({elem_type})")


@_rule(
    "MODEL-TENSOR-DATA",
    "error",
    "a stored tensor's data does not fit its dims and type",
    "ONNX IR: TensorProto (raw_data: the elements packed little-endian, 4-bit types two to a "
    "byte); ONNX Runtime refuses such a tensor ('Deserialize tensor ... failed')",
    "re-export the model; the file was damaged or edited by hand",
)
def _tensor_data(g: _Graph) -> Iterator[_Hit]:
    tensors = [(t.name, t) for t in g.graph.initializer]
    tensors += [(n.label, n.attr("value")) for n in g.nodes if n.op == "Constant"]
    for name, tensor in tensors:
        problem = _stored_data_problem(tensor) if isinstance(tensor, TensorProto) else None
        if problem:
            yield _Hit(name, problem)


@_rule(
    "MODEL-NOT-QUANTIZED",
    "info",
    "no Q/DQ: TensorRT builds the model in float",
    "TRT-EQ: Explicit Quantization",
    "export with Q/DQ (qkd-deploy export) for an INT8 engine",
)
def _not_quantized(g: _Graph) -> Iterator[_Hit]:
    if not g.qdq:
        yield _Hit(
            g.name,
            "not quantized: no QuantizeLinear/DequantizeLinear, TensorRT builds it in FP32/FP16",
        )


@_rule(
    "MODEL-SUBGRAPH",
    "info",
    "If/Loop/Scan subgraphs are not linted",
    "this linter",
    "inline or unroll the control flow if it holds quantized layers",
)
def _subgraphs(g: _Graph) -> Iterator[_Hit]:
    graph_types = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    for node in g.nodes:
        if any(a.type in graph_types for a in node.proto.attribute):
            yield _Hit(node.label, f"{node.op} has subgraphs; Q/DQ inside them is not checked")


@_rule(
    "MODEL-EXTERNAL-DATA",
    "info",
    "weights live in a side file next to the .onnx",
    "DESIGN: one self-contained .onnx under 2 GB",
    "save with onnx.save(model, path, save_as_external_data=False) (models under 2 GB)",
)
def _external_data(g: _Graph) -> Iterator[_Hit]:
    external = [t.name for t in g.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    if external:
        yield _Hit(
            g.name,
            f"{len(external)} initializers (e.g. {external[0]!r}) are external "
            "data: the model breaks if the side file is not copied with it",
        )


@_rule(
    "OP-QOPERATOR",
    "error",
    "QOperator ops (QLinearConv, ConvInteger, MatMulInteger, ...) are not imported by TensorRT",
    "TRT-EQ: ONNX Support; OTRT: operators.md",
    "quantize in QDQ format (ONNX Runtime: quant_format=QuantFormat.QDQ)",
)
def _qoperator(g: _Graph) -> Iterator[_Hit]:
    for node in g.nodes:
        if node.op.startswith("QLinear") or node.op in QOPERATOR_OPS:
            yield _Hit(
                node.label,
                f"{node.op} is a pre-quantized (QOperator) op; the TensorRT "
                "ONNX parser has no importer for it",
            )


@_rule(
    "OPSET-QDQ",
    "error",
    "opset too old for the Q/DQ used: 10 for Q/DQ, 13 per-axis, 19 FP8, 21 INT4 and blocks",
    "ONNX: QuantizeLinear-10/13/19/21/23; TRT-EQ: ONNX Support",
    "export with a newer opset",
)
def _opset_qdq(g: _Graph) -> Iterator[_Hit]:
    for node in g.qdq:
        needed, feature = _min_opset(g, node)
        if g.opset < needed:
            yield _Hit(
                node.label,
                f"{feature} needs opset >= {needed}, the model has {g.opset}",
                fix=f"export with opset >= {needed}",
            )


@_rule(
    "OPSET-TRT86",
    "warning",
    "opset > 17: TensorRT 8.6 (JetPack 6.0) parses opsets <= 17, TensorRT 10 reads it",
    "OTRT: operators.md 'supports operators up to Opset 17'; DESIGN",
    "down-convert to opset 17 for JetPack 6.0 / TRT 8.6 (a tested pass, not onnx's version "
    "converter alone), or deploy with TensorRT >= 10",
)
def _opset_trt86(g: _Graph) -> Iterator[_Hit]:
    if g.opset > TRT86_MAX_OPSET:
        yield _Hit(g.name, f"opset {g.opset}: TensorRT 8.6 (JetPack 6.0) cannot parse it")


@_rule(
    "OPSET-UNKNOWN",
    "error",
    "an opset newer than any the installed onnx defines: its operators cannot be checked",
    "ONNX: onnx.defs.onnx_opset_version(); ONNX Runtime refuses opsets newer than it supports",
    "export with a released opset (qkd-deploy exports 17, 18 or 21)",
)
def _opset_unknown(g: _Graph) -> Iterator[_Hit]:
    known = onnx.defs.onnx_opset_version()
    if g.opset > known:
        yield _Hit(
            g.name,
            f"opset {g.opset}: onnx {onnx.__version__} defines opsets up to {known}",
            fix=f"export with opset <= {known}, or update onnx if a newer release defines it",
        )


# ---- Q/DQ parameter rules ----------------------------------------------------------------------


@_rule(
    "QDQ-SCALE-CONSTANT",
    "error",
    "the Q/DQ scale must be a build-time constant",
    "TRT-OPS: Quantize/Dequantize, input 'scale'",
    "store the scale as an initializer and constant-fold the graph "
    "(polygraphy surgeon sanitize --fold-constants)",
)
def _scale_constant(g: _Graph) -> Iterator[_Hit]:
    for node in g.qdq:
        if _shared_with_q(g, node, 1):
            continue
        if not node.input(1) or not g.is_constant(node.input(1)):
            yield _Hit(node.label, f"scale {node.input(1)!r} is computed at run time")


@_rule(
    "QDQ-SCALE-VALUE",
    "error",
    "every scale coefficient must be finite and > 0",
    "TRT-OPS: scale; OTRT importer: 'Scale coefficients must all be positive'",
    "recalibrate; clamp scales to a small positive minimum (a zero range gives scale 0)",
)
def _scale_value(g: _Graph) -> Iterator[_Hit]:
    for node in g.qdq:
        values = None if _shared_with_q(g, node, 1) else _numbers(g.value(node.input(1)))
        if values is None:  # unknown, or not numbers: QDQ-SCALE-DTYPE reports the type
            continue
        if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values <= 0):
            smallest = values.min() if values.size else "none"
            yield _Hit(
                node.label,
                f"scale {node.input(1)!r} is empty, zero, negative or not finite (min {smallest})",
            )


@_rule(
    "QDQ-SCALE-DTYPE",
    "error",
    "scales are FP32 (FP16/BF16 only on TensorRT 10: warning)",
    "TRT-OPS: Quantize/Dequantize data types, 8.6 and 10.x",
    "store scales as FP32",
)
def _scale_dtype(g: _Graph) -> Iterator[_Hit]:
    for node in g.qdq:
        dtype = None if _shared_with_q(g, node, 1) else g.elem_type(node.input(1))
        if dtype in SCALE_TYPES_TRT10:
            yield _Hit(
                node.label,
                f"{_type_name(dtype)} scale: TensorRT 8.6 (JetPack 6.0) takes FP32 scales only",
                severity="warning",
            )
        elif dtype not in (None, TensorProto.FLOAT):
            yield _Hit(
                node.label, f"{_type_name(dtype)} scale: TensorRT takes FP32 (FP16/BF16 on 10.x)"
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


@_rule(
    "QDQ-DTYPE",
    "error",
    "Q/DQ types: INT8, INT4 (weights), FP8E4M3, FP4E2M1 (info: not on "
    "Jetson Orin); UINT8, INT32 (bias) and others are errors",
    "OTRT: operators.md DequantizeLinear 'INT8, FP8, FP4, INT4', 'UINT8 is only supported as "
    "network input or output'; TRT-QT: Supported Data Types",
    "quantize to signed INT8",
)
def _dtype(g: _Graph) -> Iterator[_Hit]:
    for node in g.qdq:
        dtype = None if _fed_by_q(g, node) else _quant_type(g, node)  # a pair: checked at its Q
        if dtype in (None, TensorProto.INT8, TensorProto.INT4):
            continue
        name = _type_name(dtype)
        default = ("error", f"{name} Q/DQ: TensorRT quantizes to INT8, INT4, FP8 or FP4", None)
        severity, message, fix = _DTYPE_HITS.get(dtype, default)
        yield _Hit(node.label, message, severity, fix)


@_rule(
    "QDQ-ZERO-POINT",
    "error",
    "zero point absent or constant zeros (symmetric only)",
    "TRT-OPS: zero_point; OTRT: operators.md 'zero_point must be zero'",
    "quantize symmetrically with zero point 0 (qkd-deploy export --target tensorrt; ONNX "
    "Runtime: extra_options ActivationSymmetric=True, WeightSymmetric=True)",
)
def _zero_point(g: _Graph) -> Iterator[_Hit]:
    for node in g.qdq:
        zero_point = node.input(2)
        if not zero_point or _shared_with_q(g, node, 2):
            continue
        if not g.is_constant(zero_point):
            yield _Hit(node.label, f"zero point {zero_point!r} is not a constant")
            continue
        value = _numbers(g.value(zero_point))
        flat = value.ravel() if value is not None else np.zeros(0)
        nonzero = flat[flat != 0]
        if nonzero.size:
            yield _Hit(
                node.label, f"zero point {zero_point!r} is non-zero ({nonzero[0]:g}): asymmetric"
            )


@_rule(
    "QDQ-IMPLICIT-UINT8",
    "warning",
    "a Q without zero point or output_dtype is UINT8 in ONNX "
    "(ONNX Runtime clamps negatives to 0) but INT8 in TensorRT",
    "ONNX: QuantizeLinear y_zero_point default uint8; OTRT importer: default INT8",
    "add an INT8 zero point of 0 so both runtimes quantize to signed INT8",
)
def _implicit_uint8(g: _Graph) -> Iterator[_Hit]:
    for node in g.qdq:
        if node.op == Q_OP and not node.input(2) and not node.attr("output_dtype", 0):
            yield _Hit(node.label, "no zero point: UINT8 in ONNX Runtime, INT8 in TensorRT")


# ---- granularity and weight rules --------------------------------------------------------------


@_rule(
    "QDQ-ACTIVATION-PER-CHANNEL",
    "error",
    "activations are quantized per tensor (scalar scale)",
    "TRT-EQ 8.6: Per-Tensor and Per-Channel Quantization; OTRT importer",
    "quantize activations per tensor; per-channel and block scales are for weights",
)
def _activation_per_channel(g: _Graph) -> Iterator[_Hit]:
    for node in g.qdq:
        granularity = None if _fed_by_q(g, node) else _granularity(g, node)
        if granularity in ("channel", "block") and not _quantizes_constant(g, node):
            yield _Hit(node.label, f"{granularity} quantization of activation {node.input(0)!r}")


@_rule(
    "QDQ-WEIGHT-AXIS",
    "error",
    "per-channel weight scales run along the output-channel axis: "
    "Conv 0, ConvTranspose 1, Gemm 0 (transB=1) else 1, MatMul last",
    "TRT-EQ 8.6: Per-Tensor and Per-Channel Quantization; TRT-EQ: ONNX Support (Gemm)",
    "quantize the weight per output channel",
)
def _weight_axis(g: _Graph) -> Iterator[_Hit]:
    for node in g.qdq:
        if node.op != DQ_OP or _granularity(g, node) != "channel":
            continue
        axis = _axis(g, node)
        for consumer, transposes in _weight_uses(g, node.output):
            expected = _expected_weight_axis(g, consumer)
            if transposes is None or expected is None:
                continue  # unknown: a layout change on the way, or the weight's rank
            expected = _axis_before(g, transposes, expected)
            if None not in (axis, expected) and axis != expected:
                via = ", ".join(repr(t.label) for t in transposes)
                yield _Hit(
                    node.label,
                    f"axis {axis} on the weight of {consumer.op} {consumer.label!r}, whose "
                    f"output-channel axis is {expected}"
                    + (f" ahead of Transpose {via}" if via else ""),
                    fix=f"quantize the weight per output channel: axis={expected}",
                )


@_rule(
    "QDQ-SCALE-SHAPE",
    "error",
    "a per-channel scale has one coefficient per channel",
    "TRT-OPS: scale; OTRT importer: 'The number of scales is not equal to the number of output "
    "channels'",
    "give one scale per element of the quantization axis",
)
def _scale_shape(g: _Graph) -> Iterator[_Hit]:
    for node in g.qdq:
        shape, scales, axis = g.shape(node.input(0)), g.shape(node.input(1)), _axis(g, node)
        if _granularity(g, node) != "channel" or not shape or not scales or axis is None:
            continue
        if not 0 <= axis < len(shape):
            given = node.int_attr("axis", 1)
            yield _Hit(node.label, f"axis {given} is out of range for rank {len(shape)}")
        elif None not in (shape[axis], scales[0]) and shape[axis] != scales[0]:
            yield _Hit(node.label, f"{scales[0]} scales for {shape[axis]} channels on axis {axis}")


@_rule(
    "QDQ-BLOCK",
    "error",
    "block quantization only for INT4 weights, one blocked dimension, a positive block_size",
    "TRT-OPS 10.0-10.3: Quantize/Dequantize 'block quantization (supported for kINT4 only)'; "
    "OTRT importer: 'Only a single blocking dimension is allowed'; ONNX: block_size",
    "use per-channel INT8, or INT4 blocks along one axis of a GEMM weight",
)
def _block(g: _Graph) -> Iterator[_Hit]:
    for node in g.qdq:
        block_size = node.int_attr("block_size", 0)
        if block_size is not None and block_size < 0:
            yield _Hit(node.label, f"block_size {block_size} is negative")
        if _fed_by_q(g, node) or _granularity(g, node) != "block":
            continue
        dtype = _quant_type(g, node)
        if dtype != TensorProto.INT4:
            name = _type_name(dtype) if dtype else "unknown-type"
            yield _Hit(
                node.label,
                f"block quantization of {name}: TensorRT 10.0-10.3 (JetPack "
                "6.x) block-quantizes INT4 weights only",
            )
        shape, scales = g.shape(node.input(0)), g.shape(node.input(1))
        if shape and scales and len(shape) == len(scales):
            blocked = [i for i, (d, s) in enumerate(zip(shape, scales, strict=True)) if d != s]
            if len(blocked) > 1:
                yield _Hit(node.label, f"blocks along axes {blocked}: one blocked axis allowed")


@_rule(
    "QDQ-INT4",
    "error",
    "INT4 is weight-only quantization of MatMul/Gemm weights (not "
    "activations, not Conv), with an even element count",
    "TRT-QT: Supported Data Types 'INT4 ... weight-only quantization', Weight-Only "
    "Quantization; OTRT importer: 4-bit packing",
    "keep INT4 for MatMul/Gemm weights; use INT8 elsewhere",
)
def _int4(g: _Graph) -> Iterator[_Hit]:
    for node in g.qdq:
        if _fed_by_q(g, node) or _quant_type(g, node) not in FOUR_BIT_TYPES:
            continue
        shape = g.shape(node.input(0))
        if not _quantizes_constant(g, node):
            yield _Hit(node.label, f"INT4 on activation {node.input(0)!r}: INT4 is weight-only")
        elif any(c.op not in GEMM_OPS for c, _ in _dequantized_uses(g, node)):
            yield _Hit(
                node.label,
                "INT4 weights feed a non-GEMM op: TensorRT's INT4 weight-only "
                "quantization covers MatMul/Gemm",
                fix="store Conv weights in an INT8 container",
            )
        if shape and None not in shape and int(np.prod(shape)) % 2:
            yield _Hit(
                node.label,
                f"INT4 tensor {shape} has an odd number of elements",
                fix="pad the weight to an even element count",
            )


@_rule(
    "QDQ-WEIGHT-FLOAT",
    "warning",
    "a float weight quantized by a Q in the graph",
    "TRT-EQ: Quantized Weights; DESIGN: Export rules",
    "store weights as INT8 initializers with DequantizeLinear only (smaller file, no Q on "
    "constants)",
)
def _weight_float(g: _Graph) -> Iterator[_Hit]:
    for node in g.qdq:
        if node.op == Q_OP and g.is_constant(node.input(0)):
            yield _Hit(node.label, f"QuantizeLinear on constant float weight {node.input(0)!r}")


# ---- Q/DQ structure rules ----------------------------------------------------------------------


@_rule(
    "QDQ-DANGLING-Q",
    "error",
    "every Q is followed by a DQ (a Q feeding another op: error; unused: warning)",
    "TRT-EQ: TensorRT Processing of Q/DQ Networks",
    "follow every QuantizeLinear with a DequantizeLinear (Q -> DQ -> op)",
)
def _dangling_q(g: _Graph) -> Iterator[_Hit]:
    for node in (n for n in g.qdq if n.op == Q_OP):
        uses = list(g.ahead(node.output))
        others = sorted({c.label for c, _ in uses if c.op != DQ_OP})
        if others:
            yield _Hit(node.label, f"quantized output feeds {others}, not a DequantizeLinear")
        elif not uses:
            yield _Hit(
                node.label,
                "no DequantizeLinear follows (unused, or an INT8 graph output)",
                severity="warning",
            )


@_rule(
    "QDQ-ORPHAN-DQ",
    "warning",
    "a DQ is fed by a Q (activations) or a constant (weights)",
    "TRT-EQ: TensorRT Processing of Q/DQ Networks",
    "feed it from a QuantizeLinear (activation) or an INT8 initializer (weight)",
)
def _orphan_dq(g: _Graph) -> Iterator[_Hit]:
    for node in (n for n in g.qdq if n.op == DQ_OP):
        data = node.input(0)
        if not g.is_constant(data) and g.behind(data, Q_OP) is None:
            yield _Hit(
                node.label, f"input {data!r} comes from neither a QuantizeLinear nor a constant"
            )


@_rule(
    "QDQ-PAIR-MISMATCH",
    "warning",
    "a Q and its DQ use different scales or axes (a hidden requantization)",
    "TRT-EQ: TensorRT Processing of Q/DQ Networks",
    "use the same scale and axis for both nodes of a Q/DQ pair",
)
def _pair_mismatch(g: _Graph) -> Iterator[_Hit]:
    for node in (n for n in g.qdq if n.op == DQ_OP):
        source = g.behind(node.input(0), Q_OP)
        if source is None:
            continue
        same_scale = _scales_equal(g.value(source.input(1)), g.value(node.input(1)))
        same_axis = _granularity(g, node) != "channel" or _axis(g, node) == _axis(g, source)
        if same_scale is False or not same_axis:
            yield _Hit(
                node.label, f"scale or axis differs from its QuantizeLinear {source.label!r}"
            )


@_rule(
    "QDQ-REQUANTIZE",
    "warning",
    "Q->DQ->Q->DQ with different scales: an extra unfused requantize kernel",
    "TRT-EQ: Q/DQ Layer-Placement Recommendations (unfused Q/DQ cost)",
    "use one Q/DQ pair per tensor (share the scale)",
)
def _requantize(g: _Graph) -> Iterator[_Hit]:
    for node in (n for n in g.qdq if n.op == Q_OP):
        previous = g.behind(node.input(0), DQ_OP)
        if (
            previous is not None
            and _scales_equal(g.value(previous.input(1)), g.value(node.input(1))) is False
        ):
            yield _Hit(node.label, f"requantizes the output of {previous.label!r} to another scale")


# ---- fusion rules ------------------------------------------------------------------------------


def _weight_is_int4(g: _Graph, node: _Node) -> bool:
    dq = g.behind(node.input(WEIGHTED[node.op]), DQ_OP)
    return dq is not None and _quant_type(g, dq) in FOUR_BIT_TYPES


def _weighted(g: _Graph) -> Iterator[tuple[_Node, bool, bool]]:
    """(op, data input quantized, weight quantized) for the convs and GEMMs of a Q/DQ model;
    INT4 weight-only GEMMs are left out (their float input is by design)."""
    if not g.qdq:
        return
    for node in g.nodes:
        if node.op in WEIGHTED and not _weight_is_int4(g, node):
            weight = node.input(WEIGHTED[node.op])
            yield node, g.is_quantized(node.input(0)), g.is_quantized(weight)


def _float_op_between(g: _Graph, node: _Node) -> _Node | None:
    """The float op between a DQ and this op's data input (DQ -> Relu -> Conv), if any."""
    producer = g.skip_pass_through(g.producer.get(node.input(0)))
    if producer is None or producer.op in WEIGHTED or producer.op == DQ_OP:
        return None
    return producer if any(g.is_quantized(i) for i in producer.inputs if i) else None


@_rule(
    "FUSE-WEIGHT-NOT-QUANTIZED",
    "warning",
    "input Q/DQ'd but weight not: no INT8 kernel (mixed precision)",
    "TRT-EQ: Q/DQ Layer-Placement Recommendations 'quantize all inputs of weighted operations'",
    "quantize the weight: INT8 initializer -> DequantizeLinear (per output channel)",
)
def _weight_not_quantized(g: _Graph) -> Iterator[_Hit]:
    for node, data_q, weight_q in _weighted(g):
        if data_q and not weight_q:
            weight = node.input(WEIGHTED[node.op])
            yield _Hit(node.label, f"{node.op} input is quantized, weight {weight!r} is not")


@_rule(
    "FUSE-INPUT-NOT-QUANTIZED",
    "warning",
    "weight quantized but activation input not: the layer runs in float",
    "TRT-EQ: Q/DQ Layer-Placement Recommendations",
    "insert QuantizeLinear -> DequantizeLinear (INT8, per tensor) on the input",
)
def _input_not_quantized(g: _Graph) -> Iterator[_Hit]:
    for node, data_q, weight_q in _weighted(g):
        if weight_q and not data_q and _float_op_between(g, node) is None:
            yield _Hit(node.label, f"{node.op} weight is quantized, input {node.input(0)!r} is not")


@_rule(
    "FUSE-FLOAT-OP-BETWEEN",
    "warning",
    "a float op between a DQ and the weighted op (DQ -> Relu -> Conv) gives the op with a "
    "quantized weight a float input",
    "TRT-EQ: Q/DQ Layer-Placement Recommendations; TensorRT Processing of Q/DQ Networks",
    "quantize after the float op: Relu -> Q -> DQ -> Conv",
)
def _float_between(g: _Graph) -> Iterator[_Hit]:
    for node, data_q, weight_q in _weighted(g):
        between = None if data_q or not weight_q else _float_op_between(g, node)
        if between is not None:
            yield _Hit(
                node.label,
                f"{between.op} {between.label!r} sits between the DequantizeLinear and {node.op}",
                fix=f"quantize after it: {between.op} -> Q -> DQ -> {node.op}",
            )


@_rule(
    "FUSE-FLOAT-LAYER",
    "info",
    "a Conv/Gemm/MatMul with neither input nor weight quantized runs in FP32/FP16",
    "TRT-EQ: Explicit Quantization (precision follows the Q/DQ placement)",
    "quantize its input and weight if it should run in INT8",
)
def _float_layer(g: _Graph) -> Iterator[_Hit]:
    for node, data_q, weight_q in _weighted(g):
        if not data_q and not weight_q:
            module = g.module(node)
            named = f"{node.op} {module!r}" if module else node.op
            yield _Hit(node.label, f"{named} is not quantized: it runs in float")


def _add_input_kind(g: _Graph, name: str) -> str:
    if g.is_quantized(name):
        return "dq"
    producer = g.producer.get(name)
    return "weighted" if producer is not None and producer.op in WEIGHTED else "float"


@_rule(
    "FUSE-RESIDUAL-ADD",
    "warning",
    "a residual Add fuses into an INT8 conv only when its skip "
    "input is quantized (conv output + DQ, or DQ + DQ)",
    "TRT-EQ: Q/DQ Layer-Placement Recommendations 'quantize the residual input in skip "
    "connections'",
    "insert QuantizeLinear -> DequantizeLinear on the skip input",
)
def _residual_add(g: _Graph) -> Iterator[_Hit]:
    for node in (n for n in g.nodes if n.op == "Add"):
        names = [i for i in node.inputs if i and not g.is_constant(i)]
        kinds = [_add_input_kind(g, name) for name in names]
        int8_conv = any(
            k == "weighted" and g.is_quantized(g.producer[n].input(0))
            for n, k in zip(names, kinds, strict=True)
        )
        if len(names) != 2 or not ("dq" in kinds or int8_conv):
            continue
        if "dq" not in kinds or "float" in kinds:
            skipped = [n for n, k in zip(names, kinds, strict=True) if k != "dq"]
            yield _Hit(
                node.label,
                f"residual input(s) {skipped} not quantized: the Add cannot fuse into an INT8 conv",
            )


# ---- shape rules -------------------------------------------------------------------------------


def _dynamic_dims(value_info: onnx.ValueInfoProto) -> list[int] | None:
    """Indices of dynamic dims (symbolic, -1 or unset); None when the rank is unknown."""
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims = tensor_type.shape.dim
    return [i for i, d in enumerate(dims) if not (d.HasField("dim_value") and d.dim_value > 0)]


@_rule(
    "SHAPE-DYNAMIC-BATCH",
    "info",
    "a dynamic batch dimension needs an optimisation profile",
    "TRT-DYN: Optimization Profiles",
    "pass min/opt/max shapes to build-engine (e.g. batch 1/8/32)",
)
def _dynamic_batch(g: _Graph) -> Iterator[_Hit]:
    for value_info in g.inputs:
        if (_dynamic_dims(value_info) or [None])[0] == 0:
            yield _Hit(
                value_info.name, "dynamic batch dimension: TensorRT needs an optimisation profile"
            )


@_rule(
    "SHAPE-DYNAMIC-DIMS",
    "warning",
    "dynamic non-batch input dims or unknown rank (channels "
    "must be build-time constants for Conv and INT8)",
    "TRT-DYN: Restrictions for Dynamic Shapes",
    "export with static channel/height/width; keep only the batch dimension dynamic",
)
def _dynamic_other_dims(g: _Graph) -> Iterator[_Hit]:
    for value_info in g.inputs:
        dims = _dynamic_dims(value_info)
        if dims is None:
            yield _Hit(value_info.name, "input rank is unknown")
        elif any(d != 0 for d in dims):
            yield _Hit(value_info.name, f"dynamic non-batch dims {[d for d in dims if d != 0]}")


@_rule(
    "SHAPE-CONV-CHANNELS",
    "error",
    "a Conv's input channels equal its weight's input channels times group",
    "ONNX: Conv (W is M x C/group x kH x kW); ONNX Runtime fails the run: 'Input channels C is "
    "not equal to kernel channels * group'",
    "give the Conv a weight of shape (out, in / group, kH, kW) for its input",
)
def _conv_channels(g: _Graph) -> Iterator[_Hit]:
    for node in (n for n in g.nodes if n.op == "Conv"):
        data, weight = g.shape(node.input(0)), g.shape(node.input(1))
        group = node.int_attr("group", 1)
        if not data or not weight or len(data) < 2 or len(weight) < 2 or group is None:
            continue
        if None not in (data[1], weight[1]) and data[1] != weight[1] * group:
            yield _Hit(
                node.label,
                f"input has {data[1]} channels, weight {list(weight)} with group {group} "
                f"takes {weight[1] * group}",
            )


# ---- public API --------------------------------------------------------------------------------


def lint_model(model: onnx.ModelProto) -> list[Finding]:
    """All findings for ``model``: errors, then warnings, then infos (rule order within)."""
    return _lint(_Graph(model))


def _lint(g: _Graph) -> list[Finding]:
    findings = [f for rule_id, rule in _REGISTRY.items() for f in _findings(rule_id, rule, g)]
    findings = [_chosen_float(g, f) for f in findings]
    return sorted(findings, key=lambda f: SEVERITIES.index(f.severity))


def _chosen_float(g: _Graph, finding: Finding) -> Finding:
    """A fusion finding at a layer the exporter recorded as left in float on purpose
    (``quant.layer_bits: float``) is information, not a missing Q/DQ."""
    if not finding.rule.startswith("FUSE-") or not g.float_on_purpose(finding.node):
        return finding
    return dataclasses.replace(
        finding,
        severity="info",
        message=f"{finding.message} (left in float on purpose, as the exporter recorded)",
    )


def _findings(rule_id: str, rule: _Rule, g: _Graph) -> list[Finding]:
    """The rule's findings; a rule that fails on a malformed model is one LINT-INTERNAL error
    naming it, not a traceback."""
    try:
        hits = list(rule.check(g))
    except Exception as error:
        message = (
            f"rule {rule_id} could not check this model ({type(error).__name__}: {error}): the "
            "model is malformed where the rule looks (see MODEL-CHECKER), or the linter has a bug"
        )
        fix = "run onnx.checker.check_model(model, full_check=True) and re-export the model"
        return [Finding("error", INTERNAL_RULE, g.name, message, fix)]
    severity, fix = rule.severity, rule.fix
    return [
        Finding(hit.severity or severity, rule_id, _text(hit.node), hit.message, hit.fix or fix)
        for hit in hits
    ]


# rules that hold for TensorRT 8.6 only: a model meant for TensorRT >= 10 skips them
TRT86_ONLY_RULES = ("OPSET-TRT86",)
TENSORRT_VERSIONS = ("8.6", "10")


def lint_file(path: str, tensorrt: str | None = None) -> list[Finding]:
    """Lint an .onnx file (external weight data is not read) for TensorRT ``tensorrt`` ("8.6",
    "10", or None for both). A file over protobuf's 2 GiB limit is refused before it is read:
    no valid .onnx is that large."""
    return lint_with_layers(path, tensorrt)[0]


def _check_file(path: str, tensorrt: str | None) -> None:
    size = Path(path).stat().st_size if Path(path).is_file() else 0
    if size > MAX_ONNX_BYTES:
        raise UserError(
            f"{path}: {size} bytes, over the 2 GiB protobuf limit of one .onnx file, so it is "
            "not a valid model; save a large model with its weights as external data "
            "(onnx.save(model, path, save_as_external_data=True))"
        )
    if tensorrt not in (None, *TENSORRT_VERSIONS):
        raise UserError(f"TensorRT version {tensorrt!r}: use one of {', '.join(TENSORRT_VERSIONS)}")


def lint_with_layers(
    path: str, tensorrt: str | None = None
) -> tuple[list[Finding], list[LayerPrecision]]:
    """``lint_file``'s findings and the model's layers with their precision
    (``bench.layer_precision``), from one read of the file."""
    _check_file(path, tensorrt)
    model = load_onnx_graph(path)
    findings = _lint(_Graph(model, Path(path)))
    if tensorrt == "10":
        findings = [f for f in findings if f.rule not in TRT86_ONLY_RULES]
    return findings, layer_precision(model)


def format_findings(findings: list[Finding]) -> str:
    """Human-readable report: one block per finding, then the counts."""
    blocks = [
        f"{f.severity.upper():<7} {f.rule} at {f.node}: {f.message}\n        fix: {f.fix}"
        for f in findings
    ]
    counts = ", ".join(f"{sum(f.severity == s for f in findings)} {s}(s)" for s in SEVERITIES)
    return "\n".join([*blocks, counts])


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="qkd-deploy lint",
        description="Check a Q/DQ ONNX model against TensorRT's explicit-quantization rules.",
    )
    parser.add_argument("model", help="path of the .onnx model")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    parser.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    parser.add_argument(
        "--tensorrt",
        choices=TENSORRT_VERSIONS,
        help="the TensorRT the model is for: 10 skips the checks that hold for 8.6 only "
        "(opset > 17); default: both",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """`qkd-deploy lint`: print the findings and the layers' precision; 1 on any error (or
    warning with --strict), else 0."""
    args = _parse_args(argv)
    findings, layers = lint_with_layers(args.model, args.tensorrt)
    if args.json:
        counts = {s: sum(f.severity == s for f in findings) for s in SEVERITIES}
        report = {
            "model": args.model,
            "counts": counts,
            "findings": [asdict(f) for f in findings],
            "layers": [layer.to_dict() for layer in layers],
        }
        print(json.dumps(report, indent=2))
    else:
        print(format_findings(findings))
        if any(layer.precision != "float" for layer in layers):
            print(f"\nlayers and their precision:\n{format_table(layers)}")
    failing = ("error", "warning") if args.strict else ("error",)
    return int(any(f.severity in failing for f in findings))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
