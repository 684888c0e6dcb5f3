"""Q/DQ structure rules: every Q followed by a DQ, every DQ fed by a Q or a constant, matching
Q/DQ pairs, no requantization.
"""

from __future__ import annotations

from collections.abc import Iterator

from qkd_deploy.deploy.lint.graph import DQ_OP, Q_OP, Graph
from qkd_deploy.deploy.lint.qdq import axis_of, granularity_of, scales_equal
from qkd_deploy.deploy.lint.registry import Hit, lint_rule


@lint_rule(
    "QDQ-DANGLING-Q",
    "error",
    "every Q is followed by a DQ (a Q feeding another op: error; unused: warning)",
    "TRT-EQ: TensorRT Processing of Q/DQ Networks",
    "follow every QuantizeLinear with a DequantizeLinear (Q -> DQ -> op)",
)
def _dangling_q(g: Graph) -> Iterator[Hit]:
    for node in (n for n in g.qdq if n.op == Q_OP):
        uses = list(g.ahead(node.output))
        others = sorted({c.label for c, _ in uses if c.op != DQ_OP})
        if others:
            yield Hit(node.label, f"quantized output feeds {others}, not a DequantizeLinear")
        elif not uses:
            yield Hit(
                node.label,
                "no DequantizeLinear follows (unused, or an INT8 graph output)",
                severity="warning",
            )


@lint_rule(
    "QDQ-ORPHAN-DQ",
    "warning",
    "a DQ is fed by a Q (activations) or a constant (weights)",
    "TRT-EQ: TensorRT Processing of Q/DQ Networks",
    "feed it from a QuantizeLinear (activation) or an INT8 initializer (weight)",
)
def _orphan_dq(g: Graph) -> Iterator[Hit]:
    for node in (n for n in g.qdq if n.op == DQ_OP):
        data = node.input(0)
        if not g.is_constant(data) and g.behind(data, Q_OP) is None:
            yield Hit(
                node.label, f"input {data!r} comes from neither a QuantizeLinear nor a constant"
            )


@lint_rule(
    "QDQ-PAIR-MISMATCH",
    "warning",
    "a Q and its DQ use different scales or axes (a hidden requantization)",
    "TRT-EQ: TensorRT Processing of Q/DQ Networks",
    "use the same scale and axis for both nodes of a Q/DQ pair",
)
def _pair_mismatch(g: Graph) -> Iterator[Hit]:
    for node in (n for n in g.qdq if n.op == DQ_OP):
        source = g.behind(node.input(0), Q_OP)
        if source is None:
            continue
        same_scale = scales_equal(g.value(source.input(1)), g.value(node.input(1)))
        same_axis = granularity_of(g, node) != "channel" or axis_of(g, node) == axis_of(g, source)
        if same_scale is False or not same_axis:
            yield Hit(node.label, f"scale or axis differs from its QuantizeLinear {source.label!r}")


@lint_rule(
    "QDQ-REQUANTIZE",
    "warning",
    "Q->DQ->Q->DQ with different scales: an extra unfused requantize kernel",
    "TRT-EQ: Q/DQ Layer-Placement Recommendations (unfused Q/DQ cost)",
    "use one Q/DQ pair per tensor (share the scale)",
)
def _requantize(g: Graph) -> Iterator[Hit]:
    for node in (n for n in g.qdq if n.op == Q_OP):
        previous = g.behind(node.input(0), DQ_OP)
        if (
            previous is not None
            and scales_equal(g.value(previous.input(1)), g.value(node.input(1))) is False
        ):
            yield Hit(node.label, f"requantizes the output of {previous.label!r} to another scale")
