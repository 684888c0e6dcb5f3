"""Conversion of a float model to its quantized (fake-quant) form."""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import fx, nn

from qkd_deploy.bits import BitWidths
from qkd_deploy.errors import UserError
from qkd_deploy.models.layers import Add
from qkd_deploy.quant.graph import module_of, node_inputs, trace
from qkd_deploy.quant.modules import (
    QuantAdd,
    QuantAvgPool,
    QuantConv2d,
    QuantLinear,
    replace_submodule,
)
from qkd_deploy.quant.placement import (
    OUTPUT,
    Graph,
    Site,
    onnxruntime_sites,
    tensorrt_sites,
)
from qkd_deploy.quant.quantizer import LSQQuantizer
from qkd_deploy.quant.rewrite import Edit, rewrite_owners
from qkd_deploy.targets import Target

RELU6_MAX = 6.0


@dataclass
class QuantizeOptions:
    """How ``quantize_model`` quantizes: default bits, the 8-bit first and last layer, per-layer
    overrides (``fnmatch`` pattern of the module name -> ``wXaY``), export target, LSQ or fixed."""

    bits: BitWidths
    target: Target = Target.TENSORRT  # its spelling ("tensorrt") is parsed too
    first_last_bits: int | None = 8
    layer_bits: dict[str, str] = field(default_factory=dict)
    learn_scales: bool = True
    residual_add_inputs: str = "skip"  # tensorrt target: "skip" or "both" (quant.placement)
    trace: bool = field(default=True, kw_only=True)  # False: layers only (see quantize_model)

    def __post_init__(self) -> None:
        self.target = Target.parse(self.target)
        if self.residual_add_inputs not in ("skip", "both"):
            raise UserError(
                f"quant.residual_add_inputs {self.residual_add_inputs!r}: use 'skip' (Q/DQ on "
                "a residual Add's skip input, TensorRT fuses Conv+Add) or 'both'"
            )


def quantize_model(model: nn.Module, options: QuantizeOptions) -> nn.Module:
    """A copy of ``model`` with every Conv2d and Linear replaced by its quantized form and
    activation quantizers placed from the traced graph for ``options.target`` (see
    ``quant.placement``): on functional ops too (``out += identity``, ``torch.cat``,
    ``x * gate``), inserted into the forward of the module that calls them (``quant.rewrite``).
    The first Conv2d and the last Linear (in registration order) get ``first_last_bits``.

    With ``options.trace=False`` only the layers are quantized (Conv2d, Linear and the zoo's
    ``Add``, both inputs), with a warning."""
    model = copy.deepcopy(model)
    names = [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear, Add)]
    if not any(isinstance(m, (nn.Conv2d, nn.Linear)) for _, m in model.named_modules()):
        raise UserError("the model has no Conv2d or Linear layer to quantize")
    _check_deployable(model)
    _warn_unquantized_layers(model)
    _check_layer_bits(options.layer_bits, names)
    first_last = _first_conv_and_last_linear(model)
    if not options.trace:
        warnings.warn(
            "quant.trace=false: only Conv2d/Linear layers (and zoo Add modules) are quantized; "
            "functional adds, multiplications and concatenations stay in float",
            stacklevel=2,
        )
        return _quantize_layers_only(model, names, first_last, options)
    graph = Graph(trace(model, "place quantizers"), dict(model.named_modules()))
    sites = _sites(graph, first_last, options)
    for name in names:
        if type(model.get_submodule(name)) is not Add:
            replace_submodule(
                model, name, _quantized(model.get_submodule(name), name, first_last, options)
            )
    _realize(model, graph, sites, options)
    return model


def _warn_unquantized_layers(model: nn.Module) -> None:
    """Say which layers with weights stay in float: convolutions and linear layers other than
    ``nn.Conv2d`` and ``nn.Linear`` themselves (transposed, 1-D/3-D, or a subclass, e.g. a conv
    that pads itself in its own forward, which a quantized conv would not do)."""
    kept = [
        f"{name} ({type(m).__name__})"
        for name, m in model.named_modules()
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
        and type(m) not in (nn.Conv2d, nn.Linear)
    ]
    if kept:
        warnings.warn(
            f"{len(kept)} layer(s) with weights stay in float, without Q/DQ: "
            f"{', '.join(kept[:5])}{', ...' if len(kept) > 5 else ''}; only nn.Conv2d and "
            "nn.Linear themselves are quantized",
            stacklevel=3,
        )


