"""Per-layer precision beyond bit-widths: ``quant.layer_bits`` entries whose value is ``float``
leave those layers unquantized (no Q/DQ: they run as the graph gives them, in FP32, in ONNX
Runtime and in a strongly typed TensorRT engine).

``quantize_model`` knows bit-widths only, so ``quantize`` quantizes with the other entries and
then puts the float model's own module back wherever a ``float`` pattern names a layer that
quantization replaced. A ``float`` pattern wins over a bit-width pattern matching the same layer.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field

from torch import nn

from qkd_deploy.errors import UserError
from qkd_deploy.quant.convert import QuantizeOptions, quantize_model
from qkd_deploy.quant.modules import replace_submodule

FLOAT = "float"


def is_float(value: str) -> bool:
    return str(value).strip().lower() == FLOAT


def split_layer_bits(layer_bits: dict[str, str]) -> tuple[dict[str, str], tuple[str, ...]]:
    """``layer_bits`` as (bit-width entries, patterns of float layers)."""
    widths = {p: v for p, v in layer_bits.items() if not is_float(v)}
    return widths, tuple(p for p, v in layer_bits.items() if is_float(v))


@dataclass
class PrecisionOptions(QuantizeOptions):
    """``QuantizeOptions`` plus the patterns of layers left in float (see ``quantize``)."""

    float_layers: tuple[str, ...] = field(default=(), kw_only=True)


def quantize(model: nn.Module, options: QuantizeOptions) -> nn.Module:
    """``quantize_model``, then the layers of ``options.float_layers`` back in float."""
    quantized = quantize_model(model, options)
    patterns = getattr(options, "float_layers", ())
    if patterns:
        keep_float(quantized, model, patterns)
    return quantized


def replaced_layers(quantized: nn.Module, original: nn.Module) -> list[str]:
    """Names of the modules of ``original`` that quantization replaced in ``quantized`` (the
    layers ``quant.layer_bits`` can address)."""
    before = dict(original.named_modules())
    return [
        name
        for name, module in quantized.named_modules()
        if name in before and type(before[name]) is not type(module)
    ]


def keep_float(quantized: nn.Module, original: nn.Module, patterns: tuple[str, ...]) -> None:
    """Put ``original``'s module back (a copy) at every replaced layer a pattern matches."""
    layers = replaced_layers(quantized, original)
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in layers)]
    if unmatched:
        raise UserError(
            f"quant.layer_bits {unmatched}: float, but they match no quantized layer; the "
            f"quantized layers are named like {layers[:3]} (fnmatch patterns of module names)"
        )
    for name in layers:
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            replace_submodule(quantized, name, copy.deepcopy(original.get_submodule(name)))
