"""Latency of a Runner at several batch sizes (wall clock, median and 90th percentile)."""

from __future__ import annotations

import time

import numpy as np

from qkd_deploy.config import check_latency_settings
from qkd_deploy.runtime.base import Runner


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
