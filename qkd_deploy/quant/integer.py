"""The integer (deploy) form of a fake-quant model: what ``export/onnx.py`` exports.

The model is BN-folded first (``quant.fold``, which for the ``onnxruntime`` target also puts
every bias on the INT32 grid of its layer's accumulator), then weights become integer buffers
with per-channel scales and quantizers frozen ``qkd::quantize_dequantize`` calls with tensor
scales and zero points. On the ``onnxruntime`` target a Linear's bias is stored as INT32 behind
a DequantizeLinear (scale = input scale x weight scale, as ONNX Runtime's ``quantize_static``
writes it): ONNX Runtime runs the layer as an integer QGemm only then (its Conv fusion
quantizes a float bias itself). The deploy model computes exactly what the folded fake-quant
model computes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import qkd_deploy.quant.ops  # noqa: F401  (registers torch.ops.qkd.*)
from qkd_deploy.errors import UserError
from qkd_deploy.quant.fold import fold_batchnorm
from qkd_deploy.quant.modules import (
    QuantAdd,
    QuantAvgPool,
    QuantConv2d,
    QuantLinear,
    replace_submodule,
)
from qkd_deploy.quant.quantizer import LSQQuantizer
from qkd_deploy.targets import Target

_TORCH_DTYPES = {"int8": torch.int8, "uint8": torch.uint8}
INT32_RANGE = (-(2**31), 2**31 - 1)


class FrozenQuantizer(nn.Module):
    """An activation quantizer with fixed scale and zero point, exported as (Clip +) Q/DQ."""

    def __init__(self, quantizer: LSQQuantizer) -> None:
        super().__init__()
        grid = quantizer.grid
        self.qmin, self.qmax, self.clip = grid.qmin, grid.qmax, not grid.fills_container
        self.register_buffer("scale", quantizer.step_size().detach().reshape(()).clone())
        zero_point = torch.tensor(grid.zero_point, dtype=_TORCH_DTYPES[grid.container])
        self.register_buffer("zero_point", zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qkd.quantize_dequantize(
            x, self.scale, self.zero_point, self.qmin, self.qmax, 0, self.clip
        )


class _IntegerWeights(nn.Module):
    """Integer weights with per-output-channel scales, exported as an INT8 initializer + DQ."""

    def __init__(
        self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, bits: int
    ) -> None:
        super().__init__()
        self.bits = bits
        self.register_buffer("weight_int", q.to(torch.int8))
        self.register_buffer("weight_scale", scale.float())
        self.register_buffer("weight_zero_point", torch.zeros(scale.shape, dtype=torch.int8))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def weight(self) -> torch.Tensor:
        return torch.ops.qkd.dequantize(
            self.weight_int, self.weight_scale, self.weight_zero_point, 0
        )


Freeze = Callable[[LSQQuantizer], FrozenQuantizer]


class DeployConv2d(_IntegerWeights):
    def __init__(self, conv: QuantConv2d, freeze: Freeze = FrozenQuantizer) -> None:
        q, scale, bias = _integer_weights(conv)
        super().__init__(q, scale, bias, conv.weight_quantizer.bits)
        self.input_quantizer = freeze(conv.input_quantizer)
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quantizer(x)
        return F.conv2d(
            x, self.weight(), self.bias, self.stride, self.padding, self.dilation, self.groups
        )


class DeployLinear(_IntegerWeights):
    def __init__(self, linear: QuantLinear, freeze: Freeze = FrozenQuantizer) -> None:
        q, scale, bias = _integer_weights(linear)
        super().__init__(q, scale, bias, linear.weight_quantizer.bits)
        self.input_quantizer = freeze(linear.input_quantizer)
        self.integer_bias = bias is not None and linear.input_quantizer.target is Target.ONNXRUNTIME
        if self.integer_bias:
            self.register_buffer("bias_scale", self.input_quantizer.scale * self.weight_scale)
            grid = torch.round(self.bias.double() / self.bias_scale.double())
            self.bias = grid.clamp(*INT32_RANGE).to(torch.int32)
            self.register_buffer("bias_zero_point", torch.zeros_like(self.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.weight(), self.effective_bias())

    def effective_bias(self) -> torch.Tensor | None:
        """The float bias, or the INT32 one dequantized (zero point 0)."""
        if not self.integer_bias:
            return self.bias
        return torch.ops.qkd.dequantize(self.bias, self.bias_scale, self.bias_zero_point, 0)


class DeployAdd(nn.Module):
    def __init__(self, add: QuantAdd, freeze: Freeze = FrozenQuantizer) -> None:
        super().__init__()
        self.quantizer_a = None if add.quantizer_a is None else freeze(add.quantizer_a)
        self.quantizer_b = None if add.quantizer_b is None else freeze(add.quantizer_b)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = a if self.quantizer_a is None else self.quantizer_a(a)
        return a + (b if self.quantizer_b is None else self.quantizer_b(b))


class DeployAvgPool(nn.Module):
    """Exported as ``Q/DQ -> GlobalAveragePool [-> Q/DQ]``, which ONNX Runtime fuses into
    QLinearGlobalAveragePool when the output is quantized."""

    def __init__(self, pool: QuantAvgPool, freeze: Freeze = FrozenQuantizer) -> None:
        super().__init__()
        self.input_quantizer = freeze(pool.input_quantizer)
        self.output_quantizer = (
            None if pool.output_quantizer is None else freeze(pool.output_quantizer)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.ops.qkd.global_average_pool(self.input_quantizer(x))
        return x if self.output_quantizer is None else self.output_quantizer(x)


def _integer_weights(
    layer: QuantConv2d | QuantLinear,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The layer's integer weights, per-channel step sizes and the bias it adds."""
    wq = layer.weight_quantizer
    grid = wq.grid
    scale = wq.step_size().detach()
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    q = torch.clamp(torch.round(layer.weight.detach() / scale.reshape(shape)), grid.qmin, grid.qmax)
    bias = layer.effective_bias()
    return q, scale, None if bias is None else bias.detach()


