"""Fusion rules: whether TensorRT can fuse the Q/DQ into INT8 convs and GEMMs (input and weight
quantized, no float op between, residual Adds with a quantized skip input).
"""

from __future__ import annotations

from collections.abc import Iterator

from qkd_deploy.deploy.lint.graph import DQ_OP, WEIGHTED, Graph, Node
from qkd_deploy.deploy.lint.qdq import FOUR_BIT_TYPES, quant_type
from qkd_deploy.deploy.lint.registry import Hit, lint_rule


def _weight_is_int4(g: Graph, node: Node) -> bool:
    dq = g.behind(node.input(WEIGHTED[node.op]), DQ_OP)
    return dq is not None and quant_type(g, dq) in FOUR_BIT_TYPES


def _weighted(g: Graph) -> Iterator[tuple[Node, bool, bool]]:
    """(op, data input quantized, weight quantized) for the convs and GEMMs of a Q/DQ model;
    INT4 weight-only GEMMs are left out (their float input is by design)."""
    if not g.qdq:
        return
    for node in g.nodes:
        if node.op in WEIGHTED and not _weight_is_int4(g, node):
            weight = node.input(WEIGHTED[node.op])
            yield node, g.is_quantized(node.input(0)), g.is_quantized(weight)


def _float_op_between(g: Graph, node: Node) -> Node | None:
    """The float op between a DQ and this op's data input (DQ -> Relu -> Conv), if any."""
    producer = g.skip_pass_through(g.producer.get(node.input(0)))
    if producer is None or producer.op in WEIGHTED or producer.op == DQ_OP:
        return None
    return producer if any(g.is_quantized(i) for i in producer.inputs if i) else None


@lint_rule(
    "FUSE-WEIGHT-NOT-QUANTIZED",
    "warning",
    "input Q/DQ'd but weight not: no INT8 kernel (mixed precision)",
    "TRT-EQ: Q/DQ Layer-Placement Recommendations 'quantize all inputs of weighted operations'",
    "quantize the weight: INT8 initializer -> DequantizeLinear (per output channel)",
)
def _weight_not_quantized(g: Graph) -> Iterator[Hit]:
    for node, data_q, weight_q in _weighted(g):
        if data_q and not weight_q:
            weight = node.input(WEIGHTED[node.op])
            yield Hit(node.label, f"{node.op} input is quantized, weight {weight!r} is not")


@lint_rule(
    "FUSE-INPUT-NOT-QUANTIZED",
    "warning",
    "weight quantized but activation input not: the layer runs in float",
    "TRT-EQ: Q/DQ Layer-Placement Recommendations",
    "insert QuantizeLinear -> DequantizeLinear (INT8, per tensor) on the input",
)
def _input_not_quantized(g: Graph) -> Iterator[Hit]:
    for node, data_q, weight_q in _weighted(g):
        if weight_q and not data_q and _float_op_between(g, node) is None:
            yield Hit(node.label, f"{node.op} weight is quantized, input {node.input(0)!r} is not")


@lint_rule(
    "FUSE-FLOAT-OP-BETWEEN",
    "warning",
    "a float op between a DQ and the weighted op (DQ -> Relu -> Conv) gives the op with a "
    "quantized weight a float input",
    "TRT-EQ: Q/DQ Layer-Placement Recommendations; TensorRT Processing of Q/DQ Networks",
    "quantize after the float op: Relu -> Q -> DQ -> Conv",
)
def _float_between(g: Graph) -> Iterator[Hit]:
    for node, data_q, weight_q in _weighted(g):
        between = None if data_q or not weight_q else _float_op_between(g, node)
        if between is not None:
            yield Hit(
                node.label,
                f"{between.op} {between.label!r} sits between the DequantizeLinear and {node.op}",
                fix=f"quantize after it: {between.op} -> Q -> DQ -> {node.op}",
            )


@lint_rule(
    "FUSE-FLOAT-LAYER",
    "info",
    "a Conv/Gemm/MatMul with neither input nor weight quantized runs in FP32/FP16",
    "TRT-EQ: Explicit Quantization (precision follows the Q/DQ placement)",
    "quantize its input and weight if it should run in INT8",
)
def _float_layer(g: Graph) -> Iterator[Hit]:
    for node, data_q, weight_q in _weighted(g):
        if not data_q and not weight_q:
            module = g.module(node)
            named = f"{node.op} {module!r}" if module else node.op
            yield Hit(node.label, f"{named} is not quantized: it runs in float")


def _add_input_kind(g: Graph, name: str) -> str:
    if g.is_quantized(name):
        return "dq"
    producer = g.producer.get(name)
    return "weighted" if producer is not None and producer.op in WEIGHTED else "float"


@lint_rule(
    "FUSE-RESIDUAL-ADD",
    "warning",
    "a residual Add fuses into an INT8 conv only when its skip "
    "input is quantized (conv output + DQ, or DQ + DQ)",
    "TRT-EQ: Q/DQ Layer-Placement Recommendations 'quantize the residual input in skip "
    "connections'",
    "insert QuantizeLinear -> DequantizeLinear on the skip input",
)
def _residual_add(g: Graph) -> Iterator[Hit]:
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
            yield Hit(
                node.label,
                f"residual input(s) {skipped} not quantized: the Add cannot fuse into an INT8 conv",
            )
