"""`qkd-deploy lint`: a bad graph per rule, a clean graph, ONNX Runtime QDQ output, the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qkd_deploy.deploy.lint import RULES, Finding, format_findings, lint_file, lint_model, main
from qkd_deploy.errors import UserError

RNG = np.random.default_rng(0)
Q, DQ = "QuantizeLinear", "DequantizeLinear"


class Graph:
    """A tiny graph builder: named ops (output ``<name>_out``), INT8 weights, Q/DQ pairs."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, value: object, dtype: object = None) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [f"{name}_out"], name=name, **attrs))
        return f"{name}_out"

    def qdq(self, x: str, name: str, scale: float = 0.05) -> str:
        s = self.const(f"{name}_scale", scale, np.float32)
        z = self.const(f"{name}_zp", 0, np.int8)
        return self.op(DQ, [self.op(Q, [x, s, z], f"{name}_q"), s, z], f"{name}_dq")

    def weight(self, name: str, shape: tuple[int, ...]) -> str:
        """An INT8 initializer with a DequantizeLinear per output channel (axis 0)."""
        w = self.const(f"{name}_int8", RNG.integers(-127, 128, shape), np.int8)
        s = self.const(f"{name}_scale", np.full(shape[0], 0.01), np.float32)
        z = self.const(f"{name}_zp", np.zeros(shape[0]), np.int8)
        return self.op(DQ, [w, s, z], f"{name}_dq", axis=0)

    def model(
        self,
        output: str,
        out_shape: tuple,
        inputs: dict[str, tuple] | None = None,
        opset: int = 17,
        input_type: int = TensorProto.FLOAT,
    ) -> onnx.ModelProto:
        inputs = {"x": ("N", 3, 8, 8)} if inputs is None else inputs
        graph = helper.make_graph(
            self.nodes,
            "g",
            [helper.make_tensor_value_info(n, input_type, list(s)) for n, s in inputs.items()],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, list(out_shape))],
            self.initializers,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def clean_model(opset: int = 17) -> onnx.ModelProto:
    """Small conv net as TensorRT wants it: INT8 per-channel weights (DQ only), INT8 per-tensor
    activations with zero point 0, a residual Add with both inputs Q/DQ'd."""
    g = Graph()
    x = g.qdq("x", "x")
    c1 = g.op(
        "Conv",
        [x, g.weight("w1", (4, 3, 3, 3)), g.const("b1", np.zeros(4), np.float32)],
        "conv1",
        pads=[1, 1, 1, 1],
    )
    r1 = g.qdq(g.op("Relu", [c1], "relu1"), "r1")
    c2 = g.op(
        "Conv",
        [r1, g.weight("w2", (4, 4, 3, 3)), g.const("b2", np.zeros(4), np.float32)],
        "conv2",
        pads=[1, 1, 1, 1],
    )
    added = g.op("Add", [g.qdq(c2, "c2"), r1], "add")
    pooled = g.op("GlobalAveragePool", [g.op("Relu", [added], "relu2")], "gap")
    f = g.qdq(g.op("Flatten", [pooled], "flatten"), "f")
    y = g.op(
        "Gemm",
        [f, g.weight("wfc", (5, 4)), g.const("bfc", np.zeros(5), np.float32)],
        "fc",
        transB=1,
    )
    return g.model(y, ("N", 5), opset=opset)


# ---- proto surgery on the clean model -----------------------------------------------------------


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def set_input(model: onnx.ModelProto, name: str, index: int, tensor: str) -> onnx.ModelProto:
    node(model, name).input[index] = tensor
    return model


def set_const(model: onnx.ModelProto, name: str, value: object, dtype: object) -> onnx.ModelProto:
    tensor = next(t for t in model.graph.initializer if t.name == name)
    tensor.CopyFrom(numpy_helper.from_array(np.asarray(value, dtype), name))
    return model


def add_const(model: onnx.ModelProto, name: str, value: object, dtype: object) -> onnx.ModelProto:
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), name))
    return model


def add_input(model: onnx.ModelProto, name: str, elem_type: int) -> onnx.ModelProto:
    model.graph.input.append(helper.make_tensor_value_info(name, elem_type, []))
    return model


