"""Small layers the zoo models are built from, so quantization can find and wrap them."""

from __future__ import annotations

import torch
from torch import nn


class Add(nn.Module):
    """Residual addition as a module, as the zoo's models write it.

    Quantizer placement treats it exactly as a functional ``a + b`` or ``out += identity``
    (``quant.placement``); quantized, it becomes a ``QuantAdd`` holding the quantizers of its
    inputs, so the zoo's quantized checkpoints keep their names (``add.quantizer_b``).
    """

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b
