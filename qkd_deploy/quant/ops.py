"""Custom torch ops that mark quantization in an exported graph.

``qkd::quantize_dequantize`` (activations) and ``qkd::dequantize`` (integer weights and biases) run
in eager torch with exactly the numerics of ONNX QuantizeLinear/DequantizeLinear, and
``export/onnx.py`` translates them to those ONNX ops; ``qkd::global_average_pool`` becomes ONNX
GlobalAveragePool (the exporter would write ReduceMean, which ONNX Runtime cannot run on
integers). torch's own fake-quant ops cannot be used: they export only for full 8-bit ranges and
drop a narrower clamp silently.
"""

from __future__ import annotations

import torch


def _broadcast(scale: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    if scale.dim() == 0:
        return scale
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)


@torch.library.custom_op("qkd::quantize_dequantize", mutates_args=())
def quantize_dequantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int,
    clip: bool,
) -> torch.Tensor:
    """``clamp(round(x / scale), qmin, qmax) * scale`` on the symmetric grid ``qmin..qmax``.

    ``zero_point`` names the container type (and shifts a signed grid onto UINT8 in the ONNX
    graph); ``clip`` says the grid is narrower than the container, so the export needs a Clip.
    """
    s = _broadcast(scale, x.dim(), axis)
    return torch.clamp(torch.round(x / s), qmin, qmax) * s


@quantize_dequantize.register_fake
def _(x, scale, zero_point, qmin, qmax, axis, clip):
    return torch.empty_like(x)


@torch.library.custom_op("qkd::dequantize", mutates_args=())
def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int
) -> torch.Tensor:
    """``q * scale`` for integer weights or biases ``q`` (zero point 0), per channel along
    ``axis``."""
    return q.to(torch.float32) * _broadcast(scale, q.dim(), axis)


@dequantize.register_fake
def _(q, scale, zero_point, axis):
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


@torch.library.custom_op("qkd::global_average_pool", mutates_args=())
def global_average_pool(x: torch.Tensor) -> torch.Tensor:
    """The mean over the spatial dimensions of an ``N, C, H, W`` tensor, keeping them as 1x1."""
    return x.mean((2, 3), keepdim=True)


@global_average_pool.register_fake
def _(x):
    return x.new_empty((x.shape[0], x.shape[1], 1, 1))
