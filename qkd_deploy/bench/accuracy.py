"""Accuracy and agreement from logits (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy as a fraction in [0, 1]."""
    return float((np.asarray(logits).argmax(axis=1) == np.asarray(labels)).mean())


@dataclass(frozen=True)
class Parity:
    """How closely one model's outputs follow a reference's on the same inputs."""

    agreement: float  # fraction of samples with the same argmax
    max_abs_error: float  # largest absolute logit difference
    samples: int


def parity(logits: np.ndarray, reference: np.ndarray) -> Parity:
    logits, reference = np.asarray(logits), np.asarray(reference)
    return Parity(
        agreement=float((logits.argmax(1) == reference.argmax(1)).mean()),
        max_abs_error=float(np.abs(logits - reference).max()),
        samples=len(logits),
    )