def insert_before(model: onnx.ModelProto, name: str, new: onnx.NodeProto) -> onnx.ModelProto:
    nodes = list(model.graph.node)
    nodes.insert(nodes.index(node(model, name)), new)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def set_attr(model: onnx.ModelProto, name: str, **attrs: object) -> onnx.ModelProto:
    target = node(model, name)
    kept = [a for a in target.attribute if a.name not in attrs]
    del target.attribute[:]
    target.attribute.extend([*kept, *(helper.make_attribute(k, v) for k, v in attrs.items())])
    return model


# ---- one bad graph per rule ---------------------------------------------------------------------


def _checker_fails() -> onnx.ModelProto:
    return set_input(clean_model(), "conv1", 0, "undefined_tensor")


def _float_model() -> onnx.ModelProto:
    g = Graph()
    y = g.op("Conv", ["x", g.const("w", RNG.standard_normal((4, 3, 3, 3)), np.float32)], "conv")
    return g.model(y, ("N", 4, 6, 6))


def _if_model() -> onnx.ModelProto:
    def branch(value: float) -> onnx.GraphProto:
        const = helper.make_node(
            "Constant", [], ["v"], value=numpy_helper.from_array(np.array([value], np.float32))
        )
        return helper.make_graph([const], "b", [], [helper.make_tensor_value_info("v", 1, [1])])

    g = Graph()
    y = g.op("If", ["x"], "branchy", then_branch=branch(1.0), else_branch=branch(0.0))
    return g.model(y, (1,), inputs={"x": ()}, input_type=TensorProto.BOOL)


def _qoperator_model() -> onnx.ModelProto:
    g = Graph()
    y = g.op("MatMulInteger", ["x", g.const("b", np.ones((8, 4)), np.uint8)], "mmi")
    return g.model(y, (1, 4), inputs={"x": (1, 8)}, input_type=TensorProto.UINT8)


def _runtime_scale() -> onnx.ModelProto:
    """scale = max|x| / 127 computed in the graph (dynamic quantization)."""
    model = add_const(clean_model(), "qmax", 127.0, np.float32)
    for new in (
        helper.make_node("Abs", ["x"], ["ax"], name="abs"),
        helper.make_node("ReduceMax", ["ax"], ["mx"], name="max", keepdims=0),
        helper.make_node("Div", ["mx", "qmax"], ["dyn_scale"], name="div"),
    ):
        insert_before(model, "x_q", new)
    return set_input(set_input(model, "x_q", 1, "dyn_scale"), "x_dq", 1, "dyn_scale")


def _runtime_zero_point() -> onnx.ModelProto:
    model = add_input(clean_model(), "zp_in", TensorProto.INT8)
    return set_input(set_input(model, "r1_q", 2, "zp_in"), "r1_dq", 2, "zp_in")


def _no_zero_point() -> onnx.ModelProto:
    return set_input(set_input(clean_model(), "x_q", 2, ""), "x_dq", 2, "")


def _uint8_activation() -> onnx.ModelProto:
    return set_const(clean_model(), "x_zp", 0, np.uint8)


def _int32_bias() -> onnx.ModelProto:
    model = clean_model()
    add_const(model, "b1_int32", np.zeros(4), np.int32)
    add_const(model, "b1_scale", 0.001, np.float32)
    add_const(model, "b1_zp", 0, np.int32)
    insert_before(
        model,
        "conv1",
        helper.make_node(DQ, ["b1_int32", "b1_scale", "b1_zp"], ["b1_deq"], name="b1_dq"),
    )
    return set_input(model, "conv1", 2, "b1_deq")


def _per_channel(model: onnx.ModelProto, name: str, channels: int, axis: int) -> onnx.ModelProto:
    """Give Q/DQ ``name`` ``channels`` scales and zero points along ``axis``."""
    set_const(model, f"{name}_scale", [0.01] * channels, np.float32)
    set_const(model, f"{name}_zp", [0] * channels, np.int8)
    for suffix in ("_q", "_dq"):
        if any(n.name == name + suffix for n in model.graph.node):
            set_attr(model, name + suffix, axis=axis)
    return model


def _activation_per_channel() -> onnx.ModelProto:
    return _per_channel(clean_model(), "x", 3, 1)


def _fp16_scale() -> onnx.ModelProto:
    g = Graph()
    s, z = g.const("s", 0.05, np.float16), g.const("z", 0, np.int8)
    y = g.op(DQ, [g.op(Q, ["x", s, z], "q16"), s, z], "dq16")
    return g.model(y, (1, 8), inputs={"x": (1, 8)}, opset=19, input_type=TensorProto.FLOAT16)


