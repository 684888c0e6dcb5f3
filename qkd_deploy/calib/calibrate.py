"""Post-training calibration of a fake-quant model: sets every quantizer's initial step size."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from qkd_deploy.calib.calibrators import get_calibrator
from qkd_deploy.errors import UserError
from qkd_deploy.quant.modules import QuantConv2d, QuantLinear, quantizers


class Observer:
    """Keeps a random sample of a tensor stream plus its exact minimum and maximum: at most
    ``max_samples`` values of each batch, then of them all. Each batch weighs by the values it
    kept, so the sample is uniform over batches of equal size (the pipeline's calibration set
    is ``calibration_size`` images in batches of 256: uniform when that is a multiple of 256);
    a short last batch of large activations weighs more than its share."""

    def __init__(self, max_samples: int = 1 << 18, seed: int = 0) -> None:
        self.max_samples = max_samples
        self.generator = torch.Generator().manual_seed(seed)
        self.samples: list[torch.Tensor] = []
        self.min = float("inf")
        self.max = float("-inf")

    def observe(self, x: torch.Tensor) -> None:
        flat = x.detach().float().flatten().cpu()  # statistics on the CPU, whatever trains where
        self.min = min(self.min, flat.min().item())
        self.max = max(self.max, flat.max().item())
        if flat.numel() > self.max_samples:
            flat = flat[torch.randint(flat.numel(), (self.max_samples,), generator=self.generator)]
        self.samples.append(flat)

    @property
    def seen(self) -> bool:
        return bool(self.samples)

    def values(self) -> torch.Tensor:
        """The sample as one row, including the exact extremes (so "max" is exact)."""
        sample = torch.cat(self.samples)
        if sample.numel() > self.max_samples:
            sample = sample[
                torch.randperm(sample.numel(), generator=self.generator)[: self.max_samples]
            ]
        return torch.cat([sample, torch.tensor([self.min, self.max])]).unsqueeze(0)


def calibrate_weights(model: nn.Module, method: str = "mse", percentile: float = 99.99) -> None:
    """Per-output-channel ranges of every quantized layer's weights (no data needed)."""
    if method == "entropy":
        raise UserError(
            "quant.weight_calibrator=entropy: entropy calibration is for activations (a "
            "histogram of a whole tensor); calibrate weights with mse, max or percentile"
        )
    calibrator = get_calibrator(method, percentile)
    for module in model.modules():
        if isinstance(module, (QuantConv2d, QuantLinear)):
            q = module.weight_quantizer
            values = module.weight.detach().reshape(module.weight.shape[0], -1)
            q.set_range(calibrator(values, q.grid_for(q.bits)))


@torch.no_grad()
def calibrate_activations(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    method: str = "percentile",
    percentile: float = 99.99,
    seed: int = 0,
) -> None:
    """Runs ``batches`` through the float-activation model and sets each activation quantizer's
    range; an activation that never went negative gets the non-negative (unsigned) grid."""
    calibrator = get_calibrator(method, percentile)
    activation_quantizers = [q for _, q in quantizers(model) if q.kind == "activation"]
    for i, q in enumerate(activation_quantizers):
        q.observer = Observer(seed=seed + i)
    was_training = model.training
    model.eval()
    try:
        seen_any = False
        for images in batches:
            model(images)
            seen_any = True
        if not seen_any:
            raise UserError("calibration got no batches; give a non-empty calibration set")
    finally:
        observers = [q.observer for q in activation_quantizers]
        for q in activation_quantizers:
            q.observer = None
        model.train(was_training)
    for q, observer in zip(activation_quantizers, observers, strict=True):
        if observer.seen:
            non_negative = observer.min >= 0.0
            q.non_negative.fill_(non_negative)
            q.set_range(calibrator(observer.values(), q.grid), non_negative)


def calibrate(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    weight_method: str = "mse",
    activation_method: str = "percentile",
    percentile: float = 99.99,
) -> None:
    """Weights from their values, then activations from ``batches``, observed with the weights
    already quantized, as QAT will see them."""
    calibrate_weights(model, weight_method, percentile)
    calibrate_activations(model, batches, activation_method, percentile)
