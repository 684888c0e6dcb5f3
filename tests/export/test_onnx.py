import platform

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from qkd_deploy.bench.accuracy import parity
from qkd_deploy.calib.calibrate import calibrate
from qkd_deploy.errors import UserError
from qkd_deploy.export.onnx import export_onnx
from qkd_deploy.models import build_model
from qkd_deploy.quant.convert import BitWidths, QuantizeOptions, quantize_model
from qkd_deploy.quant.fold import fold_batchnorm
from qkd_deploy.quant.integer import to_deploy
from qkd_deploy.runtime import onnxruntime as ort_runtime
from qkd_deploy.runtime.onnxruntime import (
    OnnxRuntimeRunner,
    fused_kernel_inexactness,
    int8_kernels_may_saturate,
)
from tests.support.toy import ToyResNet, randomize_batchnorm


def _export(tmp_path, bits, target="tensorrt", residual_add_inputs="skip"):
    torch.manual_seed(0)
    model = randomize_batchnorm(ToyResNet()).eval()
    options = QuantizeOptions(
        BitWidths.parse(bits), target, residual_add_inputs=residual_add_inputs
    )
    q = quantize_model(model, options)
    x = torch.randn(96, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    calibrate(q, [x[:48], x[48:]])
    q.eval()
    path = export_onnx(to_deploy(q), x, tmp_path / f"{bits}_{target}.onnx")
    return q, x, path


def dequantized_initializer_type(model, name: str) -> int:
    """The element type of the initializer a DequantizeLinear turns into tensor ``name``."""
    dq = next(n for n in model.graph.node if n.output[0] == name)
    assert dq.op_type == "DequantizeLinear"
    return next(i.data_type for i in model.graph.initializer if i.name == dq.input[0])


def _gemm_weight(model) -> str:
    return next(n.input[1] for n in model.graph.node if n.op_type in ("Gemm", "MatMul"))


def _initializers(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


SATURATING_CPU = pytest.mark.skipif(
    int8_kernels_may_saturate(),
    reason="x86 CPU without VNNI: ONNX Runtime's 8-bit kernels saturate, so they are not exact",
)


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
@pytest.mark.parametrize("bits", ["w8a8", "w4a4", "w2a2", "w4a8"])
def test_onnx_graph_computes_exactly_the_fake_quant_model(tmp_path, bits, target):
    """The exported graph, as written, computes the BN-folded fake-quant model."""
    q, x, path = _export(tmp_path, bits, target)
    with torch.no_grad():
        reference = fold_batchnorm(q)(x).numpy()
    result = parity(OnnxRuntimeRunner(path, optimize=False).run(x.numpy()), reference)
    assert result.agreement == 1.0
    assert result.max_abs_error < 1e-4


@SATURATING_CPU
@pytest.mark.parametrize("bits", ["w8a8", "w4a4", "w2a2", "w4a8"])
def test_onnxruntime_target_is_exact_on_fused_integer_kernels(tmp_path, bits):
    """For the ``onnxruntime`` target ONNX Runtime's rewrites into integer kernels (which
    re-quantize biases to INT32) change no number: the folded biases already sit on that grid."""
    q, x, path = _export(tmp_path, bits, "onnxruntime")
    with torch.no_grad():
        reference = fold_batchnorm(q)(x).numpy()
    result = parity(OnnxRuntimeRunner(path).run(x.numpy()), reference)
    assert result.agreement == 1.0
    assert result.max_abs_error < 1e-4


@pytest.mark.parametrize(
    ("machine", "flags", "saturates"),
    [
        ("x86_64", "fpu sse avx2 fma", True),
        ("x86_64", "fpu avx2 avx512f avx512_vnni", False),
        ("AMD64", "fpu avx2 avx_vnni", False),
        ("x86_64", None, True),  # flags unreadable: assume the worst
        ("aarch64", "fp asimd asimddp", False),
    ],
)
def test_int8_saturation_is_detected_from_the_cpu_flags(
    tmp_path, monkeypatch, machine, flags, saturates
):
    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(platform, "machine", lambda: machine)
    assert int8_kernels_may_saturate(cpuinfo) is saturates


@pytest.mark.parametrize(
    ("target", "saturates", "causes"),
    [
        ("onnxruntime", False, []),
        ("onnxruntime", True, ["VNNI"]),
        ("tensorrt", False, ["float biases"]),
        ("tensorrt", True, ["float biases", "VNNI"]),
    ],
)
def test_fused_kernels_are_exact_only_for_onnxruntime_models_on_32_bit_accumulating_cpus(
    monkeypatch, target, saturates, causes
):
    monkeypatch.setattr(ort_runtime, "int8_kernels_may_saturate", lambda: saturates)
    found = fused_kernel_inexactness(target)
    assert len(found) == len(causes)
    assert all(word in cause for word, cause in zip(causes, found, strict=True))


@pytest.fixture(scope="module")
def int4_student():
    torch.manual_seed(0)
    model = randomize_batchnorm(ToyResNet()).eval()
    q = quantize_model(model, QuantizeOptions(BitWidths.parse("w4a4"), first_last_bits=None))
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    calibrate(q, [x])
    return q.eval(), x


@pytest.mark.parametrize("opset", [21, 22, 23])
def test_int4_weights_export_at_opset_21_and_later(tmp_path, int4_student, opset):
    q, x = int4_student
    path = export_onnx(to_deploy(q), x, tmp_path / "m.onnx", opset=opset)
    model = onnx.load(path)
    assert model.opset_import[0].version == opset
    assert dequantized_initializer_type(model, _gemm_weight(model)) == TensorProto.INT4
    with torch.no_grad():
        reference = fold_batchnorm(q)(x).numpy()
    result = parity(OnnxRuntimeRunner(path, optimize=False).run(x.numpy()), reference)
    assert result.agreement == 1.0 and result.max_abs_error < 1e-4


@pytest.mark.parametrize("opset", [17, 19, 20])
def test_int4_weights_refuse_opsets_before_21(tmp_path, int4_student, opset):
    q, x = int4_student
    with pytest.raises(UserError, match="opset 21 or later.*int4_gemm_weights=false"):
        export_onnx(to_deploy(q), x, tmp_path / "m.onnx", opset=opset)
    assert not list(tmp_path.iterdir())


def test_weights_are_int8_initializers_behind_dequantize(tmp_path):
    _, _, path = _export(tmp_path, "w4a4")
    model = onnx.load(path)
    inits = _initializers(model)
    conv_weights = [n.input[1] for n in model.graph.node if n.op_type == "Conv"]
    producers = {o: n for n in model.graph.node for o in n.output}
    for name in conv_weights:
        dq = producers[name]
        assert dq.op_type == "DequantizeLinear"
        assert inits[dq.input[0]].dtype == np.int8
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        assert axis == 0 and inits[dq.input[1]].ndim == 1  # per output channel
    float_tensors = [v for v in inits.values() if v.dtype == np.float32 and v.ndim == 4]
    assert not float_tensors  # no float copy of any conv weight


def test_sub_8_bit_activations_are_clipped_to_their_grid(tmp_path):
    _, _, path = _export(tmp_path, "w4a4")
    model = onnx.load(path)
    inits = _initializers(model)
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    assert clips
    for clip in clips:  # the bounds are whole multiples of the scale of the Q that follows
        q = next(
            n
            for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] == clip.output[0]
        )
        scale = inits[q.input[1]]
        low, high = inits[clip.input[1]] / scale, inits[clip.input[2]] / scale
        assert (round(float(low)), round(float(high))) in ((-8, 7), (0, 15))


def test_target_decides_the_activation_container(tmp_path):
    def zero_point_types(path):
        model = onnx.load(path)
        inits = {i.name: i.data_type for i in model.graph.initializer}
        return {inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"}

    assert zero_point_types(_export(tmp_path, "w8a8", "tensorrt")[2]) == {TensorProto.INT8}
    assert TensorProto.UINT8 in zero_point_types(_export(tmp_path, "w8a8", "onnxruntime")[2])


def test_export_is_one_file_with_a_dynamic_batch(tmp_path):
    _, x, path = _export(tmp_path, "w8a8")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no side .data file, no temp file
    model = onnx.load(path)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    runner = OnnxRuntimeRunner(path)
    assert runner.run(x[:5].numpy()).shape == (5, 10)
    assert runner.run(x[:1].numpy()).shape == (1, 10)


def test_export_refuses_train_mode(tmp_path):
    with pytest.raises(UserError, match="train mode"):
        export_onnx(ToyResNet().train(), torch.zeros(2, 1, 8, 8), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_sample_layout_does_not_leak_into_the_graph(tmp_path):
    odd = torch.randn(2, 8, 8, 1).permute(0, 3, 1, 2)  # strides (64, 1, 8, 1), "contiguous"
    model = ToyResNet().eval()
    path = export_onnx(model, odd, tmp_path / "m.onnx")
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert not ops & {"Gather", "Range", "Shape"}, ops


def test_int8_file_is_small_and_carries_no_debug_info(tmp_path):
    """The default student (resnet8 on 1x8x8 digits), small enough that graph and metadata
    weigh against its weights: its INT8 file is at most 30 % of the float one, layer record
    included."""
    torch.manual_seed(0)
    model = build_model("resnet8", 1, 10).eval()
    x = torch.randn(8, 1, 8, 8)
    float_path = export_onnx(model, x, tmp_path / "float.onnx")
    q = quantize_model(model, QuantizeOptions(BitWidths(8, 8)))
    calibrate(q, [x])
    int8_path = export_onnx(to_deploy(q.eval()), x, tmp_path / "int8.onnx")
    graph = onnx.load(int8_path).graph
    assert not any(n.metadata_props for n in graph.node) and not graph.value_info
    assert int8_path.stat().st_size <= 0.3 * float_path.stat().st_size


@pytest.mark.parametrize("arch", ["resnet8", "mobilenetv2"])
def test_tensorrt_export_passes_the_linter_with_conv_add_fusion(tmp_path, arch):
    from qkd_deploy.deploy.lint import lint_model
    from qkd_deploy.models import build_model

    torch.manual_seed(0)
    model = build_model(arch, 1, 10).eval()
    x = torch.randn(8, 1, 16, 16)
    q = quantize_model(model, QuantizeOptions(BitWidths(4, 4), target="tensorrt"))
    calibrate(q, [x])
    graph = onnx.load(export_onnx(to_deploy(q.eval()), x, tmp_path / "m.onnx"))
    findings = lint_model(graph)
    assert not [f for f in findings if f.severity == "error"], findings
    assert not [f for f in findings if f.rule.startswith("FUSE-")], findings
    producers = {o: n.op_type for n in graph.graph.node for o in n.output}
    adds = [n for n in graph.graph.node if n.op_type == "Add"]
    assert adds and all("Conv" in {producers.get(i) for i in n.input} for n in adds)


def test_onnxruntime_target_runs_every_layer_on_integer_kernels(tmp_path):
    """With one quantizer per tensor (the block input's readers share it), a quantized pool input
    and output and an INT32 head bias, ONNX Runtime's optimizer turns every Conv into QLinearConv,
    every residual Add into QLinearAdd, the pool into QLinearGlobalAveragePool and the head into
    QGemm: no float layer is left, and the numbers do not move."""
    import onnxruntime as ort

    from qkd_deploy.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet8", 1, 10).eval()
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    q = quantize_model(model, QuantizeOptions(BitWidths(8, 8), target="onnxruntime"))
    calibrate(q, [x])
    path = export_onnx(to_deploy(q.eval()), x, tmp_path / "m.onnx")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert ops.count("QLinearConv") == 9 and "Conv" not in ops
    assert ops.count("QLinearAdd") == 3 and "Add" not in ops
    assert ops.count("QLinearGlobalAveragePool") == 1 and "ReduceMean" not in ops
    assert ops.count("QGemm") == 1 and "Gemm" not in ops
    assert "DequantizeLinear" not in ops  # QGemm writes the float logits itself
    head_bias = next(n for n in onnx.load(path).graph.node if n.op_type == "Gemm").input[2]
    assert dequantized_initializer_type(onnx.load(path), head_bias) == TensorProto.INT32
    with torch.no_grad():
        reference = fold_batchnorm(q)(x).numpy()
    result = parity(OnnxRuntimeRunner(path, optimize=False).run(x.numpy()), reference)
    assert result.agreement == 1.0 and result.max_abs_error < 1e-4
    if not int8_kernels_may_saturate():  # the integer kernels compute the same numbers
        result = parity(OnnxRuntimeRunner(path).run(x.numpy()), reference)
        assert result.agreement == 1.0 and result.max_abs_error < 1e-4


def test_tensorrt_export_can_quantize_both_add_inputs(tmp_path):
    """``residual_add_inputs="both"``: every Add reads two DequantizeLinear outputs, and the graph
    still computes the fake-quant model exactly."""
    q, x, path = _export(tmp_path, "w4a4", "tensorrt", residual_add_inputs="both")
    graph = onnx.load(path).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    adds = [n for n in graph.node if n.op_type == "Add"]
    assert adds and all(producers[i] == "DequantizeLinear" for n in adds for i in n.input)
    with torch.no_grad():
        reference = fold_batchnorm(q)(x).numpy()
    result = parity(OnnxRuntimeRunner(path, optimize=False).run(x.numpy()), reference)
    assert result.agreement == 1.0 and result.max_abs_error < 1e-4
