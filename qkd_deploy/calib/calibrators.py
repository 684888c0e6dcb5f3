"""Calibrators: from observed values to the clipping range ``amax`` of a quantizer.

Each takes ``values`` shaped ``(channels, n)`` (one row per step size) and the integer grid, and
returns ``amax`` per row. Looked up by name in ``CALIBRATORS``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
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


def entropy_calibrator(values: torch.Tensor, grid: Grid, bins: int = 2048) -> torch.Tensor:
    """TensorRT's entropy calibration: the clipping range whose quantized histogram of
    magnitudes loses the least information (KL divergence) against the clipped original.

    Per row, magnitudes go into ``bins`` histogram bins up to the maximum. Each candidate
    range of ``i`` bins (from one bin per level up to all) folds the clipped tail into its last
    bin (``P``); ``Q`` merges those ``i`` bins into the grid's ``qmax + 1`` magnitude levels and
    spreads each level's count evenly over its non-empty bins. The range is the upper edge of
    the ``i`` that minimises ``KL(P || Q)``. For activations: a tensor takes about 0.4 s, and a
    weight channel has too few values for a histogram (``calibrate_weights`` refuses it)."""
    levels = grid.qmax + 1
    rows = values.detach().abs().double().cpu().numpy()
    return torch.tensor([_entropy_range(row, levels, bins) for row in rows], dtype=values.dtype)


def _entropy_range(magnitudes: np.ndarray, levels: int, bins: int) -> float:
    top = float(magnitudes.max())
    if top <= 0.0:
        return 1e-8
    hist, edges = np.histogram(magnitudes, bins=bins, range=(0.0, top))
    hist = hist.astype(np.float64)
    tails = np.cumsum(hist[::-1])[::-1]  # tails[i] = hist[i:].sum()
    best, best_kl = bins, np.inf
    for i in range(levels, bins + 1):
        p = hist[:i].copy()
        if i < bins:
            p[-1] += tails[i]
        kl = kl_to_merged_levels(p, hist[:i], levels)
        if kl < best_kl:
            best, best_kl = i, kl
    return float(edges[best])


def kl_to_merged_levels(p: np.ndarray, clipped: np.ndarray, levels: int) -> float:
    """``KL(P || Q)``, ``Q`` being ``clipped`` merged into ``levels`` groups of bins (the last
    takes the remainder), each group's count spread over its non-empty bins; infinite when
    every value lies beyond the range (``Q`` is then empty)."""
    if not clipped.any():
        return np.inf
    width = len(clipped) // levels
    starts = np.arange(levels) * width
    nonzero = clipped > 0
    totals = np.add.reduceat(clipped, starts)
    counts = np.add.reduceat(nonzero.astype(np.float64), starts)
    group = np.minimum(np.arange(len(clipped)) // width, levels - 1)
    q = np.where(nonzero, totals[group] / np.maximum(counts[group], 1.0), 0.0)
    p, q = p / p.sum(), q / q.sum()
    support = p > 0
    return float(np.sum(p[support] * np.log(p[support] / np.maximum(q[support], 1e-12))))


CALIBRATORS: dict[str, Calibrator] = {
    "max": max_calibrator,
    "percentile": percentile_calibrator,
    "mse": mse_calibrator,
    "entropy": entropy_calibrator,
}


def get_calibrator(name: str, percentile: float = 99.99) -> Calibrator:
    if name not in CALIBRATORS:
        raise UserError(f"unknown calibrator {name!r}; choose one of {', '.join(CALIBRATORS)}")
    if name == "percentile":
        return lambda values, grid: percentile_calibrator(values, grid, percentile)
    return CALIBRATORS[name]
