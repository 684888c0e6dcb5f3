"""Mixed precision under a budget: which layers to keep at higher precision, chosen from their
measured sensitivity (``quant.sensitivity``) before QAT.

A budget (``quant.budget``) is one of
- ``drop:POINTS``: the smallest set of raised layers (most gain first) whose model, calibrated
  but not trained, is within POINTS accuracy points of the float model on held-out images;
- ``size_kb:KB``: raise layers by gain per extra weight byte while the weights fit in KB
  (weights at their bits; a float layer counts 16 bits for ``tensorrt``, which runs it in FP16,
  and 32 for ``onnxruntime``);
- ``share:FRACTION``: the FRACTION of the selectable layers with the largest gain (rounded down).

What "higher precision" is depends on the bits: a low-bit (research) model raises layers on the
2/4/8-bit grid (``w4a4``, ``w8a8``); a W8A8 model leaves them in ``float`` (no Q/DQ), for both
targets. Linear layers of a ``tensorrt`` W8A8 model under a size budget may also drop to INT4
weights (``w4a8``) when that saves what the budget needs. Gains are KL reductions against the
float model's outputs (finer than accuracy on a few hundred images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qkd_deploy.bits import BitWidths
from qkd_deploy.config import Budget
from qkd_deploy.errors import UserError

if TYPE_CHECKING:  # the chooser works on torch models
    from qkd_deploy.quant.sensitivity import Evaluator, MixedPrecisionModel, Sensitivity


@dataclass
class Choice:
    layer_bits: dict[str, str]  # layer -> precision, for quant.layer_bits
    predicted: dict  # the mixed model's held-out score before training, and its weight size
    met: bool  # False when even every candidate layer raised misses a drop budget

    def to_dict(self) -> dict:
        return {"layer_bits": self.layer_bits, "predicted": self.predicted, "met": self.met}


FLOAT_WEIGHT_BITS = {"tensorrt": 16, "onnxruntime": 32}


def _max_bits(precision: str) -> int:
    return 32 if precision == "float" else max(vars(BitWidths.parse(precision)).values())


def candidates(table: Sensitivity, mixed: MixedPrecisionModel) -> dict[str, dict[str, float]]:
    """Selectable layer -> {higher precision: gain}: the twins' precisions above the layer's own
    bits (a low-bit model), else float; gain = the quantized model's KL minus the KL with this
    layer raised, every other layer quantized."""
    layers = mixed.layers
    options: dict[str, dict[str, float]] = {}
    for row in table.layers:
        if not row.selectable:
            continue
        own = max(q.bits for _, q in layers[row.layer])
        raised = {p: s for p, s in row.raised.items() if _max_bits(p) > own}
        if not row.raised:
            raised = {"float": row.float}
        if not raised:  # already at the highest precision of the grid
            continue
        options[row.layer] = {p: table.quantized.kl - s.kl for p, s in raised.items()}
    return options


def weight_kb(mixed: MixedPrecisionModel, precisions: dict[str, str], target: str) -> float:
    """Kilobytes of the weights of every quantized layer, at its bits or ``precisions``'."""
    total_bits = 0
    for name, quantizers in mixed.layers.items():
        weights = [q for _, q in quantizers if q.kind == "weight"]
        if not weights:
            continue
        precision = precisions.get(name)
        if precision == "float":
            bits = FLOAT_WEIGHT_BITS[target]
        elif precision is not None:
            bits = BitWidths.parse(precision).w
        else:
            bits = weights[0].bits
        total_bits += mixed.model.get_submodule(name).weight.numel() * bits
    return total_bits / 8 / 1024


def choose(
    budget: Budget,
    table: Sensitivity,
    mixed: MixedPrecisionModel,
    evaluator: Evaluator,
    target: str,
) -> Choice:
    """The layers to raise, and to which precision, within ``budget``."""
    options = candidates(table, mixed)
    best = {
        layer: max(gains.items(), key=lambda item: item[1])
        for layer, gains in options.items()
        if max(gains.values()) > 0
    }
    ranked = sorted(best, key=lambda layer: -best[layer][1])
    met = True
    if budget.kind == "share":
        count = math.floor(budget.value * len(options) + 1e-9)
        chosen = {layer: best[layer][0] for layer in ranked[:count]}
    elif budget.kind == "drop":
        chosen, met = _within_drop(budget.value, ranked, best, mixed, evaluator, table)
    else:
        chosen = _within_size(budget.value, options, mixed, target)
    with mixed.variant(chosen):
        score = evaluator.score(mixed.model)
    predicted = {
        "accuracy": round(score.accuracy, 6),
        "kl": round(score.kl, 6),
        "float_accuracy": round(table.float_model.accuracy, 6),
        "weight_kb": round(weight_kb(mixed, chosen, target), 3),
        "selectable_layers": len(options),
    }
    return Choice(chosen, predicted, met)


def _within_drop(
    points: float,
    ranked: list[str],
    best: dict[str, tuple[str, float]],
    mixed: MixedPrecisionModel,
    evaluator: Evaluator,
    table: Sensitivity,
) -> tuple[dict[str, str], bool]:
    """The shortest prefix of ``ranked`` whose mixed model is within ``points`` of float."""
    floor = table.float_model.accuracy - points / 100
    chosen: dict[str, str] = {}
    for layer in [None, *ranked]:
        if layer is not None:
            chosen[layer] = best[layer][0]
        with mixed.variant(chosen):
            if evaluator.score(mixed.model).accuracy >= floor - 1e-9:
                return dict(chosen), True
    return chosen, False


def _within_size(
    kb: float, options: dict[str, dict[str, float]], mixed: MixedPrecisionModel, target: str
) -> dict[str, str]:
    """Raise layers by gain per extra byte while the weights fit in ``kb``."""
    base = weight_kb(mixed, {}, target)
    if base > kb + 1e-9:
        raise UserError(
            f"quant.budget size_kb:{kb:g} is below the weights of the model at its own bits "
            f"({base:.1f} KB); give a larger size"
        )
    offers = []
    for layer, gains in options.items():
        for precision, gain in gains.items():
            if gain > 0:
                extra = weight_kb(mixed, {layer: precision}, target) - base
                offers.append((gain / extra if extra > 0 else math.inf, gain, layer, precision))
    chosen: dict[str, str] = {}
    for _, _, layer, precision in sorted(offers, reverse=True):
        if layer not in chosen and weight_kb(mixed, {**chosen, layer: precision}, target) <= kb:
            chosen[layer] = precision
    return chosen
