"""User models given as ``package.module:factory`` and loading their checkpoints.

Every mistake a user can make here (bad spec, import failure, wrong checkpoint) raises one
``UserError`` that names the input and the fix.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping
from types import ModuleType

import torch
from torch import nn

from qkd_deploy.errors import UserError
from qkd_deploy.torch_files import load_weights_only

# Keys under which training scripts commonly nest the state dict, tried in this order.
NESTED_KEYS = ("state_dict", "model", "model_state")
DDP_PREFIX = "module."
SHOWN = 5  # how many offending keys an error message lists


def load_user_model(spec: str, checkpoint: str | None = None) -> nn.Module:
    """Import ``package.module``, call ``factory()`` with no arguments, optionally load weights."""
    module_name, factory = _parse_spec(spec)
    try:
        module = _import_from_here(module_name)
    except Exception as error:  # the user's module may fail in any way while importing
        raise UserError(
            f"model {spec!r}: cannot import module {module_name!r} "
            f"({type(error).__name__}: {error}); run from its folder, install the package or "
            "add its folder to PYTHONPATH"
        ) from error
    if not hasattr(module, factory):
        raise UserError(
            f"model {spec!r}: module {module_name!r} ({module.__file__}) has no attribute "
            f"{factory!r}; name a function or class defined in it"
        )
    model = _call_factory(spec, getattr(module, factory))
    return model if checkpoint is None else load_checkpoint(model, checkpoint)


def load_checkpoint(model: nn.Module, path: str) -> nn.Module:
    """Load a checkpoint into ``model`` strictly and return it.

    Accepts a raw state dict or one nested under ``state_dict``, ``model`` or ``model_state``;
    a ``module.`` prefix (DDP) is stripped.
    """
    state = _state_dict(_read(path), path)
    state = _strip_ddp_prefix(state, model)
    problems = _mismatches(model, state)
    if problems:
        raise UserError(
            f"checkpoint {path} does not fit {type(model).__name__}: {'; '.join(problems)}. "
            "Pass the checkpoint saved for this exact architecture (and the same in_channels / "
            "num_classes)"
        )
    model.load_state_dict(state, strict=True)
    return model


def _import_from_here(module_name: str) -> ModuleType:
    """Import as ``python -m`` would, with the working directory first on the path: the
    ``qkd-deploy`` script's path starts with its own folder instead, so a module beside the
    user was found by one command and not the other."""
    here = os.getcwd()
    add = here not in sys.path and "" not in sys.path
    if add:
        sys.path.insert(0, here)
    try:
        return importlib.import_module(module_name)
    finally:
        if add:
            sys.path.remove(here)


def _parse_spec(spec: str) -> tuple[str, str]:
    module_name, sep, factory = spec.partition(":")
    if not sep or not module_name or not factory.isidentifier():
        raise UserError(
            f"model {spec!r} is not a zoo name or 'package.module:factory' "
            "(e.g. 'mynets.small:build')"
        )
    return module_name, factory


def _call_factory(spec: str, factory: object) -> nn.Module:
    if not callable(factory):
        raise UserError(
            f"model {spec!r}: {type(factory).__name__} object is not callable; "
            "name a function or class that builds the model"
        )
    try:
        model = factory()
    except Exception as error:  # user code
        raise UserError(
            f"model {spec!r}: calling it with no arguments failed ({type(error).__name__}: "
            f"{error}); the factory must build the model without arguments"
        ) from error
    if not isinstance(model, nn.Module):
        raise UserError(
            f"model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module; "
            "make the factory return the model"
        )
    return model


def _read(path: str) -> object:
    return load_weights_only(
        path, "save it with torch.save(model.state_dict(), path) and check the path"
    )


def _state_dict(obj: object, path: str) -> dict[str, torch.Tensor]:
    """The tensor mapping in ``obj``, either ``obj`` itself or nested under a known key."""
    if isinstance(obj, Mapping):
        for key in NESTED_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if (
        isinstance(obj, Mapping)
        and obj
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        return dict(obj)
    found = f"keys {list(obj)[:SHOWN]}" if isinstance(obj, Mapping) else type(obj).__name__
    raise UserError(
        f"checkpoint {path} is not a state dict (found {found}); expected a mapping of parameter "
        f"names to tensors, raw or under one of {list(NESTED_KEYS)}"
    )


def _strip_ddp_prefix(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` that DistributedDataParallel puts before every key."""
    own_keys = model.state_dict().keys()
    if all(k.startswith(DDP_PREFIX) for k in state) and not any(
        k.startswith(DDP_PREFIX) for k in own_keys
    ):
        return {k[len(DDP_PREFIX) :]: v for k, v in state.items()}
    return state


def _mismatches(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Human-readable missing keys, unexpected keys and shape mismatches (empty if it fits)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if items:
            more = f" (+{len(items) - SHOWN} more)" if len(items) > SHOWN else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:SHOWN])}{more}")
    return problems
