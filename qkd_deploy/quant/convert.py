"""Conversion of a float model to its quantized (fake-quant) form."""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from qkd_deploy.errors import UserError
from qkd_deploy.models.layers import Add
from qkd_deploy.quant.graph import module_of, trace
from qkd_deploy.quant.grid import check_bits, check_target
from qkd_deploy.quant.modules import (
    QuantAdd,
    QuantAvgPool,
    QuantConv2d,
    QuantLinear,
    replace_submodule,
)
from qkd_deploy.quant.quantizer import LSQQuantizer


@dataclass(frozen=True)
class BitWidths:
    """Weight and activation bit-widths, written ``wXaY`` (e.g. ``w4a8``)."""

    w: int
    a: int

    def __post_init__(self) -> None:
        check_bits(self.w, f"w{self.w}a{self.a} weights")
        check_bits(self.a, f"w{self.w}a{self.a} activations")

    @property
    def name(self) -> str:
        return f"w{self.w}a{self.a}"

    @classmethod
    def parse(cls, text: str) -> BitWidths:
        """``"4"`` -> w4a4, ``"w4a8"`` -> w4a8."""
        t = text.strip().lower()
        try:
            if t.isdigit():
                return cls(int(t), int(t))
            if t.startswith("w") and "a" in t:
                w, a = t[1:].split("a", 1)
                return cls(int(w), int(a))
        except ValueError:
            pass
        raise UserError(
            f"bit-width {text!r} not understood; write a number (4 = w4a4) or wXaY (w4a8)"
        )


@dataclass
class QuantizeOptions:
    """How ``quantize_model`` quantizes: default bits, the 8-bit first and last layer, per-layer
    overrides (``fnmatch`` pattern of the module name -> ``wXaY``), export target, LSQ or fixed."""

    bits: BitWidths
    target: str = "tensorrt"
    first_last_bits: int | None = 8
    layer_bits: dict[str, str] = field(default_factory=dict)
    learn_scales: bool = True
    residual_add_inputs: str = "skip"  # tensorrt target: "skip" or "both" (see _add_inputs...)

    def __post_init__(self) -> None:
        check_target(self.target)
        if self.residual_add_inputs not in ("skip", "both"):
            raise UserError(
                f"quant.residual_add_inputs {self.residual_add_inputs!r}: use 'skip' (Q/DQ on "
                "a residual Add's skip input, TensorRT fuses Conv+Add) or 'both'"
            )


def quantize_model(model: nn.Module, options: QuantizeOptions) -> nn.Module:
    """A copy of ``model`` with every Conv2d, Linear and residual ``Add`` replaced by its quantized
    form. The first Conv2d and the last Linear (in registration order) get ``first_last_bits``."""
    model = copy.deepcopy(model)
    names = [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear, Add)]
    if not any(isinstance(m, (nn.Conv2d, nn.Linear)) for _, m in model.named_modules()):
        raise UserError("the model has no Conv2d or Linear layer to quantize")
    _check_deployable(model)
    _check_layer_bits(options.layer_bits, names)
    first_last = _first_conv_and_last_linear(model)
    add_inputs = _add_inputs_to_quantize(model, options)
    ort_target = options.target == "onnxruntime"
    graph = _trace_or_none(model, "find what reads each tensor") if ort_target else None
    consumers = _input_consumers(graph, model) if graph else []
    heads = _pool_heads(graph, model) if graph else {}
    for name in names:
        bits = _bits_for(name, first_last, options)
        module = model.get_submodule(name)
        if isinstance(module, Add):
            new = QuantAdd(bits.a, options.target, options.learn_scales, add_inputs[name])
        else:
            new = _quantized(module, bits, options)
        replace_submodule(model, name, new)
    if ort_target:
        _tie_quantizers(model, consumers)
        _quantize_global_pools(model, options, heads)
    return model


