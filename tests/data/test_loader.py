"""qkd_deploy.data.loader: BatchLoader epochs, determinism and stratified_subset."""

from __future__ import annotations

import pytest
import torch

from qkd_deploy.data import Augment, BatchLoader, ImageSplit, Preprocess, stratified_subset
from qkd_deploy.errors import UserError

IDENTITY = Preprocess(mean=(0.0,), std=(1.0 / 255.0,))  # float output == uint8 input value


def id_split(n: int = 23) -> ImageSplit:
    """Sample i has every pixel equal to i and label i: batches show which samples they hold."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).clone()
    return ImageSplit(images, torch.arange(n))


def epoch_labels(loader: BatchLoader) -> list[int]:
    return [y for _, labels in loader for y in labels.tolist()]


def test_every_sample_once_and_images_match_labels() -> None:
    loader = BatchLoader(id_split(), IDENTITY, 5, shuffle=True)
    assert len(loader) == 5
    sizes = []
    for images, labels in loader:
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert torch.allclose(images[:, 0, 2, 3], labels.float(), atol=1e-4)
        sizes.append(len(labels))
    assert sizes == [5, 5, 5, 5, 3]
    assert sorted(epoch_labels(loader)) == list(range(23))


def test_no_shuffle_keeps_order() -> None:
    assert epoch_labels(BatchLoader(id_split(), IDENTITY, 4)) == list(range(23))


def test_order_depends_only_on_seed_and_epoch() -> None:
    a = BatchLoader(id_split(), IDENTITY, 5, shuffle=True, seed=1)
    b = BatchLoader(id_split(), IDENTITY, 5, shuffle=True, seed=1)
    first = epoch_labels(a)
    assert first == epoch_labels(b) == epoch_labels(a)  # repeats until set_epoch
    a.set_epoch(1)
    assert epoch_labels(a) != first
    assert epoch_labels(BatchLoader(id_split(), IDENTITY, 5, shuffle=True, seed=2)) != first


def test_resume_at_epoch_reproduces_batches_and_augmentation() -> None:
    split = ImageSplit(torch.randint(0, 256, (30, 1, 6, 6), dtype=torch.uint8), torch.arange(30))
    kwargs = {"shuffle": True, "augment": Augment(2, True), "seed": 5}
    running = BatchLoader(split, IDENTITY, 8, **kwargs)
    for epoch in range(3):
        running.set_epoch(epoch)
        batches = list(running)
    resumed = BatchLoader(split, IDENTITY, 8, **kwargs)
    resumed.set_epoch(2)
    for (x1, y1), (x2, y2) in zip(batches, resumed, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    resumed.set_epoch(1)
    assert not torch.equal(next(iter(resumed))[0], batches[0][0])


def test_augmentation_changes_images_but_not_order() -> None:
    split = ImageSplit(torch.randint(0, 256, (30, 1, 6, 6), dtype=torch.uint8), torch.arange(30))
    plain = list(BatchLoader(split, IDENTITY, 8, shuffle=True, seed=5))
    augmented = list(
        BatchLoader(split, IDENTITY, 8, shuffle=True, seed=5, augment=Augment(2, True))
    )
    assert all(torch.equal(y1, y2) for (_, y1), (_, y2) in zip(plain, augmented, strict=True))
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(plain, augmented, strict=True))


def test_drop_last() -> None:
    loader = BatchLoader(id_split(), IDENTITY, 5, shuffle=True, drop_last=True)
    assert len(loader) == 4
    batches = [labels.tolist() for _, labels in loader]
    assert [len(b) for b in batches] == [5, 5, 5, 5]
    seen = [y for b in batches for y in b]
    assert len(set(seen)) == 20


def test_bad_arguments() -> None:
    with pytest.raises(UserError, match="batch size"):
        BatchLoader(id_split(), IDENTITY, 0)
    with pytest.raises(UserError, match="epoch"):
        BatchLoader(id_split(), IDENTITY, 2).set_epoch(-1)


def imbalanced_split() -> ImageSplit:
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)[torch.randperm(100)]
    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1)
    return ImageSplit(images, labels)


@pytest.mark.parametrize(("size", "expected"), [(20, [12, 6, 2]), (10, [6, 3, 1]), (7, [4, 2, 1])])
def test_stratified_subset_is_stratified(size: int, expected: list[int]) -> None:
    split = imbalanced_split()
    subset = stratified_subset(split, size, seed=3)
    assert len(subset) == size
    assert torch.bincount(subset.labels, minlength=3).tolist() == expected
    ids = subset.images.flatten().long()
    assert len(set(ids.tolist())) == size  # no duplicates
    assert torch.equal(split.labels[ids], subset.labels)  # images keep their labels


def test_stratified_subset_determinism_and_all() -> None:
    split = imbalanced_split()
    a = stratified_subset(split, 15, seed=0)
    assert torch.equal(a.images, stratified_subset(split, 15, seed=0).images)
    assert not torch.equal(a.images, stratified_subset(split, 15, seed=1).images)
    assert stratified_subset(split, 500) is split
    with pytest.raises(UserError, match="size"):
        stratified_subset(split, 0)
