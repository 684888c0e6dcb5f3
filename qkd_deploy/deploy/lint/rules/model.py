"""Model-level rules: ONNX's checker, graph inputs and outputs, stored tensor data, no Q/DQ,
subgraphs, external data, QOperator ops and the opset.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx
from onnx import TensorProto

from qkd_deploy.deploy.lint.graph import Graph
from qkd_deploy.deploy.lint.qdq import min_opset, stored_data_problem, type_name
from qkd_deploy.deploy.lint.registry import Hit, lint_rule

# Pre-quantized (QOperator) ops TensorRT cannot import [TRT-EQ: ONNX Support; OTRT operators.md].
QOPERATOR_OPS = {"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "QGemm"}
TRT86_MAX_OPSET = 17


@lint_rule(
    "MODEL-CHECKER",
    "error",
    "onnx.checker rejects the model (full check: types and shapes inferred, strictly)",
    "ONNX: onnx.checker.check_model(full_check=True)",
    "re-export the model; run onnx.checker.check_model(model, full_check=True) for the details",
)
def _checker(g: Graph) -> Iterator[Hit]:
    try:
        onnx.checker.check_model(str(g.path) if g.path else g.model, full_check=True)
    except Exception as error:  # ValidationError, InferenceError, ValueError, ...: all rejections
        lines = str(error).strip().splitlines() or [type(error).__name__]
        yield Hit(g.name, f"onnx.checker: {lines[0]}")


@lint_rule(
    "MODEL-GRAPH-IO",
    "error",
    "the graph lists its outputs, and every graph input and output has a defined element type",
    "TensorRT network validation: 'Network must have at least one output'; ONNX Runtime refuses "
    "an undefined one ('Invalid tensor data type 0')",
    "export the model again: its image input and logits output as typed graph input and output",
)
def _graph_io(g: Graph) -> Iterator[Hit]:
    if not g.graph.output:
        yield Hit(g.name, "the graph lists no outputs: it computes nothing a runtime can return")
    for value in [*g.inputs, *g.graph.output]:
        if not value.type.HasField("tensor_type"):
            continue  # sequences and maps: not a classifier's, not checked here
        elem_type = value.type.tensor_type.elem_type
        if elem_type == TensorProto.UNDEFINED or type_name(elem_type).startswith("data type"):
            yield Hit(value.name, f"graph input or output of undefined type ({elem_type})")


@lint_rule(
    "MODEL-TENSOR-DATA",
    "error",
    "a stored tensor's data does not fit its dims and type",
    "ONNX IR: TensorProto (raw_data: the elements packed little-endian, 4-bit types two to a "
    "byte); ONNX Runtime refuses such a tensor ('Deserialize tensor ... failed')",
    "re-export the model; the file was damaged or edited by hand",
)
def _tensor_data(g: Graph) -> Iterator[Hit]:
    tensors = [(t.name, t) for t in g.graph.initializer]
    tensors += [(n.label, n.attr("value")) for n in g.nodes if n.op == "Constant"]
    for name, tensor in tensors:
        problem = stored_data_problem(tensor) if isinstance(tensor, TensorProto) else None
        if problem:
            yield Hit(name, problem)


@lint_rule(
    "MODEL-NOT-QUANTIZED",
    "info",
    "no Q/DQ: TensorRT builds the model in float",
    "TRT-EQ: Explicit Quantization",
    "export with Q/DQ (qkd-deploy export) for an INT8 engine",
)
def _not_quantized(g: Graph) -> Iterator[Hit]:
    if not g.qdq:
        yield Hit(
            g.name,
            "not quantized: no QuantizeLinear/DequantizeLinear, TensorRT builds it in FP32/FP16",
        )


@lint_rule(
    "MODEL-SUBGRAPH",
    "info",
    "If/Loop/Scan subgraphs are not linted",
    "this linter",
    "inline or unroll the control flow if it holds quantized layers",
)
def _subgraphs(g: Graph) -> Iterator[Hit]:
    graph_types = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    for node in g.nodes:
        if any(a.type in graph_types for a in node.proto.attribute):
            yield Hit(node.label, f"{node.op} has subgraphs; Q/DQ inside them is not checked")


@lint_rule(
    "MODEL-EXTERNAL-DATA",
    "info",
    "weights live in a side file next to the .onnx",
    "DESIGN: one self-contained .onnx under 2 GB",
    "save with onnx.save(model, path, save_as_external_data=False) (models under 2 GB)",
)
def _external_data(g: Graph) -> Iterator[Hit]:
    external = [t.name for t in g.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    if external:
        yield Hit(
            g.name,
            f"{len(external)} initializers (e.g. {external[0]!r}) are external "
            "data: the model breaks if the side file is not copied with it",
        )


@lint_rule(
    "OP-QOPERATOR",
    "error",
    "QOperator ops (QLinearConv, ConvInteger, MatMulInteger, ...) are not imported by TensorRT",
    "TRT-EQ: ONNX Support; OTRT: operators.md",
    "quantize in QDQ format (ONNX Runtime: quant_format=QuantFormat.QDQ)",
)
def _qoperator(g: Graph) -> Iterator[Hit]:
    for node in g.nodes:
        if node.op.startswith("QLinear") or node.op in QOPERATOR_OPS:
            yield Hit(
                node.label,
                f"{node.op} is a pre-quantized (QOperator) op; the TensorRT "
                "ONNX parser has no importer for it",
            )


@lint_rule(
    "OPSET-QDQ",
    "error",
    "opset too old for the Q/DQ used: 10 for Q/DQ, 13 per-axis, 19 FP8, 21 INT4 and blocks",
    "ONNX: QuantizeLinear-10/13/19/21/23; TRT-EQ: ONNX Support",
    "export with a newer opset",
)
def _opset_qdq(g: Graph) -> Iterator[Hit]:
    for node in g.qdq:
        needed, feature = min_opset(g, node)
        if g.opset < needed:
            yield Hit(
                node.label,
                f"{feature} needs opset >= {needed}, the model has {g.opset}",
                fix=f"export with opset >= {needed}",
            )


@lint_rule(
    "OPSET-TRT86",
    "warning",
    "opset > 17: TensorRT 8.6 (JetPack 6.0) parses opsets <= 17, TensorRT 10 reads it",
    "OTRT: operators.md 'supports operators up to Opset 17'; DESIGN",
    "down-convert to opset 17 for JetPack 6.0 / TRT 8.6 (a tested pass, not onnx's version "
    "converter alone), or deploy with TensorRT >= 10",
)
def _opset_trt86(g: Graph) -> Iterator[Hit]:
    if g.opset > TRT86_MAX_OPSET:
        yield Hit(g.name, f"opset {g.opset}: TensorRT 8.6 (JetPack 6.0) cannot parse it")


@lint_rule(
    "OPSET-UNKNOWN",
    "error",
    "an opset newer than any the installed onnx defines: its operators cannot be checked",
    "ONNX: onnx.defs.onnx_opset_version(); ONNX Runtime refuses opsets newer than it supports",
    "export with a released opset (qkd-deploy exports 17, 18 or 21)",
)
def _opset_unknown(g: Graph) -> Iterator[Hit]:
    known = onnx.defs.onnx_opset_version()
    if g.opset > known:
        yield Hit(
            g.name,
            f"opset {g.opset}: onnx {onnx.__version__} defines opsets up to {known}",
            fix=f"export with opset <= {known}, or update onnx if a newer release defines it",
        )
