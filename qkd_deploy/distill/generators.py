"""Image generators for the data-free methods (DAFL, CDFKD-MFS) and the BatchNorm-statistics
prior that steers them toward the teacher's training distribution (DeepInversion: Yin et al.,
"Dreaming to Distill", CVPR 2020).

``ImageGenerator`` maps Gaussian noise ``z`` to a batch shaped like the task's preprocessed inputs
``(C, H, W)``. It is DAFL's generator (Chen et al., "Data-Free Learning of Student Networks",
ICCV 2019), read from the authors' code (huawei-noah/Data-Efficient-Model-Compression,
``DAFL/DAFL-train.py``, class ``Generator``) and adapted to any input shape.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qkd_deploy.calib.calibrate import calibrate
from qkd_deploy.distill.base import MethodContext
from qkd_deploy.quant.modules import quantizers

# The reference writes ``nn.BatchNorm2d(channels, 0.8)``: the positional 0.8 is the epsilon (a
# quirk of the DCGAN code it descends from). Kept, since DAFL's published numbers were made so.
HIDDEN_BN_EPS = 0.8


class ImageGenerator(nn.Module):
    """DCGAN-style generator: ``z -> Linear -> BN -> up -> conv-BN-LReLU -> up -> conv-BN-LReLU ->
    conv -> tanh -> BN(affine=False)``.

    Shape: the linear layer makes a ``width x ceil(H/4) x ceil(W/4)`` map, upsampled (nearest) to
    ``ceil(H/2) x ceil(W/2)`` and then to exactly ``H x W`` (the reference doubles twice, which
    needs sizes divisible by 4). ``width`` = 128 and the second block's ``width // 2`` = 64 are the
    reference's channel counts; LeakyReLU slope 0.2 as there.

    Output range: ``tanh`` bounds the pixels, then a BatchNorm *without* affine parameters
    standardises each channel over the batch to zero mean and unit variance. That is the
    distribution of the teacher's inputs, which the pipeline normalises per channel with the
    training split's mean and std, so the images need no further mapping. Use the generator in
    training mode (batch statistics): in eval mode that last BatchNorm would apply running
    statistics instead.
    """

    def __init__(
        self, image_shape: tuple[int, int, int], latent_dim: int = 100, width: int = 128
    ) -> None:
        super().__init__()
        channels, height, width_px = image_shape
        self.image_shape = (channels, height, width_px)
        self.latent_dim = latent_dim
        self.sizes = [
            (math.ceil(height / 4), math.ceil(width_px / 4)),
            (math.ceil(height / 2), math.ceil(width_px / 2)),
            (height, width_px),
        ]
        self.width = width
        h0, w0 = self.sizes[0]
        self.project = nn.Linear(latent_dim, width * h0 * w0)
        self.bn0 = nn.BatchNorm2d(width)
        self.block1 = _conv_bn_lrelu(width, width)
        self.block2 = _conv_bn_lrelu(width, width // 2)
        self.to_image = nn.Conv2d(width // 2, channels, 3, padding=1)
        self.out_bn = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.bn0(self.project(z).view(z.shape[0], self.width, *self.sizes[0]))
        out = self.block1(F.interpolate(out, size=self.sizes[1]))
        out = self.block2(F.interpolate(out, size=self.sizes[2]))
        return self.out_bn(torch.tanh(self.to_image(out)))

    def sample(self, batch_size: int) -> torch.Tensor:
        """Images from ``batch_size`` draws of ``z ~ N(0, I)`` (torch's global RNG, so a resumed
        run that restores it draws the same noise)."""
        device = self.project.weight.device
        return self(torch.randn(batch_size, self.latent_dim, device=device))


def _conv_bn_lrelu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels, eps=HIDDEN_BN_EPS),
        nn.LeakyReLU(0.2),
    )


def bn_statistics_distance(
    x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor
) -> torch.Tensor:
    """``||mean(x) - running_mean||_2 + ||var(x) - running_var||_2`` per channel of an NCHW
    batch, the variance biased (DeepInversion's feature-distribution regulariser)."""
    mean = x.mean((0, 2, 3))
    var = x.var((0, 2, 3), correction=0)
    return torch.linalg.vector_norm(mean - running_mean) + torch.linalg.vector_norm(
        var - running_var
    )


class BatchNormStatistics:
    """While open (``with``), every ``BatchNorm2d`` of ``model`` records the distance of its
    input's batch statistics to its running statistics; ``loss()`` is their sum, the first
    BatchNorm's term (in call order) weighted by ``first_weight``."""

    def __init__(self, model: nn.Module, first_weight: float = 1.0) -> None:
        self.model = model
        self.first_weight = first_weight
        self.distances: list[torch.Tensor] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> BatchNormStatistics:
        self.distances = []
        self._handles = [
            m.register_forward_hook(self._record)
            for m in self.model.modules()
            if isinstance(m, nn.BatchNorm2d)
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _record(self, module: nn.BatchNorm2d, inputs: tuple, output: torch.Tensor) -> None:
        self.distances.append(
            bn_statistics_distance(inputs[0], module.running_mean, module.running_var)
        )

    def loss(self) -> torch.Tensor:
        """The weighted sum; a zero on the model's device when nothing was recorded."""
        if not self.distances:
            tensors = [*self.model.parameters(), *self.model.buffers()]
            return torch.zeros((), device=tensors[0].device if tensors else None)
        weights = [self.first_weight] + [1.0] * (len(self.distances) - 1)
        return sum(w * d for w, d in zip(weights, self.distances, strict=True))


def calibrate_once(student: nn.Module, images: torch.Tensor, context: MethodContext | None) -> None:
    """Calibrate a data-free student's quantizers on the first generated ``images`` (with the
    run's calibrators when the context has them), unless every quantizer is calibrated already:
    the pipeline has no real images to calibrate it on.

    The student is untrained, so its BatchNorm running statistics are placeholders (mean 0,
    variance 1), and calibration, which runs in eval mode, would see activations unlike the
    training passes' (0.3-0.7x their ranges in a resnet8): the BatchNorms first take the
    statistics of these images, as training mode normalises them."""
    if not all(bool(q.calibrated) for _, q in quantizers(student)):
        batchnorm_statistics_of(student, images)
        calibrate_on = context.calibrate if context and context.calibrate else calibrate
        calibrate_on(student, [images])


@torch.no_grad()
def batchnorm_statistics_of(model: nn.Module, images: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to those of ``images`` (one training-mode pass
    with a cumulative average)."""
    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    try:
        model.train()(images)
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.train(was_training)
