"""Image folders read batch by batch (``data.folder``, ``data.loader``): the same batches as the
images held in memory, in the same seeded order whatever the worker count, a resumed epoch
identical to an uninterrupted one, one process's shard read alone, flat memory, ImageNet crops."""

from __future__ import annotations

import dataclasses
import math
import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from qkd_deploy.config import TrainConfig
from qkd_deploy.data import (
    BatchLoader,
    ImageSplit,
    Preprocess,
    load_dataset,
    normalization_stats,
    split_statistics,
)
from qkd_deploy.data.decode import (
    CROP_RATIO,
    EVAL_RESIZE,
    Geometry,
    ImageFormat,
    centre_box,
    decode,
    random_resized_box,
)
from qkd_deploy.distill import build_distiller
from qkd_deploy.errors import UserError
from qkd_deploy.train.loop import fit

PREPROCESS = Preprocess(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def write_folder(root: Path, per_class: int, size: tuple[int, int] = (20, 14), seed: int = 0):
    """Three classes of random-noise RGB images (distinct content per file)."""
    rng = np.random.default_rng(seed)
    for name in ("ant", "bee", "cat"):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


def in_memory(split) -> ImageSplit:
    return ImageSplit(split.read(range(len(split))), split.labels)


def epochs(loader: BatchLoader, count: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    out = []
    for epoch in range(count):
        loader.set_epoch(epoch)
        out.append(list(loader))
    return out


def assert_same_batches(first, second) -> None:
    assert len(first) == len(second)
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        assert torch.equal(y1, y2) and torch.equal(x1, x2)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return load_dataset(f"folder:{write_folder(tmp_path_factory.mktemp('small'), 8)}", 12)


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """ImageNet-style: image_size above the squashed sizes, JPEGs larger than the crop."""
    root = tmp_path_factory.mktemp("large")
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        (root / name).mkdir()
        for i in range(6):
            pixels = rng.integers(0, 256, (150 + 10 * i, 180, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.jpg", quality=90)
    return load_dataset(f"folder:{root}", 72)


@pytest.mark.parametrize("workers", [0, 2])
def test_small_images_stream_exactly_as_in_memory(small, workers: int) -> None:
    """Up to 64 px a folder keeps its recipe (squashed images, padded crop and flip after
    normalisation): streamed batches equal those of the same images held in memory."""
    assert small.train.geometry == Geometry(12, "squash") and small.augment.crop_padding == 1
    kwargs = {"shuffle": True, "augment": small.augment, "seed": 3, "drop_last": True}
    streamed = BatchLoader(small.train, PREPROCESS, 5, workers=workers, **kwargs)
    held = BatchLoader(in_memory(small.train), PREPROCESS, 5, **kwargs)
    for a, b in zip(epochs(streamed, 2), epochs(held, 2), strict=True):
        assert_same_batches(a, b)


def test_batches_do_not_depend_on_the_worker_count(large) -> None:
    kwargs = {"shuffle": True, "augment": large.augment, "seed": 1}
    alone = epochs(BatchLoader(large.train, PREPROCESS, 4, workers=0, **kwargs), 2)
    shared = epochs(BatchLoader(large.train, PREPROCESS, 4, workers=2, **kwargs), 2)
    for a, b in zip(alone, shared, strict=True):
        assert_same_batches(a, b)
    assert not torch.equal(alone[0][0][0], alone[1][0][0])  # epochs differ


def test_a_resumed_epoch_sees_the_batches_of_an_uninterrupted_run(large) -> None:
    kwargs = {"shuffle": True, "augment": large.augment, "seed": 5, "workers": 1}
    running = epochs(BatchLoader(large.train, PREPROCESS, 3, **kwargs), 3)
    resumed = BatchLoader(large.train, PREPROCESS, 3, **kwargs)
    resumed.set_epoch(2)
    assert_same_batches(running[2], list(resumed))


def test_training_resumed_mid_run_ends_where_an_uninterrupted_one_does(large, tmp_path) -> None:
    """``fit`` killed after its first epoch and run again from the checkpoint gives the weights
    of an uninterrupted run: the resumed epoch reads the same crops in the same order."""

    def job():
        torch.manual_seed(0)
        model = nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(3 * 9 * 9, 2))
        loader = BatchLoader(
            large.train, PREPROCESS, 4, shuffle=True, augment=large.augment, workers=1
        )
        return build_distiller("none", model, []), loader

    cfg = TrainConfig(epochs=2, lr=0.1, warmup_epochs=0.0)
    whole, loader = job()
    fit(whole, loader, cfg, tmp_path / "whole.pt", progress=False)
    first, loader = job()
    set_epoch = loader.set_epoch

    def killed_after_the_first(epoch: int) -> None:
        if epoch == 1:
            raise KeyboardInterrupt
        set_epoch(epoch)

    loader.set_epoch = killed_after_the_first
    with pytest.raises(KeyboardInterrupt):
        fit(first, loader, cfg, tmp_path / "resumed.pt", progress=False)
    resumed, loader = job()
    fit(resumed, loader, cfg, tmp_path / "resumed.pt", progress=False)
    for key, value in whole.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[key]), key


def test_each_process_reads_only_its_shard(large, tmp_path) -> None:
    """Process r of 2 gets rows r::2 of every batch exactly as in the whole batch, and never
    opens another process's files: with those files destroyed it still reads its own."""
    kwargs = {"shuffle": True, "augment": large.augment, "seed": 2, "workers": 0}
    loader = BatchLoader(large.train, PREPROCESS, 5, **kwargs)
    whole = list(loader.shard(0, 1))
    shards = [list(loader.shard(rank, 2)) for rank in (0, 1)]
    for b, (images, labels, share) in enumerate(whole):
        assert share == 1.0
        for rank in (0, 1):
            mine, mine_labels, mine_share = shards[rank][b]
            assert torch.equal(mine, images[rank::2]) and torch.equal(mine_labels, labels[rank::2])
            assert mine_share == len(mine_labels) / len(labels)
    # a copy of the folder in which every file of process 1's rows is garbage
    copied = tmp_path / "copy"
    for i in range(len(large.train)):
        target = copied / large.train.path(i).relative_to(large.train.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(large.train.path(i).read_bytes())
    split = dataclasses.replace(large.train, root=copied)
    others = {int(i) for index in loader.index_batches() for i in index[1::2]}
    for i in others:
        split.path(i).write_bytes(b"\xff\xd8 not a jpeg")
    loader = BatchLoader(split, PREPROCESS, 5, **kwargs)
    for (images, labels, _), (expected, expected_labels, _) in zip(
        loader.shard(0, 2), shards[0], strict=True
    ):
        assert torch.equal(images, expected) and torch.equal(labels, expected_labels)
    with pytest.raises(UserError, match="cannot read image"):
        list(loader.shard(1, 2))


def test_a_file_broken_after_loading_is_one_clear_error_from_a_worker(tmp_path) -> None:
    """A truncated JPEG passes the header scan at load and fails in a decoding process: the
    error names the file, in one line without a worker's traceback."""
    root = tmp_path / "set"
    write_folder(root, 4)
    ds = load_dataset(f"folder:{root}", 16)
    victim = ds.train.path(3)
    Image.open(victim).convert("RGB").save(victim.with_suffix(".tmp.jpg"), format="JPEG")
    victim.write_bytes(victim.with_suffix(".tmp.jpg").read_bytes()[:200])
    loader = BatchLoader(ds.train, PREPROCESS, 4, workers=1)
    with pytest.raises(UserError) as caught:
        list(loader)
    message = str(caught.value)
    assert victim.name in message and "Traceback" not in message and "\n" not in message


def test_memory_stays_flat_as_the_folder_grows(tmp_path) -> None:
    """What a loaded folder holds grows by its file names (~tens of bytes an image), not by its
    images (6.9 KB each at 48x48 RGB here, 150 KB at 224x224); the peak of Python and numpy
    allocations over loading, statistics and one epoch grows by bookkeeping (indices, names) of
    a few hundred bytes an image, not by images."""
    image_bytes = 3 * 48 * 48

    def measure(per_class: int) -> tuple[int, int]:
        root = write_folder(tmp_path / f"n{per_class}", per_class, size=(40, 40))
        tracemalloc.start()
        ds = load_dataset(f"folder:{root}", 48)
        stats = split_statistics(ds.train, workers=0)
        loader = BatchLoader(ds.train, stats, 16, shuffle=True, augment=ds.augment, workers=0)
        batches = sum(1 for _ in loader)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert batches == math.ceil(len(ds.train) / 16)
        return len(pickle.dumps(ds)), peak

    measure(4)  # first-time imports and caches
    small_held, small_peak = measure(30)  # 72 training images: more than a statistics batch
    large_held, large_peak = measure(120)  # 4x the images: 270 more
    added = 3 * 120 - 3 * 30
    assert large_held - small_held < added * 64  # file names, no pixels
    assert large_held - small_held < added * image_bytes / 8
    assert large_peak - small_peak < added * image_bytes / 16


def test_folder_statistics_stream_and_sample(small) -> None:
    exact = normalization_stats(small.train.read(range(len(small.train))).numpy())
    streamed = split_statistics(small.train, workers=1)
    assert streamed.mean == pytest.approx(exact.mean, abs=1e-12)
    assert streamed.std == pytest.approx(exact.std, abs=1e-12)
    sampled = split_statistics(small.train, workers=0, limit=6)
    assert sampled.mean != streamed.mean
    assert sampled.mean == pytest.approx(exact.mean, abs=0.05)


def test_imagenet_geometry(large) -> None:
    assert large.train.geometry == Geometry(72, "crop") and large.image_size == (72, 72)
    assert large.augment.resized_crop and large.augment.hflip and not large.augment.crop_padding
    left, top, right, bottom = centre_box(300, 200, 224)
    assert right - left == bottom - top == pytest.approx(200 / EVAL_RESIZE)
    assert (left + right) / 2 == 150 and (top + bottom) / 2 == 100
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = random_resized_box(300, 200, rng)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 300 and 0 <= top < bottom <= 200
        assert 0.07 * 300 * 200 <= w * h <= 300 * 200
        assert CROP_RATIO[0] - 0.05 <= w / h <= CROP_RATIO[1] + 0.05
    assert random_resized_box(1000, 10, rng)[2] - random_resized_box(1000, 10, rng)[0] <= 1000
    batch = large.train.read(range(3))
    assert batch.shape == (3, 3, 72, 72) and batch.dtype == torch.uint8


def test_jpeg_reduced_decoding_matches_full_decoding(tmp_path) -> None:
    """A large JPEG decodes at a reduced DCT scale: the crop looks as from the full image."""
    y, x = np.mgrid[0:480, 0:640]
    pixels = np.stack([x * 255 // 640, y * 255 // 480, (x + y) * 255 // 1120], -1)
    Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "big.jpg", quality=95)
    Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "big.png")
    form, geometry = ImageFormat("RGB"), Geometry(64, "crop")
    fast = decode(tmp_path / "big.jpg", form, geometry).astype(int)
    full = decode(tmp_path / "big.png", form, geometry).astype(int)
    assert fast.shape == full.shape == (64, 64, 3)
    assert np.abs(fast - full).mean() < 2.0


def test_workers_must_not_be_negative(small) -> None:
    with pytest.raises(UserError, match="data.workers must be >= 0"):
        BatchLoader(small.train, PREPROCESS, 4, workers=-1)


def test_main_command_trains_and_exports_from_a_streamed_folder(tmp_path) -> None:
    """The whole pipeline on a folder read by a decoding process: training, calibration,
    statistics, export and the sample batch all take their images from the stream."""
    import json

    from qkd_deploy.train_and_export import main

    write_folder(tmp_path / "images", 12, size=(18, 18))
    out = tmp_path / "run"
    sets = [f"{key}.batch_size=8" for key in ("teacher_train", "student.float_train")]
    sets += ["student.train.batch_size=8", "data.workers=1", "data.calibration_size=8"]
    sets += ["bench.batch_sizes=[1]", "bench.iterations=2", "bench.warmup=1"]
    args = ["--data", f"folder:{tmp_path / 'images'}", "--set", "data.image_size=16"]
    args += ["--teacher-arch", "resnet8", "--bits", "8", "--epochs", "1", "--no-progress"]
    args += ["--allow-low-accuracy", "--out", str(out)]
    for setting in sets:
        args += ["--set", setting]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"] == "folder" and report["input_shape"] == [3, 16, 16]
    assert report["test_samples"] == 8 and report["students"][0]["onnx_agreement"] == 1.0
    with np.load(out / "sample_batch.npz") as sample:
        assert sample["images"].shape == (8, 3, 16, 16)
