"""Where activation quantizers go, read from the model's traced graph, per export target.

A *site* is one input of one op of the graph (``Site.index``: which of the nodes the op reads,
in argument order) or, for a global average pool, its output. Sites with equal ``group`` share
one quantizer. The ops are recognised whether a model writes them as modules or as functions and
operators (``out += identity``, ``torch.cat``, ``x * gate``, ``F.relu``, ``torch.flatten``).

- ``tensorrt`` (TensorRT's Q/DQ placement recommendations): the input of every Conv2d and
  Linear; the skip input of every residual add (the input that does not come straight from a
  conv, so TensorRT fuses Conv+Add; both inputs when neither does, or with
  ``residual_add_inputs="both"``). Nothing else: TensorRT fuses activations, pools,
  multiplications and concatenations itself and carries one scale through a concatenation.
- ``onnxruntime``: every op with an integer kernel in ONNX Runtime (Conv -> QLinearConv, Linear
  -> QGemm, add -> QLinearAdd, multiply -> QLinearMul, cat -> QLinearConcat, global average
  pool -> QLinearGlobalAveragePool, sigmoid -> QLinearSigmoid) reads quantized inputs, and all
  but Linear (whose QGemm writes float) have their output quantized, after a ReLU/ReLU6 that
  alone reads it (ONNX Runtime drops it into the quantization) and a conv's BatchNorm (folded).
  A tensor is quantized once: its readers share one quantizer per bit-width, also through ops
  that only move values (reshape, transpose, flatten, chunk, max-pool, ...), which commute with
  per-tensor quantization. Ops that export to nothing (Identity, Dropout, ``contiguous``) get no
  quantizer of their own: the ops that read their output quantize it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from qkd_deploy.models.layers import Add
from qkd_deploy.quant.graph import module_of, node_inputs

OUTPUT = -1  # Site.index of a global pool's output

_ADD = {operator.add, operator.iadd, torch.add}
_MUL = {operator.mul, operator.imul, torch.mul}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_SIGMOID = {torch.sigmoid, F.sigmoid}
_RELU = {F.relu, torch.relu, F.relu6, torch.relu_}
_MOVES = {
    torch.flatten,
    torch.reshape,
    torch.transpose,
    torch.permute,
    torch.squeeze,
    torch.unsqueeze,
    torch.chunk,
    torch.split,
    torch.narrow,
    torch.channel_shuffle,
    operator.getitem,
}
_MOVE_NAMES = {"max_pool2d", "_max_pool2d", "channel_shuffle", "native_channel_shuffle"}
_MOVE_METHODS = {
    "view",
    "reshape",
    "flatten",
    "transpose",
    "permute",
    "squeeze",
    "unsqueeze",
    "chunk",
    "split",
    "narrow",
    "view_as",
    "reshape_as",
}
_MOVE_MODULES = (nn.Flatten, nn.MaxPool2d, nn.ChannelShuffle)
_IDENTITY_MODULES = (nn.Identity, nn.Dropout)  # nothing in the exported graph
_NOT_VALUES = {"size", "dim", "numel"}  # methods returning shapes, not tensors

# kinds of op that read quantized inputs on the onnxruntime target; all but "linear" also have
# their output quantized
INTEGER_KINDS = {"conv", "linear", "add", "mul", "cat", "pool", "sigmoid"}


@dataclass(frozen=True)
class Site:
    node: fx.Node
    index: int  # position among node_inputs(node), or OUTPUT
    bits: int
    group: object


def is_global_pool(module: nn.Module | None) -> bool:
    return type(module) is nn.AdaptiveAvgPool2d and module.output_size in (1, (1, 1))


class Graph:
    """The traced graph with each node's kind of op."""

    def __init__(self, graph: fx.Graph, modules: dict[str, nn.Module]) -> None:
        self.graph = graph
        self.modules = modules
        self.values = set()
        for node in graph.nodes:  # in topological order
            if _computes_value(node, self.values):
                self.values.add(node)
        self.kinds = {node: self._kind(node) for node in graph.nodes}

    def is_value(self, node: object) -> bool:
        """Whether ``node`` is a tensor computed from the input (not a shape, not a weight)."""
        return isinstance(node, fx.Node) and node in self.values

    def _kind(self, node: fx.Node) -> str | None:
        module = module_of(node, self.modules)
        if module is not None:
            return _module_kind(module)
        if node.op not in ("call_function", "call_method") or not self.is_value(node):
            return None
        target = node.target
        values = [self.is_value(a) for a in node.args[:2]]
        if target in _ADD or target in ("add", "add_"):
            two = len(values) == 2 and all(values) and "alpha" not in node.kwargs
            return "add" if two else None
        if target in _MUL or target in ("mul", "mul_"):
            return "mul" if len(values) == 2 and all(values) else None
        if target in _CAT:
            tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
            return "cat" if all(self.is_value(t) for t in tensors) else None
        if target in _SIGMOID or target in ("sigmoid", "sigmoid_"):
            return "sigmoid"
        if target in _RELU or target in ("relu", "relu_"):
            return "relu"
        if target is F.adaptive_avg_pool2d:
            size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
            return "pool" if size in (1, (1, 1), [1, 1]) else None
        if target is F.dropout or target == "contiguous":
            return "identity"
        if target in _MOVES or getattr(target, "__name__", None) in _MOVE_NAMES:
            return "move"
        if node.op == "call_method" and target in _MOVE_METHODS:
            return "move"
        return None

    def readers(self, node: fx.Node) -> list[tuple[fx.Node, int]]:
        """(op, input position) of every value use of ``node``."""
        found = []
        for user in node.users:
            if user.op == "output" or not self.is_value(user):
                continue
            found += [(user, i) for i, n in enumerate(node_inputs(user)) if n is node]
        return found

    def sole_reader(self, node: fx.Node) -> fx.Node | None:
        return next(iter(node.users)) if len(node.users) == 1 else None

    def from_conv(self, node: object) -> bool:
        """Whether ``node`` is a conv's output, directly or through the BN folded into it."""
        module = module_of(node, self.modules)
        if isinstance(module, nn.BatchNorm2d):
            source = node.args[0]
            return self.kinds.get(source) == "conv" and len(source.users) == 1
        return isinstance(module, nn.Conv2d)


