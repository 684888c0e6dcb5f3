import math

import numpy as np
import pytest
import torch
from torch import nn

from qkd_deploy.calib.calibrate import calibrate, calibrate_weights
from qkd_deploy.calib.calibrators import (
    entropy_calibrator,
    get_calibrator,
    kl_to_merged_levels,
    max_calibrator,
    mse_calibrator,
    percentile_calibrator,
)
from qkd_deploy.errors import UserError
from qkd_deploy.models import build_model
from qkd_deploy.quant.convert import BitWidths, QuantizeOptions, quantize_model
from qkd_deploy.quant.fold import fold_batchnorm
from qkd_deploy.quant.grid import Grid, activation_grid, weight_grid
from qkd_deploy.quant.integer import DeployConv2d, to_deploy
from qkd_deploy.quant.modules import QuantAdd, QuantAvgPool, QuantConv2d, QuantLinear, quantizers
from qkd_deploy.quant.quantizer import LSQQuantizer, fake_quantize
from tests.support.toy import ToyResNet, randomize_batchnorm


def test_grids_per_bits_and_target():
    assert weight_grid(4) == Grid(-7, 7, "int8")
    assert weight_grid(2) == Grid(-1, 1, "int8")  # ternary
    assert activation_grid(4, non_negative=True, target="tensorrt") == Grid(0, 15, "int8")
    assert activation_grid(8, non_negative=True, target="tensorrt") == Grid(-128, 127, "int8")
    assert activation_grid(8, non_negative=True, target="onnxruntime") == Grid(0, 255, "uint8")
    # signed on UINT8 for ONNX Runtime's integer kernels: zero point 128, same symmetric values
    assert activation_grid(3, non_negative=False, target="onnxruntime") == Grid(-4, 3, "uint8", 128)
    assert activation_grid(8, non_negative=False, target="onnxruntime").fills_container
    assert not activation_grid(3, non_negative=False, target="onnxruntime").fills_container
    assert activation_grid(8, non_negative=False, target="tensorrt").fills_container
    with pytest.raises(UserError, match="2 to 8"):
        weight_grid(9)
    with pytest.raises(UserError, match="target"):
        activation_grid(4, True, "tflite")


def test_fake_quantize_lands_on_the_integer_grid_and_clips():
    x = torch.linspace(-3, 3, 101)
    scale = torch.tensor(0.25)
    y = fake_quantize(x, scale, Grid(-8, 7, "int8"), None)
    integers = y / scale
    assert torch.allclose(integers, integers.round(), atol=1e-6)
    assert integers.min().item() == -8 and integers.max().item() == 7
    assert y[-1].item() == pytest.approx(7 * 0.25)  # 3.0 clipped to qmax * s


def test_straight_through_gradient_inside_range_only():
    x = torch.tensor([-5.0, -0.3, 0.1, 0.9, 5.0], requires_grad=True)
    fake_quantize(x, torch.tensor(0.25), Grid(-4, 3, "int8"), None).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]  # 0.9 / 0.25 = 3.6 > qmax = 3


def test_per_channel_fake_quantize_matches_autograd_through_its_formula():
    """The fused function against autograd through clamp, straight-through round and multiply."""
    torch.manual_seed(0)
    x = (torch.randn(6, 3, 2, 2) * 2).requires_grad_()
    scale = (torch.rand(6) * 0.3 + 0.05).requires_grad_()
    upstream = torch.randn(6, 3, 2, 2)
    grid = Grid(-7, 7, "int8")
    fake_quantize(x, scale, grid, 0).mul(upstream).sum().backward()
    fused = (x.grad.clone(), scale.grad.clone())
    x.grad = scale.grad = None
    s = scale.reshape(-1, 1, 1, 1)
    v = torch.clamp(x / s, grid.qmin, grid.qmax)
    reference = ((v.round() - v).detach() + v) * s
    reference.mul(upstream).sum().backward()
    assert torch.equal(fake_quantize(x, scale, grid, 0), reference)
    assert torch.allclose(fused[0], x.grad, atol=1e-6)
    assert torch.allclose(fused[1], scale.grad, rtol=1e-5, atol=1e-5)
    assert (fused[0] == 0).any() and (fused[0] != 0).any()  # some clipped, some inside


