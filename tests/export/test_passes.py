import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from qkd_deploy.calib.calibrate import calibrate
from qkd_deploy.deploy.lint import lint_model
from qkd_deploy.errors import UserError
from qkd_deploy.export.onnx import export_onnx
from qkd_deploy.export.passes import pack_int4_weights, to_opset17
from qkd_deploy.models import build_model
from qkd_deploy.quant.convert import BitWidths, QuantizeOptions, quantize_model
from qkd_deploy.quant.fold import fold_batchnorm
from qkd_deploy.quant.integer import to_deploy
from qkd_deploy.runtime.onnxruntime import OnnxRuntimeRunner


def _quantized(model, bits, x, **options):
    q = quantize_model(model.eval(), QuantizeOptions(BitWidths.parse(bits), **options))
    calibrate(q, [x])
    return q.eval()


@pytest.fixture(scope="module")
def resnet_w4a4():
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    return _quantized(build_model("resnet8", 1, 10), "w4a4", x, first_last_bits=None), x


def _outputs(path, x):
    return OnnxRuntimeRunner(path, optimize=False).run(x.numpy())  # the graph as written


def test_opset17_for_tensorrt_86_keeps_the_numbers(resnet_w4a4, tmp_path):
    q, x = resnet_w4a4
    p17 = export_onnx(to_deploy(q), x, tmp_path / "m17.onnx", opset=17, int4_gemm_weights=False)
    p18 = export_onnx(to_deploy(q), x, tmp_path / "m18.onnx", opset=18, int4_gemm_weights=False)
    model = onnx.load(p17)
    assert model.opset_import[0].version == 17
    onnx.checker.check_model(model, full_check=True)
    reduce = next(n for n in model.graph.node if n.op_type == "ReduceMean")
    assert len(reduce.input) == 1
    assert {a.name for a in reduce.attribute} == {"axes", "keepdims"}
    assert np.array_equal(_outputs(p17, x), _outputs(p18, x))
    assert not [f for f in lint_model(model) if f.rule == "OPSET-TRT86"]


def test_opset17_refuses_ops_it_does_not_know():
    graph = helper.make_graph(
        [helper.make_node("Resize", ["x", "", "s"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "s")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(UserError, match="Resize"):
        to_opset17(model)


def test_int4_gemm_weights_are_exact(resnet_w4a4, tmp_path):
    q, x = resnet_w4a4
    path = export_onnx(to_deploy(q), x, tmp_path / "m.onnx")
    model = onnx.load(path)
    assert model.opset_import[0].version == 21
    types = {i.name: i.data_type for i in model.graph.initializer}
    assert types["fc.weight_int"] == TensorProto.INT4
    assert all(
        t == TensorProto.INT8
        for n, t in types.items()
        if n.endswith("weight_int") and n != "fc.weight_int"
    )  # conv weights stay on the INT8 container
    with torch.no_grad():
        reference = fold_batchnorm(q)(x).numpy()
    assert np.abs(_outputs(path, x) - reference).max() < 1e-4
    assert not [f for f in lint_model(model) if f.severity == "error"]


def test_int4_only_for_gemm_weights(resnet_w4a4, tmp_path):
    """A conv weight stays on its INT8 container (the model comes back unchanged); a weight
    outside -8..7 is refused with the setting that avoids it."""
    q, x = resnet_w4a4
    model = onnx.load(export_onnx(to_deploy(q), x, tmp_path / "m.onnx", int4_gemm_weights=False))
    conv_weight = next(i.name for i in model.graph.initializer if i.name.startswith("stem"))
    assert pack_int4_weights(model, {conv_weight}) is model
    assert model.opset_import[0].version == 18
    assert {i.name: i.data_type for i in model.graph.initializer}[conv_weight] == TensorProto.INT8
    eight_bit = _quantized(build_model("resnet8", 1, 10), "w8a8", x)
    model8 = onnx.load(export_onnx(to_deploy(eight_bit), x, tmp_path / "m8.onnx"))
    with pytest.raises(UserError, match=r"-8\.\.7.*export\.int4_gemm_weights=false"):
        pack_int4_weights(model8, {"fc.weight_int"})


class _Tokens(nn.Module):
    """A mixer-like classifier: nn.Linear on (N, T, C) tokens exports as
    DequantizeLinear -> Transpose -> MatMul."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 4, stride=4)
        self.mix = nn.Linear(8, 12)
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        tokens = self.conv(x).flatten(2).transpose(1, 2)
        return self.head(torch.relu(self.mix(tokens)).mean(1))


def test_int4_linear_on_tokens_is_stored_transposed(tmp_path):
    """The [out, in] weight of a Linear on tokens becomes an INT4 [in, out] initializer that
    feeds the MatMul through its DequantizeLinear directly (axis 1: the output channels); the
    Transpose is gone and ONNX Runtime computes exactly what the INT8 export computes. The
    linter accepts both (on the INT8 one, axis 0 behind the Transpose is the output axis)."""
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    q = _quantized(_Tokens(), "w4a8", x, first_last_bits=None)
    int4_path = export_onnx(to_deploy(q), x, tmp_path / "int4.onnx")
    int8_path = export_onnx(to_deploy(q), x, tmp_path / "int8.onnx", int4_gemm_weights=False)
    model = onnx.load(int4_path)
    weight = next(i for i in model.graph.initializer if i.name == "mix.weight_int")
    assert (weight.data_type, list(weight.dims)) == (TensorProto.INT4, [8, 12])
    dq = next(n for n in model.graph.node if n.input[0] == "mix.weight_int")
    assert [a.i for a in dq.attribute if a.name == "axis"] == [1]
    assert [n.op_type for n in model.graph.node if dq.output[0] in n.input] == ["MatMul"]
    assert np.array_equal(_outputs(int4_path, x), _outputs(int8_path, x))
    with torch.no_grad():
        assert np.abs(_outputs(int4_path, x) - fold_batchnorm(q)(x).numpy()).max() < 1e-4
    for path in (int4_path, int8_path):
        findings = lint_model(onnx.load(path))
        assert not [f for f in findings if f.severity == "error"], findings


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(784, 512), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(512, 512), nn.ReLU()
        self.fc3 = nn.Linear(512, 10)

    def forward(self, x):
        x = torch.flatten(x, 1)
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))


def test_int4_weight_file_is_a_fifth_of_float_for_a_linear_model(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 1, 28, 28)
    model = _MLP().eval()
    float_bytes = export_onnx(model, x, tmp_path / "f.onnx").stat().st_size
    q = _quantized(model, "w4a8", x, first_last_bits=None)
    int4_path = export_onnx(to_deploy(q), x, tmp_path / "q.onnx")
    assert int4_path.stat().st_size <= 0.2 * float_bytes
    with torch.no_grad():
        assert np.abs(_outputs(int4_path, x) - fold_batchnorm(q)(x).numpy()).max() < 1e-4
