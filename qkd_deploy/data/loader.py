"""Batches of a split: seeded order, per-batch normalisation and augmentation, one process's
shard of each batch; images held in memory or decoded from files by worker processes."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import numpy as np
import torch

from qkd_deploy.data.augment import Augment
from qkd_deploy.data.datasets import ImageSplit
from qkd_deploy.data.folder import FolderSplit
from qkd_deploy.data.preprocess import Preprocess, normalization_stats, pixel_counts, stats_of
from qkd_deploy.errors import UserError

Split = ImageSplit | FolderSplit
_SHUFFLE_STREAM, _AUGMENT_STREAM = 0, 1
STATISTICS_IMAGES = 10_000  # a folder's normalisation statistics come from at most this many
_STATISTICS_BATCH = 64


def default_workers() -> int:
    """Decoding processes for a folder: one core is left to the training process, at most 4."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


class BatchLoader:
    """Iterates (float32 normalised images, int64 labels) batches of a split.

    Like torch's ``DistributedSampler``, the epoch changes only through ``set_epoch``: the shuffle
    order and the augmentation of epoch ``e`` depend only on ``(seed, e)``, so a run resumed at
    epoch ``e`` sees exactly the batches it would have seen. Iterating twice without
    ``set_epoch`` repeats the same epoch. The batches do not depend on ``workers`` either: a
    folder's images are decoded by that many processes (0: in this one; None:
    ``default_workers()``), an in-memory split ignores it.
    """

    def __init__(
        self,
        split: Split,
        preprocess: Preprocess,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: Augment | None = None,
        seed: int = 0,
        drop_last: bool = False,
        workers: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        if seed < 0:
            raise UserError(f"seed must be >= 0, got {seed}")
        if workers is not None and workers < 0:
            raise UserError(
                f"data.workers must be >= 0 (0: decode in the main process), got {workers}"
            )
        self.split = split
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.drop_last = drop_last
        self.workers = default_workers() if workers is None else workers
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
        for images, labels, _ in self.shard(0, 1):
            yield images, labels

    def shard(self, rank: int, world: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
        """Process ``rank`` of ``world``'s part of every batch: images ``rank::world`` of it,
        exactly as in the whole batch (same order, same augmentation), and their share of it.
        Only those images are read."""
        batches = self.index_batches()
        augment_generator = self._generator(_AUGMENT_STREAM)
        resized_crop = self.augment is not None and self.augment.resized_crop
        crop_seed = (self.seed, self.epoch) if resized_crop else None
        mine = [index[rank::world] for index in batches]
        raw = _stream(self.split, mine, self.workers, crop_seed)
        for index, (images_uint8, labels) in zip(batches, raw, strict=True):
            images = self.preprocess.apply(images_uint8)
            if self.augment is not None:
                draw = self.augment.draw(len(index), augment_generator).rows(rank, world)
                images = self.augment.apply(images, draw)
            yield images, labels, len(labels) / len(index)

    def index_batches(self) -> list[torch.Tensor]:
        """This epoch's batches as indices into the split."""
        n = len(self.split)
        if self.shuffle:
            order = torch.randperm(n, generator=self._generator(_SHUFFLE_STREAM))
        else:
            order = torch.arange(n)
        return [order[b * self.batch_size : (b + 1) * self.batch_size] for b in range(len(self))]

    def _generator(self, stream: int) -> torch.Generator:
        """A generator seeded from (seed, epoch, stream) alone; streams are independent."""
        state = np.random.SeedSequence([self.seed, self.epoch, stream]).generate_state(1)
        return torch.Generator().manual_seed(int(state[0]))


def _stream(
    split: Split, batches: list[torch.Tensor], workers: int, crop_seed: tuple[int, int] | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, labels) of each index batch."""
    if isinstance(split, FolderSplit):
        return split.stream(batches, workers, crop_seed)
    return ((split.images[index], split.labels[index]) for index in batches)


def split_statistics(
    split: Split, workers: int | None = None, limit: int = STATISTICS_IMAGES
) -> Preprocess:
    """Per-channel mean and std of a training split (``normalization_stats``): exact over an
    in-memory split; over a folder, streamed through at most ``limit`` images (a fixed
    stratified sample of a larger one) as evaluation sees them."""
    if isinstance(split, ImageSplit):
        return normalization_stats(split.images.numpy())
    sample = stratified_subset(split, limit, seed=0)
    batches = list(torch.arange(len(sample)).split(_STATISTICS_BATCH))
    workers = default_workers() if workers is None else workers
    counts = sum(pixel_counts(images.numpy()) for images, _ in sample.stream(batches, workers))
    return stats_of(counts)


def stratified_subset(split: Split, size: int, seed: int = 0) -> Split:
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
    return split.subset(torch.from_numpy(np.sort(chosen)))


def _proportional_counts(class_counts: np.ndarray, size: int) -> np.ndarray:
    """Split ``size`` over classes in proportion to ``class_counts``, summing exactly to size."""
    quota = class_counts * size / class_counts.sum()
    counts = np.floor(quota).astype(np.int64)
    by_remainder = np.argsort(-(quota - counts), kind="stable")
    counts[by_remainder[: size - counts.sum()]] += 1
    return counts
