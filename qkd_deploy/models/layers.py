"""Small layers the zoo models are built from, so quantization can find and wrap them."""

from __future__ import annotations

import torch
from torch import nn


class Add(nn.Module):
    """Residual addition as a module, so conversion can put quantizers on both of its inputs.

    TensorRT fuses Conv + Add in INT8 only when both inputs of the Add are quantized.
    """

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b
