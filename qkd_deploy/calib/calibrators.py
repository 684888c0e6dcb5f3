"""Calibrators: from observed values to the clipping range ``amax`` of a quantizer.

Each takes ``values`` shaped ``(channels, n)`` (one row per step size) and the integer grid, and
returns ``amax`` per row. Looked up by name in ``CALIBRATORS``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qkd_deploy.errors import UserError
from qkd_deploy.quant.grid import Grid
from qkd_deploy.quant.quantizer import fake_quantize

Calibrator = Callable[[torch.Tensor, Grid], torch.Tensor]


def max_calibrator(values: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The largest magnitude: no clipping, coarse steps when there are outliers."""
    return values.abs().amax(dim=1)


def percentile_calibrator(
    values: torch.Tensor, grid: Grid, percentile: float = 99.99
) -> torch.Tensor:
    """The given percentile of magnitudes: clips rare outliers."""
    k = max(1, min(values.shape[1], round(values.shape[1] * percentile / 100.0)))
    return values.abs().kthvalue(k, dim=1).values


def mse_calibrator(values: torch.Tensor, grid: Grid, candidates: int = 100) -> torch.Tensor:
    """The clipping range that minimises the mean squared quantization error, among ``candidates``
    geometrically spaced fractions (0.001 .. 1) of the maximum: good for low bit-widths, where
    an outlier would otherwise stretch the grid over nothing."""
    amax = values.abs().amax(dim=1).clamp_min(1e-8)
    best_err = torch.full_like(amax, float("inf"))
    best = amax.clone()
    for fraction in torch.logspace(-3, 0, candidates):
        trial = amax * fraction
        scale = trial / grid.qmax
        err = (fake_quantize(values, scale, grid, axis=0) - values).pow(2).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, trial, best)
    return best


CALIBRATORS: dict[str, Calibrator] = {
    "max": max_calibrator,
    "percentile": percentile_calibrator,
    "mse": mse_calibrator,
}


def get_calibrator(name: str, percentile: float = 99.99) -> Calibrator:
    if name not in CALIBRATORS:
        raise UserError(f"unknown calibrator {name!r}; choose one of {', '.join(CALIBRATORS)}")
    if name == "percentile":
        return lambda values, grid: percentile_calibrator(values, grid, percentile)
    return CALIBRATORS[name]
