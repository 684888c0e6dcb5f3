"""Seeded mutants of real exported Q/DQ models, for the linter's fuzz test and benchmark.

``seed_models`` exports three small networks as the pipeline does (W8A8 and W4A4 for TensorRT,
W8A8 for ONNX Runtime: INT8, INT4 and UINT8 Q/DQ, per-channel axes, opsets 18 and 21). A
mutant is one of them after one to three random edits of the proto (element types, dims, raw
data, attributes, node inputs and order, op types, graph inputs and outputs, opset) or of the
serialized bytes (flipped, truncated). ``outcome`` lints one mutant file and judges it against
ONNX's checker and ONNX Runtime: the linter must give a report or one ``UserError``, never
another exception, and must not pass with 0 errors a model either of them rejects.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import AttributeProto

from qkd_deploy.deploy.lint import INTERNAL_RULE, format_findings, lint_file
from qkd_deploy.errors import UserError

OPS = ["Conv", "Relu", "Add", "Gemm", "MatMul", "QuantizeLinear", "DequantizeLinear", "Flatten"]
OPS += ["GlobalAveragePool", "Reshape", "Transpose", "Identity", "Constant", "NoSuchOp"]


def seed_models(folder: Path) -> list[Path]:
    """Export the three seed models into ``folder`` (needs torch; about 10 s)."""
    import torch

    from qkd_deploy.calib.calibrate import calibrate
    from qkd_deploy.export.onnx import export_onnx
    from qkd_deploy.models import build_model
    from qkd_deploy.quant.convert import BitWidths, QuantizeOptions, quantize_model
    from qkd_deploy.quant.integer import to_deploy

    torch.manual_seed(0)
    model = build_model("resnet8", 1, 10).eval()
    images = torch.randn(32, 1, 8, 8)
    paths = []
    for w, a, target in ((8, 8, "tensorrt"), (4, 4, "tensorrt"), (8, 8, "onnxruntime")):
        quantized = quantize_model(model, QuantizeOptions(BitWidths(w, a), target=target))
        calibrate(quantized, [images])
        path = folder / f"resnet8_w{w}a{a}_{target}.onnx"
        paths.append(export_onnx(to_deploy(quantized.eval()), images, path))
    return paths


# ---- proto edits ---------------------------------------------------------------------------


def _data_type(rng: random.Random, model: onnx.ModelProto) -> None:
    tensor = rng.choice(model.graph.initializer)
    tensor.data_type = rng.choice([*range(0, 27), 79, 1000])


def _dims(rng: random.Random, model: onnx.ModelProto) -> None:
    tensor = rng.choice(model.graph.initializer)
    dims = list(tensor.dims)
    edit = rng.choice(["add", "drop", "change"])
    if edit == "add" or not dims:
        dims.insert(rng.randrange(len(dims) + 1), rng.choice([0, 1, 2, 3, 7, 1 << 40]))
    elif edit == "drop":
        dims.pop(rng.randrange(len(dims)))
    else:
        dims[rng.randrange(len(dims))] = rng.choice([0, 1, 2, 5, -1, 1 << 40])
    del tensor.dims[:]
    tensor.dims.extend(dims)


def _raw_data(rng: random.Random, model: onnx.ModelProto) -> None:
    tensor = rng.choice(model.graph.initializer)
    data = tensor.raw_data
    tensor.raw_data = data[: rng.randrange(len(data) + 1)] if data else b"\x01" * rng.randrange(9)


def _attribute(rng: random.Random, model: onnx.ModelProto) -> None:
    nodes = [n for n in model.graph.node if n.attribute] or list(model.graph.node)
    node = rng.choice(nodes)
    name = rng.choice([*(a.name for a in node.attribute), "axis", "block_size", "output_dtype"])
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept)
    value = rng.choice([-5, -1, 0, 1, 3, 9, 1 << 33, 2.5, "x", b"", [1, 2], [0.5], [], None])
    if value is None:
        return  # the attribute is dropped
    if value == [] or value == b"":
        attribute = AttributeProto(name=name, type=rng.choice([AttributeProto.INTS, 3, 0]))
    else:
        attribute = onnx.helper.make_attribute(name, value)
    node.attribute.append(attribute)


def _node_input(rng: random.Random, model: onnx.ModelProto) -> None:
    node = rng.choice(model.graph.node)
    names = [o for n in model.graph.node for o in n.output] + [
        t.name for t in model.graph.initializer
    ]
    choice = rng.choice(["", "undefined_tensor", *rng.sample(names, 3)])
    if node.input and rng.random() < 0.7:
        node.input[rng.randrange(len(node.input))] = choice
    elif node.input and rng.random() < 0.5:
        del node.input[rng.randrange(len(node.input))]
    else:
        node.input.append(choice)


def _cycle(rng: random.Random, model: onnx.ModelProto) -> None:
    """A node fed by its own output or a later node's, or two nodes writing one tensor."""
    nodes = list(model.graph.node)
    i = rng.randrange(len(nodes))
    later = nodes[rng.randrange(i, len(nodes))]
    if rng.random() < 0.7 and nodes[i].input and later.output:
        nodes[i].input[0] = later.output[0]
    elif nodes[i].output and later.output:
        later.output[0] = nodes[i].output[0]