def _block_matmul(dtype: int) -> onnx.ModelProto:
    """MatMul weight [8, 4] quantized in blocks of 4 rows (scale [2, 4]), opset 21."""
    g = Graph()
    values = RNG.integers(-7, 8, (8, 4))
    g.initializers += [
        helper.make_tensor("w_q", dtype, (8, 4), values.ravel().tolist()),
        helper.make_tensor("w_zp", dtype, (2, 4), [0] * 8),
    ]
    w = g.op(
        DQ,
        ["w_q", g.const("w_scale", np.full((2, 4), 0.1), np.float32), "w_zp"],
        "w_dq",
        axis=0,
        block_size=4,
    )
    return g.model(g.op("MatMul", ["x", w], "mm"), (1, 4), inputs={"x": (1, 8)}, opset=21)


def _int4_conv_weight() -> onnx.ModelProto:
    model = clean_model(opset=21)
    tensor = next(t for t in model.graph.initializer if t.name == "w1_int8")
    tensor.CopyFrom(helper.make_tensor("w1_int8", TensorProto.INT4, (4, 3, 3, 3), [1] * 108))
    zero = next(t for t in model.graph.initializer if t.name == "w1_zp")
    zero.CopyFrom(helper.make_tensor("w1_zp", TensorProto.INT4, (4,), [0] * 4))
    return model


def _int4_activation() -> onnx.ModelProto:
    model = clean_model(opset=21)
    zero = next(t for t in model.graph.initializer if t.name == "x_zp")
    zero.CopyFrom(helper.make_tensor("x_zp", TensorProto.INT4, (), [0]))
    return model


def _float_weight_with_q() -> onnx.ModelProto:
    model = clean_model()
    add_const(model, "w2_float", RNG.standard_normal((4, 4, 3, 3)), np.float32)
    insert_before(
        model,
        "w2_dq",
        helper.make_node(Q, ["w2_float", "w2_scale", "w2_zp"], ["w2_q_out"], name="w2_q", axis=0),
    )
    return set_input(model, "w2_dq", 0, "w2_q_out")


def _unused_q() -> onnx.ModelProto:
    model = clean_model()
    return insert_before(
        model, "x_q", helper.make_node(Q, ["x", "x_scale", "x_zp"], ["dead"], name="dead_q")
    )


def _orphan_dq() -> onnx.ModelProto:
    g = Graph()
    s, z = g.const("s", 0.05, np.float32), g.const("z", 0, np.int8)
    y = g.op("Relu", [g.op(DQ, ["x", s, z], "orphan_dq")], "relu")
    return g.model(y, (1, 8), inputs={"x": (1, 8)}, input_type=TensorProto.INT8)


def _pair_mismatch() -> onnx.ModelProto:
    model = add_const(clean_model(), "x_scale_other", 0.07, np.float32)
    return set_input(model, "x_dq", 1, "x_scale_other")


def _requantize() -> onnx.ModelProto:
    model = add_const(clean_model(), "rq_scale", 0.1, np.float32)
    insert_before(
        model, "conv2", helper.make_node(Q, ["r1_dq_out", "rq_scale", "r1_zp"], ["rq"], name="rq_q")
    )
    insert_before(
        model, "conv2", helper.make_node(DQ, ["rq", "rq_scale", "r1_zp"], ["rq_dq"], name="rq_dq")
    )
    return set_input(model, "conv2", 0, "rq_dq")


def _float_conv2_weight() -> onnx.ModelProto:
    model = add_const(clean_model(), "w2_float", RNG.standard_normal((4, 4, 3, 3)), np.float32)
    return set_input(model, "conv2", 1, "w2_float")


def _sigmoid_between() -> onnx.ModelProto:
    model = insert_before(
        clean_model(), "conv2", helper.make_node("Sigmoid", ["r1_dq_out"], ["sig_out"], name="sig")
    )
    model = add_const(model, "w2_float", RNG.standard_normal((4, 4, 3, 3)), np.float32)
    return set_input(model, "conv2", 0, "sig_out")


def _dynamic_dims() -> onnx.ModelProto:
    model = clean_model()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    return model


