"""Image-classification data sets: sklearn digits, IDX (MNIST family) and CIFAR pickles, held in
memory as uint8 NCHW tensors with int64 labels, and image folders, read from disk as batches ask
for them (``data.folder``).

``load_dataset(spec)`` picks the reader by the name before the first ``:`` (see ``DATASET_FORMS``).
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qkd_deploy.data import safe_pickle
from qkd_deploy.data.augment import Augment
from qkd_deploy.data.folder import FolderSplit, read_folder
from qkd_deploy.errors import UserError

DATASET_FORMS = (
    "digits",
    "fashion-mnist",
    "fashion-mnist:DIR",
    "mnist:DIR",
    "cifar10:DIR",
    "cifar100:DIR",
    "folder:DIR",
)
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@dataclass
class ImageSplit:
    """One split held in memory: uint8 NCHW images (C = 1 or 3) and int64 labels of shape (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be uint8 NCHW, got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be int64 of shape ({self.images.shape[0]},), got "
                f"{self.labels.dtype} {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def subset(self, index: torch.Tensor | np.ndarray | Sequence[int]) -> ImageSplit:
        """The images at ``index``, in that order."""
        index = torch.as_tensor(np.asarray(index, dtype=np.int64))
        return ImageSplit(self.images[index], self.labels[index])

    def first(self, n: int) -> torch.Tensor:
        """The first ``n`` images (fewer in a smaller split), uint8 NCHW."""
        return self.images[:n]

    def read(self, index: torch.Tensor | np.ndarray | Sequence[int]) -> torch.Tensor:
        """The images at ``index``, uint8 NCHW (what ``FolderSplit.read`` decodes)."""
        return self.images[torch.as_tensor(np.asarray(index, dtype=np.int64))]

    def fingerprint(self) -> str:
        """sha256 of the images and labels: equal for the same split."""
        digest = hashlib.sha256(self.images.numpy().tobytes())
        digest.update(self.labels.numpy().tobytes())
        return digest.hexdigest()


@dataclass
class DatasetSplits:
    """A loaded data set: both splits, class names, image geometry and its default augmentation."""

    name: str
    train: ImageSplit | FolderSplit
    test: ImageSplit | FolderSplit
    num_classes: int
    class_names: list[str]
    in_channels: int
    image_size: tuple[int, int]
    augment: Augment = field(default_factory=Augment)


_Reader = Callable[[str, str, int | None], DatasetSplits]


def load_dataset(spec: str, image_size: int | None = None) -> DatasetSplits:
    """Load a data set named by ``spec`` (one of ``DATASET_FORMS``), optionally resized to
    ``image_size`` x ``image_size`` (bilinear, antialiased)."""
    if image_size is not None and image_size < 1:
        raise UserError(f"image_size must be a positive number of pixels, got {image_size}")
    name, _, arg = spec.partition(":")
    reader = _READERS.get(name.strip().lower())
    if reader is None:
        raise UserError(f"unknown data set {spec!r}; valid forms: {', '.join(DATASET_FORMS)}")
    return reader(spec, arg.strip(), image_size)


# ---------------------------------------------------------------- shared helpers


def _make_splits(
    name: str,
    train: ImageSplit,
    test: ImageSplit,
    class_names: list[str],
    augment: Augment,
    image_size: int | None,
) -> DatasetSplits:
    """Resize both splits if ``image_size`` differs from the native size; build the result."""
    if image_size is not None:
        train = ImageSplit(_resize(train.images, image_size), train.labels)
        test = ImageSplit(_resize(test.images, image_size), test.labels)
    return DatasetSplits(
        name=name,
        train=train,
        test=test,
        num_classes=len(class_names),
        class_names=list(class_names),
        in_channels=train.images.shape[1],
        image_size=(train.images.shape[2], train.images.shape[3]),
        augment=augment,
    )


def _resize(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Bilinear, antialiased resize of uint8 NCHW images, in chunks to bound memory."""
    if images.shape[2:] == (size, size):
        return images
    parts = [
        F.interpolate(
            part.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        .round_()
        .clamp_(0, 255)
        .to(torch.uint8)
        for part in images.split(chunk)
    ]
    return torch.cat(parts)


def _split(images: np.ndarray, labels: np.ndarray) -> ImageSplit:
    return ImageSplit(
        torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64))
    )


def _check_labels(labels: np.ndarray, num_classes: int, source: Path | str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(
            f"{source}: labels must lie in 0..{num_classes - 1}, found "
            f"{labels.min()}..{labels.max()}; the file is corrupt or of another "
            "data set"
        )


def _existing_dir(spec: str, arg: str) -> Path:
    name = spec.partition(":")[0]
    if not arg:
        raise UserError(f"data set {spec!r} needs a directory: write {name}:DIR")
    directory = Path(arg).expanduser()
    if not directory.is_dir():
        raise UserError(
            f"data set {spec!r}: directory {directory} does not exist; "
            f"give the folder that holds the files as {name}:DIR"
        )
    return directory


# ---------------------------------------------------------------- digits


def _read_digits(spec: str, arg: str, image_size: int | None) -> DatasetSplits:
    """sklearn's 8x8 digits (values 0..16 -> 0..255) with a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if arg:
        raise UserError(
            f"data set {spec!r}: 'digits' is built in and takes no argument; write just 'digits'"
        )
    digits = load_digits()
    images = np.round(digits.images * 255 / 16).astype(np.uint8)[:, None]
    labels = digits.target
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0
    )
    return _make_splits(
        "digits",
        _split(images[train_idx], labels[train_idx]),
        _split(images[test_idx], labels[test_idx]),
        [str(d) for d in range(10)],
        Augment(crop_padding=1, hflip=False),
        image_size,
    )


# ---------------------------------------------------------------- IDX (MNIST family)

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_FILES = {
    "train images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (plain or gzip-compressed) into a native-endian numpy array.

    Header: two zero bytes, a dtype code, the number of dimensions, then each dimension as a
    big-endian uint32; the data that follows must be exactly as long as the header says. The
    header's size is checked against the file's before any data is read: a plain file must
    hold exactly that much, a gzip file at most ``_MAX_DEFLATE_RATIO`` times its size.
    """
    path = Path(path)
    try:
        with open(path, "rb") as plain:
            gz = plain.read(2) == b"\x1f\x8b"
            size = os.fstat(plain.fileno()).st_size
            plain.seek(0)
            stream = gzip.GzipFile(fileobj=plain) if gz else plain
            return _read_idx_stream(stream, path, size, gz)
    except (OSError, EOFError, zlib.error) as err:
        raise UserError(f"cannot read {path}: {err}") from None


_MAX_DEFLATE_RATIO = 1032  # deflate cannot expand data more than ~1032:1


def _read_idx_stream(stream, path: Path, size: int, gz: bool) -> np.ndarray:
    magic = stream.read(4)
    if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in _IDX_DTYPES or magic[3] == 0:
        raise UserError(
            f"{path} is not an IDX file: its magic number is 0x{magic[:4].hex()}, "
            "expected 0x0000 + dtype code (08..0E) + number of dimensions; "
            "check the path or download the file again"
        )
    ndim = magic[3]
    header = 4 + 4 * ndim
    raw_dims = stream.read(4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise UserError(f"{path}: IDX header is truncated; download the file again")
    dims = struct.unpack(f">{ndim}I", raw_dims)
    dtype = np.dtype(_IDX_DTYPES[magic[2]])
    count = math.prod(dims)
    expected = count * dtype.itemsize
    available = size * _MAX_DEFLATE_RATIO if gz else size - header
    if expected > available:
        held = f"at most {available} once decompressed" if gz else str(available)
        raise UserError(
            f"{path}: the IDX header promises {expected} bytes of data (shape {dims}) but the "
            f"file holds {held}; the file is truncated or corrupt, download it again"
        )
    data = stream.read(expected + 1)  # one more: data beyond the promised size is an error
    if len(data) != expected:
        raise UserError(
            f"{path}: the IDX header promises {expected} bytes of data (shape {dims}) but the "
            f"file holds {'more' if len(data) > expected else len(data)}; the file is "
            "truncated or corrupt, download it again"
        )
    array = np.frombuffer(data, dtype=dtype, count=count)
    return array.astype(dtype.newbyteorder("=")).reshape(dims)


def _find_idx(directory: Path, role: str, spec: str) -> Path:
    names = [stem + ext for stem in _IDX_FILES[role] for ext in ("", ".gz")]
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise UserError(
        f"data set {spec!r}: no IDX file with the {role} in {directory}; looked for "
        f"{', '.join(names)}"
    )


def _read_idx_split(directory: Path, part: str, spec: str) -> ImageSplit:
    images_path = _find_idx(directory, f"{part} images", spec)
    labels_path = _find_idx(directory, f"{part} labels", spec)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise UserError(
            f"{images_path}: expected uint8 images of shape (N, H, W), got "
            f"{images.dtype} {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise UserError(
            f"{labels_path}: expected uint8 labels of shape (N,), got {labels.dtype} {labels.shape}"
        )
    if len(images) != len(labels):
        raise UserError(
            f"{images_path} holds {len(images)} images but {labels_path} holds "
            f"{len(labels)} labels; the two files must come from the same split"
        )
    _check_labels(labels, 10, labels_path)
    return _split(images[:, None], labels)


def _read_idx_dataset(
    name: str,
    directory: Path,
    spec: str,
    class_names: list[str],
    augment: Augment,
    image_size: int | None,
) -> DatasetSplits:
    train = _read_idx_split(directory, "train", spec)
    test = _read_idx_split(directory, "test", spec)
    return _make_splits(name, train, test, class_names, augment, image_size)


def _read_mnist(spec: str, arg: str, image_size: int | None) -> DatasetSplits:
    return _read_idx_dataset(
        "mnist",
        _existing_dir(spec, arg),
        spec,
        [str(d) for d in range(10)],
        Augment(2, False),
        image_size,
    )


def _read_fashion_mnist(spec: str, arg: str, image_size: int | None) -> DatasetSplits:
    if arg:
        directory = _existing_dir(spec, arg)
    elif DEBIAN_FASHION_MNIST.is_dir():
        directory = DEBIAN_FASHION_MNIST
    else:
        raise UserError(
            f"data set 'fashion-mnist' reads {DEBIAN_FASHION_MNIST}, which does not "
            "exist; install it (apt install dataset-fashion-mnist) or give the "
            "folder with the IDX files as fashion-mnist:DIR"
        )
    return _read_idx_dataset(
        "fashion-mnist", directory, spec, list(FASHION_MNIST_CLASSES), Augment(2, True), image_size
    )


# ---------------------------------------------------------------- CIFAR pickles


def _unpickle(path: Path) -> dict:
    obj = safe_pickle.load(
        path,
        "a readable CIFAR pickle batch",
        "download the 'python version' of the data set again",
    )
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return obj


def _key_name(key: object) -> str:
    if isinstance(key, bytes):
        return key.decode(errors="replace")
    return key if isinstance(key, str) else f"<{type(key).__name__}>"


def _field(batch: dict, key: bytes, path: Path) -> object:
    if key not in batch:
        raise UserError(
            f"{path}: the batch has no {key.decode()!r} entry (found "
            f"{sorted(_key_name(k) for k in batch)}); is this the "
            "right CIFAR variant?"
        )
    return batch[key]


def _read_cifar_batches(paths: list[Path], label_key: bytes, num_classes: int) -> ImageSplit:
    images, labels = [], []
    for path in paths:
        batch = _unpickle(path)
        data = _array_field(batch, b"data", path)
        batch_labels = _array_field(batch, label_key, path)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise UserError(
                f"{path}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}"
            )
        if batch_labels.shape != (len(data),):
            raise UserError(f"{path}: {len(data)} images but {batch_labels.size} labels")
        if batch_labels.dtype.kind not in "iu":
            raise UserError(f"{path}: labels must be integers, got {batch_labels.dtype}")
        _check_labels(batch_labels, num_classes, path)
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    return _split(np.concatenate(images), np.concatenate(labels))


def _array_field(batch: dict, key: bytes, path: Path) -> np.ndarray:
    """Entry ``key`` of a batch as a numpy array (a list of labels becomes one)."""
    try:
        return np.asarray(_field(batch, key, path))
    except (ValueError, TypeError, OverflowError) as error:  # ragged or mixed lists
        raise UserError(f"{path}: {key.decode()!r} is not an array ({error})") from None


def _cifar_dir(spec: str, arg: str, subfolder: str, required: list[str]) -> Path:
    """The folder holding ``required``: DIR itself or DIR/``subfolder``."""
    directory = _existing_dir(spec, arg)
    for candidate in (directory, directory / subfolder):
        if all((candidate / name).is_file() for name in required):
            return candidate
    raise UserError(
        f"data set {spec!r}: expected the files {', '.join(required)} in "
        f"{directory} or in {directory / subfolder}; extract the 'python version' "
        "archive there"
    )


def _label_names(path: Path, key: bytes) -> list[str]:
    names = _field(_unpickle(path), key, path)
    if not isinstance(names, list | tuple) or not names:
        raise UserError(f"{path}: {key.decode()!r} must be a non-empty list of class names")
    if not all(isinstance(n, bytes | str) for n in names):
        raise UserError(f"{path}: {key.decode()!r} holds something other than names")
    try:
        return [n.decode() if isinstance(n, bytes) else n for n in names]
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: a class name is not UTF-8 text ({error})") from None


def _read_cifar10(spec: str, arg: str, image_size: int | None) -> DatasetSplits:
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    directory = _cifar_dir(
        spec, arg, "cifar-10-batches-py", [*train_files, "test_batch", "batches.meta"]
    )
    class_names = _label_names(directory / "batches.meta", b"label_names")
    train = _read_cifar_batches([directory / f for f in train_files], b"labels", len(class_names))
    test = _read_cifar_batches([directory / "test_batch"], b"labels", len(class_names))
    return _make_splits("cifar10", train, test, class_names, Augment(4, True), image_size)


def _read_cifar100(spec: str, arg: str, image_size: int | None) -> DatasetSplits:
    directory = _cifar_dir(spec, arg, "cifar-100-python", ["train", "test", "meta"])
    class_names = _label_names(directory / "meta", b"fine_label_names")
    train = _read_cifar_batches([directory / "train"], b"fine_labels", len(class_names))
    test = _read_cifar_batches([directory / "test"], b"fine_labels", len(class_names))
    return _make_splits("cifar100", train, test, class_names, Augment(4, True), image_size)


# ---------------------------------------------------------------- image folders


def _read_folder(spec: str, arg: str, image_size: int | None) -> DatasetSplits:
    """``folder.read_folder``: splits that decode their images as batches ask for them."""
    found = read_folder(_existing_dir(spec, arg), image_size)
    size = found.train.geometry.size
    return DatasetSplits(
        name="folder",
        train=found.train,
        test=found.test,
        num_classes=len(found.class_names),
        class_names=found.class_names,
        in_channels=found.train.channels,
        image_size=(size, size),
        augment=found.augment,
    )


_READERS: dict[str, _Reader] = {
    "digits": _read_digits,
    "mnist": _read_mnist,
    "fashion-mnist": _read_fashion_mnist,
    "cifar10": _read_cifar10,
    "cifar100": _read_cifar100,
    "folder": _read_folder,
}