def _check_deployable(model: nn.Module) -> None:
    """Refuse, before any training, layers the exported Q/DQ model cannot compute as trained."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            raise UserError(
                f"conv {name!r} pads with padding_mode={module.padding_mode!r}, but a quantized "
                "conv exports with zero padding; build the model with padding_mode='zeros'"
            )
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.track_running_stats:
            raise UserError(
                f"BatchNorm {name!r} has track_running_stats=False: it normalises every batch "
                "by that batch's statistics, which cannot be folded or deployed; build it with "
                "track_running_stats=True"
            )


def _check_layer_bits(layer_bits: dict[str, str], names: list[str]) -> None:
    """Every ``quant.layer_bits`` entry is a valid bit-width and names a layer of the model."""
    for pattern, text in layer_bits.items():
        try:
            BitWidths.parse(text)
        except UserError as err:
            raise UserError(f"quant.layer_bits {pattern!r}: {err}") from None
    unmatched = [p for p in layer_bits if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise UserError(
            f"quant.layer_bits {unmatched} match no Conv2d, Linear or Add of the model; its "
            f"layers are named like {names[:3]} (fnmatch patterns of module names)"
        )


def _is_global_pool(module: nn.Module | None) -> bool:
    return type(module) is nn.AdaptiveAvgPool2d and module.output_size in (1, (1, 1))


def _quantize_global_pools(model: nn.Module, options: QuantizeOptions, heads: dict) -> None:
    """Quantize the input of each global average pool (see ``QuantAvgPool``), at the head's
    bit-width: the pooled tensor feeds the last linear layer. A pool whose output goes straight
    (through a flatten) into a quantized Linear quantizes its output with that layer's input
    quantizer, shared."""
    bits = options.first_last_bits or options.bits.a
    pools = [n for n, m in model.named_modules() if _is_global_pool(m)]
    for name in pools:
        pool = QuantAvgPool(model.get_submodule(name), bits, options.target, options.learn_scales)
        head = model.get_submodule(heads[name]) if name in heads else None
        if isinstance(head, QuantLinear):
            pool.output_quantizer = head.input_quantizer
        replace_submodule(model, name, pool)


def _trace_or_none(model: nn.Module, purpose: str) -> fx.Graph | None:
    """The model's graph, or None when it cannot be traced (the passes that need it then leave
    the placement as it is: still exact, less fused)."""
    try:
        return trace(model, purpose)
    except UserError:
        return None


_FLATTENS = {torch.flatten, "flatten", "view", "reshape"}


def _pool_heads(graph: fx.Graph, model: nn.Module) -> dict[str, str]:
    """Global average pool -> the Linear that reads its output through at most flattens/views."""
    modules = dict(model.named_modules())
    heads = {}
    for node in graph.nodes:
        if not _is_global_pool(module_of(node, modules)):
            continue
        reader = node
        while len(reader.users) == 1:
            reader = next(iter(reader.users))
            if reader.op == "call_module" or reader.target not in _FLATTENS:
                break
        if type(module_of(reader, modules)) is nn.Linear:
            heads[node.target] = reader.target
    return heads


def _input_consumers(graph: fx.Graph, model: nn.Module) -> list[list[tuple[str, int]]]:
    """For each tensor read by more than one Conv2d/Linear/Add input, those inputs as
    ``(module name, argument index)``."""
    modules = dict(model.named_modules())
    readers: dict[fx.Node, list[tuple[str, int]]] = {}
    for node in graph.nodes:
        module = module_of(node, modules)
        if type(module) in (nn.Conv2d, nn.Linear, Add):
            for index, arg in enumerate(node.args[: 2 if type(module) is Add else 1]):
                readers.setdefault(_through_identities(arg, modules), []).append(
                    (node.target, index)
                )
    return [group for group in readers.values() if len(group) > 1]


def _through_identities(node: object, modules: dict[str, nn.Module]) -> object:
    """The node whose value ``node`` passes on unchanged (an identity shortcut), else ``node``."""
    while isinstance(module_of(node, modules), nn.Identity):
        node = node.args[0]
    return node


def _input_quantizer(module: nn.Module, index: int) -> LSQQuantizer | None:
    if isinstance(module, QuantAdd):
        return module.quantizer_a if index == 0 else module.quantizer_b
    return module.input_quantizer


def _tie_quantizers(model: nn.Module, consumers: list[list[tuple[str, int]]]) -> None:
    """Make the quantizers that read one tensor at one bit-width a single shared module.

    A block's input feeds its first conv, and its shortcut conv or the residual add: with one
    quantizer per reader, the tensor would be quantized twice with different scales. Shared, the
    export quantizes it once, and ONNX Runtime can drop the ReLU before that single UINT8
    QuantizeLinear and fuse the add into QLinearAdd (what its own ``quantize_static`` does)."""
    for group in consumers:
        shared: dict[int, LSQQuantizer] = {}
        for name, index in group:
            module = model.get_submodule(name)
            quantizer = _input_quantizer(module, index)
            if quantizer is None:
                continue
            first = shared.setdefault(quantizer.bits, quantizer)
            if first is not quantizer:
                _set_input_quantizer(module, index, first)


def _set_input_quantizer(module: nn.Module, index: int, quantizer: LSQQuantizer) -> None:
    if isinstance(module, QuantAdd):
        setattr(module, "quantizer_a" if index == 0 else "quantizer_b", quantizer)
    else:
        module.input_quantizer = quantizer


def _add_inputs_to_quantize(
    model: nn.Module, options: QuantizeOptions
) -> dict[str, tuple[bool, bool]]:
    """Which inputs of each residual ``Add`` get a quantizer (see ``QuantAdd``): for TensorRT
    with ``residual_add_inputs="skip"``, not the first input that comes straight from a
    Conv2d/BatchNorm2d (TensorRT's placement recommendation: quantize the skip input, so the
    Add fuses into that conv); otherwise both."""
    adds = [n for n, m in model.named_modules() if type(m) is Add]
    placement = dict.fromkeys(adds, (True, True))
    fuse = options.target == "tensorrt" and options.residual_add_inputs == "skip"
    graph = _trace_or_none(model, "place residual-add quantizers") if fuse and adds else None
    if graph is None:  # untraceable: quantize both inputs, still exact, less fused
        return placement
    modules = dict(model.named_modules())
    for node in graph.nodes:
        if node.op == "call_module" and node.target in placement:
            from_conv = [
                isinstance(module_of(arg, modules), (nn.Conv2d, nn.BatchNorm2d))
                for arg in node.args[:2]
            ]
            if from_conv[0]:
                placement[node.target] = (False, True)
            elif from_conv[1]:
                placement[node.target] = (True, False)
    return placement


def _first_conv_and_last_linear(model: nn.Module) -> set[str]:
    convs = [n for n, m in model.named_modules() if type(m) is nn.Conv2d]
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    return set(convs[:1] + linears[-1:])


def _bits_for(name: str, first_last: set[str], options: QuantizeOptions) -> BitWidths:
    for pattern, text in options.layer_bits.items():
        if fnmatch.fnmatchcase(name, pattern):
            return BitWidths.parse(text)
    if name in first_last and options.first_last_bits:
        return BitWidths(options.first_last_bits, options.first_last_bits)
    return options.bits


def _quantized(module: nn.Module, bits: BitWidths, options: QuantizeOptions) -> nn.Module:
    if type(module) is nn.Conv2d:
        return QuantConv2d.from_float(module, bits.w, bits.a, options.target, options.learn_scales)
    return QuantLinear.from_float(module, bits.w, bits.a, options.target, options.learn_scales)