def _quantize_layers_only(
    model: nn.Module, names: list[str], first_last: set[str], options: QuantizeOptions
) -> nn.Module:
    for name in names:
        module = model.get_submodule(name)
        if type(module) is Add:
            bits = _bits_for(name, first_last, options).a
            new = QuantAdd(bits, options.target, options.learn_scales)
        else:
            new = _quantized(module, name, first_last, options)
        replace_submodule(model, name, new)
    return model


def _sites(graph: Graph, first_last: set[str], options: QuantizeOptions) -> list[Site]:
    def bits_of(node: fx.Node) -> int:
        module = module_of(node, graph.modules)
        if type(module) in (nn.Conv2d, nn.Linear, Add):
            return _bits_for(node.target, first_last, options).a
        if graph.kinds[node] == "pool":  # feeds the head
            return options.first_last_bits or options.bits.a
        return options.bits.a

    if options.target is Target.TENSORRT:
        return tensorrt_sites(graph, bits_of, options.residual_add_inputs)
    return onnxruntime_sites(graph, bits_of)


def _realize(model: nn.Module, graph: Graph, sites: list[Site], options: QuantizeOptions) -> None:
    """Give every site its group's quantizer: as the input quantizer of a quantized layer, in a
    QuantAdd or QuantAvgPool put in place of the zoo's Add or a global pool, or inserted into the
    forward that calls the op."""
    shared: dict[object, LSQQuantizer] = {}
    by_node: dict[fx.Node, dict[int, LSQQuantizer]] = defaultdict(dict)
    for site in sites:
        if site.group not in shared:
            shared[site.group] = _activation_quantizer(site.bits, options)
            shared[site.group].upper_bound = upper_bound(graph, site)
        by_node[site.node][site.index] = shared[site.group]
    edits: dict[fx.Node, Edit] = {}
    for node, quantizers in by_node.items():
        module = model.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, (QuantConv2d, QuantLinear)):
            module.input_quantizer = quantizers[0]
        elif type(module) is Add:
            replace_submodule(model, node.target, _quant_add(quantizers, options))
        elif graph.kinds[node] == "pool":
            pool = _quant_pool(module or nn.AdaptiveAvgPool2d(1), quantizers, options)
            if module is None:
                edits[node] = Edit(replacement=pool)
            else:
                replace_submodule(model, node.target, pool)
        else:
            edits[node] = Edit(inputs=quantizers)
    rewrite_owners(model, graph.graph, edits)


def upper_bound(graph: Graph, site: Site) -> float | None:
    """The largest value the tensor quantized at ``site`` can take, where the graph says: 6 for
    a ReLU6's output (a module or ``F.relu6``)."""
    if site.index == OUTPUT:
        return None
    tensor = node_inputs(site.node)[site.index]
    if tensor.op == "call_module" and type(graph.modules.get(tensor.target)) is nn.ReLU6:
        return RELU6_MAX
    if tensor.op == "call_function" and tensor.target is F.relu6:
        return RELU6_MAX
    return None


def _activation_quantizer(bits: int, options: QuantizeOptions) -> LSQQuantizer:
    return LSQQuantizer(bits, "activation", target=options.target, learn_scale=options.learn_scales)


def _quant_add(quantizers: dict[int, LSQQuantizer], options: QuantizeOptions) -> QuantAdd:
    bits = next(iter(quantizers.values())).bits
    add = QuantAdd(bits, options.target, options.learn_scales, (0 in quantizers, 1 in quantizers))
    add.quantizer_a, add.quantizer_b = quantizers.get(0), quantizers.get(1)
    return add


def _quant_pool(
    pool: nn.Module, quantizers: dict[int, LSQQuantizer], options: QuantizeOptions
) -> QuantAvgPool:
    quant = QuantAvgPool(pool, quantizers[0].bits, options.target, options.learn_scales)
    quant.input_quantizer = quantizers[0]
    quant.output_quantizer = quantizers.get(OUTPUT)
    return quant


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


def _quantized(
    module: nn.Module, name: str, first_last: set[str], options: QuantizeOptions
) -> nn.Module:
    bits = _bits_for(name, first_last, options)
    if type(module) is nn.Conv2d:
        return QuantConv2d.from_float(module, bits.w, bits.a, options.target, options.learn_scales)
    return QuantLinear.from_float(module, bits.w, bits.a, options.target, options.learn_scales)
