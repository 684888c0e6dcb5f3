"""The LSQ quantizer (Esser et al., "Learned Step Size Quantization", ICLR 2020).

One module quantizes one tensor: weights per output channel (axis 0), activations per tensor.
The step size is learned (or fixed after calibration); its gradient is scaled by
``1 / sqrt(N * qmax)`` as in the paper, and rounding uses the straight-through estimator.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qkd_deploy.bits import check_bits
from qkd_deploy.quant.grid import Grid, activation_grid, weight_grid
from qkd_deploy.targets import Target


def _scale_gradient(t: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in the forward pass, gradient multiplied by ``factor`` in the backward pass."""
    scaled = t * factor
    return (t - scaled).detach() + scaled


def _round_ste(t: torch.Tensor) -> torch.Tensor:
    return (t.round() - t).detach() + t


class _FakeQuantize(torch.autograd.Function):
    """``clamp(round(x / s), qmin, qmax) * s`` with the straight-through gradient in ``x`` and
    LSQ's gradient in ``s``: ``round(v) - v`` inside the range, the clipped bound outside
    (``v = x / s``). One function rather than autograd over its pieces, which cost about ten
    tensor passes per call: a W4A4 resnet8 step on 64 Fashion-MNIST images took 387 ms of CPU
    time that way and 189 ms this way (torch profiler, 1 thread)."""

    @staticmethod
    def forward(ctx, x, scale, qmin: int, qmax: int):
        v = x / scale
        q = v.round().clamp_(qmin, qmax)  # equals round(clamp(v)): the bounds are integers
        ctx.save_for_backward(v, q)
        ctx.bounds = (qmin, qmax)
        ctx.scale_shape = scale.shape
        return q * scale

    @staticmethod
    def backward(ctx, grad):
        v, q = ctx.saved_tensors
        qmin, qmax = ctx.bounds
        inside = (v >= qmin) & (v <= qmax)
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            grad_scale = (grad * torch.where(inside, q - v, q)).sum_to_size(ctx.scale_shape)
        return grad_x, grad_scale, None, None


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, grid: Grid, axis: int | None
) -> torch.Tensor:
    """``clamp(round(x / s), qmin, qmax) * s`` with straight-through rounding (differentiable in
    ``x`` inside the range and in ``s`` everywhere)."""
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale = scale.reshape(shape)
    return _FakeQuantize.apply(x, scale, grid.qmin, grid.qmax)


def quantize_bias(
    bias: torch.Tensor, input_step: torch.Tensor, weight_step: torch.Tensor
) -> torch.Tensor:
    """The bias on the INT32 accumulator grid ``input_step * weight_step`` (per output channel),
    straight-through. Integer kernels (ONNX Runtime's QLinearConv, TensorRT's INT8 convs) add the
    bias in the accumulator, so this is the bias the deployed model really uses."""
    step = (input_step * weight_step).detach()
    return _round_ste(bias / step) * step


class LSQQuantizer(nn.Module):
    """Symmetric fake quantizer with a learned step size.

    ``kind`` is "weight" (per channel along ``axis`` 0, narrow signed grid) or "activation"
    (per tensor; the grid depends on whether calibration saw only non-negative values and on the
    export ``target``, see ``quant.grid``). Until calibrated the quantizer passes values through;
    while an ``observer`` is attached it records its input for calibration.
    """

    def __init__(
        self,
        bits: int,
        kind: str,
        *,
        channels: int | None = None,
        target: Target | str = Target.TENSORRT,
        learn_scale: bool = True,
    ) -> None:
        super().__init__()
        check_bits(bits, f"{kind} quantizer")
        self.bits = bits
        self.kind = kind
        self.target = Target.parse(target)
        self.axis = 0 if kind == "weight" else None
        self.scale = nn.Parameter(
            torch.ones(channels if self.axis == 0 else ()), requires_grad=learn_scale
        )
        self.register_buffer("calibrated", torch.tensor(False))
        self.register_buffer("non_negative", torch.tensor(False))
        self.observer = None
        self.active_bits: int | None = (
            None  # a temporary bit-width (stochastic precision), None = bits
        )
        # the largest value the input can take (6 after a ReLU6), set by the placement: the
        # grid never reaches beyond it (not in the state dict: quantize_model sets it again)
        self.upper_bound: float | None = None

    @property
    def grid(self) -> Grid:
        return self.grid_for(self.bits)

    def grid_for(self, bits: int) -> Grid:
        """The grid at ``bits``. Only the quantizer's own ``bits`` is exported, so another
        bit-width (``active_bits``: a training-only pass such as SPEQ's teacher) gets that
        bit-width's whole grid, not what the export container could carry: an 8-bit
        non-negative activation is 0..255 on the ``tensorrt`` target too, not -128..127."""
        if self.kind == "weight":
            return weight_grid(bits)
        target = self.target if bits == self.bits else Target.ONNXRUNTIME
        return activation_grid(bits, bool(self.non_negative), target)

    def set_range(self, amax: torch.Tensor, non_negative: bool = False) -> None:
        """Initialise the step size so the grid's largest magnitude maps to ``amax``."""
        self.non_negative.fill_(non_negative)
        amax = torch.as_tensor(amax, dtype=torch.float32).clamp_min(1e-8)
        with torch.no_grad():
            self.scale.copy_((amax / self.grid.qmax).reshape(self.scale.shape))
        self.calibrated.fill_(True)

    def step_size(self) -> torch.Tensor:
        """The step size in use: positive, at most ``upper_bound`` / the grid's largest level,
        and rescaled when ``active_bits`` changes the grid (same clipping range on a finer or
        coarser grid).

        The bound matters to ONNX Runtime: it folds a ReLU6 (a Clip) into the quantization of
        a conv's output only when the grid ends at or below 6; a learned step that grows past
        it (MobileNetV2: 6.0145 / 255) left those convs in float, each with its Clip."""
        scale = self.scale.abs().clamp_min(1e-8)
        if self.upper_bound is not None:
            scale = scale.clamp_max(self.upper_bound / self.grid.qmax)
        bits = self.active_bits or self.bits
        if bits != self.bits:
            scale = scale * (self.grid.qmax / self.grid_for(bits).qmax)
        return scale

    @property
    def active(self) -> bool:
        """Quantizing (calibrated and not observing)."""
        return self.observer is None and bool(self.calibrated)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.observe(x.detach().clone())  # the model may change x in place later
            return x
        if not bool(self.calibrated):
            return x
        grid = self.grid_for(self.active_bits or self.bits)
        scale = self.step_size()
        # LSQ gradient scale: N = elements per step size (one channel of a weight, one sample's
        # activation)
        scale = _scale_gradient(scale, 1.0 / math.sqrt(x[0].numel() * grid.qmax))
        return fake_quantize(x, scale, grid, self.axis)

    def extra_repr(self) -> str:
        shape = "per-channel" if self.axis == 0 else "per-tensor"
        return f"{self.kind}, bits={self.bits}, {shape}, target={self.target}"
