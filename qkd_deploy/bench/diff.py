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

Where TensorRT, NVIDIA's Polygraphy and a GPU exist, a TensorRT engine built from the model runs
the same images too (``run_tensorrt``). A QuantizeLinear's INT8 output is not a tensor TensorRT
hands back (it fuses Q/DQ pairs into its INT8 kernels), so the engine is asked for the output of
the DequantizeLinear that reads each checkpoint, and its levels are that value over the scale
(``levels_from_dequantized``). Marking a tensor as an engine output keeps it in memory and can
change which layers TensorRT fuses around it, as Polygraphy's ``--mark all`` does.

Torch-free, so the command also runs on the device from a bundle; the torch side (``--run``) is
``qkd_deploy.pipeline.diff_reference``.
"""

from __future__ import annotations

import importlib.util
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


# ---- TensorRT (through Polygraphy) ---------------------------------------------------------------


def dequantized_outputs(model: onnx.ModelProto, points: list[Checkpoint]) -> dict[str, str]:
    """Checkpoint tensor -> the output of the DequantizeLinear that reads it (checkpoints no
    DequantizeLinear reads are left out: there is nothing TensorRT could return for them)."""
    readers = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] not in readers:
            readers[node.input[0]] = node.output[0]
    return {p.tensor: readers[p.tensor] for p in points if p.tensor in readers}


def levels_from_dequantized(
    values: dict[str, np.ndarray], points: list[Checkpoint], dequantized: dict[str, str]
) -> dict[str, np.ndarray]:
    """``{checkpoint tensor: quantized value}`` (as ``levels`` reads them) from the dequantized
    tensors ``values`` (by DequantizeLinear output name): value / scale + zero point, rounded."""
    return {
        p.tensor: np.rint(values[dequantized[p.tensor]] / p.scale).astype(np.int64) + p.zero_point
        for p in points
        if p.tensor in dequantized
    }


def tensorrt_missing() -> str | None:
    """Why the engine cannot be compared here (a package missing), or None."""
    packages = ("tensorrt", "polygraphy")
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (
        f"{' and '.join(missing)} not installed (TensorRT with its Python package, "
        "'pip install polygraphy', and a GPU)"
    )


def run_tensorrt(
    model: onnx.ModelProto, images: np.ndarray, points: list[Checkpoint]
) -> dict[str, np.ndarray]:
    """The checkpoints' quantized values (as ``levels`` reads them) from a TensorRT engine built
    from ``model``, with the DequantizeLinear output of each marked as an engine output.

    Built as ``qkd-deploy build-engine`` builds a Q/DQ model: strongly typed on TensorRT >= 10,
    INT8 and FP16 allowed before. Polygraphy API (TensorRT 10 Polygraphy docs, "Loaders",
    "Config", "Optimization Profile", "Runners"): ``NetworkFromOnnxBytes``,
    ``ModifyNetworkOutputs(network, outputs=...)``, ``CreateConfig``, ``Profile.add``,
    ``EngineFromNetwork``, ``TrtRunner.infer``.
    """
    reason = tensorrt_missing()
    if reason:
        raise UserError(f"cannot run a TensorRT engine: {reason}")
    import tensorrt
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineFromNetwork,
        ModifyNetworkOutputs,
        NetworkFromOnnxBytes,
        Profile,
        TrtRunner,
    )

    dequantized = dequantized_outputs(model, points)
    unread = [p.node for p in points if p.tensor not in dequantized]
    if unread:
        raise UserError(
            f"no DequantizeLinear reads the output of {unread[:3]}: TensorRT cannot return it; "
            "check the model with 'qkd-deploy lint'"
        )
    strongly_typed = int(tensorrt.__version__.split(".")[0]) >= 10
    network = NetworkFromOnnxBytes(model.SerializeToString(), strongly_typed=strongly_typed)
    marked = ModifyNetworkOutputs(network, outputs=sorted(set(dequantized.values())))
    name, shape = model.graph.input[0].name, tuple(images.shape)
    profile = Profile().add(name, min=(1, *shape[1:]), opt=shape, max=shape)
    weak = {} if strongly_typed else {"int8": True, "fp16": True}
    config = CreateConfig(profiles=[profile], **weak)
    try:
        with TrtRunner(EngineFromNetwork(marked, config=config)) as runner:
            outputs = runner.infer({name: images.astype(np.float32)})
    except Exception as error:  # Polygraphy's and TensorRT's: no GPU, a parser or build failure
        raise UserError(
            f"TensorRT could not build or run the engine ({type(error).__name__}: {error}); "
            "check the model with 'qkd-deploy lint', or run diff without TensorRT"
        ) from error
    values = {key: np.asarray(value) for key, value in outputs.items()}
    return levels_from_dequantized(values, points, dequantized)
