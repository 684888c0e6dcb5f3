"""CIFAR ResNets (He et al. 2016) as used by the distillation literature (CRD, mdistiller).

A 3x3 stem conv, three stages of ``n = (depth - 2) / 6`` BasicBlocks with strides 1/2/2, global
average pooling and a linear head. A shortcut that changes stride or width is a 1x1 conv + BN
(option B). The ``x4`` variants are four times wider (stem 32, stages 64/128/256).
"""

from __future__ import annotations

import torch
from torch import nn

from qkd_deploy.models.base import StagedClassifier, conv_bn
from qkd_deploy.models.layers import Add

NARROW = (16, 16, 32, 64)
WIDE = (32, 64, 128, 256)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(in_channels, out_channels, 3, stride)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = conv_bn(out_channels, out_channels, 3)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(*conv_bn(in_channels, out_channels, 1, stride))
        else:
            self.shortcut = nn.Identity()
        self.add = Add()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(self.add(out, self.shortcut(x)))


class ResNet(StagedClassifier):
    """A 3x3 stem (stride 1), then stages of BasicBlocks: ``blocks[i]`` blocks of
    ``widths[i + 1]`` channels, the first with stride ``strides[i]``; ``widths[0]`` is the stem."""

    def __init__(
        self,
        blocks: tuple[int, ...],
        widths: tuple[int, ...],
        strides: tuple[int, ...],
        in_channels: int = 3,
        num_classes: int = 10,
    ) -> None:
        stem = nn.Sequential(*conv_bn(in_channels, widths[0], 3), nn.ReLU())
        stages = []
        for n, in_ch, out_ch, stride in zip(blocks, widths[:-1], widths[1:], strides, strict=True):
            stage = [BasicBlock(in_ch, out_ch, stride)]
            stage += [BasicBlock(out_ch, out_ch, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*stage))
        super().__init__(stem, stages, list(widths[1:]), num_classes)


class CifarResNet(ResNet):
    """``widths`` = (stem, stage 1, stage 2, stage 3) channels; ``depth`` = 6n + 2."""

    def __init__(
        self,
        depth: int,
        widths: tuple[int, int, int, int] = NARROW,
        in_channels: int = 3,
        num_classes: int = 10,
    ) -> None:
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        super().__init__((n, n, n), widths, (1, 2, 2), in_channels, num_classes)


def resnet8(in_channels: int = 3, num_classes: int = 10) -> CifarResNet:
    return CifarResNet(8, NARROW, in_channels, num_classes)


def resnet14(in_channels: int = 3, num_classes: int = 10) -> CifarResNet:
    return CifarResNet(14, NARROW, in_channels, num_classes)


def resnet20(in_channels: int = 3, num_classes: int = 10) -> CifarResNet:
    return CifarResNet(20, NARROW, in_channels, num_classes)


def resnet32(in_channels: int = 3, num_classes: int = 10) -> CifarResNet:
    return CifarResNet(32, NARROW, in_channels, num_classes)


def resnet56(in_channels: int = 3, num_classes: int = 10) -> CifarResNet:
    return CifarResNet(56, NARROW, in_channels, num_classes)


def resnet8x4(in_channels: int = 3, num_classes: int = 10) -> CifarResNet:
    return CifarResNet(8, WIDE, in_channels, num_classes)


def resnet32x4(in_channels: int = 3, num_classes: int = 10) -> CifarResNet:
    return CifarResNet(32, WIDE, in_channels, num_classes)


def resnet18(in_channels: int = 3, num_classes: int = 10) -> ResNet:
    """ResNet-18 for 32x32 inputs (3x3 stride-1 stem, no max-pool; stages 64/128/256/512)."""
    return ResNet((2, 2, 2, 2), (64, 64, 128, 256, 512), (1, 2, 2, 2), in_channels, num_classes)
