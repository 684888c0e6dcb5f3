"""One image file to a uint8 array: Pillow decoding, 16-bit scaling and the crop geometry.

Two geometries (``Geometry.style``):

- ``squash``: the whole image resized to size x size (bilinear), for small images
  (CIFAR-like sizes, where a crop would cut away most of a 32-pixel object);
- ``crop``: ImageNet's: for evaluation the shorter side resized to ``size * 256 / 224`` and the
  centre size x size cut out; for training a random-resized crop (a random 8-100 % of the area
  at an aspect ratio of 3/4..4/3, as torchvision's ``RandomResizedCrop``) resized to size x size.

Both resample with one Pillow ``resize`` from the source box (antialiased). A JPEG is decoded at
a reduced scale first (``Image.draft``) when the box still has at least ``size`` pixels each way
at that scale, which is what makes large JPEGs cheap.

Any failure to read a file (a corrupt or truncated file, a decompression bomb) is one
``UserError`` naming it. Numpy and Pillow only: this module runs in the loader's worker
processes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from qkd_deploy.errors import UserError

GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N"})
FLOAT_MODES = frozenset({"F"})
EVAL_RESIZE = 256 / 224  # the shorter side is resized to size * this before the centre crop
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
_CROP_ATTEMPTS = 10


@dataclass(frozen=True)
class ImageFormat:
    """How a folder's images become 8-bit arrays: ``mode`` L or RGB, and ``peak``, the largest
    pixel of its 16-bit images, which maps to 255 (a 12-bit scan keeps its full range, and
    every image of the set shares one scale)."""

    mode: str
    peak: int = 255

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3


@dataclass(frozen=True)
class Geometry:
    """The output size and how an image is fitted to it (see the module docstring)."""

    size: int
    style: Literal["squash", "crop"] = "squash"


def probe(path: Path) -> tuple[str, int | None]:
    """The image's Pillow mode and, for a 16-bit grayscale image, its largest pixel (which
    decodes it; other images are only opened, which reads their header)."""
    with _opened(path) as img:
        if img.mode in FLOAT_MODES:
            raise UserError(
                f"{path} is a floating-point image, whose value range qkd-deploy cannot "
                "know; save it as an 8- or 16-bit image (PNG or TIFF)"
            )
        deep = img.mode.startswith("I")
        return img.mode, int(_deep_pixels(img, path).max(initial=0)) if deep else None


def decode(
    path: Path, form: ImageFormat, geometry: Geometry, rng: np.random.Generator | None = None
) -> np.ndarray:
    """The image at ``path`` as a uint8 (size, size, channels) array; ``rng`` draws a training
    crop (``crop`` style only), else the evaluation geometry is used."""
    size = geometry.size
    with _opened(path) as img:
        width, height = img.size
        if geometry.style == "squash":
            box = (0.0, 0.0, float(width), float(height))
        elif rng is None:
            box = centre_box(width, height, size)
        else:
            box = random_resized_box(width, height, rng)
        if geometry.style == "crop" and not img.mode.startswith("I"):
            img, box = _draft(img, form.mode, box, size)
        if img.mode.startswith("I"):  # convert() would clamp each value above 255 to 255
            scaled = _deep_pixels(img, path) * (255.0 / form.peak)
            img = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
        img = img.convert(form.mode).resize((size, size), Image.Resampling.BILINEAR, box=box)
        return np.asarray(img).reshape(size, size, form.channels)


def centre_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The source box that resizing the shorter side to ``size * EVAL_RESIZE`` and cutting the
    centre size x size out of it would show."""
    side = min(width, height) / EVAL_RESIZE  # the crop's side in source pixels
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def random_resized_box(
    width: int, height: int, rng: np.random.Generator
) -> tuple[float, float, float, float]:
    """torchvision's ``RandomResizedCrop.get_params``: a box of a random ``CROP_SCALE`` share of
    the area at a random (log-uniform) ``CROP_RATIO`` aspect; after 10 misses, the centre crop
    of the whole image clamped to those ratios."""
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(_CROP_ATTEMPTS):
        target = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return (float(left), float(top), float(left + w), float(top + h))
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        w, h = round(height * CROP_RATIO[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return (float(left), float(top), float(left + w), float(top + h))


def _draft(
    img: Image.Image, mode: str, box: tuple[float, float, float, float], size: int
) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale if the box keeps >= ``size`` pixels each way;
    returns the image and the box in its new pixel coordinates."""
    width, height = img.size
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    factor = min(box_w, box_h) / size  # how far the box may shrink
    if img.format != "JPEG" or factor < 2:
        return img, box
    img.draft(mode, (math.ceil(width / factor), math.ceil(height / factor)))
    sx, sy = img.size[0] / width, img.size[1] / height
    return img, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def _deep_pixels(img: Image.Image, path: Path) -> np.ndarray:
    """The pixels of a 16-bit grayscale image (Pillow mode ``I;16*``, or ``I`` as 16-bit PGM
    opens), checked to fit 16 bits."""
    values = np.asarray(img).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise UserError(f"{path}: pixels outside 0..65535; save it as an 8- or 16-bit image")
    return values


@contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    """``Image.open`` in which any failure of a malformed file, Pillow's decompression-bomb
    warning included, becomes one ``UserError`` naming the file."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                yield img
        except UserError:
            raise
        except Exception as error:  # a malformed file can fail in any plugin with any type
            raise UserError(f"cannot read image {path}: {type(error).__name__}: {error}") from None
