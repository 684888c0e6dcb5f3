"""The model zoo by name: ``build_model("resnet20", in_channels=3, num_classes=10)``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from qkd_deploy.errors import UserError
from qkd_deploy.models.mobilenetv2 import mobilenetv2
from qkd_deploy.models.resnet import (
    resnet8,
    resnet8x4,
    resnet14,
    resnet18,
    resnet20,
    resnet32,
    resnet32x4,
    resnet56,
)

# name -> factory(in_channels=..., num_classes=...)
MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet8": resnet8,
    "resnet14": resnet14,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "resnet18": resnet18,
    "mobilenetv2": mobilenetv2,
}


def available_models() -> list[str]:
    return list(MODELS)


def build_model(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """A freshly initialised zoo model; a bad name or size raises ``UserError``."""
    if name not in MODELS:
        raise UserError(
            f"unknown model {name!r}; choose one of {', '.join(available_models())}, "
            "or give your own as 'package.module:factory'"
        )
    for what, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"model {name!r}: {what} must be a positive integer, got {value!r}")
    return MODELS[name](in_channels=in_channels, num_classes=num_classes)