def _computes_value(node: fx.Node, values: set[fx.Node]) -> bool:
    if node.op in ("placeholder", "call_module"):
        return True
    if node.op not in ("call_function", "call_method"):
        return False
    if node.target in _NOT_VALUES or node.target is getattr:
        return False
    return any(n in values for n in node_inputs(node))


def _module_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, Add):
        return "add"
    if is_global_pool(module):
        return "pool"
    if isinstance(module, nn.Sigmoid):
        return "sigmoid"
    if type(module) in (nn.ReLU, nn.ReLU6):
        return "relu"
    if isinstance(module, _MOVE_MODULES):
        return "move"
    if isinstance(module, _IDENTITY_MODULES):
        return "identity"
    return None


BitsOf = Callable[[fx.Node], int]


def tensorrt_sites(g: Graph, bits_of: BitsOf, add_inputs: str = "skip") -> list[Site]:
    """Conv2d/Linear inputs and residual-add skip inputs, each its own quantizer."""
    sites = []
    for node, kind in g.kinds.items():
        if kind in ("conv", "linear"):
            sites.append(Site(node, 0, bits_of(node), (node, 0)))
        elif kind == "add":
            for index in _quantized_add_inputs(g, node, add_inputs):
                sites.append(Site(node, index, bits_of(node), (node, index)))
    return sites


def _quantized_add_inputs(g: Graph, node: fx.Node, add_inputs: str) -> list[int]:
    """The skip input(s) of a residual add: all inputs but one that comes straight from a conv
    (the first such), so that conv and the add fuse; every input with ``add_inputs="both"``."""
    inputs = node_inputs(node)[:2]
    convs = [i for i, n in enumerate(inputs) if g.from_conv(n)]
    if add_inputs == "both" or not convs:
        return [0, 1]
    return [i for i in (0, 1) if i != convs[0]]


class _Classes:
    """Union-find of values that are the same numbers moved around (one quantizer serves all)."""

    def __init__(self, g: Graph) -> None:
        self.parent: dict[fx.Node, fx.Node] = {}
        for node, kind in g.kinds.items():
            if kind in ("move", "identity") and node_inputs(node):
                self.union(node, node_inputs(node)[0])

    def find(self, node: fx.Node) -> fx.Node:
        while self.parent.get(node, node) is not node:
            node = self.parent[node]
        return node

    def union(self, a: fx.Node, b: fx.Node) -> None:
        self.parent[self.find(a)] = self.find(b)


def onnxruntime_sites(g: Graph, bits_of: BitsOf) -> list[Site]:
    """Inputs and outputs of every op with an integer kernel, one quantizer per tensor (and
    bit-width) however many ops read it."""
    classes = _Classes(g)
    sites = []

    def site(node: fx.Node, index: int, value: fx.Node, bits: int) -> None:
        sites.append(Site(node, index, bits, (classes.find(value), bits)))

    for node, kind in g.kinds.items():
        if kind not in INTEGER_KINDS:
            continue
        bits = bits_of(node)
        for index, value in enumerate(node_inputs(node)):
            if g.is_value(value):
                site(node, index, value, bits)
        if kind == "linear":
            continue
        out = _output_point(g, node, kind)
        if kind == "pool":
            site(node, OUTPUT, out, bits)
            continue
        for reader, index in g.readers(out):
            if g.kinds[reader] not in (*INTEGER_KINDS, "identity"):
                site(reader, index, out, bits)
    return sites


def _output_point(g: Graph, node: fx.Node, kind: str) -> fx.Node:
    """Where an integer op's output is quantized: after the conv's BatchNorm and a ReLU/ReLU6
    that alone read it."""
    out = node
    reader = g.sole_reader(out)
    if kind == "conv" and isinstance(module_of(reader, g.modules), nn.BatchNorm2d):
        out = reader
    while (reader := g.sole_reader(out)) is not None and g.kinds.get(reader) == "relu":
        out = reader
    return out
