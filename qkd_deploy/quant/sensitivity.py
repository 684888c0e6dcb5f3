"""Per-layer quantization sensitivity: of a float model quantized and calibrated (no training),
or of a briefly trained quantized model (the budget's probe).

A *layer* is a module that holds quantizers (a quantized conv or linear layer with its input and
weight quantizers, a residual add with its input quantizers, a pool, or whatever else the
placement quantizes), so the measurement follows the placement without knowing it. On held-out
images the float model's outputs are the reference; for every layer:

- ``alone``: only this layer quantized, every other quantizer off: the damage it does;
- ``float``: every layer quantized but this one: what leaving it unquantized gains;
- ``raised[p]``: every layer quantized, this one at precision ``p`` (e.g. ``w8a8``, its
  quantizers calibrated in a copy of the model quantized at ``p``): what raising it gains;
- ``alone_raised[p]``: only this layer quantized, at ``p``: the damage left when it is raised.

Each is a *column*; ``measure`` takes the columns it is asked for (a large model's table costs
an evaluation per layer and column). Untrained, the budget chooser reads ``alone`` and
``alone_raised``; after a probe of QAT, ``raised`` (``float`` above a W8A8 model), inside the
trained model.

Each is the accuracy and the mean KL divergence of the model's softmax from the float model's.
A quantizer is switched off through its ``calibrated`` flag (an uncalibrated quantizer passes
values through) and moved to another precision through its ``bits`` and step size.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from qkd_deploy.bits import BitWidths
from qkd_deploy.errors import UserError
from qkd_deploy.quant.convert import QuantizeOptions
from qkd_deploy.quant.precision import quantize, replaced_layers
from qkd_deploy.quant.quantizer import LSQQuantizer

Calibrate = Callable[[nn.Module, list[torch.Tensor]], None]
EVAL_BATCH = 256
COLUMNS = frozenset({"alone", "float", "raised", "alone_raised"})


@dataclass(frozen=True)
class Score:
    accuracy: float  # fraction of the held-out images
    kl: float  # mean KL(float model || this model) of the softmax outputs, nats

    def to_dict(self) -> dict:
        return {"accuracy": round(self.accuracy, 6), "kl": round(self.kl, 6)}


@dataclass
class LayerSensitivity:
    layer: str
    quantizers: list[str]
    selectable: bool  # a module quant.layer_bits can name
    alone: Score | None  # None where that column was not measured
    float: Score | None
    raised: dict[str, Score] = field(default_factory=dict)
    alone_raised: dict[str, Score] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "quantizers": self.quantizers,
            "selectable": self.selectable,
            "alone": self.alone.to_dict() if self.alone else None,
            "float": self.float.to_dict() if self.float else None,
            "raised": {p: s.to_dict() for p, s in self.raised.items()},
            "alone_raised": {p: s.to_dict() for p, s in self.alone_raised.items()},
        }


@dataclass
class Sensitivity:
    bits: str
    images: int
    float_model: Score
    quantized: Score
    layers: list[LayerSensitivity]  # most damaging first (``damage_first``)
    trained_epochs: int = 0  # QAT epochs the quantized model had (0: calibrated only)

    def to_dict(self) -> dict:
        return {
            "bits": self.bits,
            "images": self.images,
            "trained_epochs": self.trained_epochs,
            "float_model": self.float_model.to_dict(),
            "quantized": self.quantized.to_dict(),
            "layers": [layer.to_dict() for layer in self.layers],
        }


def layer_quantizers(model: nn.Module) -> dict[str, list[tuple[str, LSQQuantizer]]]:
    """Each module holding quantizers -> its quantizers (a shared one under every holder)."""
    layers: dict[str, list[tuple[str, LSQQuantizer]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, LSQQuantizer):
            layers.setdefault(name.rpartition(".")[0], []).append((name, module))
    return layers


@contextmanager
def restored(quantizers: list[LSQQuantizer]) -> Iterator[None]:
    """Whatever is done to ``quantizers`` inside is undone on exit (bits, step, flags)."""
    saved = [
        (q, q.bits, q.scale.detach().clone(), q.calibrated.clone(), q.non_negative.clone())
        for q in quantizers
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for q, bits, scale, calibrated, non_negative in saved:
                q.bits = bits
                q.scale.copy_(scale)
                q.calibrated.copy_(calibrated)
                q.non_negative.copy_(non_negative)


def switch_off(quantizers: list[LSQQuantizer]) -> None:
    for q in quantizers:
        q.calibrated.fill_(False)


@torch.no_grad()
def take_precision(quantizers: list[tuple[str, LSQQuantizer]], twin: nn.Module) -> None:
    """Give each quantizer the bits, step size and grid of its namesake in ``twin``."""
    modules = dict(twin.named_modules(remove_duplicate=False))
    for name, q in quantizers:
        other = modules[name]
        q.bits = other.bits
        q.scale.copy_(other.scale)
        q.non_negative.copy_(other.non_negative)
        q.calibrated.copy_(other.calibrated)


class Evaluator:
    """The float model's outputs on held-out images, and scores of quantized variants."""

    def __init__(self, float_model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels
        self.reference = F.log_softmax(self.logits(float_model), dim=1)

    @torch.no_grad()
    def logits(self, model: nn.Module) -> torch.Tensor:
        model.eval()
        return torch.cat([model(b) for b in self.images.split(EVAL_BATCH)])

    def score(self, model: nn.Module) -> Score:
        logits = self.logits(model)
        log_p = F.log_softmax(logits, dim=1)
        kl = F.kl_div(log_p, self.reference, log_target=True, reduction="batchmean").item()
        accuracy = (logits.argmax(1) == self.labels).float().mean().item()
        return Score(accuracy, max(kl, 0.0))


@dataclass
class MixedPrecisionModel:
    """A calibrated fake-quant model plus calibrated twins at other precisions, so any layer can
    be measured in float or at a twin's precision without re-quantizing."""

    model: nn.Module
    twins: dict[str, nn.Module]
    selectable: set[str]

    @classmethod
    def build(
        cls,
        float_model: nn.Module,
        options: QuantizeOptions,
        raise_to: list[str],
        calibration: list[torch.Tensor],
        calibrate: Calibrate,
    ) -> MixedPrecisionModel:
        def calibrated(opts: QuantizeOptions) -> nn.Module:
            model = quantize(float_model, opts).eval()
            calibrate(model, calibration)
            return model

        model = calibrated(options)
        twins = {
            p: calibrated(dataclasses.replace(options, bits=BitWidths.parse(p))) for p in raise_to
        }
        return cls(model, twins, set(replaced_layers(model, float_model)))

    @classmethod
    def from_trained(
        cls,
        trained: nn.Module,
        float_model: nn.Module,
        raise_to: list[str],
        calibration: list[torch.Tensor],
        calibrate: Calibrate,
    ) -> MixedPrecisionModel:
        """A trained fake-quant model (from ``float_model``) with twins of its trained weights
        calibrated at the ``raise_to`` precisions."""

        def twin(precision: BitWidths) -> nn.Module:
            model = copy.deepcopy(trained).eval()
            for q in {id(q): q for qs in layer_quantizers(model).values() for _, q in qs}.values():
                q.bits = precision.w if q.kind == "weight" else precision.a
            calibrate(model, calibration)
            return model

        twins = {p: twin(BitWidths.parse(p)) for p in raise_to}
        return cls(trained.eval(), twins, set(replaced_layers(trained, float_model)))

    @property
    def layers(self) -> dict[str, list[tuple[str, LSQQuantizer]]]:
        return layer_quantizers(self.model)

    def all_quantizers(self) -> list[LSQQuantizer]:
        return list({id(q): q for qs in self.layers.values() for _, q in qs}.values())

    @contextmanager
    def variant(self, precisions: dict[str, str], only: set[str] | None = None) -> Iterator[None]:
        """The model with ``precisions`` (layer -> ``float`` or a twin's name) applied and, when
        ``only`` is given, every layer outside it switched off."""
        layers = self.layers
        with restored(self.all_quantizers()):
            if only is not None:
                switch_off([q for name, qs in layers.items() if name not in only for _, q in qs])
            for name, precision in precisions.items():
                if precision == "float":
                    switch_off([q for _, q in layers[name]])
                else:
                    take_precision(layers[name], self.twins[precision])
            yield


def measure(
    mixed: MixedPrecisionModel,
    evaluator: Evaluator,
    bits: str,
    float_model: nn.Module,
    columns: frozenset[str] = COLUMNS,
    trained_epochs: int = 0,
) -> Sensitivity:
    """The ``columns`` (see the module docstring) of every layer, most damaging first."""
    unknown = columns - COLUMNS
    if unknown:
        raise ValueError(f"unknown sensitivity columns {sorted(unknown)}")
    quantized = evaluator.score(mixed.model)

    def score(precisions: dict[str, str], only: set[str] | None = None) -> Score:
        with mixed.variant(precisions, only):
            return evaluator.score(mixed.model)

    twins = list(mixed.twins)
    rows = []
    for name, quantizers in mixed.layers.items():
        rows.append(
            LayerSensitivity(
                name,
                [q for q, _ in quantizers],
                name in mixed.selectable,
                score({}, only={name}) if "alone" in columns else None,
                score({name: "float"}) if "float" in columns else None,
                {p: score({name: p}) for p in twins} if "raised" in columns else {},
                {p: score({name: p}, {name}) for p in twins} if "alone_raised" in columns else {},
            )
        )
    rows.sort(key=damage_first)
    return Sensitivity(
        bits, len(evaluator.labels), evaluator.score(float_model), quantized, rows, trained_epochs
    )


def damage_first(row: LayerSensitivity) -> tuple[float, float]:
    """Sort key: the damage a layer does alone, else (measured inside the model only) the KL
    left with it at its best measured precision, the lowest first: the most to gain."""
    if row.alone is not None:
        return (-row.alone.kl, row.alone.accuracy)
    inside = [*row.raised.values(), *([row.float] if row.float else [])]
    best = min(inside, key=lambda s: s.kl, default=Score(0.0, 0.0))
    return (best.kl, -best.accuracy)


def _cell(score: Score | None, field: str) -> str:
    if score is None:
        return "-"
    return f"{100 * score.accuracy:.2f}" if field == "accuracy" else f"{score.kl:.4f}"


def markdown(table: Sensitivity) -> str:
    """The table as Markdown: accuracy in %, KL in nats; ``-`` where a column was not measured."""
    twins = sorted({p for row in table.layers for p in [*row.raised, *row.alone_raised]})
    columns = [
        ("alone acc %", lambda r: _cell(r.alone, "accuracy")),
        ("alone KL", lambda r: _cell(r.alone, "kl")),
        ("float: acc %", lambda r: _cell(r.float, "accuracy")),
        ("float: KL", lambda r: _cell(r.float, "kl")),
    ]
    for p in twins:
        columns += [
            (f"{p}: acc %", lambda r, p=p: _cell(r.raised.get(p), "accuracy")),
            (f"{p}: KL", lambda r, p=p: _cell(r.raised.get(p), "kl")),
            (f"alone {p} KL", lambda r, p=p: _cell(r.alone_raised.get(p), "kl")),
        ]
    trained = (
        f"after {table.trained_epochs} epoch(s) of QAT" if table.trained_epochs else "no training"
    )
    head = ["layer", *(title for title, _ in columns)]
    lines = [
        f"Sensitivity at {table.bits} on {table.images} held-out training images ({trained}). "
        f"Float model {100 * table.float_model.accuracy:.2f} %, every layer quantized "
        f"{100 * table.quantized.accuracy:.2f} % (KL {table.quantized.kl:.4f}).",
        "",
        "`alone`: only this layer quantized; `float`: every layer but this one quantized; "
        "`wXaY`: every layer quantized, this one at wXaY; `alone wXaY`: only this layer "
        "quantized, at wXaY. Most damaging first; * = not selectable by quant.layer_bits.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + " --- |" * len(head),
    ]
    for row in table.layers:
        cells = [row.layer + ("" if row.selectable else " *")]
        cells += [cell(row) for _, cell in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def raise_targets(bits: BitWidths) -> list[str]:
    """The precisions a layer of a ``bits`` model may be raised to besides float: the research
    grid's 4 and 8 bits above a low-bit model; none above W8A8 (there only float is higher)."""
    return [p for p in ("w4a4", "w8a8") if BitWidths.parse(p).w > min(bits.w, bits.a)]


def held_out_split(
    images: torch.Tensor, labels: torch.Tensor, calibration: int, evaluation: int, seed: int
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Disjoint calibration batches and evaluation images (with labels), drawn at random from
    the preprocessed training images; the test split is never used to choose precisions."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cal = order[:calibration]
    held = order[calibration : calibration + evaluation]
    if len(held) == 0:
        raise UserError(
            f"the training split has {len(labels)} images, all used for calibration "
            f"(data.calibration_size={calibration}); sensitivity needs images held out from it"
        )
    return list(images[cal].split(EVAL_BATCH)), images[held], labels[held]


def sensitivity_of(
    float_model: nn.Module,
    options: QuantizeOptions,
    images: torch.Tensor,
    labels: torch.Tensor,
    calibrate: Calibrate,
    calibration_size: int,
    evaluation_size: int,
    seed: int,
    columns: frozenset[str] = COLUMNS,
    raise_to: list[str] | None = None,
    trained: tuple[nn.Module, int] | None = None,
) -> tuple[Sensitivity, MixedPrecisionModel, Evaluator]:
    """``measure`` on a split of ``images`` (preprocessed training images) of ``float_model``
    quantized with ``options``, or of ``trained`` (the quantized model and its QAT epochs); the
    twins are at ``raise_to`` (default: ``raise_targets``). Also returns the mixed model and
    evaluator, for a chooser that measures combinations."""
    calibration, held, held_labels = held_out_split(
        images, labels, calibration_size, evaluation_size, seed
    )
    float_model = float_model.eval()
    twins = raise_targets(options.bits) if raise_to is None else raise_to
    if trained is None:
        mixed = MixedPrecisionModel.build(float_model, options, twins, calibration, calibrate)
        epochs = 0
    else:
        model, epochs = trained
        mixed = MixedPrecisionModel.from_trained(model, float_model, twins, calibration, calibrate)
    evaluator = Evaluator(float_model, held, held_labels)
    table = measure(mixed, evaluator, options.bits.name, float_model, columns, epochs)
    return table, mixed, evaluator