def test_lsq_scale_gradient_matches_the_paper():
    q = LSQQuantizer(3, "activation", target="tensorrt")
    q.set_range(torch.tensor(1.5), non_negative=False)  # grid -4..3, s = 0.5
    x = torch.tensor([[-3.0, -0.6, 0.2, 0.74, 2.5]])
    q(x).sum().backward()
    s, qmin, qmax = 0.5, -4, 3
    expected = 0.0
    for v in x.flatten().tolist():  # LSQ eq. 3
        r = v / s
        expected += qmin if r <= qmin else qmax if r >= qmax else round(r) - r
    expected *= 1.0 / math.sqrt(x[0].numel() * qmax)  # gradient scale g
    assert q.scale.grad.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_a_temporary_bit_width_gets_its_whole_grid_on_every_target(target):
    """SPEQ's teacher pass runs a 7-bit post-ReLU quantizer at 8 bits: 256 levels over the
    same clipping range, though the tensorrt target exports 8-bit post-ReLU as -128..127."""
    q = LSQQuantizer(7, "activation", target=target)
    q.set_range(torch.tensor(127.0), non_negative=True)  # 7 bits: 0..127, step 1
    x = torch.linspace(0, 127, 1001)
    assert q(x).unique().numel() == 128
    q.active_bits = 8
    assert (q.grid_for(8).qmin, q.grid_for(8).qmax) == (0, 255)
    assert q.step_size().item() == pytest.approx(127 / 255)
    assert q(x).unique().numel() == 256
    assert q(x).max().item() == pytest.approx(127.0)


def test_weight_quantizer_is_per_output_channel():
    q = LSQQuantizer(4, "weight", channels=3)
    w = torch.stack([torch.full((2, 3, 3), v) for v in (0.66, 6.6, 66.0)])
    w[:, 0, 0, 0] = torch.tensor([1.4, 14.0, 140.0])
    q.set_range(w.abs().reshape(3, -1).amax(1))
    assert torch.allclose(q.scale.detach(), torch.tensor([0.2, 2.0, 20.0]))
    y = q(w)
    assert torch.allclose(y[:, 1, 1, 1], torch.tensor([0.6, 6.0, 60.0]), rtol=1e-5)  # 3.3 -> 3


def test_conversion_replaces_layers_and_keeps_weights():
    model = ToyResNet()
    q = quantize_model(model, QuantizeOptions(BitWidths(4, 4)))
    assert isinstance(q.conv1, QuantConv2d) and isinstance(q.conv2, QuantConv2d)
    assert isinstance(q.fc, QuantLinear) and isinstance(q.add, QuantAdd)
    assert torch.equal(q.conv2.weight, model.conv2.weight)
    assert q.conv1.weight_quantizer.bits == 8 and q.fc.input_quantizer.bits == 8  # first / last
    assert q.conv2.weight_quantizer.bits == 4 and q.add.quantizer_b.bits == 4
    assert isinstance(model.conv1, nn.Conv2d) and not isinstance(model.conv1, QuantConv2d)
    custom = quantize_model(model, QuantizeOptions(BitWidths(4, 4), layer_bits={"conv2": "w2a8"}))
    assert (custom.conv2.weight_quantizer.bits, custom.conv2.input_quantizer.bits) == (2, 8)


def test_residual_add_quantizers_follow_the_target():
    """TensorRT: the conv branch feeds the Add unquantized (Conv+Add+ReLU fuse into one INT8
    kernel), the skip input is quantized; ONNX Runtime: both, for QLinearConv + QLinearAdd."""
    trt = quantize_model(ToyResNet(), QuantizeOptions(BitWidths(4, 4), target="tensorrt"))
    assert trt.add.quantizer_a is None and isinstance(trt.add.quantizer_b, LSQQuantizer)
    ort = quantize_model(ToyResNet(), QuantizeOptions(BitWidths(4, 4), target="onnxruntime"))
    assert isinstance(ort.add.quantizer_a, LSQQuantizer)
    assert isinstance(ort.add.quantizer_b, LSQQuantizer)
    both = QuantizeOptions(BitWidths(4, 4), target="tensorrt", residual_add_inputs="both")
    trt_both = quantize_model(ToyResNet(), both)
    assert isinstance(trt_both.add.quantizer_a, LSQQuantizer)
    assert isinstance(trt_both.add.quantizer_b, LSQQuantizer)


