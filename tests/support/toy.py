"""A tiny residual classifier with the zoo's conventions (Add module, ReLU modules, conv -> BN),
so quantization tests do not depend on the model zoo."""

import torch
from torch import nn

from qkd_deploy.models.layers import Add


class ToyResNet(nn.Module):
    def __init__(self, in_channels: int = 1, classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.add = Add()
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        z = self.relu2(self.add(self.bn2(self.conv2(y)), y))
        return self.fc(torch.flatten(self.pool(z), 1))


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affines, including negative gains, to exercise folding."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) * 3 - 1.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model
