"""Latency of a Runner at several batch sizes (wall clock, median and 90th percentile)."""

from __future__ import annotations

import time

import numpy as np

from qkd_deploy.errors import UserError
from qkd_deploy.runtime.base import Runner


def check_latency_settings(batch_sizes: list[int], warmup: int, iterations: int) -> None:
    """Batch sizes >= 1, warm-up >= 0 and iterations >= 1: anything else measures nothing."""
    bad = [b for b in batch_sizes if not isinstance(b, int) or b < 1]
    if not batch_sizes or bad:
        raise UserError(f"batch_sizes {bad or batch_sizes}: give whole numbers >= 1, e.g. 1,32")
    if warmup < 0:
        raise UserError(f"warmup must be >= 0, got {warmup}")
    if iterations < 1:
        raise UserError(f"iterations must be >= 1, got {iterations}")


def measure_latency(
    runner: Runner,
    sample: np.ndarray,
    batch_sizes: list[int],
    warmup: int = 10,
    iterations: int = 50,
) -> list[dict]:
    """``[{"batch", "p50", "p90", "mean"}]`` in milliseconds per batch.

    ``sample`` is one preprocessed input ``(C, H, W)`` or a batch; batches repeat it.
    """
    check_latency_settings(batch_sizes, warmup, iterations)
    sample = np.asarray(sample, dtype=np.float32)
    one = sample if sample.ndim == 3 else sample[0]
    results = []
    for batch_size in batch_sizes:
        batch = np.ascontiguousarray(np.broadcast_to(one, (batch_size, *one.shape)))
        for _ in range(warmup):
            runner.run(batch)
        times = []
        for _ in range(iterations):
            start = time.perf_counter()
            runner.run(batch)
            times.append((time.perf_counter() - start) * 1000.0)
        results.append(
            {
                "batch": batch_size,
                "p50": round(float(np.percentile(times, 50)), 4),
                "p90": round(float(np.percentile(times, 90)), 4),
                "mean": round(float(np.mean(times)), 4),
            }
        )
    return results
