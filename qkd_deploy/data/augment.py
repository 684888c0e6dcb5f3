"""Training augmentation: random padded crop and horizontal flip on normalised float NCHW
batches, and the flag for a random-resized crop that the folder reader draws while decoding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qkd_deploy.errors import UserError


@dataclass
class Draw:
    """The random choices of one batch: per image a crop offset (row, column) and a flip."""

    offsets: torch.Tensor | None  # (2, N, 1) int64
    flips: torch.Tensor | None  # (N,) bool

    def rows(self, start: int, step: int) -> Draw:
        """The choices of images ``start::step`` (one process's shard of the batch)."""
        offsets = None if self.offsets is None else self.offsets[:, start::step]
        flips = None if self.flips is None else self.flips[start::step]
        return Draw(offsets, flips)


@dataclass
class Augment:
    """Random crop with zero padding and random horizontal flip, vectorised over the batch.

    It runs after normalisation, so the padding value 0 is 0 of the *normalised* input, i.e. the
    per-channel mean colour of the data, not black. That keeps the padded border neutral for
    the network whatever the normalisation is. With both options off it returns its input.
    Random numbers come only from ``generator``: the same generator state gives the same output.

    ``resized_crop``: the images are ImageNet-style random-resized crops, which the folder
    reader draws while it decodes them (``data.decode``); this class only flips them.
    """

    crop_padding: int = 0
    hflip: bool = False
    resized_crop: bool = False

    def __post_init__(self) -> None:
        if self.crop_padding < 0:
            raise UserError(f"crop_padding must be >= 0, got {self.crop_padding}")

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(images, self.draw(images.shape[0], generator))

    def draw(self, n: int, generator: torch.Generator) -> Draw:
        """The choices for a batch of ``n`` images (crop offsets first, then flips)."""
        offsets = flips = None
        if self.crop_padding:
            high = 2 * self.crop_padding + 1
            offsets = torch.randint(
                0, high, (2, n, 1), generator=generator, device=generator.device
            )
        if self.hflip:
            flips = torch.rand(n, generator=generator, device=generator.device) < 0.5
        return Draw(offsets, flips)

    def apply(self, images: torch.Tensor, draw: Draw) -> torch.Tensor:
        """``images`` cropped and flipped as ``draw`` says (one choice per image)."""
        if draw.offsets is not None:
            images = _random_crop(images, self.crop_padding, draw.offsets.to(images.device))
        if draw.flips is not None:
            chosen = draw.flips.to(images.device).view(-1, 1, 1, 1)
            images = torch.where(chosen, images.flip(-1), images)
        return images


def _random_crop(images: torch.Tensor, padding: int, offsets: torch.Tensor) -> torch.Tensor:
    """Pad every image by ``padding`` zeros and cut an H x W window at its offset."""
    n, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = offsets[0] + torch.arange(h, device=images.device)  # (N, H)
    cols = offsets[1] + torch.arange(w, device=images.device)  # (N, W)
    flat = rows[:, :, None] * padded.shape[-1] + cols[:, None, :]  # (N, H, W)
    index = flat.view(n, 1, h * w).expand(n, c, h * w)
    return padded.view(n, c, -1).gather(2, index).view(n, c, h, w)
