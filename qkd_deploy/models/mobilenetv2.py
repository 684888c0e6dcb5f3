"""A CIFAR-style MobileNetV2 (Sandler et al. 2018), close to the CRD/mdistiller student.

Choices:
- Stem: 3x3 conv, stride 1 (not 2), 32 * width_mult channels, BN, ReLU6; 32x32 inputs are
  downsampled three times in all (32 -> 16 -> 8 -> 4).
- Blocks: the paper's table, (expansion t, channels c, repeats n, stride s) =
  (1,16,1,1) (6,24,2,1) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1), channels times
  ``width_mult`` (truncated, as CRD does). The t=1 block has no expansion conv (as in the paper).
  Each block: [1x1 expand conv-BN-ReLU6] 3x3 depthwise conv-BN-ReLU6, 1x1 project conv-BN
  (linear bottleneck); an ``Add`` with the input when stride is 1 and channels are unchanged.
- Last 1x1 conv-BN-ReLU6 to 1280 * width_mult channels (640 at the default 0.5), then pool and
  a linear head.
- Stages (for distillation) group the blocks by resolution: blocks 1-3 (stride 1), 4-6, 7-13 and
  14-17 plus the last 1x1 conv, so the last stage's output is the pooled tensor. Block outputs
  are linear bottlenecks (no activation), except the last stage which ends with ReLU6.
"""

from __future__ import annotations

import torch
from torch import nn

from qkd_deploy.models.base import StagedClassifier, conv_bn
from qkd_deploy.models.layers import Add

# (expansion, channels, repeats, stride) per block group, from the MobileNetV2 paper.
BLOCK_GROUPS = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# Block groups per stage: one stage per output resolution.
STAGE_GROUPS = ((0, 1), (2,), (3, 4), (5, 6))


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [*conv_bn(in_channels, hidden, 1), nn.ReLU6()]
        layers += [*conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6()]
        layers += conv_bn(hidden, out_channels, 1)
        self.body = nn.Sequential(*layers)
        self.add = Add() if stride == 1 and in_channels == out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out if self.add is None else self.add(out, x)


def _scaled(channels: int, width_mult: float) -> int:
    return max(1, int(channels * width_mult))


class MobileNetV2(StagedClassifier):
    def __init__(
        self, in_channels: int = 3, num_classes: int = 10, width_mult: float = 0.5
    ) -> None:
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        channels = _scaled(32, width_mult)
        stem = nn.Sequential(*conv_bn(in_channels, channels, 3), nn.ReLU6())
        groups = []
        for expansion, c, repeats, stride in BLOCK_GROUPS:
            out_channels = _scaled(c, width_mult)
            blocks = [InvertedResidual(channels, out_channels, stride, expansion)]
            blocks += [
                InvertedResidual(out_channels, out_channels, 1, expansion)
                for _ in range(repeats - 1)
            ]
            groups.append(blocks)
            channels = out_channels
        last_channels = _scaled(1280, width_mult)
        stages = [nn.Sequential(*(b for g in ids for b in groups[g])) for ids in STAGE_GROUPS]
        stages[-1].extend([*conv_bn(channels, last_channels, 1), nn.ReLU6()])
        stage_channels = [_scaled(BLOCK_GROUPS[ids[-1]][1], width_mult) for ids in STAGE_GROUPS]
        stage_channels[-1] = last_channels
        super().__init__(stem, stages, stage_channels, num_classes)


def mobilenetv2(
    in_channels: int = 3, num_classes: int = 10, width_mult: float = 0.5
) -> MobileNetV2:
    return MobileNetV2(in_channels, num_classes, width_mult)