@pytest.mark.parametrize(
    "settings, named",
    [({"target": "jetson"}, "jetson"), ({"residual_add_inputs": "all"}, "residual_add_inputs")],
)
def test_bad_quantize_options_are_one_clear_error(settings, named):
    with pytest.raises(UserError, match=named):
        QuantizeOptions(BitWidths(4, 4), **settings)


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_readers_of_one_tensor_share_a_quantizer_for_onnxruntime(target):
    """A block input read by the first conv and by the identity skip of the add, or by the
    first conv and the 1x1 shortcut conv, is quantized once for ONNX Runtime (one scale)."""
    model = build_model("resnet8", 1, 10)
    q = quantize_model(model, QuantizeOptions(BitWidths(4, 4), target=target))
    identity_block, projection_block = q.stages[0][0], q.stages[1][0]
    shared = target == "onnxruntime"
    first_conv = identity_block.conv1.input_quantizer
    assert (first_conv is identity_block.add.quantizer_b) is shared
    projection = projection_block.conv1.input_quantizer
    assert (projection is projection_block.shortcut[0].input_quantizer) is shared
    assert projection_block.add.quantizer_a is not projection  # the conv branch: its own
    assert isinstance(q.pool, QuantAvgPool) is shared
    if shared:  # the pooled tensor is quantized once, with the head's quantizer
        assert q.pool.output_quantizer is q.fc.input_quantizer
    assert len(quantizers(q)) == len({id(m) for _, m in quantizers(q)})


def test_bitwidths_parse():
    assert BitWidths.parse("4") == BitWidths(4, 4)
    assert BitWidths.parse("W4A8").name == "w4a8"
    with pytest.raises(UserError, match="wXaY"):
        BitWidths.parse("int4")
    with pytest.raises(UserError, match="2 to 8"):
        BitWidths.parse("w1a8")


def test_calibrators():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(1, 20000, generator=g)
    values[0, 0] = 40.0  # one outlier
    grid = Grid(-1, 1, "int8")
    assert max_calibrator(values, grid).item() == 40.0
    assert percentile_calibrator(values, grid, 99.0).item() == pytest.approx(
        2.576, abs=0.1
    )  # |N(0, 1)| quantile

    def error(amax):
        return (fake_quantize(values, amax / grid.qmax, grid, 0) - values).pow(2).mean().item()

    assert error(mse_calibrator(values, grid)) < 0.5 * error(max_calibrator(values, grid))


def test_entropy_kl_against_hand_computation():
    # levels 2 over [1, 1, 2, 0]: groups [1, 1] and [2, 0] -> Q = [1, 1, 2, 0] = P: no loss
    p = np.array([1.0, 1.0, 2.0, 0.0])
    assert kl_to_merged_levels(p, p, 2) == pytest.approx(0.0, abs=1e-12)
    # one level over [1, 3]: Q = [2, 2] -> KL = 1/4 ln(1/2) + 3/4 ln(3/2)
    p = np.array([1.0, 3.0])
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert kl_to_merged_levels(p, p, 1) == pytest.approx(expected, rel=1e-12)
    # an empty bin gets no share of its group's count: [4, 0] and [0, 4] both merge losslessly
    assert (
        kl_to_merged_levels(np.array([4.0, 0.0, 0.0, 4.0]), np.array([4.0, 0.0, 0.0, 4.0]), 2) == 0
    )


def test_entropy_calibrator_clips_outliers_not_the_bulk():
    g = torch.Generator().manual_seed(0)
    grid = Grid(0, 127, "int8")
    bulk = torch.randn(1, 100000, generator=g).abs()
    with_outlier = torch.cat([bulk, torch.tensor([[40.0]])], dim=1)
    amax = get_calibrator("entropy")(with_outlier, grid).item()
    assert percentile_calibrator(bulk, grid, 99.9).item() < amax < 10.0
    flat = torch.rand(2, 100000, generator=g) * torch.tensor([[1.0], [3.0]])  # nothing to clip
    assert entropy_calibrator(flat, grid).tolist() == pytest.approx([1.0, 3.0], rel=0.02)


def test_entropy_calibrates_activations_only():
    q = quantize_model(ToyResNet(), QuantizeOptions(BitWidths(8, 8)))
    with pytest.raises(UserError, match="entropy calibration is for activations"):
        calibrate_weights(q, "entropy")
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x[0, 0, 0, 0] = 60.0  # an outlier pixel: max calibration would stretch the input's grid
    calibrate(q, [x], activation_method="entropy")
    step = q.conv1.input_quantizer.step_size().item()
    assert 0 < step * q.conv1.input_quantizer.grid.qmax < 10.0


def _calibrated(model, bits, target="tensorrt"):
    torch.manual_seed(0)
    q = quantize_model(model, QuantizeOptions(BitWidths.parse(bits), target=target))
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    calibrate(q, [x[:32], x[32:]])
    return q.eval(), x


