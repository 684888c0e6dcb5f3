"""Which layers of a Q/DQ ONNX model run in which precision, named by their torch module: the
per-layer table of ``qkd-deploy lint`` and of the report. Torch-free.

A layer is a Conv, ConvTranspose, Gemm or MatMul (weight and input precision), or an Add, Concat
or pool that has a quantized input or that the exporter recorded as a layer left in float.
Precision is what the graph says: the type a DequantizeLinear in front of the input dequantizes
from (int8, int4, fp8, ...; looking back through data-movement ops), or ``float`` without one.
Where the model carries the exporter's record (``export.layer_record``) the table also gives the
torch module of each layer and the integer grid within the type (a 4-bit weight is stored in
INT8 unless it feeds a GEMM); without it, the grid is the type's own width.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import onnx
from onnx import TensorProto

from qkd_deploy.export import layer_record

FLOAT = "float"
WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
ACTIVATION_OPS = {"Add", "Concat", "GlobalAveragePool", "AveragePool", "MaxPool"}
# data-movement ops TensorRT moves Q/DQ through (as the linter's PASS_THROUGH)
PASS_THROUGH = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Slice"}
TYPES = {
    TensorProto.INT8: ("int8", 8),
    TensorProto.UINT8: ("uint8", 8),
    TensorProto.INT4: ("int4", 4),
    TensorProto.UINT4: ("uint4", 4),
    TensorProto.INT16: ("int16", 16),
    TensorProto.UINT16: ("uint16", 16),
    TensorProto.INT32: ("int32", 32),
    TensorProto.FLOAT8E4M3FN: ("fp8", 8),
    TensorProto.FLOAT8E5M2: ("fp8e5m2", 8),
}
WIDTHS = dict(TYPES.values())


@dataclass(frozen=True)
class LayerPrecision:
    node: str  # the ONNX node
    op: str
    module: str | None  # the torch module, from the exporter's record
    weight: str | None  # int8, int4, float, ...; None: the op has no weight
    weight_bits: int | None  # the integer grid of the weights (None: float or no weight)
    activation: str  # the input's precision (of a quantized input, for an Add or Concat)
    activation_bits: int | None
    float_on_purpose: bool  # recorded by the exporter as a layer left in float

    @property
    def name(self) -> str:
        return self.module or self.node

    @property
    def precision(self) -> str:
        """Short form: ``w4a8``, ``a8`` (no weight), ``float``, ``w4 (float input)``."""
        weight = None if self.weight in (None, FLOAT) else f"w{self.weight_bits}"
        data = None if self.activation == FLOAT else f"a{self.activation_bits}"
        if weight and data:
            return weight + data
        if weight:
            return f"{weight} (float input)"
        if data:
            return data if self.weight is None else f"{data} (float weight)"
        return FLOAT

    def to_dict(self) -> dict:
        return {**asdict(self), "precision": self.precision}


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.nodes = list(graph.node)
        self.producer = {out: node for node in graph.node for out in node.output}
        self.types = {t.name: t.data_type for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].t.dims:
                self.types[node.output[0]] = node.attribute[0].t.data_type
        self.constants = set(self.types) | {
            n.output[0] for n in graph.node if n.op_type == "Constant"
        }
        self.record = layer_record.read(model)

    def behind(self, name: str, op: str) -> onnx.NodeProto | None:
        """The ``op`` node producing ``name``, looking back through pass-through ops."""
        node, seen = self.producer.get(name), set()
        while node is not None and node.op_type in PASS_THROUGH and id(node) not in seen:
            seen.add(id(node))
            node = self.producer.get(node.input[0]) if node.input else None
        return node if node is not None and node.op_type == op else None

    def precision(self, name: str) -> tuple[str, int | None]:
        """(type, grid bits) of the tensor ``name`` as the op reading it sees it."""
        dq = self.behind(name, "DequantizeLinear")
        if dq is None:
            return FLOAT, None
        q = self.behind(dq.input[0], "QuantizeLinear")
        kind, bits = TYPES.get(self._quantized_type(q or dq), ("quantized", None))
        recorded = self.record.get(q.name if q is not None else "", {}).get("bits")
        return kind, recorded if isinstance(recorded, int) else bits

    def _quantized_type(self, node: onnx.NodeProto) -> int | None:
        """The integer type: a Q's output_dtype or zero point (UINT8 by default, as ONNX
        says), a weight DQ's stored data."""
        if node.op_type == "QuantizeLinear":
            dtype = next((a.i for a in node.attribute if a.name == "output_dtype"), 0)
            zero_point = node.input[2] if len(node.input) > 2 else ""
            return dtype or self.types.get(zero_point, TensorProto.UINT8)
        return self.types.get(node.input[0])


def layer_precision(model: onnx.ModelProto) -> list[LayerPrecision]:
    """The layers of ``model`` in graph order, each with its weight and input precision."""
    g = _Graph(model)
    rows = []
    for node in g.nodes:
        entry = g.record.get(node.name, {})
        float_on_purpose = entry.get("float") is True
        if node.op_type in WEIGHT_INPUT and len(node.input) > WEIGHT_INPUT[node.op_type]:
            weight, weight_bits = g.precision(node.input[WEIGHT_INPUT[node.op_type]])
            recorded = entry.get("bits")
            if weight != FLOAT and isinstance(recorded, int):
                weight_bits = recorded
            activation, activation_bits = g.precision(node.input[0])
        elif node.op_type in ACTIVATION_OPS:
            inputs = [g.precision(i) for i in node.input if i and i not in g.constants]
            quantized = [p for p in inputs if p[0] != FLOAT]
            if not quantized and not float_on_purpose:
                continue
            weight, weight_bits = None, None
            activation, activation_bits = max(
                quantized, key=lambda p: p[1] or 0, default=(FLOAT, None)
            )
        else:
            continue
        module = entry.get("module")
        rows.append(
            LayerPrecision(
                node.name,
                node.op_type,
                module,
                weight,
                weight_bits,
                activation,
                activation_bits,
                float_on_purpose,
            )
        )
    return rows


def is_mixed(rows: list[LayerPrecision]) -> bool:
    """Whether the weights, or the inputs, of the layers come in more than one precision."""
    weights = {(row.weight, row.weight_bits) for row in rows if row.weight is not None}
    inputs = {(row.activation, row.activation_bits) for row in rows}
    return len(weights) > 1 or len(inputs) > 1


def format_table(rows: list[LayerPrecision]) -> str:
    """Plain-text table: layer (module, else node), op, precision, weight and input types."""
    head = ("layer", "op", "precision", "weight", "input")
    cells = [head] + [
        (
            row.name,
            row.op,
            row.precision,
            _typed(row.weight, row.weight_bits) if row.weight else "-",
            _typed(row.activation, row.activation_bits),
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(head))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in cells
    )


def summary(layers: list[tuple[str, str]]) -> str:
    """One line from (layer, precision) pairs: each precision with its layers, most common
    first (``w4a4: 9 layers; w8a8: stem.0, fc; float: stages.1.0.conv2``)."""
    counts = Counter(precision for _, precision in layers)
    parts = []
    for precision, count in counts.most_common():
        names = [name for name, p in layers if p == precision]
        listed = ", ".join(names) if count <= 4 else f"{count} layers"
        parts.append(f"{precision}: {listed}")
    return "; ".join(parts)


def _typed(kind: str, bits: int | None) -> str:
    """``int8``, or ``int8 (4-bit grid)`` when the grid is narrower than the type."""
    width = WIDTHS.get(kind)
    return f"{kind} ({bits}-bit grid)" if bits and width and bits < width else kind