def _node_order(rng: random.Random, model: onnx.ModelProto) -> None:
    nodes = list(model.graph.node)
    if rng.random() < 0.5:
        nodes.pop(rng.randrange(len(nodes)))
    else:
        i, j = rng.randrange(len(nodes)), rng.randrange(len(nodes))
        nodes[i], nodes[j] = nodes[j], nodes[i]
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _op_type(rng: random.Random, model: onnx.ModelProto) -> None:
    rng.choice(model.graph.node).op_type = rng.choice(OPS)


def _graph_io(rng: random.Random, model: onnx.ModelProto) -> None:
    graph = model.graph
    edit = rng.choice(["no outputs", "no inputs", "output type", "input type", "input dims"])
    if edit == "no outputs":
        del graph.output[:]
    elif edit == "no inputs":
        del graph.input[:]
    elif graph.input and graph.output:
        value = (graph.output if edit == "output type" else graph.input)[0]
        tensor_type = value.type.tensor_type
        if edit == "input dims":
            dims = tensor_type.shape.dim
            dim = dims[rng.randrange(len(dims))] if dims else tensor_type.shape.dim.add()
            dim.dim_value = rng.choice([0, 1, 3, 5, 1 << 40])
        else:
            tensor_type.elem_type = rng.choice([0, 2, 3, 7, 10, 79])


def _opset(rng: random.Random, model: onnx.ModelProto) -> None:
    opset = model.opset_import[0]
    if rng.random() < 0.2:
        opset.domain = "com.example"
    else:
        opset.version = rng.choice([1, 9, 10, 12, 13, 17, 19, 21, 23, 25, 99])


PROTO_EDITS: list[Callable[[random.Random, onnx.ModelProto], None]] = [
    _data_type,
    _dims,
    _raw_data,
    _attribute,
    _node_input,
    _cycle,
    _node_order,
    _op_type,
    _graph_io,
    _opset,
]


def _byte_edit(rng: random.Random, data: bytes) -> bytes:
    if rng.random() < 0.4:
        return data[: rng.randrange(len(data))]
    flipped = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        flipped[rng.randrange(len(flipped))] = rng.randrange(256)
    return bytes(flipped)


@dataclass(frozen=True)
class Mutant:
    path: Path
    edits: tuple[str, ...]


def write_mutants(seeds: list[Path], folder: Path, count: int, seed: int) -> list[Mutant]:
    """``count`` mutants of ``seeds`` written to ``folder`` (the same ones for the same seed)."""
    rng = random.Random(seed)
    originals = [(path.name, onnx.load(str(path))) for path in seeds]
    mutants = []
    for index in range(count):
        name, original = originals[index % len(originals)]
        model = copy.deepcopy(original)
        edits = [rng.choice(PROTO_EDITS) for _ in range(rng.randint(1, 3))]
        for edit in edits:
            edit(rng, model)
        data = model.SerializeToString()
        names = [edit.__name__.lstrip("_") for edit in edits]
        if rng.random() < 0.1:
            data, names = _byte_edit(rng, data), [*names, "bytes"]
        path = folder / f"mutant_{index:04d}_{name}"
        path.write_bytes(data)
        mutants.append(Mutant(path, tuple(names)))
    return mutants


# ---- judging a mutant ----------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What the linter did with one mutant, and what ONNX's checker and ONNX Runtime said."""

    mutant: Mutant
    lint: str  # "report", "user error", "crash" (an exception), "rule failed" (LINT-INTERNAL)
    # or "hang" (still linting after ``timeout_s``)
    errors: int  # lint errors in the report
    detail: str  # the crash, or the first error
    checker_rejects: bool
    onnxruntime_rejects: bool
    seconds: float

    @property
    def invalid_passed(self) -> bool:
        rejected = self.checker_rejects or self.onnxruntime_rejects
        return rejected and self.lint == "report" and self.errors == 0


class _Hang(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _Hang


def outcome(mutant: Mutant, timeout_s: float = 30.0) -> Outcome:
    """Lint ``mutant`` (interrupted after ``timeout_s``: a hang) and judge it."""
    start = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        findings = lint_file(str(mutant.path))
        format_findings(findings)  # what the command prints, as text and as JSON
        json.dumps([dataclasses.asdict(f) for f in findings])
        errors = [f for f in findings if f.severity == "error"]
        lint, detail = "report", f"{errors[0].rule}: {errors[0].message}" if errors else ""
        failed = [f for f in errors if f.rule == INTERNAL_RULE]
        if failed:
            lint, detail = "rule failed", failed[0].message
    except UserError as error:
        lint, errors, detail = "user error", [], str(error)
    except _Hang:
        lint, errors, detail = "hang", [], f"still linting after {timeout_s} s"
    except Exception as error:  # what the fuzz test looks for
        lint, errors, detail = "crash", [], f"{type(error).__name__}: {error}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    seconds = time.perf_counter() - start
    return Outcome(
        mutant,
        lint,
        len(errors),
        detail,
        _checker_rejects(mutant.path),
        _onnxruntime_rejects(mutant.path),
        seconds,
    )


def _checker_rejects(path: Path) -> bool:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception:
        return True
    return False


def _onnxruntime_rejects(path: Path) -> bool:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:  # its Python wrapper prints to stdout when it fails to decode a name
        with contextlib.redirect_stdout(io.StringIO()):
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception:
        return True
    return False
