"""BatchNorm re-estimation of a quantized model, after QAT or post-training quantization.

After post-training quantization, the float model's running statistics describe activations
that the quantized weights no longer produce.

During QAT at low bit-widths, latent weights near a rounding threshold flip between two grid
points from step to step (Nagel et al., "Overcoming Oscillations in Quantization-Aware
Training", ICML 2022). BatchNorm's running statistics are an exponential average over those
steps, so they describe a mix of weights that differs from the final one, and the model is
evaluated (and exported, with the statistics folded into the convs) with mismatched
normalization. Re-estimating the statistics of the final fake-quant model on real images
removes the mismatch; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that keep running statistics (the others normalise every batch by
    its own and have nothing to re-estimate)."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Set every BatchNorm's running mean and variance to their average over ``batches`` (images
    as the model takes them; each batch weighs the same, as BatchNorm's ``momentum=None``).

    Only the BatchNorm layers run in training mode; every other module (quantizers, dropout) runs
    in eval mode, as in deployment. The model's mode and the layers' momenta are restored; if
    ``batches`` is empty or a forward pass fails, the old statistics are put back. Returns the
    number of BatchNorm layers re-estimated.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    saved = [
        (m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for m in layers
    ]
    was_training = model.training
    device = layers[0].running_mean.device
    model.eval()
    seen = 0
    try:
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None
            layer.train()
        for images in batches:
            model(images.to(device))
            seen += 1
        if seen == 0:
            raise ValueError("reestimate_batchnorm got no batches")
    except BaseException:
        for layer, (_, mean, var, count) in zip(layers, saved, strict=True):
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
            layer.num_batches_tracked.copy_(count)
        raise
    finally:
        for layer, (momentum, *_) in zip(layers, saved, strict=True):
            layer.momentum = momentum
        model.train(was_training)
    return len(layers)
