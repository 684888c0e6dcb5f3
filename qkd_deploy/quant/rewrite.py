"""Quantizers on functional ops, with the model's own modules, names and classes kept.

A quantizer for an input of a function or operator (``out += identity``, ``torch.cat``) cannot be
put into a module: it goes into the forward of the module whose code calls that op (its
*owner*). The owner's forward is traced alone (every module it calls stays one call), the
quantizers are inserted in that graph, and the generated code becomes the owner's ``forward``
(an instance attribute; the class is unchanged). The owner keeps its class, its other methods,
its hooks and its submodules under their names, so float state_dicts still load into it (by
name; the new quantizers are the only new keys, under ``<owner>.quant_ops``), and every module
the pipeline reads features from by name is still called.

An owner that cannot be traced alone the way the model calls it (it takes a list of tensors,
as a DenseNet layer does, or is called more than once) is traced inside its parent instead:
the parent's rewritten forward then computes the owner's ops itself.

The rewritten forward is the owner's inference path: Python branches on ``self.training`` in
that forward keep the eval-mode branch (a warning names the module when the branches differ).
"""

from __future__ import annotations

import types
import warnings
from dataclasses import dataclass, field

from torch import fx, nn

from qkd_deploy.errors import UserError
from qkd_deploy.quant.graph import ModelTracer, node_inputs, owner_of, trace

OPS_ATTRIBUTE = "quant_ops"  # ModuleDict of an owner holding its inserted modules
_CALLS = ("call_function", "call_method", "call_module")


@dataclass
class Edit:
    """What changes at one op of the model graph: quantizers on some of its inputs (by position
    among the nodes it reads) and, optionally, a module that computes the op instead."""

    inputs: dict[int, nn.Module] = field(default_factory=dict)
    replacement: nn.Module | None = None


class _UnitTracer(fx.Tracer):
    """Traces one module's forward, through the modules named in ``inlined`` only."""

    def __init__(self, inlined: set[str], prefix: str) -> None:
        super().__init__()
        self.inlined = inlined
        self.prefix = prefix

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _join(self.prefix, qualname) not in self.inlined


@dataclass
class _Unit:
    """A module whose forward is rewritten, and the submodules traced into it."""

    path: str
    inlined: set[str] = field(default_factory=set)

    def owns(self, path: str) -> bool:
        return path == self.path or path in self.inlined


def rewrite_owners(model: nn.Module, graph: fx.Graph, edits: dict[fx.Node, Edit]) -> None:
    """Apply ``edits`` (keyed by nodes of ``graph``, the model's traced graph) to the forwards of
    the modules that own those ops."""
    units: list[_Unit] = []
    owners = {owner_of(node)[0] for node in edits}
    for path in sorted(owners, key=lambda p: (-p.count("."), p)):  # deepest first
        if not any(unit.owns(path) for unit in units):
            units.append(_unit_for(model, graph, path, units))
    for unit in units:
        mine = {n: e for n, e in edits.items() if unit.owns(owner_of(n)[0])}
        _rewrite(model, graph, unit, mine)


def _unit_for(model: nn.Module, graph: fx.Graph, path: str, units: list[_Unit]) -> _Unit:
    """The smallest unit around ``path`` that traces alone as the model's graph has it."""
    unit = _Unit(path)
    while _local_calls(model, graph, unit) is None:
        if not unit.path:
            raise UserError(
                f"{type(model).__name__}: quantizers cannot be placed in its forward (traced "
                "alone it differs from the model's graph); set quant.trace=false"
            )
        unit.inlined.add(unit.path)
        unit.path = unit.path.rpartition(".")[0] if "." in unit.path else ""
        for inner in [u for u in units if unit.owns(u.path)]:
            units.remove(inner)
            unit.inlined |= inner.inlined | {inner.path}
    return unit


def _owned(graph: fx.Graph, unit: _Unit) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op in _CALLS and unit.owns(owner_of(n)[0])]


