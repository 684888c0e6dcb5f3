"""Readers of qkd_deploy.data.datasets, on small real files written into tmp_path."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qkd_deploy import data
from qkd_deploy.data import DATASET_FORMS, load_dataset, read_idx
from qkd_deploy.data.datasets import DEBIAN_FASHION_MNIST, FASHION_MNIST_CLASSES
from qkd_deploy.errors import UserError
from tests.support.data_mutants import CIFAR10_NAMES

IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int16): 0x0B, np.dtype(np.float32): 0x0D}


def write_idx(
    path: Path,
    array: np.ndarray,
    *,
    gz: bool = False,
    magic: bytes | None = None,
    count: int | None = None,
) -> Path:
    """Write ``array`` as an IDX file; ``magic``/``count`` override the header to corrupt it."""
    dims = list(array.shape)
    if count is not None:
        dims[0] = count
    header = magic or struct.pack(">BBBB", 0, 0, IDX_CODES[array.dtype], array.ndim)
    payload = header + struct.pack(f">{len(dims)}I", *dims)
    payload += array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def write_mnist_dir(
    directory: Path,
    n_train: int = 6,
    n_test: int = 4,
    size: int = 5,
    gz: bool = False,
    dotted: bool = False,
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "t10k-labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        kind = "idx3-ubyte" if array.ndim == 3 else "idx1-ubyte"
        name = f"{stem}.{kind}" if dotted else f"{stem}-{kind}"
        write_idx(directory / (name + (".gz" if gz else "")), array, gz=gz)
    return arrays


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4) * 10,
        (np.arange(24, dtype=np.int16) * 1000 - 9000).reshape(4, 6),
        np.linspace(-3.5, 2.25, 24, dtype=np.float32).reshape(2, 3, 2, 2),
    ],
    ids=["uint8", "int16", "float32"],
)
def test_read_idx_round_trip(tmp_path: Path, gz: bool, array: np.ndarray) -> None:
    back = read_idx(write_idx(tmp_path / "a.idx", array, gz=gz))
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_read_idx_bad_magic(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "bad", np.zeros((2, 2), np.uint8), magic=b"\x1f\x00\x08\x02")
    with pytest.raises(UserError, match="magic number"):
        read_idx(path)


def test_read_idx_truncated(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "short", np.zeros((3, 2), np.uint8), count=4)
    with pytest.raises(UserError, match="truncated"):
        read_idx(path)


@pytest.mark.parametrize(("gz", "dotted"), [(False, False), (True, False), (False, True)])
def test_mnist_dir_reads_exact_arrays(tmp_path: Path, gz: bool, dotted: bool) -> None:
    arrays = write_mnist_dir(tmp_path, gz=gz, dotted=dotted)
    ds = load_dataset(f"mnist:{tmp_path}")
    assert ds.name == "mnist" and ds.num_classes == 10 and ds.class_names[3] == "3"
    assert ds.in_channels == 1 and ds.image_size == (5, 5)
    assert ds.train.images.dtype == torch.uint8 and ds.train.labels.dtype == torch.int64
    np.testing.assert_array_equal(ds.train.images[:, 0].numpy(), arrays["train-images"])
    np.testing.assert_array_equal(ds.train.labels.numpy(), arrays["train-labels"])
    np.testing.assert_array_equal(ds.test.images[:, 0].numpy(), arrays["t10k-images"])
    np.testing.assert_array_equal(ds.test.labels.numpy(), arrays["t10k-labels"])
    assert (ds.augment.crop_padding, ds.augment.hflip) == (2, False)


def test_fashion_mnist_dir_names_and_augment(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path, gz=True)
    ds = load_dataset(f"fashion-mnist:{tmp_path}")
    assert ds.name == "fashion-mnist"
    assert ds.class_names == list(FASHION_MNIST_CLASSES) and ds.class_names[9] == "Ankle boot"
    assert (ds.augment.crop_padding, ds.augment.hflip) == (2, True)


def test_idx_count_mismatch(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(UserError, match="4 images but .* 3 labels"):
        load_dataset(f"mnist:{tmp_path}")


def test_idx_missing_file_is_named(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(UserError, match=r"t10k-labels-idx1-ubyte, t10k-labels-idx1-ubyte\.gz"):
        load_dataset(f"mnist:{tmp_path}")


def test_idx_label_out_of_range(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.full(6, 10, np.uint8))
    with pytest.raises(UserError, match="labels must lie in 0..9"):
        load_dataset(f"mnist:{tmp_path}")


def test_resize_at_load(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path, size=6)
    ds = load_dataset(f"mnist:{tmp_path}", image_size=12)
    assert ds.image_size == (12, 12) and ds.train.images.shape == (6, 1, 12, 12)
    assert ds.train.images.dtype == torch.uint8
    native = load_dataset(f"mnist:{tmp_path}", image_size=6)
    assert torch.equal(native.train.images, load_dataset(f"mnist:{tmp_path}").train.images)


def test_resize_keeps_constant_images_exact(tmp_path: Path) -> None:
    directory = tmp_path / "const"
    directory.mkdir()
    write_idx(directory / "train-images-idx3-ubyte", np.full((2, 8, 8), 77, np.uint8))
    write_idx(directory / "train-labels-idx1-ubyte", np.zeros(2, np.uint8))
    write_idx(directory / "t10k-images-idx3-ubyte", np.full((1, 8, 8), 200, np.uint8))
    write_idx(directory / "t10k-labels-idx1-ubyte", np.zeros(1, np.uint8))
    ds = load_dataset(f"mnist:{directory}", image_size=3)
    assert ds.train.images.shape == (2, 1, 3, 3)
    assert (ds.train.images == 77).all() and (ds.test.images == 200).all()


@pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(),
    reason=f"{DEBIAN_FASHION_MNIST} missing (apt install dataset-fashion-mnist)",
)
def test_debian_fashion_mnist() -> None:
    ds = load_dataset("fashion-mnist")
    assert (len(ds.train), len(ds.test)) == (60000, 10000)
    assert ds.image_size == (28, 28) and ds.in_channels == 1
    assert torch.bincount(ds.test.labels).tolist() == [1000] * 10


# ---------------------------------------------------------------- CIFAR


def cifar_batch(n: int, label_key: bytes, num_classes: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"testing batch",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: rng.integers(0, num_classes, n).tolist(),
        b"filenames": [f"img{i}.png".encode() for i in range(n)],
    }


def dump(path: Path, obj: object, protocol: int = 2) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def write_cifar10(root: Path) -> dict[str, dict]:
    directory = root / "cifar-10-batches-py"
    directory.mkdir(parents=True)
    batches = {f"data_batch_{i}": cifar_batch(2, b"labels", 10, i) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(3, b"labels", 10, 9)
    for name, batch in batches.items():
        dump(directory / name, batch, protocol=2 if name != "test_batch" else 5)
    dump(directory / "batches.meta", {b"label_names": CIFAR10_NAMES, b"num_vis": 3072})
    return batches


def test_cifar10_parent_and_batches_dir(tmp_path: Path) -> None:
    batches = write_cifar10(tmp_path)
    for spec in (f"cifar10:{tmp_path}", f"cifar10:{tmp_path / 'cifar-10-batches-py'}"):
        ds = load_dataset(spec)
        assert ds.name == "cifar10" and ds.num_classes == 10 and ds.class_names[9] == "truck"
        assert ds.train.images.shape == (10, 3, 32, 32) and ds.test.images.shape == (3, 3, 32, 32)
        assert ds.in_channels == 3 and ds.image_size == (32, 32)
        expected_labels = [y for i in range(1, 6) for y in batches[f"data_batch_{i}"][b"labels"]]
        assert ds.train.labels.tolist() == expected_labels
        assert ds.test.labels.tolist() == batches["test_batch"][b"labels"]
        # row-major RRR..GGG..BBB: pixel (c, h, w) of image i is data[i, c*1024 + h*32 + w]
        data = batches["data_batch_3"][b"data"]
        assert ds.train.images[5, 2, 7, 30].item() == data[1, 2 * 1024 + 7 * 32 + 30]
        assert ds.train.images[4, 1, 31, 0].item() == data[0, 1 * 1024 + 31 * 32 + 0]
        assert (ds.augment.crop_padding, ds.augment.hflip) == (4, True)


def test_cifar100(tmp_path: Path) -> None:
    directory = tmp_path / "cifar-100-python"
    directory.mkdir()
    train = cifar_batch(4, b"fine_labels", 100, 1)
    train[b"coarse_labels"] = [0, 1, 2, 3]
    test = cifar_batch(2, b"fine_labels", 100, 2)
    dump(directory / "train", train)
    dump(directory / "test", test)
    fine = [f"class{i:02d}".encode() for i in range(100)]
    dump(directory / "meta", {b"fine_label_names": fine, b"coarse_label_names": [b"x"] * 20})
    ds = load_dataset(f"cifar100:{tmp_path}", image_size=16)
    assert ds.num_classes == 100 and ds.class_names[42] == "class42"
    assert ds.train.labels.tolist() == train[b"fine_labels"]
    assert ds.train.images.shape == (4, 3, 16, 16) and ds.image_size == (16, 16)
    native = load_dataset(f"cifar100:{directory}")
    assert native.test.images[1, 0, 0, 5].item() == test[b"data"][1, 5]


def test_cifar_missing_files(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(UserError, match="data_batch_4"):
        load_dataset(f"cifar10:{tmp_path}")


def test_cifar_corrupt_and_wrong_batches(tmp_path: Path) -> None:
    batches = write_cifar10(tmp_path)
    directory = tmp_path / "cifar-10-batches-py"
    (directory / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="data_batch_2"):
        load_dataset(f"cifar10:{directory}")
    dump(directory / "data_batch_2", {b"data": batches["data_batch_1"][b"data"]})
    with pytest.raises(UserError, match="no 'labels' entry"):
        load_dataset(f"cifar10:{directory}")


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.mkdir, (str(self.marker),)


def test_cifar_pickle_cannot_run_code(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    dump(tmp_path / "cifar-10-batches-py" / "test_batch", {b"data": _Exploit(marker)})
    with pytest.raises(UserError, match="refusing to load posix.mkdir|refusing to load os.mkdir"):
        load_dataset(f"cifar10:{tmp_path}")
    assert not marker.exists()


# ---------------------------------------------------------------- folders

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 200, 0)


def write_images(
    folder: Path,
    color: tuple[int, int, int] | int,
    count: int,
    mode: str = "RGB",
    size: tuple[int, int] = (12, 10),
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new(mode, size, color).save(folder / f"img{i}.png")


def decoded(split) -> torch.Tensor:
    """Every image of a folder split, decoded (a folder split reads its files as batches ask)."""
    return split.read(range(len(split)))


def pixel_colors(images: torch.Tensor) -> list[tuple[int, ...]]:
    return [tuple(img[:, 0, 0].tolist()) for img in images]


def test_folder_auto_split(tmp_path: Path) -> None:
    write_images(tmp_path / "b_cat", BLUE, 5)
    write_images(tmp_path / "a_dog", RED, 10)
    (tmp_path / "a_dog" / "notes.txt").write_text("not an image")
    ds = load_dataset(f"folder:{tmp_path}", image_size=8)
    assert ds.class_names == ["a_dog", "b_cat"] and ds.num_classes == 2
    assert (len(ds.train), len(ds.test)) == (12, 3)
    assert torch.bincount(ds.test.labels).tolist() == [2, 1]
    assert decoded(ds.train).shape == (12, 3, 8, 8) and ds.image_size == (8, 8)
    colors = {0: RED, 1: BLUE}
    for split in (ds.train, ds.test):
        assert pixel_colors(decoded(split)) == [colors[y] for y in split.labels.tolist()]
    assert (ds.augment.crop_padding, ds.augment.hflip) == (1, True)
    again = load_dataset(f"folder:{tmp_path}", image_size=8)
    assert torch.equal(again.test.labels, ds.test.labels)
    assert torch.equal(decoded(again.train), decoded(ds.train))


def test_folder_with_a_broken_link_is_refused_and_working_links_are_read(tmp_path: Path) -> None:
    """A dataset of symbolic links (a common way to share one copy) is read through them; a
    link whose image is gone is named, not skipped (the data set would shrink unnoticed)."""
    write_images(tmp_path / "store", RED, 4)
    for i in range(4):
        (tmp_path / "data" / "red").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "red" / f"{i}.png").symlink_to(tmp_path / "store" / f"img{i}.png")
    write_images(tmp_path / "data" / "blue", BLUE, 4)
    assert len(load_dataset(f"folder:{tmp_path / 'data'}", image_size=8).train) == 6
    (tmp_path / "store" / "img2.png").unlink()
    with pytest.raises(UserError, match=r"red/2\.png is a link to .*img2\.png, which does not"):
        load_dataset(f"folder:{tmp_path / 'data'}", image_size=8)


def test_folder_train_test_layout(tmp_path: Path) -> None:
    for part, count in (("train", 3), ("test", 2)):
        write_images(tmp_path / part / "zebra", GREEN, count)
        write_images(tmp_path / part / "ant", RED, count, size=(40, 20))
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.class_names == ["ant", "zebra"]
    assert ds.image_size == (32, 32) and decoded(ds.train).shape == (6, 3, 32, 32)
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.test.labels.tolist() == [0, 0, 1, 1]
    assert pixel_colors(decoded(ds.test)) == [RED, RED, GREEN, GREEN]
    assert ds.augment.crop_padding == 4


def test_folder_val_layout_and_grayscale(tmp_path: Path) -> None:
    write_images(tmp_path / "train" / "a", 30, 2, mode="L")
    write_images(tmp_path / "train" / "b", 220, 2, mode="L")
    write_images(tmp_path / "val" / "b", 220, 1, mode="L")
    ds = load_dataset(f"folder:{tmp_path}", image_size=4)
    assert ds.in_channels == 1 and decoded(ds.train).shape == (4, 1, 4, 4)
    assert ds.test.labels.tolist() == [1] and (decoded(ds.test) == 220).all()
    write_images(tmp_path / "train" / "a", RED, 1, mode="RGB")
    assert load_dataset(f"folder:{tmp_path}", image_size=4).in_channels == 3


def _train_without_test(root: Path) -> None:
    write_images(root / "train" / "a", RED, 2)


def _empty_class(root: Path) -> None:
    write_images(root / "ok", RED, 3)
    (root / "empty").mkdir()


def _no_class_folders(root: Path) -> None:
    write_images(root, RED, 2)


def _single_image_class(root: Path) -> None:
    write_images(root / "a", RED, 1)
    write_images(root / "b", BLUE, 4)


def _too_few_for_test_split(root: Path) -> None:
    for name in "abcd":
        write_images(root / name, RED, 2)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (_train_without_test, "no test/ or val/"),
        (_empty_class, "empty holds no images"),
        (_no_class_folders, "no class sub-folders"),
        (_single_image_class, r"\['a'\] hold fewer than 2 images"),
        (_too_few_for_test_split, "cannot make a stratified"),
    ],
)
def test_folder_errors(tmp_path: Path, setup, message: str) -> None:
    setup(tmp_path)
    with pytest.raises(UserError, match=message):
        load_dataset(f"folder:{tmp_path}")


def test_folder_corrupt_image_is_named(tmp_path: Path) -> None:
    write_images(tmp_path / "a", RED, 3)
    write_images(tmp_path / "b", BLUE, 3)
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(UserError, match="broken.png"):
        load_dataset(f"folder:{tmp_path}")


def test_folder_16_bit_grayscale_is_scaled_by_the_sets_largest_pixel(tmp_path: Path) -> None:
    """A 12-bit scan in 16-bit PNGs keeps its range: Pillow's convert("L") would clamp every
    pixel above 255 to white, making both classes identical."""
    values = {"a": [100, 700, 1300], "b": [2500, 3300, 4095]}
    for name, levels in values.items():
        (tmp_path / "train" / name).mkdir(parents=True)
        (tmp_path / "test" / name).mkdir(parents=True)
        for level in levels:
            image = Image.fromarray(np.full((6, 6), level, dtype=np.uint16))
            image.save(tmp_path / "train" / name / f"{level:05d}.png")
        image.save(tmp_path / "test" / name / "last.png")
    assert Image.open(tmp_path / "test" / "a" / "last.png").mode.startswith("I")
    ds = load_dataset(f"folder:{tmp_path}", image_size=6)
    assert ds.in_channels == 1
    expected = [round(v * 255 / 4095) for v in values["a"] + values["b"]]
    assert [int(img[0, 0, 0]) for img in decoded(ds.train)] == expected
    assert [int(img[0, 0, 0]) for img in decoded(ds.test)] == [expected[2], 255]


def test_folder_float_image_is_refused(tmp_path: Path) -> None:
    write_images(tmp_path / "a", 30, 3, mode="L")
    write_images(tmp_path / "b", 90, 2, mode="L")
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(tmp_path / "b" / "f.tif")
    with pytest.raises(UserError, match=r"f\.tif is a floating-point image"):
        load_dataset(f"folder:{tmp_path}")


def test_folder_skips_hidden_files(tmp_path: Path) -> None:
    write_images(tmp_path / "a", RED, 3)
    write_images(tmp_path / "b", BLUE, 3)
    (tmp_path / "b" / "._img0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    ds = load_dataset(f"folder:{tmp_path}", image_size=4)
    assert len(ds.train) + len(ds.test) == 6


def test_folder_test_class_unknown_to_train(tmp_path: Path) -> None:
    write_images(tmp_path / "train" / "a", RED, 2)
    write_images(tmp_path / "test" / "zz", RED, 2)
    with pytest.raises(UserError, match=r"\['zz'\]"):
        load_dataset(f"folder:{tmp_path}")


# ---------------------------------------------------------------- digits and specs


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_split(digits) -> None:
    assert (len(digits.train), len(digits.test)) == (1437, 360)
    assert digits.train.images.shape == (1437, 1, 8, 8) and digits.image_size == (8, 8)
    assert digits.class_names == [str(d) for d in range(10)] and digits.num_classes == 10
    total = torch.bincount(digits.train.labels, minlength=10) + torch.bincount(
        digits.test.labels, minlength=10
    )
    test_counts = torch.bincount(digits.test.labels, minlength=10)
    assert ((test_counts - 0.2 * total).abs() <= 1).all()
    assert (digits.augment.crop_padding, digits.augment.hflip) == (1, False)


def test_digits_pixels(digits) -> None:
    images = torch.cat([digits.train.images, digits.test.images])
    assert images.dtype == torch.uint8 and images.min() == 0 and images.max() == 255
    allowed = {round(v * 255 / 16) for v in range(17)}
    assert set(images.unique().tolist()) <= allowed


def test_digits_split_is_fixed(digits) -> None:
    again = load_dataset("digits")
    assert torch.equal(again.test.images, digits.test.images)
    assert torch.equal(again.train.labels, digits.train.labels)


def test_digits_resized() -> None:
    ds = load_dataset("digits", image_size=16)
    assert ds.train.images.shape == (1437, 1, 16, 16) and ds.image_size == (16, 16)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("imagenet", "valid forms: digits, fashion-mnist"),
        ("mnist", "needs a directory: write mnist:DIR"),
        ("digits:/tmp", "takes no argument"),
        ("cifar10:/no/such/dir", "/no/such/dir does not exist"),
    ],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_dataset(spec)


def test_bad_image_size() -> None:
    with pytest.raises(UserError, match="image_size"):
        load_dataset("digits", image_size=0)


def test_forms_are_documented() -> None:
    assert {"digits", "folder:DIR", "cifar100:DIR"} <= set(DATASET_FORMS)


def test_package_exports_resolve() -> None:
    assert set(data.__all__) == set(data._EXPORTS)
    assert all(getattr(data, name) is not None for name in data.__all__)
