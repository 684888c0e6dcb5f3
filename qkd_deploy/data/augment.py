"""Batch augmentation on normalised float NCHW tensors: random padded crop and horizontal flip."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qkd_deploy.errors import UserError


@dataclass
class Augment:
    """Random crop with zero padding and random horizontal flip, vectorised over the batch.

    It runs after normalisation, so the padding value 0 is 0 of the *normalised* input, i.e. the
    per-channel mean colour of the data, not black. That keeps the padded border neutral for
    the network whatever the normalisation is. With both options off it returns its input.
    Random numbers come only from ``generator``: the same generator state gives the same output.
    """

    crop_padding: int = 0
    hflip: bool = False

    def __post_init__(self) -> None:
        if self.crop_padding < 0:
            raise UserError(f"crop_padding must be >= 0, got {self.crop_padding}")

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.crop_padding:
            images = _random_crop(images, self.crop_padding, generator)
        if self.hflip:
            images = _random_hflip(images, generator)
        return images


def _random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Pad every image by ``padding`` zeros and cut an H x W window at a random offset each."""
    n, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    offsets = torch.randint(
        0, 2 * padding + 1, (2, n, 1), generator=generator, device=generator.device
    ).to(images.device)
    rows = offsets[0] + torch.arange(h, device=images.device)  # (N, H)
    cols = offsets[1] + torch.arange(w, device=images.device)  # (N, W)
    flat = rows[:, :, None] * padded.shape[-1] + cols[:, None, :]  # (N, H, W)
    index = flat.view(n, 1, h * w).expand(n, c, h * w)
    return padded.view(n, c, -1).gather(2, index).view(n, c, h, w)


def _random_hflip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image left-right with probability 0.5."""
    chosen = torch.rand(images.shape[0], generator=generator, device=generator.device) < 0.5
    return torch.where(chosen.to(images.device).view(-1, 1, 1, 1), images.flip(-1), images)
