"""The Runner interface shared by every inference backend (torch-free)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Runner(Protocol):
    """Runs a classifier on a float32 NCHW batch and returns float32 logits ``(N, classes)``."""

    name: str
    input_shape: tuple[int, ...]  # one sample's shape (C, H, W), without the batch dimension

    def run(self, batch: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


def run_in_batches(runner: Runner, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits for ``images`` computed ``batch_size`` at a time (the last batch may be smaller)."""
    outputs = [runner.run(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return np.concatenate(outputs, axis=0)
