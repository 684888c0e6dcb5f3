"""The module graph of a model (torch.fx), for the passes that need to know what feeds what:
quantizer placement, BatchNorm folding.

Tracing runs with every module in eval mode (a ``self.training`` branch, such as stochastic
depth, takes its inference path) and keeps torch's own layers, the quantized layers, quantizers
and the zoo's ``Add`` as single ``call_module`` nodes.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import fx, nn

from qkd_deploy.errors import UserError
from qkd_deploy.models.layers import Add
from qkd_deploy.quant.modules import QUANT_MODULES
from qkd_deploy.quant.quantizer import LSQQuantizer

_TORCH_DIR = Path(torch.__file__).parent


class ModelTracer(fx.Tracer):
    """Keeps quantized layers, quantizers and residual adds as single call_module nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (*QUANT_MODULES, LSQQuantizer, Add)) or super().is_leaf_module(
            m, qualname
        )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode for the duration; each one's own mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def trace(model: nn.Module, purpose: str, tracer: fx.Tracer | None = None) -> fx.Graph:
    """The model's graph (traced in eval mode), or a UserError naming the line fx stopped at."""
    try:
        with eval_mode(model):
            return (tracer or ModelTracer()).trace(model)
    except Exception as error:  # fx raises many types for untraceable code
        raise UserError(
            f"cannot trace {type(model).__name__} with torch.fx to {purpose}: "
            f"{_user_line(error)}{type(error).__name__}: {error}. Rewrite that line without "
            "Python control flow on tensor values (or move it into a submodule of torch.nn), "
            "or set quant.trace=false to quantize only the Conv2d/Linear layers"
        ) from error


def _user_line(error: BaseException) -> str:
    """``file:line: code`` of the innermost frame outside torch, or nothing."""
    frames = [
        f
        for f in traceback.extract_tb(error.__traceback__)
        if _TORCH_DIR not in Path(f.filename).parents
    ]
    if not frames or Path(frames[-1].filename) == Path(__file__):
        return ""
    frame = frames[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} `{(frame.line or '').strip()}`: "


def module_of(node, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The module a graph node calls, or None for anything else (functions, inputs, ...)."""
    if isinstance(node, fx.Node) and node.op == "call_module":
        return modules[node.target]
    return None


def node_inputs(node: fx.Node) -> list[fx.Node]:
    """The graph nodes ``node`` reads, in argument order (lists flattened), repeats included."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return found


def owner_of(node: fx.Node) -> tuple[str, str]:
    """(qualified name, call key) of the module whose own forward created ``node`` ("" for the
    root). The key carries ``@N`` when that module was called more than once."""
    stack = list(node.meta.get("nn_module_stack", {}).items())
    if node.op == "call_module" and stack:
        stack = stack[:-1]  # the entry of the called module itself
    if not stack:
        return "", ""
    key, (path, _) = stack[-1]
    return path, key
