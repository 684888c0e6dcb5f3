"""Input normalisation: ``(pixels / 255 - mean) / std`` per channel, on NCHW uint8 images.

This module imports without torch (numpy only at module level), because the Jetson runtime and
the bench read the same spec from a deploy bundle; ``Preprocess.apply`` imports torch lazily.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from qkd_deploy.errors import UserError

if TYPE_CHECKING:
    import torch

_SCALE = "1/255"
_LAYOUT = "NCHW"
_FORMAT_HELP = (
    'expected "MEAN,STD", each either one number for every channel or a slash-separated '
    'per-channel list, e.g. "0.1307,0.3081" or "0.4914/0.4822/0.4465,0.247/0.243/0.261"; '
    "every std must be > 0"
)


@dataclass
class Preprocess:
    """Per-channel normalisation of pixels scaled to [0, 1] (the torchvision convention)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if not self.mean or len(self.mean) != len(self.std):
            raise UserError(
                f"normalisation needs one mean and one std per channel, got mean={self.mean} "
                f"and std={self.std}"
            )
        values = self.mean + self.std
        if not all(math.isfinite(v) for v in values) or min(self.std) <= 0:
            raise UserError(
                f"normalisation mean={self.mean} std={self.std} is invalid: every value must be "
                "a finite number and every std > 0"
            )

    @property
    def channels(self) -> int:
        return len(self.mean)

    def apply(self, images_uint8_torch: torch.Tensor) -> torch.Tensor:
        """Normalise a uint8 NCHW torch tensor to float32 NCHW."""
        import torch

        self._check_input(tuple(images_uint8_torch.shape), str(images_uint8_torch.dtype))
        shape = (1, self.channels, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(shape)
        std = torch.tensor(self.std, dtype=torch.float32).view(shape)
        return images_uint8_torch.to(torch.float32).div_(255.0).sub_(mean).div_(std)

    def apply_numpy(self, images_uint8: np.ndarray) -> np.ndarray:
        """Normalise a uint8 NCHW numpy array to float32 NCHW (same numbers as ``apply``)."""
        self._check_input(images_uint8.shape, f"numpy.{images_uint8.dtype}")
        shape = (1, self.channels, 1, 1)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(shape)
        std = np.asarray(self.std, dtype=np.float32).reshape(shape)
        out = images_uint8.astype(np.float32)
        out /= np.float32(255.0)
        out -= mean
        out /= std
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "scale": _SCALE, "layout": _LAYOUT}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        """Inverse of ``to_dict``; refuses a spec written for another scale or layout."""
        if not isinstance(d, dict) or "mean" not in d or "std" not in d:
            raise UserError(f"preprocessing spec {d!r} must be a mapping with 'mean' and 'std'")
        for key, expected in (("scale", _SCALE), ("layout", _LAYOUT)):
            if d.get(key, expected) != expected:
                raise UserError(
                    f"preprocessing spec has {key}={d[key]!r}, but only {key}={expected!r} is "
                    "supported; re-export the model with this version of qkd-deploy"
                )
        return cls(mean=tuple(d["mean"]), std=tuple(d["std"]))

    def _check_input(self, shape: tuple[int, ...], dtype: str) -> None:
        if dtype not in ("torch.uint8", "numpy.uint8"):
            raise UserError(f"preprocessing expects uint8 pixels 0..255, got dtype {dtype}")
        if len(shape) != 4 or shape[1] != self.channels:
            raise UserError(
                f"preprocessing got a batch of shape {shape}, but its normalisation has "
                f"{self.channels} mean/std value(s): give NCHW images with {self.channels} "
                "channel(s), or a normalisation with one value per channel of the images"
            )


def parse_normalize(text: str, channels: int) -> Preprocess:
    """Parse ``"MEAN,STD"`` (see ``_FORMAT_HELP``) for images with ``channels`` channels."""
    parts = text.split(",")
    if len(parts) != 2:
        raise UserError(f"normalisation {text!r}: {_FORMAT_HELP}")
    mean, std = (_parse_values(part, channels, text) for part in parts)
    if min(std) <= 0:
        raise UserError(f"normalisation {text!r} has a std <= 0: {_FORMAT_HELP}")
    return Preprocess(mean=mean, std=std)


def _parse_values(part: str, channels: int, text: str) -> tuple[float, ...]:
    items = part.split("/")
    try:
        values = tuple(float(item) for item in items)
    except ValueError:
        raise UserError(
            f"normalisation {text!r}: {part.strip()!r} is not a number; {_FORMAT_HELP}"
        ) from None
    if not all(math.isfinite(v) for v in values):
        raise UserError(f"normalisation {text!r}: values must be finite; {_FORMAT_HELP}")
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise UserError(
            f"normalisation {text!r}: {part.strip()!r} has {len(values)} values but the images "
            f"have {channels} channel(s); {_FORMAT_HELP}"
        )
    return values


def normalization_stats(images_uint8: np.ndarray) -> Preprocess:
    """Per-channel mean and (population) std of a uint8 NCHW split, on pixels scaled by 1/255.

    Counts pixel values per channel with ``bincount``, so it is exact and needs no float copy of
    the split.
    """
    return stats_of(pixel_counts(images_uint8))


def pixel_counts(images_uint8: np.ndarray) -> np.ndarray:
    """How often each value 0..255 occurs in each channel of a uint8 NCHW batch: (C, 256) int64.
    Counts of several batches add up to those of the whole split."""
    if images_uint8.dtype != np.uint8 or images_uint8.ndim != 4 or images_uint8.size == 0:
        raise UserError(
            f"normalisation statistics need a non-empty uint8 NCHW array, got dtype "
            f"{images_uint8.dtype} and shape {images_uint8.shape}"
        )
    channels = images_uint8.shape[1]
    return np.stack(
        [np.bincount(images_uint8[:, c].ravel(), minlength=256) for c in range(channels)]
    ).astype(np.int64)


def stats_of(counts: np.ndarray) -> Preprocess:
    """The normalisation of pixels whose values occur ``counts`` times (``pixel_counts``)."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for channel in np.asarray(counts, dtype=np.float64):
        total = channel.sum()
        mean = float(channel @ levels / total)
        var = float(channel @ (levels - mean) ** 2 / total)
        means.append(mean)
        stds.append(math.sqrt(var))
    if min(stds) == 0:
        raise UserError(
            f"channel {stds.index(0.0)} of the training images is constant, so it cannot be "
            "normalised by its std; give the normalisation explicitly as MEAN,STD"
        )
    return Preprocess(mean=tuple(means), std=tuple(stds))
