"""Batches of an in-memory split: permutation indexing, per-batch normalisation, augmentation."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from qkd_deploy.data.augment import Augment
from qkd_deploy.data.datasets import ImageSplit
from qkd_deploy.data.preprocess import Preprocess
from qkd_deploy.errors import UserError

_SHUFFLE_STREAM, _AUGMENT_STREAM = 0, 1


class BatchLoader:
    """Iterates (float32 normalised images, int64 labels) batches of an in-memory ImageSplit.

    Like torch's ``DistributedSampler``, the epoch changes only through ``set_epoch``: the shuffle
    order and the augmentation of epoch ``e`` depend only on ``(seed, e)``, so a run resumed at
    epoch ``e`` sees exactly the batches it would have seen. Iterating twice without
    ``set_epoch`` repeats the same epoch.
    """

    def __init__(
        self,
        split: ImageSplit,
        preprocess: Preprocess,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: Augment | None = None,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        if seed < 0:
            raise UserError(f"seed must be >= 0, got {seed}")
        self.split = split
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise UserError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.split) // self.batch_size
        return math.ceil(len(self.split) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.split)
        if self.shuffle:
            order = torch.randperm(n, generator=self._generator(_SHUFFLE_STREAM))
        else:
            order = torch.arange(n)
        augment_generator = self._generator(_AUGMENT_STREAM)
        for b in range(len(self)):
            index = order[b * self.batch_size : (b + 1) * self.batch_size]
            images = self.preprocess.apply(self.split.images[index])
            if self.augment is not None:
                images = self.augment(images, augment_generator)
            yield images, self.split.labels[index]

    def _generator(self, stream: int) -> torch.Generator:
        """A generator seeded from (seed, epoch, stream) alone; streams are independent."""
        state = np.random.SeedSequence([self.seed, self.epoch, stream]).generate_state(1)
        return torch.Generator().manual_seed(int(state[0]))


def stratified_subset(split: ImageSplit, size: int, seed: int = 0) -> ImageSplit:
    """A stratified random sample of ``size`` images (the whole split if ``size >= len``).

    Each class gets its share of ``size`` in proportion to its frequency (largest remainder
    rounding, so counts are within one image of proportional); images are returned in their
    original order. The same (split, size, seed) gives the same subset.
    """
    if size < 1:
        raise UserError(f"calibration subset size must be >= 1, got {size}")
    if size >= len(split):
        return split
    labels = split.labels.numpy()
    per_class = _proportional_counts(np.bincount(labels), size)
    rng = np.random.default_rng(seed)
    chosen = np.concatenate(
        [
            rng.choice(np.flatnonzero(labels == c), count, replace=False)
            for c, count in enumerate(per_class)
            if count
        ]
    )
    index = torch.from_numpy(np.sort(chosen))
    return ImageSplit(split.images[index], split.labels[index])


def _proportional_counts(class_counts: np.ndarray, size: int) -> np.ndarray:
    """Split ``size`` over classes in proportion to ``class_counts``, summing exactly to size."""
    quota = class_counts * size / class_counts.sum()
    counts = np.floor(quota).astype(np.int64)
    by_remainder = np.argsort(-(quota - counts), kind="stable")
    counts[by_remainder[: size - counts.sum()]] += 1
    return counts