def _token_linear(axis: int = 0, between: str = "Transpose") -> onnx.ModelProto:
    """nn.Linear(4, 4) on (N, T, C) tokens as torch exports it: the [out, in] weight behind a
    DequantizeLinear (per channel along ``axis``), then Transpose to [in, out] for the MatMul;
    ``between="Reshape"`` reshapes the weight instead, to the same [in, out] shape."""
    g = Graph()
    w = g.const("w_int8", RNG.integers(-127, 128, (4, 4)), np.int8)
    s = g.const("w_scale", [0.01, 0.02, 0.03, 0.04], np.float32)
    z = g.const("w_zp", np.zeros(4), np.int8)
    weight = g.op(DQ, [w, s, z], "w_dq", axis=axis)
    if between == "Transpose":
        weight = g.op("Transpose", [weight], "w_t", perm=[1, 0])
    else:
        weight = g.op("Reshape", [weight, g.const("shape", [4, 4], np.int64)], "w_r")
    y = g.op("MatMul", [g.qdq("x", "x"), weight], "mm")
    return g.model(y, ("N", 2, 4), inputs={"x": ("N", 2, 4)}, opset=17)


def _retyped(model: onnx.ModelProto, name: str, data_type: int) -> onnx.ModelProto:
    """The initializer ``name`` relabelled as ``data_type``, its bytes kept."""
    next(t for t in model.graph.initializer if t.name == name).data_type = data_type
    return model


def _without_outputs() -> onnx.ModelProto:
    model = clean_model()
    del model.graph.output[:]
    return model


def _untyped_output() -> onnx.ModelProto:
    model = clean_model()
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.UNDEFINED
    return model


def _raw_data_too_long() -> onnx.ModelProto:
    model = clean_model()
    next(t for t in model.graph.initializer if t.name == "w1_int8").raw_data += b"\0"
    return model


def _axis_of_type(attribute: onnx.AttributeProto) -> onnx.ModelProto:
    """w1_dq's axis attribute replaced by ``attribute`` (a string, a list: not an INT)."""
    model = clean_model()
    target = node(model, "w1_dq")
    kept = [a for a in target.attribute if a.name != "axis"]
    del target.attribute[:]
    target.attribute.extend([*kept, attribute])
    return model


def _conv_channel_mismatch() -> onnx.ModelProto:
    """conv1's INT8 weight for 2 input channels, its input has 3."""
    return set_const(clean_model(), "w1_int8", np.zeros((4, 2, 3, 3)), np.int8)


@dataclass(frozen=True)
class Case:
    rule: str
    severity: str
    node: str
    build: Callable[[], onnx.ModelProto]


