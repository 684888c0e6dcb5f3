"""Stage feature maps of any classifier, for the methods that distil them.

A zoo model exposes its stages itself (``forward_features``, ``stage_channels``). A user model
names its stage layers by module name (config ``student.feature_layers`` or
``teachers[i].feature_layers``); ``attach_feature_layers`` checks the names on one dry run and
keeps them, with the widths found, as plain attributes of the model. Forward hooks capture those
layers' outputs only while ``forward_features`` runs, so the model survives ``copy.deepcopy``,
quantization (which keeps module names) and pickling (torchrun sends it to other processes).

The distillers ask these functions, never the model, for stage outputs and widths, so a zoo
model and a user model go through the same code.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from qkd_deploy.errors import UserError

LAYERS = "feature_layers"  # attribute: the stage layers' module names, shallowest first
CHANNELS = "feature_channels"  # attribute: their output channel counts
SHOWN = 8  # module names an error message lists


@dataclasses.dataclass(frozen=True)
class Role:
    """A model's part in a method, for error messages: what it is and the config key naming a
    user model's stage layers."""

    what: str
    option: str


def student_role(method: str) -> Role:
    return Role(f"{method} student", "student.feature_layers")


def teacher_role(method: str, index: int) -> Role:
    return Role(f"{method} teacher {index}", f"teachers[{index}].feature_layers")


def attach_feature_layers(
    model: nn.Module, names: Sequence[str], option: str, input_shape: tuple[int, ...]
) -> nn.Module:
    """Record ``names`` as ``model``'s stage layers after checking, on a zero batch of
    ``input_shape`` images, that each names a submodule called once per forward pass that returns
    an (N, C, H, W) map; returns ``model``."""
    names = list(names)
    if not names:
        raise UserError(f"{option} is empty; name the stage layers (e.g. [layer1, layer2])")
    modules = dict(model.named_modules())
    unknown = [n for n in names if not n or n not in modules]
    if unknown:
        raise UserError(
            f"{option}: {unknown} name no module of {type(model).__name__}; its modules include "
            f"{module_names(model)}"
        )
    outputs = _dry_run(model, names, input_shape, option)
    setattr(model, LAYERS, names)
    setattr(model, CHANNELS, [out.shape[1] for out in outputs])
    return model


def has_stage_features(model: nn.Module) -> bool:
    """Whether ``model`` is a zoo model or a user model with named stage layers."""
    return _is_zoo(model) or getattr(model, LAYERS, None) is not None


def require_stage_features(model: nn.Module, role: Role) -> None:
    """A ``UserError`` naming the config key to set unless ``model`` has stage features."""
    if not has_stage_features(model):
        raise UserError(
            f"{role.what} ({type(model).__name__}) exposes no stage feature maps; name its stage "
            f"layers with {role.option} (e.g. --set '{role.option}=[layer1,layer2]'), module "
            f"names such as {module_names(model)}, or use a logit method (kd, avg-teachers)"
        )


def stage_channels(model: nn.Module, role: Role) -> list[int]:
    """The output channel counts of ``model``'s stages."""
    if _is_zoo(model):
        return list(model.stage_channels)
    require_stage_features(model, role)
    return list(getattr(model, CHANNELS))


def stage_module(model: nn.Module, index: int, role: Role) -> nn.Module:
    """The module whose output is stage ``index`` of ``model``."""
    if _is_zoo(model):
        return model.stages[index]
    require_stage_features(model, role)
    return model.get_submodule(getattr(model, LAYERS)[index])


def forward_features(
    model: nn.Module, images: torch.Tensor, role: Role
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``model``'s logits and its stage outputs, shallowest first."""
    if _is_zoo(model):
        logits, extra = model.forward_features(images)
        return logits, extra["stages"]
    require_stage_features(model, role)
    names = getattr(model, LAYERS)
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    with _capturing(model, captured):
        logits = model(images)
    missing = [name for name, outs in captured.items() if not outs]
    if missing:
        raise UserError(
            f"{role.option}: {missing} did not run in {type(model).__name__}'s forward pass"
        )
    return logits, [captured[name][-1] for name in names]


def logits_and_pooled(
    model: nn.Module, images: torch.Tensor, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``model``'s logits and penultimate features: a zoo model's pooled head input, otherwise
    the (flattened) input of the model's last ``nn.Linear``."""
    if _is_zoo(model):
        logits, extra = model.forward_features(images)
        return logits, extra["pooled"]
    captured: list[torch.Tensor] = []
    head = _last_linear(model, what)
    handle = head.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    try:
        logits = model(images)
    finally:
        handle.remove()
    return logits, torch.flatten(captured[-1], 1)


def pooled_width(model: nn.Module, what: str) -> int:
    """The width of ``logits_and_pooled``'s features."""
    if _is_zoo(model):
        return model.stage_channels[-1]
    return _last_linear(model, what).in_features


def module_names(model: nn.Module, count: int = SHOWN) -> list[str]:
    """A few of ``model``'s module names, the shallowest first (for error messages)."""
    names = [name for name, _ in model.named_modules() if name]
    return sorted(names, key=lambda n: n.count("."))[:count]


def _is_zoo(model: nn.Module) -> bool:
    return hasattr(model, "forward_features") and hasattr(model, "stage_channels")


def _last_linear(model: nn.Module, what: str) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(
            f"{what}: {type(model).__name__} has no nn.Linear classifier head, whose input is "
            "the penultimate feature this method reads; give a model that ends in an nn.Linear"
        )
    return linears[-1]


@contextlib.contextmanager
def _capturing(model: nn.Module, captured: dict[str, list[torch.Tensor]]) -> Iterator[None]:
    """Forward hooks appending each named layer's output to ``captured[name]``, removed on
    exit."""
    handles = []
    try:
        for name, outputs in captured.items():
            handles.append(model.get_submodule(name).register_forward_hook(_appender(outputs)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _appender(outputs: list[torch.Tensor]) -> Callable:
    def hook(_module: nn.Module, _args: object, output: object) -> None:
        outputs.append(output)

    return hook


@torch.no_grad()
def _dry_run(
    model: nn.Module, names: list[str], input_shape: tuple[int, ...], option: str
) -> list[torch.Tensor]:
    """Each named layer's output on a zero batch (eval mode, the model's mode restored)."""
    captured: dict[str, list] = {name: [] for name in names}
    was_training = model.training
    model.eval()
    try:
        with _capturing(model, captured):
            model(torch.zeros(2, *input_shape))
    finally:
        model.train(was_training)
    problems = []
    for name, outs in captured.items():
        if len(outs) != 1:
            problems.append(f"{name} runs {len(outs)} times per forward pass, not once")
        elif not (isinstance(outs[0], torch.Tensor) and outs[0].dim() == 4):
            shape = tuple(outs[0].shape) if isinstance(outs[0], torch.Tensor) else type(outs[0])
            problems.append(f"{name} returns {shape}, not an (N, C, H, W) feature map")
    if problems:
        raise UserError(
            f"{option}: {'; '.join(problems)}; name layers that make the stage outputs (e.g. the "
            f"blocks after the stem), such as {module_names(model)}"
        )
    return [outs[0] for outs in captured.values()]
