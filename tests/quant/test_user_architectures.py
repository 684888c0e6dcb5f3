"""Networks written the ordinary way (``tests/support/torchvision_style.py``) through calibrate ->
one QAT step -> export: the ONNX graph as written computes the fake-quant model exactly; the
``tensorrt`` export passes ``qkd-deploy lint --strict``; ONNX Runtime runs every op of the
``onnxruntime`` export that has an integer kernel on it."""

import collections
import warnings

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qkd_deploy.bench.accuracy import parity
from qkd_deploy.calib.calibrate import calibrate
from qkd_deploy.deploy import lint
from qkd_deploy.errors import UserError
from qkd_deploy.export.onnx import export_onnx
from qkd_deploy.quant.convert import BitWidths, QuantizeOptions, quantize_model
from qkd_deploy.quant.fold import fold_batchnorm
from qkd_deploy.quant.integer import to_deploy
from qkd_deploy.quant.modules import QuantConv2d
from qkd_deploy.runtime.onnxruntime import OnnxRuntimeRunner
from tests.support.torchvision_style import BLOCK_NETS, BasicBlock, basic_block_net

# per network: residual adds, squeeze-excitation multiplies, concatenations of >1 tensor,
# global average pools
EXPECTED = {
    "resnet_basic_block": (2, 0, 0, 1),
    "mobilenetv2_inverted_residual": (1, 0, 0, 1),
    "mobilenetv3_se_hardswish": (2, 2, 0, 3),
    "efficientnet_silu_se": (2, 2, 0, 3),
    "shufflenet_cat_shuffle": (0, 0, 2, 1),
    "densenet_concat": (0, 0, 3, 1),
}
IMAGES = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _trained_export(name: str, bits: str, target: str, path, opset: int = 18):
    """(fake-quant model, exported file) after calibration and one QAT step."""
    torch.manual_seed(0)
    q = quantize_model(BLOCK_NETS[name](), QuantizeOptions(BitWidths.parse(bits), target))
    calibrate(q, [IMAGES])
    q.train()
    optimizer = torch.optim.SGD(q.parameters(), lr=0.01, momentum=0.9)
    labels = torch.arange(len(IMAGES)) % 10
    F.cross_entropy(q(IMAGES), labels).backward()
    optimizer.step()
    q.eval()
    return q, export_onnx(to_deploy(q), IMAGES, path, opset=opset)


def _assert_exact(q: nn.Module, path) -> None:
    with torch.no_grad():
        reference = fold_batchnorm(q)(IMAGES).numpy()
    result = parity(OnnxRuntimeRunner(path, optimize=False).run(IMAGES.numpy()), reference)
    assert result.agreement == 1.0 and result.max_abs_error < 1e-4, result


def _optimized_ops(path, tmp_path) -> collections.Counter:
    """The op types of the graph ONNX Runtime runs after its optimizations (fused kernels)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(
        n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node
    )


@pytest.mark.parametrize("name", list(BLOCK_NETS))
def test_tensorrt_export_is_exact_and_lint_strict_clean(name, tmp_path, capsys):
    q, path = _trained_export(name, "w4a4", "tensorrt", tmp_path / "m.onnx", opset=17)
    _assert_exact(q, path)
    assert lint.main([str(path), "--strict"]) == 0, capsys.readouterr().out
    graph = onnx.load(path).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    for add in (n for n in graph.node if n.op_type == "Add"):
        kinds = sorted(producers.get(i) for i in add.input)
        assert kinds in (["Conv", "DequantizeLinear"], ["DequantizeLinear"] * 2), kinds


@pytest.mark.parametrize("name", list(BLOCK_NETS))
def test_onnxruntime_export_runs_on_integer_kernels_and_is_exact(name, tmp_path):
    q, path = _trained_export(name, "w8a8", "onnxruntime", tmp_path / "m.onnx")
    _assert_exact(q, path)
    ops = _optimized_ops(path, tmp_path)
    adds, muls, cats, pools = EXPECTED[name]
    convs = sum(isinstance(m, QuantConv2d) for m in q.modules())
    assert ops["QLinearConv"] == convs and not ops["Conv"] and not ops["FusedConv"], ops
    assert ops["QLinearAdd"] == adds and not ops["Add"], ops
    assert ops["QLinearMul"] == muls, ops  # the gates; SiLU/Hardswish stay float (no kernel)
    assert ops["QLinearConcat"] == cats and not ops["Concat"], ops
    assert ops["QLinearGlobalAveragePool"] == pools and not ops["GlobalAveragePool"], ops
    assert ops["QGemm"] == 1 and not ops["Gemm"], ops


def test_a_step_learned_past_a_relu6_still_runs_on_integer_kernels(tmp_path):
    """QAT can grow the step of a ReLU6's output quantizer past 6 / 255 (MobileNetV2: 6.0145 /
    255); ONNX Runtime then kept the Clip and ran those convs in float. The step in use stops at
    the ReLU6's bound."""
    torch.manual_seed(0)
    net = BLOCK_NETS["mobilenetv2_inverted_residual"]()
    q = quantize_model(net, QuantizeOptions(BitWidths(8, 8), "onnxruntime"))
    calibrate(q, [IMAGES])
    bounded = [m for m in q.modules() if getattr(m, "upper_bound", None) is not None]
    assert bounded and all(m.upper_bound == 6.0 for m in bounded)
    with torch.no_grad():
        for quantizer in bounded:
            quantizer.scale.fill_(6.2 / 255)  # as if learned past the bound
    assert all(float(m.step_size()) == pytest.approx(6 / 255) for m in bounded)
    path = export_onnx(to_deploy(q.eval()), IMAGES, tmp_path / "m.onnx")
    _assert_exact(q, path)
    ops = _optimized_ops(path, tmp_path)
    convs = sum(isinstance(m, QuantConv2d) for m in q.modules())
    assert ops["QLinearConv"] == convs and not ops["FusedConv"] and not ops["Clip"], ops