def test_calibration_detects_non_negative_activations():
    q, _ = _calibrated(ToyResNet(), "w4a4")
    assert not bool(q.conv1.input_quantizer.non_negative)  # the image is signed
    assert bool(q.conv2.input_quantizer.non_negative)  # after ReLU
    assert bool(q.add.quantizer_b.non_negative)
    both, _ = _calibrated(ToyResNet(), "w4a4", target="onnxruntime")
    assert not bool(both.add.quantizer_a.non_negative)  # BN output: signed
    assert all(bool(m.calibrated) for _, m in quantizers(q))


@pytest.mark.parametrize("bits", ["w8a8", "w4a4", "w2a2"])
def test_batchnorm_folding_keeps_the_integers(bits):
    q, x = _calibrated(randomize_batchnorm(ToyResNet()).eval(), bits)
    folded = fold_batchnorm(q)
    assert isinstance(folded.bn2, nn.Identity) and not folded.conv2.quantize_bias
    with torch.no_grad():  # tensorrt target: float biases, so folding changes no number
        torch.testing.assert_close(folded(x), q(x), atol=1e-5, rtol=0)
    deploy = to_deploy(q)
    assert isinstance(deploy.conv2, DeployConv2d)
    assert deploy.conv2.weight_int.dtype == torch.int8
    integers = torch.round(
        q.conv2.weight / q.conv2.weight_quantizer.step_size().reshape(-1, 1, 1, 1)
    )
    integers = integers.clamp(-weight_grid(int(bits[1])).qmax, weight_grid(int(bits[1])).qmax)
    gain_sign = torch.sign(q.bn2.weight).reshape(-1, 1, 1, 1)
    # w * g / (s * |g|) may land one ulp across a .5 tie that w / s did not: one step, rarely
    moved = (deploy.conv2.weight_int.float() - integers * gain_sign).abs()
    assert moved.max() <= 1 and (moved > 0).float().mean() < 0.01
    with torch.no_grad():  # deploy form == folded fake-quant model, up to float summation order
        torch.testing.assert_close(deploy(x), folded(x), atol=1e-6, rtol=0)


def test_batchnorm_without_affine_folds_exactly():
    model = ToyResNet()
    model.bn2 = nn.BatchNorm2d(8, affine=False)
    model.bn2.running_mean.copy_(torch.linspace(-0.5, 0.5, 8))
    model.bn2.running_var.copy_(torch.linspace(0.5, 2.0, 8))
    q, x = _calibrated(model.eval(), "w4a4")
    folded = fold_batchnorm(q)
    assert isinstance(folded.bn2, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), q(x), atol=1e-5, rtol=0)


def _reflect_padding(model: ToyResNet) -> None:
    model.conv2.padding_mode = "reflect"


def _batch_statistics_only(model: ToyResNet) -> None:
    model.bn2 = nn.BatchNorm2d(8, track_running_stats=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_reflect_padding, "conv 'conv2' pads with padding_mode='reflect'"),
        (_batch_statistics_only, "BatchNorm 'bn2' has track_running_stats=False"),
    ],
)
def test_layers_the_export_cannot_reproduce_are_refused_before_training(change, message):
    model = ToyResNet()
    change(model)
    with pytest.raises(UserError, match=message):
        quantize_model(model, QuantizeOptions(BitWidths(4, 4)))


@pytest.mark.parametrize(
    ("layer_bits", "message"),
    [
        ({"layer4.*": "w8a8"}, r"\['layer4.\*'\] match no Conv2d, Linear or Add"),
        ({"conv2": "w4x"}, "quant.layer_bits 'conv2': bit-width 'w4x'"),
        ({"relu1": "w4x"}, "quant.layer_bits 'relu1': bit-width 'w4x'"),
    ],
)
def test_layer_bits_entries_are_checked(layer_bits, message):
    with pytest.raises(UserError, match=message):
        quantize_model(ToyResNet(), QuantizeOptions(BitWidths(4, 4), layer_bits=layer_bits))


def test_folded_bias_sits_on_the_accumulator_grid_for_onnxruntime():
    q, x = _calibrated(randomize_batchnorm(ToyResNet()).eval(), "w4a4", target="onnxruntime")
    conv = fold_batchnorm(q).conv2
    assert conv.quantize_bias
    step = conv.input_quantizer.step_size() * conv.weight_quantizer.step_size()
    bias = conv.effective_bias().detach()
    assert torch.allclose(bias / step, torch.round(bias / step), atol=1e-3)
    assert (bias - conv.bias).abs().max() <= 0.5 * step.max() + 1e-6
    assert not torch.equal(bias, conv.bias.detach())  # rounding really happened


def test_export_form_refuses_train_mode():
    q, _ = _calibrated(ToyResNet(), "w4a4")
    with pytest.raises(UserError, match="train mode"):
        to_deploy(q.train())
