"""Torch-side evaluation: logits of a model over a loader."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def predict(model: nn.Module, loader) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of ``model`` in eval mode over every batch of ``loader``."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for images, y in loader:
        logits.append(model(images).float().numpy())
        labels.append(y.numpy())
    model.train(was_training)
    return np.concatenate(logits), np.concatenate(labels)
