"""Mixed precision under a budget: which layers to keep at higher precision, chosen from their
measured sensitivity (``quant.sensitivity``) before QAT.

A budget (``quant.budget``) is one of
- ``drop:POINTS``: the smallest set of raised layers (most gain first) whose model, as measured
  (after the probe, or calibrated only), is within POINTS accuracy points of the float model
  on held-out images;
- ``size_kb:KB``: raise layers by gain per extra weight byte while the weights fit in KB
  (weights at their bits, a float layer's at 32: the graph keeps them in FP32, and so does a
  strongly typed TensorRT engine);
- ``share:FRACTION``: the FRACTION of the selectable layers with the largest gain (rounded down).

What "higher precision" is depends on the bits: a low-bit (research) model raises layers on the
2/4/8-bit grid (``w4a4``, ``w8a8``); a W8A8 model leaves them in ``float`` (no Q/DQ), for both
targets. The budgets that count layers (``share``, ``drop``) raise each chosen layer to the
highest precision on offer; a size budget weighs each precision's gain against its bytes. Linear
layers of a ``tensorrt`` W8A8 model under a size budget may also drop to INT4 weights (``w4a8``)
when that saves what the budget needs.

A layer's gain is read from its sensitivity (``quant.sensitivity``), by how it was measured:
- without training (the pipeline's default, ``quant.budget_probe_epochs=0``): the damage the
  layer does alone at its own bits minus the damage alone at the higher precision (zero for
  float). Measured on an intact model: at low bits the untrained model with every layer
  quantized is near chance, where raising any one layer changes the outputs by noise;
- after a short QAT probe (``budget_probe_epochs`` > 0): the KL divergence from the float
  model's outputs of the briefly trained model with every layer quantized, minus the same with
  this one layer raised (its trained weights re-calibrated at the higher precision): the damage
  QAT has not recovered, in the context of the other layers.
In the mixed precision benchmark the untrained choice picked the best layer where one layer's
effect exceeded the run-to-run spread (resnet8 W2A2, 10 000 images); at a short training budget
neither chooser was reliably better.
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


FLOAT_WEIGHT_BITS = 32


def _max_bits(precision: str) -> int:
    return 32 if precision == "float" else max(vars(BitWidths.parse(precision)).values())


def candidates(table: Sensitivity, mixed: MixedPrecisionModel) -> dict[str, dict[str, float]]:
    """Selectable layer -> {higher precision: gain}: the twins' precisions above the layer's own
    bits (a low-bit model), else float; the gain as the module docstring says."""
    layers = mixed.layers
    inside = table.trained_epochs > 0
    options: dict[str, dict[str, float]] = {}
    for row in table.layers:
        if not row.selectable:
            continue
        own = max(q.bits for _, q in layers[row.layer])
        raised = row.raised if inside else row.alone_raised
        if raised:
            left = {p: s.kl for p, s in raised.items() if _max_bits(p) > own}
        elif inside:
            left = {"float": row.float.kl}
        else:
            left = {"float": 0.0}  # only this layer quantized, it left in float: the float model
        damage = table.quantized.kl if inside else row.alone.kl
        if left:  # else already at the highest precision of the grid
            options[row.layer] = {p: damage - kl for p, kl in left.items()}
    return options


def top_precision(gains: dict[str, float]) -> str:
    """The highest of a layer's higher precisions."""
    return max(gains, key=_max_bits)


def weight_kb(mixed: MixedPrecisionModel, precisions: dict[str, str]) -> float:
    """Kilobytes of the weights of every quantized layer, at its bits or ``precisions``'."""
    total_bits = 0
    for name, quantizers in mixed.layers.items():
        weights = [q for _, q in quantizers if q.kind == "weight"]
        if not weights:
            continue
        precision = precisions.get(name)
        if precision == "float":
            bits = FLOAT_WEIGHT_BITS
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
) -> Choice:
    """The layers to raise, and to which precision, within ``budget``."""
    options = candidates(table, mixed)
    top = {layer: top_precision(gains) for layer, gains in options.items()}
    ranked = sorted(
        (layer for layer in options if options[layer][top[layer]] > 0),
        key=lambda layer: -options[layer][top[layer]],
    )
    met = True
    if budget.kind == "share":
        count = math.floor(budget.value * len(options) + 1e-9)
        chosen = {layer: top[layer] for layer in ranked[:count]}
    elif budget.kind == "drop":
        chosen, met = _within_drop(budget.value, ranked, top, mixed, evaluator, table)
    else:
        chosen = _within_size(budget.value, options, mixed)
    with mixed.variant(chosen):
        score = evaluator.score(mixed.model)
    predicted = {
        "accuracy": round(score.accuracy, 6),
        "kl": round(score.kl, 6),
        "float_accuracy": round(table.float_model.accuracy, 6),
        "weight_kb": round(weight_kb(mixed, chosen), 3),
        "selectable_layers": len(options),
    }
    return Choice(chosen, predicted, met)


def _within_drop(
    points: float,
    ranked: list[str],
    top: dict[str, str],
    mixed: MixedPrecisionModel,
    evaluator: Evaluator,
    table: Sensitivity,
) -> tuple[dict[str, str], bool]:
    """The shortest prefix of ``ranked`` whose mixed model is within ``points`` of float."""
    floor = table.float_model.accuracy - points / 100
    chosen: dict[str, str] = {}
    for layer in [None, *ranked]:
        if layer is not None:
            chosen[layer] = top[layer]
        with mixed.variant(chosen):
            if evaluator.score(mixed.model).accuracy >= floor - 1e-9:
                return dict(chosen), True
    return chosen, False


def _within_size(
    kb: float, options: dict[str, dict[str, float]], mixed: MixedPrecisionModel
) -> dict[str, str]:
    """Raise layers by gain per extra byte while the weights fit in ``kb``."""
    base = weight_kb(mixed, {})
    if base > kb + 1e-9:
        raise UserError(
            f"quant.budget size_kb:{kb:g} is below the weights of the model at its own bits "
            f"({base:.1f} KB); give a larger size"
        )
    offers = []
    for layer, gains in options.items():
        for precision, gain in gains.items():
            if gain > 0:
                extra = weight_kb(mixed, {layer: precision}) - base
                offers.append((gain / extra if extra > 0 else math.inf, gain, layer, precision))
    chosen: dict[str, str] = {}
    for _, _, layer, precision in sorted(offers, reverse=True):
        if layer not in chosen and weight_kb(mixed, {**chosen, layer: precision}) <= kb:
            chosen[layer] = precision
    return chosen