def to_deploy(model: nn.Module) -> nn.Module:
    """The deploy form of an eval-mode fake-quant model (a new model; ``model`` is unchanged)."""
    if model.training:
        raise UserError("refusing to export a model in train mode; call model.eval() first")
    uncalibrated = [
        n for n, m in model.named_modules() if isinstance(m, LSQQuantizer) and not m.calibrated
    ]
    if uncalibrated:
        raise UserError(f"quantizers {uncalibrated[:5]} were never calibrated; calibrate first")
    folded = fold_batchnorm(model)
    deploy = copy.deepcopy(folded)
    frozen: dict[int, FrozenQuantizer] = {}

    def freeze(quantizer: LSQQuantizer) -> FrozenQuantizer:
        """One frozen quantizer per quantizer: a quantizer shared by several layers (tied, see
        ``quant.convert``) stays shared, so the export quantizes its tensor once."""
        if id(quantizer) not in frozen:
            frozen[id(quantizer)] = FrozenQuantizer(quantizer)
        return frozen[id(quantizer)]

    deploy_types = {
        QuantConv2d: DeployConv2d,
        QuantLinear: DeployLinear,
        QuantAdd: DeployAdd,
        QuantAvgPool: DeployAvgPool,
    }
    for name, module in folded.named_modules():
        if type(module) in deploy_types:
            replace_submodule(deploy, name, deploy_types[type(module)](module, freeze))
    for name in _standalone_quantizers(folded, tuple(deploy_types)):
        replace_submodule(deploy, name, freeze(folded.get_submodule(name)))
    return deploy.eval()


def _standalone_quantizers(model: nn.Module, layers: tuple[type, ...]) -> list[str]:
    """Every name of every activation quantizer that is not part of a quantized layer: those
    placed on functional ops (``quant.rewrite``), a shared one under each of its names."""
    owners = {id(m) for m in model.modules() if isinstance(m, layers)}
    names = []
    for name, module in model.named_modules(remove_duplicate=False):
        parent = model.get_submodule(name.rpartition(".")[0])
        if isinstance(module, LSQQuantizer) and id(parent) not in owners:
            names.append(name)
    return names
