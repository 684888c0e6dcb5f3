"""BatchNorm folding of a fake-quant model, exactly.

A BN channel is affine, ``y = g * conv(x) + b`` with ``g = gamma / sqrt(var + eps)``. With
per-output-channel weight quantization, ``g * (q * s) = (sign(g) * q) * (s * |g|)``: the folded
layer keeps the same integers (negated where ``g < 0``, which the symmetric weight grid allows)
and only its step size changes.

The folded bias stays float for the ``tensorrt`` target: TensorRT adds a Conv's bias in float
(a Q/DQ graph for TensorRT has no INT32 bias; ``deploy.lint`` refuses one), so the folded model
computes what the trained one computes. For the ``onnxruntime`` target the bias is put on the
INT32 accumulator grid (input step x weight step) its QLinearConv and QGemm add it on. Either
way the folded fake-quant model is the deployed arithmetic. At 2 bits that grid is coarse:
rounding a trained resnet8's biases onto it moved its Fashion-MNIST accuracy by -3.8 to +1.0
points, which is why the ``tensorrt`` target does not.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from qkd_deploy.errors import UserError
from qkd_deploy.quant.graph import module_of, trace
from qkd_deploy.quant.modules import QuantConv2d, QuantLinear, replace_submodule
from qkd_deploy.targets import Target


def conv_bn_pairs(model: nn.Module) -> dict[str, str]:
    """Quantized conv name -> name of the BatchNorm2d that alone consumes its output."""
    modules = dict(model.named_modules())
    pairs = {}
    for node in trace(model, "fold BatchNorm into the convs").nodes:
        if not isinstance(module_of(node, modules), nn.BatchNorm2d):
            continue
        source = node.args[0]
        if isinstance(module_of(source, modules), QuantConv2d) and len(source.users) == 1:
            pairs[source.target] = node.target
    return pairs


@torch.no_grad()
def _fold_into(conv: QuantConv2d, bn: nn.BatchNorm2d) -> None:
    gain = torch.rsqrt(bn.running_var + bn.eps)
    shift = torch.zeros_like(gain)
    if bn.affine:
        gain, shift = gain * bn.weight, bn.bias
    bias = torch.zeros_like(gain) if conv.bias is None else conv.bias
    folded_bias = shift + (bias - bn.running_mean) * gain
    conv.weight.mul_(gain.reshape(-1, 1, 1, 1))
    conv.weight_quantizer.scale.copy_(conv.weight_quantizer.scale.abs() * gain.abs())
    conv.bias = nn.Parameter(folded_bias.clone())


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of the eval-mode fake-quant ``model`` with every conv's BatchNorm folded into it and,
    for the ``onnxruntime`` target, every quantized layer's bias on its INT32 grid."""
    if model.training:
        raise UserError("fold BatchNorm of a model in eval mode (running statistics); call .eval()")
    pairs = conv_bn_pairs(model)
    folded = copy.deepcopy(model)
    for conv_name, bn_name in pairs.items():
        _fold_into(folded.get_submodule(conv_name), folded.get_submodule(bn_name))
        replace_submodule(folded, bn_name, nn.Identity())
    for module in folded.modules():
        if isinstance(module, (QuantConv2d, QuantLinear)):
            module.quantize_bias = module.input_quantizer.target is Target.ONNXRUNTIME
    return folded.eval()