CASES = [
    Case("MODEL-CHECKER", "error", "g", _checker_fails),
    Case("MODEL-GRAPH-IO", "error", "g", _without_outputs),
    Case("MODEL-GRAPH-IO", "error", "fc_out", _untyped_output),
    Case("MODEL-TENSOR-DATA", "error", "w1_int8", _raw_data_too_long),
    Case("OPSET-UNKNOWN", "error", "g", lambda: clean_model(opset=99)),
    Case("MODEL-NOT-QUANTIZED", "info", "g", _float_model),
    Case("MODEL-SUBGRAPH", "info", "branchy", _if_model),
    Case("OP-QOPERATOR", "error", "mmi", _qoperator_model),
    Case("OPSET-QDQ", "error", "w1_dq", lambda: clean_model(opset=12)),
    Case("OPSET-TRT86", "warning", "g", lambda: clean_model(opset=18)),
    Case("QDQ-SCALE-CONSTANT", "error", "x_q", _runtime_scale),
    Case(
        "QDQ-SCALE-VALUE",
        "error",
        "x_q",
        lambda: set_const(clean_model(), "x_scale", 0, np.float32),
    ),
    Case("QDQ-SCALE-DTYPE", "warning", "q16", _fp16_scale),
    Case("QDQ-DTYPE", "error", "x_q", _uint8_activation),
    Case("QDQ-DTYPE", "error", "b1_dq", _int32_bias),
    Case("QDQ-ZERO-POINT", "error", "x_q", lambda: set_const(clean_model(), "x_zp", 3, np.int8)),
    Case("QDQ-ZERO-POINT", "error", "r1_q", _runtime_zero_point),
    Case("QDQ-IMPLICIT-UINT8", "warning", "x_q", _no_zero_point),
    Case("QDQ-ACTIVATION-PER-CHANNEL", "error", "x_q", _activation_per_channel),
    Case("QDQ-WEIGHT-AXIS", "error", "w1_dq", lambda: _per_channel(clean_model(), "w1", 3, 1)),
    Case("QDQ-WEIGHT-AXIS", "error", "wfc_dq", lambda: _per_channel(clean_model(), "wfc", 4, -1)),
    Case("QDQ-WEIGHT-AXIS", "error", "w_dq", lambda: _token_linear(axis=1)),
    Case("QDQ-SCALE-SHAPE", "error", "w1_dq", lambda: _per_channel(clean_model(), "w1", 5, 0)),
    Case("QDQ-BLOCK", "error", "w_dq", lambda: _block_matmul(TensorProto.INT8)),
    Case("QDQ-BLOCK", "error", "x_dq", lambda: set_attr(clean_model(), "x_dq", block_size=-2)),
    Case("QDQ-INT4", "error", "w1_dq", _int4_conv_weight),
    Case("QDQ-INT4", "error", "x_q", _int4_activation),
    Case("QDQ-WEIGHT-FLOAT", "warning", "w2_q", _float_weight_with_q),
    Case(
        "QDQ-DANGLING-Q", "error", "r1_q", lambda: set_input(clean_model(), "conv2", 0, "r1_q_out")
    ),
    Case("QDQ-DANGLING-Q", "warning", "dead_q", _unused_q),
    Case("QDQ-ORPHAN-DQ", "warning", "orphan_dq", _orphan_dq),
    Case("QDQ-PAIR-MISMATCH", "warning", "x_dq", _pair_mismatch),
    Case("QDQ-REQUANTIZE", "warning", "rq_q", _requantize),
    Case("FUSE-WEIGHT-NOT-QUANTIZED", "warning", "conv2", _float_conv2_weight),
    Case(
        "FUSE-INPUT-NOT-QUANTIZED",
        "warning",
        "conv2",
        lambda: set_input(clean_model(), "conv2", 0, "relu1_out"),
    ),
    Case("FUSE-FLOAT-OP-BETWEEN", "warning", "conv2", _sigmoid_between),
    Case(
        "FUSE-FLOAT-LAYER",
        "info",
        "conv2",
        lambda: set_input(_sigmoid_between(), "conv2", 1, "w2_float"),
    ),
    Case(
        "FUSE-FLOAT-LAYER",
        "info",
        "conv2",
        lambda: set_input(_float_conv2_weight(), "conv2", 0, "relu1_out"),
    ),
    Case(
        "FUSE-RESIDUAL-ADD",
        "warning",
        "add",
        lambda: set_input(clean_model(), "add", 1, "relu1_out"),
    ),
    Case("SHAPE-DYNAMIC-BATCH", "info", "x", clean_model),
    Case("SHAPE-DYNAMIC-DIMS", "warning", "x", _dynamic_dims),
    Case("SHAPE-CONV-CHANNELS", "error", "conv1", _conv_channel_mismatch),
]


def _fired(findings: list[Finding], rule: str) -> list[tuple[str, str]]:
    return [(f.node, f.severity) for f in findings if f.rule == rule]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.rule}@{c.node}")
def test_rule_fires_at_node(case: Case) -> None:
    findings = lint_model(case.build())
    assert (case.node, case.severity) in _fired(findings, case.rule), format_findings(findings)
    assert all(f.fix and f.message for f in findings)


