"""The graph view the rules read: ``Graph`` (producers, consumers, constants, types and shapes
of the top-level graph), its nodes (``Node``) and the op kinds it and the rules share.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, numpy_helper

from qkd_deploy.export import layer_record

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


def as_text(value: str | bytes) -> str:
    """A string field as text: protobuf hands over bytes that are not valid UTF-8."""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


@dataclass(frozen=True, eq=False)
class Node:
    index: int
    proto: onnx.NodeProto

    @property
    def op(self) -> str:
        return as_text(self.proto.op_type)

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


class Graph:
    """Producers, consumers, constants, types and shapes of one (top-level) graph."""

    def __init__(self, model: onnx.ModelProto, path: Path | None = None) -> None:
        self.model = model
        self.path = path  # the file, when linting one: external data resolves next to it
        self.graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.nodes = [Node(i, proto) for i, proto in enumerate(self.graph.node)]
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.inputs = [i for i in self.graph.input if i.name not in self.initializers]
        self.producer = {out: n for n in self.nodes for out in n.proto.output if out}
        self.consumers: dict[str, list[Node]] = {}
        for node in self.nodes:
            for name in node.inputs:
                self.consumers.setdefault(name, []).append(node)
        self._values: dict[str, np.ndarray | None] = {}
        self.record = layer_record.read(model)  # the exporter's: node -> torch module

    @property
    def name(self) -> str:
        return self.graph.name or "graph"

    @cached_property
    def qdq(self) -> list[Node]:
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

    def consumers_of(self, name: str) -> list[Node]:
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

    def behind(self, name: str, op: str) -> Node | None:
        """The ``op`` node producing ``name``, looking back through pass-through ops."""
        node = self.skip_pass_through(self.producer.get(name))
        return node if node is not None and node.op == op else None

    def skip_pass_through(self, node: Node | None) -> Node | None:
        """The first producer at or behind ``node`` that is not a pass-through op (None at a
        graph input, or in a cycle of pass-through ops, which only a malformed graph has)."""
        seen = set()
        while node is not None and node.op in PASS_THROUGH and node.index not in seen:
            seen.add(node.index)
            node = self.producer.get(node.input(0))
        return None if node is not None and node.index in seen else node

    def ahead(self, name: str, seen: frozenset[int] = frozenset()) -> Iterator[tuple[Node, int]]:
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

    def module(self, node: Node) -> str | None:
        """The torch module the exporter recorded for ``node``."""
        return self.record.get(node.proto.name, {}).get("module")

    def float_on_purpose(self, node_label: str) -> bool:
        """Whether the exporter recorded this node as a layer left in float on purpose."""
        return self.record.get(node_label, {}).get("float") is True