class _SamePadConv(nn.Conv2d):
    """timm's Conv2dSame in short: a conv that pads in its own forward."""

    def forward(self, x):
        return super().forward(F.pad(x, (1, 1, 1, 1)))


def test_layers_without_a_quantized_form_are_named_in_a_warning():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        _SamePadConv(4, 4, 3),
        nn.ConvTranspose2d(4, 4, 2, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 10),
    )
    with pytest.warns(UserWarning, match=r"2 layer\(s\) .*1 \(_SamePadConv\), 2 \(ConvT"):
        q = quantize_model(net, QuantizeOptions(BitWidths(8, 8)))
    assert type(q[1]) is _SamePadConv and type(q[2]) is nn.ConvTranspose2d  # left as they are
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_model(basic_block_net(), QuantizeOptions(BitWidths(8, 8)))  # nothing to say


def test_blocks_keep_their_class_names_and_float_weights():
    """Quantizers on functional ops go into the owning module's forward: the block is still a
    BasicBlock, every float parameter and buffer keeps its name, and only quantizers are new."""
    model = basic_block_net()
    for target in ("tensorrt", "onnxruntime"):
        q = quantize_model(model, QuantizeOptions(BitWidths(8, 8), target))
        assert type(q.body[1]) is BasicBlock
        missing, unexpected = q.load_state_dict(model.state_dict(), strict=False)
        assert not unexpected
        assert all(".quant_ops." in k or "quantizer" in k for k in missing), missing
        assert torch.equal(q.body[1].conv1.weight, model.body[1].conv1.weight)
    assert "add_in1" in dict(q.body[0].quant_ops.named_children())  # the identity skip


def test_feature_hooks_on_blocks_still_fire():
    q = quantize_model(basic_block_net(), QuantizeOptions(BitWidths(8, 8), "onnxruntime"))
    seen = []
    q.body[0].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    q(IMAGES[:2])
    assert seen == [torch.Size([2, 8, 32, 32])]


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.mean() > 0:  # data-dependent control flow
            y = y + x[:, :1, 1:-1, 1:-1]
        return y.flatten(1)


def test_untraceable_model_names_the_line_and_the_fix():
    with pytest.raises(UserError) as error:
        quantize_model(_Untraceable(), QuantizeOptions(BitWidths(8, 8)))
    message = str(error.value)
    assert "test_user_architectures.py" in message and "if y.mean() > 0" in message
    assert "quant.trace=false" in message


def test_trace_false_quantizes_layers_only_with_a_warning():
    with pytest.warns(UserWarning, match="quant.trace=false"):
        q = quantize_model(_Untraceable(), QuantizeOptions(BitWidths(8, 8), trace=False))
    assert isinstance(q.conv, QuantConv2d)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        traced = quantize_model(basic_block_net(), QuantizeOptions(BitWidths(8, 8)))
    assert hasattr(traced.body[0], "quant_ops")
