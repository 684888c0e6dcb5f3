"""The module graph of a model (torch.fx), for the passes that need to know what feeds what:
BatchNorm folding and residual-add quantizer placement."""

from __future__ import annotations

from torch import fx, nn

from qkd_deploy.errors import UserError
from qkd_deploy.models.layers import Add
from qkd_deploy.quant.modules import QUANT_MODULES
from qkd_deploy.quant.quantizer import LSQQuantizer


class _Tracer(fx.Tracer):
    """Keeps quantized layers, quantizers and residual adds as single call_module nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (*QUANT_MODULES, LSQQuantizer, Add)) or super().is_leaf_module(
            m, qualname
        )


def trace(model: nn.Module, purpose: str) -> fx.Graph:
    try:
        return _Tracer().trace(model)
    except Exception as error:  # fx raises many types for untraceable code
        raise UserError(
            f"cannot trace {type(model).__name__} with torch.fx to {purpose} "
            f"({type(error).__name__}: {error}); remove data-dependent control flow from forward()"
        ) from error


def module_of(node, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The module a graph node calls, or None for anything else (functions, inputs, ...)."""
    if isinstance(node, fx.Node) and node.op == "call_module":
        return modules[node.target]
    return None