MALFORMED = {  # models ONNX's checker or ONNX Runtime rejects, once crashes or passes of the linter
    "INT4 zero point at opset 18": (
        lambda: _retyped(clean_model(opset=18), "x_zp", TensorProto.INT4),
        "MODEL-CHECKER",
    ),
    "data type 79": (lambda: _retyped(clean_model(), "x_zp", 79), "MODEL-CHECKER"),
    "Conv channel mismatch": (_conv_channel_mismatch, "SHAPE-CONV-CHANNELS"),
    "no outputs": (_without_outputs, "MODEL-GRAPH-IO"),
    "axis a string": (
        lambda: _axis_of_type(helper.make_attribute("axis", "x")),
        "MODEL-CHECKER",
    ),
    "axis a list": (
        lambda: _axis_of_type(helper.make_attribute("axis", [0, 1])),
        "MODEL-CHECKER",
    ),
    "raw data longer than its dims": (_raw_data_too_long, "MODEL-TENSOR-DATA"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_models_are_errors_not_crashes(name: str, tmp_path) -> None:
    build, rule = MALFORMED[name]
    path = _save(tmp_path, build(), "m.onnx")
    findings = lint_file(path)
    assert (rule, "error") in {(f.rule, f.severity) for f in findings}, format_findings(findings)
    assert "LINT-INTERNAL" not in {f.rule for f in findings}, format_findings(findings)


def test_every_rule_has_a_bad_graph_and_a_source() -> None:
    assert {c.rule for c in CASES} | {"MODEL-EXTERNAL-DATA"} == set(RULES)
    assert all(
        desc.split(":")[0] in ("error", "warning", "info") and "[" in desc
        for desc in RULES.values()
    )


def test_clean_graph_has_no_errors_or_warnings() -> None:
    model = clean_model()
    findings = lint_model(model)
    assert [(f.rule, f.severity) for f in findings] == [("SHAPE-DYNAMIC-BATCH", "info")]
    onnxruntime = pytest.importorskip("onnxruntime")  # the clean graph is a valid, runnable model
    session = onnxruntime.InferenceSession(model.SerializeToString())
    (y,) = session.run(None, {"x": RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)})
    assert y.shape == (2, 5)


def test_doc_patterns_do_not_warn() -> None:
    """Conv output + quantized skip input fuses (TRT placement recommendations); INT4 blocks
    on a MatMul weight are TensorRT's weight-only quantization; DQ -> Flatten -> Gemm is fine."""
    conv_plus_dq = set_input(clean_model(), "add", 0, "conv2_out")
    int4_gemm = _block_matmul(TensorProto.INT4)
    for model in (conv_plus_dq, int4_gemm):
        findings = lint_model(model)
        problems = [f for f in findings if f.severity != "info" and f.rule != "OPSET-TRT86"]
        assert not problems, format_findings(findings)


def test_weight_axis_is_followed_back_through_a_transpose() -> None:
    """A Linear on tokens: per channel along axis 0 of the [out, in] weight is per output
    channel (ONNX Runtime: scaling channel k changes output column k only), and the linter
    accepts it; axis 1 there is reported with the right fix. Behind a Reshape the axes are not
    followed, so nothing is reported."""
    onnxruntime = pytest.importorskip("onnxruntime")
    model = _token_linear(axis=0)
    x = RNG.standard_normal((3, 2, 4)).astype(np.float32)
    outputs = []
    for scale in ([0.01, 0.02, 0.03, 0.04], [0.01, 0.02, 0.06, 0.04]):
        set_const(model, "w_scale", scale, np.float32)
        session = onnxruntime.InferenceSession(model.SerializeToString())
        outputs.append(session.run(None, {"x": x})[0])
    changed = np.any(outputs[0] != outputs[1], axis=(0, 1))
    assert changed.tolist() == [False, False, True, False]

    assert not _fired(lint_model(model), "QDQ-WEIGHT-AXIS")
    wrong = [f for f in lint_model(_token_linear(axis=1)) if f.rule == "QDQ-WEIGHT-AXIS"]
    assert [(f.node, f.fix) for f in wrong] == [
        ("w_dq", "quantize the weight per output channel: axis=0")
    ]
    assert "Transpose 'w_t'" in wrong[0].message
    for axis in (0, 1):
        assert not _fired(lint_model(_token_linear(axis, "Reshape")), "QDQ-WEIGHT-AXIS")


def test_external_data_is_reported_and_not_read(tmp_path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(
        clean_model(), str(path), save_as_external_data=True, size_threshold=0, location="m.data"
    )
    findings = lint_file(str(path))
    assert ("g", "info") in _fired(findings, "MODEL-EXTERNAL-DATA")
    assert not [f for f in findings if f.severity == "error"], format_findings(findings)


# ---- ONNX Runtime quantize_static output -------------------------------------------------------


@pytest.fixture(scope="module")
def float_conv(tmp_path_factory) -> str:
    g = Graph()
    c1 = g.op(
        "Conv",
        [
            "x",
            g.const("w1", RNG.standard_normal((4, 3, 3, 3)) * 0.1, np.float32),
            g.const("b1", np.full(4, 0.1), np.float32),
        ],
        "conv1",
        pads=[1, 1, 1, 1],
    )
    r1 = g.op("Relu", [c1], "relu1")
    c2 = g.op(
        "Conv",
        [r1, g.const("w2", RNG.standard_normal((4, 4, 3, 3)) * 0.1, np.float32)],
        "conv2",
        pads=[1, 1, 1, 1],
    )
    path = tmp_path_factory.mktemp("ort") / "float.onnx"
    onnx.save(g.model(g.op("Add", [c2, r1], "add"), ("N", 4, 8, 8)), str(path))
    return str(path)


def _ort_quantize(float_path: str, tmp_path, **options: object) -> list[Finding]:
    quantization = pytest.importorskip("onnxruntime.quantization")

    class Reader(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            batches = [RNG.standard_normal((1, 3, 8, 8)).astype(np.float32) for _ in range(4)]
            self.batches = iter({"x": b} for b in batches)

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    output = str(tmp_path / "quantized.onnx")
    quantization.quantize_static(float_path, output, Reader(), **options)
    return lint_file(output)


def test_onnxruntime_uint8_activations_are_errors(float_conv: str, tmp_path) -> None:
    from onnxruntime.quantization import QuantType

    findings = _ort_quantize(float_conv, tmp_path, activation_type=QuantType.QUInt8)
    assert any(
        f.rule == "QDQ-DTYPE" and f.severity == "error" and "UINT8" in f.message for f in findings
    )


def test_onnxruntime_defaults_are_asymmetric(float_conv: str, tmp_path) -> None:
    """ONNX Runtime 1.32 defaults to asymmetric INT8 activations (not UINT8)."""
    findings = _ort_quantize(float_conv, tmp_path)
    assert "QDQ-ZERO-POINT" in {f.rule for f in findings if f.severity == "error"}


def test_onnxruntime_signed_symmetric_per_channel_passes(float_conv: str, tmp_path) -> None:
    from onnxruntime.quantization import QuantType

    symmetric = {"ActivationSymmetric": True, "WeightSymmetric": True}
    options = dict(activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True)
    with_bias = _ort_quantize(float_conv, tmp_path, **options, extra_options=symmetric)
    # ONNX Runtime quantizes the bias to INT32 by default: TensorRT rejects an INT32 DQ.
    assert {(f.rule, f.node) for f in with_bias if f.severity == "error"} == {
        ("QDQ-DTYPE", "b1_DequantizeLinear")
    }
    findings = _ort_quantize(
        float_conv, tmp_path, **options, extra_options={**symmetric, "QuantizeBias": False}
    )
    assert not [f for f in findings if f.severity != "info"], format_findings(findings)


# ---- CLI ---------------------------------------------------------------------------------------


def _save(tmp_path, model: onnx.ModelProto, name: str) -> str:
    path = tmp_path / name
    onnx.save(model, str(path))
    return str(path)


def test_main_exit_codes(tmp_path, capsys) -> None:
    clean = _save(tmp_path, clean_model(), "clean.onnx")
    bad = _save(tmp_path, _uint8_activation(), "bad.onnx")
    warned = _save(tmp_path, clean_model(opset=18), "warned.onnx")
    assert main([clean]) == 0
    assert main([bad]) == 1
    assert main([warned]) == 0
    assert main([warned, "--strict"]) == 1
    assert main([clean, "--strict"]) == 0
    assert "QDQ-DTYPE" in capsys.readouterr().out


def test_main_json(tmp_path, capsys) -> None:
    assert main([_save(tmp_path, _uint8_activation(), "bad.onnx"), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["counts"]["error"] >= 1
    assert {"severity", "rule", "node", "message", "fix"} <= set(report["findings"][0])


def test_unreadable_files_are_user_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="no such model file"):
        lint_file(str(tmp_path / "missing.onnx"))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_text("not a protobuf")
    with pytest.raises(UserError, match="cannot read"):
        lint_file(str(garbage))


def test_a_model_for_tensorrt_10_skips_the_checks_that_hold_for_8_6_only(tmp_path, capsys):
    path = tmp_path / "opset18.onnx"
    onnx.save(clean_model(opset=18), path)
    assert "OPSET-TRT86" in {f.rule for f in lint_file(str(path))}
    assert "OPSET-TRT86" in {f.rule for f in lint_file(str(path), "8.6")}
    assert "OPSET-TRT86" not in {f.rule for f in lint_file(str(path), "10")}
    assert main([str(path), "--strict"]) == 1
    assert main([str(path), "--strict", "--tensorrt", "10"]) == 0
    capsys.readouterr()
    with pytest.raises(UserError, match="TensorRT version '9'"):
        lint_file(str(path), "9")
