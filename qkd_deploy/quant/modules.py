"""Quantized layers: each float layer plus the quantizers of its inputs (pytorch-quantization
style: a layer quantizes what it consumes, so Q/DQ lands in front of Conv/Gemm as TensorRT wants).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qkd_deploy.models.layers import Add
from qkd_deploy.quant.quantizer import LSQQuantizer, quantize_bias


class _QuantizedLayer:
    """Shared by the quantized Conv2d and Linear: the bias they add.

    ``quantize_bias`` is switched on by ``quant.fold.fold_batchnorm`` for the ``onnxruntime``
    target once the layer's BatchNorm is folded in, so the fake-quant model adds exactly the
    INT32 bias ONNX Runtime's integer kernels add.
    """

    quantize_bias = False
    input_quantizer: LSQQuantizer
    weight_quantizer: LSQQuantizer
    bias: torch.Tensor | None

    def effective_bias(self) -> torch.Tensor | None:
        if not (self.quantize_bias and self.bias is not None):
            return self.bias
        if not (self.input_quantizer.active and self.weight_quantizer.active):
            return self.bias
        return quantize_bias(
            self.bias, self.input_quantizer.step_size(), self.weight_quantizer.step_size()
        )


class QuantConv2d(_QuantizedLayer, nn.Conv2d):
    """``nn.Conv2d`` with a per-tensor input quantizer and a per-output-channel weight quantizer.

    Keeps the float layer's parameter names, so float checkpoints load into it.
    """

    input_quantizer: LSQQuantizer
    weight_quantizer: LSQQuantizer

    @classmethod
    def from_float(
        cls, conv: nn.Conv2d, w_bits: int, a_bits: int, target: str, learn_scale: bool = True
    ) -> QuantConv2d:
        q = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
        )
        q.load_state_dict(conv.state_dict())
        q.input_quantizer = LSQQuantizer(
            a_bits, "activation", target=target, learn_scale=learn_scale
        )
        q.weight_quantizer = LSQQuantizer(
            w_bits, "weight", channels=conv.out_channels, target=target, learn_scale=learn_scale
        )
        return q.to(conv.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(
            self.input_quantizer(x), self.weight_quantizer(self.weight), self.effective_bias()
        )


class QuantLinear(_QuantizedLayer, nn.Linear):
    """``nn.Linear`` with a per-tensor input quantizer and a per-output-channel weight quantizer."""

    input_quantizer: LSQQuantizer
    weight_quantizer: LSQQuantizer

    @classmethod
    def from_float(
        cls, linear: nn.Linear, w_bits: int, a_bits: int, target: str, learn_scale: bool = True
    ) -> QuantLinear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None)
        q.load_state_dict(linear.state_dict())
        q.input_quantizer = LSQQuantizer(
            a_bits, "activation", target=target, learn_scale=learn_scale
        )
        q.weight_quantizer = LSQQuantizer(
            w_bits, "weight", channels=linear.out_features, target=target, learn_scale=learn_scale
        )
        return q.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(
            self.input_quantizer(x), self.weight_quantizer(self.weight), self.effective_bias()
        )


class QuantAdd(Add):
    """Residual addition with quantized inputs.

    ``quantize=(a, b)`` says which inputs get a quantizer. For TensorRT an input that comes
    straight from a conv is left alone, so TensorRT fuses the conv, the add and the ReLU into one
    INT8 kernel; the other (skip) input is quantized (NVIDIA's Q/DQ placement recommendation).
    ONNX Runtime needs both, to run QLinearConv and QLinearAdd.
    """

    def __init__(
        self,
        a_bits: int,
        target: str,
        learn_scale: bool = True,
        quantize: tuple[bool, bool] = (True, True),
    ) -> None:
        super().__init__()
        self.quantizer_a = (
            _activation_quantizer(a_bits, target, learn_scale) if quantize[0] else None
        )
        self.quantizer_b = (
            _activation_quantizer(a_bits, target, learn_scale) if quantize[1] else None
        )

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _maybe(self.quantizer_a, a) + _maybe(self.quantizer_b, b)


class QuantAvgPool(nn.Module):
    """Global average pooling of a quantized input (the ``onnxruntime`` target only).

    The last block's output feeds nothing else that quantizes it; quantized here, ONNX Runtime
    fuses that block's residual add into QLinearAdd too, as in its own ``quantize_static``
    placement. ``output_quantizer`` is the head's input quantizer (shared, see
    ``quant.convert``): the pooled tensor is quantized where the pool writes it, so ONNX Runtime
    runs the pool as QLinearGlobalAveragePool, and the head quantizing it again is exact (an
    already quantized value does not move). TensorRT does not need it (it fuses the pool itself).
    """

    def __init__(self, pool: nn.Module, a_bits: int, target: str, learn_scale: bool = True):
        super().__init__()
        self.pool = pool
        self.input_quantizer = _activation_quantizer(a_bits, target, learn_scale)
        self.output_quantizer: LSQQuantizer | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _maybe(self.output_quantizer, self.pool(self.input_quantizer(x)))


def _activation_quantizer(bits: int, target: str, learn_scale: bool) -> LSQQuantizer:
    return LSQQuantizer(bits, "activation", target=target, learn_scale=learn_scale)


def _maybe(quantizer: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if quantizer is None else quantizer(x)


QUANT_MODULES = (QuantConv2d, QuantLinear, QuantAdd, QuantAvgPool)


def quantizers(model: nn.Module) -> list[tuple[str, LSQQuantizer]]:
    """Every quantizer of ``model`` with its qualified name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LSQQuantizer)]


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` (dotted path) is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
