"""Shape rules: dynamic input dims, a Conv's channels against its weight."""

from __future__ import annotations

from collections.abc import Iterator

import onnx

from qkd_deploy.deploy.lint.graph import Graph
from qkd_deploy.deploy.lint.registry import Hit, lint_rule


def _dynamic_dims(value_info: onnx.ValueInfoProto) -> list[int] | None:
    """Indices of dynamic dims (symbolic, -1 or unset); None when the rank is unknown."""
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims = tensor_type.shape.dim
    return [i for i, d in enumerate(dims) if not (d.HasField("dim_value") and d.dim_value > 0)]


@lint_rule(
    "SHAPE-DYNAMIC-BATCH",
    "info",
    "a dynamic batch dimension needs an optimisation profile",
    "TRT-DYN: Optimization Profiles",
    "pass min/opt/max shapes to build-engine (e.g. batch 1/8/32)",
)
def _dynamic_batch(g: Graph) -> Iterator[Hit]:
    for value_info in g.inputs:
        if (_dynamic_dims(value_info) or [None])[0] == 0:
            yield Hit(
                value_info.name, "dynamic batch dimension: TensorRT needs an optimisation profile"
            )


@lint_rule(
    "SHAPE-DYNAMIC-DIMS",
    "warning",
    "dynamic non-batch input dims or unknown rank (channels "
    "must be build-time constants for Conv and INT8)",
    "TRT-DYN: Restrictions for Dynamic Shapes",
    "export with static channel/height/width; keep only the batch dimension dynamic",
)
def _dynamic_other_dims(g: Graph) -> Iterator[Hit]:
    for value_info in g.inputs:
        dims = _dynamic_dims(value_info)
        if dims is None:
            yield Hit(value_info.name, "input rank is unknown")
        elif any(d != 0 for d in dims):
            yield Hit(value_info.name, f"dynamic non-batch dims {[d for d in dims if d != 0]}")


@lint_rule(
    "SHAPE-CONV-CHANNELS",
    "error",
    "a Conv's input channels equal its weight's input channels times group",
    "ONNX: Conv (W is M x C/group x kH x kW); ONNX Runtime fails the run: 'Input channels C is "
    "not equal to kernel channels * group'",
    "give the Conv a weight of shape (out, in / group, kH, kW) for its input",
)
def _conv_channels(g: Graph) -> Iterator[Hit]:
    for node in (n for n in g.nodes if n.op == "Conv"):
        data, weight = g.shape(node.input(0)), g.shape(node.input(1))
        group = node.int_attr("group", 1)
        if not data or not weight or len(data) < 2 or len(weight) < 2 or group is None:
            continue
        if None not in (data[1], weight[1]) and data[1] != weight[1] * group:
            yield Hit(
                node.label,
                f"input has {data[1]} channels, weight {list(weight)} with group {group} "
                f"takes {weight[1] * group}",
            )
