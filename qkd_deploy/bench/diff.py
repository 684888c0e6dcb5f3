"""Where two executions of a Q/DQ model part ways (the comparison of ``qkd-deploy diff``).

The same images go through the ONNX graph as written (ONNX Runtime with its graph rewrites off)
and through ONNX Runtime's fused integer kernels; with ``--run RUN_DIR`` also through that run's
fake-quant torch student (deploy form). The tensors compared are the quantized activations (the
outputs of the activation QuantizeLinear nodes) in graph order, as integer levels: they are what
every execution must agree on, and the only intermediate tensors that survive ONNX Runtime's
fusion (marking every tensor as an output, as Polygraphy's ``mark all`` does, would stop it
fusing DQ -> Conv -> Q into QLinearConv, so the "fused" run would not be). The first tensor
where more than ``share`` of the elements differ by more than ``steps`` levels is named, with its
Q node and the op that feeds it.

Torch-free, so the command also runs on the device from a bundle's ONNX file; the torch side
(``--run``) is ``qkd_deploy.diff_reference``. TensorRT engines are not compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from qkd_deploy.errors import UserError

STEPS = 1  # a level off by one is rounding (fused kernels round in another order)
SHARE = 0.01  # more than this share of a tensor's levels off by more than STEPS: divergence


@dataclass(frozen=True)
class Checkpoint:
    """One activation QuantizeLinear: the tensor it writes, its scale and zero point, and the
    op whose output it quantizes."""

    node: str
    tensor: str
    source: str  # "OpType name" of the producer of its input, or the graph input
    scale: float
    zero_point: int


@dataclass(frozen=True)
class Difference:
    node: str
    source: str
    share_off: float  # share of elements more than ``steps`` levels apart
    max_steps: int  # largest difference in levels
    max_abs: float  # largest difference in real units (levels x scale)


def load(path: str | Path) -> onnx.ModelProto:
    if not Path(path).is_file():
        raise UserError(f"ONNX model not found: {path}; give the path of an exported .onnx")
    return onnx.load(str(path))


def checkpoints(model: onnx.ModelProto) -> list[Checkpoint]:
    """The activation QuantizeLinear nodes in graph order (weights are constants: skipped)."""
    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = node.attribute[0].t
    found = []
    for index, node in enumerate(graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] in constants:
            continue
        scale = numpy_helper.to_array(constants[node.input[1]])
        zero = numpy_helper.to_array(constants[node.input[2]]) if len(node.input) > 2 else 0
        source = producer.get(node.input[0])
        where = f"{source.op_type} {source.name}" if source is not None else "graph input"
        found.append(
            Checkpoint(
                node.name or f"QuantizeLinear#{index}",
                node.output[0],
                where,
                float(np.asarray(scale).reshape(-1)[0]),
                int(np.asarray(zero).reshape(-1)[0]),
            )
        )
    if not found:
        raise UserError("the model has no activation QuantizeLinear: nothing to compare")
    return found


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the tensors ``names`` (types by shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    infos = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]}
    marked = onnx.ModelProto()
    marked.CopyFrom(model)
    existing = {o.name for o in marked.graph.output}
    for name in names:
        if name not in existing:
            marked.graph.output.append(infos[name])
    return marked


def run_onnxruntime(
    model: onnx.ModelProto, images: np.ndarray, names: list[str], fused: bool
) -> dict[str, np.ndarray]:
    """The tensors ``names`` (and the model output, under ``"output"``) on ``images``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not fused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    marked = with_outputs(model, names)
    session = ort.InferenceSession(
        marked.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    output = model.graph.output[0].name
    wanted = [output, *names]
    values = session.run(wanted, {session.get_inputs()[0].name: images.astype(np.float32)})
    result = dict(zip(wanted, values, strict=True))
    result["output"] = result[output]
    return result


def levels(values: dict[str, np.ndarray], points: list[Checkpoint]) -> list[np.ndarray]:
    """Each checkpoint's integer levels (quantized value minus zero point)."""
    return [values[p.tensor].astype(np.int64) - p.zero_point for p in points]


def compare(
    reference: list[np.ndarray],
    other: list[np.ndarray],
    points: list[Checkpoint],
    steps: int = STEPS,
) -> list[Difference]:
    rows = []
    for point, a, b in zip(points, reference, other, strict=True):
        if a.shape != b.shape:
            raise UserError(f"{point.node}: shapes {a.shape} and {b.shape} differ")
        gap = np.abs(a - b)
        rows.append(
            Difference(
                point.node,
                point.source,
                float((gap > steps).mean()) if gap.size else 0.0,
                int(gap.max()) if gap.size else 0,
                float(gap.max() * point.scale) if gap.size else 0.0,
            )
        )
    return rows


def first_divergence(rows: list[Difference], share: float = SHARE) -> Difference | None:
    return next((row for row in rows if row.share_off > share), None)


def describe(title: str, rows: list[Difference], share: float, steps: int) -> str:
    first = first_divergence(rows, share)
    if first is None:
        worst = max(rows, key=lambda r: r.share_off)
        return (
            f"{title}: all {len(rows)} quantized tensors agree (at most {100 * worst.share_off:.2f}"
            f" % of levels more than {steps} apart, at {worst.node})"
        )
    return (
        f"{title}: first divergence at {first.node} (quantizes the output of {first.source}): "
        f"{100 * first.share_off:.2f} % of levels more than {steps} apart, up to "
        f"{first.max_steps} levels ({first.max_abs:.4g} in real units)"
    )