def _local_calls(
    model: nn.Module, graph: fx.Graph, unit: _Unit
) -> tuple[fx.Graph, list[fx.Node]] | None:
    """The unit's own graph and its nodes matching ``_owned(graph, unit)`` one to one, or None
    when it does not trace that way."""
    keys = {owner_of(n)[1] for n in graph.nodes if owner_of(n)[0] == unit.path}
    if len(keys) > 1:  # called more than once
        return None
    owner = model.get_submodule(unit.path)
    try:
        local = trace(owner, "place quantizers", _UnitTracer(unit.inlined, unit.path))
    except UserError:
        return None
    calls = [n for n in local.nodes if _is_model_node(n, owner, unit.path)]
    found = [(n.op, _global_target(n, unit.path), _layout(n)) for n in calls]
    expected = [(n.op, n.target, _layout(n)) for n in _owned(graph, unit)]
    return (local, calls) if found == expected else None


def _rewrite(model: nn.Module, graph: fx.Graph, unit: _Unit, edits: dict) -> None:
    owner = model.get_submodule(unit.path)
    what = f"module {unit.path!r}" if unit.path else type(model).__name__
    local, calls = _local_calls(model, graph, unit)
    owned = _owned(graph, unit)
    if hasattr(owner, OPS_ATTRIBUTE):
        raise UserError(f"{what} already has an attribute {OPS_ATTRIBUTE!r}; rename it")
    _warn_if_training_differs(owner, unit, what)
    ops = nn.ModuleDict()
    owner.add_module(OPS_ATTRIBUTE, ops)
    for global_node, edit in edits.items():
        _apply(local, calls[owned.index(global_node)], edit, ops)
    local.lint()
    code = fx.GraphModule(owner, local)
    owner.forward = types.MethodType(type(code).forward, owner)


def _layout(node: fx.Node) -> str:
    """A node's arguments with every graph node as ``N`` (a list of tensors stays a list)."""
    return repr(fx.node.map_arg((node.args, node.kwargs), lambda _: "N"))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _is_model_node(node: fx.Node, owner: nn.Module, path: str) -> bool:
    """Whether a node of the unit's own trace is a node of the model's graph too (calls of
    modules the model's graph traces through are not)."""
    if node.op == "call_module":
        return ModelTracer().is_leaf_module(
            owner.get_submodule(node.target), _join(path, node.target)
        )
    return node.op in _CALLS


def _global_target(node: fx.Node, path: str) -> object:
    return _join(path, node.target) if node.op == "call_module" else node.target


def _apply(graph: fx.Graph, node: fx.Node, edit: Edit, ops: nn.ModuleDict) -> None:
    inputs = node_inputs(node)
    if edit.replacement is not None:
        ops[node.name] = edit.replacement
        with graph.inserting_before(node):
            new = graph.call_module(f"{OPS_ATTRIBUTE}.{node.name}", (inputs[0],))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        return
    for index, quantizer in edit.inputs.items():
        key = f"{node.name}_in{index}"
        ops[key] = quantizer
        with graph.inserting_before(node):
            quantized = graph.call_module(f"{OPS_ATTRIBUTE}.{key}", (inputs[index],))
        _replace_input(node, index, quantized)


def _replace_input(node: fx.Node, index: int, new: fx.Node) -> None:
    """Make the ``index``-th node ``node`` reads (argument order) ``new``."""
    position = iter(range(len(node_inputs(node))))

    def swap(arg: fx.Node) -> fx.Node:
        return new if next(position) == index else arg

    node.args, node.kwargs = fx.node.map_arg((node.args, node.kwargs), swap)


def _warn_if_training_differs(owner: nn.Module, unit: _Unit, what: str) -> None:
    def code() -> str | None:
        try:
            graph = _UnitTracer(unit.inlined, unit.path).trace(owner)
        except Exception:  # fx raises many types; the eval-mode trace worked
            return None
        return fx.GraphModule(owner, graph).code

    modes = [(m, m.training) for m in owner.modules()]
    try:
        owner.eval()
        eval_code = code()
        owner.train()
        train_code = code()
    finally:
        for module, training in modes:
            module.training = training
    if train_code != eval_code:
        warnings.warn(
            f"{what}'s forward differs between training and eval mode; its quantized forward "
            "keeps the eval-mode path (e.g. no stochastic depth during QAT)",
            stacklevel=5,
        )
