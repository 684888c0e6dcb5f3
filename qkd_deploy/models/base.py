"""What every zoo model shares: stem -> stages -> global average pool -> linear head.

The layout is fixed so quantization, BN folding and export can rely on it: every conv is
``nn.Conv2d(bias=False)`` directly followed by its ``nn.BatchNorm2d`` (registered and called in
that order), every activation is its own module, and ``torch.flatten`` is the only functional op.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
) -> list[nn.Module]:
    """A bias-free conv ("same" padding for odd kernels) and the BatchNorm2d that consumes it."""
    conv = nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=kernel_size // 2,
        groups=groups,
        bias=False,
    )
    return [conv, nn.BatchNorm2d(out_channels)]


class StagedClassifier(nn.Module):
    """``stem`` then ``stages`` then pool and ``fc``; exposes the stage outputs for distillation.

    ``stage_channels[i]`` is the channel count of ``stages[i]``'s output; the last stage's output
    is what gets pooled.
    """

    def __init__(
        self, stem: nn.Module, stages: list[nn.Module], stage_channels: list[int], num_classes: int
    ) -> None:
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(stage_channels[-1], num_classes)
        self.stage_channels = list(stage_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """Kaiming-normal (fan_out) convs, BN weight 1 / bias 0, as in the CRD/mdistiller code."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """``(logits, {"stages": [each stage's output], "pooled": the head's input})``."""
        out = self.stem(x)
        stages = []
        for stage in self.stages:
            out = stage(out)
            stages.append(out)
        pooled = torch.flatten(self.pool(out), 1)
        return self.fc(pooled), {"stages": stages, "pooled": pooled}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]
